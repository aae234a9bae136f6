import type { BenchOptions } from "../options.js";
import type { ScenarioResult } from "../result.js";
import { fulfilled, rejectedMessages, round2, runMeasured, sleep } from "../run-helpers.js";
import { runPool } from "../../shared/pool.js";
import { summarize } from "../stats.js";
import { callApi, loadSandboxSdk, type BenchTarget } from "../target.js";

type SandboxClass = Awaited<ReturnType<typeof loadSandboxSdk>>;
type SandboxInstance = InstanceType<SandboxClass>;

export interface CreateSample {
  /** `Sandbox.create` resolved (201 from the API). */
  apiMs: number;
  /** First successful `commands.run('true')` after the create started: the headline figure. */
  firstCommandMs: number;
  /** `commands.run('true')` calls until one succeeded (1 = the first). */
  commandAttempts: number;
  /** `kill()` time in create-delete mode. */
  killMs?: number;
}

/**
 * Runs `true` until it succeeds (at most `deadlineMs` after the create started): the clock of a
 * create stops at the first command a user could really run.
 */
export async function firstSuccessfulCommand(sandbox: SandboxInstance, startedAt: number, deadlineMs = 30_000): Promise<{ ms: number; attempts: number }> {
  for (let attempts = 1; ; attempts++) {
    try {
      const run = await sandbox.commands.run("true");
      if (run.exitCode === 0) return { ms: round2(performance.now() - startedAt), attempts };
    } catch (err) {
      if (performance.now() - startedAt > deadlineMs) throw err;
    }
    if (performance.now() - startedAt > deadlineMs) throw new Error(`no successful command within ${deadlineMs} ms of the create`);
    await sleep(5);
  }
}

/** Waits until `GET /pools` shows the template's pool full (see BenchOptions.waitForPool). */
export async function waitForFullPool(target: BenchTarget, template: string, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const { status, json } = await callApi(target, "GET", "/pools");
    if (status !== 200) throw new Error(`GET /pools answered ${status}`);
    const pools = json as Record<string, { ready: number; target: number }>;
    const pool = pools[template] ?? Object.entries(pools).find(([id]) => id.startsWith(template))?.[1];
    if (!pool || pool.target === 0) throw new Error(`the server has no warm pool for ${template} (start it with CUBICLE_POOL_SIZE=${template}=2)`);
    if (pool.ready >= pool.target) return;
    if (Date.now() > deadline) throw new Error(`the ${template} pool did not refill within ${timeoutMs} ms`);
    await sleep(20);
  }
}

/** create → first successful `commands.run('true')`; warm-up rounds discarded. */
export async function benchCreate(options: BenchOptions, target: BenchTarget): Promise<ScenarioResult> {
  const Sandbox = await loadSandboxSdk(target);
  const kept: SandboxInstance[] = [];
  const once = async (): Promise<CreateSample> => {
    if (options.waitForPool) await waitForFullPool(target, options.template);
    const t0 = performance.now();
    const sandbox = await Sandbox.create(options.template, { timeoutMs: 600_000 });
    const apiMs = round2(performance.now() - t0);
    try {
      const first = await firstSuccessfulCommand(sandbox, t0);
      const sample: CreateSample = { apiMs, firstCommandMs: first.ms, commandAttempts: first.attempts };
      if (options.mode === "create-only") {
        kept.push(sandbox);
      } else {
        const k0 = performance.now();
        await sandbox.kill();
        sample.killMs = round2(performance.now() - k0);
      }
      return sample;
    } catch (err) {
      await sandbox.kill().catch(() => false);
      throw err;
    }
  };
  let killAllMs: number | undefined;
  const background: SandboxInstance[] = [];
  const killBackground = () => Promise.all(background.splice(0).map((s) => s.kill().catch(() => false)));
  const killKept = async () => {
    const k0 = performance.now();
    await Promise.all(kept.splice(0).map((s) => s.kill().catch(() => false)));
    return round2(performance.now() - k0);
  };
  try {
    if (options.background > 0) {
      // Made 10 at a time at least (not measured): a thousand one by one would take minutes.
      const made = await runPool(options.background, Math.max(options.concurrency, 10), async () => {
        const sandbox = await Sandbox.create(options.template, { timeoutMs: 3_600_000 });
        background.push(sandbox);
      });
      const failed = made.filter((result) => result.status === "rejected").length;
      if (failed > 0) throw new Error(`${failed} of ${options.background} background sandboxes could not be made`);
    }
    if (options.warmup > 0) {
      await runPool(options.warmup, options.concurrency, once);
      await killKept();
    }
    const { results, wallMs } = await runMeasured(`create c=${options.concurrency}`, options, once);
    killAllMs = await killKept();
    const ok = fulfilled(results);
    return {
      status: "ok",
      samples: ok,
      errors: rejectedMessages(results),
      summary: {
        successRate: ok.length / options.total,
        createToFirstCommandMs: summarize(ok.map((s) => s.firstCommandMs)),
        createApiMs: summarize(ok.map((s) => s.apiMs)),
        ...(options.mode === "create-delete" ? { killMs: summarize(ok.map((s) => s.killMs ?? NaN).filter(Number.isFinite)) } : { killAllMs }),
        wallMs: round2(wallMs),
        amortizedMsPerSandbox: round2(wallMs / options.total),
        waitedForFullPool: options.waitForPool,
        liveSandboxesMeanwhile: options.background,
      },
    };
  } finally {
    await killKept();
    await killBackground();
  }
}
