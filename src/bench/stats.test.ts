import assert from "node:assert/strict";
import { test } from "node:test";
import { percentile, summarize } from "./stats.js";

test("nearest-rank percentiles and summary", () => {
  const samples = Array.from({ length: 100 }, (_, i) => i + 1);
  assert.equal(percentile(samples, 50), 50);
  assert.equal(percentile(samples, 99), 99);
  assert.equal(percentile(samples, 100), 100);
  const s = summarize([5, 1, 3]);
  assert.deepEqual(s, { count: 3, avg: 3, min: 1, p50: 3, p90: 5, p95: 5, p99: 5, max: 5 });
});
