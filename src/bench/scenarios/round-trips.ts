import type { BenchOptions } from "../options.js";
import { Progress } from "../progress.js";
import type { ScenarioResult } from "../result.js";
import { errorMessage, fulfilled, rejectedMessages, round2, timed } from "../run-helpers.js";
import { runPool } from "../../shared/pool.js";
import { summarize } from "../stats.js";
import { loadCodeInterpreterSdk, loadSandboxSdk, type BenchTarget } from "../target.js";

/** Times `op` `-w` + `-n` times at concurrency `-c`, warm-ups discarded, with live progress. */
async function measure(label: string, options: BenchOptions, op: () => Promise<void>) {
  if (options.warmup > 0) await runPool(options.warmup, options.concurrency, op);
  const progress = new Progress(label, options.total, options.progress);
  const results = await runPool(options.total, options.concurrency, async () => {
    try {
      const { ms } = await timed(op);
      progress.sample(ms);
      return ms;
    } catch (err) {
      progress.error(errorMessage(err));
      throw err;
    }
  });
  progress.finish();
  const samples = fulfilled(results);
  return { samples, errors: rejectedMessages(results), summary: { successRate: samples.length / options.total, ...summarize(samples) } };
}

/** `commands.run('true')` round trip on one sandbox. */
export async function benchExec(options: BenchOptions, target: BenchTarget): Promise<ScenarioResult> {
  const Sandbox = await loadSandboxSdk(target);
  const sandbox = await Sandbox.create(options.template, { timeoutMs: 600_000 });
  try {
    const result = await measure(`exec c=${options.concurrency}`, options, async () => {
      const run = await sandbox.commands.run("true");
      if (run.exitCode !== 0) throw new Error(`true exited ${run.exitCode}`);
    });
    return { status: "ok", samples: { commandMs: result.samples }, errors: result.errors, summary: { commandMs: result.summary } };
  } finally {
    await sandbox.kill().catch(() => false);
  }
}

/** `files.write` and `files.read` of 1 KiB and 1 MiB on one sandbox. */
export async function benchFiles(options: BenchOptions, target: BenchTarget): Promise<ScenarioResult> {
  const Sandbox = await loadSandboxSdk(target);
  const sandbox = await Sandbox.create(options.template, { timeoutMs: 600_000 });
  const samples: Record<string, number[]> = {};
  const summary: Record<string, unknown> = {};
  const errors: string[] = [];
  try {
    for (const [name, bytes] of [["1KiB", 1024], ["1MiB", 2 ** 20]] as const) {
      // Printable content: the default text read decodes UTF-8.
      const content = "x".repeat(bytes - 1) + "\n";
      const file = `/tmp/cubicle-bench-${name}`;
      let n = 0;
      const write = await measure(`files write ${name}`, options, async () => {
        await sandbox.files.write(`${file}-${n++ % 4}`, content);
      });
      await sandbox.files.write(file, content);
      const read = await measure(`files read ${name}`, options, async () => {
        const text = await sandbox.files.read(file);
        if (text.length !== bytes) throw new Error(`read ${text.length} bytes, wrote ${bytes}`);
      });
      samples[`write${name}Ms`] = write.samples;
      samples[`read${name}Ms`] = read.samples;
      summary[`write${name}Ms`] = write.summary;
      summary[`read${name}Ms`] = read.summary;
      errors.push(...write.errors, ...read.errors);
    }
    return { status: "ok", samples, errors, summary };
  } finally {
    await sandbox.kill().catch(() => false);
  }
}

/** `runCode('1+1')` round trip through `@e2b/code-interpreter`, plus the first runCode after create. */
export async function benchRunCode(options: BenchOptions, target: BenchTarget): Promise<ScenarioResult> {
  const Sandbox = await loadCodeInterpreterSdk(target);
  const t0 = performance.now();
  const sandbox = await Sandbox.create(options.template, { timeoutMs: 600_000 });
  try {
    const createApiMs = round2(performance.now() - t0);
    const first = await sandbox.runCode("1+1");
    const createToFirstRunCodeMs = round2(performance.now() - t0);
    if (first.error || first.text !== "2") throw new Error(`first runCode('1+1') gave ${JSON.stringify(first.error ?? first.text)}`);
    const result = await measure(`runcode c=${options.concurrency}`, options, async () => {
      const execution = await sandbox.runCode("1+1");
      if (execution.error || execution.text !== "2") throw new Error(`runCode('1+1') gave ${JSON.stringify(execution.error ?? execution.text)}`);
    });
    return {
      status: "ok",
      samples: { runCodeMs: result.samples },
      errors: result.errors,
      summary: { createApiMs, createToFirstRunCodeMs, runCodeMs: result.summary },
    };
  } finally {
    await sandbox.kill().catch(() => false);
  }
}
