import assert from "node:assert/strict";
import { test } from "node:test";
import { EgressAuditLog, type EgressRecord } from "../network/index.js";
import { fakeManager, TEST_KEY, testApp } from "./test-app.js";

const auth = { "x-api-key": TEST_KEY };

function attempt(sandboxId: string, time: number, extra: Partial<EgressRecord> = {}): EgressRecord {
  return { time, sandboxId, protocol: "tcp", address: "93.184.216.34", port: 443, domain: "example.com", verdict: "allowed", reason: "in allowOut", bytesOut: undefined, bytesIn: undefined, durationMs: undefined, ...extra };
}

async function setup() {
  const manager = fakeManager();
  const egressAudit = new EgressAuditLog();
  const app = await testApp({ manager, egressAudit });
  const live = await manager.create({ templateId: "base", timeoutSec: 60, secure: true, allowInternetAccess: true, metadata: {}, envVars: {}, autoPause: false, autoResume: false, networkConfig: undefined });
  return { manager, egressAudit, app, sandboxId: live.sandboxId };
}

test("egress: records newest first with ISO and unix times, paged with X-Next-Token; an open connection's bytes as they are", async () => {
  const { egressAudit, app, sandboxId } = await setup();
  const base = Date.now() - 60_000;
  const open = attempt(sandboxId, base + 4, { bytesOut: 10 });
  for (let i = 0; i < 4; i++) egressAudit.record(attempt(sandboxId, base + i, i === 1 ? { protocol: "dns", verdict: "denied", reason: "not in allowOut", port: 53, domain: "evil.test", address: "10.0.0.1" } : {}));
  egressAudit.record(open);
  open.bytesOut = 1500;

  const first = await app.inject({ method: "GET", url: `/sandboxes/${sandboxId}/network/egress?limit=2`, headers: auth });
  assert.equal(first.statusCode, 200, first.body);
  const items = first.json();
  assert.deepEqual(items.map((r: { timeUnix: number }) => r.timeUnix), [base + 4, base + 3]);
  assert.deepEqual(items[0], {
    time: new Date(base + 4).toISOString(),
    timeUnix: base + 4,
    sandboxId,
    protocol: "tcp",
    address: "93.184.216.34",
    port: 443,
    domain: "example.com",
    verdict: "allowed",
    reason: "in allowOut",
    bytesOut: 1500,
  });
  const times: number[] = items.map((r: { timeUnix: number }) => r.timeUnix);
  let token = first.headers["x-next-token"] as string | undefined;
  while (token) {
    const page = await app.inject({ method: "GET", url: `/sandboxes/${sandboxId}/network/egress?limit=2&nextToken=${token}`, headers: auth });
    assert.equal(page.statusCode, 200);
    times.push(...page.json().map((r: { timeUnix: number }) => r.timeUnix));
    token = page.headers["x-next-token"] as string | undefined;
  }
  assert.deepEqual(times, [4, 3, 2, 1, 0].map((i) => base + i));
  const dns = (await app.inject({ method: "GET", url: `/sandboxes/${sandboxId}/network/egress`, headers: auth })).json()[3];
  assert.deepEqual([dns.protocol, dns.verdict, dns.domain, dns.port], ["dns", "denied", "evil.test", 53]);
  await app.close();
});

test("egress: a running sandbox without records has [], an ended one keeps its log, a sandbox never known is a 404", async () => {
  const { manager, egressAudit, app, sandboxId } = await setup();
  const empty = await app.inject({ method: "GET", url: `/sandboxes/${sandboxId}/network/egress`, headers: auth });
  assert.equal(empty.statusCode, 200);
  assert.deepEqual(empty.json(), []);
  assert.equal(empty.headers["x-next-token"], undefined);

  egressAudit.record(attempt(sandboxId, Date.now()));
  manager.records.delete(sandboxId); // killed: no longer running or paused
  const ended = await app.inject({ method: "GET", url: `/sandboxes/${sandboxId}/network/egress`, headers: auth });
  assert.equal(ended.statusCode, 200);
  assert.equal(ended.json().length, 1);

  for (const id of ["inever", "x".repeat(300)]) {
    const res = await app.inject({ method: "GET", url: `/sandboxes/${id}/network/egress`, headers: auth });
    assert.equal(res.statusCode, 404, id);
    assert.equal(res.json().code, 404);
  }
  await app.close();
});

test("egress: bad limit and nextToken are 400 E2B bodies", async () => {
  const { app, sandboxId, egressAudit } = await setup();
  egressAudit.record(attempt(sandboxId, Date.now()));
  for (const query of ["limit=0", "limit=1001", "limit=-1", "limit=1.5", "limit=abc", "limit=1e3", "limit=1&limit=2", "nextToken=garbage", "nextToken=a&nextToken=b", `nextToken=${"A".repeat(5000)}`]) {
    const res = await app.inject({ method: "GET", url: `/sandboxes/${sandboxId}/network/egress?${query}`, headers: auth });
    assert.equal(res.statusCode, 400, `${query}: ${res.body}`);
    assert.equal(res.json().code, 400);
    assert.equal(typeof res.json().message, "string");
  }
  const max = await app.inject({ method: "GET", url: `/sandboxes/${sandboxId}/network/egress?limit=1000`, headers: auth });
  assert.equal(max.statusCode, 200);
  await app.close();
});

test("GET /metrics: Prometheus text with the egress counters and sandboxes by state; the API key is required", async () => {
  const { manager, app, sandboxId, egressAudit } = await setup();
  await manager.pause(sandboxId);
  await manager.create({ templateId: "base", timeoutSec: 60, secure: true, allowInternetAccess: true, metadata: {}, envVars: {}, autoPause: false, autoResume: false, networkConfig: undefined });
  const rec = attempt(sandboxId, Date.now(), { bytesOut: 100, bytesIn: 2000 });
  egressAudit.record(rec);
  egressAudit.record(attempt(sandboxId, Date.now(), { protocol: "udp", verdict: "denied" }));
  egressAudit.finished(rec);
  const res = await app.inject({ method: "GET", url: "/metrics", headers: auth });
  assert.equal(res.statusCode, 200);
  assert.match(String(res.headers["content-type"]), /^text\/plain; version=0\.0\.4/);
  for (const line of [
    '# TYPE cubicle_egress_connections_total counter',
    'cubicle_egress_connections_total{protocol="tcp",verdict="allowed"} 1',
    'cubicle_egress_connections_total{protocol="udp",verdict="denied"} 1',
    'cubicle_egress_bytes_total{direction="out"} 100',
    'cubicle_egress_bytes_total{direction="in"} 2000',
    '# TYPE cubicle_sandboxes gauge',
    'cubicle_sandboxes{state="running"} 1',
    'cubicle_sandboxes{state="paused"} 1',
    'cubicle_sandboxes{state="starting"} 0',
  ]) {
    assert.ok(res.body.split("\n").includes(line), `missing: ${line}\n${res.body}`);
  }
  const noKey = await app.inject({ method: "GET", url: "/metrics" });
  assert.equal(noKey.statusCode, 401);
  await app.close();
});
