import assert from "node:assert/strict";
import { test } from "node:test";
import { CubicleError } from "../../shared/cubicle-error.js";
import { createRequest, withFakeManager } from "../test-fakes.js";

test("a snapshot keeps the sandbox running; a second one while the first runs is a 409; delete removes its image", async () => {
  await withFakeManager({}, async (f) => {
    const record = await f.manager.create(createRequest());
    const outcomes = await Promise.allSettled([f.manager.createSnapshot(record.sandboxId, "s1"), f.manager.createSnapshot(record.sandboxId, "s2")]);
    const taken = outcomes.filter((o) => o.status === "fulfilled").map((o) => o.value);
    const refused = outcomes.filter((o) => o.status === "rejected").map((o) => o.reason as CubicleError);
    assert.equal(taken.length, 1);
    assert.deepEqual(refused.map((err) => err.code), ["conflict"]);
    const snapshot = taken[0];
    assert.equal(f.containers.get(record.sandboxId), "running");
    assert.equal(snapshot.names.length, 1);
    assert.equal(await f.runtime.images.exists(snapshot.imageId), true);
    await assert.rejects(f.manager.createSnapshot(record.sandboxId, "base"), /name of a template/);
    assert.equal(await f.manager.deleteSnapshot(snapshot.names[0]), true);
    assert.equal(await f.runtime.images.exists(snapshot.imageId), false);
    assert.equal(await f.manager.deleteSnapshot(snapshot.names[0]), false);
  });
});

test("a fork makes count sandboxes from one dump and leaves no image behind", async () => {
  await withFakeManager({}, async (f) => {
    const source = await f.manager.create(createRequest({ metadata: { who: "src" } }));
    const outcomes = await f.manager.fork(source.sandboxId, { timeoutSec: 30, count: 3 });
    assert.equal(outcomes.length, 3);
    const forks = outcomes.map((o) => ("record" in o ? o.record : assert.fail(String(o.error))));
    assert.equal(new Set(forks.map((r) => r.sandboxId)).size, 3);
    for (const fork of forks) {
      assert.deepEqual(fork.metadata, { who: "src" });
      assert.equal(f.containers.get(fork.sandboxId), "running");
    }
    assert.equal((await f.store.allSnapshots()).length, 0, "the fork's one-off snapshot is gone");
    assert.deepEqual(await f.runtime.images.list("snapshot"), [], "and its image");
    assert.equal(source.endAt > Date.now(), true);
  });
});

test("rollback restores a sandbox in place from its own snapshot only; a failed rollback ends it dead", async () => {
  await withFakeManager({}, async (f) => {
    const a = await f.manager.create(createRequest());
    const b = await f.manager.create(createRequest());
    const snap = await f.manager.createSnapshot(a.sandboxId, undefined);
    await assert.rejects(f.manager.rollback(b.sandboxId, snap.snapshotId), (err: CubicleError) => err.code === "conflict");
    await assert.rejects(f.manager.rollback(a.sandboxId, "nope"), (err: CubicleError) => err.code === "not_found");
    const address = a.network!.sandboxAddress;
    await f.manager.rollback(a.sandboxId, snap.snapshotId);
    assert.equal(a.state, "running");
    assert.equal(a.network!.sandboxAddress, address, "same address");
    assert.ok(f.store.events.some((e) => e.kind === "rolled-back"));

    f.runtime.failNext.set("restore", new Error("restore failed"));
    await assert.rejects(f.manager.rollback(a.sandboxId, snap.snapshotId), /failed and the sandbox is gone/);
    assert.equal(f.store.sandboxes.get(a.sandboxId)?.state, "dead");
    await assert.rejects(f.manager.get(a.sandboxId), /not found/);
  });
});
