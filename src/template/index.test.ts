import { after, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { buildTemplate } from "./build.js";
import { baseRecipe, ensureTemplate, getTemplate, listTemplates, recipeHash, type Recipe } from "./index.js";
import { writeMetadata, type TemplateMetadata } from "./template-store.js";
import { createLogger } from "../shared/log.js";

const isRoot = process.getuid?.() === 0;
const tempDirs: string[] = [];
after(() => Promise.all(tempDirs.map((dir) => fs.rm(dir, { recursive: true, force: true }))));

async function tempDir(): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "cubicle-template-"));
  tempDirs.push(dir);
  return dir;
}

async function cachedBase(templateDir: string, hash = recipeHash(baseRecipe)): Promise<TemplateMetadata> {
  const dir = path.join(templateDir, "base");
  await fs.mkdir(path.join(dir, "rootfs"), { recursive: true });
  const meta: TemplateMetadata = {
    templateId: "base",
    aliases: ["base"],
    defaultUser: "user",
    defaultWorkdir: "/home/user",
    env: {},
    cpuCount: 2,
    memoryMB: 512,
    diskSizeMB: 4096,
    runtime: "container",
    recipeHash: hash,
    builtAt: "2000-01-01T00:00:00.000Z",
    sizeBytes: 1,
  };
  await writeMetadata(dir, meta);
  return meta;
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

test("a current cached template is returned as it is, without building", async () => {
  const templateDir = await tempDir();
  const meta = await cachedBase(templateDir);
  const record = await ensureTemplate({ templateDir }, "base");
  assert.equal(record.builtAt, meta.builtAt);
  assert.equal(record.rootfsDir, path.join(templateDir, "base", "rootfs"));
  assert.deepEqual(await fs.readdir(templateDir), ["base"]); // no lock left behind
});

test("concurrent calls in one process share one build", async () => {
  const templateDir = await tempDir();
  await cachedBase(templateDir);
  const first = ensureTemplate({ templateDir }, "base");
  const second = ensureTemplate({ templateDir }, "base");
  assert.equal(first, second);
  await first;
});

test("an unknown template name is not_found and lists the built-in ones", async () => {
  const templateDir = await tempDir();
  await assert.rejects(ensureTemplate({ templateDir }, "nope"), (err: Error & { code?: string }) => {
    assert.equal(err.code, "not_found");
    assert.match(err.message, /base, code-interpreter-v1/);
    return true;
  });
  await assert.rejects(getTemplate({ templateDir }, "nope"), { code: "not_found" });
});

test("getTemplate finds a built template by alias, listTemplates lists it", async () => {
  const templateDir = await tempDir();
  await cachedBase(templateDir, "any-hash");
  assert.equal((await getTemplate({ templateDir }, "base")).templateId, "base");
  assert.deepEqual((await listTemplates({ templateDir })).map((t) => t.templateId), ["base"]);
});

test("a failed rebuild of a stale template keeps the old one and leaves no half-built directory", { skip: !isRoot && "needs root" }, async () => {
  const templateDir = await tempDir();
  await cachedBase(templateDir, "old-hash");
  await withFakeMmdebstrap(1, async () => {
    await assert.rejects(ensureTemplate({ templateDir }, "base"), /building template 'base' failed/);
  });
  assert.deepEqual(await fs.readdir(templateDir), ["base"]);
  assert.equal((await getTemplate({ templateDir }, "base")).recipeHash, "old-hash");
});

test("a build lands atomically in place with metadata and a shifted tree, replacing the old one", { skip: !isRoot && "needs root" }, async () => {
  const templateDir = await tempDir();
  await fs.mkdir(path.join(templateDir, "tiny", "rootfs"), { recursive: true });
  await fs.writeFile(path.join(templateDir, "tiny", "rootfs", "old-file"), "");
  // Left by a build that crashed: removed by the next one.
  await fs.mkdir(path.join(templateDir, ".build-tiny-0badc0de"));
  await withFakeMmdebstrap(0, async () => {
    const record = await buildTemplate(treeOnlyRecipe, templateDir, { mirror: "http://unused.invalid", log: quietLog });
    assert.equal(record.recipeHash, recipeHash(treeOnlyRecipe));
    assert.equal(record.runtime, "container");
    assert.ok(record.sizeBytes > 0);
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
  const onDisk = JSON.parse(await fs.readFile(path.join(templateDir, "tiny", "template.json"), "utf8"));
  assert.deepEqual(onDisk.aliases, ["tiny-alias"]);
});

test(
  "builds the real base template with mmdebstrap (CUBICLE_SLOW_TESTS=1, about 30 s, needs the Debian mirror)",
  { skip: process.env.CUBICLE_SLOW_TESTS !== "1" && "set CUBICLE_SLOW_TESTS=1", timeout: 10 * 60_000 },
  async () => {
    const templateDir = await tempDir();
    const record = await ensureTemplate({ templateDir }, "base");
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
    const again = await ensureTemplate({ templateDir }, "base");
    assert.equal(again.builtAt, record.builtAt);
  },
);
