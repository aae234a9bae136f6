import assert from "node:assert/strict";
import { test } from "node:test";
import { parseBenchArgs } from "./options.js";
import { parseSmapsRollup } from "./process-memory.js";
import { niceTicks, renderLineChart } from "./svg-chart.js";

test("bench options: flags, per-scenario defaults, quiet in CI", () => {
  const o = parseBenchArgs(["create", "-c", "10", "-n", "50", "-m", "create-only", "-o", "/tmp/r"], { CI: "true" }, true);
  assert.equal(o.concurrency, 10);
  assert.equal(o.mode, "create-only");
  assert.equal(o.warmup, 2);
  assert.equal(o.progress, false);
  assert.equal(o.reportDir, "/tmp");
  assert.equal(parseBenchArgs(["runcode"], {}, true).template, "code-interpreter-v1");
  assert.deepEqual(parseBenchArgs(["snapshot", "-s", "0,64"], {}, false).dirtyMiB, [0, 64]);
  assert.throws(() => parseBenchArgs(["create", "-m", "sometimes"]), /create-delete or create-only/);
});

test("smaps_rollup: PSS and private memory in bytes", () => {
  const m = parseSmapsRollup("Rss:               40000 kB\nPss:               12000 kB\nPrivate_Clean:       100 kB\nPrivate_Dirty:      7000 kB\n");
  assert.deepEqual(m, { rssBytes: 40000 * 1024, pssBytes: 12000 * 1024, privateBytes: 7100 * 1024 });
});

test("svg chart: round ticks and one polyline per series", () => {
  assert.deepEqual(niceTicks(0, 50), [0, 10, 20, 30, 40, 50]);
  const svg = renderLineChart({ title: "a < b", xLabel: "x", yLabel: "y", series: [{ name: "p50", points: [[1, 5], [10, 8]] }] });
  assert.match(svg, /^<svg /);
  assert.equal(svg.match(/<polyline/g)?.length, 1);
  assert.ok(svg.includes("a &lt; b"));
});

test("bench create --background: live sandboxes kept during the measured creates; not a count, refused", () => {
  assert.equal(parseBenchArgs(["create", "--background", "300"], {}, false).background, 300);
  assert.equal(parseBenchArgs(["create"], {}, false).background, 0);
  assert.throws(() => parseBenchArgs(["create", "--background", "-1"]), /--background takes a whole number/);
  assert.throws(() => parseBenchArgs(["create", "--background", "many"]), /--background takes a whole number/);
  assert.throws(() => parseBenchArgs(["create", "--background"]), /--background needs a value/);
});
