/**
 * `./cubicle bench <scenario>`: drives a running Cubicle server through the official `e2b` SDKs
 * and writes a JSON result (machine, git revision, parameters, raw samples, summary) under
 * bench/results/. `./cubicle bench report` turns the newest results into bench/REPORT.md.
 */
import fs from "node:fs";
import path from "node:path";
import type { CubicleConfig } from "../shared/config.js";
import { CubicleError } from "../shared/cubicle-error.js";
import { describeMachine } from "./machine.js";
import { parseBenchArgs, SCENARIO_NAMES, type BenchOptions } from "./options.js";
import { writeReport } from "./report.js";
import type { BenchResultFile, Scenario } from "./result.js";
import { benchBaseline } from "./scenarios/baseline.js";
import { benchCreate } from "./scenarios/create.js";
import { benchDensity } from "./scenarios/density.js";
import { benchDensityIdle } from "./scenarios/density-idle.js";
import { benchFork, benchPauseResume, benchRestore, benchRestoreSize, benchRollback, benchSnapshot } from "./scenarios/lifecycle.js";
import { benchNetwork } from "./scenarios/network.js";
import { benchExec, benchFiles, benchRunCode } from "./scenarios/round-trips.js";
import { benchRuntimes } from "./scenarios/runtimes.js";
import { benchStorage } from "./scenarios/storage.js";
import { benchTemplateBuild } from "./scenarios/template-build.js";
import { errorMessage } from "./run-helpers.js";
import { targetFromConfig, type BenchTarget } from "./target.js";

export { parseBenchArgs, type BenchOptions } from "./options.js";
export { writeReport } from "./report.js";
export type { BenchResultFile } from "./result.js";

const scenarios: Record<(typeof SCENARIO_NAMES)[number], Scenario> = {
  create: benchCreate,
  density: benchDensity,
  "density-idle": benchDensityIdle,
  exec: benchExec,
  files: benchFiles,
  runcode: benchRunCode,
  snapshot: benchSnapshot,
  restore: benchRestore,
  "restore-size": benchRestoreSize,
  rollback: benchRollback,
  fork: benchFork,
  "pause-resume": benchPauseResume,
  baseline: benchBaseline,
  network: benchNetwork,
  "template-build": benchTemplateBuild,
  runtimes: benchRuntimes,
  storage: benchStorage,
};

/** The result file name: scenario, its shape, and the start time (sorts by time within a shape). */
function resultFileName(options: BenchOptions, startedAt: Date): string {
  const mode = options.scenario === "create" && options.mode !== "create-delete" ? `-${options.mode}` : "";
  return `${options.scenario}${mode}-c${options.concurrency}-n${options.total}-${startedAt.toISOString().replace(/[:.]/g, "-")}.json`;
}

/** Runs one scenario against `target` and writes its JSON result; returns the file's path. */
export async function runBench(options: BenchOptions, target: BenchTarget): Promise<string> {
  const scenario = scenarios[options.scenario as keyof typeof scenarios];
  if (!scenario) throw new CubicleError("invalid_argument", `unknown scenario "${options.scenario}"; available: ${SCENARIO_NAMES.join(", ")}, report`);
  const health = await fetch(`${target.apiUrl}/health`).catch((err: Error) => err);
  if (options.scenario !== "baseline" && (health instanceof Error || !health.ok)) {
    throw new CubicleError("unavailable", `no Cubicle server answers at ${target.apiUrl}; start one with ./cubicle up (or set CUBICLE_PORT)`);
  }
  // The warm-pool levels decide which create path a run measures: record them with the numbers.
  const pools = options.scenario === "baseline" ? undefined : await fetch(`${target.apiUrl}/pools`, { headers: { "x-api-key": target.apiKey } }).then((r) => (r.ok ? r.json() : undefined), () => undefined);
  const startedAt = new Date();
  // A scenario whose setup breaks still leaves a record: the report shows the failure.
  const result = await scenario(options, target).catch((err: unknown) => ({
    status: "failed" as const,
    reason: errorMessage(err),
    samples: [],
    errors: [errorMessage(err)],
    summary: {},
  }));
  const { outDir, reportDir: _reportDir, progress: _progress, ...parameters } = options;
  const file: BenchResultFile = {
    schema: "cubicle-bench/1",
    scenario: options.scenario,
    startedAt: startedAt.toISOString(),
    finishedAt: new Date().toISOString(),
    machine: describeMachine(),
    target: { apiUrl: target.apiUrl, pools },
    parameters,
    ...result,
  };
  fs.mkdirSync(outDir, { recursive: true });
  const filePath = path.join(outDir, resultFileName(options, startedAt));
  fs.writeFileSync(filePath, JSON.stringify(file, null, 2) + "\n");
  return filePath;
}

/** `./cubicle bench ...` as the CLI calls it; resolves to the exit code. */
export async function runBenchCommand(args: string[], config: CubicleConfig, apiKey: string): Promise<number> {
  const options = parseBenchArgs(args[0] === "report" ? ["report", ...args.slice(1)] : args);
  if (options.scenario === "report") {
    const written = writeReport({ resultsDir: options.outDir, reportDir: options.reportDir });
    process.stdout.write(`report: ${written.reportPath} (${written.filesUsed.length} result files, ${written.charts.length} charts)\n`);
    return 0;
  }
  const filePath = await runBench(options, targetFromConfig(config, apiKey));
  const { status, reason, summary, errors } = JSON.parse(fs.readFileSync(filePath, "utf8")) as BenchResultFile;
  if (status !== "ok") process.stdout.write(`${options.scenario}: ${status}: ${reason}\n`);
  else process.stdout.write(`${JSON.stringify(summary, null, 2)}\n`);
  if (errors.length) process.stdout.write(`${errors.length} errors, first: ${errors[0]}\n`);
  process.stdout.write(`result: ${filePath}\n`);
  return status === "failed" ? 1 : 0;
}
