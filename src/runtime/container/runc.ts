import { spawn } from "node:child_process";
import { writeFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";
import { pathExists } from "../../shared/fs.js";
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

/** What `runc checkpoint` and `runc restore` need to drive CRIU. */
export interface CriuRunOptions {
  /**
   * The CRIU binary: `runc --criu` for runc < 1.2. Newer runc has no such flag and runs the
   * `criu` it finds in PATH, so `env.PATH` must lead to this same binary (CRIU_FRONT_NOTE).
   */
  criuPath: string;
  /** The sandbox's netns; runc and CRIU run inside it (CRIU_NETNS_NOTE). */
  netnsPath: string;
  imagePath: string;
  /** CRIU writes dump.log / restore.log here. */
  workPath: string;
  /** runc's own JSON log (its errors end up in the thrown error). */
  logFile: string;
  timeoutMs: number;
  /** Environment of runc and so of CRIU (PATH with the tar shim). */
  env: NodeJS.ProcessEnv;
}

/** A thin client of the runc CLI (default state root, so `runc list` shows our containers). */
export class Runc {
  /** runc's state root for root (no `--root` is ever passed): one `<id>/state.json` per container. */
  private readonly root = "/run/runc";
  private readonly freezers = new Map<string, FreezerControl>();

  /** Whether this runc takes `--criu` (runc < 1.2); asked once. */
  private takesCriuFlag: Promise<boolean> | undefined;

  constructor(private readonly binary: string) {}

  /**
   * The argv of a checkpoint or restore: `runc <subcommand>` in the sandbox's netns, with CRIU
   * named (runc < 1.2 only, CRIU_FRONT_NOTE), the JSON log, the image and work paths.
   */
  private async criuCommand(options: CriuRunOptions, subcommand: string[]): Promise<string[]> {
    this.takesCriuFlag ??= runCommand([this.binary, "--help"], { timeoutMs: TIMEOUT_MS, allowFailure: true }).then((result) => /--criu\b/.test(result.stdout));
    const criu = (await this.takesCriuFlag) ? ["--criu", options.criuPath] : [];
    return [...inNetns(options.netnsPath), this.binary, ...criu, "--log", options.logFile, "--log-format", "json", ...subcommand, "--image-path", options.imagePath, "--work-path", options.workPath, "--file-locks"];
  }

  /**
   * `runc run --detach`. In detached, non-terminal mode the container inherits runc's stdio, so
   * runc gets /dev/null for all three: the agent must not hold a host pipe (CRIU refuses to dump
   * one, and the pipe would never close). runc's own errors go to `logFile` instead.
   */
  async runDetached(id: string, bundle: string, logFile: string, netnsPath: string): Promise<void> {
    await this.detached([...inNetns(netnsPath), this.binary, "--log", logFile, "--log-format", "json", "run", "--detach", "--bundle", bundle, id], `runc run ${id}`, logFile, TIMEOUT_MS);
  }

  /**
   * `runc checkpoint`: CRIU dumps the container's processes into `imagePath` (its log, dump.log,
   * goes to `workPath`). Without `leaveRunning` CRIU kills the processes and runc removes the
   * container (state, cgroups); the bundle stays. A container paused before the call stays
   * paused after a `leaveRunning` dump (CRIU restores the freezer state it found).
   *
   * runc (and so CRIU) runs inside the sandbox's netns (`netnsPath`), see CRIU_NETNS_NOTE.
   */
  async checkpoint(id: string, options: CriuRunOptions & { leaveRunning: boolean }): Promise<void> {
    const argv = await this.criuCommand(options, ["checkpoint"]);
    if (options.leaveRunning) argv.push("--leave-running");
    argv.push(id);
    await this.detached(argv, `runc checkpoint ${id}`, options.logFile, options.timeoutMs, options.env);
  }

  /**
   * `runc restore --detach`: a new container `id` from `bundle` (its config.json: cgroups,
   * mounts) with the processes of the CRIU image, restored into the netns `netnsPath` (runc and
   * CRIU run inside it, see CRIU_NETNS_NOTE). stdio is /dev/null as for run.
   */
  async restoreDetached(id: string, bundle: string, options: CriuRunOptions): Promise<void> {
    const argv = [...(await this.criuCommand(options, ["restore", "--detach", "--bundle", bundle])), id];
    await this.detached(argv, `runc restore ${id}`, options.logFile, options.timeoutMs, options.env);
  }

  /** Runs a runc command with stdio on /dev/null (see runDetached); errors come from its JSON log. */
  private async detached(argv: string[], what: string, logFile: string, timeoutMs: number, env?: NodeJS.ProcessEnv): Promise<void> {
    log.debug("run", { argv });
    const exitCode = await new Promise<number>((resolve, reject) => {
      const child = spawn(argv[0]!, argv.slice(1), { stdio: "ignore", env: env ?? process.env });
      const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
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
    if (exitCode === -1) throw new CubicleError("deadline_exceeded", `${what} timed out after ${timeoutMs} ms: ${detail}`);
    throw new CubicleError("internal", `${what} exited with ${exitCode}: ${detail}`, { details: { logFile } });
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
    this.freezers.delete(id);
    const result = await runCommand([this.binary, "delete", ...(force ? ["--force"] : []), id], { timeoutMs: TIMEOUT_MS, allowFailure: true });
    if (result.exitCode !== 0 && !isMissing(result.stderr)) {
      throw new CubicleError("internal", `runc delete ${id} failed: ${result.stderr.trim()}`);
    }
  }

  /**
   * A container's state. Read from runc's own state file when it can be (`runc state` is a Go
   * process start, ~8 ms, and the checkpoint, restore and destroy paths each need the state);
   * `runc state` is the fallback for a file this reader does not understand.
   */
  async state(id: string): Promise<RuncContainer | undefined> {
    const fromFile = await readStateFile(this.root, id);
    if (fromFile !== "unknown") return fromFile;
    return this.stateFromCli(id);
  }

  private async stateFromCli(id: string): Promise<RuncContainer | undefined> {
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

  /**
   * Freezes every process of the container. Through the cgroup freezer directly when runc's
   * state file names it (what `runc pause` does, without its ~8 ms process start): write the
   * frozen state, then wait until the kernel reports it (v1 passes through FREEZING).
   */
  async pause(id: string): Promise<void> {
    const freezer = await this.setFreezer(id, true);
    if (!freezer) {
      await runCommand([this.binary, "pause", id], { timeoutMs: TIMEOUT_MS });
      return;
    }
    const deadline = Date.now() + TIMEOUT_MS;
    for (let delayMs = 0.1; !(await freezer.isFrozen()); delayMs = Math.min(delayMs * 2, 10)) {
      if (Date.now() > deadline) throw new CubicleError("deadline_exceeded", `container ${id} did not freeze within ${TIMEOUT_MS} ms`);
      await new Promise((resolve) => setTimeout(resolve, delayMs));
    }
  }

  /** Thaws the container (the cgroup freezer directly when known, else `runc resume`). */
  async resume(id: string): Promise<void> {
    if (!(await this.setFreezer(id, false))) await runCommand([this.binary, "resume", id], { timeoutMs: TIMEOUT_MS });
  }

  /**
   * Writes the container's freezer state; undefined when runc's state names no freezer (the
   * caller falls back to runc). The freezer is remembered per id: its cgroup path follows from
   * the id, so it stays right across a durable pause or a restore, and a thaw on the warm-pool
   * claim path need not read state.json. A cgroup file write returns at once (v1 reports
   * FREEZING until done): written synchronously, no thread-pool trip.
   */
  private async setFreezer(id: string, frozen: boolean): Promise<FreezerControl | undefined> {
    let freezer = this.freezers.get(id);
    if (!freezer) {
      const state = await loadState(this.root, id);
      if (state === undefined) throw new CubicleError("not_found", `container ${id} does not exist`);
      freezer = state === "unknown" ? undefined : freezerOf(state);
      if (!freezer) return undefined;
      this.freezers.set(id, freezer);
    }
    try {
      writeFileSync(freezer.file, frozen ? freezer.frozen : freezer.thawed);
    } catch (err) {
      this.freezers.delete(id);
      if ((err as NodeJS.ErrnoException).code === "ENOENT") throw new CubicleError("not_found", `container ${id} does not exist`);
      throw err;
    }
    return freezer;
  }
}

/**
 * RUNC_NETNS_NOTE: runc always runs inside the sandbox's netns (`nsenter --net=<path>`, which
 * execs runc in place: no extra process), and config.json names no network namespace, so the
 * container shares runc's. runc joins a user namespace given by path before any other
 * namespace, and a sandbox's user namespace is its own (USERNS_OWNER_NOTE): from inside it,
 * joining the host-owned netns would fail (EPERM). The netns stays owned by the host user
 * namespace, so the sandbox's root has no capability over it (no raw sockets, no address
 * changes).
 *
 * Why runc checkpoint/restore run inside the sandbox's netns (`nsenter --net=<path>`): the
 * sandbox joins a netns Cubicle made in the host user namespace, and CRIU, when a namespace of
 * the dumped tree differs from its own, takes it "into the image" and then checks, from inside
 * the sandbox's user namespace, that it can setns() into each such namespace (namespaces.c
 * check_user_ns): for a host-owned netns that fails with EPERM ("One or more namespaces doesn't
 * belong to the target user namespace"), external or not. Run in that very netns, CRIU finds
 * it is its own, leaves it out of the image (sockets are still dumped), and a restore puts the
 * processes into whatever netns CRIU runs in: the clone's new one.
 */
export const CRIU_NETNS_NOTE = "CRIU runs in the sandbox's netns so that netns is not part of the image";

function inNetns(netnsPath: string): string[] {
  return ["nsenter", `--net=${netnsPath}`, "--"];
}

interface RuncStateFile {
  init_process_pid?: number;
  init_process_start?: number;
  config?: { labels?: string[] };
  cgroup_paths?: Record<string, string>;
}

/**
 * What `runc state` would say, from `<root>/<id>/state.json` and the kernel, the way runc 1.1
 * decides it: stopped when the init process is gone, a zombie or another process with a reused
 * pid (start time differs); created while the exec fifo exists; paused when the freezer says so.
 * undefined = no such container; "unknown" = a file this reader does not understand.
 */
async function readStateFile(root: string, id: string): Promise<RuncContainer | undefined | "unknown"> {
  const state = await loadState(root, id);
  if (state === undefined || state === "unknown") return state;
  const pid = state.init_process_pid;
  const bundle = state.config?.labels?.find((label) => label.startsWith("bundle="))?.slice("bundle=".length);
  if (typeof pid !== "number" || typeof state.init_process_start !== "number" || bundle === undefined) return "unknown";
  const container: RuncContainer = { id, pid, status: "stopped", bundle };
  const stat = await readFile(`/proc/${pid}/stat`, "utf8").catch(() => "");
  if (!stat) return container;
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  // Fields after the command: [0] = state (field 3), [19] = start time (field 22).
  if (fields[0] === "Z" || fields[0] === "X" || Number(fields[19]) !== state.init_process_start) return container;
  if (await pathExists(path.join(root, id, "exec.fifo"))) return { ...container, status: "created" };
  const freezer = freezerOf(state);
  if (!freezer) return "unknown";
  const value = (await readFile(freezer.file, "utf8").catch(() => "")).trim();
  if (!value) return "unknown";
  return { ...container, status: value === freezer.thawed ? "running" : "paused" };
}

/** runc's state.json of a container: undefined = no such container, "unknown" = unreadable. */
async function loadState(root: string, id: string): Promise<RuncStateFile | undefined | "unknown"> {
  if (!/^[\w.-]+$/.test(id)) return "unknown";
  try {
    return JSON.parse(await readFile(path.join(root, id, "state.json"), "utf8")) as RuncStateFile;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "ENOENT" ? undefined : "unknown";
  }
}

interface FreezerControl {
  file: string;
  frozen: string;
  thawed: string;
  isFrozen(): Promise<boolean>;
}

/** The freezer a state file names (v1 freezer.state, v2 cgroup.freeze), if any. */
function freezerOf(state: RuncStateFile): FreezerControl | undefined {
  const v1 = state.cgroup_paths?.freezer;
  if (v1) {
    const file = path.join(v1, "freezer.state");
    return { file, frozen: "FROZEN", thawed: "THAWED", isFrozen: async () => (await readFile(file, "utf8")).trim() === "FROZEN" };
  }
  const v2 = state.cgroup_paths?.[""];
  if (v2) {
    const events = path.join(v2, "cgroup.events");
    return { file: path.join(v2, "cgroup.freeze"), frozen: "1", thawed: "0", isFrozen: async () => /^frozen 1$/m.test(await readFile(events, "utf8")) };
  }
  return undefined;
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
