import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { test } from "node:test";
import { SecretVault } from "../secrets/index.js";
import { SqliteStore } from "../store/index.js";
import { capturingStderr, TEST_KEY, testApp } from "./test-app.js";

const auth = { "x-api-key": TEST_KEY };
const VALUE = "ghp_" + "Zx9".repeat(12);


test("secrets: create, get by id and by name, page, update, delete — no response and no log line holds the value", async () => {
  const store = new SqliteStore(":memory:");
  // A clock a millisecond apart per call: creation order is the list's order (same-millisecond secrets come in id order).
  let clock = Date.UTC(2026, 0, 1);
  const vault = await SecretVault.open(store, randomBytes(32), { now: () => clock++ });
  const app = await testApp({ secrets: vault });
  const bodies: string[] = [];
  const { logged } = await capturingStderr(async () => {
    const call = async (method: "GET" | "POST" | "DELETE", url: string, payload?: unknown) => {
      const res = await app.inject({ method, url, headers: auth, payload: payload as Record<string, unknown> | undefined });
      bodies.push(res.body, JSON.stringify(res.headers));
      return res;
    };
    const created = await call("POST", "/secrets", { name: "GitHub-Token", value: VALUE, metadata: { owner: "ci" } });
    assert.equal(created.statusCode, 201, created.body);
    const secret = created.json();
    assert.deepEqual(Object.keys(secret).sort(), ["createdAt", "currentVersion", "metadata", "name", "secretID", "updatedAt"]);
    assert.equal(secret.name, "github-token");
    assert.equal(secret.currentVersion, 1);
    assert.deepEqual(secret.metadata, { owner: "ci" });
    assert.equal(new Date(secret.createdAt).toISOString(), secret.createdAt);

    for (const ref of [secret.secretID, "github-token", "GITHUB-TOKEN"]) {
      const got = await call("GET", `/secrets/${encodeURIComponent(ref)}`);
      assert.equal(got.statusCode, 200, ref);
      assert.deepEqual(got.json(), secret);
    }
    const duplicate = await call("POST", "/secrets", { name: "github-TOKEN", value: "other" });
    assert.equal(duplicate.statusCode, 409);
    assert.equal(duplicate.json().code, 409);

    for (let i = 0; i < 4; i++) assert.equal((await call("POST", "/secrets", { name: `s${i}`, value: `${VALUE}-${i}` })).statusCode, 201);
    const names: string[] = [];
    let url = "/secrets?limit=2";
    for (let pages = 0; pages < 10; pages++) {
      const page = await call("GET", url);
      assert.equal(page.statusCode, 200);
      names.push(...page.json().map((s: { name: string }) => s.name));
      const token = page.headers["x-next-token"];
      if (!token) break;
      url = `/secrets?limit=2&nextToken=${token}`;
    }
    assert.deepEqual(names, ["github-token", "s0", "s1", "s2", "s3"], "oldest first, each once over the pages");

    const updated = await call("POST", "/secrets/github-token", { value: VALUE + "-new" });
    assert.equal(updated.statusCode, 200);
    assert.equal(updated.json().currentVersion, 2);
    assert.deepEqual(updated.json().metadata, { owner: "ci" }, "metadata kept when not sent");
    assert.equal(vault.resolveSecret("github-token"), VALUE + "-new");
    const withMetadata = await call("POST", `/secrets/${secret.secretID}`, { value: VALUE, metadata: { owner: "ops" } });
    assert.deepEqual([withMetadata.json().currentVersion, withMetadata.json().metadata], [3, { owner: "ops" }]);

    assert.equal((await call("DELETE", "/secrets/GitHub-Token")).statusCode, 204);
    for (const [method, ref] of [["GET", "github-token"], ["POST", "github-token"], ["DELETE", "github-token"], ["GET", "sec_0123"], ["DELETE", secret.secretID]] as const) {
      const res = await call(method, `/secrets/${ref}`, method === "POST" ? { value: "x" } : undefined);
      assert.equal(res.statusCode, 404, `${method} ${ref}`);
      assert.equal(res.json().code, 404);
    }
  });
  for (const body of bodies) assert.ok(!body.includes("Zx9Zx9"), `a response holds the value: ${body.slice(0, 200)}`);
  assert.ok(!logged.includes("Zx9Zx9"), "the log holds the value");
  // The suite runs at CUBICLE_LOG_LEVEL=warn, where info lines are not written at all.
  if (["info", "debug", undefined].includes(process.env.CUBICLE_LOG_LEVEL)) assert.match(logged, /secret created/, "the log was captured");
  await app.close();
  await store.close();
});

test("secrets: bad bodies, names, metadata and query input are 400 E2B bodies that never quote the value", async () => {
  const app = await testApp();
  const cases: unknown[] = [
    {},
    [],
    { name: "x" },
    { name: "x", value: "" },
    { name: "x", value: 7 },
    { name: "", value: VALUE },
    { name: "a{b}", value: VALUE },
    { name: "tab\there", value: VALUE },
    { name: "sec_mine", value: VALUE },
    { name: "n".repeat(129), value: VALUE },
    { name: "x", value: VALUE + "v".repeat(64 * 1024) },
    { name: "x", value: VALUE, metadata: { k: 5 } },
    { name: "x", value: VALUE, metadata: Object.fromEntries(Array.from({ length: 33 }, (_, i) => [`k${i}`, "v"])) },
  ];
  for (const payload of cases) {
    const res = await app.inject({ method: "POST", url: "/secrets", headers: auth, payload: payload as Record<string, unknown> });
    assert.equal(res.statusCode, 400, `${JSON.stringify(payload).slice(0, 80)} -> ${res.body.slice(0, 200)}`);
    assert.equal(res.json().code, 400);
    assert.ok(!res.body.includes("Zx9Zx9"), res.body.slice(0, 200));
  }
  const notJson = await app.inject({ method: "POST", url: "/secrets", headers: { ...auth, "content-type": "application/json" }, payload: `{"name":"x","value":"${VALUE}"` });
  assert.equal(notJson.statusCode, 400);
  assert.ok(!notJson.body.includes("Zx9Zx9"));
  const update = await app.inject({ method: "POST", url: "/secrets/x", headers: auth, payload: { metadata: {} } });
  assert.equal(update.statusCode, 400, "an update needs a value (checked before the lookup)");
  for (const query of ["limit=0", "limit=101", "limit=abc", "limit=1&limit=2", "nextToken=abc", `nextToken=${Buffer.from("1.inotasecret").toString("base64url")}`]) {
    const res = await app.inject({ method: "GET", url: `/secrets?${query}`, headers: auth });
    assert.equal(res.statusCode, 400, query);
    assert.equal(res.json().code, 400);
  }
  await app.close();
});

test("secrets: a 128-byte name, percent-encoded in the path, is found by name; longer path segments are 400s", async () => {
  const app = await testApp();
  const name = "é".repeat(64);
  assert.equal((await app.inject({ method: "POST", url: "/secrets", headers: auth, payload: { name, value: "v" } })).statusCode, 201);
  const got = await app.inject({ method: "GET", url: `/secrets/${encodeURIComponent(name.toUpperCase())}`, headers: auth });
  assert.equal(got.statusCode, 200, got.body);
  assert.equal(got.json().name, name);
  const tooLong = await app.inject({ method: "GET", url: `/secrets/${"x".repeat(385)}`, headers: auth });
  assert.equal(tooLong.statusCode, 400);
  assert.match(tooLong.json().message, /at most 384 characters/);
  await app.close();
});

test("secrets: a store failure is a 500 with an error id; neither the answer nor the log holds the value", async () => {
  const store = new SqliteStore(":memory:");
  const vault = await SecretVault.open(store, randomBytes(32));
  const app = await testApp({ secrets: vault });
  await store.close();
  const { result: res, logged } = await capturingStderr(() => app.inject({ method: "POST", url: "/secrets", headers: auth, payload: { name: "x", value: VALUE } }));
  assert.equal(res.statusCode, 500);
  assert.match(res.json().message, /error id/);
  assert.match(logged, /request failed/);
  assert.ok(!logged.includes("Zx9Zx9") && !res.body.includes("Zx9Zx9"));
  await app.close();
});
