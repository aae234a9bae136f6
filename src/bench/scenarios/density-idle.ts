import fs from "node:fs";
import path from "node:path";
import { memAvailableBytes, memFreeBytes } from "../machine.js";
import type { BenchOptions } from "../options.js";
import { Progress } from "../progress.js";
import type { ScenarioResult } from "../result.js";
import { errorMessage, fulfilled, rejectedMessages, round2, sleep } from "../run-helpers.js";
import { runPool } from "../../shared/pool.js";
import { summarize } from "../stats.js";
import { callApi, loadSandboxSdk, type BenchTarget } from "../target.js";

const MiB = 2 ** 20;

/** Bytes of the files under `dir` (st_blocks: what the images take on the pool). */
function diskBytes(dir: string): number {
  let total = 0;
  const walk = (at: string) => {
    for (const entry of fs.readdirSync(at, { withFileTypes: true })) {
      const full = path.join(at, entry.name);
      if (entry.isDirectory()) walk(full);
      else total += fs.lstatSync(full).blocks * 512;
    }
  };
  try {
    walk(dir);
  } catch {
    return total;
  }
  return total;
}

/** Bytes in use on the storage pool's filesystem (what it really holds: compressed extents count as written). */
function poolUsedBytes(mountDir: string): number {
  try {
    const stats = fs.statfsSync(mountDir);
    return (stats.blocks - stats.bfree) * stats.bsize;
  } catch {
    return Number.NaN;
  }
}

/**
 * Idle tiers at scale (issue 15): `-n` sandboxes made in batches of `-c` and left alone on a
 * server whose idle settings are short (CUBICLE_IDLE_FREEZE_SECONDS / _DISK_SECONDS: set on the
 * server; this scenario only waits), until every one shows `cubicleIdle: "disk"` in getInfo.
 * Records host memory per sandbox (MemAvailable and MemFree Δ ÷ N) awake, frozen and on disk,
 * the images' bytes on the storage pool per sandbox, and the wake of a sample: the first
 * `commands.run('true')` of a sandbox on disk, and of one frozen (woken, left alone again).
 */
export async function benchDensityIdle(options: BenchOptions, target: BenchTarget): Promise<ScenarioResult> {
  const Sandbox = await loadSandboxSdk(target);
  const batch = Math.max(1, options.concurrency);
  const poolDir = path.join(target.runDir, "pool");
  const imagesDir = path.join(poolDir, "images", "paused");
  await sleep(options.settleMs);
  const baseline = { available: memAvailableBytes(), free: memFreeBytes(), imageBytes: diskBytes(imagesDir), poolBytes: poolUsedBytes(poolDir) };
  const sandboxes: InstanceType<typeof Sandbox>[] = [];
  const errors: string[] = [];
  const per = (now: number, before: number) => round2((before - now) / Math.max(1, sandboxes.length) / MiB);
  const memoryPoint = () => ({ perSandboxMiB: per(memAvailableBytes(), baseline.available), perSandboxFreeMiB: per(memFreeBytes(), baseline.free) });
  const tierOf = async (id: string) => {
    const res = await callApi(target, "GET", `/sandboxes/${id}`);
    return res.status === 200 ? String(res.json.cubicleIdle ?? "awake") : `status ${res.status}`;
  };
  /** Every listed sandbox's tier, through the paged list (one request per 100, not one per sandbox). */
  const tiers = async (): Promise<Map<string, string>> => {
    const seen = new Map<string, string>();
    let token: string | null = null;
    do {
      const res = await callApi(target, "GET", `/v2/sandboxes?limit=100${token ? `&nextToken=${encodeURIComponent(token)}` : ""}`);
      if (res.status !== 200) throw new Error(`GET /v2/sandboxes answered ${res.status}: ${JSON.stringify(res.json)}`);
      for (const listed of res.json as { sandboxID: string; cubicleIdle?: string }[]) seen.set(listed.sandboxID, listed.cubicleIdle ?? "awake");
      token = res.headers.get("x-next-token");
    } while (token);
    return seen;
  };
  /** Until every sandbox is in one of `tiers` (a sandbox may pass through frozen to disk between two looks). */
  const waitAll = async (wanted: string[], timeoutMs: number) => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const listed = await tiers();
      const seen = sandboxes.map((s) => listed.get(s.sandboxId) ?? "not listed");
      const done = seen.filter((t) => wanted.includes(t)).length;
      if (done === sandboxes.length) return;
      if (Date.now() > deadline) throw new Error(`${done} of ${sandboxes.length} sandboxes reached ${wanted.join(" or ")} within ${timeoutMs} ms (others: ${[...new Set(seen.filter((t) => !wanted.includes(t)))].join(", ")})`);
      if (options.progress) process.stderr.write(`density-idle: ${done} of ${sandboxes.length} ${wanted.join(" or ")}\n`);
      await sleep(Math.min(10_000, 500 + sandboxes.length));
    }
  };
  const progress = new Progress(`density-idle batch=${batch}`, options.total, options.progress);
  /** The points measured so far (kept in a failed result). */
  const partial: Record<string, unknown> = {};
  try {
    while (sandboxes.length < options.total) {
      const count = Math.min(batch, options.total - sandboxes.length);
      const results = await runPool(count, count, () => Sandbox.create(options.template, { timeoutMs: 86_400_000 }));
      const created = fulfilled(results);
      sandboxes.push(...created);
      for (const message of rejectedMessages(results)) errors.push(message);
      for (let i = 0; i < created.length; i++) progress.sample(0);
      if (created.length === 0) throw new Error(`a whole batch failed: ${errors[errors.length - 1]}`);
    }
    progress.finish();
    const awake = memoryPoint();
    partial.awake = awake;
    const limitMs = 600_000 + sandboxes.length * 2_000;
    await waitAll(["frozen", "disk"], limitMs);
    const frozen = memoryPoint();
    partial.frozen = frozen;
    await waitAll(["disk"], limitMs);
    await sleep(Math.max(options.settleMs, 6_000));
    const onDisk = {
      ...memoryPoint(),
      imageMiBPerSandbox: round2((diskBytes(imagesDir) - baseline.imageBytes) / sandboxes.length / MiB),
      // After the last writeback (the pool commits every 5 s): compressed images count as stored.
      poolMiBPerSandbox: round2((poolUsedBytes(poolDir) - baseline.poolBytes) / sandboxes.length / MiB),
    };
    partial.onDisk = onDisk;
    // Wakes of a sample: from disk, then (after it froze again) from frozen.
    const sample = sandboxes.slice(0, Math.min(sandboxes.length, Math.max(3, Math.round(options.total / 20))));
    const fromDisk: number[] = [];
    for (const sandbox of sample) {
      const t0 = performance.now();
      await sandbox.commands.run("true");
      fromDisk.push(round2(performance.now() - t0));
    }
    partial.wakeFromDiskToFirstCommandMs = summarize(fromDisk);
    // Wakes from frozen: a few are woken, left alone until they freeze again (before they go
    // back to disk), then used. (Waiting for the disk sample's first ones to freeze again, as
    // before, failed at N=10,000: 500 wakes took longer than their way back to disk.)
    const fromFrozen: number[] = [];
    const deadline = Date.now() + 120_000;
    for (const sandbox of sample.slice(0, Math.min(sample.length, 5))) {
      await sandbox.commands.run("true");
      while ((await tierOf(sandbox.sandboxId)) !== "frozen") {
        if (Date.now() > deadline) throw new Error(`sandbox ${sandbox.sandboxId} did not freeze again within 120 s`);
        await sleep(100);
      }
      const t0 = performance.now();
      await sandbox.commands.run("true");
      fromFrozen.push(round2(performance.now() - t0));
    }
    return {
      status: "ok",
      samples: { fromDisk, fromFrozen },
      errors,
      summary: {
        sandboxes: sandboxes.length,
        awake,
        frozen,
        onDisk,
        wakeFromDiskToFirstCommandMs: summarize(fromDisk),
        wakeFromFrozenToFirstCommandMs: summarize(fromFrozen),
        note: "memory per sandbox = (MemAvailable or MemFree before − at the point) ÷ sandboxes; images on the storage pool's paused/ directory (imageMiB: their files' sizes, uncompressed; poolMiB: the pool's filesystem use, compressed)",
      },
    };
  } catch (err) {
    // What was measured before the failure stays in the result.
    return { status: "failed", reason: errorMessage(err), samples: [], errors, summary: { sandboxes: sandboxes.length, ...partial } };
  } finally {
    progress.finish();
    // Killed 20 at a time: ten thousand at once would be ten thousand requests in flight.
    await runPool(sandboxes.length, 20, (i) => sandboxes[i]!.kill().catch(() => false));
  }
}
