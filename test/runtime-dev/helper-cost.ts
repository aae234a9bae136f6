// Development measurement of the host helper's per-call cost: each step started from Node as a
// one-shot process (the way before the resident helper) vs a request to the resident helper.
//   CUBICLE_TEST_ROOTFS=/var/lib/cubicle/templates/base/rootfs node --import tsx test/runtime-dev/helper-cost.ts [iterations]
// Steps: prepare (a fresh layer, user namespace and idmapped overlay root), snapshot (of that
// layer), teardown (of both), hostname; `runc run --detach` in a netns and, after the init is
// killed, `runc delete` (one-shot: `nsenter --net` + runc from Node, `runc delete`; resident:
// Runc through the helper, and the removal without runc, RUNC_DELETE_NOTE). Prints p50 / p90.
// Everything it makes (pool, netns, containers, state dir) is removed at the end.
import { spawn, spawnSync } from "node:child_process";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { Runc } from "../../src/runtime/container/runc.js";
import { SandboxHelper } from "../../src/runtime/container/sandbox-helper.js";
import { StoragePool } from "../../src/runtime/container/storage-pool.js";
import { runCommand } from "../../src/shared/exec.js";

const iterations = Number(process.argv[2] ?? 50);
const rootfsDir = process.env.CUBICLE_TEST_ROOTFS;
if (!rootfsDir) {
  console.error("set CUBICLE_TEST_ROOTFS to a shifted rootfs, e.g. /var/lib/cubicle/templates/base/rootfs");
  process.exit(2);
}
const tag = `t15b${process.pid.toString(36)}`;
const stateDir = path.join(os.tmpdir(), `cubicle-helper-cost-${tag}`);
const binary = path.join(import.meta.dirname, "..", "..", "dist", "sandbox-helper");
const pool = new StoragePool({ stateDir, mountDir: path.join("/run", `cubicle-${tag}`, "pool"), sizeBytes: 2 * 1024 ** 3 });
const helper = new SandboxHelper(binary);
const runc = new Runc("runc", helper);
const netns = `${tag}-net`;
const netnsPath = `/run/netns/${netns}`;
const containers: string[] = [];
const UID_BASE = 1 << 30;

type Mode = "one-shot" | "resident";
const samples = new Map<string, number[]>();

function record(name: string, ms: number): void {
  samples.set(name, [...(samples.get(name) ?? []), ms]);
}

async function timed<T>(name: string, step: () => Promise<T>): Promise<T> {
  const started = performance.now();
  const result = await step();
  record(name, performance.now() - started);
  return result;
}

async function oneShot(args: string[]): Promise<string> {
  return (await runCommand([binary, ...args], { timeoutMs: 60_000 })).stdout;
}

async function helperStep(mode: Mode, command: string, args: string[]): Promise<string> {
  return mode === "one-shot" ? oneShot([command, ...args]) : helper.call(command, args);
}

async function rootfsRound(mode: Mode, n: number): Promise<void> {
  const id = `${mode === "one-shot" ? "o" : "r"}${n}`;
  const bundle = path.join(pool.sandboxesDir, id);
  const layer = path.join(pool.layersDir, id);
  const snapshot = path.join(pool.imagesDir, `${id}-snap`);
  await mkdir(path.join(bundle, "rootfs"), { recursive: true });
  const prepare = ["--base", String(UID_BASE), "--lower", rootfsDir!, "--layer", layer, "--rootfs", path.join(bundle, "rootfs"), "--quota", String(1024 ** 3), "--userns", path.join(bundle, "userns")];
  await timed(`prepare (fresh) ${mode}`, () => helperStep(mode, "prepare", prepare));
  await timed(`snapshot ${mode}`, () => helperStep(mode, "snapshot", ["--from", layer, "--to", snapshot]));
  await timed(`teardown ${mode}`, () => helperStep(mode, "teardown", ["--bundle", bundle, "--layer", layer]));
  await helperStep(mode, "teardown", ["--bundle", path.join(bundle, "none"), "--layer", snapshot]);
  await rm(bundle, { recursive: true, force: true });
}

async function hostnameRound(mode: Mode, pid: number): Promise<void> {
  await timed(`hostname ${mode}`, () => helperStep(mode, "hostname", ["--pid", String(pid), "--name", `h${mode.length}`]));
}

/** Before: `nsenter --net=<path> runc run --detach` from Node with stdio ignored (Runc.detached then). */
function runFromNode(id: string, bundle: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn("nsenter", [`--net=${netnsPath}`, "--", "runc", "run", "--detach", "--bundle", bundle, id], { stdio: "ignore" });
    child.on("error", reject);
    child.on("exit", (code) => (code === 0 ? resolve() : reject(new Error(`runc run exited ${code}`))));
  });
}

async function runcRound(mode: Mode, n: number, bundle: string): Promise<void> {
  const id = `${tag}-${mode === "one-shot" ? "o" : "r"}${n}`;
  containers.push(id);
  if (mode === "one-shot") await timed(`runc run ${mode}`, () => runFromNode(id, bundle));
  else await timed(`runc run ${mode}`, () => runc.runDetached(id, bundle, path.join(stateDir, "runc.log"), netnsPath));
  const container = await runc.state(id);
  if (!container || container.status !== "running") throw new Error(`container ${id} is not running`);
  await runc.kill(container);
  if (mode === "one-shot") await timed(`runc delete ${mode}`, () => runCommand(["runc", "delete", id], { timeoutMs: 30_000 }));
  else await timed(`runc delete ${mode}`, () => runc.delete(id, false));
}

async function makeBundle(): Promise<string> {
  const bundle = path.join(stateDir, "bundle");
  await mkdir(bundle, { recursive: true });
  await runCommand(["runc", "spec"], { cwd: bundle });
  const config = JSON.parse(await readFile(path.join(bundle, "config.json"), "utf8"));
  config.root = { path: rootfsDir, readonly: true };
  config.process.terminal = false;
  config.process.args = ["/bin/sleep", "1000"];
  config.linux.cgroupsPath = `/${tag}`;
  config.linux.namespaces = config.linux.namespaces.filter((namespace: { type: string }) => namespace.type !== "network");
  await writeFile(path.join(bundle, "config.json"), JSON.stringify(config));
  return bundle;
}

function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((sorted.length * p) / 100))]!;
}

const sleeper = spawn("unshare", ["--uts", "sleep", "1000"], { stdio: "ignore" });
try {
  await mkdir(stateDir, { recursive: true, mode: 0o700 });
  await pool.init();
  spawnSync("ip", ["netns", "add", netns]);
  const bundle = await makeBundle();
  await new Promise((r) => setTimeout(r, 200));
  // Warm-up (the resident helper starts; page caches), then alternate the modes.
  await rootfsRound("resident", -1);
  await rootfsRound("one-shot", -1);
  samples.clear();
  for (let n = 0; n < iterations; n++) {
    for (const mode of ["one-shot", "resident"] as const) {
      await rootfsRound(mode, n);
      await hostnameRound(mode, sleeper.pid!);
      await runcRound(mode, n, bundle);
    }
  }
  console.log(`${iterations} iterations, ms`);
  console.log("step".padEnd(28), "p50".padStart(8), "p90".padStart(8));
  for (const [name, values] of samples) console.log(name.padEnd(28), percentile(values, 50).toFixed(2).padStart(8), percentile(values, 90).toFixed(2).padStart(8));
} finally {
  sleeper.kill("SIGKILL");
  for (const id of containers) spawnSync("runc", ["delete", "--force", id]);
  spawnSync("ip", ["netns", "del", netns]);
  helper.close();
  spawnSync("umount", [pool.mountDir]);
  await rm(path.dirname(pool.mountDir), { recursive: true, force: true });
  await rm(stateDir, { recursive: true, force: true });
}
