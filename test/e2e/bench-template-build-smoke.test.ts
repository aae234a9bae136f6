/**
 * Keeps `./cubicle bench template-build` from rotting: runs it in-process with tiny counts
 * against a real test server (a real loopback registry, the SDK's Template builder, real
 * sandboxes), checks the JSON has the shape the report reads, that the run cleaned up after
 * itself, and that the report renders its section.
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

before(async () => {
  server = await startTestServer();
  resultsDir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-bench-tb-smoke-"));
  target = benchTargetOf(server);
});

after(async () => {
  await server?.stop();
  if (resultsDir) fs.rmSync(resultsDir, { recursive: true, force: true });
});

const finite = (v: unknown) => typeof v === "number" && Number.isFinite(v) && v >= 0;

test("template-build: cold build with pull and unpack split out, rebuilds, creates, disk per template; everything removed after", async () => {
  const tempBefore = new Set(fs.readdirSync(os.tmpdir()).filter((name) => name.startsWith("cubicle-bench-tb-") || name.startsWith("cbo-registry-")));
  const options = parseBenchArgs(["template-build", "-n", "1", "-w", "0", "--templates", "2", "-o", resultsDir, "--quiet"]);
  const file = await runBench(options, target);
  const result = JSON.parse(fs.readFileSync(file, "utf8")) as BenchResultFile;
  assert.equal(result.schema, "cubicle-bench/1");
  assert.equal(result.scenario, "template-build");
  assert.equal(result.status, "ok", `${result.reason} ${result.errors.join("; ")}`);
  assert.deepEqual(result.errors, []);
  const s = result.summary as Record<string, any>;

  assert.ok(s.image.compressedBytes > 1024 * 1024 && s.image.tarBytes > s.image.compressedBytes, JSON.stringify(s.image));
  assert.equal(s.floors.tarExtractMs.count, 1);
  assert.equal(s.floors.baseColdCreateToFirstCommandMs.count, 1);

  const cold = s.coldBuild;
  for (const key of ["ms", "serverMs", "pullMs", "downloadMs", "unpackMs", "stepsToReadyMs", "pullAndUnpackPerTarFloor", "msPerTarFloorPlusBaseCreate"]) assert.ok(finite(cold[key]), `coldBuild.${key}: ${JSON.stringify(cold)}`);
  assert.equal(cold.downloadMs + cold.unpackMs, cold.pullMs, "download and unpack split the pull");
  assert.ok(cold.pullMs < cold.ms, "the pull is part of the build");
  assert.equal(cold.imageBasesAdded, 1, "one image base for the one image");

  assert.equal(s.cachedRebuild.ms.count, 1);
  assert.ok(s.cachedRebuild.ms.p50 < cold.ms, "a cached rebuild is faster than the cold build");
  assert.equal(s.changedLastStep.ms.count, 1);
  assert.ok(finite(s.changedLastStep.p50PerBaseCreate));
  assert.equal(s.startCmdTemplateBuild.startCmdRunningInSandbox, true);
  for (const key of ["base", "builtTemplate", "startCmdTemplate"]) assert.equal(s.createToFirstCommand[key].count, 1, key);
  assert.ok(finite(s.createToFirstCommand.startCmdTemplateP50PerBase));

  assert.equal(s.disk.status, "ok", JSON.stringify(s.disk));
  assert.equal(s.disk.templates, 2);
  assert.equal(s.disk.newLayerImages, 2, "one layer image per template's RUN step");
  assert.equal(s.disk.imageBasesAdded, 0, "a template from a template pulls nothing");
  assert.ok(finite(s.disk.poolBytesPerTemplate) && s.disk.layerExclusiveBytes.count === 2);
  assert.equal(s.afterDelete.status, "ok");

  // Cleanup: the run's templates, its image base and layer blob, its registry and temp dirs are gone.
  const templates = await server.api("GET", "/templates");
  assert.deepEqual((templates.json as { aliases: string[] }[]).flatMap((t) => t.aliases).filter((a) => a.startsWith("bench-tb-")), []);
  const imagesDir = path.join(server.stateDir, "images");
  assert.deepEqual(fs.existsSync(imagesDir) ? fs.readdirSync(imagesDir).filter((n) => /^[a-f0-9]{64}$/.test(n)) : [], []);
  const blobsDir = path.join(server.stateDir, "image-blobs", "sha256");
  assert.deepEqual(fs.existsSync(blobsDir) ? fs.readdirSync(blobsDir) : [], [], "the run's layer blob is removed");
  const tempAfter = fs.readdirSync(os.tmpdir()).filter((name) => (name.startsWith("cubicle-bench-tb-") || name.startsWith("cbo-registry-")) && !tempBefore.has(name));
  assert.deepEqual(tempAfter, []);
  const registryPort = Number(new URL(`http://${String(s.image.reference).split("/")[0]}`).port);
  await assert.rejects(fetch(`http://127.0.0.1:${registryPort}/v2/`), "the registry is stopped");

  const reportDir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-bench-tb-report-"));
  try {
    const text = fs.readFileSync(writeReport({ resultsDir, reportDir }).reportPath, "utf8");
    assert.match(text, /## Template builds/);
    assert.ok(text.includes(path.basename(file)), "the section names its file");
    assert.match(text, /fully cached rebuild/);
    assert.match(text, /Disk per additional template: 2 templates/);
  } finally {
    fs.rmSync(reportDir, { recursive: true, force: true });
  }
});
