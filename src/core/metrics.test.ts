import { test } from "node:test";
import assert from "node:assert/strict";
import type { SandboxStats } from "../runtime/types.js";
import { METRICS_BUCKET_SEC, METRICS_RETAINED_SAMPLES, SandboxMetrics } from "./metrics.js";
import { createRequest, withFakeManager } from "./test-fakes.js";

function stats(memUsedBytes: number): SandboxStats {
  return { cpuCount: 2, cpuUsedPct: 1.5, memUsedBytes, memTotalBytes: 1000, memCacheBytes: 0, diskUsedBytes: 10, diskTotalBytes: 100 };
}

/** A SandboxMetrics on a clock the test moves, over sandboxes the test declares. */
function harness() {
  let nowMs = 1_700_000_000_000;
  const running = new Map<string, string>();
  const known = new Set<string>();
  const frozen = new Set<string>();
  const asked: string[] = [];
  let reads = 0;
  const metrics = new SandboxMetrics(
    {
      running: () => new Map(running),
      isKnown: (id) => known.has(id),
      frozen: (id) => frozen.has(id),
      stats: async (runtimeId) => {
        asked.push(runtimeId);
        return stats(++reads);
      },
    },
    () => nowMs,
  );
  return {
    metrics,
    running,
    known,
    frozen,
    asked,
    advance: (seconds: number) => (nowMs += seconds * 1000),
    nowSec: () => nowMs / 1000,
  };
}

test("one sample per 5 s bucket, stamped with the bucket; start and end select samples; before the sandbox existed is empty", async () => {
  const h = harness();
  h.running.set("s1", "runtime-of-s1");
  h.known.add("s1");
  const createdSec = h.nowSec();
  for (let step = 0; step < 6; step++) {
    await h.metrics.collect();
    await h.metrics.collect(); // a second round in the same bucket adds nothing
    h.advance(METRICS_BUCKET_SEC);
  }
  const all = await h.metrics.range("s1", undefined);
  assert.equal(all.length, 6);
  for (const sample of all) assert.equal(sample.timestampSec % METRICS_BUCKET_SEC, 0);
  assert.deepEqual(all.map((sample) => sample.memUsedBytes), [1, 2, 3, 4, 5, 6]);
  const middle = await h.metrics.range("s1", undefined, all[1]!.timestampSec, all[3]!.timestampSec);
  assert.deepEqual(middle.map((sample) => sample.memUsedBytes), [2, 3, 4], "inclusive at both ends");
  assert.deepEqual(await h.metrics.range("s1", undefined, 0, Math.floor(createdSec) - 3600), [], "a range before the sandbox existed");
  assert.deepEqual(h.asked.every((id) => id === "runtime-of-s1"), true, "stats come from the runtime id, not the sandbox id");
});

test("a request reaching the current bucket samples it on the spot; a paused sandbox keeps its history; an ended one loses it", async () => {
  const h = harness();
  h.known.add("s2");
  const first = await h.metrics.range("s2", "rt2");
  assert.equal(first.length, 1, "a new sandbox has a sample at once");
  const again = await h.metrics.range("s2", "rt2");
  assert.equal(again.length, 1, "not twice in one bucket");
  assert.ok(again[0]!.memUsedBytes > first[0]!.memUsedBytes, "but retaken: the newest sample is as fresh as the request");
  h.advance(METRICS_BUCKET_SEC);
  // Paused: not running, still known: history stays, nothing new.
  await h.metrics.collect();
  assert.equal((await h.metrics.range("s2", undefined)).length, 1);
  h.known.delete("s2");
  await h.metrics.collect();
  assert.deepEqual(await h.metrics.range("s2", undefined), []);
});

test("history is bounded: the oldest samples go first", async () => {
  const h = harness();
  h.running.set("s3", "rt3");
  h.known.add("s3");
  for (let step = 0; step < METRICS_RETAINED_SAMPLES + 5; step++) {
    await h.metrics.collect();
    h.advance(METRICS_BUCKET_SEC);
  }
  const kept = await h.metrics.range("s3", undefined);
  assert.equal(kept.length, METRICS_RETAINED_SAMPLES);
  assert.equal(kept[0]!.memUsedBytes, 6);
  assert.ok(kept.every((sample, index) => index === 0 || sample.timestampSec > kept[index - 1]!.timestampSec));
});

test("the manager's metrics come from the sandbox's runtime id (records of older versions run under another one)", async () => {
  await withFakeManager({}, async ({ manager, runtime }) => {
    const asked: string[] = [];
    runtime.stats = async (...args: unknown[]) => {
      const runtimeId = String(args[0]);
      asked.push(runtimeId);
      return stats(42);
    };
    const record = await manager.create(createRequest());
    // A record from before pool entries took their sandbox's id (store/types.ts runtimeIdOf).
    record.runtimeId = "iolder-runtime-id";
    const samples = await manager.metrics(record.sandboxId);
    assert.equal(samples.at(-1)?.memUsedBytes, 42);
    assert.ok(asked.length > 0 && asked.every((id) => id === "iolder-runtime-id"), JSON.stringify(asked));
    record.runtimeId = record.sandboxId;
    await manager.pause(record.sandboxId);
    assert.equal((await manager.metrics(record.sandboxId)).length, samples.length, "a paused sandbox keeps its samples");
    const latest = await manager.latestMetrics([record.sandboxId, "inope"]);
    assert.deepEqual([...latest.keys()], [record.sandboxId], "unknown ids are left out");
    await manager.kill(record.sandboxId);
    await assert.rejects(manager.metrics(record.sandboxId), /not found/);
  });
});

test("a sandbox frozen for idleness is not read: its newest sample carries on with CPU 0; one frozen before any sample is read once", async () => {
  const h = harness();
  for (const id of ["s1", "s2"]) {
    h.running.set(id, `runtime-of-${id}`);
    h.known.add(id);
  }
  await h.metrics.collect();
  h.frozen.add("s1");
  h.frozen.add("s2");
  h.advance(METRICS_BUCKET_SEC);
  h.asked.length = 0;
  await h.metrics.collect();
  h.advance(METRICS_BUCKET_SEC);
  await h.metrics.collect();
  assert.equal(h.asked.length, 0, "no frozen sandbox was read");
  const history = await h.metrics.range("s1", undefined);
  assert.equal(history.length, 3);
  assert.deepEqual(history.map((sample) => sample.cpuUsedPct), [1.5, 0, 0]);
  assert.equal(new Set(history.map((sample) => sample.memUsedBytes)).size, 1, "memory as it was at the freeze");
  // Thawed: read again.
  h.frozen.delete("s1");
  h.advance(METRICS_BUCKET_SEC);
  await h.metrics.collect();
  assert.ok(h.asked.includes("runtime-of-s1"));
  // Frozen with no sample yet (a new sandbox that froze before its first round): read once.
  h.running.set("s3", "runtime-of-s3");
  h.known.add("s3");
  h.frozen.add("s3");
  h.asked.length = 0;
  await h.metrics.collect();
  assert.deepEqual(h.asked, ["runtime-of-s3"]);
});

test("a round over many sandboxes lets the event loop run between its batches", async () => {
  const h = harness();
  for (let index = 0; index < 100; index++) {
    h.running.set(`s${index}`, `runtime-of-s${index}`);
    h.known.add(`s${index}`);
  }
  let sampledBeforeTheLoopRan: number | undefined;
  setImmediate(() => (sampledBeforeTheLoopRan = h.asked.length));
  await h.metrics.collect();
  assert.equal(h.asked.length, 100);
  assert.ok(sampledBeforeTheLoopRan !== undefined && sampledBeforeTheLoopRan < 100, `the loop ran only after ${sampledBeforeTheLoopRan} of 100 samples`);
});
