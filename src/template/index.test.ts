import { after, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { buildTemplate } from "./build.js";
import { baseRecipe, ensureTemplate, getTemplate, listTemplates, recipeHash, type Recipe } from "./index.js";
import { writeStamp, type TreeStamp } from "./template-store.js";
import { createLogger } from "../shared/log.js";
import { SqliteStore } from "../store/index.js";

const isRoot = process.getuid?.() === 0;
const tempDirs: string[] = [];
after(() => Promise.all(tempDirs.map((dir) => fs.rm(dir, { recursive: true, force: true }))));

async function tempDir(): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "cubicle-template-"));
  tempDirs.push(dir);
  return dir;
}

/** A tree of the base recipe in the template cache, as a build (of this server or another) left it. */
async function cachedBase(templateDir: string, hash = recipeHash(baseRecipe)): Promise<TreeStamp> {
  const dir = path.join(templateDir, "base");
  await fs.mkdir(path.join(dir, "rootfs"), { recursive: true });
  const stamp: TreeStamp = { recipeHash: hash, builtAt: "2000-01-01T00:00:00.000Z", sizeBytes: 1 };
  await writeStamp(dir, stamp);
  return stamp;
}

const stores: SqliteStore[] = [];
after(() => Promise.all(stores.map((store) => store.close())));
function newStore(): SqliteStore {
  const store = new SqliteStore(":memory:");
  stores.push(store);
  return store;
}

/**
 * Puts a fake `mmdebstrap` first on PATH for the duration of `fn`. It makes a tiny tree at the
 * rootfs argument and then exits with `exitCode`.
 */
async function withFakeMmdebstrap(exitCode: number, fn: () => Promise<void>): Promise<void> {
  const binDir = await tempDir();
  await fs.writeFile(
    path.join(binDir, "mmdebstrap"),
    `#!${process.execPath}
const fs = require("node:fs");
const rootfs = process.argv[process.argv.length - 2];
fs.mkdirSync(rootfs + "/etc", { recursive: true });
fs.writeFileSync(rootfs + "/etc/os-release", "fake\\n");
process.exit(${exitCode});
`,
    { mode: 0o755 },
  );
  const savedPath = process.env.PATH;
  process.env.PATH = `${binDir}:${savedPath}`;
  try {
    await fn();
  } finally {
    process.env.PATH = savedPath;
  }
}

/** A recipe that needs nothing from a real Debian tree (no users, no chroot steps). */
const treeOnlyRecipe: Recipe = {
  ...baseRecipe,
  templateId: "tiny",
  aliases: ["tiny-alias"],
  groups: [],
  users: [],
  steps: [],
};
const quietLog = createLogger("template-test");

test("a current tree in the cache is recorded in the store without building, once", async () => {
  const templateDir = await tempDir();
  const store = newStore();
  const stamp = await cachedBase(templateDir);
  const record = await ensureTemplate({ templateDir }, store, "base");
  assert.equal(record.builtAt, stamp.builtAt);
  assert.equal(record.source, "recipe");
  assert.equal(record.rootfsDir, path.join(templateDir, "base", "rootfs"));
  assert.deepEqual(await fs.readdir(templateDir), ["base"]); // no lock left behind
  assert.deepEqual(await store.getTemplate("base"), record);
  const builds = await store.listTemplateBuilds("base");
  assert.equal(builds.length, 1);
  assert.equal(builds[0]!.status, "ready");
  assert.equal(record.buildId, builds[0]!.buildId);
  assert.match(builds[0]!.logs.map((l) => l.message).join("\n"), /template cache holds this recipe's tree/);
  // Recorded: the next call reads the store and adds no build.
  const versionBefore = await store.templatesVersion();
  assert.deepEqual(await ensureTemplate({ templateDir }, store, "base"), record);
  assert.equal((await store.listTemplateBuilds("base")).length, 1);
  assert.equal(await store.templatesVersion(), versionBefore);
});

test("concurrent calls in one process share one build", async () => {
  const templateDir = await tempDir();
  const store = newStore();
  await cachedBase(templateDir);
  const first = ensureTemplate({ templateDir }, store, "base");
  const second = ensureTemplate({ templateDir }, store, "base");
  assert.equal(first, second);
  await first;
});

test("an unknown template name is not_found and lists the built-in ones", async () => {
  const templateDir = await tempDir();
  const store = newStore();
  await assert.rejects(ensureTemplate({ templateDir }, store, "nope"), (err: Error & { code?: string }) => {
    assert.equal(err.code, "not_found");
    assert.match(err.message, /base, code-interpreter-v1/);
    return true;
  });
  await assert.rejects(getTemplate(store, "nope"), { code: "not_found" });
});

test("templates are what the store records: a tree alone is none, a record whose tree is gone is not listed", async () => {
  const templateDir = await tempDir();
  const store = newStore();
  await cachedBase(templateDir);
  assert.deepEqual(await listTemplates(store), [], "a tree in the cache is no template until it is recorded");
  await ensureTemplate({ templateDir }, store, "base");
  assert.equal((await getTemplate(store, "base")).templateId, "base");
  assert.deepEqual((await listTemplates(store)).map((t) => t.templateId), ["base"]);
  await fs.rm(path.join(templateDir, "base"), { recursive: true });
  assert.deepEqual(await listTemplates(store), []);
  await assert.rejects(getTemplate(store, "base"), { code: "not_found" });
});

test("a tree stamped by an earlier version (template.json) is taken from the cache", async () => {
  const templateDir = await tempDir();
  const store = newStore();
  await fs.mkdir(path.join(templateDir, "base", "rootfs"), { recursive: true });
  const legacy = { templateId: "base", aliases: ["base"], recipeHash: recipeHash(baseRecipe), builtAt: "1999-01-01T00:00:00.000Z", sizeBytes: 7, defaultUser: "user", defaultWorkdir: "/home/user", env: {} };
  await fs.writeFile(path.join(templateDir, "base", "template.json"), JSON.stringify(legacy));
  const record = await ensureTemplate({ templateDir }, store, "base");
  assert.equal(record.builtAt, legacy.builtAt);
  assert.equal(record.sizeBytes, 7);
});

test("a failed rebuild of a stale template keeps the old tree and record, and records the failed build", { skip: !isRoot && "needs root" }, async () => {
  const templateDir = await tempDir();
  const store = newStore();
  await cachedBase(templateDir, "old-hash");
  await store.putTemplate({ templateId: "base", aliases: ["base"], defaultUser: "user", defaultWorkdir: "/home/user", env: {}, cpuCount: 2, memoryMB: 512, diskSizeMB: 4096, runtime: "container", recipeHash: "old-hash", builtAt: "2000-01-01T00:00:00.000Z", sizeBytes: 1, source: "recipe", rootfsDir: path.join(templateDir, "base", "rootfs") });
  await withFakeMmdebstrap(1, async () => {
    await assert.rejects(ensureTemplate({ templateDir }, store, "base"), /building template 'base' failed/);
  });
  assert.deepEqual(await fs.readdir(templateDir), ["base"]);
  assert.equal((await getTemplate(store, "base")).recipeHash, "old-hash");
  const failed = (await store.listTemplateBuilds("base")).filter((build) => build.status === "error");
  assert.ok(failed.length >= 1);
  assert.match(failed[0]!.reason?.message ?? "", /building template 'base' failed/);
});

test("a build lands atomically in place with its stamp and a shifted tree, replacing the old one; the record is in the store", { skip: !isRoot && "needs root" }, async () => {
  const templateDir = await tempDir();
  await fs.mkdir(path.join(templateDir, "tiny", "rootfs"), { recursive: true });
  await fs.writeFile(path.join(templateDir, "tiny", "rootfs", "old-file"), "");
  // Left by a build that crashed: removed by the next one.
  await fs.mkdir(path.join(templateDir, ".build-tiny-0badc0de"));
  await withFakeMmdebstrap(0, async () => {
    const tree = await buildTemplate(treeOnlyRecipe, templateDir, { mirror: "http://unused.invalid", log: quietLog });
    assert.equal(tree.stamp.recipeHash, recipeHash(treeOnlyRecipe));
    assert.equal(tree.rootfsDir, path.join(templateDir, "tiny", "rootfs"));
    assert.ok(tree.stamp.sizeBytes > 0);
  });
  assert.deepEqual((await fs.readdir(templateDir)).sort(), ["tiny"]);
  const rootfs = path.join(templateDir, "tiny", "rootfs");
  await assert.rejects(fs.stat(path.join(rootfs, "old-file")), { code: "ENOENT" });
  assert.equal(await fs.readFile(path.join(rootfs, "etc/hostname"), "utf8"), "sandbox\n");
  const rootStat = await fs.stat(path.join(rootfs, "root"));
  assert.equal(rootStat.mode & 0o777, 0o700);
  assert.equal(rootStat.uid, 100000);
  assert.equal((await fs.stat(path.join(rootfs, ".cubicle"))).isDirectory(), true);
  // The template directory itself stays the host root's, traversable by the mapped root.
  const dirStat = await fs.stat(path.join(templateDir, "tiny"));
  assert.equal(dirStat.uid, 0);
  assert.equal(dirStat.mode & 0o755, 0o755);
  assert.deepEqual((await fs.readdir(path.join(templateDir, "tiny"))).sort(), ["rootfs", "tree.json"], "the tree's stamp, no record file");
});

test("ensureTemplate builds a recipe whose tree is missing and records the build with its log", { skip: !isRoot && "needs root" }, async () => {
  const templateDir = await tempDir();
  const store = newStore();
  const progress: string[] = [];
  await withFakeMmdebstrap(0, async () => {
    // `base` needs a real Debian tree (users, sudo); the fake one fails at its first chroot step, after the bootstrap.
    await assert.rejects(ensureTemplate({ templateDir }, store, "base", { onProgress: (m) => progress.push(m) }), /building template 'base' failed/);
  });
  const [build] = await store.listTemplateBuilds("base");
  assert.equal(build?.status, "error");
  assert.ok(build!.logs.some((l) => /bootstrapping Debian/.test(l.message)), "the build's progress is its log");
  assert.ok(progress.some((m) => /bootstrapping Debian/.test(m)));
  assert.equal(await store.getTemplate("base"), undefined, "nothing half-registered");
});

test(
  "builds the real base template with mmdebstrap (CUBICLE_SLOW_TESTS=1, about 30 s, needs the Debian mirror)",
  { skip: process.env.CUBICLE_SLOW_TESTS !== "1" && "set CUBICLE_SLOW_TESTS=1", timeout: 10 * 60_000 },
  async () => {
    const templateDir = await tempDir();
    const store = newStore();
    const record = await ensureTemplate({ templateDir }, store, "base");
    const rootfs = record.rootfsDir;
    const passwd = await fs.readFile(path.join(rootfs, "etc/passwd"), "utf8");
    assert.match(passwd, /^user:x:1000:1000::\/home\/user:\/bin\/bash$/m);
    assert.match(await fs.readFile(path.join(rootfs, "etc/group"), "utf8"), /^sudo:x:27:user$/m);
    assert.equal(await fs.readFile(path.join(rootfs, "etc/sudoers.d/user"), "utf8"), "user ALL=(ALL:ALL) NOPASSWD: ALL\n");
    const sudo = await fs.stat(path.join(rootfs, "usr/bin/sudo"));
    assert.equal(sudo.uid, 100000);
    assert.equal(sudo.mode & 0o4000, 0o4000);
    assert.equal((await fs.stat(path.join(rootfs, "home/user"))).uid, 101000);
    assert.equal((await fs.lstat(path.join(rootfs, "usr/bin/python"))).isSymbolicLink(), true);
    await assert.rejects(fs.stat(path.join(rootfs, "usr/share/man/man1")), { code: "ENOENT" });
    // A second call finds it cached.
    const again = await ensureTemplate({ templateDir }, store, "base");
    assert.equal(again.builtAt, record.builtAt);
  },
);
