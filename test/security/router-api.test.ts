/**
 * Escape battery, router and API: attempts from outside — a process in a sandbox answering HTTP
 * badly, clients without a key sending upgrades, oversized and malformed requests, hostile JSON,
 * absurd resources — against a real server with real sandboxes. Each asserts the contained
 * outcome, and after each the server process is alive and answers GET /health.
 */
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { test } from "node:test";
import type { Sandbox } from "e2b";
import { API_ROUTES } from "../../src/api/test-app.js";
import type { TestServer } from "../e2e/harness.js";
import { HOST_PATH_IN_TEXT, isE2bErrorBody } from "./fuzz.js";
import { assertRawE2bError, assertServerSurvived as assertServerSurvivedOf, CLOSED_PORT, rawExchange, upgradeRequest, useWeirdSandbox, WEIRD_PORT } from "./sandbox-http.js";

let server: TestServer;
let sandbox: Sandbox;
useWeirdSandbox((made, madeSandbox) => {
  server = made;
  sandbox = madeSandbox;
});

const assertServerSurvived = () => assertServerSurvivedOf(server);

/** How many sandboxes the API lists (running and paused). */
async function sandboxCount(): Promise<number> {
  const list = await server.api("GET", "/v2/sandboxes?state=running,paused");
  assert.equal(list.status, 200);
  return (list.json as unknown[]).length;
}

const routed = (port: number | string, extra: Record<string, string> = {}) => ({ "e2b-sandbox-id": sandbox.sandboxId, "e2b-sandbox-port": String(port), ...extra });

test("a sandbox process answering with a status below 100 gets its caller a 502 E2B body", async () => {
  for (const pathName of ["/s042", "/s000", "/s099"]) {
    const res = await fetch(server.url + pathName, { headers: routed(WEIRD_PORT), signal: AbortSignal.timeout(10_000) });
    assert.equal(res.status, 502, pathName);
    const body = await res.json();
    assert.ok(isE2bErrorBody(JSON.stringify(body), 502), JSON.stringify(body));
    assert.match(body.message, /invalid HTTP status/);
    await assertServerSurvived();
  }
});

test("a sandbox process answering 101 to a plain request, bytes that are not HTTP, or nothing gets a 502, never a hang", async () => {
  for (const pathName of ["/s101", "/garbage", "/silent"]) {
    const res = await fetch(server.url + pathName, { headers: routed(WEIRD_PORT), signal: AbortSignal.timeout(10_000) });
    assert.equal(res.status, 502, pathName);
    assert.equal((await res.json()).code, 502);
  }
  await assertServerSurvived();
});

test("WebSocket upgrades to a running sandbox with ports 65536, -1, abc or 0 and no API key get 400", async () => {
  for (const port of ["65536", "-1", "abc", "0", "", "1e3", "99999999999999999999"]) {
    const { raw } = await rawExchange(server, upgradeRequest(["Host: 127.0.0.1", `E2b-Sandbox-Id: ${sandbox.sandboxId}`, `E2b-Sandbox-Port: ${port}`]));
    assert.match(assertRawE2bError(raw, 400).message, /E2b-Sandbox-Port/, `port ${JSON.stringify(port)}`);
    await assertServerSurvived();
  }
});

test("WebSocket upgrades by Host with an impossible port (99999-<id>.<domain>) get 400", async () => {
  for (const host of [`99999-${sandbox.sandboxId}.cubicle.test`, `0-${sandbox.sandboxId}.cubicle.test`, `65536-${sandbox.sandboxId}.cubicle.test:80`]) {
    const { raw } = await rawExchange(server, upgradeRequest([`Host: ${host}`]));
    assertRawE2bError(raw, 400);
    await assertServerSurvived();
  }
});

test("plain requests with an invalid E2b-Sandbox-Port get 400, not 502", async () => {
  for (const port of ["65536", "-1", "abc", "0x50"]) {
    const res = await fetch(server.url + "/health", { headers: routed(port) });
    assert.equal(res.status, 400, port);
    assert.equal((await res.json()).code, 400);
  }
  const byHost = await rawExchange(server, `GET / HTTP/1.1\r\nHost: 99999-${sandbox.sandboxId}.cubicle.test\r\nConnection: close\r\n\r\n`);
  assertRawE2bError(byHost.raw, 400);
  await assertServerSurvived();
});

test("upgrades to a closed port or an unknown sandbox get a 502 body; a non-sandbox upgrade a 400", async () => {
  assertRawE2bError((await rawExchange(server, upgradeRequest(["Host: x", `E2b-Sandbox-Id: ${sandbox.sandboxId}`, `E2b-Sandbox-Port: ${CLOSED_PORT}`]))).raw, 502);
  assertRawE2bError((await rawExchange(server, upgradeRequest(["Host: x", "E2b-Sandbox-Id: inosuchsandbox", "E2b-Sandbox-Port: 49983"]))).raw, 502);
  assertRawE2bError((await rawExchange(server, upgradeRequest(["Host: 127.0.0.1"], "/v2/sandboxes"))).raw, 400);
  await assertServerSurvived();
});

test("clients resetting their connection mid-upgrade and mid-request do not end the server", async () => {
  for (let i = 0; i < 10; i++) {
    await rawExchange(server, upgradeRequest(["Host: x", `E2b-Sandbox-Id: ${sandbox.sandboxId}`, `E2b-Sandbox-Port: ${WEIRD_PORT}`], "/silent"), { resetAfterWrite: true });
    await rawExchange(server, upgradeRequest(["Host: x", "E2b-Sandbox-Id: inosuchsandbox", "E2b-Sandbox-Port: 49983"]), { resetAfterWrite: true });
    await rawExchange(server, `POST /upload HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: ${sandbox.sandboxId}\r\nE2b-Sandbox-Port: ${WEIRD_PORT}\r\nContent-Length: 100000\r\n\r\npartial`, { resetAfterWrite: true });
    await rawExchange(server, `POST /v2/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"templ`, { resetAfterWrite: true });
  }
  await new Promise((r) => setTimeout(r, 500));
  await assertServerSurvived();
});

test("oversized headers get 431 with an E2B body, on API and sandbox traffic alike", async () => {
  for (const target of ["Host: 127.0.0.1", `Host: x\r\nE2b-Sandbox-Id: ${sandbox.sandboxId}\r\nE2b-Sandbox-Port: 49983`]) {
    const { raw } = await rawExchange(server, `GET /health HTTP/1.1\r\n${target}\r\nX-Filler: ${"a".repeat(20_000)}\r\n\r\n`);
    assertRawE2bError(raw, 431);
  }
  await assertServerSurvived();
});

test("malformed request lines and framing get 400 with an E2B body", async () => {
  for (const request of [
    "GARBAGE\r\n\r\n",
    "GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    "GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
    "POST /v2/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    "POST /v2/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
  ]) {
    const { raw } = await rawExchange(server, request);
    assertRawE2bError(raw, 400);
  }
  const expect = await rawExchange(server, "GET /health HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\nConnection: close\r\n\r\n");
  assertRawE2bError(expect.raw, 417);
  await assertServerSurvived();
});

test("bad JSON, wrong types, huge and prototype-polluting bodies get 400 with an E2B body, and create nothing", async () => {
  const before = await sandboxCount();
  const bodies: [string, string][] = [
    ["/v2/sandboxes", "{not json"],
    ["/v2/sandboxes", "[]"],
    ["/v2/sandboxes", '"base"'],
    ["/v2/sandboxes", '{"templateID":["base"]}'],
    ["/v2/sandboxes", '{"templateID":"base","timeout":"60"}'],
    ["/v2/sandboxes", '{"templateID":"base","metadata":{"a":{"b":1}}}'],
    ["/v2/sandboxes", '{"templateID":"base","network":' + '{"a":'.repeat(100_000) + "1" + "}".repeat(100_001)],
    ["/v2/sandboxes", '{"__proto__":{"templateID":"base"}}'],
    ["/sandboxes/inosuch/timeout", '{"timeout":1e308}'],
    ["/sandboxes/inosuch/fork", '{"count":1000}'],
    ["/v2/sandboxes/inosuch/connect", '{"timeout":-1}'],
  ];
  for (const [urlPath, body] of bodies) {
    const res = await fetch(server.url + urlPath, { method: "POST", headers: { "x-api-key": server.apiKey, "content-type": "application/json" }, body });
    const text = await res.text();
    assert.equal(res.status, 400, `${urlPath} ${body.slice(0, 80)}: ${text.slice(0, 200)}`);
    assert.ok(isE2bErrorBody(text, 400), text.slice(0, 200));
  }
  // Over the 1 MiB body limit: refused from its Content-Length (raw, as the answer comes early).
  const huge = JSON.stringify({ templateID: "base", metadata: { big: "x".repeat(2 * 1024 * 1024) } });
  // Only the head is sent: the answer must come from the declared length alone (sending the
  // whole body races the server's early answer and close, and the reset may eat the answer).
  const { raw } = await rawExchange(server, `POST /v2/sandboxes HTTP/1.1\r\nHost: x\r\nX-API-Key: ${server.apiKey}\r\nContent-Type: application/json\r\nContent-Length: ${huge.length}\r\nConnection: close\r\n\r\n${huge.slice(0, 1000)}`, { halfClose: true });
  assert.match(assertRawE2bError(raw, 400).message, /too large/);
  assert.equal(await sandboxCount(), before, "nothing was created");
  await assertServerSurvived();
});

test("absurd resources (memoryMB 10000000, cpuCount 64, diskSizeMB 10^9, zero or negative) get 400 naming the limit, and create nothing", async () => {
  const before = await sandboxCount();
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ memoryMB: 10_000_000 }, /memoryMB must be at most \d+ .*CUBICLE_MAX_MEMORY_MB/],
    [{ cpuCount: 64 }, /cpuCount must be at most \d+ .*CUBICLE_MAX_CPU_COUNT/],
    [{ diskSizeMB: 1_000_000_000 }, /diskSizeMB must be at most 65536 .*CUBICLE_MAX_DISK_MB/],
    [{ memoryMB: 0 }, /memoryMB must be at least 128/],
    [{ cpuCount: -1 }, /cpuCount must be at least 1/],
    [{ memoryMB: 1e308 }, /memoryMB/],
  ];
  for (const [fields, message] of cases) {
    const res = await server.api("POST", "/v2/sandboxes", { templateID: "base", ...fields });
    assert.equal(res.status, 400, JSON.stringify(res.json));
    assert.equal(res.json.code, 400);
    assert.match(res.json.message, message);
  }
  assert.equal(await sandboxCount(), before, "nothing was created");
  await assertServerSurvived();
});

test("env vars with invalid names or a NUL get 400, not a dead sandbox", async () => {
  const before = await sandboxCount();
  for (const envVars of [{ "1ABC": "x" }, { "A-B": "x" }, { "A=B": "x" }, { "": "x" }, { "A B": "x" }, { GOOD: "a\u0000b" }]) {
    const res = await server.api("POST", "/v2/sandboxes", { templateID: "base", envVars });
    assert.equal(res.status, 400, JSON.stringify(envVars));
    assert.equal(res.json.code, 400);
  }
  assert.equal(await sandboxCount(), before, "nothing was created");
  await assertServerSurvived();
});

test("a v1 create with secure: false is refused with a message that says how to allow it; without the field it is secure", async () => {
  const refused = await server.api("POST", "/sandboxes", { templateID: "base", secure: false });
  assert.equal(refused.status, 400);
  assert.equal(refused.json.code, 400);
  assert.match(refused.json.message, /requires secure sandboxes.*CUBICLE_REQUIRE_SECURE=false/);
  const created = await server.api("POST", "/sandboxes", { templateID: "base", timeout: 60 });
  assert.equal(created.status, 201, JSON.stringify(created.json));
  try {
    assert.ok(created.json.envdAccessToken, "a v1 create without `secure` is secure");
    const open = await fetch(server.url + "/filesystem.Filesystem/Stat", {
      method: "POST",
      headers: { ...routed(49983), "e2b-sandbox-id": created.json.sandboxID, "content-type": "application/json" },
      body: JSON.stringify({ path: "/" }),
    });
    assert.equal(open.status, 401, "envd demands its token");
  } finally {
    await server.api("DELETE", `/sandboxes/${created.json.sandboxID}`);
  }
  await assertServerSurvived();
});

test("every API route without a key, or with a wrong one, answers 401 with an E2B body", async () => {
  for (const route of API_ROUTES) {
    const url = server.url + route.path.replace(":id", sandbox.sandboxId);
    const wrongKeys: Record<string, string>[] = [{}, { "x-api-key": "e2b_" + "00".repeat(20) }, { "x-api-key": server.apiKey.slice(0, -1) }, { authorization: "Bearer " + "0".repeat(44) }];
    for (const headers of wrongKeys) {
      const res = await fetch(url, { method: route.method, headers: { ...headers, "content-type": "application/json" }, body: route.method === "POST" || route.method === "PUT" ? "{}" : undefined });
      const text = await res.text();
      // A signed upload link takes no API key but its own token: without one it is a 403.
      const expected = route.path.startsWith("/template-files/") ? 403 : 401;
      assert.equal(res.status, expected, `${route.method} ${route.path}: ${text}`);
      assert.ok(isE2bErrorBody(text, expected), text);
    }
  }
  await assertServerSurvived();
});

test("an error that involves host paths (a broken state directory) reaches the client without them", async () => {
  // The snapshot directory made unusable two ways: a file in its place (EEXIST: a 409 whose
  // cause names the path) and a symlink loop (ELOOP: a 500).
  const snapshotsDir = path.join(server.runDir, "pool", "images", "snapshots");
  // The image store makes it empty at start; no snapshot was taken on this server yet.
  assert.deepEqual(fs.readdirSync(snapshotsDir), [], "no snapshot was taken on this server yet");
  fs.rmdirSync(snapshotsDir);
  try {
    fs.writeFileSync(snapshotsDir, "not a directory");
    const eexist = await server.api("POST", `/sandboxes/${sandbox.sandboxId}/snapshots`, {});
    assert.ok(eexist.status >= 400, String(eexist.status));
    assert.equal(eexist.json.code, eexist.status);
    assert.doesNotMatch(eexist.json.message, HOST_PATH_IN_TEXT);
    assert.ok(!eexist.json.message.includes(server.stateDir) && !eexist.json.message.includes(server.runDir), eexist.json.message);
    fs.rmSync(snapshotsDir);

    fs.symlinkSync(snapshotsDir, snapshotsDir);
    const eloop = await server.api("POST", `/sandboxes/${sandbox.sandboxId}/snapshots`, {});
    assert.equal(eloop.status, 500, JSON.stringify(eloop.json));
    assert.equal(eloop.json.code, 500);
    assert.match(eloop.json.message, /error id [0-9a-f]{8}/);
    assert.ok(!eloop.json.message.includes(server.stateDir) && !eloop.json.message.includes(server.runDir), eloop.json.message);
    assert.doesNotMatch(eloop.json.message, /ELOOP|\n\s+at /);
  } finally {
    fs.rmSync(snapshotsDir, { force: true });
    fs.mkdirSync(snapshotsDir, { mode: 0o711 });
  }
  assert.equal((await sandbox.commands.run("echo still here")).stdout, "still here\n", "the sandbox kept running");
  await assertServerSurvived();
});

test("a body over the API's limit, or behind a head too large for Node, gets its answer with an E2B body, not a reset", async () => {
  // 3 MiB with a content-length (refused before it is read) and chunked (refused while read).
  const big = JSON.stringify({ templateID: "base", envVars: { A: "x".repeat(3 * 1024 * 1024) } });
  for (let round = 0; round < 5; round++) {
    const sized = await fetch(`${server.url}/sandboxes`, { method: "POST", headers: { "x-api-key": server.apiKey, "content-type": "application/json" }, body: big });
    const sizedText = await sized.text();
    assert.equal(sized.status, 400, sizedText);
    assert.ok(isE2bErrorBody(sizedText, 400) && /too large/.test(sizedText), sizedText);
    const chunked = await fetch(`${server.url}/sandboxes`, {
      method: "POST",
      headers: { "x-api-key": server.apiKey, "content-type": "application/json" },
      body: new Blob([big]).stream(),
      duplex: "half",
    } as RequestInit & { duplex: "half" });
    const chunkedText = await chunked.text();
    assert.equal(chunked.status, 400, chunkedText);
    assert.ok(isE2bErrorBody(chunkedText, 400) && /too large/.test(chunkedText), chunkedText);
    // A head Node itself refuses (over 16 KiB), the body still coming: the answer, not a reset.
    const longHead = await fetch(`${server.url}/sandboxes?q=${"x".repeat(20_000)}`, { method: "POST", headers: { "x-api-key": server.apiKey, "content-type": "application/json" }, body: big });
    const longHeadText = await longHead.text();
    assert.equal(longHead.status, 431, longHeadText);
    assert.ok(isE2bErrorBody(longHeadText, 431), longHeadText);
  }
  await assertServerSurvived();
});

test("query parameters given twice, overlong ids and bad URL encodings get 400 with an E2B body", async () => {
  for (const urlPath of [
    "/v2/sandboxes?template=a&template=b",
    "/v2/sandboxes?metadata=a%3Db&metadata=c%3Dd",
    "/snapshots?sandboxID=a&sandboxID=b",
    `/sandboxes/${"x".repeat(500)}`,
    "/sandboxes/%E0%A4%A",
  ]) {
    const res = await server.api("GET", urlPath);
    assert.equal(res.status, 400, `${urlPath}: ${JSON.stringify(res.json)}`);
    assert.equal(res.json.code, 400);
  }
  await assertServerSurvived();
});
