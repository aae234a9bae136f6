import assert from "node:assert/strict";
import { test } from "node:test";
import { CubicleError } from "../../shared/cubicle-error.js";
import { createRequest, lastInit, until, withFakeManager } from "../test-fakes.js";

test("a hot pause freezes, writes its image in the background, and a resume thaws and drops the image", async () => {
  await withFakeManager({ pauseImageAfterMs: 0 }, async (f) => {
    const record = await f.manager.create(createRequest());
    await f.manager.pause(record.sandboxId);
    assert.equal(f.containers.get(record.sandboxId), "frozen");
    assert.equal(record.pause?.tier, "hot");
    await assert.rejects(f.manager.pause(record.sandboxId), (err: CubicleError) => err.code === "conflict");
    await until(() => record.pause?.imageId !== undefined);
    const image = record.pause!.imageId!;
    assert.equal(image, `pause/${record.sandboxId}`);
    assert.equal(await f.runtime.images.exists(image), true);
    assert.equal(f.store.sandboxes.get(record.sandboxId)?.pause?.imageId, image, "the image is recorded");
    assert.equal(f.containers.get(record.sandboxId), "frozen", "it stays frozen while its image is written");
    assert.equal(f.manager.routeTarget(record.sandboxId), undefined, "no traffic reaches a paused sandbox");

    const { resumed } = await f.manager.resume(record.sandboxId, { timeoutSec: 60, requirePaused: true });
    assert.equal(resumed, true);
    assert.equal(f.containers.get(record.sandboxId), "running");
    assert.equal(record.state, "running");
    assert.equal(record.pause, undefined);
    assert.equal(await f.runtime.images.exists(image), false, "the stale image is gone");
    await assert.rejects(f.manager.resume(record.sandboxId, { timeoutSec: 60, requirePaused: true }), (err: CubicleError) => err.code === "conflict");
  });
});

test("a pause without memory goes to disk at once, releases the network, and resumes by a restore", async () => {
  await withFakeManager({}, async (f) => {
    const record = await f.manager.create(createRequest());
    await f.manager.pause(record.sandboxId, { memory: false });
    assert.equal(record.pause?.tier, "durable");
    assert.equal(record.pause?.memory, false);
    assert.equal(f.containers.has(record.sandboxId), false);
    assert.equal(f.networks.has(record.sandboxId), false);
    assert.equal(f.store.sandboxes.get(record.sandboxId)?.network, undefined);
    await f.manager.connect(record.sandboxId, 60);
    assert.equal(record.state, "running");
    assert.ok(f.runtime.calls.includes(`restore ${record.sandboxId}`));
    assert.equal(lastInit(f.agent, record.network!.sandboxAddress)?.accessToken, record.envdAccessToken);
  });
});

test("a hot pause moves to disk after its time in RAM; a failed restore leaves it paused and resumable", async () => {
  await withFakeManager({ durablePauseAfterSec: 0.05 }, async (f) => {
    const record = await f.manager.create(createRequest());
    await f.manager.pause(record.sandboxId);
    await until(() => record.pause?.tier === "durable");
    assert.equal(f.containers.has(record.sandboxId), false);
    assert.ok(f.store.events.some((e) => e.kind === "paused-to-disk"));

    f.runtime.failNext.set("restore", new Error("restore failed"));
    await assert.rejects(f.manager.resume(record.sandboxId, { timeoutSec: 60 }), /restore failed/);
    assert.equal(record.state, "paused");
    assert.equal(f.networks.has(record.sandboxId), false, "the failed restore's network was released");
    await f.manager.resume(record.sandboxId, { timeoutSec: 60 });
    assert.equal(record.state, "running");
  });
});

test("a pause to disk that fails for lack of space is a 507 and the sandbox keeps running", async () => {
  await withFakeManager({}, async (f) => {
    const record = await f.manager.create(createRequest());
    f.runtime.failNext.set("checkpoint", new CubicleError("insufficient_storage", "EDQUOT"));
    await assert.rejects(f.manager.pause(record.sandboxId, { memory: false }), (err: CubicleError) => err.code === "insufficient_storage" && /keeps running/.test(err.message));
    assert.equal(record.state, "running");
    assert.equal(f.store.sandboxes.get(record.sandboxId)?.state, "running");
  });
});
