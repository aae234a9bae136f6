/**
 * Pause and resume through the official `e2b` SDK: the hot tier (frozen in RAM, its image
 * written to disk in the background), the durable tier (a checkpoint on disk), filesystem-only
 * pauses, pause on timeout with auto-resume, the JS 2.0.x resume endpoint, and paused sandboxes
 * surviving a server restart and a host reboot.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { Sandbox } from "e2b";
import { hitStateServer, startStateServer as startStateServerIn } from "./state-server.js";
import { e2eRuntime, guestQemuPids, simulateHostReboot, startTestServer, useServerForSdk, type TestServer } from "./harness.js";

let server: TestServer;
const DURABLE_AFTER_SEC = 4;
/** The server's default CUBICLE_PAUSE_IMAGE_AFTER_MS. */
const PAUSE_IMAGE_AFTER_MS = 1000;

before(async () => {
  server = await startTestServer({ extraEnv: { CUBICLE_POOL_SIZE: "", CUBICLE_DURABLE_PAUSE_AFTER_SEC: String(DURABLE_AFTER_SEC) } });
  useServerForSdk(server);
});

after(async () => {
  await server?.stop();
});

async function startStateServer(sandbox: Sandbox, on = server): Promise<void> {
  await sandbox.files.write("/home/user/note.txt", "written before the pause");
  await startStateServerIn(on.url, sandbox);
}

/** GET / on port 8000 of a sandbox, through the router. */
const hit = (sandboxId: string, on = server) => hitStateServer(on.url, sandboxId);

async function waitFor(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 20_000, on = server): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}\n${on.log().slice(-3000)}`);
}

/** The pause images of the runtime under test: the containers' on the storage pool, the microVMs' in the state dir. */
const pausedDir = (on: TestServer) => (e2eRuntime === "microvm" ? path.join(on.stateDir, "microvm", "images", "paused") : path.join(on.runDir, "pool", "images", "paused"));

/** Where a pause's image goes: written while hot (the sandbox still frozen), kept when durable. */
const pauseImage = (sandboxId: string, on = server) => path.join(pausedDir(on), sandboxId);

/** Everything of a sandbox under `paused/`: its image, and any half-written or discarded one. */
function pauseImageEntries(sandboxId: string): string[] {
  const dir = pausedDir(server);
  return fs.existsSync(dir) ? fs.readdirSync(dir).filter((entry) => entry.startsWith(sandboxId)) : [];
}

/** `createdAt` of a complete image: changes only when the sandbox is dumped again. */
const imageCreatedAt = (imageDir: string) => JSON.parse(fs.readFileSync(path.join(imageDir, "meta.json"), "utf8")).createdAt as string;

/** runc's status of a sandbox's container ("paused" = frozen in RAM), or "gone" (durable pause). */
/**
 * The runtime's view of a sandbox: runc's status of its container, or, for a microVM, "paused"
 * while its QEMU exists (its vCPUs stopped: the server's record says paused) and "gone" after.
 */
function containerStatus(sandboxId: string, on = server): string {
  if (e2eRuntime === "microvm") return guestQemuPids(on, sandboxId).length > 0 ? "paused" : "gone";
  try {
    return JSON.parse(execFileSync("runc", ["state", `cubicle-${sandboxId}`], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] })).status;
  } catch {
    return "gone";
  }
}

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

  test("a paused sandbox is killed cleanly, before and after its image is written", async () => {
    const early = await Sandbox.create();
    const late = await Sandbox.create();
    await early.pause();
    await late.pause();
    assert.equal(await early.kill(), true);
    await waitFor("the hot pause's image", () => fs.existsSync(pauseImage(late.sandboxId)));
    assert.equal(await late.kill(), true);
    for (const sandbox of [early, late]) {
      assert.deepEqual(pauseImageEntries(sandbox.sandboxId), [], "no image is left behind");
      assert.equal(await Sandbox.kill(sandbox.sandboxId), false);
    }
  });

  test("a pause resumed within CUBICLE_PAUSE_IMAGE_AFTER_MS is a plain thaw: no image is written", async () => {
    const sandbox = await Sandbox.create();
    try {
      const started = performance.now();
      assert.equal((await server.api("POST", `/sandboxes/${sandbox.sandboxId}/pause`, {})).status, 204);
      assert.equal((await server.api("POST", `/sandboxes/${sandbox.sandboxId}/resume`, { timeout: 60 })).status, 201);
      const cycleMs = performance.now() - started;
      // A loaded host may take longer than the delay; then the image exists and the resume drops it.
      if (cycleMs < PAUSE_IMAGE_AFTER_MS * 0.8) assert.deepEqual(pauseImageEntries(sandbox.sandboxId), [], `nothing under paused/ after a ${cycleMs.toFixed(0)} ms cycle`);
      await new Promise((r) => setTimeout(r, PAUSE_IMAGE_AFTER_MS + 1000));
      assert.deepEqual(pauseImageEntries(sandbox.sandboxId), [], "no image is written for a sandbox that was resumed");
      assert.equal((await sandbox.commands.run("echo alive")).stdout, "alive\n");
    } finally {
      await sandbox.kill();
    }
  });

  test("a hot pause's image is written while it stays frozen; resume thaws it and drops the image", async () => {
    const sandbox = await Sandbox.create({ timeoutMs: 120_000 });
    try {
      await startStateServer(sandbox);
      await sandbox.pause();
      await waitFor("the hot pause's image", () => fs.existsSync(pauseImage(sandbox.sandboxId)));
      assert.equal(containerStatus(sandbox.sandboxId), "paused", "the container stays frozen in RAM while and after its image is written");
      const resumed = await Sandbox.connect(sandbox.sandboxId);
      assert.ok(!fs.existsSync(pauseImage(sandbox.sandboxId)), "the stale image is gone once resumed");
      assert.equal((await hit(sandbox.sandboxId)).body, "s3cret:2");
      assert.equal(await resumed.files.read("/home/user/note.txt"), "written before the pause");
      await waitFor("the stale image's removal", () => pauseImageEntries(sandbox.sandboxId).length === 0);
    } finally {
      await sandbox.kill();
    }
  });
});

describe("durable pause", () => {
  test("after the hot period the paused sandbox moves to disk and still resumes with its state", async () => {
    const sandbox = await Sandbox.create({ timeoutMs: 120_000 });
    try {
      await startStateServer(sandbox);
      // The agent watches each command's exit through a pidfd (SPAWN_NOTE): CRIU must carry it over.
      const sleeper = await sandbox.commands.run("sleep 600", { background: true });
      await sandbox.pause();
      await waitFor("the hot pause's image", () => fs.existsSync(pauseImage(sandbox.sandboxId)), (DURABLE_AFTER_SEC + 20) * 1000);
      const writtenWhileHot = imageCreatedAt(pauseImage(sandbox.sandboxId));
      await waitFor("the pause to leave RAM", () => containerStatus(sandbox.sandboxId) === "gone", (DURABLE_AFTER_SEC + 20) * 1000);
      assert.equal((await sandbox.getInfo()).state, "paused");
      assert.equal(imageCreatedAt(pauseImage(sandbox.sandboxId)), writtenWhileHot, "the image written while hot is kept, not dumped again");

      const started = performance.now();
      const resumed = await Sandbox.connect(sandbox.sandboxId);
      const resumeMs = performance.now() - started;
      assert.equal((await hit(sandbox.sandboxId)).body, "s3cret:2", "memory came back from the checkpoint");
      assert.equal(await resumed.files.read("/home/user/note.txt"), "written before the pause");
      assert.equal((await resumed.commands.run("hostname")).stdout.trim(), sandbox.sandboxId);
      assert.ok((await resumed.commands.list()).some((p) => p.pid === sleeper.pid), "the command survived the checkpoint");
      assert.equal(await resumed.commands.kill(sleeper.pid), true);
      await waitFor("the agent to see the restored command's end", async () => !(await resumed.commands.list()).some((p) => p.pid === sleeper.pid), 10_000);
      assert.ok(!fs.existsSync(pauseImage(sandbox.sandboxId)), "the image is removed once resumed");
      console.log(`resume from disk ${resumeMs.toFixed(1)} ms`);
    } finally {
      await sandbox.kill();
    }
  });

  test("pause({keepMemory: false}) keeps the files but reboots the processes", async () => {
    const sandbox = await Sandbox.create({ envs: { KEPT: "yes" } });
    try {
      await startStateServer(sandbox);
      // Written by the guest's kernel and not yet flushed: a microVM is synced before its disk is saved (MICROVM_FILES_NOTE).
      await sandbox.commands.run("echo 'in the page cache' > /home/user/unsynced.txt");
      assert.equal(await sandbox.pause({ keepMemory: false }), true);
      assert.ok(fs.existsSync(pauseImage(sandbox.sandboxId)));
      const resumed = await Sandbox.connect(sandbox.sandboxId);
      assert.equal(await resumed.files.read("/home/user/note.txt"), "written before the pause");
      assert.equal(await resumed.files.read("/home/user/unsynced.txt"), "in the page cache\n");
      const ps = await resumed.commands.run("pgrep -f 'state_serve[r].py' | wc -l; echo $KEPT; hostname");
      assert.equal(ps.stdout, `0\nyes\n${sandbox.sandboxId}\n`);
    } finally {
      await sandbox.kill();
    }
  });
});

describe("pause on timeout and auto-resume", () => {
  test("onTimeout pause keeps the sandbox, health probes leave it paused, traffic resumes it when autoResume is on", async () => {
    const sandbox = await Sandbox.create({ timeoutMs: 60_000, lifecycle: { onTimeout: "pause", autoResume: true } });
    try {
      // The state server runs as a background command: its stream is open when the timeout
      // pauses the sandbox, and the pause cuts it. The SDK then probes envd's /health, which
      // must not wake the sandbox (it used to, in about one run of five).
      await startStateServer(sandbox);
      const detail = await server.api("GET", `/sandboxes/${sandbox.sandboxId}`);
      assert.deepEqual(detail.json.lifecycle, { autoResume: true, onTimeout: "pause" });
      await sandbox.setTimeout(1_000);
      const seen: string[] = [];
      await waitFor("the pause at timeout", async () => {
        const { state } = await sandbox.getInfo();
        if (seen.at(-1) !== state) seen.push(state);
        return state === "paused";
      }).catch((err: Error) => {
        throw new Error(`${err.message}\nstates seen: ${seen.join(" -> ")}`);
      });
      // isRunning() is a health probe: a paused sandbox is not running, and stays paused.
      assert.equal(await sandbox.isRunning(), false);
      await new Promise((r) => setTimeout(r, 300));
      assert.equal((await sandbox.getInfo()).state, "paused");
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
      await waitFor("the pause to leave RAM", () => containerStatus(durable.sandboxId) === "gone", (DURABLE_AFTER_SEC + 20) * 1000);
      assert.ok(fs.existsSync(pauseImage(durable.sandboxId)));
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

  test("a hot-paused sandbox survives a host reboot", async () => {
    // Its own server, whose pauses stay hot for the whole test: the reboot hits the hot tier.
    const rebooted = await startTestServer({ extraEnv: { CUBICLE_POOL_SIZE: "", CUBICLE_DURABLE_PAUSE_AFTER_SEC: "600" } });
    useServerForSdk(rebooted);
    try {
      const sandbox = await Sandbox.create({ timeoutMs: 120_000 });
      await startStateServer(sandbox, rebooted);
      await sandbox.commands.run("echo 'written in /tmp before the pause' > /tmp/in-tmp.txt");
      assert.equal((await hit(sandbox.sandboxId, rebooted)).body, "s3cret:2");
      await sandbox.pause();
      await waitFor("the hot pause's image", () => fs.existsSync(pauseImage(sandbox.sandboxId, rebooted)), 20_000, rebooted);
      assert.equal(containerStatus(sandbox.sandboxId, rebooted), "paused", "still hot: frozen in RAM");

      await rebooted.crashAndRestart(() => simulateHostReboot(rebooted, [sandbox.sandboxId]));

      const paused = await Sandbox.list({ query: { state: ["paused"] } }).nextItems();
      assert.deepEqual(paused.map((s) => s.sandboxId), [sandbox.sandboxId], `the sandbox lists as paused after the reboot\n${rebooted.log().slice(-3000)}`);
      const resumed = await Sandbox.connect(sandbox.sandboxId);
      assert.equal((await hit(sandbox.sandboxId, rebooted)).body, "s3cret:3", "the background server's memory came back");
      assert.equal(await resumed.files.read("/home/user/note.txt"), "written before the pause");
      assert.equal(await resumed.files.read("/tmp/in-tmp.txt"), "written in /tmp before the pause\n");
      assert.equal((await resumed.commands.run("hostname")).stdout.trim(), sandbox.sandboxId);
      assert.ok(!fs.existsSync(pauseImage(sandbox.sandboxId, rebooted)), "the image is removed once resumed");
    } finally {
      useServerForSdk(server);
      await rebooted.stop();
    }
  });
});
