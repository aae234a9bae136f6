/**
 * Secrets through the official `e2b` SDK's `Secret` (create, list page by page, getInfo by id and
 * by name, update, exists, destroy, bad inputs) against a real server; the value must not show up
 * in any response, in the server's log or in the database files in clear. Also the egress audit
 * log's REST route, `GET /metrics` and `./cubicle sandbox egress` on a real sandbox.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";
import { Sandbox, Secret, SecretError, SecretNotFoundError } from "e2b";
import { startTestServer, useServerForSdk, type TestServer } from "./harness.js";

const repoRoot = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..", "..");
let server: TestServer;
/** Every raw response body and header set seen by this file's own calls. */
const seen: string[] = [];

const VALUE = "sk-e2e-" + "Qv8".repeat(14);
const MARK = "Qv8Qv8Qv8";

before(async () => {
  // Info lines on: the test reads the log for the value (the suite runs at warn).
  server = await startTestServer({ extraEnv: { CUBICLE_LOG_LEVEL: "info" } });
  useServerForSdk(server);
});

after(async () => {
  await server?.stop();
});

async function raw(method: string, urlPath: string, body?: unknown) {
  const res = await server.api(method, urlPath, body);
  seen.push(JSON.stringify(res.json ?? null), JSON.stringify([...res.headers]));
  return res;
}

function cubicle(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [path.join(repoRoot, "dist", "cli.js"), ...args], { env: server.env }, (error, stdout, stderr) => {
      resolve({ code: error ? Number((error as NodeJS.ErrnoException & { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}

test("Secret: create, getInfo by id and by name, list page by page, update, exists, destroy", async () => {
  const created = await Secret.create("Deploy-Key", VALUE, { metadata: { owner: "ci" } });
  assert.match(created.secretId, /^sec_/);
  assert.equal(created.name, "deploy-key", "names are lower-cased");
  assert.equal(created.version, 1);
  assert.deepEqual(created.metadata, { owner: "ci" });
  assert.ok(created.createdAt instanceof Date && !Number.isNaN(created.createdAt.getTime()));

  assert.deepEqual(await Secret.getInfo(created.secretId), created);
  assert.deepEqual(await Secret.getInfo("DEPLOY-KEY"), created);

  for (let i = 0; i < 4; i++) await Secret.create(`extra-${i}`, `${VALUE}-${i}`);
  const paginator = Secret.list({ limit: 2 });
  const names: string[] = [];
  let pages = 0;
  while (paginator.hasNext && pages < 10) {
    names.push(...(await paginator.nextItems()).map((s) => s.name));
    pages++;
  }
  assert.equal(pages, 3, "5 secrets in pages of 2");
  assert.deepEqual([...names].sort(), ["deploy-key", "extra-0", "extra-1", "extra-2", "extra-3"]);

  const updated = await Secret.update("deploy-key", VALUE + "-v2");
  assert.equal(updated.version, 2);
  assert.deepEqual(updated.metadata, { owner: "ci" }, "metadata kept when not sent");
  assert.ok(updated.updatedAt.getTime() >= created.updatedAt.getTime());
  const relabeled = await Secret.update(created.secretId, VALUE + "-v3", { metadata: { owner: "ops" } });
  assert.deepEqual([relabeled.version, relabeled.metadata], [3, { owner: "ops" }]);

  assert.equal(await Secret.exists("deploy-key"), true);
  assert.equal(await Secret.exists("no-such-secret"), false);
  await assert.rejects(Secret.update("no-such-secret", "x"), SecretNotFoundError);

  const listedRaw = await raw("GET", "/secrets?limit=1");
  assert.equal(listedRaw.status, 200);
  assert.ok(listedRaw.headers.get("x-next-token"));
  await raw("GET", `/secrets/${created.secretId}`);

  assert.equal(await Secret.destroy("Deploy-Key"), true);
  assert.equal(await Secret.destroy("deploy-key"), false);
  await assert.rejects(Secret.getInfo(created.secretId), SecretNotFoundError);
  for (let i = 0; i < 4; i++) assert.equal(await Secret.destroy(`extra-${i}`), true);
});

test("Secret: a taken name is a 409, bad names, values and metadata are 400s that do not quote the value", async () => {
  await Secret.create("taken", VALUE);
  await assert.rejects(Secret.create("TAKEN", VALUE), (err: Error) => err instanceof SecretError && /^409: /.test(err.message) && !err.message.includes(MARK));
  const bad: [string, string, Record<string, string> | undefined, RegExp][] = [
    ["", VALUE, undefined, /name is required/],
    ["with{brace}", VALUE, undefined, /not usable/],
    ["ctl\u0001", VALUE, undefined, /not usable/],
    ["sec_reserved", VALUE, undefined, /reserved/],
    ["x".repeat(129), VALUE, undefined, /128 bytes/],
    ["empty-value", "", undefined, /must not be empty/],
    ["huge-value", VALUE + "z".repeat(64 * 1024), undefined, /65536 bytes/],
    ["many-metadata", VALUE, Object.fromEntries(Array.from({ length: 33 }, (_, i) => [`k${i}`, "v"])), /32 entries/],
    ["big-metadata", VALUE, { k: "v".repeat(1025) }, /1024 bytes/],
  ];
  for (const [name, value, metadata, message] of bad) {
    await assert.rejects(Secret.create(name, value, metadata ? { metadata } : {}), (err: Error) => {
      assert.ok(err instanceof SecretError, String(err));
      assert.match(err.message, /^400: /);
      assert.match(err.message, message);
      assert.ok(!err.message.includes(MARK), err.message.slice(0, 200));
      return true;
    }, name.slice(0, 20));
  }
  const noValue = await raw("POST", "/secrets/taken", { metadata: {} });
  assert.equal(noValue.status, 400);
  assert.equal(noValue.json.code, 400);
  assert.equal(await Secret.destroy("taken"), true);
});

test("the value is in no response, not in the server's log, and not in the database files in clear", async () => {
  await Secret.create("kept", VALUE);
  for (const text of seen) assert.ok(!text.includes(MARK), `a response holds the value: ${text.slice(0, 200)}`);
  assert.match(server.log(), /secret created/, "the server's log was read");
  assert.ok(!server.log().includes(MARK), "the server's log holds the value");
  const files = fs.readdirSync(server.stateDir).filter((name) => name.startsWith("cubicle.db"));
  assert.ok(files.includes("cubicle.db"), files.join(","));
  for (const name of files) assert.equal(fs.readFileSync(path.join(server.stateDir, name)).includes(Buffer.from(MARK)), false, `${name} holds the value in clear`);
  const key = fs.statSync(path.join(server.stateDir, "secrets.key"));
  assert.equal(key.size, 32);
  assert.equal(key.mode & 0o777, 0o600);
});

test("egress log and metrics: a live sandbox has an empty log, an unknown one a 404; /metrics counts it; ./cubicle sandbox egress", async () => {
  const sandbox = await Sandbox.create({ timeoutMs: 120_000 });
  try {
    const log = await raw("GET", `/sandboxes/${sandbox.sandboxId}/network/egress`);
    assert.equal(log.status, 200);
    assert.ok(Array.isArray(log.json));
    assert.equal((await raw("GET", "/sandboxes/inosuchsandbox/network/egress")).status, 404);
    assert.equal((await raw("GET", `/sandboxes/${sandbox.sandboxId}/network/egress?limit=0`)).status, 400);

    const metrics = await fetch(`${server.url}/metrics`, { headers: { "x-api-key": server.apiKey } });
    assert.equal(metrics.status, 200);
    const text = await metrics.text();
    assert.match(text, /^cubicle_sandboxes\{state="running"\} 1$/m);
    assert.match(text, /^# TYPE cubicle_egress_connections_total counter$/m);
    assert.equal((await fetch(`${server.url}/metrics`)).status, 401);

    const cli = await cubicle(["sandbox", "egress", sandbox.sandboxId, "--limit", "5"]);
    assert.equal(cli.code, 0, cli.stderr);
    assert.ok(log.json.length > 0 ? /^TIME\s+PROTO/.test(cli.stdout) : cli.stdout.includes(`no egress recorded for ${sandbox.sandboxId}`), cli.stdout);
    const asJson = await cubicle(["sandbox", "egress", sandbox.sandboxId, "--json"]);
    assert.equal(asJson.code, 0, asJson.stderr);
    assert.ok(Array.isArray(JSON.parse(asJson.stdout)));
    const unknown = await cubicle(["sandbox", "egress", "inosuchsandbox"]);
    assert.equal(unknown.code, 1);
    assert.match(unknown.stderr, /404/);
    const badLimit = await cubicle(["sandbox", "egress", sandbox.sandboxId, "--limit", "zero"]);
    assert.equal(badLimit.code, 1);
    assert.match(badLimit.stderr, /--limit/);
  } finally {
    await sandbox.kill();
  }
});
