import assert from "node:assert/strict";
import { test } from "node:test";
import { createRequest, until, withFakeManager } from "../test-fakes.js";

test("kill ends a sandbox once; a second kill and a kill of an unknown id answer false", async () => {
  await withFakeManager({}, async (f) => {
    const ended: string[] = [];
    f.manager.on("ended", (id) => ended.push(id));
    const record = await f.manager.create(createRequest());
    assert.equal(await f.manager.kill(record.sandboxId), true);
    assert.equal(await f.manager.kill(record.sandboxId), false);
    assert.equal(await f.manager.kill("nope"), false);
    assert.equal(f.store.sandboxes.get(record.sandboxId)?.state, "killed");
    assert.equal(f.containers.size + f.networks.size, 0);
    assert.deepEqual(ended, [record.sandboxId], "its connections were reset");
    await assert.rejects(f.manager.get(record.sandboxId), /not found/);
  });
});

test("a sandbox whose processes end on their own is marked dead at once", async () => {
  await withFakeManager({}, async (f) => {
    const record = await f.manager.create(createRequest());
    f.runtime.exit(record.sandboxId);
    await until(() => f.store.sandboxes.get(record.sandboxId)?.state === "dead");
    assert.equal(f.store.sandboxes.get(record.sandboxId)?.state, "dead");
    assert.match(f.store.sandboxes.get(record.sandboxId)!.endReason!, /processes ended/);
    assert.equal(f.networks.size, 0);
  });
});

test("the reaper kills at the end of life, or pauses when the sandbox asked for it", async () => {
  await withFakeManager({}, async (f) => {
    const killed = await f.manager.create(createRequest());
    const paused = await f.manager.create(createRequest({ autoPause: true }));
    await f.manager.setTimeout(killed.sandboxId, 0.05);
    await f.manager.setTimeout(paused.sandboxId, 0.05);
    await until(() => f.store.sandboxes.get(killed.sandboxId)?.state === "killed" && paused.state === "paused");
    assert.equal(f.store.sandboxes.get(killed.sandboxId)?.state, "killed");
    assert.equal(f.store.sandboxes.get(killed.sandboxId)?.endReason, "timeout");
    assert.equal(paused.state, "paused");
    assert.equal(f.store.sandboxes.get(paused.sandboxId)?.state, "paused");
  });
});
