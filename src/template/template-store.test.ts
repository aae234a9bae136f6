import { test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import {
  cacheDecision,
  findTemplate,
  inspectTemplateDir,
  listTemplates,
  templateImage,
  templatesVersion,
  toRecord,
  writeMetadata,
  type TemplateMetadata,
} from "./template-store.js";

function metadata(templateId: string, recipeHash = "h1", aliases: string[] = []): TemplateMetadata {
  return {
    templateId,
    aliases,
    defaultUser: "user",
    defaultWorkdir: "/home/user",
    env: { PATH: "/usr/bin:/bin" },
    cpuCount: 2,
    memoryMB: 512,
    diskSizeMB: 4096,
    runtime: "container",
    recipeHash,
    builtAt: new Date(0).toISOString(),
    sizeBytes: 1,
  };
}

async function withTemplateDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "cubicle-templates-"));
  try {
    await fn(dir);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

async function makeTemplate(templateDir: string, meta: TemplateMetadata | undefined, withRootfs = true): Promise<string> {
  const dir = path.join(templateDir, meta?.templateId ?? "nameless");
  await fs.mkdir(dir, { recursive: true });
  if (withRootfs) await fs.mkdir(path.join(dir, "rootfs"));
  if (meta) await writeMetadata(dir, meta);
  return dir;
}

test("a template with matching metadata and a rootfs is ready", async () => {
  await withTemplateDir(async (templateDir) => {
    const dir = await makeTemplate(templateDir, metadata("base", "h1"));
    assert.equal(cacheDecision(await inspectTemplateDir(dir), "h1"), "ready");
  });
});

test("a template built from another recipe version is stale", async () => {
  await withTemplateDir(async (templateDir) => {
    const dir = await makeTemplate(templateDir, metadata("base", "old"));
    assert.equal(cacheDecision(await inspectTemplateDir(dir), "new"), "stale");
  });
});

test("a missing directory is missing; metadata without rootfs, or rootfs without metadata, is incomplete", async () => {
  await withTemplateDir(async (templateDir) => {
    assert.equal(cacheDecision(await inspectTemplateDir(path.join(templateDir, "base")), "h1"), "missing");
    const noRootfs = await makeTemplate(templateDir, metadata("a"), false);
    assert.equal(cacheDecision(await inspectTemplateDir(noRootfs), "h1"), "incomplete");
    const noMetadata = await makeTemplate(templateDir, undefined, true);
    assert.equal(cacheDecision(await inspectTemplateDir(noMetadata), "h1"), "incomplete");
  });
});

test("unreadable metadata counts as absent", async () => {
  await withTemplateDir(async (templateDir) => {
    const dir = await makeTemplate(templateDir, metadata("base"));
    await fs.writeFile(path.join(dir, "template.json"), "{ not json");
    assert.equal(cacheDecision(await inspectTemplateDir(dir), "h1"), "incomplete");
  });
});

test("listing shows complete templates only, not builds in progress or broken ones", async () => {
  await withTemplateDir(async (templateDir) => {
    await makeTemplate(templateDir, metadata("base", "h1", ["base"]));
    await makeTemplate(templateDir, metadata("code-interpreter-v1", "h2", ["ci"]));
    await makeTemplate(templateDir, metadata("broken"), false);
    await fs.mkdir(path.join(templateDir, ".build-base-0123abcd", "rootfs"), { recursive: true });
    const ids = (await listTemplates(templateDir)).map((t) => t.templateId);
    assert.deepEqual(ids, ["base", "code-interpreter-v1"]);
    assert.equal((await findTemplate(templateDir, "ci"))?.templateId, "code-interpreter-v1");
    assert.equal(await findTemplate(templateDir, "broken"), undefined);
  });
});

test("listing a template directory that does not exist yet gives nothing", async () => {
  assert.deepEqual(await listTemplates(path.join(os.tmpdir(), "cubicle-no-such-dir-" + process.pid)), []);
});

test("the runtime image carries the rootfs path, user, workdir and env", () => {
  const record = toRecord("/t/base", metadata("base"));
  assert.deepEqual(templateImage(record), {
    templateId: "base",
    rootfsDir: "/t/base/rootfs",
    defaultUser: "user",
    defaultWorkdir: "/home/user",
    env: { PATH: "/usr/bin:/bin" },
  });
});

test("the templates version changes when a template is added or removed, and is unknown right after a change", async () => {
  await withTemplateDir(async (templateDir) => {
    assert.equal(await templatesVersion(path.join(templateDir, "not-yet")), "absent");
    await makeTemplate(templateDir, metadata("base"));
    assert.equal(await templatesVersion(templateDir), undefined, "changed just now: another change could keep the mtime");

    const aMinuteAgo = new Date(Date.now() - 60_000);
    await fs.utimes(templateDir, aMinuteAgo, aMinuteAgo);
    const settled = await templatesVersion(templateDir);
    assert.equal(typeof settled, "string");
    assert.equal(await templatesVersion(templateDir), settled);

    // What a build does: rename a finished directory into place.
    await fs.mkdir(path.join(templateDir, ".build-other-0123abcd"));
    await fs.rename(path.join(templateDir, ".build-other-0123abcd"), path.join(templateDir, "other"));
    assert.equal(await templatesVersion(templateDir), undefined);
    const halfAMinuteAgo = new Date(Date.now() - 30_000);
    await fs.utimes(templateDir, halfAMinuteAgo, halfAMinuteAgo);
    const afterBuild = await templatesVersion(templateDir);
    assert.equal(typeof afterBuild, "string");
    assert.notEqual(afterBuild, settled);

    await fs.rm(path.join(templateDir, "base"), { recursive: true });
    const tenSecondsAgo = new Date(Date.now() - 10_000);
    await fs.utimes(templateDir, tenSecondsAgo, tenSecondsAgo);
    const afterRemoval = await templatesVersion(templateDir);
    assert.ok(afterRemoval !== undefined && afterRemoval !== afterBuild && afterRemoval !== settled);
  });
});
