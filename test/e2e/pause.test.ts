/**
 * Pause and resume through the official `e2b` SDK: the hot tier (frozen in RAM), the durable
 * tier (a checkpoint on disk), filesystem-only pauses, pause on timeout with auto-resume, the
 * JS 2.0.x resume endpoint, and paused sandboxes surviving a server restart.
 */
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { Sandbox } from "e2b";
import { hitStateServer, startStateServer as startStateServerIn } from "./state-server.js";
import { startTestServer, useServerForSdk, type TestServer } from "./harness.js";

let server: TestServer;
const DURABLE_AFTER_SEC = 4;

before(async () => {
  server = await startTestServer({ extraEnv: { CUBICLE_POOL_SIZE: "", CUBICLE_DURABLE_PAUSE_AFTER_SEC: String(DURABLE_AFTER_SEC) } });
  useServerForSdk(server);
});

after(async () => {
  await server?.stop();
});

async function startStateServer(sandbox: Sandbox): Promise<void> {
  await sandbox.files.write("/home/user/note.txt", "written before the pause");
  await startStateServerIn(server.url, sandbox);
}

/** GET / on port 8000 of a sandbox, through the router. */
const hit = (sandboxId: string) => hitStateServer(server.url, sandboxId);

async function waitFor(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}\n${server.log().slice(-3000)}`);
}

const durableImage = (sandboxId: string) => path.join(server.stateDir, "paused", sandboxId);

describe("hot pause", () => {
  test("pause freezes the sandbox; connect resumes it with processes, memory and files intact", async () => {
    const sandbox = await Sandbox.create({ timeoutMs: 120_000 });
    try {
      await startStateServer(sandbox);
      assert.equal((await hit(sandbox.sandboxId)).body, "s3cret:2");

      const pauseStarted = performance.now();
      assert.equal(await sandbox.pause(), true);
      const pauseMs = performance.now() - pauseStarted;
      assert.equal(await sandbox.pause(), false, "a second pause reports already paused (409)");

      const info = await sandbox.getInfo();
      assert.equal(info.state, "paused");
      const listed = await Sandbox.list({ query: { state: ["paused"] } }).nextItems();
      assert.ok(listed.some((s) => s.sandboxId === sandbox.sandboxId && s.state === "paused"));
      // Without auto-resume the router treats a paused sandbox as not there.
      assert.equal(await sandbox.isRunning(), false);
      const refused = await hit(sandbox.sandboxId);
      assert.equal(refused.status, 502);

      const resumeStarted = performance.now();
      const connect = await server.api("POST", `/v2/sandboxes/${sandbox.sandboxId}/connect`, { timeout: 120 });
      const resumeMs = performance.now() - resumeStarted;
      assert.equal(connect.status, 201, "connect of a paused sandbox answers 201 (resumed)");
      const again = await server.api("POST", `/v2/sandboxes/${sandbox.sandboxId}/connect`, { timeout: 120 });
      assert.equal(again.status, 200, "connect of a running sandbox answers 200");

      const resumed = await Sandbox.connect(sandbox.sandboxId);
      assert.equal((await hit(sandbox.sandboxId)).body, "s3cret:3", "the Python process kept its memory");
      assert.equal(await resumed.files.read("/home/user/note.txt"), "written before the pause");
      assert.equal((await resumed.commands.run("echo alive")).stdout, "alive\n");
      console.log(`hot pause ${pauseMs.toFixed(1)} ms, resume ${resumeMs.toFixed(1)} ms`);
    } finally {
      await sandbox.kill();
    }
  });

  test("pause and resume status codes: 404 unknown, 409 resume of a running sandbox, 201 resume", async () => {
    assert.equal((await server.api("POST", "/sandboxes/inosuchsandbox/pause", {})).status, 404);
    assert.equal((await server.api("POST", "/sandboxes/inosuchsandbox/resume", { timeout: 60 })).status, 404);
    const sandbox = await Sandbox.create();
    try {
      const running = await server.api("POST", `/sandboxes/${sandbox.sandboxId}/resume`, { timeout: 60, autoPause: false });
      assert.equal(running.status, 409);
      assert.equal(running.json.code, 409);
      assert.equal((await server.api("POST", `/sandboxes/${sandbox.sandboxId}/pause`, {})).status, 204);
      const paused = await server.api("POST", `/sandboxes/${sandbox.sandboxId}/pause`, {});
      assert.equal(paused.status, 409);
      assert.equal(paused.json.code, 409);
      const resumed = await server.api("POST", `/sandboxes/${sandbox.sandboxId}/resume`, { timeout: 60, autoPause: false });
      assert.equal(resumed.status, 201);
      assert.equal(resumed.json.sandboxID, sandbox.sandboxId);
      assert.equal((await sandbox.commands.run("true")).exitCode, 0);
    } finally {
      await sandbox.kill();
    }
  });

  test("a paused sandbox is killed cleanly", async () => {
    const sandbox = await Sandbox.create();
    await sandbox.pause();
    assert.equal(await sandbox.kill(), true);
    assert.equal(await Sandbox.kill(sandbox.sandboxId), false);
  });
});

describe("durable pause", () => {
  test("after the hot period the paused sandbox moves to disk and still resumes with its state", async () => {
    const sandbox = await Sandbox.create({ timeoutMs: 120_000 });
    try {
      await startStateServer(sandbox);
      await sandbox.pause();
      await waitFor("the pause to reach disk", () => fs.existsSync(durableImage(sandbox.sandboxId)), (DURABLE_AFTER_SEC + 20) * 1000);
      assert.equal((await sandbox.getInfo()).state, "paused");

      const started = performance.now();
      const resumed = await Sandbox.connect(sandbox.sandboxId);
      const resumeMs = performance.now() - started;
      assert.equal((await hit(sandbox.sandboxId)).body, "s3cret:2", "memory came back from the checkpoint");
      assert.equal(await resumed.files.read("/home/user/note.txt"), "written before the pause");
      assert.equal((await resumed.commands.run("hostname")).stdout.trim(), sandbox.sandboxId);
      assert.ok(!fs.existsSync(durableImage(sandbox.sandboxId)), "the image is removed once resumed");
      console.log(`resume from disk ${resumeMs.toFixed(1)} ms`);
    } finally {
      await sandbox.kill();
    }
  });

  test("pause({keepMemory: false}) keeps the files but reboots the processes", async () => {
    const sandbox = await Sandbox.create({ envs: { KEPT: "yes" } });
    try {
      await startStateServer(sandbox);
      assert.equal(await sandbox.pause({ keepMemory: false }), true);
      assert.ok(fs.existsSync(durableImage(sandbox.sandboxId)));
      const resumed = await Sandbox.connect(sandbox.sandboxId);
      assert.equal(await resumed.files.read("/home/user/note.txt"), "written before the pause");
      const ps = await resumed.commands.run("pgrep -f 'state_serve[r].py' | wc -l; echo $KEPT; hostname");
      assert.equal(ps.stdout, `0\nyes\n${sandbox.sandboxId}\n`);
    } finally {
      await sandbox.kill();
    }
  });
});

describe("pause on timeout and auto-resume", () => {
  test("onTimeout pause keeps the sandbox; traffic resumes it when autoResume is on", async () => {
    const sandbox = await Sandbox.create({ timeoutMs: 60_000, lifecycle: { onTimeout: "pause", autoResume: true } });
    try {
      await startStateServer(sandbox);
      const detail = await server.api("GET", `/sandboxes/${sandbox.sandboxId}`);
      assert.deepEqual(detail.json.lifecycle, { autoResume: true, onTimeout: "pause" });
      await sandbox.setTimeout(1_000);
      await waitFor("the pause at timeout", async () => (await sandbox.getInfo()).state === "paused");
      // The request waits for the resume and gets its answer from the same process.
      assert.deepEqual(await hit(sandbox.sandboxId), { status: 200, body: "s3cret:2" });
      assert.equal((await sandbox.getInfo()).state, "running");
    } finally {
      await sandbox.kill();
    }
  });
});

describe("restart", () => {
  test("hot and durable paused sandboxes survive a server crash and resume", async () => {
    const hot = await Sandbox.create({ timeoutMs: 120_000 });
    const durable = await Sandbox.create({ timeoutMs: 120_000 });
    try {
      await startStateServer(hot);
      await startStateServer(durable);
      await durable.pause();
      await waitFor("the pause to reach disk", () => fs.existsSync(durableImage(durable.sandboxId)), (DURABLE_AFTER_SEC + 20) * 1000);
      await hot.pause();

      await server.crashAndRestart();

      const paused = await Sandbox.list({ query: { state: ["paused"] } }).nextItems();
      assert.deepEqual(paused.map((s) => s.sandboxId).sort(), [hot.sandboxId, durable.sandboxId].sort());
      for (const sandbox of [hot, durable]) {
        const resumed = await Sandbox.connect(sandbox.sandboxId);
        assert.equal((await hit(sandbox.sandboxId)).body, "s3cret:2");
        assert.equal(await resumed.files.read("/home/user/note.txt"), "written before the pause");
      }
    } finally {
      await hot.kill();
      await durable.kill();
    }
  });
});
