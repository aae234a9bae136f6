import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { test } from "node:test";
import { CubicleError } from "../shared/cubicle-error.js";
import { renderPrometheus } from "../shared/prometheus.js";
import { SqliteStore } from "../store/index.js";
import { EgressAuditLog } from "./egress-audit.js";
import type { EgressRecord } from "./egress-types.js";

function attempt(sandboxId: string, time: number, extra: Partial<EgressRecord> = {}): EgressRecord {
  return {
    time,
    sandboxId,
    protocol: "tcp",
    address: "93.184.216.34",
    port: 443,
    domain: "example.com",
    verdict: "allowed",
    reason: "in allowOut",
    bytesOut: undefined,
    bytesIn: undefined,
    durationMs: undefined,
    ...extra,
  };
}

/** Every record of a sandbox, page by page, and the pages' sizes. */
function drain(log: EgressAuditLog, sandboxId: string, limit: number): { times: number[]; pages: number[] } {
  const times: number[] = [];
  const pages: number[] = [];
  let nextToken: string | undefined;
  do {
    const page = log.list(sandboxId, { limit, nextToken });
    times.push(...page.items.map((r) => r.time));
    pages.push(page.items.length);
    nextToken = page.nextToken;
  } while (nextToken && pages.length < 1000);
  return { times, pages };
}

test("pages are newest first, and stay stable while records are added", () => {
  const log = new EgressAuditLog({ now: () => 100 });
  for (let t = 1; t <= 7; t++) log.record(attempt("ia", t));
  log.record(attempt("ib", 50));
  const first = log.list("ia", { limit: 3 });
  assert.deepEqual(first.items.map((r) => r.time), [7, 6, 5]);
  assert.ok(first.nextToken);
  for (let t = 8; t <= 12; t++) log.record(attempt("ia", t));
  const second = log.list("ia", { limit: 3, nextToken: first.nextToken });
  assert.deepEqual(second.items.map((r) => r.time), [4, 3, 2], "new records do not shift a later page");
  const third = log.list("ia", { limit: 3, nextToken: second.nextToken });
  assert.deepEqual(third.items.map((r) => r.time), [1]);
  assert.equal(third.nextToken, undefined);
  assert.deepEqual(drain(log, "ia", 4), { times: [12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1], pages: [4, 4, 4] });
  assert.deepEqual(log.list("ia", { limit: 12 }).nextToken, undefined, "an exact last page has no token");
  assert.deepEqual(log.list("nobody", { limit: 5 }), { items: [] });
  assert.equal(log.has("ib"), true);
  assert.equal(log.has("nobody"), false);
});

test("the proxy's later updates of a record show in the list; its bytes count once, when finished", () => {
  const log = new EgressAuditLog();
  const rec = attempt("ia", Date.now());
  log.record(rec);
  log.record(attempt("ia", Date.now(), { protocol: "dns", verdict: "denied", reason: "not in allowOut", address: "10.0.0.1", port: 53 }));
  log.record(attempt("ib", Date.now(), { protocol: "dns", verdict: "denied" }));
  rec.bytesOut = 1200;
  rec.bytesIn = 50_000;
  rec.durationMs = 830;
  assert.deepEqual(log.list("ia", { limit: 10 }).items[1], rec);
  let text = renderPrometheus(log.metricFamilies());
  assert.match(text, /^cubicle_egress_bytes_total\{direction="out"\} 0$/m, "not before the connection closes");
  log.finished(rec);
  log.finished(rec);
  log.finished(attempt("ia", 0, { bytesOut: Number.NaN, bytesIn: -5 }));
  text = renderPrometheus(log.metricFamilies());
  assert.match(text, /^# TYPE cubicle_egress_connections_total counter$/m);
  assert.match(text, /^cubicle_egress_connections_total\{protocol="tcp",verdict="allowed"\} 1$/m);
  assert.match(text, /^cubicle_egress_connections_total\{protocol="dns",verdict="denied"\} 2$/m);
  assert.match(text, /^cubicle_egress_bytes_total\{direction="out"\} 1200$/m);
  assert.match(text, /^cubicle_egress_bytes_total\{direction="in"\} 50000$/m);
});

test("a sandbox keeps its newest N records; past M sandboxes or the total, the least recently active log loses its oldest first", () => {
  const log = new EgressAuditLog({ maxRecordsPerSandbox: 5, maxSandboxes: 3, maxTotalRecords: 12, now: () => 1_000 });
  for (let t = 1; t <= 2000; t++) log.record(attempt("ia", t));
  assert.deepEqual(drain(log, "ia", 2).times, [2000, 1999, 1998, 1997, 1996]);
  assert.equal(log.size, 5);

  for (let t = 1; t <= 5; t++) log.record(attempt("ib", t));
  log.record(attempt("ia", 2001));
  assert.equal(log.size, 10);
  for (let t = 1; t <= 5; t++) log.record(attempt("ic", t));
  // 15 > 12: ib, the least recently active, lost its three oldest.
  assert.deepEqual(drain(log, "ib", 10).times, [5, 4]);
  assert.equal(log.size, 12);

  log.record(attempt("id", 1));
  assert.equal(log.has("ib"), false, "a fourth sandbox's log evicts the least recently active one");
  assert.equal(log.has("ia") && log.has("ic") && log.has("id"), true);
  assert.equal(log.size, 11);
});

test("records older than the retention go, and a log with none left is gone (injected clock)", () => {
  let now = 0;
  const hour = 3_600_000;
  const log = new EgressAuditLog({ retentionMs: 24 * hour, now: () => now });
  log.record(attempt("ended", 0));
  log.record(attempt("ended", 1 * hour));
  log.record(attempt("live", 2 * hour));
  now = 24 * hour + 30 * 60_000;
  log.record(attempt("live", now));
  assert.deepEqual(drain(log, "ended", 10).times, [1 * hour], "the one past 24 h is gone");
  assert.deepEqual(drain(log, "live", 10).times, [now, 2 * hour]);
  now = 25 * hour + 1;
  assert.equal(log.has("ended"), false);
  assert.deepEqual(log.list("ended", { limit: 10 }), { items: [] });
  now = 27 * hour;
  log.record(attempt("other", now));
  assert.equal(log.size, 2, "the sweep on a later record drops what expired in logs nobody read");
});

test("hostile strings are clipped; tokens that are not ours are 400s", () => {
  const log = new EgressAuditLog();
  const rec = attempt("ia", Date.now(), { domain: "a".repeat(70_000), reason: "r".repeat(5000), address: "x".repeat(1000) });
  log.record(rec);
  const [kept] = log.list("ia", { limit: 1 }).items;
  assert.equal(kept!.domain!.length, 253);
  assert.equal(kept!.reason.length, 200);
  assert.equal(kept!.address.length, 64);
  for (const token of ["nope", "", Buffer.from("egress.-1").toString("base64url"), Buffer.from("egress.1e5").toString("base64url"), "%%%", "A".repeat(100)]) {
    if (token === "") {
      assert.equal(log.list("ia", { limit: 1, nextToken: token }).items.length, 1, "an empty token is no token");
      continue;
    }
    assert.throws(() => log.list("ia", { limit: 1, nextToken: token }), (err: unknown) => err instanceof CubicleError && err.httpStatus === 400);
  }
});

test("the exposition escapes label values and help text", () => {
  const text = renderPrometheus([{ name: "x_total", help: "a\\b\nc", type: "gauge", samples: [{ labels: { l: 'q"\\\n' }, value: 1.5 }, { value: Infinity }] }]);
  assert.equal(text, '# HELP x_total a\\\\b\\nc\n# TYPE x_total gauge\nx_total{l="q\\"\\\\\\n"} 1.5\nx_total +Inf\n');
});

/** A real SQLite store in a directory of its own, removed at the end of the test. */
async function withStore(t: { after: (fn: () => Promise<void>) => void }): Promise<{ store: SqliteStore; reopen: () => SqliteStore; rows: () => number }> {
  const dir = await mkdtemp(path.join(tmpdir(), "cubicle-audit-"));
  const file = path.join(dir, "cubicle.db");
  const opened: SqliteStore[] = [];
  const open = () => {
    const store = new SqliteStore(file);
    opened.push(store);
    return store;
  };
  const store = open();
  t.after(async () => {
    for (const s of opened) await s.close().catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  });
  return { store, reopen: open, rows: () => store.loadEgressAudit(0, 1_000_000).length };
}

test("with a store, records survive a restart with their sequence numbers: a page token stays valid (AUDIT_PERSISTENCE_NOTE)", async (t) => {
  const { store, reopen } = await withStore(t);
  const first = new EgressAuditLog({ now: () => 1000, store, flushIntervalMs: 60_000 });
  for (let i = 0; i < 5; i++) first.record(attempt("sb1", 1000 + i));
  first.record(attempt("sb2", 2000, { protocol: "dns", verdict: "denied", domain: "evil.test" }));
  const live = attempt("sb1", 1010);
  first.record(live);
  const page = first.list("sb1", { limit: 2 });
  // Bytes that grow after the record was written are written again when the connection ends.
  first.flush();
  live.bytesOut = 123;
  live.bytesIn = 456;
  live.durationMs = 7;
  first.finished(live);
  first.close();

  const second = new EgressAuditLog({ now: () => 1000, store: reopen(), flushIntervalMs: 60_000 });
  assert.deepEqual(drain(second, "sb1", 100).times, [1010, 1004, 1003, 1002, 1001, 1000]);
  assert.deepEqual(second.list("sb1", { limit: 1 }).items[0], { ...live });
  assert.equal(second.list("sb2", { limit: 10 }).items[0]!.domain, "evil.test");
  // The first process's token pages on in the second.
  assert.deepEqual(second.list("sb1", { limit: 10, nextToken: page.nextToken }).items.map((r) => r.time), [1003, 1002, 1001, 1000]);
  // New records continue after the highest sequence number: newest first still.
  second.record(attempt("sb1", 3000));
  assert.equal(second.list("sb1", { limit: 1 }).items[0]!.time, 3000);
  second.close();
});

test("with a store, the Prometheus counters continue after a restart from what was written; damaged values are ignored", async (t) => {
  const { store, reopen } = await withStore(t);
  const first = new EgressAuditLog({ now: () => 1000, store, flushIntervalMs: 60_000 });
  first.record(attempt("sb1", 1000, { protocol: "udp", verdict: "denied", attempts: 40 }));
  const connection = attempt("sb1", 1001);
  first.record(connection);
  connection.bytesOut = 10;
  connection.bytesIn = 20;
  first.finished(connection);
  first.close();
  const counted = (audit: EgressAuditLog) =>
    Object.fromEntries(audit.metricFamilies().flatMap((family) => family.samples.map((sample) => [`${family.name}${JSON.stringify(sample.labels)}`, sample.value])));
  const before = counted(first);
  assert.equal(before['cubicle_egress_connections_total{"protocol":"udp","verdict":"denied"}'], 40, "a folded record counts its attempts");
  const second = new EgressAuditLog({ now: () => 1000, store: reopen(), flushIntervalMs: 60_000 });
  assert.deepEqual(counted(second), before);
  second.record(attempt("sb2", 1002));
  second.close();
  assert.equal(counted(new EgressAuditLog({ now: () => 1000, store: reopen(), flushIntervalMs: 60_000 }))['cubicle_egress_connections_total{"protocol":"tcp","verdict":"allowed"}'], before['cubicle_egress_connections_total{"protocol":"tcp","verdict":"allowed"}']! + 1);
  store.writeEgressAudit({ upserts: [], dropBefore: [], dropOlderThan: 0, counters: { "bytes|out": -5, "connections|tcp": 3, "connections|udp|allowed": 2 ** 60, nonsense: 1 } });
  const third = counted(new EgressAuditLog({ now: () => 1000, store: reopen(), flushIntervalMs: 60_000 }));
  assert.equal(third['cubicle_egress_bytes_total{"direction":"out"}'], 0, "a negative value is not loaded");
  assert.equal(third['cubicle_egress_bytes_total{"direction":"in"}'], 20);
  assert.equal(third['cubicle_egress_connections_total{"protocol":"udp","verdict":"allowed"}'], undefined, "an unsafe number is dropped");
});

test("with a store, what the bounds drop and what retention expires leaves the database too", async (t) => {
  const { store, rows } = await withStore(t);
  let now = 10_000;
  const audit = new EgressAuditLog({ now: () => now, store, flushIntervalMs: 60_000, maxRecordsPerSandbox: 3, maxSandboxes: 2, retentionMs: 5_000 });
  for (let i = 0; i < 5; i++) audit.record(attempt("a", now + i));
  audit.flush();
  assert.equal(rows(), 3, "a sandbox keeps its newest 3 in memory and in the database");
  audit.record(attempt("b", now));
  audit.record(attempt("c", now));
  audit.flush();
  assert.equal(rows(), 2, "the third sandbox evicted the least recently active log, there too");
  now += 6_000;
  audit.record(attempt("c", now));
  audit.flush();
  assert.equal(rows(), 1, "only the record within retention is left");
  audit.close();
});

test("with a store, a flood is written over several flushes and only what memory still holds", async (t) => {
  const { store, rows } = await withStore(t);
  const audit = new EgressAuditLog({ now: () => 1, store, flushIntervalMs: 60_000, maxRecordsPerSandbox: 3000 });
  for (let i = 0; i < 5000; i++) audit.record(attempt("flood", 1));
  audit.flush();
  assert.equal(rows(), 2000, "one flush writes at most 2000 rows");
  audit.close();
  assert.equal(rows(), 3000, "close writes the rest of what memory holds, not the 2000 it dropped");
});

test("with a store, damaged rows are skipped at load and a store that fails to write does not break recording", async (t) => {
  const { store, reopen } = await withStore(t);
  store.writeEgressAudit({
    upserts: [
      { seq: 1, sandboxId: "x", time: 5, body: "{not json" },
      { seq: 2, sandboxId: "x", time: 5, body: JSON.stringify(attempt("someone-else", 5)) },
      { seq: 3, sandboxId: "x", time: 5, body: JSON.stringify(attempt("x", 5)) },
    ],
    dropBefore: [],
    dropOlderThan: 0,
  });
  const audit = new EgressAuditLog({ now: () => 5, store: reopen(), flushIntervalMs: 60_000 });
  assert.equal(audit.size, 1);
  const failing = new EgressAuditLog({
    now: () => 5,
    store: { loadEgressAudit: () => [], loadEgressCounters: () => ({}), writeEgressAudit: () => { throw new Error("disk I/O error"); } },
    flushIntervalMs: 60_000,
  });
  failing.record(attempt("y", 5));
  failing.flush();
  assert.equal(failing.list("y", { limit: 5 }).items.length, 1);
  failing.close();
  audit.close();
});
