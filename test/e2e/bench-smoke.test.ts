/**
 * Keeps `./cubicle bench` from rotting: runs the harness in-process with tiny counts against a
 * real test server (create, exec, files, density, baseline), checks the JSON results have the
 * shape the report reads, and renders the report from them.
 */
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";
import { parseBenchArgs, runBench, writeReport, type BenchResultFile } from "../../src/bench/index.js";
import type { BenchTarget } from "../../src/bench/target.js";
import { benchTargetOf, startTestServer, type TestServer } from "./harness.js";

let server: TestServer;
let target: BenchTarget;
let resultsDir: string;
const written = new Map<string, BenchResultFile>();

before(async () => {
  server = await startTestServer();
  resultsDir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-bench-smoke-"));
  target = benchTargetOf(server);
});

after(async () => {
  await server?.stop();
  if (resultsDir) fs.rmSync(resultsDir, { recursive: true, force: true });
});

async function bench(args: string): Promise<BenchResultFile> {
  const options = parseBenchArgs([...args.split(" "), "-o", resultsDir, "--quiet"]);
  const file = await runBench(options, target);
  const result = JSON.parse(fs.readFileSync(file, "utf8")) as BenchResultFile;
  written.set(path.basename(file), result);
  return result;
}

function assertLatencySummary(value: unknown, count: number): void {
  const s = value as Record<string, number>;
  assert.equal(s.count, count, JSON.stringify(s));
  for (const key of ["avg", "min", "p50", "p90", "p95", "p99", "max"]) assert.ok(Number.isFinite(s[key]) && s[key]! >= 0, `${key} in ${JSON.stringify(s)}`);
  assert.ok(s.min! <= s.p50! && s.p50! <= s.p99! && s.p99! <= s.max!, JSON.stringify(s));
}

function assertEnvelope(result: BenchResultFile, scenario: string): void {
  assert.equal(result.schema, "cubicle-bench/1");
  assert.equal(result.scenario, scenario);
  assert.equal(result.status, "ok", `${scenario}: ${result.reason} ${result.errors.join("; ")}`);
  assert.deepEqual(result.errors, []);
  assert.ok(Date.parse(result.startedAt) <= Date.parse(result.finishedAt));
  assert.equal(typeof result.machine.gitRevision, "string");
  assert.ok(Number(result.machine.cores) > 0);
  assert.equal(result.parameters.scenario, scenario);
}

test("create: every sandbox answers its first command, and the summary carries the percentiles", async () => {
  const result = await bench("create -n 3 -w 0 -c 2");
  assertEnvelope(result, "create");
  assert.equal(result.summary.successRate, 1);
  assertLatencySummary(result.summary.createToFirstCommandMs, 3);
  assertLatencySummary(result.summary.createApiMs, 3);
  assert.ok(Number(result.summary.amortizedMsPerSandbox) > 0);
  assert.equal((result.samples as unknown[]).length, 3);
});

test("exec and files: round trips on one sandbox", async () => {
  const exec = await bench("exec -n 5 -w 1");
  assertEnvelope(exec, "exec");
  assertLatencySummary(exec.summary.commandMs, 5);
  const files = await bench("files -n 2 -w 0");
  assertEnvelope(files, "files");
  for (const key of ["write1KiBMs", "read1KiBMs", "write1MiBMs", "read1MiBMs"]) assertLatencySummary(files.summary[key], 2);
});

test("density: memory per sandbox and the agents' own memory after each batch", async () => {
  const result = await bench("density -n 2 -c 2 --settle-ms 300");
  assertEnvelope(result, "density");
  const points = result.samples as { sandboxes: number; perSandboxMiB: number; perSandboxFreeMiB: number; agents?: { measured: number; avgPssMiB: number } }[];
  assert.equal(points.length, 1);
  assert.equal(points[0]!.sandboxes, 2);
  assert.ok(Number.isFinite(points[0]!.perSandboxMiB) && Number.isFinite(points[0]!.perSandboxFreeMiB));
  assert.equal(points[0]!.agents?.measured, 2, "the PSS cross-check finds both agents through runc");
  assert.ok(points[0]!.agents!.avgPssMiB > 1, "an agent is a Node process: more than 1 MiB of PSS");
  const list = await server.api("GET", "/v2/sandboxes?state=running,paused");
  assert.deepEqual(list.json, [], "density kills its sandboxes");
});

test("baseline: raw runc and fork+exec floors, and no benchbase- container left", async () => {
  const result = await bench("baseline -n 2");
  assertEnvelope(result, "baseline");
  const summary = result.summary as Record<string, { status: string; totalMs?: unknown }>;
  assert.equal(summary.runc!.status, "ok", JSON.stringify(summary.runc));
  assertLatencySummary(summary.runc!.totalMs, 2);
  assert.equal(summary.spawn!.status, "ok");
  assertLatencySummary(summary.spawn!.totalMs, 2);
  assert.ok(["ok", "not available"].includes(summary.criu!.status), JSON.stringify(summary.criu));
  const runcList = JSON.parse(await import("node:child_process").then((cp) => cp.execFileSync("runc", ["list", "--format", "json"], { encoding: "utf8" })) || "null") as { id: string }[] | null;
  assert.deepEqual((runcList ?? []).filter((c) => c.id.startsWith(`benchbase-${process.pid}`)), []);
});

test("report: renders every result into REPORT.md with charts, naming the files", () => {
  assert.ok(written.size >= 5, "the scenarios above wrote their results");
  const reportDir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-bench-report-"));
  try {
    const output = writeReport({ resultsDir, reportDir });
    const text = fs.readFileSync(output.reportPath, "utf8");
    for (const heading of ["## Machine", "## Floor", "## Create", "## Density", "## Round trips", "## Comparison with published figures"]) assert.ok(text.includes(heading), heading);
    for (const file of written.keys()) assert.ok(text.includes(file), `REPORT.md names ${file}`);
    assert.match(text, /CubeSandbox \(16-core PVM server\)/);
    assert.match(text, /no comparable published figure/);
    assert.ok(output.charts.length >= 2);
    for (const chart of output.charts) assert.match(fs.readFileSync(chart, "utf8"), /^<svg [^>]*>[\s\S]*(<polyline|<circle)/);
  } finally {
    fs.rmSync(reportDir, { recursive: true, force: true });
  }
});
