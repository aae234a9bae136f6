import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { acquireDirLock } from "./build-lock.js";

const tempDirs: string[] = [];
after(() => Promise.all(tempDirs.map((dir) => fs.rm(dir, { recursive: true, force: true }))));

async function tempDir(): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "cubicle-lock-"));
  tempDirs.push(dir);
  return dir;
}

/** A pid that certainly belonged to a process that has exited. */
function deadPid(): number {
  const child = spawnSync(process.execPath, ["-e", "console.log(process.pid)"], { encoding: "utf8" });
  return Number(child.stdout.trim());
}

test("a second taker waits until the first releases", async () => {
  const lockDir = path.join(await tempDir(), ".lock-base");
  const releaseFirst = await acquireDirLock(lockDir, { pollMs: 10 });
  const order: string[] = [];
  let waited = false;
  const second = acquireDirLock(lockDir, { pollMs: 10, onWait: () => (waited = true) }).then((release) => {
    order.push("second acquired");
    return release;
  });
  await sleep(50);
  order.push("first releases");
  await releaseFirst();
  const releaseSecond = await second;
  assert.deepEqual(order, ["first releases", "second acquired"]);
  assert.ok(waited);
  await releaseSecond();
  await assert.rejects(fs.stat(lockDir), { code: "ENOENT" });
});

test("a lock left by a dead process is taken over", async () => {
  const lockDir = path.join(await tempDir(), ".lock-base");
  await fs.mkdir(lockDir);
  await fs.writeFile(path.join(lockDir, "owner.json"), JSON.stringify({ pid: deadPid(), acquiredAt: "" }));
  const release = await acquireDirLock(lockDir, { waitMs: 1000, pollMs: 10 });
  const owner = JSON.parse(await fs.readFile(path.join(lockDir, "owner.json"), "utf8"));
  assert.equal(owner.pid, process.pid);
  await release();
});

test("a lock held by a live process is not taken over, and waiting gives up with deadline_exceeded", async () => {
  const lockDir = path.join(await tempDir(), ".lock-base");
  await fs.mkdir(lockDir);
  // pid 1 is always alive.
  await fs.writeFile(path.join(lockDir, "owner.json"), JSON.stringify({ pid: 1, acquiredAt: "" }));
  await assert.rejects(acquireDirLock(lockDir, { waitMs: 100, pollMs: 10 }), { code: "deadline_exceeded" });
  assert.equal(JSON.parse(await fs.readFile(path.join(lockDir, "owner.json"), "utf8")).pid, 1);
});

test("a freshly made lock without an owner file yet is waited on, not broken", async () => {
  const lockDir = path.join(await tempDir(), ".lock-base");
  await fs.mkdir(lockDir);
  await assert.rejects(acquireDirLock(lockDir, { waitMs: 100, pollMs: 10 }), { code: "deadline_exceeded" });
});

test("releasing twice is harmless", async () => {
  const lockDir = path.join(await tempDir(), ".lock-base");
  const release = await acquireDirLock(lockDir);
  await release();
  await release();
});
