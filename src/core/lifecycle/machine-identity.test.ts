import assert from "node:assert/strict";
import { test } from "node:test";
import { createRequest, until, withFakeManager } from "../test-fakes.js";

// Which restores bring back a sandbox's own machine (its machine id, and its boot id when its
// processes come back) and which make a new machine (BOOT_IDENTITY_NOTE in the container runtime).

test("a resume from disk, with or without memory, and a rollback restore the same machine", async () => {
  await withFakeManager({ durablePauseAfterSec: 0.05 }, async (f) => {
    const record = await f.manager.create(createRequest());
    await f.manager.pause(record.sandboxId);
    await until(() => record.pause?.tier === "durable");
    await f.manager.resume(record.sandboxId, { timeoutSec: 60 });
    await f.manager.pause(record.sandboxId, { memory: false });
    await f.manager.connect(record.sandboxId, 60);
    const snapshot = await f.manager.createSnapshot(record.sandboxId, undefined);
    await f.manager.rollback(record.sandboxId, snapshot.snapshotId);
    assert.deepEqual(
      f.runtime.restores.map((r) => [r.sandboxId, r.imageId.split("/")[0], r.sameMachine]),
      [
        [record.sandboxId, "pause", true],
        [record.sandboxId, "pause", true],
        [record.sandboxId, "snapshot", true],
      ],
    );
  });
});

test("a create from a snapshot, a fork and a create from a warm image are new machines", async () => {
  await withFakeManager({ warmSnapshotTemplates: ["base"] }, async (f) => {
    // The first create boots and has the template's warm image made; the next one restores it.
    await f.manager.create(createRequest());
    await until(() => f.manager.warmSnapshotCounts().base?.ready === true);
    const source = await f.manager.create(createRequest());
    await f.manager.createSnapshot(source.sandboxId, "golden");
    const fromSnapshot = await f.manager.create(createRequest({ templateId: "golden" }));
    const forks = await f.manager.fork(source.sandboxId, { timeoutSec: 30, count: 2 });
    const forkIds = forks.map((o) => ("record" in o ? o.record.sandboxId : assert.fail(String(o.error))));
    assert.equal(f.runtime.restores.length, 4, JSON.stringify(f.runtime.restores));
    assert.deepEqual(
      f.runtime.restores.map((r) => r.sandboxId),
      [source.sandboxId, fromSnapshot.sandboxId, ...forkIds],
    );
    assert.ok(f.runtime.restores.every((r) => !r.sameMachine), JSON.stringify(f.runtime.restores));
    assert.match(f.runtime.restores[0]!.imageId, /^warm\//);
  });
});
