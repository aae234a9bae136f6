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

/**
 * Raw `criu restore` of a one-process tree (a `sleep` in its own session, stdio /dev/null),
 * dumped once: the floor under any CRIU-based create, pause or fork.
 */
async function criuFloor(options: BenchOptions, target: BenchTarget) {
  const criu = findCriu(target.stateDir);
  if (!criu) return { status: "not available", reason: `no CRIU wrapper at ${path.join(target.stateDir, "criu", "criu")} or /var/lib/cubicle/criu/criu` };
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `${BASELINE_PREFIX}criu-`));
  const images = path.join(dir, "images");
  fs.mkdirSync(images);
  const child = spawn("sleep", ["100000"], { detached: true, stdio: "ignore" });
  child.unref();
  const pid = child.pid!;
  try {
    await sleep(50);
    try {
      await run([criu, "dump", "-t", String(pid), "-D", images, "-o", path.join(dir, "dump.log")], 60_000);
    } catch (err) {
      return { status: "not available", reason: `criu dump failed: ${errorMessage(err)}`, criu };
    }
    // The dump killed the process; its zombie is ours to reap.
    while (alive(pid)) await sleep(2);
    await sleep(20);
    const result = await measureLoop("baseline criu", options, async () => {
      const t0 = performance.now();
      await run([criu, "restore", "-D", images, "-d", "-o", path.join(dir, "restore.log")], 60_000);
      const totalMs = round2(performance.now() - t0);
      if (!alive(pid)) throw new Error("criu restore returned but the process is not running");
      await killAndWait(pid);
      return { totalMs };
    });
    return { status: result.samples.length ? "ok" : "failed", criu, ...result };
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
  const criu = await criuFloor(options, target);
  const spawnResult = await spawnFloor(options);
  const parts = { runc, criu, spawn: spawnResult };
  const strip = ({ samples: _s, errors: _e, summary, ...rest }: Record<string, unknown>) => ({ ...rest, ...(summary as object) });
  return {
    status: "ok",
    samples: Object.fromEntries(Object.entries(parts).map(([k, v]) => [k, (v as { samples?: unknown }).samples ?? []])),
    errors: Object.entries(parts).flatMap(([k, v]) => ((v as { errors?: string[] }).errors ?? []).map((e) => `${k}: ${e}`)),
    summary: Object.fromEntries(Object.entries(parts).map(([k, v]) => [k, strip(v as Record<string, unknown>)])),
  };
}
