/**
 * Runs file operations with the permissions of a sandbox user.
 *
 * The agent runs as root (inside the sandbox's user namespace). For a request made as another
 * user, the effective uid, gid and supplementary groups are switched around a SYNCHRONOUS
 * callback and restored before it returns, so the kernel applies that user's permissions and
 * files and directories the callback creates are owned by that user.
 *
 * Why synchronous only: glibc applies seteuid/setegid/setgroups to every thread of the process
 * (POSIX credential semantics, via its SIGSETXID broadcast), including libuv's threadpool. An
 * `await` while switched would let unrelated requests run as the wrong user. The pattern is:
 * open the file descriptor as the user, switch back, then stream through the descriptor
 * asynchronously as root (reads and writes on an open descriptor are not permission-checked
 * again).
 *
 * Residual hazard: a threadpool operation already in flight for another request (an async
 * `fs.promises.*` call by any part of the agent) runs with the switched credentials during the
 * few microseconds of a switch. The filesystem code in this agent therefore does its path-based
 * work synchronously; async work is done only on already-open descriptors.
 */
import type { AgentUser } from "./users.js";
import { CubicleError } from "../shared/cubicle-error.js";

const agentIsRoot = typeof process.geteuid === "function" && process.geteuid() === 0;

/**
 * The supplementary groups last set, undefined until the first switch. Every credential call
 * costs about 100 µs (glibc signals every thread of the process), so groups are only set when
 * they change: root runs with none (CAP_DAC_OVERRIDE makes them irrelevant; `id` still shows
 * group 0 as the primary group), and a user whose only group is its primary group needs none
 * either, since the kernel checks the effective gid first.
 */
let currentGroups: number[] | undefined;

/** The uid currently switched to, or undefined when running as root. */
let switchedToUid: number | undefined;

/** True if the agent can switch credentials (it runs as root). */
export function canSwitchUser(): boolean {
  return agentIsRoot;
}

/**
 * Calls `operation` with `user`'s effective uid, gid and groups and returns its result.
 * `operation` must be synchronous: returning a promise is a programming error and throws.
 * Root (uid 0), or an agent that is not root itself (development), runs it unchanged.
 */
export function runAsUser<T>(user: AgentUser, operation: () => T): T {
  if (!agentIsRoot || user.uid === 0) return checkSynchronous(operation());
  if (switchedToUid !== undefined) {
    if (switchedToUid === user.uid) return checkSynchronous(operation());
    throw new CubicleError("internal", `nested credential switch from uid ${switchedToUid} to uid ${user.uid}`);
  }

  switchCredentials(user);
  try {
    return checkSynchronous(operation());
  } finally {
    restoreRoot();
  }
}

function setGroups(groups: number[]): void {
  if (currentGroups && currentGroups.length === groups.length && currentGroups.every((gid, index) => gid === groups[index])) return;
  process.setgroups!(groups);
  currentGroups = [...groups];
}

function switchCredentials(user: AgentUser): void {
  try {
    setGroups(user.groups.filter((gid) => gid !== user.gid));
    process.setegid!(user.gid);
    process.seteuid!(user.uid);
    switchedToUid = user.uid;
  } catch (reason) {
    restoreRoot();
    throw new CubicleError("internal", `cannot switch to user "${user.name}": ${(reason as Error).message}`, { cause: reason });
  }
}

function restoreRoot(): void {
  // Order matters: seteuid(0) first restores the capabilities needed by setegid/setgroups.
  process.seteuid!(0);
  process.setegid!(0);
  setGroups([]);
  switchedToUid = undefined;
}

function checkSynchronous<T>(result: T): T {
  if (result !== null && typeof result === "object" && typeof (result as { then?: unknown }).then === "function") {
    throw new CubicleError("internal", "runAsUser callbacks must be synchronous");
  }
  return result;
}
