import { memAvailableBytes, memFreeBytes } from "../machine.js";
import type { BenchOptions } from "../options.js";
import { runningAgentMemory } from "../process-memory.js";
import { Progress } from "../progress.js";
import type { ScenarioResult } from "../result.js";
import { errorMessage, fulfilled, rejectedMessages, round2, sleep } from "../run-helpers.js";
import { runPool } from "../../shared/pool.js";
import { loadSandboxSdk, type BenchTarget } from "../target.js";

const MiB = 2 ** 20;

export interface DensityPoint {
  sandboxes: number;
  memAvailableBytes: number;
  /** (MemAvailable before − now) ÷ sandboxes. */
  perSandboxMiB: number;
  memFreeBytes: number;
  /** (MemFree before − now) ÷ sandboxes: counts page cache as used, the stricter figure. */
  perSandboxFreeMiB: number;
  /** Cross-check from /proc/<agent>/smaps_rollup of the server's running (not frozen) sandboxes' agents. */
  agents: { measured: number; avgPssMiB: number; avgPrivateMiB: number; avgRssMiB: number } | undefined;
}

/** Idle sandboxes vs host memory, in batches of `-c`, until `-n` or the safety floor. */
export async function benchDensity(options: BenchOptions, target: BenchTarget): Promise<ScenarioResult> {
  const Sandbox = await loadSandboxSdk(target);
  const floorBytes = options.memoryFloorMiB * MiB;
  const batch = Math.max(1, options.concurrency);
  await sleep(options.settleMs);
  const baselineAvailable = memAvailableBytes();
  const baselineFree = memFreeBytes();
  const sandboxes: InstanceType<typeof Sandbox>[] = [];
  const points: DensityPoint[] = [];
  const errors: string[] = [];
  let stoppedBecause = "reached the requested count";
  const progress = new Progress(`density batch=${batch}`, options.total, options.progress);
  try {
    while (sandboxes.length < options.total) {
      // Leave room for one more batch at the worst per-sandbox cost seen so far.
      const last = points[points.length - 1];
      const nextBatchBytes = last ? Math.max(last.perSandboxMiB, last.perSandboxFreeMiB) * MiB * batch : 0;
      if (memAvailableBytes() - nextBatchBytes < floorBytes) {
        stoppedBecause = `safety stop: MemAvailable would fall below ${options.memoryFloorMiB} MiB`;
        break;
      }
      const count = Math.min(batch, options.total - sandboxes.length);
      const results = await runPool(count, count, () => Sandbox.create(options.template, { timeoutMs: 3_600_000 }));
      const created = fulfilled(results);
      sandboxes.push(...created);
      for (const message of rejectedMessages(results)) {
        errors.push(message);
        progress.error(message);
      }
      for (let i = 0; i < created.length; i++) progress.sample(0);
      if (created.length === 0) {
        stoppedBecause = "a whole batch failed to create";
        break;
      }
      await sleep(options.settleMs);
      const available = memAvailableBytes();
      const free = memFreeBytes();
      let agents: DensityPoint["agents"];
      try {
        const measured = await runningAgentMemory(target.runcPath, target.runDir);
        if (measured.length > 0) {
          const avg = (pick: (m: (typeof measured)[number]) => number) => round2(measured.reduce((a, m) => a + pick(m), 0) / measured.length / MiB);
          agents = { measured: measured.length, avgPssMiB: avg((m) => m.memory.pssBytes), avgPrivateMiB: avg((m) => m.memory.privateBytes), avgRssMiB: avg((m) => m.memory.rssBytes) };
        }
      } catch (err) {
        errors.push(`agent memory: ${errorMessage(err)}`);
      }
      const point: DensityPoint = {
        sandboxes: sandboxes.length,
        memAvailableBytes: available,
        perSandboxMiB: round2((baselineAvailable - available) / sandboxes.length / MiB),
        memFreeBytes: free,
        perSandboxFreeMiB: round2((baselineFree - free) / sandboxes.length / MiB),
        agents,
      };
      points.push(point);
      progress.note(`${point.sandboxes} sandboxes: ${point.perSandboxMiB} MiB each (MemAvailable), ${point.perSandboxFreeMiB} (MemFree), agent PSS ${agents?.avgPssMiB ?? "?"} MiB`);
    }
  } finally {
    progress.finish();
    await Promise.all(sandboxes.map((s) => s.kill().catch(() => false)));
  }
  return {
    status: "ok",
    samples: points,
    errors,
    summary: {
      baselineMemAvailableBytes: baselineAvailable,
      baselineMemFreeBytes: baselineFree,
      stoppedBecause,
      reachedSandboxes: sandboxes.length,
      final: points[points.length - 1],
    },
  };
}
