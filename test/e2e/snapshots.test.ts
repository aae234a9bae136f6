/**
 * Snapshots, create from a snapshot, fork and rollback through the official `e2b` SDK (rollback,
 * a CubeSandbox extension, over plain HTTP). A Python process's memory, a background HTTP
 * server's state and a file must survive each operation.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Sandbox, SandboxNotFoundError } from "e2b";
import { hitWhenUp as hitWhenUpIn, median, startStateServer } from "./state-server.js";
import { startTestServer, useServerForSdk, type TestServer } from "./harness.js";

let server: TestServer;

before(async () => {
  server = await startTestServer({ extraEnv: { CUBICLE_POOL_SIZE: "" } });
  useServerForSdk(server);
});

after(async () => {
  await server?.stop();
});

const hitWhenUp = (sandboxId: string) => hitWhenUpIn(server.url, sandboxId);

/** A sandbox running the state server (one hit taken: next answer is s3cret:2) and a file. */
async function sandboxWithState(): Promise<Sandbox> {
  const sandbox = await Sandbox.create({ timeoutMs: 300_000, metadata: { suite: "snapshots" } });
  await sandbox.files.write("/home/user/note.txt", "version 1");
  assert.equal(await startStateServer(server.url, sandbox), "s3cret:1");
  return sandbox;
}

describe("snapshots", () => {
  test("a snapshot restores into a new sandbox with the memory, server state and files of the source", async () => {
    const source = await sandboxWithState();
    try {
      const endBefore = (await source.getInfo()).endAt.getTime();
      const snapshotMs: number[] = [];
      let started = performance.now();
      const snapshot = await source.createSnapshot();
      snapshotMs.push(performance.now() - started);
      assert.match(snapshot.snapshotId, /^[a-z0-9:_-]+$/);
      assert.deepEqual(snapshot.names, []);
      // The source keeps running, with its id and end of life.
      assert.equal(await hitWhenUp(source.sandboxId), "s3cret:2");
      assert.equal((await source.getInfo()).endAt.getTime(), endBefore);
      await source.files.write("/home/user/note.txt", "version 2");

      started = performance.now();
      const restored = await Sandbox.create(snapshot.snapshotId, { envs: { WHO: "restored" } });
      const restoreMs = performance.now() - started;
      try {
        assert.notEqual(restored.sandboxId, source.sandboxId);
        assert.equal(await hitWhenUp(restored.sandboxId), "s3cret:2", "the restored process continues from the snapshot");
        assert.equal(await restored.files.read("/home/user/note.txt"), "version 1");
        const run = await restored.commands.run("echo $WHO");
        assert.equal(run.stdout, "restored\n");
        // The new sandbox has its own token: the source's does not open it.
        const sourceToken = (await server.api("GET", `/sandboxes/${source.sandboxId}`)).json.envdAccessToken;
        const stat = await fetch(server.url + "/filesystem.Filesystem/Stat", {
          method: "POST",
          headers: { "e2b-sandbox-id": restored.sandboxId, "e2b-sandbox-port": "49983", "content-type": "application/json", "x-access-token": sourceToken },
          body: JSON.stringify({ path: "/" }),
        });
        assert.equal(stat.status, 401);
      } finally {
        await restored.kill();
      }
      for (let i = 0; i < 2; i++) {
        started = performance.now();
        const extra = await source.createSnapshot();
        snapshotMs.push(performance.now() - started);
        assert.equal(await Sandbox.deleteSnapshot(extra.snapshotId), true);
      }
      console.log(`snapshot median ${median(snapshotMs).toFixed(1)} ms (${snapshotMs.map((v) => v.toFixed(0)).join(", ")}), restore ${restoreMs.toFixed(1)} ms`);

      // A snapshot outlives its source.
      await source.kill();
      const orphanRestore = await Sandbox.create(snapshot.snapshotId);
      assert.equal(await hitWhenUp(orphanRestore.sandboxId), "s3cret:2");
      await orphanRestore.kill();

      assert.equal(await Sandbox.deleteSnapshot(snapshot.snapshotId), true);
      assert.equal(await Sandbox.deleteSnapshot(snapshot.snapshotId), false);
      await assert.rejects(Sandbox.create(snapshot.snapshotId), /not found/i);
    } finally {
      await source.kill().catch(() => undefined);
    }
  });

  test("named snapshots: create by name, list with filters and paging, a reused name moves", async () => {
    const source = await sandboxWithState();
    const name = `snap-name-${Date.now()}`;
    try {
      const first = await source.createSnapshot({ name });
      assert.deepEqual(first.names, [name]);
      const second = await source.createSnapshot({ name });
      assert.notEqual(second.snapshotId, first.snapshotId);

      const bySource = await Sandbox.listSnapshots({ sandboxId: source.sandboxId }).nextItems();
      assert.deepEqual(bySource.map((s) => s.snapshotId), [second.snapshotId, first.snapshotId], "newest first");
      assert.deepEqual(bySource[0]!.names, [name]);
      assert.deepEqual(bySource[1]!.names, [], "the name moved to the newest snapshot");
      const byName = await Sandbox.listSnapshots({ name }).nextItems();
      assert.deepEqual(byName.map((s) => s.snapshotId), [second.snapshotId]);

      const paginator = Sandbox.listSnapshots({ sandboxId: source.sandboxId, limit: 1 });
      const page1 = await paginator.nextItems();
      assert.equal(paginator.hasNext, true);
      const page2 = await paginator.nextItems();
      assert.equal(paginator.hasNext, false);
      assert.deepEqual([...page1, ...page2].map((s) => s.snapshotId), [second.snapshotId, first.snapshotId]);

      const byNameSandbox = await Sandbox.create(name);
      try {
        assert.equal(await hitWhenUp(byNameSandbox.sandboxId), "s3cret:2");
      } finally {
        await byNameSandbox.kill();
      }
      const bad = await server.api("POST", `/sandboxes/${source.sandboxId}/snapshots`, { name: "Not Valid!" });
      assert.equal(bad.status, 400);
      const clash = await server.api("POST", `/sandboxes/${source.sandboxId}/snapshots`, { name: "base" });
      assert.equal(clash.status, 409);
      await assert.rejects(Sandbox.createSnapshot("inosuchsandbox"), SandboxNotFoundError);
      assert.equal(await Sandbox.deleteSnapshot(first.snapshotId), true);
      assert.equal(await Sandbox.deleteSnapshot(name), true, "a name deletes the snapshot it points at");
    } finally {
      await source.kill();
    }
  });

  test("a second snapshot while one is being taken is refused with 409, not queued", async () => {
    const source = await sandboxWithState();
    try {
      // Something to dump: a few MB of memory make the dump take long enough to overlap.
      await source.commands.run("python3 -c 'import time; b=bytearray(64*1024*1024); time.sleep(600)'", { background: true });
      const results = await Promise.all([0, 1, 2].map(() => server.api("POST", `/sandboxes/${source.sandboxId}/snapshots`, {})));
      const statuses = results.map((r) => r.status).sort();
      assert.ok(statuses.includes(201), JSON.stringify(statuses));
      assert.ok(statuses.includes(409), JSON.stringify(statuses));
      for (const r of results) if (r.status === 409) assert.equal(r.json.code, 409);
      assert.equal(await hitWhenUp(source.sandboxId), "s3cret:2");
    } finally {
      await source.kill();
    }
  });
});

describe("fork", () => {
  test("fork makes independent copies with the source's state; the source keeps its id and end of life", async () => {
    const source = await sandboxWithState();
    try {
      const endBefore = (await source.getInfo()).endAt.getTime();
      const forks = await source.fork({ count: 3, timeoutMs: 120_000 });
      assert.equal(forks.length, 3);
      const sandboxes = forks.map((f) => {
        if (!(f instanceof Sandbox)) throw f;
        return f;
      });
      assert.equal(new Set(sandboxes.map((s) => s.sandboxId)).size, 3);
      for (const fork of sandboxes) {
        assert.notEqual(fork.sandboxId, source.sandboxId);
        assert.equal(await hitWhenUp(fork.sandboxId), "s3cret:2");
        assert.equal(await fork.files.read("/home/user/note.txt"), "version 1");
      }
      // Independent: a write in one fork is not seen by another, nor by the source.
      await sandboxes[0]!.files.write("/home/user/note.txt", "fork 0");
      assert.equal(await sandboxes[1]!.files.read("/home/user/note.txt"), "version 1");
      assert.equal(await source.files.read("/home/user/note.txt"), "version 1");
      assert.equal(await hitWhenUp(source.sandboxId), "s3cret:2");
      assert.equal((await source.getInfo()).endAt.getTime(), endBefore);
      const info = await sandboxes[0]!.getInfo();
      assert.ok(Math.abs(info.endAt.getTime() - Date.now() - 120_000) < 15_000);
      await Promise.all(sandboxes.map((s) => s.kill()));

      await assert.rejects(Sandbox.fork("inosuchsandbox"), SandboxNotFoundError);
      for (const body of [{ count: 0 }, { count: 101 }, { count: 1.5 }]) {
        assert.equal((await server.api("POST", `/sandboxes/${source.sandboxId}/fork`, body)).status, 400);
      }
    } finally {
      await source.kill();
    }
  });

  test("a fork of 10", async () => {
    const source = await sandboxWithState();
    try {
      const started = performance.now();
      const forks = await Sandbox.fork(source.sandboxId, { count: 10, timeoutMs: 60_000 });
      const forkMs = performance.now() - started;
      const failures = forks.filter((f) => !(f instanceof Sandbox));
      assert.deepEqual(failures, []);
      const answers = await Promise.all(forks.map((f) => hitWhenUp((f as Sandbox).sandboxId)));
      assert.deepEqual(answers, Array(10).fill("s3cret:2"));
      console.log(`fork of 10: ${forkMs.toFixed(0)} ms`);
      await Promise.all(forks.map((f) => (f as Sandbox).kill()));
    } finally {
      await source.kill();
    }
  });
});

test("restored and forked sandboxes report their own id as hostname", async () => {
  const source = await Sandbox.create();
  try {
    const snapshot = await source.createSnapshot();
    const restored = await Sandbox.create(snapshot.snapshotId);
    const [fork] = await source.fork({ count: 1 });
    try {
      assert.equal((await restored.commands.run("hostname")).stdout.trim(), restored.sandboxId);
      assert.equal(((await (fork as Sandbox).commands.run("hostname")).stdout.trim()), (fork as Sandbox).sandboxId);
    } finally {
      await restored.kill();
      if (fork instanceof Sandbox) await fork.kill();
      await Sandbox.deleteSnapshot(snapshot.snapshotId);
    }
  } finally {
    await source.kill();
  }
});

describe("rollback", () => {
  test("rollback restores memory and files in place, with the same id", async () => {
    const source = await sandboxWithState();
    const other = await Sandbox.create();
    try {
      const snapshot = await source.createSnapshot();
      await source.files.write("/home/user/note.txt", "version 2");
      await source.files.write("/home/user/new.txt", "made after the snapshot");
      assert.equal(await hitWhenUp(source.sandboxId), "s3cret:2");
      assert.equal(await hitWhenUp(source.sandboxId), "s3cret:3");

      const rollbackMs: number[] = [];
      for (let i = 0; i < 3; i++) {
        const started = performance.now();
        const res = await server.api("POST", `/sandboxes/${source.sandboxId}/rollback`, { snapshotID: snapshot.snapshotId });
        rollbackMs.push(performance.now() - started);
        assert.equal(res.status, 200, JSON.stringify(res.json));
        assert.equal(res.json.sandboxID, source.sandboxId);
        assert.equal(await hitWhenUp(source.sandboxId), "s3cret:2", "memory is back at the snapshot");
      }
      const same = await Sandbox.connect(source.sandboxId);
      assert.equal(await same.files.read("/home/user/note.txt"), "version 1");
      assert.equal(await same.files.exists("/home/user/new.txt"), false);
      assert.equal((await same.commands.run("hostname")).stdout.trim(), source.sandboxId);
      assert.equal((await same.getInfo()).state, "running");
      console.log(`rollback median ${median(rollbackMs).toFixed(1)} ms (${rollbackMs.map((v) => v.toFixed(0)).join(", ")})`);

      const foreign = await server.api("POST", `/sandboxes/${other.sandboxId}/rollback`, { snapshotID: snapshot.snapshotId });
      assert.equal(foreign.status, 409);
      assert.match(foreign.json.message, /taken from sandbox/);
      const unknown = await server.api("POST", `/sandboxes/${source.sandboxId}/rollback`, { snapshotID: "snap-00000000000000000000" });
      assert.equal(unknown.status, 404);
      const noSandbox = await server.api("POST", `/sandboxes/inosuchsandbox/rollback`, { snapshotID: snapshot.snapshotId });
      assert.equal(noSandbox.status, 404);
      assert.equal((await server.api("POST", `/sandboxes/${source.sandboxId}/rollback`, {})).status, 400);
    } finally {
      await source.kill();
      await other.kill();
    }
  });
});
