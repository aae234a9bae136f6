/**
 * Idle tiers through the official `e2b` SDK against a real server with real sandboxes: a quiet
 * sandbox is frozen after CUBICLE_IDLE_FREEZE_SECONDS and moved to disk after
 * CUBICLE_IDLE_DISK_SECONDS more; a running command or an open stream keeps it awake; the next
 * SDK call wakes it transparently with its files and processes; kill from either tier leaves
 * nothing; bad settings stop the server at start.
 */
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { Sandbox } from "e2b";
import { e2eRuntime, guestQemuPids, startTestServer, useServerForSdk, type TestServer } from "./harness.js";

const FREEZE_SEC = 1;
const DISK_SEC = 3;
let server: TestServer;

before(async () => {
  // Info level: the wake times are read from the server's log.
  server = await startTestServer({ extraEnv: { CUBICLE_IDLE_FREEZE_SECONDS: String(FREEZE_SEC), CUBICLE_IDLE_DISK_SECONDS: String(DISK_SEC), CUBICLE_LOG_LEVEL: "info" } });
  useServerForSdk(server);
});

after(async () => {
  await server?.stop();
});

/** `cubicleIdle` of getInfo (a plain request: it counts as no activity), or "awake". */
async function idleTier(sandboxId: string): Promise<string> {
  const res = await server.api("GET", `/sandboxes/${sandboxId}`);
  assert.equal(res.status, 200, JSON.stringify(res.json));
  assert.equal(res.json.state, "running", "an idle sandbox is running for its user");
  return res.json.cubicleIdle ?? "awake";
}

/**
 * A freshly booted microVM under TCG stays busy (its boot's tail, emulated) for several seconds
 * before it is quiet enough to freeze; its waits are longer.
 */
const SLOWER = e2eRuntime === "microvm" ? 4 : 1;

async function waitForTier(sandboxId: string, tier: string, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs * SLOWER;
  while (Date.now() < deadline) {
    if ((await idleTier(sandboxId)) === tier) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`sandbox ${sandboxId} never reached tier ${tier}\n${server.log().slice(-3000)}`);
}

/**
 * runc's status of a sandbox's container ("paused" = frozen), or "gone". A microVM's is
 * "present" while its QEMU exists (frozen or not: its vCPUs' state is the server's to ask over
 * QMP), else "gone".
 */
function containerStatus(sandboxId: string): string {
  if (e2eRuntime === "microvm") return guestQemuPids(server, sandboxId).length > 0 ? "present" : "gone";
  try {
    return JSON.parse(execFileSync("runc", ["state", `cubicle-${sandboxId}`], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] })).status;
  } catch {
    return "gone";
  }
}

const pauseImageDir = (sandboxId: string) => (e2eRuntime === "microvm" ? path.join(server.stateDir, "microvm", "images", "paused", sandboxId) : path.join(server.runDir, "pool", "images", "paused", sandboxId));

/** The status containerStatus gives for a frozen or a running sandbox in the runtime under test. */
const statusOf = (state: "paused" | "running") => (e2eRuntime === "microvm" ? "present" : state);

/** The server's own times (ms) of the wakes of a sandbox from `tier`, from its log, oldest first. */
function serverWakeMs(sandboxId: string, tier: string, field: "ms" | "runningMs" = "ms"): number[] {
  return server
    .log()
    .split("\n")
    .filter((line) => line.includes("woke an idle sandbox"))
    .map((line) => JSON.parse(line.slice(line.indexOf("{"))) as { sandboxId: string; tier: string; ms: number; runningMs: number })
    .filter((entry) => entry.sandboxId === sandboxId && entry.tier === tier)
    .map((entry) => entry[field]);
}

const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;

async function timed<T>(run: () => Promise<T>): Promise<{ value: T; ms: number }> {
  const started = performance.now();
  const value = await run();
  return { value, ms: Math.round((performance.now() - started) * 10) / 10 };
}

describe("idle tiers", () => {
  test("a running command keeps a sandbox awake; afterwards it freezes and a command wakes it transparently", async () => {
    const sandbox = await Sandbox.create({ timeoutMs: 120_000 });
    try {
      const tiers = new Set<string>();
      let watching = true;
      const watch = (async () => {
        while (watching) {
          tiers.add(await idleTier(sandbox.sandboxId));
          await new Promise((r) => setTimeout(r, 100));
        }
      })();
      const run = await sandbox.commands.run("sleep 3");
      watching = false;
      await watch;
      assert.equal(run.exitCode, 0);
      assert.deepEqual([...tiers], ["awake"], "never frozen while its command ran");

      const fromFrozen: number[] = [];
      const awake: number[] = [];
      for (let round = 0; round < 3; round++) {
        await waitForTier(sandbox.sandboxId, "frozen");
        assert.equal(containerStatus(sandbox.sandboxId), statusOf("paused"), "its cgroup is frozen");
        const woken = await timed(() => sandbox.commands.run("echo awake"));
        assert.equal(woken.value.stdout.trim(), "awake");
        assert.equal(await idleTier(sandbox.sandboxId), "awake");
        fromFrozen.push(woken.ms);
        awake.push((await timed(() => sandbox.commands.run("echo awake"))).ms);
      }
      const wakes = serverWakeMs(sandbox.sandboxId, "frozen");
      console.log(`[idle] commands.run("echo awake"): from frozen ${fromFrozen.join(", ")} ms; awake ${awake.join(", ")} ms; the server's wakes ${wakes.join(", ")} ms (thawed after ${serverWakeMs(sandbox.sandboxId, "frozen", "runningMs").join(", ")} ms, then recorded)`);
      assert.equal(wakes.length, 3);
      assert.ok(median(wakes) <= 50, `a wake from frozen took ${median(wakes)} ms (≤ 50 ms wanted)`);
    } finally {
      await sandbox.kill();
    }
  });

  test("an open stream (watchDir) keeps a sandbox awake", async () => {
    const sandbox = await Sandbox.create({ timeoutMs: 120_000 });
    try {
      const handle = await sandbox.files.watchDir("/home/user", () => undefined);
      const deadline = Date.now() + 3000;
      while (Date.now() < deadline) {
        assert.equal(await idleTier(sandbox.sandboxId), "awake", "never frozen while a stream is open");
        await new Promise((r) => setTimeout(r, 100));
      }
      await handle.stop();
      await waitForTier(sandbox.sandboxId, "frozen");
    } finally {
      await sandbox.kill();
    }
  });

  test("a sandbox on disk answers the next command with its files and a background process intact", async () => {
    const sandbox = await Sandbox.create({ timeoutMs: 120_000 });
    const id = sandbox.sandboxId;
    try {
      await sandbox.files.write("/home/user/note.txt", "written before sleeping");
      // A process the agent does not track (the shell exits): only CPU use could keep it awake.
      await sandbox.commands.run("nohup sleep 1000 >/dev/null 2>&1 &");
      const pid = (await sandbox.commands.run("pgrep -x sleep")).stdout.trim();
      assert.match(pid, /^\d+$/);

      await waitForTier(id, "disk", 20_000);
      assert.equal(containerStatus(id), "gone", "its container is released");
      assert.ok(fs.existsSync(pauseImageDir(id)), "its memory is in an image");

      const woken = await timed(() => sandbox.commands.run("cat /home/user/note.txt; echo; pgrep -x sleep"));
      const [note, pidAfter] = woken.value.stdout.trim().split("\n");
      assert.equal(note, "written before sleeping");
      assert.equal(pidAfter, pid, "the background process survived with its pid");
      assert.equal(await idleTier(id), "awake");
      assert.equal(containerStatus(id), statusOf("running"));
      const warm = await timed(() => sandbox.commands.run("true"));
      // The yardstick: a create from a snapshot of the same sandbox to its first command.
      const snapshot = await sandbox.createSnapshot();
      let fromSnapshotMs = 0;
      try {
        const created = await timed(async () => {
          const copy = await Sandbox.create(snapshot.snapshotId, { timeoutMs: 60_000 });
          await copy.commands.run("cat /home/user/note.txt; echo; pgrep -x sleep");
          return copy;
        });
        fromSnapshotMs = created.ms;
        await created.value.kill();
      } finally {
        await Sandbox.deleteSnapshot(snapshot.snapshotId);
      }
      console.log(
        `[idle] commands.run(cat + pgrep): from disk ${woken.ms} ms (awake: ${warm.ms} ms; create from a snapshot + the same command: ${fromSnapshotMs} ms); the server's wake (restore) ${serverWakeMs(id, "disk").join(", ")} ms`,
      );
      assert.ok(woken.ms <= 2 * fromSnapshotMs, `waking from disk (${woken.ms} ms) took more than twice a create from a snapshot (${fromSnapshotMs} ms)`);
    } finally {
      await sandbox.kill();
    }
    assert.equal(containerStatus(id), "gone");
  });

  test("kill of a frozen and of an on-disk sandbox leaves nothing behind", async () => {
    const frozen = await Sandbox.create({ timeoutMs: 120_000 });
    const onDisk = await Sandbox.create({ timeoutMs: 120_000 });
    await waitForTier(onDisk.sandboxId, "disk", 20_000);
    // Woken now, so that it is frozen, not yet on disk, when it is killed: a slow second create
    // (a microVM under TCG) could otherwise outlast the first one's frozen spell.
    await frozen.commands.run("true");
    await waitForTier(frozen.sandboxId, "frozen");
    await frozen.kill();
    await onDisk.kill();
    for (const id of [frozen.sandboxId, onDisk.sandboxId]) {
      assert.equal((await server.api("GET", `/sandboxes/${id}`)).status, 404);
      assert.equal(containerStatus(id), "gone");
      assert.equal(fs.existsSync(pauseImageDir(id)), false, "no image left");
      const netns = execFileSync("ip", ["netns", "list"], { encoding: "utf8" });
      assert.ok(!netns.includes(id), "no network namespace left");
    }
  });

  test("a server SIGKILLed while its sandboxes sleep adopts them: the frozen one thawed, the one on disk still on disk", async () => {
    const frozen = await Sandbox.create({ timeoutMs: 120_000 });
    const onDisk = await Sandbox.create({ timeoutMs: 120_000 });
    try {
      await onDisk.files.write("/home/user/note.txt", "kept on disk");
      await waitForTier(onDisk.sandboxId, "disk", 20_000);
      // The other one woken now, so that it is frozen (not yet on disk) at the crash.
      await frozen.commands.run("true");
      await waitForTier(frozen.sandboxId, "frozen");
      await server.crashAndRestart();
      assert.equal(await idleTier(onDisk.sandboxId), "disk", "adopted as running, on disk");
      assert.equal((await onDisk.commands.run("cat /home/user/note.txt")).stdout, "kept on disk");
      assert.equal((await frozen.commands.run("echo up")).stdout.trim(), "up");
    } finally {
      await frozen.kill();
      await onDisk.kill();
    }
  });

  test("bad idle settings stop the server at start with a clear error", () => {
    for (const [name, value] of [
      ["CUBICLE_IDLE_FREEZE_SECONDS", "soon"],
      ["CUBICLE_IDLE_DISK_SECONDS", "-5"],
    ]) {
      const result = spawnSync(process.execPath, [path.join(process.cwd(), "dist", "cli.js"), "serve"], {
        env: { ...server.env, CUBICLE_PORT: "1", [name!]: value },
        encoding: "utf8",
        timeout: 20_000,
      });
      assert.notEqual(result.status, 0, `${name}=${value} must stop the start`);
      assert.match(result.stderr + result.stdout, new RegExp(`${name}: "${value}" is not a whole number of seconds`));
    }
  });
});
