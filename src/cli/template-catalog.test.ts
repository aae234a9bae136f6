import { after, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { CubicleError } from "../shared/cubicle-error.js";
import { ensureTemplate, listTemplates, templatesVersion } from "../template/index.js";
// The test plays the part of a build (or another process's): it writes templates the way one does.
import { toRecord, writeMetadata, type TemplateMetadata } from "../template/template-store.js";
import { createTemplateCatalog, type TemplateAccess } from "./template-catalog.js";

const tempDirs: string[] = [];
after(() => Promise.all(tempDirs.map((dir) => fs.rm(dir, { recursive: true, force: true }))));

async function tempTemplateDir(): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "cubicle-catalog-"));
  tempDirs.push(dir);
  return dir;
}

function metadata(templateId: string, aliases: string[], cpuCount: number): TemplateMetadata {
  return {
    templateId,
    aliases,
    defaultUser: "user",
    defaultWorkdir: "/home/user",
    env: {},
    cpuCount,
    memoryMB: 512,
    diskSizeMB: 4096,
    runtime: "container",
    recipeHash: `hash-cpu-${cpuCount}`,
    builtAt: new Date(0).toISOString(),
    sizeBytes: 1,
  };
}

/** Puts a template in place as a build does: a complete directory renamed over the old one. */
async function buildOnDisk(templateDir: string, meta: TemplateMetadata): Promise<TemplateMetadata> {
  const staging = path.join(templateDir, `.build-${meta.templateId}-0123abcd`);
  const finalDir = path.join(templateDir, meta.templateId);
  const retired = path.join(templateDir, `.old-${meta.templateId}-0123abcd`);
  await fs.mkdir(path.join(staging, "rootfs"), { recursive: true });
  await writeMetadata(staging, meta);
  await fs.rename(finalDir, retired).catch(() => undefined);
  await fs.rename(staging, finalDir);
  await fs.rm(retired, { recursive: true, force: true });
  return meta;
}

/**
 * Sets the template directory's mtime `secondsAgo` in the past, as it is that long after the
 * last change. Right after a change the catalog reads again whatever the stat says (see
 * templatesVersion); this makes the stat the only way a change can be seen.
 */
async function lastChanged(templateDir: string, secondsAgo: number): Promise<void> {
  const when = new Date(Date.now() - secondsAgo * 1000);
  await fs.utimes(templateDir, when, when);
}

/** The template component's functions, counting reads of the templates and stats of their directory. */
function countingAccess(ensure: TemplateAccess["ensureTemplate"] = ensureTemplate) {
  const counts = { reads: 0, stats: 0 };
  const access: TemplateAccess = {
    listTemplates: (config) => {
      counts.reads++;
      return listTemplates(config);
    },
    templatesVersion: (config) => {
      counts.stats++;
      return templatesVersion(config);
    },
    ensureTemplate: ensure,
  };
  return { access, counts };
}

/** A catalog on `templateDir` with a clock the test moves. */
function catalogOn(templateDir: string, access: TemplateAccess) {
  const clock = { nowMs: 1_000_000 };
  const catalog = createTemplateCatalog({ templateDir }, { access, revalidateAfterMs: 1_000, now: () => clock.nowMs });
  return { catalog, clock };
}

test("a second resolve, by id or alias, reads nothing; after revalidateAfterMs one stat and no read", async () => {
  const templateDir = await tempTemplateDir();
  await buildOnDisk(templateDir, metadata("base", ["base-alias"], 2));
  await buildOnDisk(templateDir, metadata("other", [], 1));
  await lastChanged(templateDir, 60);
  const { access, counts } = countingAccess();
  const { catalog, clock } = catalogOn(templateDir, access);

  const first = await catalog.resolve("base");
  assert.equal(first?.templateId, "base");
  assert.equal(first?.image.rootfsDir, path.join(templateDir, "base", "rootfs"));
  assert.deepEqual(counts, { reads: 1, stats: 1 });

  assert.deepEqual(await catalog.resolve("base"), first);
  assert.equal((await catalog.resolve("base-alias"))?.templateId, "base");
  assert.equal((await catalog.resolve("other"))?.cpuCount, 1);
  assert.equal(await catalog.resolve("nope"), undefined);
  assert.equal(await catalog.fingerprint(first!), "hash-cpu-2");
  assert.deepEqual(counts, { reads: 1, stats: 1 }, "nothing read or stat'ed within revalidateAfterMs");

  clock.nowMs += 1_000;
  assert.deepEqual(await catalog.resolve("base-alias"), first);
  assert.deepEqual(counts, { reads: 1, stats: 2 }, "one stat, no read, when nothing changed");
  assert.equal((await catalog.resolve("base"))?.templateId, "base");
  assert.deepEqual(counts, { reads: 1, stats: 2 });
});

test("concurrent resolves share one read", async () => {
  const templateDir = await tempTemplateDir();
  await buildOnDisk(templateDir, metadata("base", ["base-alias"], 2));
  const { access, counts } = countingAccess();
  const { catalog } = catalogOn(templateDir, access);
  const found = await Promise.all(["base", "base-alias", "base", "nope", "base"].map((name) => catalog.resolve(name)));
  assert.deepEqual(
    found.map((t) => t?.templateId),
    ["base", "base", "base", undefined, "base"],
  );
  assert.deepEqual(counts, { reads: 1, stats: 1 });
});

test("a template rebuilt by another process is seen at the next check", async () => {
  const templateDir = await tempTemplateDir();
  await buildOnDisk(templateDir, metadata("base", ["base-alias"], 2));
  await lastChanged(templateDir, 60);
  const { access, counts } = countingAccess();
  const { catalog, clock } = catalogOn(templateDir, access);
  assert.equal((await catalog.resolve("base-alias"))?.cpuCount, 2);

  await buildOnDisk(templateDir, metadata("base", ["base-alias"], 4));
  await lastChanged(templateDir, 30);
  clock.nowMs += 1_000;
  const rebuilt = await catalog.resolve("base-alias");
  assert.equal(rebuilt?.cpuCount, 4);
  assert.equal(await catalog.fingerprint(rebuilt!), "hash-cpu-4");
  assert.deepEqual(counts, { reads: 2, stats: 2 });
});

test("a template changed just now is read again at every check until its directory's mtime can be trusted", async () => {
  const templateDir = await tempTemplateDir();
  await buildOnDisk(templateDir, metadata("base", [], 2));
  const { access, counts } = countingAccess();
  const { catalog, clock } = catalogOn(templateDir, access);
  assert.equal((await catalog.resolve("base"))?.cpuCount, 2);
  clock.nowMs += 1_000;
  await catalog.resolve("base");
  assert.deepEqual(counts, { reads: 2, stats: 2 });
});

test("a build through ensure is seen at once, without waiting for the next check", async () => {
  const templateDir = await tempTemplateDir();
  await buildOnDisk(templateDir, metadata("base", ["base-alias"], 2));
  await lastChanged(templateDir, 60);
  const { access, counts } = countingAccess(async (_config, idOrAlias, options) => {
    assert.deepEqual([idOrAlias, options?.force], ["base", true]);
    const meta = await buildOnDisk(templateDir, metadata("base", ["base-alias"], 4));
    // As it would be 2 s later: only the catalog's own invalidation can make the change seen.
    await lastChanged(templateDir, 60);
    return toRecord(path.join(templateDir, "base"), meta);
  });
  const { catalog } = catalogOn(templateDir, access);
  assert.equal((await catalog.resolve("base"))?.cpuCount, 2);

  assert.equal((await catalog.ensure("base", { force: true })).cpuCount, 4);
  assert.equal((await catalog.resolve("base-alias"))?.cpuCount, 4);
  assert.deepEqual(counts, { reads: 2, stats: 2 });
});

test("a read that started before a build through ensure is not kept", async () => {
  const templateDir = await tempTemplateDir();
  await buildOnDisk(templateDir, metadata("base", [], 2));
  await lastChanged(templateDir, 60);
  let releaseRead!: () => void;
  const readHeld = new Promise<void>((resolve) => (releaseRead = resolve));
  let readDone!: () => void;
  const firstReadDone = new Promise<void>((resolve) => (readDone = resolve));
  const { access } = countingAccess(async () => {
    const meta = await buildOnDisk(templateDir, metadata("base", [], 4));
    await lastChanged(templateDir, 60);
    return toRecord(path.join(templateDir, "base"), meta);
  });
  const read = access.listTemplates;
  access.listTemplates = async (config) => {
    const records = await read(config);
    readDone();
    await readHeld;
    return records;
  };
  const { catalog } = catalogOn(templateDir, access);

  const early = catalog.resolve("base");
  await firstReadDone;
  await catalog.ensure("base");
  releaseRead();
  assert.equal((await early)?.cpuCount, 2, "the resolve that started first answers what it read");
  assert.equal((await catalog.resolve("base"))?.cpuCount, 4);
});

test("a template removed on disk disappears, by id and by alias", async () => {
  const templateDir = await tempTemplateDir();
  await buildOnDisk(templateDir, metadata("base", ["base-alias"], 2));
  await buildOnDisk(templateDir, metadata("other", [], 1));
  await lastChanged(templateDir, 60);
  const { access } = countingAccess();
  const { catalog, clock } = catalogOn(templateDir, access);
  const base = await catalog.resolve("base");
  assert.ok(base);

  await fs.rm(path.join(templateDir, "base"), { recursive: true });
  await lastChanged(templateDir, 30);
  clock.nowMs += 1_000;
  assert.equal(await catalog.resolve("base"), undefined);
  assert.equal(await catalog.resolve("base-alias"), undefined);
  assert.deepEqual(
    (await catalog.list()).map((t) => t.templateID),
    ["other"],
  );
  await assert.rejects(catalog.fingerprint(base), (err: unknown) => err instanceof CubicleError && err.code === "not_found");
});

test("an unknown template is undefined, also with no template directory, and is found once built", async () => {
  const templateDir = path.join(await tempTemplateDir(), "templates");
  const { access } = countingAccess();
  const { catalog, clock } = catalogOn(templateDir, access);
  assert.equal(await catalog.resolve("nope"), undefined);
  assert.deepEqual(await catalog.list(), []);

  await fs.mkdir(templateDir);
  await buildOnDisk(templateDir, metadata("nope", [], 1));
  await lastChanged(templateDir, 30);
  assert.equal(await catalog.resolve("nope"), undefined, "not looked for again within revalidateAfterMs");
  clock.nowMs += 1_000;
  assert.equal((await catalog.resolve("nope"))?.templateId, "nope");
});
