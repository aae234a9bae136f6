import { spawn } from "node:child_process";
import { readFile } from "node:fs/promises";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";
import { createLogger } from "../../shared/log.js";

const log = createLogger("runc");

export type RuncStatus = "creating" | "created" | "running" | "paused" | "stopped";

export interface RuncContainer {
  id: string;
  pid: number;
  status: RuncStatus;
  bundle: string;
}

const TIMEOUT_MS = 30_000;

/** A thin client of the runc CLI (default state root, so `runc list` shows our containers). */
export class Runc {
  constructor(private readonly binary: string) {}

  /**
   * `runc run --detach`. In detached, non-terminal mode the container inherits runc's stdio, so
   * runc gets /dev/null for all three: the agent must not hold a host pipe (CRIU refuses to dump
   * one, and the pipe would never close). runc's own errors go to `logFile` instead.
   */
  async runDetached(id: string, bundle: string, logFile: string): Promise<void> {
    const argv = [this.binary, "--log", logFile, "--log-format", "json", "run", "--detach", "--bundle", bundle, id];
    log.debug("run", { argv });
    const exitCode = await new Promise<number>((resolve, reject) => {
      const child = spawn(argv[0]!, argv.slice(1), { stdio: "ignore" });
      const timer = setTimeout(() => child.kill("SIGKILL"), TIMEOUT_MS);
      child.on("error", (err) => {
        clearTimeout(timer);
        reject(new CubicleError("internal", `${this.binary}: ${err.message}`, { cause: err }));
      });
      child.on("exit", (code, signal) => {
        clearTimeout(timer);
        resolve(code ?? (signal === "SIGKILL" ? -1 : 128));
      });
    });
    if (exitCode === 0) return;
    const detail = await readRuncErrors(logFile);
    if (exitCode === -1) throw new CubicleError("deadline_exceeded", `runc run ${id} timed out after ${TIMEOUT_MS} ms: ${detail}`);
    throw new CubicleError("internal", `runc run ${id} exited with ${exitCode}: ${detail}`, { details: { logFile } });
  }

  /**
   * Kills and removes a container; no error when it does not exist. `runc delete --force` polls
   * in 100 ms steps after its SIGKILL, so kill the init ourselves and wait in 2 ms steps first:
   * the container's other processes die with the PID namespace's init.
   */
  async kill(container: RuncContainer): Promise<void> {
    if (container.status === "stopped" || container.pid <= 0) return;
    try {
      process.kill(container.pid, "SIGKILL");
    } catch {
      return;
    }
    // A frozen process cannot die: thaw it (the SIGKILL is already pending).
    if (container.status === "paused") await this.resume(container.id).catch(() => {});
    const deadline = Date.now() + 5_000;
    while (Date.now() < deadline && (await isAlive(container.pid))) await new Promise((r) => setTimeout(r, 2));
  }

  async delete(id: string, force: boolean): Promise<void> {
    const result = await runCommand([this.binary, "delete", ...(force ? ["--force"] : []), id], { timeoutMs: TIMEOUT_MS, allowFailure: true });
    if (result.exitCode !== 0 && !isMissing(result.stderr)) {
      throw new CubicleError("internal", `runc delete ${id} failed: ${result.stderr.trim()}`);
    }
  }

  async state(id: string): Promise<RuncContainer | undefined> {
    const result = await runCommand([this.binary, "state", id], { timeoutMs: TIMEOUT_MS, allowFailure: true });
    if (result.exitCode !== 0) {
      if (isMissing(result.stderr)) return undefined;
      throw new CubicleError("internal", `runc state ${id} failed: ${result.stderr.trim()}`);
    }
    return JSON.parse(result.stdout) as RuncContainer;
  }

  async list(): Promise<RuncContainer[]> {
    const result = await runCommand([this.binary, "list", "--format", "json"], { timeoutMs: TIMEOUT_MS });
    return (JSON.parse(result.stdout || "null") as RuncContainer[] | null) ?? [];
  }

  async pause(id: string): Promise<void> {
    await runCommand([this.binary, "pause", id], { timeoutMs: TIMEOUT_MS });
  }

  async resume(id: string): Promise<void> {
    await runCommand([this.binary, "resume", id], { timeoutMs: TIMEOUT_MS });
  }
}

/** Alive = exists and is not a zombie (runc treats a zombie init as stopped). */
async function isAlive(pid: number): Promise<boolean> {
  const stat = await readFile(`/proc/${pid}/stat`, "utf8").catch(() => "");
  if (!stat) return false;
  const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
  return state !== "Z" && state !== "X";
}

function isMissing(stderr: string): boolean {
  return /does not exist|not found/i.test(stderr);
}

/** The error lines of a runc JSON log, newest last. */
async function readRuncErrors(logFile: string): Promise<string> {
  const text = await readFile(logFile, "utf8").catch(() => "");
  const messages = text
    .split("\n")
    .filter(Boolean)
    .map((line) => {
      try {
        const entry = JSON.parse(line) as { level?: string; msg?: string };
        return entry.level === "error" || entry.level === "fatal" ? entry.msg : undefined;
      } catch {
        return line;
      }
    })
    .filter((m): m is string => Boolean(m));
  return messages.slice(-3).join("; ") || "no error in the runc log";
}
