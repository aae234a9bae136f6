/** Small shared helpers of the filesystem and /files unit tests. */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { AgentUser } from "../users.js";
import type { RpcContext } from "../rpc/types.js";

// Keep the tests' metadata out of the real store; set before the store is first used.
if (process.env.CUBICLE_AGENT_METADATA_DIR === undefined) {
  const metadataDirectory = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-fs-meta-"));
  process.env.CUBICLE_AGENT_METADATA_DIR = metadataDirectory;
  process.once("exit", () => fs.rmSync(metadataDirectory, { recursive: true, force: true }));
}

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
