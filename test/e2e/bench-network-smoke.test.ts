/**
 * Keeps `bench network` from rotting: runs it in-process with tiny counts against the fake
 * internet and a real test server (a warm pool of one), checks every path was measured with its
 * ratio to the floor, that header injection and SOCKS5 really were in their paths, that the
 * floor namespace is gone afterwards, and that the report renders a network section.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";
import { parseBenchArgs, runBench, writeReport, type BenchResultFile } from "../../src/bench/index.js";
import { NETWORK_PATHS } from "../../src/bench/scenarios/network.js";
import { startFakeInternet, type FakeInternet } from "../support/fake-internet.js";
import { startTestServer, type TestServer } from "./harness.js";

let inet: FakeInternet;
let server: TestServer;
let resultsDir: string;

before(async () => {
  inet = await startFakeInternet();
  server = await startTestServer({
    extraEnv: { CUBICLE_DNS_UPSTREAM: `${inet.dns.address}:${inet.dns.port}`, CUBICLE_EGRESS_CA_FILE: inet.caCertificateFile, CUBICLE_POOL_SIZE: "base=1" },
  });
  resultsDir = fs.mkdtempSync(path.join(os.tmpdir(), "cbb-bench-network-smoke-"));
});

after(async () => {
  await server?.stop();
  await inet?.close();
  if (resultsDir) fs.rmSync(resultsDir, { recursive: true, force: true });
});

test("network: every path against the floor, updateNetwork, paired creates, and a report section", async () => {
  for (const address of [inet.http.address, inet.https.address, inet.socks!.address]) await inet.assertRouted(address);
  Object.assign(process.env, {
    CUBICLE_BENCH_NET_HTTP: `${inet.http.name}=${inet.http.address}`,
    CUBICLE_BENCH_NET_HTTPS: `${inet.https.name}=${inet.https.address}`,
    CUBICLE_BENCH_NET_SOCKS: `${inet.socks!.address}:${inet.socks!.port}`,
    CUBICLE_BENCH_NET_INTERFACE: inet.hostInterface,
    CUBICLE_BENCH_NET_CA_FILE: inet.caCertificateFile,
  });
  const namespacesBefore = execFileSync("ip", ["netns", "list"], { encoding: "utf8" });
  const options = parseBenchArgs(["network", "-n", "6", "-w", "1", "--rounds", "2", "--download-mib", "2", "--pairs", "1", "--cold-pairs", "1", "--updates", "3", "-o", path.join(resultsDir, "network"), "--quiet"]);
  const file = await runBench(options, { apiUrl: server.url, apiKey: server.apiKey, stateDir: server.stateDir, runDir: server.runDir, templateDir: server.env.CUBICLE_TEMPLATE_DIR!, runcPath: "runc", domain: "cubicle.test" });
  const result = JSON.parse(fs.readFileSync(file, "utf8")) as BenchResultFile;
  assert.equal(result.status, "ok", `${result.reason} ${result.errors.join("; ")}`);
  assert.deepEqual(result.errors, []);
  const paths = result.summary.paths as Record<string, any>;
  for (const id of NETWORK_PATHS) {
    assert.equal(paths[id].connections, 6, id);
    assert.equal(paths[id].downloads, 2, id);
    assert.ok(paths[id].ttfbMs.p50 > 0 && paths[id].downloadMBps.median > 0, id);
    if (!id.startsWith("floor-")) for (const key of ["connectP50", "ttfbP50", "throughputSlowdown"]) assert.ok(Number.isFinite(paths[id].vsFloor[key]), `${id} ${key}`);
  }
  assert.equal(paths["header-https"].headerInjected, true, "the fake host received the secret through the rule");
  assert.ok(paths["allowlist-http"].resolveMs.p50 > 0, "the allowlist path resolves through Cubicle's DNS");
  assert.equal(paths["default-http"].seenFrom, inet.hostTransitAddress, "the proxy connects from the host");
  assert.notEqual(paths["socks-http"].seenFrom, inet.hostTransitAddress, "the SOCKS path connects from the SOCKS service");
  assert.equal((result.summary.updateNetworkMs as { count: number }).count, 3);
  const creates = result.summary.createsWithPolicy as Record<string, any>;
  assert.equal(creates.claims.pairs, 1);
  assert.equal(creates.cold.pairs, 1);
  assert.ok(Number.isFinite(creates.claims.firstCommandRatio.ratio));
  assert.equal(execFileSync("ip", ["netns", "list"], { encoding: "utf8" }).split("\n").filter((l) => l.startsWith("cbb-floor-") && !namespacesBefore.includes(l)).length, 0, "the floor namespace is removed");
  assert.deepEqual((await server.api("GET", "/v2/sandboxes?state=running,paused")).json, [], "the scenario kills its sandboxes");

  const reportDir = fs.mkdtempSync(path.join(os.tmpdir(), "cbb-bench-network-report-"));
  try {
    const text = fs.readFileSync(writeReport({ resultsDir, reportDir }).reportPath, "utf8");
    assert.match(text, /## Network: egress paths/);
    assert.ok(text.includes(`network/${path.basename(file)}`));
    assert.match(text, /header injection \(TLS interception\), HTTPS \| 6 \|/);
  } finally {
    fs.rmSync(reportDir, { recursive: true, force: true });
  }
});
