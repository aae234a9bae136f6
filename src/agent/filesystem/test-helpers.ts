/** Small shared helpers of the filesystem and /files unit tests. */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { AgentUser } from "../users.js";
import type { RpcContext } from "../rpc/types.js";

// File metadata needs the agent's xattr addon, built into dist by scripts/build.mjs.
process.env.CUBICLE_AGENT_XATTR_ADDON ??= path.resolve(path.dirname(new URL(import.meta.url).pathname), "../../../dist/agent/xattr.node");

export const isRoot = typeof process.geteuid === "function" && process.geteuid() === 0;

export function makeTempDir(prefix = "cubicle-fs-"): string {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  fs.chmodSync(directory, 0o755);
  return directory;
}

export const rootUser: AgentUser = { name: "root", uid: 0, gid: 0, groups: [0], home: "/root", shell: "/bin/sh" };

/** A user that needs no /etc/passwd entry: credentials are switched by number. */
export function syntheticUser(home: string, uid = 1599): AgentUser {
  return { name: `test${uid}`, uid, gid: uid, groups: [uid], home, shell: "/bin/sh" };
}

export function rpcContext(user: AgentUser, signal = new AbortController().signal, headers: RpcContext["headers"] = {}): RpcContext {
  return { user, signal, headers, timeoutMs: undefined };
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Runs `fn` with a fresh tmpfs mounted (root only) with mount options `options` (e.g. `ro`,
 * `size=64k`), and unmounts it afterwards even when `fn` fails. The mount point is removed with
 * rmdir only, so nothing below a mount that failed to go away is ever deleted.
 */
export async function withTmpfs<T>(options: string, fn: (directory: string) => Promise<T> | T): Promise<T> {
  const { execFileSync } = await import("node:child_process");
  const mountPoint = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-unit-tmpfs-"));
  try {
    execFileSync("mount", ["-t", "tmpfs", "-o", options, "cubicle-unit-test", mountPoint]);
  } catch (reason) {
    fs.rmdirSync(mountPoint);
    throw reason;
  }
  try {
    return await fn(mountPoint);
  } finally {
    execFileSync("umount", [mountPoint]);
    fs.rmdirSync(mountPoint);
  }
}

/**
 * Makes a FIFO at `fifo` and starts a helper process that opens it for writing (and closes it
 * again) after `afterMs`: an agent that wrongly blocks opening the FIFO for reading is released
 * then, so a test measures the delay instead of hanging forever. Returns a cleanup function.
 */
export async function fifoWithDelayedWriter(fifo: string, afterMs: number): Promise<() => void> {
  const { execFileSync, spawn } = await import("node:child_process");
  execFileSync("mkfifo", [fifo]);
  // `exec 3<>` opens read-write: it never blocks, and it releases both a blocked reader and a blocked writer.
  const helper = spawn("/bin/sh", ["-c", `sleep ${afterMs / 1000}; exec 3<>"$0"; sleep 0.2`, fifo], { stdio: "ignore", detached: true });
  helper.unref();
  return () => {
    try {
      process.kill(helper.pid!, "SIGKILL");
    } catch {
      // already gone
    }
  };
}

export interface EventLoopMeasure {
  /** 2 ms timers that ran while the work was under way. */
  ticks: number;
  /**
   * The most CPU time the process used between two consecutive timers (ms): a synchronous
   * stretch of work. Unlike wall time, a process descheduled on a busy machine does not count.
   */
  longestBusyMs: number;
}

/** Runs `work` and measures how the event loop fared meanwhile. */
export async function measureEventLoop(work: () => Promise<unknown>): Promise<EventLoopMeasure> {
  let last = process.cpuUsage();
  let longestBusyMs = 0;
  let ticks = 0;
  const ticker = setInterval(() => {
    const now = process.cpuUsage();
    longestBusyMs = Math.max(longestBusyMs, (now.user - last.user + now.system - last.system) / 1000);
    last = now;
    ticks++;
  }, 2);
  try {
    await work();
  } finally {
    clearInterval(ticker);
  }
  return { ticks, longestBusyMs };
}
