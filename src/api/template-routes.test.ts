/**
 * The template-build routes on the test app's real builder (SQLite records, files in a temp
 * dir, no sandboxes): request validation, signed upload links with their size limit, the build
 * status of a build that fails at its base.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { testApp, TEST_KEY } from "./test-app.js";

const auth = { "x-api-key": TEST_KEY };

test("POST /v3/templates validates the name, tags and resources; names map to one template id", async () => {
  const app = await testApp();
  const post = (payload: unknown) => app.inject({ method: "POST", url: "/v3/templates", headers: auth, payload: payload as object });
  for (const payload of [{}, { name: "UPPER" }, { name: "x", tags: "v1" }, { name: "x", tags: ["bad tag"] }, { name: "x", cpuCount: 0 }, { name: "x", memoryMB: 1e9 }, { name: "x:" }]) {
    const res = await post(payload);
    assert.equal(res.statusCode, 400, JSON.stringify(payload));
    assert.equal(typeof res.json().message, "string");
  }
  assert.equal((await post({ name: "base" })).statusCode, 409);
  const first = (await post({ name: "my-env:v1", tags: ["extra"] })).json();
  assert.deepEqual(first.names, ["my-env"]);
  assert.deepEqual(first.tags.sort(), ["extra", "v1"]);
  const second = (await post({ alias: "my-env" })).json();
  assert.equal(second.templateID, first.templateID, "a waiting build reserves the name's id");
  assert.notEqual(second.buildID, first.buildID);
  await app.close();
});

test("upload links: the token opens one hash; the archive is stored; an oversized one is refused and not kept", async () => {
  const app = await testApp();
  const { templateID } = (await app.inject({ method: "POST", url: "/v3/templates", headers: auth, payload: { name: "uploads" } })).json();
  const hash = "12".repeat(32);
  const link = (await app.inject({ method: "GET", url: `/templates/${templateID}/files/${hash}`, headers: auth })).json();
  assert.equal(link.present, false);
  const url = new URL(link.url);
  assert.equal(url.pathname, `/template-files/${hash}`);
  const put = (path: string, payload: Buffer) => app.inject({ method: "PUT", url: path, payload, headers: { "content-type": "application/octet-stream" } });
  assert.equal((await put(url.pathname + url.search, Buffer.from("archive bytes"))).statusCode, 200);
  assert.equal((await app.inject({ method: "GET", url: `/templates/${templateID}/files/${hash}`, headers: auth })).json().present, true);
  assert.equal((await put(`/template-files/${"34".repeat(32)}${url.search}`, Buffer.from("x"))).statusCode, 403, "another hash");
  const bigHash = "56".repeat(32);
  const bigLink = new URL((await app.inject({ method: "GET", url: `/templates/${templateID}/files/${bigHash}`, headers: auth })).json().url);
  const big = await put(bigLink.pathname + bigLink.search, Buffer.alloc(1024 * 1024 + 1));
  assert.equal(big.statusCode, 400);
  assert.match(big.json().message, /larger than the limit/);
  assert.equal((await app.inject({ method: "GET", url: `/templates/${templateID}/files/${bigHash}`, headers: auth })).json().present, false);
  assert.equal((await app.inject({ method: "GET", url: `/templates/${templateID}/files/not-a-hash`, headers: auth })).statusCode, 400);
  assert.equal((await app.inject({ method: "GET", url: `/templates/unknown/files/${hash}`, headers: auth })).statusCode, 404);
  await app.close();
});

test("a build whose base does not exist fails at step base; status pages and level filter; unknown builds 404", async () => {
  const app = await testApp();
  const { templateID, buildID } = (await app.inject({ method: "POST", url: "/v3/templates", headers: auth, payload: { name: "no-base" } })).json();
  const started = await app.inject({ method: "POST", url: `/v2/templates/${templateID}/builds/${buildID}`, headers: auth, payload: { fromTemplate: "nowhere", steps: [{ type: "RUN", args: ["true"] }] } });
  assert.equal(started.statusCode, 202);
  let status: any;
  for (let i = 0; i < 50; i++) {
    status = (await app.inject({ method: "GET", url: `/templates/${templateID}/builds/${buildID}/status`, headers: auth })).json();
    if (status.status === "error") break;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  assert.equal(status.status, "error");
  assert.equal(status.reason.step, "base");
  assert.match(status.reason.message, /nowhere/);
  assert.equal(status.logs.length, status.logEntries.length);
  const errorsOnly = (await app.inject({ method: "GET", url: `/templates/${templateID}/builds/${buildID}/status?level=error`, headers: auth })).json();
  assert.ok(errorsOnly.logEntries.every((entry: { level: string }) => entry.level === "error") && errorsOnly.logEntries.length >= 1);
  const past = (await app.inject({ method: "GET", url: `/templates/${templateID}/builds/${buildID}/status?logsOffset=1000`, headers: auth })).json();
  assert.deepEqual(past.logEntries, []);
  for (const query of ["logsOffset=-1", "logsOffset=x", "level=loud", "limit=1e9"]) {
    assert.equal((await app.inject({ method: "GET", url: `/templates/${templateID}/builds/${buildID}/status?${query}`, headers: auth })).statusCode, 400, query);
  }
  assert.equal((await app.inject({ method: "GET", url: `/templates/${templateID}/builds/nope/status`, headers: auth })).statusCode, 404);
  assert.equal((await app.inject({ method: "GET", url: `/templates/aliases/no-base`, headers: auth })).statusCode, 404, "never built");
  assert.equal((await app.inject({ method: "POST", url: `/v2/templates/${templateID}/builds/${buildID}`, headers: auth, payload: { fromTemplate: "x" } })).statusCode, 409);
  await app.close();
});
