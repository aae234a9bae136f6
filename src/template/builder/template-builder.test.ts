/**
 * The builder's base resolution without sandboxes (builds with no steps need none): E2B's base
 * images served by built-in templates, and Docker Hub's official images standing in for
 * themselves only when no registry serves them.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import type { TemplateInfo } from "../../core/types.js";
import { CubicleError } from "../../shared/cubicle-error.js";
import { SqliteStore } from "../../store/index.js";
import { TemplateBuilder, type PulledBase } from "./template-builder.js";

const base: TemplateInfo = {
  templateId: "base",
  aliases: [],
  image: { templateId: "base", rootfsDir: "/srv/templates/base/rootfs", defaultUser: "user", defaultWorkdir: "/home/user", env: { PATH: "/usr/bin:/bin" } },
  cpuCount: 2,
  memoryMB: 1024,
  diskSizeMB: 4096,
};

async function withBuilder(pull: (reference: string) => Promise<PulledBase>, run: (builder: TemplateBuilder, store: SqliteStore) => Promise<void>): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-builder-test-"));
  const store = new SqliteStore(":memory:");
  const noSandboxes = async (): Promise<never> => {
    throw new CubicleError("unavailable", "no sandboxes here");
  };
  const builder = new TemplateBuilder({
    filesDir: path.join(dir, "files"),
    store,
    catalog: { resolve: async (name) => (name === "base" ? base : undefined), fingerprint: async () => "recipe-1", invalidate: () => undefined, isBuiltIn: (name) => name === "base" },
    sandboxes: { start: noSandboxes, commit: noSandboxes, destroy: async () => undefined, imageExists: async () => false, removeImage: async () => undefined, warm: noSandboxes, removeWarm: async () => undefined, inUse: async () => false },
    uploadKey: randomBytes(32),
    pullImage: (reference) => pull(reference),
  });
  try {
    await run(builder, store);
  } finally {
    await builder.close();
    await store.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function buildFrom(builder: TemplateBuilder, name: string, fromImage: string) {
  const { templateID, buildID } = await builder.requestBuild({ name });
  await builder.startBuild(templateID, buildID, { fromImage });
  for (let i = 0; i < 100; i++) {
    const status = await builder.status(templateID, buildID, {});
    if (status.status === "ready" || status.status === "error") return { templateID, status };
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  throw new Error("the build did not end");
}

test("fromImage of Docker Hub's python/debian/ubuntu falls back to the base template only when no registry serves it", async () => {
  const unreachable = async (): Promise<PulledBase> => {
    throw new CubicleError("unavailable", "cannot reach the registry at https://registry-1.docker.io: ENOTFOUND");
  };
  await withBuilder(unreachable, async (builder, store) => {
    const { templateID, status } = await buildFrom(builder, "py", "python:3.12");
    assert.equal(status.status, "ready", JSON.stringify(status));
    assert.ok(status.logs.some((line) => /no registry serves python:3\.12 here.*template base stands in/.test(line)), status.logs.join("\n"));
    const record = await store.getTemplate(templateID);
    assert.equal(record?.source, "build");
    assert.equal(record?.rootfsDir, base.image.rootfsDir);
    assert.equal(record?.defaultUser, "user");
    // No stand-in for images without one, nor for other failures (a missing image is an error).
    const node = await buildFrom(builder, "nodejs", "node:22");
    assert.equal(node.status.status, "error");
    assert.match(node.status.reason!.message, /ENOTFOUND/);
  });
  await withBuilder(
    async () => {
      throw new CubicleError("not_found", "image python:9 not found");
    },
    async (builder) => {
      const missing = await buildFrom(builder, "py9", "python:9");
      assert.equal(missing.status.status, "error");
      assert.match(missing.status.reason!.message, /not found/);
    },
  );
});

test("E2B's base image resolves to the base template without a pull", async () => {
  await withBuilder(
    async () => {
      throw new Error("must not pull");
    },
    async (builder) => {
      const { status } = await buildFrom(builder, "e2b-like", "e2bdev/base:latest");
      assert.equal(status.status, "ready", JSON.stringify(status.reason));
      assert.ok(status.logs.some((line) => /served by Cubicle's own template base/.test(line)));
    },
  );
});
