import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import Database from "better-sqlite3";
import { imageIdFromLegacyDir } from "./legacy-records.js";
import { SqliteStore } from "./sqlite-store.js";
import { testTemplateRecord } from "./test-template-record.js";
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
      imageId: `snapshot/${id}`,
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

test("records of older versions name images by directory: read back, they carry image ids", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-store-"));
  try {
    const file = path.join(dir, "cubicle.db");
    const store = new SqliteStore(file);
    const images = "/run/cubicle/pool/images";
    // Rows as a server before image ids wrote them (JSON bodies with imageDir).
    const raw = new Database(file);
    const oldSnapshot = { snapshotId: "snap_old", names: ["kept"], sourceSandboxId: "ia", sourceRuntimeId: "ia", templateId: "base", createdAt: 5, imageDir: `${images}/snapshots/snap_old`, sizeBytes: 1, memory: true, agentAccessToken: "t", cpuCount: 1, memoryMB: 512, diskSizeMB: 0 };
    raw.prepare("INSERT INTO snapshots (snapshot_id, source_sandbox_id, created_at, hidden, body) VALUES (?, ?, ?, 0, ?)").run("snap_old", "ia", 5, JSON.stringify(oldSnapshot));
    raw.prepare("INSERT INTO snapshot_names (name, snapshot_id) VALUES (?, ?)").run("kept", "snap_old");
    const insertSandbox = raw.prepare("INSERT INTO sandboxes (sandbox_id, template_id, state, started_at, end_at, runtime_id, body) VALUES (?, 'base', 'paused', ?, ?, ?, ?)");
    const paused = (id: string, startedAt: number, pause: Record<string, unknown>) => insertSandbox.run(id, startedAt, startedAt + 1, id, JSON.stringify({ ...record(id, startedAt, { state: "paused" }), pause }));
    paused("idurable", 10, { tier: "durable", pausedAt: 1, memory: true, imageDir: `${images}/paused/idurable` });
    paused("ihot", 11, { tier: "hot", pausedAt: 2, memory: true });
    paused("iwarm", 12, { tier: "durable", pausedAt: 3, memory: true, imageDir: `${images}/warm/base-0123456789abcdef` });
    raw.close();

    assert.equal((await store.getSnapshot("snap_old"))!.imageId, "snapshot/snap_old");
    assert.equal("imageDir" in (await store.getSnapshot("snap_old"))!, false);
    assert.equal((await store.findSnapshot("kept"))!.imageId, "snapshot/snap_old");
    assert.deepEqual((await store.querySnapshots({})).map((s) => s.imageId), ["snapshot/snap_old"]);
    assert.deepEqual((await store.allSnapshots()).map((s) => s.imageId), ["snapshot/snap_old"]);
    assert.deepEqual((await store.getSandbox("idurable"))!.pause, { tier: "durable", pausedAt: 1, memory: true, imageId: "pause/idurable" });
    assert.deepEqual((await store.getSandbox("ihot"))!.pause, { tier: "hot", pausedAt: 2, memory: true });
    assert.equal((await store.getSandbox("iwarm"))!.pause!.imageId, "warm/base-0123456789abcdef");
    assert.deepEqual((await store.querySandboxes({ states: ["paused"], order: "asc" })).map((r) => r.pause?.imageId), ["pause/idurable", undefined, "warm/base-0123456789abcdef"]);
    // An update writes the converted record back; a snapshot's names moving rewrites its body too.
    await store.updateSandbox("idurable", { endAt: 99 });
    const { imageDir: _legacy, ...fields } = oldSnapshot;
    await store.insertSnapshot({ ...fields, snapshotId: "snap_new", names: ["kept"], createdAt: 6, imageId: "snapshot/snap_new" });
    await store.close();
    const reread = new Database(file, { readonly: true });
    const sandboxBody = JSON.parse((reread.prepare("SELECT body FROM sandboxes WHERE sandbox_id = 'idurable'").get() as { body: string }).body);
    const snapshotBody = JSON.parse((reread.prepare("SELECT body FROM snapshots WHERE snapshot_id = 'snap_old'").get() as { body: string }).body);
    reread.close();
    assert.deepEqual(sandboxBody.pause, { tier: "durable", pausedAt: 1, memory: true, imageId: "pause/idurable" });
    assert.deepEqual([snapshotBody.imageId, snapshotBody.imageDir, snapshotBody.names], ["snapshot/snap_old", undefined, []]);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("a legacy image directory becomes the id of the same image", () => {
  assert.equal(imageIdFromLegacyDir("/run/cubicle/pool/images/snapshots/snap_abc", "snapshot"), "snapshot/snap_abc");
  assert.equal(imageIdFromLegacyDir("/run/cubicle/pool/images/paused/iabc/", "pause"), "pause/iabc");
  assert.equal(imageIdFromLegacyDir("/run/cubicle/pool/images/warm/base-0123", "pause"), "warm/base-0123");
  assert.equal(imageIdFromLegacyDir("/elsewhere/x1", "snapshot"), "snapshot/x1");
});

test("secrets: unique names, version + 1 per value, metadata kept unless replaced, oldest-first pages; survive reopening", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-store-"));
  try {
    const file = path.join(dir, "cubicle.db");
    let store = new SqliteStore(file);
    const sealed = (byte: number) => ({ iv: Buffer.alloc(12, byte), ciphertext: Buffer.from([byte, byte + 1]), authTag: Buffer.alloc(16, byte) });
    const secret = (secretId: string, name: string, createdAt: number) => ({ secretId, name, currentVersion: 1, ...sealed(1), metadata: { team: "a" }, createdAt, updatedAt: createdAt });
    await store.insertSecret(secret("sec_b", "beta", 10));
    await store.insertSecret(secret("sec_a", "alpha", 10));
    await store.insertSecret(secret("sec_c", "gamma", 5));
    await assert.rejects(store.insertSecret(secret("sec_d", "beta", 20)), (err: Error & { code?: string }) => err.code === "already_exists" && /"beta"/.test(err.message));
    assert.deepEqual((await store.querySecrets({})).map((s) => s.secretId), ["sec_c", "sec_a", "sec_b"]);
    assert.deepEqual((await store.querySecrets({ limit: 2 })).map((s) => s.secretId), ["sec_c", "sec_a"]);
    assert.deepEqual((await store.querySecrets({ after: { createdAt: 10, secretId: "sec_a" } })).map((s) => s.secretId), ["sec_b"]);

    const updated = await store.updateSecretValue("sec_a", { ...sealed(7), metadata: undefined, updatedAt: 30 });
    assert.equal(updated!.currentVersion, 2);
    assert.deepEqual(updated!.metadata, { team: "a" }, "metadata kept when the update carries none");
    assert.deepEqual(updated!.iv, Buffer.alloc(12, 7));
    const again = await store.updateSecretValue("sec_a", { ...sealed(8), metadata: JSON.parse('{"__proto__":"x","other":"y"}') as Record<string, string>, updatedAt: 40 });
    assert.equal(again!.currentVersion, 3);
    assert.equal(await store.updateSecretValue("sec_zz", { ...sealed(8), metadata: undefined, updatedAt: 40 }), undefined);
    await store.close();

    store = new SqliteStore(file);
    const [reread] = (await store.querySecrets({ after: { createdAt: 5, secretId: "sec_c" }, limit: 1 }));
    assert.equal(reread!.currentVersion, 3);
    assert.equal(reread!.updatedAt, 40);
    assert.deepEqual(reread!.ciphertext, Buffer.from([8, 9]));
    assert.deepEqual(Object.keys(reread!.metadata), ["__proto__", "other"], "metadata replaced; a __proto__ key is a key like any other");
    assert.equal(await store.deleteSecret("sec_a"), true);
    assert.equal(await store.deleteSecret("sec_a"), false);
    await store.insertSecret(secret("sec_e", "alpha", 50));
    assert.deepEqual((await store.querySecrets({})).map((s) => s.name), ["gamma", "beta", "alpha"], "a deleted secret's name is free again");
    await store.close();
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("template records: put replaces, list sorts by id, delete says whether there was one; the version moves for every connection", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-store-"));
  const file = path.join(dir, "cubicle.db");
  const store = new SqliteStore(file);
  const other = new SqliteStore(file);
  try {
    const template = (templateId: string, cpuCount: number) =>
      testTemplateRecord(templateId, { aliases: [`${templateId}-alias`], cpuCount, recipeHash: "h", sizeBytes: 0, source: "build", rootfsDir: "/r", tags: { default: "b1" } });
    const v0 = await other.templatesVersion();
    await store.putTemplate(template("zeta", 1));
    await store.putTemplate(template("alpha", 1));
    await store.putTemplate(template("zeta", 4));
    assert.deepEqual((await other.listTemplates()).map((t) => [t.templateId, t.cpuCount]), [["alpha", 1], ["zeta", 4]]);
    assert.deepEqual(await other.getTemplate("zeta"), template("zeta", 4));
    const v1 = await other.templatesVersion();
    assert.equal(v1, v0 + 3, "every put moves it, seen from another connection");
    assert.equal(await other.deleteTemplate("zeta"), true);
    assert.equal(await store.deleteTemplate("zeta"), false);
    assert.equal(await store.templatesVersion(), v1 + 1, "a delete that found nothing does not move it");
    assert.equal(await store.getTemplate("zeta"), undefined);
  } finally {
    await store.close();
    await other.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
