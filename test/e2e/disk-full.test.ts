/**
 * A full image store during a dump, through the official `e2b` SDK: the server's image budget
 * (snapshots and paused sandboxes share it, IMAGE_BUDGET_NOTE) is small, and sandboxes hold more than fits (100 MiB in /dev/shm, which
 * CRIU archives, or in their files, which the image's layer snapshot references). A snapshot or
 * pause that does not fit must fail with 507 and a message that says so, leave no snapshot
 * listed and no bytes counted, and leave the sandbox running (or paused) and usable. Once space
 * is freed, the same sandbox snapshots and restores normally.
 */
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { Sandbox, SandboxError } from "e2b";
import { hitWhenUp as hitWhenUpIn, startStateServer } from "./state-server.js";
import { startTestServer, useServerForSdk, type TestServer } from "./harness.js";

/** Big enough for a snapshot of a small sandbox (its processes' memory), far too small for 100 MiB. */
const BUDGET_MIB = 48;
const BIG_FILE_MIB = 100;

let server: TestServer;
let snapshotsDir: string;
let pausedDir: string;

before(async () => {
  server = await startTestServer({
    // A hot pause goes to disk after a second, so the durable tier's failure is seen quickly.
    extraEnv: { CUBICLE_POOL_SIZE: "", CUBICLE_DURABLE_PAUSE_AFTER_SEC: "1", CUBICLE_IMAGE_BUDGET_GB: String(BUDGET_MIB / 1024), CUBICLE_WARM_SNAPSHOT: "none" },
  });
  useServerForSdk(server);
  const images = path.join(server.runDir, "pool", "images");
  [snapshotsDir, pausedDir] = [path.join(images, "snapshots"), path.join(images, "paused")];
});

after(async () => {
  await server?.stop();
});

const hitWhenUp = (sandboxId: string) => hitWhenUpIn(server.url, sandboxId);

/** Asserts that a failed dump left nothing: no image, no `.partial-…` directory (whose bytes would count). */
async function assertDiskEmpty(dir: string): Promise<void> {
  assert.deepEqual(fs.existsSync(dir) ? fs.readdirSync(dir) : [], [], `nothing is left in ${dir}`);
}

/** Asserts the SDK error of a dump that did not fit: HTTP 507 with a message that names the cause. */
function isDiskFull(err: unknown): boolean {
  assert.ok(err instanceof SandboxError, `a SandboxError, got ${String(err)}`);
  assert.equal(err.statusCode, 507, err.message);
  assert.match(err.message, /no space left|storage .* is full|free (some )?space/i);
  return true;
}

/** A sandbox running the state server (next answer s3cret:2) with BIG_FILE_MIB in `bigFile`. */
async function sandboxWithBigFile(bigFile: string): Promise<Sandbox> {
  const sandbox = await Sandbox.create({ timeoutMs: 120_000, metadata: { suite: "disk-full" } });
  assert.equal(await startStateServer(server.url, sandbox), "s3cret:1");
  await sandbox.commands.run(`head -c ${BIG_FILE_MIB}M /dev/urandom > ${bigFile}`);
  return sandbox;
}

async function fileSize(sandbox: Sandbox, file: string): Promise<number> {
  return Number((await sandbox.commands.run(`stat -c %s ${file}`)).stdout.trim());
}

/** After a failed dump: nothing on the disk at `dir`, the sandbox running with its state and big file. */
async function assertNothingWrittenAndRunning(sandbox: Sandbox, dir: string, bigFile: string): Promise<void> {
  await assertDiskEmpty(dir);
  assert.equal((await sandbox.getInfo()).state, "running");
  assert.equal(await hitWhenUp(sandbox.sandboxId), "s3cret:2");
  assert.equal(await fileSize(sandbox, bigFile), BIG_FILE_MIB * 1024 * 1024);
}

describe("disk full during a dump", () => {
  test("a snapshot whose memory does not fit fails with 507, leaves nothing behind and the sandbox running", async () => {
    const sandbox = await sandboxWithBigFile("/dev/shm/big");
    try {
      await assert.rejects(sandbox.createSnapshot(), isDiskFull);

      assert.deepEqual(await Sandbox.listSnapshots({ sandboxId: sandbox.sandboxId }).nextItems(), [], "no snapshot is listed");
      assert.deepEqual((await server.api("GET", "/snapshots")).json, []);
      // Thawed and whole: processes keep their memory, /dev/shm keeps its file, commands run.
      await assertNothingWrittenAndRunning(sandbox, snapshotsDir, "/dev/shm/big");
      assert.equal((await sandbox.commands.run("echo alive")).stdout, "alive\n");

      // Once space is freed (here: in the sandbox), the same sandbox snapshots and restores.
      await sandbox.commands.run("rm /dev/shm/big && echo kept > /dev/shm/small");
      const snapshot = await sandbox.createSnapshot();
      const listed = await Sandbox.listSnapshots({ sandboxId: sandbox.sandboxId }).nextItems();
      assert.deepEqual(listed.map((s) => s.snapshotId), [snapshot.snapshotId]);
      assert.deepEqual(fs.readdirSync(snapshotsDir), [snapshot.snapshotId], "only the complete image is on the disk");
      const restored = await Sandbox.create(snapshot.snapshotId);
      try {
        assert.equal(await hitWhenUp(restored.sandboxId), "s3cret:3", "the restored process continues from the snapshot");
        assert.equal((await restored.commands.run("cat /dev/shm/small")).stdout, "kept\n");
      } finally {
        await restored.kill();
      }
      assert.equal(await Sandbox.deleteSnapshot(snapshot.snapshotId), true);
      await assertDiskEmpty(snapshotsDir);
    } finally {
      await sandbox.kill();
    }
  });

  test("a snapshot whose files do not fit fails with 507 and an E2B error body, and leaves nothing behind", async () => {
    const sandbox = await sandboxWithBigFile("/home/user/big");
    try {
      const res = await server.api("POST", `/sandboxes/${sandbox.sandboxId}/snapshots`, {});
      assert.equal(res.status, 507, JSON.stringify(res.json));
      assert.equal(res.json.code, 507);
      assert.match(res.json.message, /no space left|storage .* is full|free (some )?space/i);

      assert.deepEqual(await Sandbox.listSnapshots({ sandboxId: sandbox.sandboxId }).nextItems(), []);
      await assertNothingWrittenAndRunning(sandbox, snapshotsDir, "/home/user/big");
    } finally {
      await sandbox.kill();
    }
  });

  test("a filesystem-only pause that does not fit fails with 507 and the sandbox keeps running", async () => {
    const sandbox = await sandboxWithBigFile("/home/user/big");
    try {
      const res = await server.api("POST", `/sandboxes/${sandbox.sandboxId}/pause`, { memory: false });
      assert.equal(res.status, 507, JSON.stringify(res.json));
      assert.match(res.json.message, /no space left|storage .* is full|free (some )?space/i);

      await assertNothingWrittenAndRunning(sandbox, pausedDir, "/home/user/big");
    } finally {
      await sandbox.kill();
    }
  });

  test("a paused sandbox that does not fit on disk stays paused in RAM and resumes intact", async () => {
    const sandbox = await sandboxWithBigFile("/dev/shm/big");
    try {
      const logStart = server.log().length;
      const logSincePause = () => server.log().slice(logStart);
      assert.equal(await sandbox.pause(), true);
      // The move to disk (after CUBICLE_DURABLE_PAUSE_AFTER_SEC) fails in the background and is
      // not retried; an earlier background image write may have failed before it. Only the
      // server log tells when the last attempt is over.
      const moveFailed = () => logSincePause().split("\n").find((line) => line.includes("moving a paused sandbox to disk failed") && line.includes(sandbox.sandboxId));
      const deadline = Date.now() + 15_000;
      while (!moveFailed() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
      assert.match(moveFailed() ?? "(no such log line)", /no space left/i, "the server tried to move the paused sandbox to disk, and says why it failed");

      await assertDiskEmpty(pausedDir);
      assert.equal((await sandbox.getInfo()).state, "paused", "it is still paused (frozen in RAM), not dead");
      const resumed = await Sandbox.connect(sandbox.sandboxId);
      assert.equal(await hitWhenUp(resumed.sandboxId), "s3cret:2");
      assert.equal(await fileSize(resumed, "/dev/shm/big"), BIG_FILE_MIB * 1024 * 1024);
      await assertDiskEmpty(pausedDir);
    } finally {
      await sandbox.kill();
    }
  });
});
