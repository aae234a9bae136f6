/**
 * Sandbox lifecycle through the official `e2b` SDK: 2.51 (v2 paths) and 2.45 (v1 paths).
 */
import assert from "node:assert/strict";
import http from "node:http";
import { after, before, describe, test } from "node:test";
import { Sandbox, SandboxNotFoundError, AuthenticationError } from "e2b";
import { Sandbox as SandboxV1 } from "e2b-v1";
import { e2eRuntime, startTestServer, useServerForSdk, type TestServer } from "./harness.js";

let server: TestServer;

/** fetch() may not set Host (a forbidden header); node:http can. */
function getWithHost(url: string, host: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { headers: { host } }, (res) => {
      let body = "";
      res.on("data", (chunk) => (body += chunk));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on("error", reject);
  });
}

before(async () => {
  // "secure sandboxes" creates a v1 sandbox with secure: false on purpose.
  server = await startTestServer({ extraEnv: { CUBICLE_REQUIRE_SECURE: "false" } });
  useServerForSdk(server);
});

after(async () => {
  await server?.stop();
});

describe("create, getInfo and kill (e2b 2.51, /v2 paths)", () => {
  test("a created sandbox runs commands and reports its metadata, envs and timeout", async () => {
    const started = Date.now();
    const sandbox = await Sandbox.create({ metadata: { owner: "alice", purpose: "e2e" }, envs: { GREETING: "hello from cubicle" }, timeoutMs: 120_000 });
    try {
      assert.match(sandbox.sandboxId, /^[a-z0-9]+$/);
      const run = await sandbox.commands.run("echo $GREETING; whoami; pwd");
      assert.equal(run.exitCode, 0);
      assert.equal(run.stdout, "hello from cubicle\nuser\n/home/user\n");

      const info = await sandbox.getInfo();
      assert.equal(info.sandboxId, sandbox.sandboxId);
      assert.equal(info.templateId, "base");
      assert.deepEqual(info.metadata, { owner: "alice", purpose: "e2e" });
      assert.equal(info.state, "running");
      const lifetimeMs = info.endAt.getTime() - info.startedAt.getTime();
      assert.ok(Math.abs(lifetimeMs - 120_000) < 5_000, `lifetime ${lifetimeMs} ms`);
      assert.ok(info.startedAt.getTime() >= started - 2000);
      assert.equal(await sandbox.isRunning(), true);
    } finally {
      assert.equal(await sandbox.kill(), true);
    }
    assert.equal(await sandbox.isRunning(), false);
    assert.equal(await Sandbox.kill(sandbox.sandboxId), false);
    await assert.rejects(Sandbox.getInfo(sandbox.sandboxId), SandboxNotFoundError);
  });

  test("an unknown template is a clear 404, a bad key an AuthenticationError", async () => {
    await assert.rejects(Sandbox.create("no-such-template"), (err: Error) => /not found/i.test(err.message));
    await assert.rejects(Sandbox.create({ apiKey: "e2b_" + "ab".repeat(20) }), AuthenticationError);
  });

  test("bad create bodies get {code, message} with code equal to the status", async () => {
    for (const body of [{}, { templateID: 5 }, { templateID: "base", timeout: -1 }, { templateID: "base", metadata: { a: 1 } }]) {
      const res = await server.api("POST", "/v2/sandboxes", body);
      assert.equal(res.status, 400, JSON.stringify(body));
      assert.equal(res.json.code, 400);
      assert.equal(typeof res.json.message, "string");
    }
    const garbage = await fetch(server.url + "/v2/sandboxes", { method: "POST", headers: { "x-api-key": server.apiKey, "content-type": "application/json" }, body: "{not json" });
    assert.equal(garbage.status, 400);
    assert.equal((await garbage.json()).code, 400);
  });
});

describe("list with filters and paging", () => {
  test("metadata, state and template filters, order and X-Next-Token paging", async () => {
    const tag = `run${Date.now()}`;
    const sandboxes = [];
    for (let i = 0; i < 3; i++) sandboxes.push(await Sandbox.create({ metadata: { suite: tag, "odd key&=": i % 2 ? "y&es" : "no", index: String(i) } }));
    try {
      const all = await Sandbox.list({ query: { metadata: { suite: tag } } }).nextItems();
      assert.deepEqual(all.map((s) => s.sandboxId).sort(), sandboxes.map((s) => s.sandboxId).sort());
      assert.ok(all.every((s) => s.state === "running" && s.templateId === "base"));

      const odd = await Sandbox.list({ query: { metadata: { suite: tag, "odd key&=": "y&es" } } }).nextItems();
      assert.deepEqual(odd.map((s) => s.metadata.index), ["1"]);

      const paused = await Sandbox.list({ query: { metadata: { suite: tag }, state: ["paused"] } }).nextItems();
      assert.equal(paused.length, 0);

      const paginator = Sandbox.list({ query: { metadata: { suite: tag } }, limit: 2 });
      const first = await paginator.nextItems();
      assert.equal(first.length, 2);
      assert.equal(paginator.hasNext, true);
      const second = await paginator.nextItems();
      assert.equal(second.length, 1);
      assert.equal(paginator.hasNext, false);
      // Default order is newest first.
      assert.deepEqual([...first, ...second].map((s) => s.metadata.index), ["2", "1", "0"]);

      const asc = await server.api("GET", `/v2/sandboxes?order=asc&template=base&metadata=${encodeURIComponent(`suite=${tag}`)}`);
      assert.deepEqual(asc.json.map((s: { metadata: Record<string, string> }) => s.metadata.index), ["0", "1", "2"]);

      const later = await server.api("GET", `/v2/sandboxes?startedAfter=${encodeURIComponent(new Date(Date.now() + 60_000).toISOString())}`);
      assert.deepEqual(later.json, []);

      const bad = await server.api("GET", "/v2/sandboxes?limit=1000");
      assert.equal(bad.status, 400);
      assert.equal(bad.json.code, 400);
    } finally {
      await Promise.all(sandboxes.map((s) => s.kill()));
    }
  });
});

describe("timeouts and connect", () => {
  test("setTimeout shortens the life and the reaper kills at endAt", async () => {
    const sandbox = await Sandbox.create({ timeoutMs: 300_000 });
    await sandbox.setTimeout(2_000);
    const info = await sandbox.getInfo();
    assert.ok(info.endAt.getTime() - Date.now() < 3_000);
    await new Promise((r) => setTimeout(r, 4_000));
    assert.equal(await sandbox.isRunning(), false);
    await assert.rejects(sandbox.getInfo(), SandboxNotFoundError);
  });

  test("connect returns the running sandbox and only extends its TTL", async () => {
    const sandbox = await Sandbox.create({ timeoutMs: 600_000 });
    try {
      const endBefore = (await sandbox.getInfo()).endAt.getTime();
      const connected = await Sandbox.connect(sandbox.sandboxId, { timeoutMs: 10_000 });
      assert.equal(connected.sandboxId, sandbox.sandboxId);
      assert.equal((await connected.getInfo()).endAt.getTime(), endBefore, "a shorter connect timeout must not shorten the TTL");
      const run = await connected.commands.run("echo connected");
      assert.equal(run.stdout, "connected\n");
      await Sandbox.connect(sandbox.sandboxId, { timeoutMs: 1_200_000 });
      assert.ok((await sandbox.getInfo()).endAt.getTime() > endBefore + 500_000);
      await assert.rejects(Sandbox.connect("inosuchsandbox000000000"), SandboxNotFoundError);
    } finally {
      await sandbox.kill();
    }
  });
});

describe("older SDK on the v1 paths (e2b 2.45)", () => {
  test("create, run, connect, list and kill", async () => {
    const sandbox = await SandboxV1.create({ metadata: { sdk: "v1" }, envs: { WHO: "v1" } });
    try {
      const run = await sandbox.commands.run("echo $WHO");
      assert.equal(run.stdout, "v1\n");
      const connected = await SandboxV1.connect(sandbox.sandboxId);
      assert.equal((await connected.commands.run("true")).exitCode, 0);
      const listed = await SandboxV1.list({ query: { metadata: { sdk: "v1" } } }).nextItems();
      assert.deepEqual(listed.map((s) => s.sandboxId), [sandbox.sandboxId]);
    } finally {
      assert.equal(await sandbox.kill(), true);
    }
  });
});

describe("secure sandboxes", () => {
  test("envd demands the access token; a non-secure v1 sandbox has none", async () => {
    const secure = await Sandbox.create();
    const info = await server.api("GET", `/sandboxes/${secure.sandboxId}`);
    const token = info.json.envdAccessToken as string;
    assert.ok(token && token.length >= 16);
    const routed = { "e2b-sandbox-id": secure.sandboxId, "e2b-sandbox-port": "49983", "content-type": "application/json", "connect-protocol-version": "1" };
    const without = await fetch(server.url + "/filesystem.Filesystem/Stat", { method: "POST", headers: routed, body: JSON.stringify({ path: "/" }) });
    assert.equal(without.status, 401);
    const wrong = await fetch(server.url + "/filesystem.Filesystem/Stat", { method: "POST", headers: { ...routed, "x-access-token": "nope" }, body: JSON.stringify({ path: "/" }) });
    assert.equal(wrong.status, 401);
    const right = await fetch(server.url + "/filesystem.Filesystem/Stat", { method: "POST", headers: { ...routed, "x-access-token": token }, body: JSON.stringify({ path: "/" }) });
    assert.equal(right.status, 200);
    await secure.kill();

    const created = await server.api("POST", "/sandboxes", { templateID: "base", timeout: 60, secure: false });
    assert.equal(created.status, 201);
    assert.equal(created.json.envdAccessToken, undefined);
    const open = await fetch(server.url + "/filesystem.Filesystem/Stat", {
      method: "POST",
      headers: { ...routed, "e2b-sandbox-id": created.json.sandboxID },
      body: JSON.stringify({ path: "/" }),
    });
    assert.equal(open.status, 200);
    await server.api("DELETE", `/sandboxes/${created.json.sandboxID}`);
  });

  test("the router answers 502 JSON for unknown sandboxes and routes by Host too", async () => {
    const res = await fetch(server.url + "/health", { headers: { "e2b-sandbox-id": "inosuchsandbox", "e2b-sandbox-port": "49983" } });
    assert.equal(res.status, 502);
    assert.deepEqual(await res.json(), { message: "The sandbox was not found", sandboxId: "inosuchsandbox", code: 502 });

    const sandbox = await Sandbox.create();
    try {
      const byHost = await getWithHost(server.url + "/health", `49983-${sandbox.sandboxId}.cubicle.test`);
      assert.equal(byHost.status, 204);
      // Any other port goes to that port inside the sandbox.
      await sandbox.commands.run("python3 -m http.server 8080 --bind 0.0.0.0 >/dev/null 2>&1", { background: true });
      let status = 0;
      for (let i = 0; i < 50 && status !== 200; i++) {
        const r = await getWithHost(server.url + "/", `8080-${sandbox.sandboxId}.cubicle.test`).catch(() => undefined);
        status = r?.status ?? 0;
        if (status !== 200) await new Promise((r) => setTimeout(r, 100));
      }
      assert.equal(status, 200);
    } finally {
      await sandbox.kill();
    }
  });
});

describe("server health", () => {
  test("GET /health needs no key and answers 200 when ready", async () => {
    const res = await fetch(server.url + "/health");
    assert.equal(res.status, 200);
    const denied = await fetch(server.url + "/v2/sandboxes");
    assert.equal(denied.status, 401);
    assert.equal((await denied.json()).code, 401);
  });
});

test("runtime (Cubicle extension): getInfo and list show it; a create asks for one, and one this host lacks is a clear 400", async () => {
  const created = await server.api("POST", "/v2/sandboxes", { templateID: "base", runtime: "container", timeout: 60 });
  assert.equal(created.status, 201, JSON.stringify(created.json));
  try {
    const info = await server.api("GET", `/sandboxes/${created.json.sandboxID}`);
    assert.equal(info.json.runtime, "container");
    const listed = await server.api("GET", "/v2/sandboxes");
    assert.equal(listed.json.find((s: { sandboxID: string }) => s.sandboxID === created.json.sandboxID)?.runtime, "container");
  } finally {
    await server.api("DELETE", `/sandboxes/${created.json.sandboxID}`);
  }
  const microvm = await server.api("POST", "/v2/sandboxes", { templateID: "base", runtime: "microvm" });
  if (e2eRuntime === "microvm") {
    // This run's servers run microVMs: the create is one.
    assert.equal(microvm.status, 201, JSON.stringify(microvm.json));
    assert.equal((await server.api("GET", `/sandboxes/${microvm.json.sandboxID}`)).json.runtime, "microvm");
    await server.api("DELETE", `/sandboxes/${microvm.json.sandboxID}`);
  } else {
    assert.equal(microvm.status, 400);
    assert.match(microvm.json.message, /cannot run microvm sandboxes/);
  }
  const bad = await server.api("POST", "/v2/sandboxes", { templateID: "base", runtime: "vm" });
  assert.equal(bad.status, 400);
  assert.match(bad.json.message, /runtime must be "container" or "microvm"/);
});
