import { after, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { CubicleError } from "../shared/cubicle-error.js";
import { SqliteStore } from "../store/index.js";
import { testTemplateRecord } from "../store/test-template-record.js";
import { ensureTemplate, listTemplates, type TemplateRecord } from "../template/index.js";
import { createTemplateCatalog, type TemplateAccess } from "./template-catalog.js";

const tempDirs: string[] = [];
const stores: SqliteStore[] = [];
after(async () => {
  await Promise.all(stores.map((store) => store.close()));
  await Promise.all(tempDirs.map((dir) => fs.rm(dir, { recursive: true, force: true })));
});

/** A temp directory for trees, and a store on a file in it (a second connection plays another process). */
async function tempSetup(): Promise<{ dir: string; store: SqliteStore; other: () => SqliteStore }> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "cubicle-catalog-"));
  tempDirs.push(dir);
  const open = () => {
    const store = new SqliteStore(path.join(dir, "cubicle.db"));
    stores.push(store);
    return store;
  };
  return { dir, store: open(), other: open };
}

function record(dir: string, templateId: string, aliases: string[], cpuCount: number, source: TemplateRecord["source"] = "build"): TemplateRecord {
  return testTemplateRecord(templateId, { aliases, cpuCount, recipeHash: `hash-cpu-${cpuCount}`, source, rootfsDir: path.join(dir, templateId, "rootfs") });
}

/** Records a template over a tree, as a build does. */
async function put(store: SqliteStore, template: TemplateRecord): Promise<TemplateRecord> {
  await fs.mkdir(template.rootfsDir, { recursive: true });
  await store.putTemplate(template);
  return template;
}

/** The template component's functions over a store that counts reads of the templates and of their version. */
function countingAccess(store: SqliteStore, ensure: TemplateAccess["ensureTemplate"] = ensureTemplate) {
  const counts = { reads: 0, stats: 0 };
  const version = store.templatesVersion.bind(store);
  store.templatesVersion = () => {
    counts.stats++;
    return version();
  };
  const access: TemplateAccess = {
    listTemplates: (records) => {
      counts.reads++;
      return listTemplates(records);
    },
    ensureTemplate: ensure,
  };
  return { access, counts };
}

/** A catalog on `store` with a clock the test moves. */
function catalogOn(dir: string, store: SqliteStore, access: TemplateAccess) {
  const clock = { nowMs: 1_000_000 };
  const catalog = createTemplateCatalog({ templateDir: dir }, store, { access, revalidateAfterMs: 1_000, now: () => clock.nowMs });
  return { catalog, clock };
}

test("a second resolve, by id or alias, reads nothing; after revalidateAfterMs one version read and no read of the templates", async () => {
  const { dir, store } = await tempSetup();
  await put(store, record(dir, "base", ["base-alias"], 2));
  await put(store, record(dir, "other", [], 1));
  const { access, counts } = countingAccess(store);
  const { catalog, clock } = catalogOn(dir, store, access);

  const first = await catalog.resolve("base");
  assert.equal(first?.templateId, "base");
  assert.equal(first?.image.rootfsDir, path.join(dir, "base", "rootfs"));
  assert.deepEqual(counts, { reads: 1, stats: 1 });

  assert.deepEqual(await catalog.resolve("base"), first);
  assert.equal((await catalog.resolve("base-alias"))?.templateId, "base");
  assert.equal((await catalog.resolve("other"))?.cpuCount, 1);
  assert.equal(await catalog.resolve("nope"), undefined);
  assert.equal(await catalog.fingerprint(first!), "hash-cpu-2");
  assert.deepEqual(counts, { reads: 1, stats: 1 }, "nothing read within revalidateAfterMs");

  clock.nowMs += 1_000;
  assert.deepEqual(await catalog.resolve("base-alias"), first);
  assert.deepEqual(counts, { reads: 1, stats: 2 }, "one version read, no read of the templates, when nothing changed");
  assert.equal((await catalog.resolve("base"))?.templateId, "base");
  assert.deepEqual(counts, { reads: 1, stats: 2 });
});

test("concurrent resolves share one read", async () => {
  const { dir, store } = await tempSetup();
  await put(store, record(dir, "base", ["base-alias"], 2));
  const { access, counts } = countingAccess(store);
  const { catalog } = catalogOn(dir, store, access);
  const found = await Promise.all(["base", "base-alias", "base", "nope", "base"].map((name) => catalog.resolve(name)));
  assert.deepEqual(
    found.map((t) => t?.templateId),
    ["base", "base", "base", undefined, "base"],
  );
  assert.deepEqual(counts, { reads: 1, stats: 1 });
});

test("a template another process (another connection to the store) rebuilt is seen at the next check", async () => {
  const { dir, store, other } = await tempSetup();
  await put(store, record(dir, "base", ["base-alias"], 2));
  const { access, counts } = countingAccess(store);
  const { catalog, clock } = catalogOn(dir, store, access);
  assert.equal((await catalog.resolve("base-alias"))?.cpuCount, 2);

  await put(other(), record(dir, "base", ["base-alias"], 4));
  assert.equal((await catalog.resolve("base-alias"))?.cpuCount, 2, "not looked for again within revalidateAfterMs");
  clock.nowMs += 1_000;
  const rebuilt = await catalog.resolve("base-alias");
  assert.equal(rebuilt?.cpuCount, 4);
  assert.equal(await catalog.fingerprint(rebuilt!), "hash-cpu-4");
  assert.deepEqual(counts, { reads: 2, stats: 2 });
});

test("built-in templates come first: a built template with a built-in's alias does not shadow it", async () => {
  const { dir, store } = await tempSetup();
  await put(store, record(dir, "aaa", ["base"], 1));
  await put(store, record(dir, "base", [], 2, "recipe"));
  const { access } = countingAccess(store);
  const { catalog } = catalogOn(dir, store, access);
  assert.equal((await catalog.resolve("base"))?.templateId, "base");
  assert.deepEqual((await catalog.list()).map((t) => t.templateID), ["base", "aaa"]);
});

test("a build through ensure is seen at once, without waiting for the next check", async () => {
  const { dir, store } = await tempSetup();
  await put(store, record(dir, "base", ["base-alias"], 2));
  const { access, counts } = countingAccess(store, async (_config, _stores, idOrAlias, options) => {
    assert.deepEqual([idOrAlias, options?.force], ["base", true]);
    return put(store, record(dir, "base", ["base-alias"], 4));
  });
  const { catalog } = catalogOn(dir, store, access);
  assert.equal((await catalog.resolve("base"))?.cpuCount, 2);

  assert.equal((await catalog.ensure("base", { force: true })).cpuCount, 4);
  assert.equal((await catalog.resolve("base-alias"))?.cpuCount, 4);
  assert.deepEqual(counts, { reads: 2, stats: 2 });
});

test("a read that started before a build through ensure is not kept", async () => {
  const { dir, store } = await tempSetup();
  await put(store, record(dir, "base", [], 2));
  let releaseRead!: () => void;
  const readHeld = new Promise<void>((resolve) => (releaseRead = resolve));
  let readDone!: () => void;
  const firstReadDone = new Promise<void>((resolve) => (readDone = resolve));
  const { access } = countingAccess(store, async () => put(store, record(dir, "base", [], 4)));
  const read = access.listTemplates;
  access.listTemplates = async (records) => {
    const found = await read(records);
    readDone();
    await readHeld;
    return found;
  };
  const { catalog } = catalogOn(dir, store, access);

  const early = catalog.resolve("base");
  await firstReadDone;
  await catalog.ensure("base");
  releaseRead();
  assert.equal((await early)?.cpuCount, 2, "the resolve that started first answers what it read");
  assert.equal((await catalog.resolve("base"))?.cpuCount, 4);
});

test("a template deleted by another process disappears, by id and by alias", async () => {
  const { dir, store, other } = await tempSetup();
  await put(store, record(dir, "base", ["base-alias"], 2));
  await put(store, record(dir, "other", [], 1));
  const { access } = countingAccess(store);
  const { catalog, clock } = catalogOn(dir, store, access);
  const base = await catalog.resolve("base");
  assert.ok(base);

  assert.equal(await other().deleteTemplate("base"), true);
  clock.nowMs += 1_000;
  assert.equal(await catalog.resolve("base"), undefined);
  assert.equal(await catalog.resolve("base-alias"), undefined);
  assert.deepEqual(
    (await catalog.list()).map((t) => t.templateID),
    ["other"],
  );
  await assert.rejects(catalog.fingerprint(base), (err: unknown) => err instanceof CubicleError && err.code === "not_found");
});

test("an unknown template is undefined, also with an empty store, and is found once recorded", async () => {
  const { dir, store, other } = await tempSetup();
  const { access } = countingAccess(store);
  const { catalog, clock } = catalogOn(dir, store, access);
  assert.equal(await catalog.resolve("nope"), undefined);
  assert.deepEqual(await catalog.list(), []);

  await put(other(), record(dir, "nope", [], 1));
  assert.equal(await catalog.resolve("nope"), undefined, "not looked for again within revalidateAfterMs");
  clock.nowMs += 1_000;
  assert.equal((await catalog.resolve("nope"))?.templateId, "nope");
});
