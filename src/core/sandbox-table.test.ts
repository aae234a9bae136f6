import assert from "node:assert/strict";
import { test } from "node:test";
import type { SandboxRecord } from "../store/types.js";
import { SandboxTable } from "./sandbox-table.js";
import { MemoryStore } from "./test-fakes.js";

function record(sandboxId: string): SandboxRecord {
  return {
    sandboxId,
    runtimeId: `rt-${sandboxId}`,
    templateId: "base",
    alias: "base",
    clientId: "cubicle",
    state: "starting",
    startedAt: 1,
    endAt: 2,
    cpuCount: 1,
    memoryMB: 512,
    diskSizeMB: 0,
    metadata: {},
    envVars: {},
    secure: false,
    envdAccessToken: undefined,
    trafficAccessToken: undefined,
    allowInternetAccess: true,
    networkConfig: undefined,
    lifecycle: { autoResume: false, onTimeout: "kill" },
    network: undefined,
    runtime: "container",
    endReason: undefined,
  };
}

function table() {
  const store = new MemoryStore();
  const tornDown: string[] = [];
  const t = new SandboxTable(store, async (r, reason) => void tornDown.push(`${r.sandboxId} ${r.state} ${reason}`));
  return { store, tornDown, table: t };
}

test("every state change is mirrored into the store, and only legal ones are accepted", async () => {
  const { store, table: t } = table();
  const r = record("a");
  await t.add(r);
  assert.equal(store.sandboxes.get("a")?.state, "starting");
  await assert.rejects(t.transition(r, "paused"), /cannot go from "starting" to "paused"/);
  await t.transition(r, "running", { endAt: 99 });
  assert.equal(store.sandboxes.get("a")?.state, "running");
  assert.equal(store.sandboxes.get("a")?.endAt, 99);
  await t.transition(r, "paused", { pause: { tier: "hot", pausedAt: 5, memory: true } });
  assert.deepEqual(store.sandboxes.get("a")?.pause, { tier: "hot", pausedAt: 5, memory: true });
  await t.update(r, { pause: { tier: "durable", pausedAt: 5, memory: true, imageId: "pause/a" } });
  assert.equal(r.pause?.tier, "durable");
  assert.equal(store.sandboxes.get("a")?.pause?.tier, "durable");
  await t.transition(r, "running", { pause: undefined });
  assert.equal(store.sandboxes.get("a")?.pause, undefined);
  await assert.rejects(t.add({ ...record("a") }), /in the table already/);
  await assert.rejects(t.add({ ...record("b"), state: "running" }), /starts in state "starting"/);
});

test("end() is the one way out: gone from the table, recorded, torn down once, an event; ended sandboxes stay ended", async () => {
  const { store, tornDown, table: t } = table();
  const r = record("a");
  await t.add(r);
  await t.transition(r, "running", { network: { netnsName: "n", netnsPath: "/n", hostInterface: "v", hostAddress: "10.0.0.1", sandboxAddress: "10.0.0.2", prefixLength: 30 } });
  await t.transition(r, "paused", { pause: { tier: "durable", pausedAt: 1, memory: true, imageId: "pause/a" } });
  await t.end(r, { state: "killed", reason: "killed by test" });
  assert.equal(t.get("a"), undefined);
  assert.equal(r.state, "killed");
  const stored = store.sandboxes.get("a")!;
  assert.equal(stored.state, "killed");
  assert.equal(stored.endReason, "killed by test");
  assert.equal(stored.network, undefined);
  assert.equal(stored.pause, undefined);
  assert.deepEqual(tornDown, ["a paused killed by test"], "the teardown sees the record as it was (its pause image, its network)");
  assert.deepEqual(store.events.map((e) => `${e.kind} ${e.detail?.reason}`), ["killed killed by test"]);
  await assert.rejects(t.end(r, { state: "dead", reason: "again" }), /cannot go from "killed" to "dead"/);
  await assert.rejects(t.transition(r, "running"), /cannot go from "killed"/);
  assert.equal(tornDown.length, 1);
});

test("a record that is not live (recovery) can end too; lookups by runtime id find live ones only", async () => {
  const { store, table: t } = table();
  const vanished = { ...record("v"), state: "running" as const };
  await store.insertSandbox(vanished);
  await t.end(vanished, { state: "dead", reason: "vanished" });
  assert.equal(store.sandboxes.get("v")?.state, "dead");
  const r = record("a");
  await t.add(r);
  assert.equal(t.byRuntimeId("rt-a"), r);
  assert.equal(t.byRuntimeId("rt-v"), undefined);
  assert.equal(t.isLive(r), true);
  assert.equal(t.isLive({ ...r }), false, "a copy is not the live record");
});
