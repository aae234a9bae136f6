import { after, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { SqliteStore } from "../store/index.js";
import { testTemplateRecord } from "../store/test-template-record.js";
import { adoptLegacyRecords, cacheDecision, inspectTree, pickTemplate, templateImage, writeStamp, type TemplateRecord, type TreeStamp } from "./template-store.js";

function record(templateId: string, aliases: string[] = []): TemplateRecord {
  return testTemplateRecord(templateId, { aliases, env: { PATH: "/usr/bin:/bin" }, recipeHash: "h1", source: "recipe", rootfsDir: `/t/${templateId}/rootfs` });
}

const stores: SqliteStore[] = [];
after(() => Promise.all(stores.map((store) => store.close())));

async function withTemplateDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "cubicle-templates-"));
  try {
    await fn(dir);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

async function makeTree(templateDir: string, name: string, stamp: TreeStamp | undefined, withRootfs = true): Promise<string> {
  const dir = path.join(templateDir, name);
  await fs.mkdir(dir, { recursive: true });
  if (withRootfs) await fs.mkdir(path.join(dir, "rootfs"));
  if (stamp) await writeStamp(dir, stamp);
  return dir;
}

const stamp = (recipeHash: string): TreeStamp => ({ recipeHash, builtAt: new Date(0).toISOString(), sizeBytes: 1 });

test("a tree stamped with the recipe's hash and with a rootfs is ready; another hash is stale", async () => {
  await withTemplateDir(async (templateDir) => {
    const dir = await makeTree(templateDir, "base", stamp("h1"));
    assert.equal(cacheDecision(await inspectTree(dir), "h1"), "ready");
    assert.equal(cacheDecision(await inspectTree(dir), "new"), "stale");
  });
});

test("a missing tree is missing; a stamp without rootfs, or a rootfs without stamp, is incomplete; an unreadable stamp counts as none", async () => {
  await withTemplateDir(async (templateDir) => {
    assert.equal(cacheDecision(await inspectTree(path.join(templateDir, "base")), "h1"), "missing");
    assert.equal(cacheDecision(await inspectTree(await makeTree(templateDir, "a", stamp("h1"), false)), "h1"), "incomplete");
    assert.equal(cacheDecision(await inspectTree(await makeTree(templateDir, "b", undefined)), "h1"), "incomplete");
    const garbled = await makeTree(templateDir, "c", stamp("h1"));
    await fs.writeFile(path.join(garbled, "tree.json"), "{ not json");
    assert.equal(cacheDecision(await inspectTree(garbled), "h1"), "incomplete");
  });
});

test("a template is picked by id first, then by alias", () => {
  const records = [record("a", ["b"]), record("b")];
  assert.equal(pickTemplate(records, "b")?.templateId, "b");
  assert.equal(pickTemplate(records, "a")?.templateId, "a");
  assert.equal(pickTemplate([record("a", ["ci"])], "ci")?.templateId, "a");
  assert.equal(pickTemplate(records, "nope"), undefined);
});

test("the runtime image carries the rootfs path, layer, user, workdir and env", () => {
  assert.deepEqual(templateImage(record("base")), {
    templateId: "base",
    rootfsDir: "/t/base/rootfs",
    defaultUser: "user",
    defaultWorkdir: "/home/user",
    env: { PATH: "/usr/bin:/bin" },
  });
  assert.equal(templateImage({ ...record("x"), source: "build", layerImageId: "layer/abc" }).layerImageId, "layer/abc");
});

test("earlier versions' built-template files become store records and their directories go; a record already stored wins", async () => {
  await withTemplateDir(async (dir) => {
    const store = new SqliteStore(":memory:");
    stores.push(store);
    const legacy = (templateId: string, cpuCount: number) => ({
      ...record(templateId, [`${templateId}-name`]),
      rootfsDir: undefined,
      baseRootfsDir: "/images/abc/rootfs",
      source: "build",
      layerImageId: `layer/${templateId}`,
      cpuCount,
    });
    for (const [id, cpus] of [["t1", 1], ["t2", 2]] as const) {
      await fs.mkdir(path.join(dir, id));
      await fs.writeFile(path.join(dir, id, "template.json"), JSON.stringify(legacy(id, cpus)));
    }
    await store.putTemplate({ ...record("t2"), source: "build", cpuCount: 8 });
    await fs.mkdir(path.join(dir, "junk"));
    await fs.writeFile(path.join(dir, "junk", "template.json"), "{ not json");
    await fs.mkdir(path.join(dir, ".build-t3-0123abcd"));

    assert.equal(await adoptLegacyRecords(dir, store), 1);
    const t1 = await store.getTemplate("t1");
    assert.equal(t1?.rootfsDir, "/images/abc/rootfs");
    assert.equal(t1?.layerImageId, "layer/t1");
    assert.deepEqual(t1?.aliases, ["t1-name"]);
    assert.equal("baseRootfsDir" in (t1 ?? {}), false);
    assert.equal((await store.getTemplate("t2"))?.cpuCount, 8);
    await assert.rejects(fs.stat(dir), { code: "ENOENT" }, "the legacy directory is gone");
    assert.equal(await adoptLegacyRecords(dir, store), 0, "a second start finds nothing");
  });
});
