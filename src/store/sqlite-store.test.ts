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
