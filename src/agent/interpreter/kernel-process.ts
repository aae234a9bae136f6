import { spawn, type ChildProcess, type SpawnOptions } from "node:child_process";
import { launchAs, markForOomKiller } from "../process/launch.js";
import { kernelIdentity, type KernelLaunch } from "./types.js";

/**
 * Starts a kernel's process as its context says: in its cwd and env, as the user with their
 * groups, and marked for the OOM killer once it runs (process/launch.ts).
 */
export function spawnKernel(launch: KernelLaunch, file: string, args: string[], options: Pick<SpawnOptions, "stdio" | "detached" | "serialization">): ChildProcess {
  const start = launchAs(kernelIdentity(launch), file, args);
  const child = spawn(start.file, start.args, { cwd: launch.cwd, env: launch.env, uid: start.uid, gid: start.gid, ...options });
  child.once("spawn", () => markForOomKiller(child.pid, start));
  return child;
}
