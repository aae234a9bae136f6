import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { SqliteStore } from "./sqlite-store.js";
import type { SandboxRecord } from "./types.js";

function record(id: string, startedAt: number, extra: Partial<SandboxRecord> = {}): SandboxRecord {
  return {
    sandboxId: id,
    templateId: "base",
    alias: "base",
    clientId: "cubicle",
    state: "running",
    startedAt,
    endAt: startedAt + 60_000,
    cpuCount: 1,
    memoryMB: 512,
    diskSizeMB: 1024,
    metadata: {},
    envVars: {},
    secure: true,
    envdAccessToken: "t",
    trafficAccessToken: undefined,
    allowInternetAccess: true,
    networkConfig: undefined,
    lifecycle: { autoResume: false, onTimeout: "kill" },
    network: undefined,
    runtime: "container",
    endReason: undefined,
    ...extra,
  };
}

test("records survive reopening the file, and queries filter, order and page", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-store-"));
  try {
    const file = path.join(dir, "cubicle.db");
    let store = new SqliteStore(file);
    await store.insertSandbox(record("ia", 1000, { metadata: { team: "x" } }));
    await store.insertSandbox(record("ib", 2000, { metadata: { team: "y" } }));
    await store.insertSandbox(record("ic", 3000, { metadata: { team: "x" }, state: "killed" }));
    await store.updateSandbox("ib", { endAt: 99 });
    await store.recordEvent({ sandboxId: "ia", at: 5, kind: "created" });
    await store.close();

    store = new SqliteStore(file);
    assert.equal((await store.getSandbox("ib"))!.endAt, 99);
    assert.deepEqual((await store.querySandboxes({ states: ["running"] })).map((r) => r.sandboxId), ["ib", "ia"]);
    assert.deepEqual((await store.querySandboxes({ metadata: { team: "x" }, order: "asc" })).map((r) => r.sandboxId), ["ia", "ic"]);
    assert.deepEqual((await store.querySandboxes({ order: "desc", after: { startedAt: 3000, sandboxId: "ic" }, limit: 1 })).map((r) => r.sandboxId), ["ib"]);
    assert.deepEqual((await store.querySandboxes({ startedAfter: 2000 })).map((r) => r.sandboxId), ["ic", "ib"]);
    assert.deepEqual((await store.listEvents("ia")).map((e) => e.kind), ["created"]);
    await store.close();
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("snapshots: names move to the newest, queries filter and page, hidden ones stay out; pool rows and runtime ids", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-store-"));
  try {
    const store = new SqliteStore(path.join(dir, "cubicle.db"));
    const snapshot = (id: string, createdAt: number, names: string[], extra: Record<string, unknown> = {}) => ({
      snapshotId: id,
      names,
      sourceSandboxId: "ia",
      sourceRuntimeId: "ia",
      templateId: "base",
      createdAt,
      imageDir: `/x/${id}`,
      sizeBytes: 1,
      memory: true,
      agentAccessToken: "t",
      cpuCount: 1,
      memoryMB: 512,
      diskSizeMB: 0,
      ...extra,
    });
    await store.insertSnapshot(snapshot("snap-a", 1, ["trained"]));
    await store.insertSnapshot(snapshot("snap-b", 2, ["trained", "other"]));
    await store.insertSnapshot(snapshot("snap-c", 3, [], { sourceSandboxId: "ib" }));
    await store.insertSnapshot(snapshot("img-d", 4, [], { hidden: true }));
    assert.deepEqual((await store.getSnapshot("snap-a"))!.names, []);
    assert.equal((await store.findSnapshot("trained"))!.snapshotId, "snap-b");
    assert.equal((await store.findSnapshot("snap-a"))!.snapshotId, "snap-a");
    assert.equal(await store.findSnapshot("nothing"), undefined);
    assert.deepEqual((await store.querySnapshots({})).map((s) => s.snapshotId), ["snap-c", "snap-b", "snap-a"]);
    assert.deepEqual((await store.querySnapshots({ sourceSandboxId: "ia" })).map((s) => s.snapshotId), ["snap-b", "snap-a"]);
    assert.deepEqual((await store.querySnapshots({ name: "other" })).map((s) => s.snapshotId), ["snap-b"]);
    assert.deepEqual((await store.querySnapshots({ after: { createdAt: 3, snapshotId: "snap-c" }, limit: 1 })).map((s) => s.snapshotId), ["snap-b"]);
    assert.equal((await store.allSnapshots()).length, 4);
    assert.equal(await store.deleteSnapshot("snap-b"), true);
    assert.equal(await store.deleteSnapshot("snap-b"), false);
    assert.equal(await store.findSnapshot("trained"), undefined, "a deleted snapshot's names go with it");

    await store.insertSandbox(record("ic", 1000, { runtimeId: "ppool1" }));
    await store.insertPoolEntry({ runtimeId: "ppool2", templateId: "base", network: undefined, createdAt: 1, allowInternetAccess: true });
    assert.equal(await store.knowsRuntimeId("ppool1"), true);
    assert.equal(await store.knowsRuntimeId("ic"), true);
    assert.equal(await store.knowsRuntimeId("ppool2"), true);
    assert.equal(await store.knowsRuntimeId("pelse"), false);
    assert.deepEqual((await store.listPoolEntries()).map((e) => e.runtimeId), ["ppool2"]);
    await store.deletePoolEntry("ppool2");
    assert.deepEqual(await store.listPoolEntries(), []);
    await store.insertPoolEntry({ runtimeId: "iclaimed", templateId: "base", network: undefined, createdAt: 2, allowInternetAccess: true });
    await store.claimPoolEntry(record("iclaimed", 1001, { runtimeId: "iclaimed" }));
    assert.deepEqual(await store.listPoolEntries(), [], "a claim removes the pool row");
    assert.equal((await store.getSandbox("iclaimed"))?.runtimeId, "iclaimed");
    await assert.rejects(store.claimPoolEntry(record("iclaimed", 1002, { runtimeId: "iclaimed" })), /UNIQUE/);
    await store.close();
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
