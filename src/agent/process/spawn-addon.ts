/**
 * SPAWN_NOTE: how the agent starts a pipe-mode command without forking Node.
 *
 * Node's child_process.spawn forks the whole agent (libuv uses fork(); the kernel copies the
 * page tables of a ~60 MB process) and then execs run-as, which execs the command: 8-16 ms per
 * start on this project's hosts, most of it the fork. The agent's spawn addon
 * (src/agent/native/spawn.c, `spawn.node` next to the agent) starts the command the way glibc's
 * posix_spawn does, with clone(CLONE_VM | CLONE_VFORK): no address space is copied, and the child
 * does run-as's work itself (new session, stdio, other descriptors closed, signals reset,
 * oom_score_adj 1000 per OOM_NOTE, cwd, groups, gid, uid) before it execs the command, found in
 * PATH like execvp. Its exit is watched through a pidfd on Node's own event loop (CRIU 4.2
 * checkpoints and restores pidfds: a durable pause keeps the watch, test/e2e/pause.test.ts).
 * Measured on the host (2 cores shared with other work), 300 starts of /bin/true to exit each,
 * p50 in one window: Node spawn 7.5 ms, Node spawn of run-as 8.6 ms, the addon 3.4 ms, and a
 * bash loop of /bin/true 5.7 ms per fork+exec; spawn() itself blocks the event loop ~0.55 ms
 * (until the child's execve), wrapping the sockets ~0.15 ms.
 *
 * A resident fork server (a small C process forking per request, fds passed back by SCM_RIGHTS)
 * was the alternative; the vfork-style start needs no second process to supervise and restart,
 * costs one clone instead of a request, a fork and a reply, and its hazards (the child shares the
 * agent's memory) are the ones glibc's posix_spawn already handles the same way.
 *
 * When the addon is missing (no C compiler when the kit was built) or the kernel lacks pidfds,
 * commands start through Node's spawn and run-as as before (launch.ts).
 */
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import type { Readable, Writable } from "node:stream";
import { createLogger } from "../../shared/log.js";
import { canSwitchUser, runAsHelper, type LaunchIdentity } from "./launch.js";
import { loadNativeAddon } from "../../shared/native-addon.js";

const log = createLogger("agent-process");

interface SpawnAddon {
  probe(): boolean;
  spawn(
    candidates: string[],
    argv: string[],
    envp: string[],
    cwd: string,
    ids: [number, number, number[]] | null,
    stdin: boolean,
    onExit: (exitCode: number, signal: number) => void,
  ): [pid: number, stdinFd: number, stdoutFd: number, stderrFd: number];
}

/** An error the addon throws: errno name, the step that failed ("execve", "chdir", ...). */
export interface SpawnAddonError extends Error {
  code: string;
  syscall: string;
}

/** glibc's default search path for execvp when PATH is unset (confstr _CS_PATH). */
const defaultSearchPath = "/bin:/usr/bin";

let addonOverride: string | null | undefined;
let loaded: SpawnAddon | null | undefined;

/**
 * Where to load the addon from: tests point this at dist/agent/spawn.node, or pass null to force
 * Node's spawn; undefined restores the default, `spawn.node` next to the agent's script (the
 * kit's /.cubicle/spawn.node in a sandbox) or CUBICLE_AGENT_SPAWN_ADDON.
 */
export function useSpawnAddon(file: string | null | undefined): void {
  addonOverride = file;
  loaded = undefined;
}

function loadSpawnAddon(): SpawnAddon | null {
  if (loaded !== undefined) return loaded;
  const file = addonOverride === undefined ? (process.env.CUBICLE_AGENT_SPAWN_ADDON ?? path.join(path.dirname(process.argv[1] ?? "/"), "spawn.node")) : addonOverride;
  loaded = null;
  if (file === null || process.platform !== "linux") return loaded;
  if (!fs.existsSync(file)) {
    log.debug("no spawn addon: commands start through Node's spawn", { file });
    return loaded;
  }
  try {
    const addon = loadNativeAddon<SpawnAddon>(file);
    addon.probe();
    loaded = addon;
  } catch (error) {
    log.warn("the spawn addon cannot be used here: commands start through Node's spawn", { file, error: (error as Error).message });
  }
  return loaded;
}

let merged: boolean | undefined;

/**
 * Whether this agent's memory is merged by ksmd (sandbox-boot --merge-memory, CUBICLE_KSM):
 * what it starts through a shared-memory clone would inherit that (AGENT_MEMORY_MERGE_NOTE).
 */
function agentMemoryMerged(): boolean {
  if (merged === undefined) {
    try {
      merged = /^ksm_merge_any:\s*yes$/m.test(fs.readFileSync("/proc/self/ksm_stat", "utf8"));
    } catch {
      merged = false;
    }
  }
  return merged;
}

/** True when pipe-mode commands start through the addon. */
export function spawnAddonAvailable(): boolean {
  return loadSpawnAddon() !== null;
}

/**
 * The paths execvp tries for `file` with the search path `searchPath` (the command's own PATH):
 * `file` itself when it names a path, else each entry + "/" + file, an empty entry meaning the
 * working directory (glibc posix/execvpe.c).
 */
export function execCandidates(file: string, searchPath: string | undefined): string[] {
  if (file.includes("/")) return [file];
  return (searchPath ?? defaultSearchPath).split(":").map((dir) => (dir === "" ? file : `${dir}/${file}`));
}

export interface AddonStartOptions {
  file: string;
  args: string[];
  env: Record<string, string>;
  cwd: string;
  /** Who the command runs as; undefined for root. Ignored when the agent is not root. */
  identity: LaunchIdentity | undefined;
  stdin: boolean;
}

/** A command started by the addon: its pipes, and its one exit. */
export interface AddonChild {
  pid: number;
  stdin: Writable | undefined;
  stdout: Readable;
  stderr: Readable;
  /** Calls `listener` once with (exitCode, signal) when the process has exited and been reaped. */
  onExit(listener: (code: number | null, signal: number | null) => void): void;
}

/**
 * Starts a command through the addon; undefined when there is no usable addon (use Node's spawn).
 * Throws a SpawnAddonError when the command cannot be started (the child is already reaped).
 */
export function startWithAddon(options: AddonStartOptions): AddonChild | undefined {
  const addon = loadSpawnAddon();
  if (!addon) return undefined;
  let exit: [number | null, number | null] | undefined;
  let listener: ((code: number | null, signal: number | null) => void) | undefined;
  const target = options.identity ?? { uid: 0, gid: 0, groups: [] };
  // A merging agent's commands go through run-as, which stops merging before its exec
  // (AGENT_MEMORY_MERGE_NOTE); run-as then switches the user and finds the command itself.
  const runAs = canSwitchUser() && agentMemoryMerged() ? runAsHelper() : undefined;
  const candidates = runAs ? [runAs] : execCandidates(options.file, options.env.PATH);
  const argv = runAs ? [runAs, String(target.uid), String(target.gid), target.groups.length > 0 ? target.groups.join(",") : "-", options.file, ...options.args] : [options.file, ...options.args];
  let started: ReturnType<SpawnAddon["spawn"]>;
  try {
    started = addon.spawn(
      candidates,
      argv,
      Object.entries(options.env).map(([key, value]) => `${key}=${value}`),
      options.cwd,
      canSwitchUser() && !runAs ? [target.uid, target.gid, target.groups] : null,
      options.stdin,
      (code, signal) => {
        exit = signal > 0 ? [null, signal] : [code, null];
        listener?.(...exit);
      },
    );
  } catch (error) {
    const failed = error as SpawnAddonError;
    // A kernel or filter that refuses the clone itself: fall back for good.
    if (failed.syscall === "clone" && (failed.code === "ENOSYS" || failed.code === "EPERM")) {
      log.warn("the spawn addon cannot clone here: commands start through Node's spawn", { error: failed.message });
      loaded = null;
      return undefined;
    }
    throw error;
  }
  const [pid, stdinFd, stdoutFd, stderrFd] = started;
  // Each socket owns its descriptor from its creation on (destroying it closes the descriptor).
  const unwrapped = new Set([stdoutFd, stderrFd, stdinFd].filter((fd) => fd >= 0));
  const sockets: net.Socket[] = [];
  const wrap = (fd: number, readable: boolean) => {
    const socket = new net.Socket({ fd, readable, writable: !readable });
    unwrapped.delete(fd);
    sockets.push(socket);
    return socket;
  };
  try {
    const stdout = wrap(stdoutFd, true);
    const stderr = wrap(stderrFd, true);
    const stdin = stdinFd >= 0 ? wrap(stdinFd, false) : undefined;
    return {
      pid,
      stdin,
      stdout,
      stderr,
      onExit(callback) {
        listener = callback;
        if (exit) callback(...exit);
      },
    };
  } catch (error) {
    for (const socket of sockets) socket.destroy();
    for (const fd of unwrapped) fs.closeSync(fd);
    // The addon still reaps it when it exits.
    process.kill(pid, "SIGKILL");
    throw error;
  }
}
