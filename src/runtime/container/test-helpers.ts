import net from "node:net";
/** Helpers the runtime's tests and development scripts share: talking to a sandbox's agent. */
import { readFile, rm } from "node:fs/promises";
import http from "node:http";
import type { NetworkManager } from "../../network/types.js";
import { ENVD_PORT } from "../../protocol/index.js";
import { defaultRunDir } from "../../shared/config.js";
import { runCommand } from "../../shared/exec.js";
import type { ContainerRuntime } from "./container-runtime.js";

export interface AgentGetOptions {
  /** Default ENVD_PORT (envd). */
  port?: number;
  /** Default 2000 ms. */
  timeoutMs?: number;
  /** Default no keep-alive agent. */
  agent?: http.Agent;
}

/** GET `urlPath` from the agent at `host`. */
export function agentGet(host: string, urlPath: string, options: AgentGetOptions = {}): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host, port: options.port ?? ENVD_PORT, path: urlPath, timeout: options.timeoutMs ?? 2000, agent: options.agent ?? false }, (res) => {
      let body = "";
      res.on("data", (d) => (body += d));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on("error", reject);
    req.on("timeout", () => req.destroy(new Error("timeout")));
  });
}

/** Polls the agent's `/health` until it answers, or fails after `timeoutMs`. */
export async function waitForAgentHealth(host: string, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const res = await agentGet(host, "/health", { timeoutMs: 1000 });
      if (res.status === 204 || res.status === 200) return;
    } catch (err) {
      if (Date.now() > deadline) throw err;
    }
    await new Promise((r) => setTimeout(r, 2));
  }
}

/**
 * Removes everything a runtime test made, even after a failure: its sandboxes, namespaces,
 * nftables table, state directory and (once nothing is mounted under it) run directory.
 */
export async function cleanUpRuntimeTest(parts: { runtime?: ContainerRuntime; network?: NetworkManager; tableName: string; stateDir?: string }): Promise<void> {
  const { runtime, network } = parts;
  for (const id of (await runtime?.list()) ?? []) await runtime!.destroy(id).catch((err) => console.error("cleanup", id, err));
  await runtime?.images.settled();
  await runtime?.releaseHostMounts().catch((err) => console.error("cleanup: unmounting", err));
  for (const id of (await network?.listRuntimeIds()) ?? []) await network!.release(id).catch(() => {});
  await runCommand(["nft", "delete", "table", "inet", parts.tableName], { allowFailure: true });
  if (parts.stateDir) await removeStateAndRunDir(parts.stateDir);
}

/** Removes a test's state directory and its default run directory; the latter only when no mount is left under it. */
export async function removeStateAndRunDir(stateDir: string): Promise<void> {
  await rm(stateDir, { recursive: true, force: true });
  const runDir = defaultRunDir(stateDir);
  const mounts = await readFile("/proc/mounts", "utf8");
  if (!mounts.split("\n").some((line) => (line.split(" ")[1] ?? "").startsWith(runDir + "/"))) await rm(runDir, { recursive: true, force: true });
}

/** Everything a TCP server at host:port sends until it closes (2 s without data is an error). */
export function readAll(host: string, port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, host);
    let data = "";
    socket.setTimeout(2000, () => socket.destroy(new Error("timeout")));
    socket.on("data", (d) => (data += d));
    socket.on("end", () => resolve(data));
    socket.on("error", reject);
  });
}
