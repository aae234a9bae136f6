/**
 * How the agent starts every process it starts (commands, PTYs, interpreter kernels): as which
 * user, with which supplementary groups, and marked for the OOM killer.
 *
 * RUN_AS_NOTE: how the agent (root) starts a command as another user with that user's
 * supplementary groups (e2b-wire-protocol.md §7). Node's spawn with uid/gid drops every
 * supplementary group (libuv calls setgroups(0) in the child), so the agent execs a helper
 * that sets them and then execs the command; the process keeps its pid either way. First
 * choice: the kit's `run-as` (src/agent/native/run-as.c, statically linked): ~0.3 ms per
 * command where util-linux setpriv, dynamically linked, costs ~1.2 ms (measured on the host:
 * spawn of /bin/true direct 1.4 ms, via run-as 1.7, via setpriv 2.6), and every
 * `commands.run` of the default user pays it. Then the template's setpriv, then uid/gid alone.
 * Pipe-mode commands take this path only without the spawn addon (SPAWN_NOTE in spawn-addon.ts),
 * whose child switches the user itself; PTYs and interpreter kernels always take it.
 *
 * OOM_NOTE: when a sandbox runs out of memory the kernel's OOM killer picks the process with the
 * highest badness (its memory plus oom_score_adj × the memory limit / 1000). With ~2000 small
 * user processes the agent, the largest single process, was picked and the sandbox died. The
 * agent cannot lower its own score (that needs CAP_SYS_RESOURCE in the initial user namespace,
 * which even the host's root lacks on this project's machines), so every process it starts
 * raises its own to `userProcessOomScoreAdj` instead (no privilege needed), and everything
 * those start inherits it: while any user process lives, it is chosen before the agent and
 * before tini. run-as does this before it execs, so even a command's first fork is covered;
 * without run-as (a template without the kit's helper, a dev host) the agent writes the score
 * right after the spawn (`markForOomKiller`), best effort. A process may lower its own score
 * back to the agent's (0), never below: a deliberate attempt to die last only ties with the
 * agent, and in its own sandbox.
 */
import fs from "node:fs";
import path from "node:path";
import { createLogger } from "../../shared/log.js";

const log = createLogger("agent-process");

/** oom_score_adj of every process the agent starts (OOM_NOTE); run-as.c writes the same value. */
export const userProcessOomScoreAdj = 1000;

/** Who a process runs as. */
export interface LaunchIdentity {
  uid: number;
  gid: number;
  /** Supplementary group ids. */
  groups: number[];
}

/** The argv and spawn options that start a command as an identity. */
export interface Launch {
  file: string;
  args: string[];
  /** For spawn: only when no helper switches the user. */
  uid?: number;
  gid?: number;
  /** True when the process marks itself for the OOM killer (run-as); otherwise call markForOomKiller(pid). */
  marked: boolean;
}

type UserSwitch = { kind: "run-as" | "setpriv"; path: string } | null;
let userSwitch: UserSwitch | undefined;

/** Only a root agent can run processes as other users (on a dev host it may not be root). */
export function canSwitchUser(): boolean {
  return typeof process.getuid === "function" && process.getuid() === 0;
}

let runAsOverride: string | undefined;

/**
 * Where to look for run-as: tests point this at the built helper (dist/agent/run-as), or at a
 * missing file to test the fallbacks; undefined restores the default, next to the agent's
 * script (the kit's /.cubicle/run-as in a sandbox).
 */
export function useRunAsHelper(file: string | undefined): void {
  runAsOverride = file;
  userSwitch = undefined;
}

function findUserSwitch(): UserSwitch {
  if (userSwitch !== undefined) return userSwitch;
  const runAs = runAsOverride ?? path.join(path.dirname(process.argv[1] ?? "/"), "run-as");
  const candidates: Array<{ kind: "run-as" | "setpriv"; path: string }> = [
    { kind: "run-as", path: runAs },
    ...["/usr/bin/setpriv", "/bin/setpriv", "/usr/sbin/setpriv", "/sbin/setpriv"].map((file) => ({ kind: "setpriv" as const, path: file })),
  ];
  userSwitch = candidates.find((candidate) => isExecutable(candidate.path)) ?? null;
  if (!userSwitch) log.warn("neither run-as nor setpriv found: processes of non-root users run without their supplementary groups");
  return userSwitch;
}

function isExecutable(file: string): boolean {
  try {
    fs.accessSync(file, fs.constants.X_OK);
    return fs.statSync(file).isFile();
  } catch {
    return false;
  }
}

/** The kit's run-as, when this agent has it (RUN_AS_NOTE). */
export function runAsHelper(): string | undefined {
  const helper = findUserSwitch();
  return helper?.kind === "run-as" ? helper.path : undefined;
}

/**
 * How to launch `cmd args` as `identity` (RUN_AS_NOTE, OOM_NOTE). Without an identity, or in an
 * agent that is not root, the process runs as the agent's own user. Root's processes go through
 * run-as too, for their OOM score.
 */
export function launchAs(identity: LaunchIdentity | undefined, cmd: string, args: string[]): Launch {
  if (!canSwitchUser()) return { file: cmd, args, marked: false };
  const target = identity ?? { uid: 0, gid: 0, groups: [] };
  const helper = findUserSwitch();
  if (helper?.kind === "run-as") {
    const groups = target.groups.length > 0 ? target.groups.join(",") : "-";
    return { file: helper.path, args: [String(target.uid), String(target.gid), groups, cmd, ...args], marked: true };
  }
  if (target.uid === 0) return { file: cmd, args, marked: false };
  if (!helper) return { file: cmd, args, uid: target.uid, gid: target.gid, marked: false };
  const groups = target.groups.length > 0 ? `--groups=${target.groups.join(",")}` : "--clear-groups";
  return { file: helper.path, args: [`--reuid=${target.uid}`, `--regid=${target.gid}`, groups, "--", cmd, ...args], marked: false };
}

/** Raises a started process's oom_score_adj (OOM_NOTE) when it did not do so itself. Best effort. */
export function markForOomKiller(pid: number | undefined, launch: Pick<Launch, "marked">): void {
  if (launch.marked || pid === undefined) return;
  try {
    fs.writeFileSync(`/proc/${pid}/oom_score_adj`, String(userProcessOomScoreAdj));
  } catch (reason) {
    log.debug("cannot raise the OOM score of a process", { pid, error: (reason as Error).message });
  }
}
