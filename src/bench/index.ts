/**
 * `./cubicle bench <scenario>`: drives a running Cubicle server through the official `e2b` SDK
 * and writes a JSON result (machine, git revision, parameters, raw samples, summary).
 */
import fs from "node:fs";
import path from "node:path";
import type { CubicleConfig } from "../shared/config.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { describeMachine, memAvailableBytes, memFreeBytes } from "./machine.js";
import { summarize } from "./stats.js";

export interface BenchOptions {
  scenario: string;
  concurrency: number;
  total: number;
  warmup: number;
  template: string;
  /** Where result JSON files go. */
  outDir: string;
  /** Print progress lines (off in CI). */
  progress: boolean;
}

export function parseBenchArgs(args: string[]): BenchOptions {
  const [scenario, ...rest] = args;
  if (!scenario) throw new CubicleError("invalid_argument", "usage: ./cubicle bench create|density [-c N] [-n N] [-w N] [-t TEMPLATE] [-o DIR]");
  const options: BenchOptions = {
    scenario,
    concurrency: 1,
    total: 20,
    warmup: 2,
    template: "base",
    outDir: path.resolve("bench/results"),
    progress: process.stdout.isTTY === true && process.env.CI !== "true",
  };
  for (let i = 0; i < rest.length; i++) {
    const flag = rest[i];
    const value = rest[i + 1];
    const int = () => {
      const n = Number(value);
      if (!Number.isInteger(n) || n < 0) throw new CubicleError("invalid_argument", `${flag} takes a whole number`);
      i++;
      return n;
    };
    if (flag === "-c") options.concurrency = Math.max(1, int());
    else if (flag === "-n") options.total = Math.max(1, int());
    else if (flag === "-w") options.warmup = int();
    else if (flag === "-t") (options.template = value ?? "base"), i++;
    else if (flag === "-o") (options.outDir = path.resolve(value ?? ".")), i++;
    else if (flag === "--quiet") options.progress = false;
    else throw new CubicleError("invalid_argument", `unknown bench option ${flag}`);
  }
  return options;
}

interface SdkTarget {
  apiUrl: string;
  apiKey: string;
}

async function loadSdk(target: SdkTarget) {
  process.env.E2B_API_URL = target.apiUrl;
  process.env.E2B_SANDBOX_URL = target.apiUrl;
  process.env.E2B_API_KEY = target.apiKey;
  process.env.E2B_DOMAIN = process.env.E2B_DOMAIN ?? "cubicle.local";
  const { Sandbox } = await import("e2b");
  return Sandbox;
}

/** Runs `worker` for `total` items with at most `concurrency` at once. */
async function pool<T>(total: number, concurrency: number, worker: (index: number) => Promise<T>): Promise<PromiseSettledResult<T>[]> {
  const results: PromiseSettledResult<T>[] = new Array(total);
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(concurrency, total) }, async () => {
      while (next < total) {
        const index = next++;
        try {
          results[index] = { status: "fulfilled", value: await worker(index) };
        } catch (reason) {
          results[index] = { status: "rejected", reason };
        }
      }
    }),
  );
  return results;
}

/** create → first successful `commands.run('true')`, then kill; warm-up rounds discarded. */
async function benchCreate(options: BenchOptions, target: SdkTarget) {
  const Sandbox = await loadSdk(target);
  const once = async () => {
    const t0 = performance.now();
    const sandbox = await Sandbox.create(options.template, { timeoutMs: 120_000 });
    const apiMs = performance.now() - t0;
    const run = await sandbox.commands.run("true");
    const firstCommandMs = performance.now() - t0;
    if (run.exitCode !== 0) throw new Error(`true exited ${run.exitCode}`);
    await sandbox.kill();
    return { apiMs, firstCommandMs };
  };
  if (options.warmup > 0) await pool(options.warmup, options.concurrency, once);
  const wallStart = performance.now();
  let done = 0;
  const results = await pool(options.total, options.concurrency, async () => {
    const sample = await once();
    done++;
    if (options.progress) process.stderr.write(`\r${done}/${options.total} done`);
    return sample;
  });
  const wallMs = performance.now() - wallStart;
  if (options.progress) process.stderr.write("\n");
  const ok = results.filter((r): r is PromiseFulfilledResult<{ apiMs: number; firstCommandMs: number }> => r.status === "fulfilled").map((r) => r.value);
  const errors = results.filter((r): r is PromiseRejectedResult => r.status === "rejected").map((r) => String(r.reason));
  return {
    samples: ok,
    errors,
    summary: {
      successRate: ok.length / options.total,
      createToFirstCommandMs: summarize(ok.map((s) => s.firstCommandMs)),
      createApiMs: summarize(ok.map((s) => s.apiMs)),
      wallMs: Math.round(wallMs),
      amortizedMsPerSandbox: Math.round((wallMs / options.total) * 100) / 100,
    },
  };
}

/** Idle sandboxes vs host memory: MemAvailable delta ÷ count after each batch. */
async function benchDensity(options: BenchOptions, target: SdkTarget) {
  const Sandbox = await loadSdk(target);
  const safetyFloorBytes = 2 * 2 ** 30;
  const batch = Math.max(1, options.concurrency);
  const settle = () => new Promise((r) => setTimeout(r, 3000));
  await settle();
  const baseline = memAvailableBytes();
  const sandboxes: { kill(): Promise<boolean> }[] = [];
  const baselineFree = memFreeBytes();
  const points: { sandboxes: number; memAvailableBytes: number; perSandboxMiB: number; memFreeBytes: number; perSandboxFreeMiB: number }[] = [];
  let stoppedBecause = "reached the requested count";
  try {
    while (sandboxes.length < options.total) {
      if (memAvailableBytes() < safetyFloorBytes) {
        stoppedBecause = "safety stop: less than 2 GiB of memory available";
        break;
      }
      const count = Math.min(batch, options.total - sandboxes.length);
      const created = await Promise.all(Array.from({ length: count }, () => Sandbox.create(options.template, { timeoutMs: 3_600_000 })));
      sandboxes.push(...created);
      await settle();
      const available = memAvailableBytes();
      const free = memFreeBytes();
      const perSandboxMiB = (baseline - available) / sandboxes.length / 2 ** 20;
      const perSandboxFreeMiB = (baselineFree - free) / sandboxes.length / 2 ** 20;
      points.push({
        sandboxes: sandboxes.length,
        memAvailableBytes: available,
        perSandboxMiB: Math.round(perSandboxMiB * 100) / 100,
        memFreeBytes: free,
        perSandboxFreeMiB: Math.round(perSandboxFreeMiB * 100) / 100,
      });
      if (options.progress) process.stderr.write(`\r${sandboxes.length} sandboxes, ${perSandboxMiB.toFixed(1)} MiB each`);
    }
  } finally {
    if (options.progress) process.stderr.write("\n");
    await Promise.all(sandboxes.map((s) => s.kill().catch(() => false)));
  }
  return { samples: points, errors: [], summary: { baselineMemAvailableBytes: baseline, baselineMemFreeBytes: baselineFree, stoppedBecause, final: points[points.length - 1] } };
}

const scenarios: Record<string, (options: BenchOptions, target: SdkTarget) => Promise<{ samples: unknown; errors: string[]; summary: unknown }>> = {
  create: benchCreate,
  density: benchDensity,
};

/** Runs one scenario against the server at `apiUrl` and writes its JSON result; returns the file. */
export async function runBench(options: BenchOptions, config: CubicleConfig, apiKey: string): Promise<string> {
  const scenario = scenarios[options.scenario];
  if (!scenario) throw new CubicleError("invalid_argument", `unknown scenario "${options.scenario}"; available: ${Object.keys(scenarios).join(", ")}`);
  const host = config.host === "0.0.0.0" ? "127.0.0.1" : config.host;
  const target = { apiUrl: `http://${host}:${config.port}`, apiKey };
  const startedAt = new Date();
  const result = await scenario(options, target);
  const file = path.join(options.outDir, `${options.scenario}-c${options.concurrency}-n${options.total}-${startedAt.toISOString().replace(/[:.]/g, "-")}.json`);
  fs.mkdirSync(options.outDir, { recursive: true });
  const { outDir: _outDir, progress: _progress, ...parameters } = options;
  fs.writeFileSync(file, JSON.stringify({ scenario: options.scenario, startedAt: startedAt.toISOString(), machine: describeMachine(), parameters, ...result }, null, 2) + "\n");
  return file;
}

/** `./cubicle bench ...` as the CLI calls it; resolves to the exit code. */
export async function runBenchCommand(args: string[], config: CubicleConfig, apiKey: string): Promise<number> {
  const file = await runBench(parseBenchArgs(args), config, apiKey);
  const { summary } = JSON.parse(fs.readFileSync(file, "utf8"));
  process.stdout.write(`${JSON.stringify(summary, null, 2)}\nresult: ${file}\n`);
  return 0;
}
