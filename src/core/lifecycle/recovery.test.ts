import assert from "node:assert/strict";
import { test } from "node:test";
import { SandboxManager } from "../sandbox-manager.js";
import { createRequest, fakeTemplates, withFakeManager } from "../test-fakes.js";

test("after a restart: running sandboxes are adopted, vanished ones end dead, orphans and unowned images are removed", async () => {
  await withFakeManager({}, async (f) => {
    const kept = await f.manager.create(createRequest());
    const vanished = await f.manager.create(createRequest());
    const unhealthy = await f.manager.create(createRequest());
    const durable = await f.manager.create(createRequest());
    await f.manager.pause(durable.sandboxId, { memory: false });
    await f.manager.close();
    // While the server was down: one container vanished, one agent stopped answering, an
    // orphan container appeared, and a snapshot image nobody recorded was left.
    f.containers.delete(vanished.sandboxId);
    f.agent.failures.isHealthy = (call) => (call.address === unhealthy.network!.sandboxAddress ? new Error("unreachable") : undefined);
    f.containers.set("orphan", "running");
    f.containers.set("dumped", "running");
    await f.runtime.checkpoint("dumped", { kind: "snapshot", name: "unrecorded" }, { memory: true, leaveRunning: false });

    const restarted = new SandboxManager({ ...f, templates: fakeTemplates, admission: { slots: 4, maxWaiting: 10, minAvailableBytes: 0 }, pauseImageAfterMs: -1 });
    try {
      const result = await restarted.recover();
      assert.deepEqual(result.adopted.sort(), [kept.sandboxId, durable.sandboxId].sort());
      assert.deepEqual(result.dead.sort(), [vanished.sandboxId, unhealthy.sandboxId].sort());
      assert.ok(result.orphansRemoved.includes("orphan"));
      assert.equal(f.containers.has("orphan"), false);
      assert.equal(f.containers.has(unhealthy.sandboxId), false, "a dead sandbox's container is removed");
      assert.equal(f.store.sandboxes.get(vanished.sandboxId)?.state, "dead");
      assert.equal((await restarted.get(durable.sandboxId)).state, "paused");
      assert.ok(restarted.routeTarget(kept.sandboxId));
      assert.deepEqual(await f.runtime.images.list("snapshot"), [], "the unrecorded image is gone");
      assert.deepEqual(await f.runtime.images.list("pause"), [durable.pause!.imageId], "the durable pause keeps its image");
      await restarted.resume(durable.sandboxId, { timeoutSec: 60 });
      assert.equal((await restarted.get(durable.sandboxId)).state, "running");
    } finally {
      await restarted.close();
    }
  });
});
