import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { parseBenchArgs } from "./options.js";
import { parseSmapsRollup } from "./process-memory.js";
import { networkHostsFromEnv } from "./scenarios/network.js";
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

test("network options and fake-host coordinates: defaults, flags, and refusals that name the variable", () => {
  const o = parseBenchArgs(["network", "--download-mib", "64", "--rounds", "4", "--pairs", "10", "--cold-pairs", "0", "--updates", "50"], {}, false);
  assert.deepEqual([o.total, o.warmup, o.downloadMiB, o.rounds, o.createPairs, o.coldPairs, o.updates], [300, 5, 64, 4, 10, 0, 50]);
  assert.throws(() => parseBenchArgs(["network", "--rounds", "x"]), /whole number/);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cbb-opts-"));
  try {
    const ca = path.join(dir, "ca.pem");
    fs.writeFileSync(ca, "x");
    const env = { CUBICLE_BENCH_NET_HTTP: "http.fake.test=198.18.3.10", CUBICLE_BENCH_NET_HTTPS: "https.fake.test=198.18.3.11", CUBICLE_BENCH_NET_SOCKS: "198.18.3.108:1080", CUBICLE_BENCH_NET_INTERFACE: "cbi0123abcdh", CUBICLE_BENCH_NET_CA_FILE: ca };
    assert.deepEqual(networkHostsFromEnv(env).socks, { address: "198.18.3.108", port: 1080 });
    assert.throws(() => networkHostsFromEnv({ ...env, CUBICLE_BENCH_NET_HTTP: undefined }), /CUBICLE_BENCH_NET_HTTP is not set/);
    for (const [key, value] of [["CUBICLE_BENCH_NET_HTTP", "http.fake.test=999.1.1.1"], ["CUBICLE_BENCH_NET_HTTPS", "x=1.2.3.4=5"], ["CUBICLE_BENCH_NET_HTTP", "bad name=1.2.3.4"], ["CUBICLE_BENCH_NET_SOCKS", "1.2.3.4:99999"], ["CUBICLE_BENCH_NET_SOCKS", "$(reboot):1"], ["CUBICLE_BENCH_NET_INTERFACE", "eth0; rm -rf /"], ["CUBICLE_BENCH_NET_CA_FILE", path.join(dir, "missing.pem")]]) {
      assert.throws(() => networkHostsFromEnv({ ...env, [key]: value }), new RegExp(key), `${key}=${value}`);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
