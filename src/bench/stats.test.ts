import assert from "node:assert/strict";
import { test } from "node:test";
import { pairedRatio, percentile, summarize } from "./stats.js";

test("nearest-rank percentiles and summary", () => {
  const samples = Array.from({ length: 100 }, (_, i) => i + 1);
  assert.equal(percentile(samples, 50), 50);
  assert.equal(percentile(samples, 99), 99);
  assert.equal(percentile(samples, 100), 100);
  const s = summarize([5, 1, 3]);
  assert.deepEqual(s, { count: 3, avg: 3, min: 1, p50: 3, p90: 5, p95: 5, p99: 5, max: 5 });
});

test("pairedRatio: ratio of medians, per-pair median, and a bootstrap interval around it", () => {
  const control = Array.from({ length: 40 }, (_, i) => 100 + (i % 7));
  const same = pairedRatio(control, control);
  assert.equal(same.ratio, 1);
  assert.deepEqual(same.ci95, [1, 1]);
  const slower = pairedRatio(control, control.map((v, i) => v * 1.1 + (i % 3)));
  assert.ok(slower.ratio > 1.1 && slower.ratio < 1.15, JSON.stringify(slower));
  assert.ok(slower.ci95[0] <= slower.ratio && slower.ratio <= slower.ci95[1], JSON.stringify(slower));
  assert.ok(slower.ci95[0] > 1.05, "a 10 % slowdown is told apart from none");
  assert.deepEqual(pairedRatio(control, control.map((v) => v * 2), 500, 7), pairedRatio(control, control.map((v) => v * 2), 500, 7), "seeded: reproducible");
  assert.throws(() => pairedRatio([1, 2], [1]), RangeError);
  assert.ok(Number.isNaN(pairedRatio([], []).ratio));
});
