import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { mkdir, mkdtemp, open, readdir, rm, stat, statfs, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import type { CubicleError } from "../shared/cubicle-error.js";
import { runCommand } from "../shared/exec.js";
import { SqliteStore } from "../store/index.js";
import { CANONICAL_ID_BASE, VolumeService } from "./volume-service.js";

/** The source device of the mount at `dir`, from /proc/self/mountinfo; undefined when none. */
function mountSource(dir: string): string | undefined {
  const line = readFileSync("/proc/self/mountinfo", "utf8").split("\n").find((entry) => entry.split(" ")[4] === dir);
  return line?.split(" - ")[1]?.split(" ")[1];
}

async function withService(run: (make: (options?: { maxVolumes?: number }) => VolumeService, dirs: { imagesDir: string; mountsDir: string }) => Promise<void>): Promise<void> {
  const base = await mkdtemp(path.join(os.tmpdir(), "cbm-volumes-"));
  const store = new SqliteStore(path.join(base, "cubicle.db"));
  const dirs = { imagesDir: path.join(base, "images"), mountsDir: path.join(base, "mounts") };
  const make = (options: { maxVolumes?: number } = {}) => new VolumeService({ store, ...dirs, volumesDir: path.join(base, "pool-volumes"), defaultSizeMB: 16, ...options });
  try {
    await run(make, dirs);
  } finally {
    for (const name of await readdir(dirs.mountsDir).catch(() => [] as string[])) {
      await runCommand(["umount", "--lazy", path.join(dirs.mountsDir, name)], { allowFailure: true });
    }
    await store.close();
    await rm(base, { recursive: true, force: true });
  }
}

const skip = process.getuid?.() !== 0 ? "needs root (loop devices, mounts)" : false;

test("a volume is an ext4 image of its size, mounted nosuid,nodev, its root the sandbox user's, without lost+found; ENOSPC past it; delete removes image and mount", { skip }, async () => {
  await withService(async (make, { imagesDir }) => {
    const volumes = make();
    await volumes.init();
    const record = await volumes.create({ name: "data", sizeMB: 8 });
    const dir = volumes.dirOf(record.volumeId);
    const root = await stat(dir);
    assert.deepEqual([root.uid, root.gid, root.mode & 0o777], [CANONICAL_ID_BASE + 1000, CANONICAL_ID_BASE + 1000, 0o755]);
    assert.deepEqual(await readdir(dir), []);
    const mount = readFileSync("/proc/self/mountinfo", "utf8").split("\n").find((line) => line.split(" ")[4] === dir)!;
    assert.match(mount.split(" ")[5]!, /nosuid.*nodev|nodev.*nosuid/);
    assert.match(mount, / - ext4 \/dev\/loop\d+ /);
    // Sparse: the image takes what its filesystem wrote, not its size.
    const image = path.join(imagesDir, `${record.volumeId}.ext4`);
    assert.equal((await stat(image)).size, 8 * 1024 * 1024);
    assert.ok((await stat(image)).blocks * 512 < 4 * 1024 * 1024);
    await assert.rejects(writeFile(path.join(dir, "big"), Buffer.alloc(12 * 1024 * 1024, 1)), (err: NodeJS.ErrnoException) => err.code === "ENOSPC");
    assert.equal(await volumes.delete(record.volumeId), true);
    assert.equal(existsSync(image), false);
    assert.equal(existsSync(dir), false);
    assert.equal(mountSource(dir), undefined);
  });
});

test("init mounts every volume again, through the loop device still attached to its image when there is one; removes images without a record", { skip }, async () => {
  await withService(async (make, { imagesDir, mountsDir }) => {
    const first = make();
    await first.init();
    const record = await first.create({ name: "kept" });
    const dir = first.dirOf(record.volumeId);
    await writeFile(path.join(dir, "file"), "still here");
    const device = mountSource(dir)!;
    // A sandbox's bind keeps the filesystem (and its loop device) when the volume's own mount goes.
    const bind = path.join(mountsDir, "..", "bind");
    await mkdir(bind);
    await runCommand(["mount", "--bind", dir, bind]);
    try {
      await runCommand(["umount", dir]);
      assert.equal(mountSource(dir), undefined);
      // An image left by a create cut short: no record.
      const orphan = path.join(imagesDir, "vol_0123456789abcdef01234567.ext4");
      await writeFile(orphan, "");
      const again = make();
      await again.init();
      assert.equal(mountSource(dir), device, "the same loop device, not a second view of the filesystem");
      assert.equal(readFileSync(path.join(again.dirOf(record.volumeId), "file"), "utf8"), "still here");
      assert.equal(existsSync(orphan), false);
    } finally {
      await runCommand(["umount", bind], { allowFailure: true });
    }
  });
});

test("at most maxVolumes volumes (each holds a loop device), and none larger than the host's free disk: refused before anything is made", { skip }, async () => {
  await withService(async (make, { imagesDir }) => {
    const volumes = make({ maxVolumes: 2 });
    await volumes.init();
    await volumes.create({ name: "one", sizeMB: 8 });
    await volumes.create({ name: "two", sizeMB: 8 });
    await assert.rejects(volumes.create({ name: "three", sizeMB: 8 }), (err: CubicleError) => err.code === "resource_exhausted" && /at most 2 volumes/.test(err.message));
    const free = await statfs(imagesDir);
    const tooBig = Math.ceil((free.bavail * free.bsize) / (1024 * 1024)) + 1024;
    const roomy = make({ maxVolumes: 10 });
    await roomy.init();
    await assert.rejects(roomy.create({ name: "huge", sizeMB: tooBig }), (err: CubicleError) => err.code === "invalid_argument" && /free/.test(err.message));
    assert.equal((await readdir(imagesDir)).length, 2, "nothing made for the refused ones");
  });
});

test("an image that cannot be mounted at start does not stop the others; its volume answers unavailable (nothing writes to its empty mount point) and can still be deleted", { skip }, async () => {
  await withService(async (make, { imagesDir }) => {
    const first = make();
    await first.init();
    const broken = await first.create({ name: "broken", sizeMB: 8 });
    const fine = await first.create({ name: "fine", sizeMB: 8 });
    await writeFile(path.join(first.dirOf(fine.volumeId), "file"), "kept");
    for (const record of [broken, fine]) await runCommand(["umount", first.dirOf(record.volumeId)]);
    // The broken one's superblock is gone (as after a disk fault).
    const image = path.join(imagesDir, `${broken.volumeId}.ext4`);
    const handle = await open(image, "r+");
    await handle.write(Buffer.alloc(64 * 1024), 0, 64 * 1024, 0);
    await handle.close();
    const again = make();
    await again.init();
    assert.equal(readFileSync(path.join(again.dirOf(fine.volumeId), "file"), "utf8"), "kept");
    assert.throws(() => again.dirOf(broken.volumeId), (err: CubicleError) => err.code === "unavailable");
    assert.equal(await again.delete(broken.volumeId), true);
    assert.equal(existsSync(image), false);
  });
});
