import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { runCommand } from "../../shared/exec.js";
import type { BenchOptions } from "../options.js";
import { Progress } from "../progress.js";
import type { ScenarioResult } from "../result.js";
import { errorMessage, round2, sleep } from "../run-helpers.js";
import { summarize } from "../stats.js";
import type { BenchTarget } from "../target.js";


/** Container ids of the baseline start with this, so a leftover is easy to find and remove. */
export const BASELINE_PREFIX = "benchbase-";
const UID_BASE = 100_000;
const DEFAULT_TEMPLATE_DIR = "/var/lib/cubicle/templates";
const UID_COUNT = 65_536;

/** Runs argv to completion through the project's command helper (throws with stderr). */
async function run(argv: string[], timeoutMs = 30_000): Promise<void> {
  await runCommand(argv, { timeoutMs });
}

/**
 * A minimal OCI bundle: the template rootfs (bound read-only into the bundle: the template cache
 * sits in the 0700 state directory, which the mapped root cannot traverse; the tree is owned by
 * the canonical range, so it needs no copy), user namespace 0→100000, fresh pid/ipc/uts/mount/net namespaces,
 * `/bin/true`. The floor under Cubicle's container create: no overlay, agent, netns setup or API.
 */
function baselineOciSpec(): Record<string, unknown> {
  const idMap = [{ containerID: 0, hostID: UID_BASE, size: UID_COUNT }];
  return {
    ociVersion: "1.0.2",
    process: { terminal: false, user: { uid: 0, gid: 0 }, args: ["/bin/true"], env: ["PATH=/usr/bin:/bin"], cwd: "/", noNewPrivileges: true },
    root: { path: "rootfs", readonly: true },
    hostname: "benchbase",
    mounts: [
      { destination: "/proc", type: "proc", source: "proc", options: ["nosuid", "noexec", "nodev"] },
      { destination: "/dev", type: "tmpfs", source: "tmpfs", options: ["nosuid", "strictatime", "mode=755", "size=65536k"] },
    ],
    linux: {
      uidMappings: idMap,
      gidMappings: idMap,
      namespaces: [{ type: "pid" }, { type: "ipc" }, { type: "uts" }, { type: "mount" }, { type: "network" }, { type: "user" }],
      maskedPaths: ["/proc/kcore", "/proc/keys"],
      readonlyPaths: ["/proc/sys"],
    },
  };
}

async function measureLoop(label: string, options: BenchOptions, op: () => Promise<Record<string, number>>) {
  for (let i = 0; i < options.warmup; i++) await op();
  const progress = new Progress(label, options.total, options.progress);
  const samples: Record<string, number>[] = [];
  const errors: string[] = [];
  for (let i = 0; i < options.total; i++) {
    try {
      const sample = await op();
      samples.push(sample);
      progress.sample(sample.totalMs ?? Object.values(sample)[0]!);
    } catch (err) {
      errors.push(errorMessage(err));
      progress.error(errorMessage(err));
      // The same failure n times says nothing more.
      if (errors.length >= 3 && samples.length === 0) break;
    }
  }
  progress.finish();
  const fields = samples[0] ? Object.keys(samples[0]) : [];
  const summary = Object.fromEntries(fields.map((f) => [f, summarize(samples.map((s) => s[f]!))]));
  return { samples, errors, summary };
}

/** `runc run --keep` + `runc delete` of /bin/true on the template rootfs. */
async function runcFloor(options: BenchOptions, target: BenchTarget) {
  // The client may not know the server's CUBICLE_TEMPLATE_DIR: fall back to the default cache.
  const candidates = [path.join(target.templateDir, options.template, "rootfs"), path.join(DEFAULT_TEMPLATE_DIR, options.template, "rootfs")];
  const rootfs = candidates.find((dir) => fs.existsSync(path.join(dir, "bin", "true")));
  if (!rootfs) return { status: "not available", reason: `no template rootfs with /bin/true at ${candidates.join(" or ")}` };
  const bundle = fs.mkdtempSync(path.join(os.tmpdir(), BASELINE_PREFIX));
  // The mapped root must traverse the bundle directory to reach the config's rootfs path.
  fs.chmodSync(bundle, 0o711);
  fs.writeFileSync(path.join(bundle, "config.json"), JSON.stringify(baselineOciSpec()));
  const boundRootfs = path.join(bundle, "rootfs");
  fs.mkdirSync(boundRootfs);
  await run(["mount", "--bind", "-o", "ro", rootfs, boundRootfs]);
  const id = `${BASELINE_PREFIX}${process.pid}`;
  try {
    const result = await measureLoop("baseline runc", options, async () => {
      const t0 = performance.now();
      await run([target.runcPath, "run", "--keep", "--bundle", bundle, id]);
      const t1 = performance.now();
      await run([target.runcPath, "delete", id]);
      const t2 = performance.now();
      return { runMs: round2(t1 - t0), deleteMs: round2(t2 - t1), totalMs: round2(t2 - t0) };
    });
    return { status: result.samples.length ? "ok" : "failed", rootfs, ...result };
  } finally {
    await run([target.runcPath, "delete", "--force", id]).catch(() => undefined);
    await run(["umount", boundRootfs]).catch(() => run(["umount", "--lazy", boundRootfs]));
    fs.rmdirSync(boundRootfs);
    fs.rmSync(bundle, { recursive: true, force: true });
  }
}

/** The CRIU wrapper Cubicle's setup made: in the server's state dir, else the default one. */
function findCriu(stateDir: string): string | undefined {
  return [path.join(stateDir, "criu", "criu"), "/var/lib/cubicle/criu/criu"].find((p) => fs.existsSync(p));
}

function alive(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    return !/^\d+ \(.*\) [ZX]/.test(stat);
  } catch {
    return false;
  }
}

async function killAndWait(pid: number): Promise<void> {
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    return;
  }
  const deadline = Date.now() + 5000;
  while (Date.now() < deadline && fs.existsSync(`/proc/${pid}`)) await sleep(2);
}

/** The agent bundle next to the CLI (dist/agent/agent.js), for the CRIU floors. */
function agentScript(): string | undefined {
  const candidates = [path.join(path.dirname(process.argv[1] ?? "."), "agent", "agent.js"), path.resolve("dist", "agent", "agent.js")];
  return candidates.find((file) => fs.existsSync(file));
}

/**
 * An idle agent on the host, as CRIU sees the one in a sandbox: the same Node binary and bundle,
 * its own session, stdio on /dev/null, envd and the interpreter listening (loopback, ports the
 * kernel picks). It runs as root (CRIU needs to read and set the process's rlimits, which takes
 * CAP_SYS_RESOURCE for another user's process, and this project's hosts deny it even to root);
 * the only host file an agent writes at start is an empty /etc/resolv.conf (it names its
 * gateway there), so the caller refuses when the host's names no resolver. Resolves once both
 * servers listen.
 */
async function startFloorAgent(script: string): Promise<number> {
  const child = spawn(process.execPath, [script], {
    detached: true,
    stdio: "ignore",
    cwd: "/",
    env: { PATH: "/usr/bin:/bin", CUBICLE_AGENT_HOST: "127.0.0.1", CUBICLE_AGENT_PORT: "0", CUBICLE_INTERPRETER_PORT: "0", CUBICLE_LOG_LEVEL: "error" },
  });
  child.unref();
  const pid = child.pid!;
  // Listening (both ports) shows in /proc/<pid>/net/tcp only as sockets; wait for two LISTEN
  // sockets owned by the process instead of guessing a port.
  const deadline = Date.now() + 15_000;
  while (Date.now() < deadline) {
    if (!alive(pid)) throw new Error("the floor agent exited at start");
    if (listeningSockets(pid) >= 2) return pid;
    await sleep(20);
  }
  await killAndWait(pid);
  throw new Error("the floor agent did not listen within 15 s");
}

/** How many of a process's sockets are TCP listeners (inode match against /proc/net/tcp). */
function listeningSockets(pid: number): number {
  const inodes = new Set<string>();
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    const link = fs.readlinkSync(`/proc/${pid}/fd/${fd}`, { encoding: "utf8" });
    const inode = /^socket:\[(\d+)\]$/.exec(link)?.[1];
    if (inode) inodes.add(inode);
  }
  let count = 0;
  for (const line of fs.readFileSync(`/proc/${pid}/net/tcp`, "utf8").split("\n").slice(1)) {
    const fields = line.trim().split(/\s+/);
    if (fields[3] === "0A" && inodes.has(fields[9] ?? "")) count++;
  }
  return count;
}

/**
 * Raw CRIU on the agent process, the floors under every CRIU path of the same run: `dump`
 * with `--leave-running` (under a snapshot) into a fresh directory each time, and `restore -d`
 * of one such image (under a create from a snapshot, a rollback, a fork). Cubicle's own paths
 * also dump and restore tini and the sandbox's namespaces and mounts, through runc.
 */
async function criuFloors(options: BenchOptions, target: BenchTarget) {
  const criu = findCriu(target.stateDir);
  if (!criu) {
    const missing = { status: "not available", reason: `no CRIU wrapper at ${path.join(target.stateDir, "criu", "criu")} or /var/lib/cubicle/criu/criu` };
    return { dump: missing, restore: missing };
  }
  const script = agentScript();
  if (!script) {
    const missing = { status: "not available", reason: "dist/agent/agent.js is not built (node scripts/build.mjs)" };
    return { dump: missing, restore: missing };
  }
  if (!/^\s*nameserver\s/m.test(fs.readFileSync("/etc/resolv.conf", { encoding: "utf8", flag: "r" }))) {
    const refused = { status: "not available", reason: "the host's /etc/resolv.conf names no nameserver: the floor agent (root) would write one" };
    return { dump: refused, restore: refused };
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `${BASELINE_PREFIX}criu-`));
  // A copy outside the repository, whose package.json would make Node load the CommonJS bundle as ESM.
  fs.copyFileSync(script, path.join(dir, "agent.js"));
  const pid = await startFloorAgent(path.join(dir, "agent.js")).catch((err) => {
    fs.rmSync(dir, { recursive: true, force: true });
    throw err;
  });
  try {
    let image = "";
    let round = 0;
    const dump = await measureLoop("baseline criu dump", options, async () => {
      image = path.join(dir, `dump-${round++}`);
      fs.mkdirSync(image);
      const t0 = performance.now();
      await run([criu, "dump", "-t", String(pid), "-D", image, "--leave-running", "-o", path.join(image, "dump.log")], 60_000);
      const totalMs = round2(performance.now() - t0);
      if (!alive(pid)) throw new Error("the agent is not running after a --leave-running dump");
      // Keep the last image (for the restores) and the disk small.
      if (round > 1) fs.rmSync(path.join(dir, `dump-${round - 2}`), { recursive: true, force: true });
      return { totalMs };
    });
    if (dump.samples.length === 0) return { dump: { status: "failed", criu, ...dump }, restore: { status: "not available", reason: "no dump to restore" } };
    await killAndWait(pid);
    const restore = await measureLoop("baseline criu restore", options, async () => {
      const t0 = performance.now();
      await run([criu, "restore", "-D", image, "-d", "-o", path.join(dir, "restore.log")], 60_000);
      const totalMs = round2(performance.now() - t0);
      if (!alive(pid)) throw new Error("criu restore returned but the agent is not running");
      await killAndWait(pid);
      return { totalMs };
    });
    return { dump: { status: "ok", criu, process: "agent", ...dump }, restore: { status: restore.samples.length ? "ok" : "failed", criu, process: "agent", ...restore } };
  } finally {
    await killAndWait(pid);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** fork+exec of /bin/true from Node (`child_process.spawn` until exit). */
async function spawnFloor(options: BenchOptions) {
  const result = await measureLoop("baseline spawn", options, async () => {
    const t0 = performance.now();
    await new Promise<void>((resolve, reject) => {
      const child = spawn("/bin/true", [], { stdio: "ignore" });
      child.on("error", reject);
      child.on("exit", (code) => (code === 0 ? resolve() : reject(new Error(`/bin/true exited ${code}`))));
    });
    return { totalMs: round2(performance.now() - t0) };
  });
  return { status: "ok", ...result };
}

/** The floors measured in the same run on the same machine, so results can be shown as ratios. */
export async function benchBaseline(options: BenchOptions, target: BenchTarget): Promise<ScenarioResult> {
  const runc = await runcFloor(options, target);
  const criu = await criuFloors(options, target);
  const spawnResult = await spawnFloor(options);
  const parts = { runc, criu: criu.restore, criuDump: criu.dump, spawn: spawnResult };
  const strip = ({ samples: _s, errors: _e, summary, ...rest }: Record<string, unknown>) => ({ ...rest, ...(summary as object) });
  return {
    status: "ok",
    samples: Object.fromEntries(Object.entries(parts).map(([k, v]) => [k, (v as { samples?: unknown }).samples ?? []])),
    errors: Object.entries(parts).flatMap(([k, v]) => ((v as { errors?: string[] }).errors ?? []).map((e) => `${k}: ${e}`)),
    summary: Object.fromEntries(Object.entries(parts).map(([k, v]) => [k, strip(v as Record<string, unknown>)])),
  };
}
