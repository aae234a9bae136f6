import assert from "node:assert/strict";
import { test } from "node:test";
import { SandboxManager } from "../sandbox-manager.js";
import { createRequest, fakeTemplates, until, withFakeManager } from "../test-fakes.js";

/** Freeze after 100 ms quiet; to disk 150 ms after the freeze unless a test says otherwise. */
const fast = { idleFreezeAfterSec: 0.1, idleDiskAfterSec: 0 };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test("a quiet running sandbox is frozen, stays running for its user, and the next request wakes it", async () => {
  await withFakeManager(fast, async (f) => {
    const record = await f.manager.create(createRequest());
    await until(() => record.idle?.tier === "frozen");
    assert.equal(f.containers.get(record.sandboxId), "frozen");
    assert.equal(record.state, "running");
    assert.equal(f.store.sandboxes.get(record.sandboxId)?.idle?.tier, "frozen", "recorded, so list shows it");
    assert.ok(f.agent.callsOf("runningProcessCount").length > 0, "the agent was asked for running commands");
    assert.equal(f.manager.routeTarget(record.sandboxId), undefined, "traffic must wait for a wake");

    // Concurrent requests share one thaw.
    const targets = await Promise.all([1, 2, 3].map(() => f.manager.resumeForTraffic(record.sandboxId, { wake: false })));
    assert.ok(targets.every((target) => target?.address === record.network!.sandboxAddress), "health probes wake an idle sandbox too");
    assert.equal(f.runtime.calls.filter((call) => call === `thaw ${record.sandboxId}`).length, 1);
    assert.equal(f.containers.get(record.sandboxId), "running");
    assert.equal(record.idle, undefined);
    assert.equal(f.store.sandboxes.get(record.sandboxId)?.idle, undefined);
    // And it freezes again once quiet.
    await until(() => record.idle?.tier === "frozen");
  });
});

test("an open stream, a running command, CPU use, or an agent that cannot tell keep a sandbox awake", async () => {
  await withFakeManager(fast, async (f) => {
    const streamed = await f.manager.create(createRequest());
    const release = f.manager.holdAwake(streamed.sandboxId);
    await sleep(400);
    assert.equal(streamed.idle, undefined, "an open stream keeps it awake");
    release();
    await until(() => streamed.idle?.tier === "frozen");
  });
  await withFakeManager(fast, async (f) => {
    f.agent.processCount = 1;
    const commanded = await f.manager.create(createRequest());
    await sleep(400);
    assert.equal(commanded.idle, undefined, "a running command keeps it awake");
    f.agent.processCount = 0;
    await until(() => commanded.idle?.tier === "frozen");
  });
  await withFakeManager(fast, async (f) => {
    f.agent.failures.runningProcessCount = new Error("agent unreachable");
    const unknown = await f.manager.create(createRequest());
    await sleep(400);
    assert.equal(unknown.idle, undefined, "cannot tell = busy");
  });
  await withFakeManager(fast, async (f) => {
    const busy = await f.manager.create(createRequest());
    const burn = setInterval(() => f.runtime.cpuUsec.set(busy.sandboxId, (f.runtime.cpuUsec.get(busy.sandboxId) ?? 0) + 10_000), 10);
    try {
      await sleep(400);
      assert.equal(busy.idle, undefined, "a sandbox using CPU (a background job) stays awake");
    } finally {
      clearInterval(burn);
    }
    await until(() => busy.idle?.tier === "frozen");
  });
});

test("a frozen sandbox goes to disk, wakes by a restore of its own image, and kill leaves nothing", async () => {
  await withFakeManager({ idleFreezeAfterSec: 0.1, idleDiskAfterSec: 0.1 }, async (f) => {
    const record = await f.manager.create(createRequest());
    const id = record.sandboxId;
    await until(() => record.idle?.tier === "disk");
    assert.equal(record.state, "running");
    assert.equal(record.idle?.imageId, `pause/${id}`);
    assert.equal(await f.runtime.images.exists(`pause/${id}`), true);
    assert.equal(f.containers.has(id), false, "its memory left the host");
    assert.equal(f.networks.has(id), false);
    // Samples taken while it ran may be kept; none is taken while it is on disk.
    const reads = f.runtime.statsReads.length;
    await f.manager.metrics(id);
    assert.equal(f.runtime.statsReads.length, reads, "no container to sample");

    const target = await f.manager.resumeForTraffic(id);
    assert.equal(target?.address, record.network?.sandboxAddress);
    assert.deepEqual(f.runtime.restores.at(-1), { sandboxId: id, imageId: `pause/${id}`, sameMachine: true });
    assert.equal(record.idle, undefined);
    await until(() => f.runtime.images.committed.size === 0);

    await until(() => record.idle?.tier === "disk");
    assert.equal(await f.manager.kill(id), true);
    assert.equal(f.containers.size, 0);
    assert.equal(f.networks.size, 0);
    assert.equal(f.runtime.images.committed.size, 0, "the image of a sandbox killed on disk is removed");

    const frozen = await f.manager.create(createRequest());
    await until(() => frozen.idle?.tier === "frozen");
    assert.equal(await f.manager.kill(frozen.sandboxId), true);
    assert.equal(f.containers.size, 0);
  });
});

test("a failed move to disk leaves the sandbox frozen; a failed wake from disk leaves it on disk", async () => {
  await withFakeManager({ idleFreezeAfterSec: 0.1, idleDiskAfterSec: 0.05 }, async (f) => {
    f.runtime.failNext.set("checkpoint", new Error("criu: no space"));
    const record = await f.manager.create(createRequest());
    await until(() => f.runtime.calls.includes(`checkpoint ${record.sandboxId}`));
    await sleep(50);
    assert.equal(record.idle?.tier, "frozen");
    assert.equal(f.containers.get(record.sandboxId), "frozen");
    assert.ok(await f.manager.resumeForTraffic(record.sandboxId));
    await until(() => record.idle?.tier === "disk");
    f.runtime.failNext.set("restore", new Error("restore failed"));
    assert.equal(await f.manager.resumeForTraffic(record.sandboxId), undefined, "answered like a failed auto-resume");
    assert.equal(record.state, "running");
    assert.equal(record.idle?.tier, "disk");
    assert.equal(await f.runtime.images.exists(record.idle!.imageId!), true);
    assert.ok(await f.manager.resumeForTraffic(record.sandboxId), "the next request tries again");
  });
});

test("a runtime that cannot tell a sandbox's CPU time: the agent's guest CPU time decides (GUEST_CPU_NOTE)", async () => {
  await withFakeManager(fast, async (f) => {
    f.runtime.cpuTimeUnknown = true;
    const guest = await f.manager.create(createRequest());
    const burn = setInterval(() => (f.agent.guestCpuUsec += 10_000), 10);
    try {
      await sleep(400);
      assert.equal(guest.idle, undefined, "a guest using CPU stays awake");
    } finally {
      clearInterval(burn);
    }
    await until(() => guest.idle?.tier === "frozen");
    assert.ok(f.agent.callsOf("guestCpuTimeUsec").length > 0, "the agent was asked");
    assert.ok(f.agent.callsOf("guestCpuTimeUsec").every((call) => call.address === guest.network!.sandboxAddress && call.accessToken === guest.envdAccessToken));
  });
  await withFakeManager(fast, async (f) => {
    f.runtime.cpuTimeUnknown = true;
    f.agent.failures.guestCpuTimeUsec = new Error("agent unreachable");
    const unknown = await f.manager.create(createRequest());
    await sleep(400);
    assert.equal(unknown.idle, undefined, "cannot tell = busy");
  });
});

test("a runtime's own idle share (a TCG guest's): CPU use below it does not keep a sandbox awake, above it does", async () => {
  await withFakeManager(fast, async (f) => {
    f.runtime.idleShare = 0.5;
    const guest = await f.manager.create(createRequest());
    // ~20 % of a core: busy by the default 2 %, quiet by the runtime's 50 %.
    const burn = setInterval(() => f.runtime.cpuUsec.set(guest.sandboxId, (f.runtime.cpuUsec.get(guest.sandboxId) ?? 0) + 2_000), 10);
    try {
      await until(() => guest.idle?.tier === "frozen");
    } finally {
      clearInterval(burn);
    }
  });
  await withFakeManager(fast, async (f) => {
    f.runtime.idleShare = 0.5;
    const busy = await f.manager.create(createRequest());
    const burn = setInterval(() => f.runtime.cpuUsec.set(busy.sandboxId, (f.runtime.cpuUsec.get(busy.sandboxId) ?? 0) + 10_000), 10);
    try {
      await sleep(400);
      assert.equal(busy.idle, undefined, "a whole core is busy by any share");
    } finally {
      clearInterval(burn);
    }
  });
});

test("verbs on an idle sandbox: pause keeps its tier, snapshot and connect wake it, setTimeout does not", async () => {
  await withFakeManager({ idleFreezeAfterSec: 0.1, idleDiskAfterSec: 0.2 }, async (f) => {
    const frozen = await f.manager.create(createRequest());
    await until(() => frozen.idle?.tier === "frozen");
    await f.manager.setTimeout(frozen.sandboxId, 600);
    assert.equal(frozen.idle?.tier, "frozen");
    const thawsBefore = f.runtime.calls.filter((c) => c.startsWith("thaw")).length;
    await f.manager.pause(frozen.sandboxId);
    assert.equal(frozen.state, "paused");
    assert.equal(frozen.pause?.tier, "hot");
    assert.equal(frozen.idle, undefined);
    assert.equal(f.runtime.calls.filter((c) => c.startsWith("thaw")).length, thawsBefore, "no thaw for a pause");
    await f.manager.connect(frozen.sandboxId, 60);
    assert.equal(f.containers.get(frozen.sandboxId), "running");

    const onDisk = await f.manager.create(createRequest());
    await until(() => onDisk.idle?.tier === "disk");
    const image = onDisk.idle!.imageId;
    await f.manager.pause(onDisk.sandboxId);
    assert.deepEqual([onDisk.pause?.tier, onDisk.pause?.imageId, onDisk.idle], ["durable", image, undefined]);
    await f.manager.connect(onDisk.sandboxId, 60);
    assert.equal(onDisk.state, "running");

    await until(() => onDisk.idle !== undefined);
    await f.manager.createSnapshot(onDisk.sandboxId, undefined);
    assert.equal(onDisk.idle, undefined, "a snapshot wakes it first");
    await until(() => onDisk.idle !== undefined);
    await f.manager.connect(onDisk.sandboxId, 60);
    assert.equal(onDisk.idle, undefined, "connect wakes it");
  });
});

test("after a restart: a sandbox on disk is adopted as running on disk, a frozen one is thawed", async () => {
  await withFakeManager({ idleFreezeAfterSec: 0.1, idleDiskAfterSec: 0.1 }, async (f) => {
    const onDisk = await f.manager.create(createRequest());
    await until(() => onDisk.idle?.tier === "disk");
    await f.manager.close();
    const frozen = await f.manager.create(createRequest()).catch(() => undefined);
    assert.equal(frozen, undefined, "a closed manager starts nothing");

    const restarted = new SandboxManager({ ...f, templates: fakeTemplates, admission: { slots: 4, maxWaiting: 10, minAvailableBytes: 0 }, pauseImageAfterMs: -1 });
    try {
      const result = await restarted.recover();
      assert.deepEqual(result.adopted, [onDisk.sandboxId]);
      const adopted = await restarted.get(onDisk.sandboxId);
      assert.deepEqual([adopted.state, adopted.idle?.tier], ["running", "disk"]);
      assert.equal(await f.runtime.images.exists(adopted.idle!.imageId!), true, "its image is not taken for an unowned one");
      assert.ok(await restarted.resumeForTraffic(onDisk.sandboxId), "woken by the next request");
      assert.equal(f.containers.get(onDisk.sandboxId), "running");
    } finally {
      await restarted.close();
    }
  });
  await withFakeManager({ idleFreezeAfterSec: 0.1 }, async (f) => {
    const frozen = await f.manager.create(createRequest());
    await until(() => frozen.idle?.tier === "frozen");
    await f.manager.close();
    const restarted = new SandboxManager({ ...f, templates: fakeTemplates, admission: { slots: 4, maxWaiting: 10, minAvailableBytes: 0 }, pauseImageAfterMs: -1 });
    try {
      await restarted.recover();
      const adopted = await restarted.get(frozen.sandboxId);
      assert.deepEqual([adopted.state, adopted.idle, f.containers.get(frozen.sandboxId)], ["running", undefined, "running"]);
      assert.ok(restarted.routeTarget(frozen.sandboxId));
    } finally {
      await restarted.close();
    }
  });
});

test("a check that began before the freeze and ends unanswered (the agent is frozen) does not cancel the move to disk", async () => {
  await withFakeManager({ idleFreezeAfterSec: 0.1, idleDiskAfterSec: 0.2 }, async (f) => {
    const other = await f.manager.create(createRequest());
    const record = await f.manager.create(createRequest());
    const id = record.sandboxId;
    const answer = f.agent.runningProcessCount.bind(f.agent);
    let calls = 0;
    let unanswered = 0;
    f.agent.runningProcessCount = async (address, token) => {
      if (address !== record.network?.sandboxAddress) return answer(address, token);
      calls++;
      if (calls === 1) {
        // Another sandbox's change re-arms this one's checks (sync) while its decision waits for the agent.
        void f.manager.setTimeout(other.sandboxId, 300);
        await sleep(50);
        return answer(address, token);
      }
      // The second decision's question reaches the agent after the first decision froze it: no answer.
      await sleep(100);
      if (f.containers.get(id) !== "frozen") return answer(address, token);
      unanswered++;
      throw new Error("timed out");
    };
    await until(() => record.idle?.tier === "frozen");
    await until(() => unanswered > 0);
    await until(() => record.idle?.tier === "disk", 3000);
  });
});
