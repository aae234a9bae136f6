/**
 * The processes the agent knows: running ones by pid, and the end events of recently exited
 * ones so that a Connect arriving after the exit still gets `start` + `end`.
 * Exited entries expire lazily (checked on access), so an idle agent runs no timer for them.
 */
import { CubicleError } from "../../shared/cubicle-error.js";
import type { ManagedProcess } from "./managed-process.js";

export type ProcessSelector = { pid: number } | { tag: string };

const keepExitedMs = 10 * 60 * 1000;
const maxExited = 256;

export class ProcessRegistry {
  private readonly running = new Map<number, ManagedProcess>();
  private readonly exited = new Map<number, { proc: ManagedProcess; exitedAt: number }>();

  add(proc: ManagedProcess): void {
    this.exited.delete(proc.pid);
    this.running.set(proc.pid, proc);
    void proc.ended.then(() => {
      if (this.running.get(proc.pid) === proc) this.running.delete(proc.pid);
      this.exited.set(proc.pid, { proc, exitedAt: Date.now() });
      this.pruneExited();
    });
  }

  /** Running processes, PTYs included. */
  list(): ManagedProcess[] {
    return [...this.running.values()];
  }

  /** A running process, or `not_found` with upstream's message. */
  getRunning(selector: ProcessSelector): ManagedProcess {
    const proc = this.find(selector, false);
    if (!proc) throw notFound(selector);
    return proc;
  }

  /** A running or recently exited process (for Connect), or `not_found`. */
  getRunningOrExited(selector: ProcessSelector): ManagedProcess {
    const proc = this.find(selector, true);
    if (!proc) throw notFound(selector);
    return proc;
  }

  private find(selector: ProcessSelector, includeExited: boolean): ManagedProcess | undefined {
    if (includeExited) this.pruneExited();
    if ("pid" in selector) {
      return this.running.get(selector.pid) ?? (includeExited ? this.exited.get(selector.pid)?.proc : undefined);
    }
    for (const proc of this.running.values()) if (proc.tag === selector.tag) return proc;
    if (!includeExited) return undefined;
    let latest: { proc: ManagedProcess; exitedAt: number } | undefined;
    for (const entry of this.exited.values()) {
      if (entry.proc.tag === selector.tag && (!latest || entry.exitedAt >= latest.exitedAt)) latest = entry;
    }
    return latest?.proc;
  }

  private pruneExited(now = Date.now()): void {
    for (const [pid, entry] of this.exited) {
      if (this.exited.size > maxExited || now - entry.exitedAt > keepExitedMs) this.exited.delete(pid);
      else break; // insertion order = exit order: the rest are newer
    }
  }
}

function notFound(selector: ProcessSelector): CubicleError {
  return "pid" in selector
    ? new CubicleError("not_found", `process with pid ${selector.pid} not found`)
    : new CubicleError("not_found", `process with tag ${selector.tag} not found`);
}
