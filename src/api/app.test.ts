import assert from "node:assert/strict";
import { test } from "node:test";
import { CubicleError } from "../shared/cubicle-error.js";
import { API_ROUTES, capturingStderr, fakeManager, TEST_KEY, testApp } from "./test-app.js";

const auth = { "x-api-key": TEST_KEY };

function assertE2bBody(status: number, body: unknown, expected: number): void {
  assert.equal(status, expected, JSON.stringify(body));
  assert.equal((body as { code: unknown }).code, expected);
  assert.equal(typeof (body as { message: unknown }).message, "string");
}


test("every API route without a key, or with a wrong one, answers 401 with an E2B body", async () => {
  const app = await testApp();
  for (const route of API_ROUTES) {
    const url = route.path.replace(":id", "iabc");
    for (const headers of [{}, { "x-api-key": "e2b_" + "00".repeat(20) }, { "x-api-key": "" }, { authorization: "Bearer nope" }]) {
      const res = await app.inject({ method: route.method, url, headers, payload: route.method === "POST" || route.method === "PUT" ? {} : undefined });
      // A signed upload link takes no API key: its own token (here none, or a wrong one) is refused.
      assertE2bBody(res.statusCode, res.json(), route.path.startsWith("/template-files/") ? 403 : 401);
    }
  }
  await app.close();
});

test("a 5xx says what to do and gives an error id; the log has the id and the real cause", async () => {
  const cause = "runc run exited with 1: open /srv/cubicle-state/sandboxes/iabc/config.json: no such file";
  const app = await testApp({ manager: fakeManager({ failWith: () => new CubicleError("internal", cause) }) });
  const { result: res, logged } = await capturingStderr(() => app.inject({ method: "GET", url: "/sandboxes/iabc", headers: auth }));
  const body = res.json();
  assertE2bBody(res.statusCode, body, 500);
  const errorId = /error id ([0-9a-f]{8})/.exec(body.message)?.[1];
  assert.ok(errorId, body.message);
  assert.doesNotMatch(body.message, /\/|runc/);
  assert.match(logged, new RegExp(`"errorId":"${errorId}"`));
  assert.ok(logged.includes("config.json"), "the log keeps the cause");
  await app.close();
});

test("errors that are not CubicleErrors, even non-objects, become E2B bodies without paths or stacks", async () => {
  const throwables: (() => unknown)[] = [
    () => null,
    () => "a string",
    () => Object.assign(new Error("ENOENT: no such file or directory, open '/var/lib/cubicle/templates/base/meta.json'"), { code: "ENOENT" }),
    () => new TypeError("Cannot read properties of undefined (reading 'x')"),
  ];
  for (const failWith of throwables) {
    const app = await testApp({ manager: fakeManager({ failWith }) });
    const { result: res } = await capturingStderr(() => app.inject({ method: "GET", url: "/v2/sandboxes", headers: auth }));
    const body = res.json();
    assert.ok(res.statusCode >= 400, String(res.statusCode));
    assertE2bBody(res.statusCode, body, res.statusCode);
    assert.doesNotMatch(body.message, /\/var|\/srv|\n\s+at /);
    await app.close();
  }
});

test("a 4xx whose message holds a host path keeps the message without the path", async () => {
  const app = await testApp({ manager: fakeManager({ failWith: () => new CubicleError("not_found", "snapshot image /srv/cubicle-state/snapshots/snap-x missing") }) });
  const res = await app.inject({ method: "GET", url: "/sandboxes/iabc", headers: auth });
  assertE2bBody(res.statusCode, res.json(), 404);
  assert.equal(res.json().message, "snapshot image <host path> missing");
  await app.close();
});

test("query parameters given twice are a 400, not an array handed to the store", async () => {
  const app = await testApp();
  for (const url of [
    "/v2/sandboxes?template=a&template=b",
    "/v2/sandboxes?metadata=a%3Db&metadata=c%3Dd",
    "/v2/sandboxes?limit=1&limit=2",
    "/v2/sandboxes?nextToken=a&nextToken=b",
    "/v2/sandboxes?startedAfter=2020-01-01&startedAfter=2021-01-01",
    "/sandboxes?metadata=a%3Db&metadata=c%3Dd",
    "/snapshots?sandboxID=a&sandboxID=b",
    "/snapshots?name=a&name=b",
  ]) {
    const res = await app.inject({ method: "GET", url, headers: auth });
    assertE2bBody(res.statusCode, res.json(), 400);
  }
  const states = await app.inject({ method: "GET", url: "/v2/sandboxes?state=running&state=paused", headers: auth });
  assert.equal(states.statusCode, 200, "state may repeat (the SDK sends it that way)");
  await app.close();
});

test("creates: absurd resources, bad env names and insecure v1 sandboxes are 400s that say why", async () => {
  const app = await testApp();
  const cases: [string, Record<string, unknown>, RegExp][] = [
    ["/v2/sandboxes", { memoryMB: 10_000_000 }, /CUBICLE_MAX_MEMORY_MB/],
    ["/v2/sandboxes", { cpuCount: 64 }, /CUBICLE_MAX_CPU_COUNT/],
    ["/v2/sandboxes", { diskSizeMB: 10_000_000 }, /CUBICLE_MAX_DISK_MB/],
    ["/v2/sandboxes", { envVars: { "1BAD": "x" } }, /valid variable name/],
    ["/v2/sandboxes", { envVars: { GOOD: "a\u0000b" } }, /NUL/],
    ["/sandboxes", { secure: false }, /CUBICLE_REQUIRE_SECURE=false/],
  ];
  for (const [url, fields, message] of cases) {
    const res = await app.inject({ method: "POST", url, headers: auth, payload: { templateID: "base", ...fields } });
    assertE2bBody(res.statusCode, res.json(), 400);
    assert.match(res.json().message, message);
  }
  const created = await app.inject({ method: "POST", url: "/sandboxes", headers: auth, payload: { templateID: "base", diskSizeMB: 2048 } });
  assert.equal(created.statusCode, 201);
  assert.ok(created.json().envdAccessToken, "a v1 create without secure is secure");
  await app.close();
});

test("a server that allows insecure sandboxes creates one for v1 secure: false", async () => {
  const app = await testApp({ requireSecure: false });
  const res = await app.inject({ method: "POST", url: "/sandboxes", headers: auth, payload: { templateID: "base", secure: false } });
  assert.equal(res.statusCode, 201);
  assert.equal(res.json().envdAccessToken, undefined);
  await app.close();
});

test("an unknown endpoint is a 404 E2B body that echoes no host path", async () => {
  const app = await testApp();
  const res = await app.inject({ method: "GET", url: "/var/lib/cubicle/cubicle.db", headers: auth });
  assertE2bBody(res.statusCode, res.json(), 404);
  assert.doesNotMatch(res.json().message, /\/var/);
  await app.close();
});

test("errors of fastify's router (bad percent-encoding, an overlong id) are E2B bodies too", async () => {
  const app = await testApp();
  for (const url of ["/sandboxes/%E0%A4%A", `/sandboxes/${"x".repeat(500)}`, `/sandboxes/${"x".repeat(500)}/pause`, "/v2/sandboxes/%zz/connect"]) {
    const res = await app.inject({ method: url.endsWith("connect") || url.endsWith("pause") ? "POST" : "GET", url, headers: auth });
    assertE2bBody(res.statusCode, res.json(), 400);
  }
  await app.close();
});

test("a create refused by admission control (429, 503) says when to come back in Retry-After", async () => {
  for (const [code, status, retryAfterSec, header] of [
    ["resource_exhausted", 429, 3.2, "4"],
    ["unavailable", 503, 5, "5"],
    ["resource_exhausted", 429, undefined, null],
  ] as const) {
    const app = await testApp({ manager: fakeManager({ failWith: () => new CubicleError(code, "too many creates are waiting", { details: retryAfterSec === undefined ? undefined : { retryAfterSec } }) }) });
    const res = await app.inject({ method: "POST", url: "/v2/sandboxes", headers: auth, payload: { templateID: "base" } });
    assertE2bBody(res.statusCode, res.json(), status);
    assert.equal(res.headers["retry-after"] ?? null, header);
    await app.close();
  }
});

test("metrics: samples in the start/end range as SandboxMetric, [] before the sandbox existed, bad ranges 400; the batch form", async () => {
  const stats = { cpuCount: 2, cpuUsedPct: 12.5, memUsedBytes: 300, memTotalBytes: 1000, memCacheBytes: 40, diskUsedBytes: 5000, diskTotalBytes: 9000 };
  const manager = fakeManager({ stats });
  const app = await testApp({ manager });
  const created = await manager.create({ templateId: "base", timeoutSec: 60, secure: true, allowInternetAccess: true, metadata: {}, envVars: {}, autoPause: false, autoResume: false, networkConfig: undefined });
  const url = `/sandboxes/${created.sandboxId}/metrics`;

  const res = await app.inject({ method: "GET", url, headers: auth });
  assert.equal(res.statusCode, 200, res.body);
  const [sample, ...more] = res.json();
  assert.equal(more.length, 0);
  assert.deepEqual(
    { cpuCount: sample.cpuCount, cpuUsedPct: sample.cpuUsedPct, memUsed: sample.memUsed, memTotal: sample.memTotal, memCache: sample.memCache, diskUsed: sample.diskUsed, diskTotal: sample.diskTotal },
    { cpuCount: 2, cpuUsedPct: 12.5, memUsed: 300, memTotal: 1000, memCache: 40, diskUsed: 5000, diskTotal: 9000 },
  );
  assert.equal(sample.timestampUnix % 5, 0, "stamped with its 5 s bucket");
  assert.equal(new Date(sample.timestamp).getTime(), sample.timestampUnix * 1000);
  const now = Math.floor(Date.now() / 1000);
  const inRange = await app.inject({ method: "GET", url: `${url}?start=${now - 60}&end=${now + 60}`, headers: auth });
  assert.equal(inRange.json().length, 1);
  const before = await app.inject({ method: "GET", url: `${url}?start=${now - 7200}&end=${now - 3600}`, headers: auth });
  assert.deepEqual(before.json(), [], "a range before the sandbox existed");
  for (const query of ["start=abc", "end=-5", "start=1.5", `start=${now}&end=${now - 10}`, "start=99999999999999999"]) {
    const bad = await app.inject({ method: "GET", url: `${url}?${query}`, headers: auth });
    assertE2bBody(bad.statusCode, bad.json(), 400);
  }

  const batch = await app.inject({ method: "GET", url: `/sandboxes/metrics?sandbox_ids=${created.sandboxId},inope&sandbox_ids=${created.sandboxId}`, headers: auth });
  assert.equal(batch.statusCode, 200, batch.body);
  assert.deepEqual(Object.keys(batch.json().sandboxes), [created.sandboxId], "unknown ids are left out, repeats counted once");
  assert.equal(batch.json().sandboxes[created.sandboxId].memUsed, 300);
  for (const query of ["", "sandbox_ids=", `sandbox_ids=${Array.from({ length: 101 }, (_, index) => `i${index}`).join(",")}`, `sandbox_ids=${"x".repeat(101)}`]) {
    const bad = await app.inject({ method: "GET", url: `/sandboxes/metrics?${query}`, headers: auth });
    assertE2bBody(bad.statusCode, bad.json(), 400);
  }
  const noKey = await app.inject({ method: "GET", url: `/sandboxes/metrics?sandbox_ids=${created.sandboxId}` });
  assert.equal(noKey.statusCode, 401);
  await app.close();
});

test("PUT /sandboxes/{id}/network replaces the egress fields, refuses what cannot be enforced, and secrets must exist", async () => {
  const manager = fakeManager();
  const app = await testApp({ manager });
  const created = await manager.create({ templateId: "base", timeoutSec: 60, secure: true, allowInternetAccess: true, metadata: {}, envVars: {}, autoPause: false, autoResume: false, networkConfig: { allowPublicTraffic: false, allowOut: ["1.1.1.1"] } });
  const url = `/sandboxes/${created.sandboxId}/network`;
  const ok = await app.inject({ method: "PUT", url, headers: auth, payload: { denyOut: ["0.0.0.0/0"], allowOut: ["example.com"] } });
  assert.equal(ok.statusCode, 204, ok.body);
  const record = manager.records.get(created.sandboxId)!;
  assert.deepEqual(record.networkConfig?.allowOut, ["example.com"]);
  assert.equal(record.networkConfig?.allowPublicTraffic, false, "fields an update does not own are kept");
  for (const payload of [{ denyOut: ["example.com"] }, { allowOut: ["2001:db8::/32"] }, { allowOut: [{}] }, { color: "red" }, { allow_internet_access: "no" }, { rules: { "x.test": [{ transform: { headers: { a: "${e2b.identity.tokens.aws}" } } }] } }]) {
    const res = await app.inject({ method: "PUT", url, headers: auth, payload });
    assertE2bBody(res.statusCode, res.json(), 400);
  }
  const missingSecret = await app.inject({ method: "PUT", url, headers: auth, payload: { rules: { "api.test": [{ transform: { headers: { Authorization: "Bearer ${e2b.secrets.nope}" } } }] } } });
  assertE2bBody(missingSecret.statusCode, missingSecret.json(), 400);
  assert.match(missingSecret.json().message, /"nope", which does not exist/);
  const secret = await app.inject({ method: "POST", url: "/secrets", headers: auth, payload: { name: "tok", value: "s3cret-value" } });
  assert.equal(secret.statusCode, 201, secret.body);
  const withSecret = await app.inject({ method: "PUT", url, headers: auth, payload: { rules: { "api.test": [{ transform: { headers: { Authorization: "Bearer ${e2b.secrets.tok}" } } }] } } });
  assert.equal(withSecret.statusCode, 204, withSecret.body);
  assert.doesNotMatch(JSON.stringify(manager.records.get(created.sandboxId)), /s3cret-value/, "the record holds the placeholder, never the value");
  const unknown = await app.inject({ method: "PUT", url: "/sandboxes/nosuch/network", headers: auth, payload: {} });
  assertE2bBody(unknown.statusCode, unknown.json(), 404);
  const createWithMissing = await app.inject({ method: "POST", url: "/v2/sandboxes", headers: auth, payload: { templateID: "base", network: { rules: { "api.test": [{ transform: { headers: { X: "${e2b.secrets.gone}" } } }] } } } });
  assertE2bBody(createWithMissing.statusCode, createWithMissing.json(), 400);
  // Closing removes the app's build directory (/tmp/cubicle-test-app-builds-*).
  await app.close();
});
