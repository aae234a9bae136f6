/**
 * Snapshot, restore, rollback, fork and pause/resume through the E2B API (and Cubicle's rollback
 * extension). A server that answers 501 `unimplemented` gets `{"status": "not available"}` in
 * the JSON, never numbers.
 */
import type { BenchOptions } from "../options.js";
import { Progress } from "../progress.js";
import { notAvailable, type ScenarioResult } from "../result.js";
import { errorMessage, isNotAvailable, NotAvailable, round2, runMeasured, timed } from "../run-helpers.js";
import { runPool } from "../../shared/pool.js";
import { summarize } from "../stats.js";
import { callApi, loadSandboxSdk, type BenchTarget } from "../target.js";
import { firstSuccessfulCommand } from "./create.js";

type SandboxClass = Awaited<ReturnType<typeof loadSandboxSdk>>;
type SandboxInstance = InstanceType<SandboxClass>;

/** Memory the agent and a shell need beside the dirty pages, under the sandbox's limit. */
const AGENT_HEADROOM_MiB = 96;

/** Runs `op`, turning a "not offered" failure into NotAvailable so the scenario can say so. */
async function guard<T>(what: string, op: () => Promise<T>): Promise<T> {
  try {
    return await op();
  } catch (err) {
    if (isNotAvailable(err)) throw new NotAvailable(`${what}: ${errorMessage(err)}`);
    throw err;
  }
}

/**
 * Creates `count` sandboxes at once; kills any that did start if one failed. With `memoryMB`
 * they are made through the REST API with that memory (a Cubicle extension of the create body:
 * the SDK has no option for it) and then connected to with the SDK.
 */
async function createMany(Sandbox: SandboxClass, template: string, count: number, target?: BenchTarget, memoryMB?: number): Promise<SandboxInstance[]> {
  const createOne = async (): Promise<SandboxInstance> => {
    if (!memoryMB || !target) return Sandbox.create(template, { timeoutMs: 1_800_000 });
    const created = await callApi(target, "POST", "/v2/sandboxes", { templateID: template, timeout: 1800, memoryMB });
    if (created.status !== 201) throw new Error(`create with ${memoryMB} MiB: ${created.status} ${JSON.stringify(created.json)}`);
    return Sandbox.connect(created.json.sandboxID, { timeoutMs: 1_800_000 });
  };
  const results = await runPool(count, count, createOne);
  const made = results.filter((r): r is PromiseFulfilledResult<SandboxInstance> => r.status === "fulfilled").map((r) => r.value);
  const failed = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
  if (failed) {
    await killAll(made);
    throw failed.reason;
  }
  return made;
}

async function killAll(sandboxes: readonly SandboxInstance[]): Promise<void> {
  await Promise.all(sandboxes.map((s) => s.kill().catch(() => false)));
}

/**
 * `rounds` rounds of `op` on each of `sandboxes` at once (concurrency = sandboxes.length);
 * the first `warmup` rounds are discarded. Samples are records of named millisecond figures.
 */
async function rounds(
  label: string,
  options: BenchOptions,
  sandboxes: readonly SandboxInstance[],
  op: (sandbox: SandboxInstance) => Promise<Record<string, number>>,
): Promise<{ samples: Record<string, number>[]; errors: string[] }> {
  const progress = new Progress(label, options.total * sandboxes.length, options.progress);
  const samples: Record<string, number>[] = [];
  const errors: string[] = [];
  for (let round = 0; round < options.warmup + options.total; round++) {
    const results = await Promise.allSettled(sandboxes.map((s) => op(s)));
    for (const result of results) {
      if (result.status === "rejected") {
        if (result.reason instanceof NotAvailable) {
          progress.finish();
          throw result.reason;
        }
        if (round >= options.warmup) {
          errors.push(errorMessage(result.reason));
          progress.error(errorMessage(result.reason));
        }
      } else if (round >= options.warmup) {
        samples.push(result.value);
        progress.sample(Object.values(result.value)[0]!);
      }
    }
  }
  progress.finish();
  return { samples, errors };
}

function summarizeFields(samples: Record<string, number>[], expected: number): Record<string, unknown> {
  const fields = samples[0] ? Object.keys(samples[0]) : [];
  return { successRate: expected ? samples.length / expected : 0, ...Object.fromEntries(fields.map((f) => [f, summarize(samples.map((s) => s[f]!))])) };
}

/** Wraps a scenario body: NotAvailable → the "not available" record. */
async function orNotAvailable(body: () => Promise<ScenarioResult>): Promise<ScenarioResult> {
  try {
    return await body();
  } catch (err) {
    if (err instanceof NotAvailable || isNotAvailable(err)) return notAvailable(err instanceof Error ? err.message : String(err));
    throw err;
  }
}

/** Memory (MiB) a sandbox needs for `dirtyMiB` of /dev/shm on top of what the template gives it; undefined = the template's. */
function memoryFor(dirtyMiB: number): number | undefined {
  return dirtyMiB + AGENT_HEADROOM_MiB > 400 ? dirtyMiB + 2 * AGENT_HEADROOM_MiB : undefined;
}

/** `createSnapshot` time vs memory dirtied in /dev/shm, `-c` sandboxes at once. */
export async function benchSnapshot(options: BenchOptions, target: BenchTarget): Promise<ScenarioResult> {
  const Sandbox = await loadSandboxSdk(target);
  return orNotAvailable(async () => {
    const bySize: Record<string, unknown> = {};
    const samples: Record<string, unknown> = {};
    const errors: string[] = [];
    for (const dirtyMiB of options.dirtyMiB) {
      const sandboxes = await createMany(Sandbox, options.template, options.concurrency, target, memoryFor(dirtyMiB));
      try {
        const { memoryMB } = await sandboxes[0]!.getInfo();
        if (dirtyMiB + AGENT_HEADROOM_MiB > memoryMB) {
          bySize[dirtyMiB] = { status: "skipped", reason: `template ${options.template} has ${memoryMB} MiB; ${dirtyMiB} MiB of /dev/shm plus the agent does not fit` };
          continue;
        }
        await Promise.all(
          sandboxes.map((s) =>
            s.commands.run(`dd if=/dev/urandom of=/dev/shm/cubicle-bench-dirty bs=1M count=${dirtyMiB} status=none && sync`, { timeoutMs: 600_000 }),
          ),
        );
        const snapshotIds: string[] = [];
        const result = await rounds(`snapshot ${dirtyMiB} MiB c=${options.concurrency}`, options, sandboxes, async (sandbox) => {
          const { ms, value } = await guard("createSnapshot", () => timed(() => sandbox.createSnapshot()));
          snapshotIds.push(value.snapshotId);
          // The source keeps running after a snapshot: check it still answers.
          const after = await firstSuccessfulCommand(sandbox, performance.now());
          return { snapshotMs: ms, commandAfterMs: after.ms };
        });
        await Promise.all(snapshotIds.map((id) => Sandbox.deleteSnapshot(id).catch(() => false)));
        samples[dirtyMiB] = result.samples;
        bySize[dirtyMiB] = { status: "ok", ...summarizeFields(result.samples, options.total * sandboxes.length) };
        errors.push(...result.errors.map((e) => `${dirtyMiB} MiB: ${e}`));
      } finally {
        await killAll(sandboxes);
      }
    }
    return { status: "ok", samples, errors, summary: { byDirtyMiB: bySize } };
  });
}

/** One create from a snapshot: its API time and its time to the first successful command; killed after. */
async function restoreOnce(Sandbox: SandboxClass, snapshotId: string): Promise<{ firstCommandMs: number; apiMs: number }> {
  const t0 = performance.now();
  const sandbox = await guard("create from snapshot", () => Sandbox.create(snapshotId, { timeoutMs: 600_000 }));
  const apiMs = round2(performance.now() - t0);
  try {
    const first = await firstSuccessfulCommand(sandbox, t0);
    return { firstCommandMs: first.ms, apiMs };
  } finally {
    await sandbox.kill().catch(() => false);
  }
}

/** `Sandbox.create(snapshotId)` → first successful command, at concurrency `-c`. */
export async function benchRestore(options: BenchOptions, target: BenchTarget): Promise<ScenarioResult> {
  const Sandbox = await loadSandboxSdk(target);
  return orNotAvailable(async () => {
    const [source] = await createMany(Sandbox, options.template, 1);
    let snapshotId: string | undefined;
    try {
      snapshotId = (await guard("createSnapshot", () => source!.createSnapshot())).snapshotId;
      const once = () => restoreOnce(Sandbox, snapshotId!);
      if (options.warmup > 0) {
        const warm = await runPool(options.warmup, options.concurrency, once);
        const refused = warm.find((r): r is PromiseRejectedResult => r.status === "rejected" && r.reason instanceof NotAvailable);
        if (refused) throw refused.reason;
      }
      const { results, wallMs: measuredWallMs } = await runMeasured(`restore c=${options.concurrency}`, options, once);
      const refused = results.find((r): r is PromiseRejectedResult => r.status === "rejected" && r.reason instanceof NotAvailable);
      if (refused) throw refused.reason;
      const ok = results.filter((r): r is PromiseFulfilledResult<{ firstCommandMs: number; apiMs: number }> => r.status === "fulfilled").map((r) => r.value);
      return {
        status: "ok",
        samples: ok,
        errors: results.filter((r): r is PromiseRejectedResult => r.status === "rejected").map((r) => errorMessage(r.reason)),
        summary: { ...summarizeFields(ok, options.total), wallMs: round2(measuredWallMs) },
      };
    } finally {
      await source!.kill().catch(() => false);
      if (snapshotId) await Sandbox.deleteSnapshot(snapshotId).catch(() => false);
    }
  });
}

/**
 * Create from a snapshot → first command vs the image's size: for each `-s` size a source
 * sandbox dirties that much of /dev/shm (memory the image must carry), is snapshotted once, and
 * `-n` sandboxes are made from the snapshot one after another (`-c` at once).
 */
export async function benchRestoreSize(options: BenchOptions, target: BenchTarget): Promise<ScenarioResult> {
  const Sandbox = await loadSandboxSdk(target);
  return orNotAvailable(async () => {
    const bySize: Record<string, unknown> = {};
    const samples: Record<string, unknown> = {};
    const errors: string[] = [];
    for (const dirtyMiB of options.dirtyMiB) {
      const [source] = await createMany(Sandbox, options.template, 1, target, memoryFor(dirtyMiB));
      let snapshotId: string | undefined;
      try {
        const { memoryMB } = await source!.getInfo();
        if (dirtyMiB + AGENT_HEADROOM_MiB > memoryMB) {
          bySize[dirtyMiB] = { status: "skipped", reason: `template ${options.template} has ${memoryMB} MiB; ${dirtyMiB} MiB of /dev/shm plus the agent does not fit` };
          continue;
        }
        await source!.commands.run(`dd if=/dev/urandom of=/dev/shm/cubicle-bench-dirty bs=1M count=${dirtyMiB} status=none && sync`, { timeoutMs: 600_000 });
        snapshotId = (await guard("createSnapshot", () => source!.createSnapshot())).snapshotId;
        const once = () => restoreOnce(Sandbox, snapshotId!);
        if (options.warmup > 0) await runPool(options.warmup, options.concurrency, once);
        const { results } = await runMeasured(`restore ${dirtyMiB} MiB c=${options.concurrency}`, options, once);
        const refused = results.find((r): r is PromiseRejectedResult => r.status === "rejected" && r.reason instanceof NotAvailable);
        if (refused) throw refused.reason;
        const ok = results.filter((r): r is PromiseFulfilledResult<{ firstCommandMs: number; apiMs: number }> => r.status === "fulfilled").map((r) => r.value);
        samples[dirtyMiB] = ok;
        bySize[dirtyMiB] = { status: "ok", ...summarizeFields(ok, options.total) };
        errors.push(...results.filter((r): r is PromiseRejectedResult => r.status === "rejected").map((r) => `${dirtyMiB} MiB: ${errorMessage(r.reason)}`));
      } finally {
        await source!.kill().catch(() => false);
        if (snapshotId) await Sandbox.deleteSnapshot(snapshotId).catch(() => false);
      }
    }
    return { status: "ok", samples, errors, summary: { byDirtyMiB: bySize } };
  });
}

/** Cubicle's `POST /sandboxes/{id}/rollback {snapshotID}` (plain HTTP), `-c` sandboxes at once. */
export async function benchRollback(options: BenchOptions, target: BenchTarget): Promise<ScenarioResult> {
  const Sandbox = await loadSandboxSdk(target);
  return orNotAvailable(async () => {
    const sandboxes = await createMany(Sandbox, options.template, options.concurrency);
    const snapshotIds = new Map<string, string>();
    try {
      for (const sandbox of sandboxes) snapshotIds.set(sandbox.sandboxId, (await guard("createSnapshot", () => sandbox.createSnapshot())).snapshotId);
      const result = await rounds(`rollback c=${options.concurrency}`, options, sandboxes, async (sandbox) => {
        // Something to roll back: a file the snapshot does not have.
        await sandbox.files.write("/tmp/cubicle-bench-after-snapshot", "x");
        const t0 = performance.now();
        const res = await callApi(target, "POST", `/sandboxes/${sandbox.sandboxId}/rollback`, { snapshotID: snapshotIds.get(sandbox.sandboxId) });
        const rollbackMs = round2(performance.now() - t0);
        if (res.status === 501 || (res.status === 404 && /route .* not found/i.test(JSON.stringify(res.json)))) {
          throw new NotAvailable(`POST /sandboxes/{id}/rollback answered ${res.status}: ${JSON.stringify(res.json)}`);
        }
        if (res.status >= 300) throw new Error(`rollback answered ${res.status}: ${JSON.stringify(res.json)}`);
        const first = await firstSuccessfulCommand(sandbox, t0);
        if (await sandbox.files.exists("/tmp/cubicle-bench-after-snapshot")) throw new Error("rollback kept a file written after the snapshot");
        return { rollbackMs, firstCommandMs: first.ms };
      });
      return { status: "ok", samples: result.samples, errors: result.errors, summary: summarizeFields(result.samples, options.total * sandboxes.length) };
    } finally {
      await killAll(sandboxes);
      await Promise.all([...snapshotIds.values()].map((id) => Sandbox.deleteSnapshot(id).catch(() => false)));
    }
  });
}

/** `sandbox.fork({count: -c})`: the call, and until every fork answers a command. */
export async function benchFork(options: BenchOptions, target: BenchTarget): Promise<ScenarioResult> {
  const Sandbox = await loadSandboxSdk(target);
  return orNotAvailable(async () => {
    const [source] = await createMany(Sandbox, options.template, 1);
    try {
      const result = await rounds(`fork of ${options.concurrency}`, options, [source!], async (sandbox) => {
        const t0 = performance.now();
        const forks = await guard("fork", () => sandbox.fork({ count: options.concurrency, timeoutMs: 600_000 }));
        const forkApiMs = round2(performance.now() - t0);
        const started = forks.filter((f): f is SandboxInstance => !(f instanceof Error));
        try {
          const failures = forks.filter((f): f is Error => f instanceof Error);
          if (failures.length && failures.every(isNotAvailable)) throw new NotAvailable(`fork: ${errorMessage(failures[0])}`);
          if (failures.length) throw new Error(`${failures.length} of ${forks.length} forks failed: ${errorMessage(failures[0])}`);
          await Promise.all(started.map((f) => firstSuccessfulCommand(f, t0)));
          return { allForksAnswerMs: round2(performance.now() - t0), forkApiMs };
        } finally {
          await killAll(started);
        }
      });
      return { status: "ok", samples: result.samples, errors: result.errors, summary: { forkCount: options.concurrency, ...summarizeFields(result.samples, options.total) } };
    } finally {
      await source!.kill().catch(() => false);
    }
  });
}

/**
 * `pause()` then `Sandbox.connect()` (resume) and the first command after it, `-c` sandboxes
 * at once. Two variants: the default pause (memory kept; Cubicle's hot tier) and
 * `keepMemory: false` (the API's `memory: false`: filesystem only, resume cold-boots).
 */
export async function benchPauseResume(options: BenchOptions, target: BenchTarget): Promise<ScenarioResult> {
  const Sandbox = await loadSandboxSdk(target);
  const variants = { "pause()": { keepMemory: true }, "pause({keepMemory:false})": { keepMemory: false } } as const;
  const summary: Record<string, unknown> = {};
  const samples: Record<string, unknown> = {};
  const errors: string[] = [];
  for (const [name, pauseOpts] of Object.entries(variants)) {
    const sandboxes = await createMany(Sandbox, options.template, options.concurrency);
    try {
      const result = await rounds(`${name} c=${options.concurrency}`, options, sandboxes, async (sandbox) => {
        const pause = await guard("pause", () => timed(() => (pauseOpts.keepMemory ? sandbox.pause() : sandbox.pause({ keepMemory: false }))));
        const t0 = performance.now();
        const resumed = await guard("resume (connect)", () => Sandbox.connect(sandbox.sandboxId, { timeoutMs: 600_000 }));
        const resumeMs = round2(performance.now() - t0);
        const first = await firstSuccessfulCommand(resumed, t0);
        return { pauseMs: pause.ms, resumeMs, resumeToFirstCommandMs: first.ms };
      });
      samples[name] = result.samples;
      summary[name] = { status: "ok", ...summarizeFields(result.samples, options.total * sandboxes.length) };
      errors.push(...result.errors.map((e) => `${name}: ${e}`));
    } catch (err) {
      if (!(err instanceof NotAvailable) && !isNotAvailable(err)) throw err;
      summary[name] = { status: "not available", reason: errorMessage(err) };
    } finally {
      await killAll(sandboxes);
    }
  }
  const available = Object.values(summary).some((v) => (v as { status: string }).status === "ok");
  if (!available) return { status: "not available", reason: Object.values(summary).map((v) => (v as { reason: string }).reason).join("; "), samples: [], errors, summary: { byVariant: summary } };
  return { status: "ok", samples, errors, summary: { byVariant: summary } };
}
