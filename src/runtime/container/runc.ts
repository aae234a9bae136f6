import { writeFileSync } from "node:fs";
import { readFile, rm, rmdir } from "node:fs/promises";
import path from "node:path";
import { CubicleError } from "../../shared/cubicle-error.js";
import { pathExists } from "../../shared/fs.js";
import { createLogger } from "../../shared/log.js";
import type { HelperExecResult, SandboxHelper } from "./sandbox-helper.js";

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
  /** Set in runc's environment and so CRIU's (PATH with the tar shim), on top of the server's. */
  env: Record<string, string | undefined>;
}

/**
 * A thin client of the runc CLI (default state root, so `runc list` shows our containers), run
 * from the resident sandbox helper (HELPER_PROTOCOL_NOTE): no process start from Node.
 */
export class Runc {
  /** runc's state root for root (no `--root` is ever passed): one `<id>/state.json` per container. */
  private readonly root = "/run/runc";
  private readonly freezers = new Map<string, FreezerControl>();

  /** Whether this runc takes `--criu` (runc < 1.2); asked once. */
  private takesCriuFlag: Promise<boolean> | undefined;

  constructor(
    private readonly binary: string,
    private readonly helper: SandboxHelper,
  ) {}

  /**
   * The argv of a checkpoint or restore: `runc <subcommand>` in the sandbox's netns, with CRIU
   * named (runc < 1.2 only, CRIU_FRONT_NOTE), the JSON log, the image and work paths.
   */
  private async criuCommand(options: CriuRunOptions, subcommand: string[]): Promise<string[]> {
    this.takesCriuFlag ??= this.helper.exec([this.binary, "--help"], { timeoutMs: TIMEOUT_MS }).then(
      (result) => /--criu\b/.test(result.stdout),
      (err: unknown) => {
        this.takesCriuFlag = undefined;
        throw err;
      },
    );
    const criu = (await this.takesCriuFlag) ? ["--criu", options.criuPath] : [];
    return [this.binary, ...criu, "--log", options.logFile, "--log-format", "json", ...subcommand, "--image-path", options.imagePath, "--work-path", options.workPath, "--file-locks"];
  }

  /**
   * `runc run --detach`. In detached, non-terminal mode the container inherits runc's stdio, so
   * runc gets /dev/null for all three: the agent must not hold a host pipe (CRIU refuses to dump
   * one, and the pipe would never close). runc's own errors go to `logFile` instead.
   */
  async runDetached(id: string, bundle: string, logFile: string, netnsPath: string): Promise<void> {
    await this.detached([this.binary, "--log", logFile, "--log-format", "json", "run", "--detach", "--bundle", bundle, id], `runc run ${id}`, { logFile, timeoutMs: TIMEOUT_MS, netnsPath });
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
    await this.detached(argv, `runc checkpoint ${id}`, options);
  }

  /**
   * `runc restore --detach`: a new container `id` from `bundle` (its config.json: cgroups,
   * mounts) with the processes of the CRIU image, restored into the netns `netnsPath` (runc and
   * CRIU run inside it, see CRIU_NETNS_NOTE). stdio is /dev/null as for run.
   */
  async restoreDetached(id: string, bundle: string, options: CriuRunOptions): Promise<void> {
    const argv = [...(await this.criuCommand(options, ["restore", "--detach", "--bundle", bundle])), id];
    await this.detached(argv, `runc restore ${id}`, options);
  }

  /**
   * Runs a runc command in the sandbox's netns with stdio on /dev/null (see runDetached), from
   * the resident helper; errors come from its JSON log.
   */
  private async detached(argv: string[], what: string, options: { logFile: string; timeoutMs: number; netnsPath: string; env?: Record<string, string | undefined> }): Promise<void> {
    log.debug("run", { argv, netnsPath: options.netnsPath });
    let result: HelperExecResult;
    try {
      result = await this.helper.exec(argv, { netnsPath: options.netnsPath, env: options.env, stdio: "null", timeoutMs: options.timeoutMs });
    } catch (err) {
      const error = CubicleError.from(err);
      if (error.code !== "deadline_exceeded") throw error;
      throw new CubicleError("deadline_exceeded", `${what} timed out after ${options.timeoutMs} ms: ${await readRuncErrors(options.logFile)}`, { cause: err });
    }
    if (result.exitCode === 0) return;
    // Exit 127: the helper could not join the netns or start runc; it says why on stderr.
    const detail = result.exitCode === 127 && result.stderr.trim() ? result.stderr.trim() : await readRuncErrors(options.logFile);
    const how = result.exitCode === null ? `was killed by signal ${result.signal}` : `exited with ${result.exitCode}`;
    throw new CubicleError("internal", `${what} ${how}: ${detail}`, { details: { logFile: options.logFile } });
  }

  /** Runs a runc command from the resident helper, its output captured; throws on a failure unless `allowFailure`. */
  private async runcCommand(args: string[], allowFailure = false): Promise<HelperExecResult> {
    log.debug("run", { argv: [this.binary, ...args] });
    const result = await this.helper.exec([this.binary, ...args], { timeoutMs: TIMEOUT_MS });
    if (result.exitCode !== 0 && !allowFailure) {
      const how = result.exitCode === null ? `was killed by signal ${result.signal}` : `exited with ${result.exitCode}`;
      throw new CubicleError("internal", `runc ${args.join(" ")} ${how}: ${(result.stderr.trim() || result.stdout.trim()).slice(-2000)}`, { details: { stderr: result.stderr } });
    }
    return result;
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

  /**
   * Removes a container; no error when it does not exist. A stopped one (the kill path) is
   * removed here without runc when nothing about it is unexpected (RUNC_DELETE_NOTE); anything
   * else goes to `runc delete` (`--force`: kills a running one first).
   */
  async delete(id: string, force: boolean): Promise<void> {
    this.freezers.delete(id);
    if (await this.removeStopped(id)) return;
    const result = await this.runcCommand(["delete", ...(force ? ["--force"] : []), id], true);
    if (result.exitCode !== 0 && !isMissing(result.stderr)) {
      throw new CubicleError("internal", `runc delete ${id} failed: ${result.stderr.trim()}`);
    }
  }

  /**
   * RUNC_DELETE_NOTE: what `runc delete` does for a stopped container, without its Go process
   * start (~8 ms of the kill path). runc 1.1's delete of a stopped container is `destroy()`
   * (libcontainer/state_linux.go): SIGKILL to the cgroup's processes only when the container
   * has no PID namespace of its own, the cgroup manager's Destroy (rmdir of every path in
   * `cgroup_paths`, retried while busy), the Intel RDT group if any, `RemoveAll` of its state
   * directory `<root>/<id>`, then the poststop hooks. Ours always have their own PID namespace
   * (the init's death killed the rest), no hooks and no RDT; the runtime removes the same
   * cgroup directories again afterwards (removeCgroupDirectories). So this does exactly that
   * when runc's state says stopped and the config is what Cubicle writes: rmdir the cgroups
   * (a few ms of retries while the last processes exit), then the state directory, last, so
   * that a fallback still finds the container. Anything unexpected (a state file this reader
   * does not know, a live or created init, hooks, RDT, a shared PID namespace, a cgroup that
   * stays busy or has children, a path outside /sys/fs/cgroup) returns false: `runc delete`.
   */
  private async removeStopped(id: string): Promise<boolean> {
    const stateDir = path.join(this.root, id);
    const state = await loadState(this.root, id);
    if (state === undefined) return !(await pathExists(stateDir)); // an aborted start: runc removes the directory
    if (state === "unknown") return false;
    const container = await readStateFile(this.root, id);
    if (container === undefined || container === "unknown" || container.status !== "stopped") return false;
    const config = state.config ?? {};
    const ownPidNamespace = config.namespaces?.some((namespace) => namespace.type === "NEWPID" && !namespace.path) === true;
    // runc 1.1 writes "Hooks" (every kind null when none); a later one may write "hooks".
    const hooks = [config.Hooks, config.hooks].some((table) => Object.values(table ?? {}).some((list) => Array.isArray(list) && list.length > 0));
    if (!ownPidNamespace || hooks || config.intel_rdt) return false;
    const cgroupDirs = [...new Set(Object.values(state.cgroup_paths ?? {}))];
    if (cgroupDirs.some((dir) => typeof dir !== "string" || !dir.startsWith("/sys/fs/cgroup/") || dir.split("/").includes(".."))) return false;
    for (const dir of cgroupDirs) if (!(await removeCgroupDir(dir))) return false;
    await rm(stateDir, { recursive: true, force: true });
    return true;
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

  /** What a checkpoint through CRIU's RPC needs of runc's state (CRIU_RPC_NOTE): the init's pid and the freezer cgroup. */
  async dumpFacts(id: string): Promise<{ pid: number; freezerCgroup: string } | undefined> {
    const state = await loadState(this.root, id);
    if (state === undefined || state === "unknown" || typeof state.init_process_pid !== "number") return undefined;
    const freezerCgroup = state.cgroup_paths?.freezer ?? state.cgroup_paths?.[""];
    return freezerCgroup ? { pid: state.init_process_pid, freezerCgroup } : undefined;
  }

  private async stateFromCli(id: string): Promise<RuncContainer | undefined> {
    const result = await this.runcCommand(["state", id], true);
    if (result.exitCode !== 0) {
      if (isMissing(result.stderr)) return undefined;
      throw new CubicleError("internal", `runc state ${id} failed: ${result.stderr.trim()}`);
    }
    return JSON.parse(result.stdout) as RuncContainer;
  }

  async list(): Promise<RuncContainer[]> {
    const result = await this.runcCommand(["list", "--format", "json"]);
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
      await this.runcCommand(["pause", id]);
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
    if (!(await this.setFreezer(id, false))) await this.runcCommand(["resume", id]);
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
 * RUNC_NETNS_NOTE: runc always runs inside the sandbox's netns (the resident helper's child
 * setns()es into it, then execs runc: no extra process), and config.json names no network
 * namespace, so the container shares runc's. runc joins a user namespace given by path before any other
 * namespace, and a sandbox's user namespace is its own (USERNS_OWNER_NOTE): from inside it,
 * joining the host-owned netns would fail (EPERM). The netns stays owned by the host user
 * namespace, so the sandbox's root has no capability over it (no raw sockets, no address
 * changes).
 *
 * Why runc checkpoint/restore run inside the sandbox's netns (the helper's `exec --netns <path>`): the
 * sandbox joins a netns Cubicle made in the host user namespace, and CRIU, when a namespace of
 * the dumped tree differs from its own, takes it "into the image" and then checks, from inside
 * the sandbox's user namespace, that it can setns() into each such namespace (namespaces.c
 * check_user_ns): for a host-owned netns that fails with EPERM ("One or more namespaces doesn't
 * belong to the target user namespace"), external or not. Run in that very netns, CRIU finds
 * it is its own, leaves it out of the image (sockets are still dumped), and a restore puts the
 * processes into whatever netns CRIU runs in: the clone's new one.
 */
export const CRIU_NETNS_NOTE = "CRIU runs in the sandbox's netns so that netns is not part of the image";

interface RuncStateFile {
  init_process_pid?: number;
  init_process_start?: number;
  config?: {
    labels?: string[];
    namespaces?: { type?: string; path?: string }[];
    Hooks?: Record<string, unknown> | null;
    hooks?: Record<string, unknown> | null;
    intel_rdt?: unknown;
  };
  cgroup_paths?: Record<string, string>;
}

/**
 * rmdir of an exited container's cgroup, retried for up to ~100 ms while it is busy (its last
 * processes are still exiting, as runc's RemovePaths retries). false = still there.
 */
async function removeCgroupDir(dir: string): Promise<boolean> {
  const deadline = Date.now() + 100;
  for (;;) {
    try {
      await rmdir(dir);
      return true;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOENT") return true;
      if (code !== "EBUSY" || Date.now() > deadline) return false;
    }
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
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
