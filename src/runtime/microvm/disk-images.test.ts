import assert from "node:assert/strict";
import { chmod, chown, mkdir, mkdtemp, readdir, rm, stat, symlink, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { CubicleError } from "../../shared/cubicle-error.js";
import { runCommand } from "../../shared/exec.js";
import { SANDBOX_UID_BASE } from "../types.js";
import { builtImageKey, createOverlay, kitDiskImage, removeOverlay, removeUnusedBuiltImages, templateDiskImage } from "./disk-images.js";
import { guestSkipReason } from "./test-helpers.js";

async function debugfs(image: string, request: string): Promise<string> {
  return (await runCommand(["debugfs", "-R", request, image])).stdout;
}

test("a template tree with shifted ids becomes an ext4 image with ids from 0, unreadable files included, made once", async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), "cbm-disks-"));
  try {
    const tree = path.join(dir, "rootfs");
    await mkdir(path.join(tree, "etc"), { recursive: true });
    await mkdir(path.join(tree, "home/user"), { recursive: true });
    await writeFile(path.join(tree, "etc/shadow"), "root:secret\n");
    await chmod(path.join(tree, "etc/shadow"), 0o600);
    await writeFile(path.join(tree, "home/user/notes"), "mine\n");
    await symlink("notes", path.join(tree, "home/user/link"));
    for (const entry of [tree, path.join(tree, "etc"), path.join(tree, "etc/shadow"), path.join(tree, "home")]) await chown(entry, SANDBOX_UID_BASE, SANDBOX_UID_BASE);
    for (const entry of [path.join(tree, "home/user"), path.join(tree, "home/user/notes")]) await chown(entry, SANDBOX_UID_BASE + 1000, SANDBOX_UID_BASE + 1000);
    await runCommand(["chown", "-h", `${SANDBOX_UID_BASE + 1000}:${SANDBOX_UID_BASE + 1000}`, path.join(tree, "home/user/link")]);
    await chmod(path.join(tree, "home/user"), 0o700);

    const cache = path.join(dir, "cache");
    const image = await templateDiskImage(tree, cache, { sizeMiB: 64 });
    assert.equal(image.built, true);
    assert.equal(image.sizeBytes, 64 << 20);
    assert.equal((await stat(image.path)).mode & 0o777, 0o444);
    assert.match(await debugfs(image.path, "stat /etc/shadow"), /User:\s+0\s+Group:\s+0/);
    assert.equal(await debugfs(image.path, "cat /etc/shadow"), "root:secret\n");
    assert.match(await debugfs(image.path, "stat /home/user/notes"), /User:\s+1000\s+Group:\s+1000/);
    assert.match(await debugfs(image.path, "stat /home/user/link"), /User:\s+1000\s+Group:\s+1000[\s\S]*Fast link dest: "notes"/);
    assert.match(await debugfs(image.path, "stat /"), /User:\s+0\s+Group:\s+0/);

    const again = await templateDiskImage(tree, cache, { sizeMiB: 64 });
    assert.equal(again.built, false);
    assert.equal(again.path, image.path);
    // Another size (a sandbox's diskSizeMB) is another image; one too small for the files is refused.
    const bigger = await templateDiskImage(tree, cache, { sizeMiB: 128 });
    assert.equal(bigger.built, true);
    assert.notEqual(bigger.path, image.path);
    assert.equal(bigger.sizeBytes, 128 << 20);
    await assert.rejects(templateDiskImage(tree, cache, { sizeMiB: 32 }), (err: CubicleError) => err.code === "failed_precondition" && /cannot hold the template's files/.test(err.message));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("the kit image is made once per kit fingerprint", async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), "cbm-disks-"));
  try {
    const kit = path.join(dir, "kit");
    await mkdir(kit);
    await writeFile(path.join(kit, "manifest.json"), '{"version":1}\n');
    await writeFile(path.join(kit, "agent.js"), "console.log(1)\n");
    const cache = path.join(dir, "cache");
    const first = await kitDiskImage(kit, cache);
    assert.equal(first.built, true);
    assert.equal(await debugfs(first.path, "cat /agent.js"), "console.log(1)\n");
    assert.doesNotMatch(await debugfs(first.path, "features"), /has_journal/);
    assert.equal((await kitDiskImage(kit, cache)).built, false);
    await writeFile(path.join(kit, "manifest.json"), '{"version":1,"changed":true}\n');
    const second = await kitDiskImage(kit, cache);
    assert.equal(second.built, true);
    assert.notEqual(second.path, first.path);
    await assert.rejects(kitDiskImage(dir, cache), /not an agent kit/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("a sandbox overlay is a qcow2 on the raw base, removed with removeOverlay", async (t) => {
  if (await guestSkipReason().then((reason) => reason?.includes("qemu"))) return t.skip("qemu-img is not installed");
  const dir = await mkdtemp(path.join(os.tmpdir(), "cbm-disks-"));
  try {
    const base = path.join(dir, "base.ext4");
    await runCommand(["mke2fs", "-q", "-F", "-t", "ext4", base, "16M"]);
    const overlay = path.join(dir, "sandboxes", "s1", "root.qcow2");
    await createOverlay(base, overlay, { sizeMiB: 32 });
    const info = JSON.parse((await runCommand(["qemu-img", "info", "--output=json", overlay])).stdout) as Record<string, unknown>;
    assert.equal(info.format, "qcow2");
    assert.equal(info["backing-filename"], base);
    assert.equal(info["backing-filename-format"], "raw");
    assert.equal(info["virtual-size"], 32 << 20);
    assert.ok((await stat(overlay)).size < 1 << 20, "an overlay starts nearly empty");
    await removeOverlay(overlay);
    await assert.rejects(stat(overlay));
    await removeOverlay(overlay);
    await assert.rejects(createOverlay("relative.ext4", overlay), /must be absolute/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("built templates' images are named by their layer; those whose layer is gone are removed, nothing else", async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), "cbm-built-"));
  try {
    const kept = `template-${builtImageKey("tpl-kept_1", "/rootfs\0 2048")}.ext4`;
    const gone = `template-${builtImageKey("tpl-gone_2", "/rootfs\0 2048")}.ext4`;
    assert.match(kept, /^template-built\.tpl-kept_1\.[0-9a-f]{16}\.ext4$/);
    assert.notEqual(builtImageKey("a", "x"), builtImageKey("a", "y"));
    for (const name of [kept, gone, "template-0123456789abcdef.ext4", "kit-0123456789abcdef.ext4", "template-built.x.notahash.ext4"]) await writeFile(path.join(dir, name), "");
    const asked: string[] = [];
    const removed = await removeUnusedBuiltImages(dir, async (layer) => (asked.push(layer), layer === "tpl-kept_1"));
    assert.deepEqual(removed, [gone]);
    assert.deepEqual(asked.sort(), ["tpl-gone_2", "tpl-kept_1"]);
    assert.deepEqual((await readdir(dir)).sort(), [kept, "kit-0123456789abcdef.ext4", "template-0123456789abcdef.ext4", "template-built.x.notahash.ext4"].sort());
    assert.deepEqual(await removeUnusedBuiltImages(path.join(dir, "missing"), async () => false), []);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
