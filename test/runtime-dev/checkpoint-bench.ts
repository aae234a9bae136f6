// Development check and benchmark of CRIU checkpoints in the container runtime:
//   CUBICLE_TEST_ROOTFS=/var/lib/cubicle/templates/base/rootfs node --import tsx test/runtime-dev/checkpoint-bench.ts [rounds] [--agent dist/agent/agent.js] [--dirty 0,10,100,500] [--json out.json]
// 1. `rounds` times: a fresh sandbox → checkpoint (leaveRunning, memory) → restore as a clone
//    into a new netns → first GET /health of the clone; prints medians.
// 2. For each dirty size: a sandbox with that many MB written to /dev/shm → checkpoint time,
//    frozen time and image size.
// Everything it makes (sandboxes, netns, nft table, state dir, images) is removed at the end.
import { waitForAgentHealth } from "../../src/runtime/container/test-helpers.js";
import { writeFile, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { createNetworkManager } from "../../src/network/index.js";
import type { SandboxNetwork } from "../../src/network/types.js";
import { runCommand } from "../../src/shared/exec.js";
import { ContainerRuntime } from "../../src/runtime/index.js";
import { defaultRunDir } from "../../src/shared/config.js";
import type { SandboxSpec } from "../../src/runtime/types.js";

const argValue = (name: string) => {
  const index = process.argv.indexOf(name);
  return index > 0 ? process.argv[index + 1] : undefined;
};
const rounds = Number(process.argv.slice(2).find((a) => /^\d+$/.test(a)) ?? 5);
const dirtySizes = (argValue("--dirty") ?? "0,10,100,500").split(",").filter(Boolean).map(Number);
const agentScript = path.resolve(argValue("--agent") ?? path.join(import.meta.dirname, "health-agent.cjs"));
const jsonOut = argValue("--json");
const rootfsDir = process.env.CUBICLE_TEST_ROOTFS;
if (!rootfsDir) {
  console.error("set CUBICLE_TEST_ROOTFS to a shifted rootfs, e.g. /var/lib/cubicle/templates/base/rootfs");
  process.exit(2);
}
const tag = `cb${process.pid.toString(36)}`;
const stateDir = path.join(os.tmpdir(), `cubicle-ckpt-${tag}`);
const repoDist = path.join(import.meta.dirname, "..", "..", "dist");
const tableName = `cubicle_criu_${tag}`;
const netnsPrefix = `cubicle-${tag}-`;
const network = createNetworkManager({ subnet: "10.77.0.0/24" }, { tableName, netnsPrefix });
const runtime = new ContainerRuntime({ stateDir, distDir: repoDist, runcPath: "runc", runDir: defaultRunDir(stateDir) }, { agentScript });

const waitForHealth = (host: string) => waitForAgentHealth(host);

let counter = 0;
function specFor(id: string, net: SandboxNetwork): SandboxSpec {
  return {
    sandboxId: id,
    hostname: `sb-${id}`,
    template: { templateId: "base", rootfsDir: rootfsDir!, defaultUser: "root", defaultWorkdir: "/", env: {} },
    resources: { cpuCount: 2, memoryMiB: 2048, diskMiB: 0, pidsLimit: 500 },
    network: net,
  };
}
async function newSandbox(): Promise<{ id: string; net: SandboxNetwork }> {
  const id = `${tag}x${counter++}`;
  const net = await network.allocate(id, { allowInternetAccess: false });
  await runtime.create(specFor(id, net));
  await waitForHealth(net.sandboxAddress);
  return { id, net };
}
async function remove(id: string): Promise<void> {
  await runtime.destroy(id);
  await network.release(id);
}

const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
const results: Record<string, unknown> = { agentScript, rounds };

try {
  await network.init();
  await runtime.init();

  const clones: Record<string, number>[] = [];
  for (let round = 0; round < rounds; round++) {
    const source = await newSandbox();
    const t0 = performance.now();
    const info = await runtime.checkpoint(source.id, { kind: "snapshot", name: `clone-${round}` }, { memory: true, leaveRunning: true });
    const t1 = performance.now();
    const cloneId = `${tag}c${round}`;
    const net = await network.allocate(cloneId, { allowInternetAccess: false });
    const t2 = performance.now();
    await runtime.restore(specFor(cloneId, net), info.imageId);
    const t3 = performance.now();
    await waitForHealth(net.sandboxAddress);
    const t4 = performance.now();
    clones.push({ checkpointMs: t1 - t0, frozenMs: info.frozenMs, imageMiB: info.sizeBytes / 2 ** 20, restoreMs: t3 - t2, restoreToHealthMs: t4 - t2 });
    await remove(cloneId);
    await remove(source.id);
    await runtime.images.remove(info.imageId);
  }
  const summary = Object.fromEntries(Object.keys(clones[0] ?? {}).map((key) => [key, Math.round(median(clones.map((row) => row[key]!)) * 10) / 10]));
  console.log("fresh sandbox, checkpoint(leaveRunning) + clone restore, medians of", rounds, summary);
  results.fresh = { rows: clones, medians: summary };

  const dirty: Record<string, number>[] = [];
  for (const mb of dirtySizes) {
    const source = await newSandbox();
    // Dirty /dev/shm from inside: the write goes through the sandbox's tmpfs (memory cgroup).
    const pid = JSON.parse((await runCommand(["runc", "state", `cubicle-${source.id}`])).stdout).pid as number;
    if (mb > 0) await runCommand(["nsenter", "-t", String(pid), "-m", "-U", "--preserve-credentials", "-S", "0", "-G", "0", "dd", "if=/dev/urandom", "of=/dev/shm/dirty", "bs=1M", `count=${mb}`], { timeoutMs: 120_000 });
    const t0 = performance.now();
    const info = await runtime.checkpoint(source.id, { kind: "snapshot", name: `dirty-${mb}` }, { memory: true, leaveRunning: true });
    const t1 = performance.now();
    const cloneId = `${tag}d${mb}`;
    const net = await network.allocate(cloneId, { allowInternetAccess: false });
    const t2 = performance.now();
    await runtime.restore(specFor(cloneId, net), info.imageId);
    await waitForHealth(net.sandboxAddress);
    const t3 = performance.now();
    dirty.push({ dirtyMiB: mb, checkpointMs: Math.round(t1 - t0), frozenMs: Math.round(info.frozenMs), imageMiB: Math.round(info.sizeBytes / 2 ** 20), restoreToHealthMs: Math.round(t3 - t2) });
    console.log("dirty /dev/shm", dirty.at(-1));
    await remove(cloneId);
    await remove(source.id);
    await runtime.images.remove(info.imageId);
  }
  results.dirty = dirty;
  if (jsonOut) await writeFile(jsonOut, JSON.stringify(results, null, 2) + "\n");
} finally {
  for (const id of await runtime.list().catch(() => [])) await runtime.destroy(id).catch((err) => console.error("cleanup", id, err));
  for (const id of await network.listRuntimeIds().catch(() => [])) await network.release(id).catch(() => {});
  await runCommand(["nft", "delete", "table", "inet", tableName], { allowFailure: true });
  await runtime.images.settled();
  await rm(stateDir, { recursive: true, force: true });
}
