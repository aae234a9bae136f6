import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readdir, rm, stat, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { after, test } from "node:test";
import { CubicleError } from "../../shared/cubicle-error.js";
import { imageId, parseImageId, type PendingImage } from "../images.js";
import { readMeta } from "./checkpoint-image.js";
import { ContainerImageStore } from "./container-image-store.js";

// The store on a plain temporary directory: no pool, no root needed.
const tempDirs: string[] = [];
after(() => Promise.all(tempDirs.map((dir) => rm(dir, { recursive: true, force: true }))));

async function newStore(): Promise<ContainerImageStore> {
  const dir = await mkdtemp(path.join(os.tmpdir(), "cubicle-images-"));
  tempDirs.push(dir);
  const store = new ContainerImageStore(dir);
  await store.init();
  return store;
}

/** Writes what a container checkpoint writes last (meta.json) and a file of `bytes` bytes. */
async function writeImage(pending: PendingImage, meta: Record<string, unknown> = {}): Promise<void> {
  await writeFile(path.join(pending.dir, "data"), "x".repeat(100));
  const full = { version: 2, runtime: "container", memory: true, createdAt: "2026-12-05T00:00:00.000Z", layerBytes: 4096, criuBytes: 1000, ...meta };
  await writeFile(path.join(pending.dir, "meta.json"), JSON.stringify(full));
}

test("an image is invisible under its id until commit, which renames it into place", async () => {
  const store = await newStore();
  const pending = await store.allocate("snapshot", "snap_a");
  assert.equal(pending.id, "snapshot/snap_a");
  await writeImage(pending);
  assert.equal(await store.exists("snapshot/snap_a"), false);
  assert.equal(await store.info("snapshot/snap_a"), undefined);
  assert.deepEqual(await store.list("snapshot"), []);

  const info = await store.commit(pending);
  assert.deepEqual(info, { id: "snapshot/snap_a", kind: "snapshot", runtime: "container", sizeBytes: 5096, memory: true, createdAt: "2026-12-05T00:00:00.000Z" });
  assert.equal(existsSync(pending.dir), false, "the pending directory is left");
  assert.equal(await store.exists("snapshot/snap_a"), true);
  assert.deepEqual(await store.info("snapshot/snap_a"), info);
  assert.deepEqual(await store.list("snapshot"), ["snapshot/snap_a"]);
  assert.deepEqual(await store.list("pause"), []);
  // Today's layout: `<imagesDir>/snapshots/<name>`, kind directories searchable (0711).
  assert.equal(store.dirOf("snapshot/snap_a"), path.join(store.imagesDir, "snapshots", "snap_a"));
  assert.equal(store.dirOf("pause/sb1"), path.join(store.imagesDir, "paused", "sb1"));
  assert.equal(store.dirOf("warm/base-0123"), path.join(store.imagesDir, "warm", "base-0123"));
  assert.equal((await stat(path.join(store.imagesDir, "snapshots"))).mode & 0o777, 0o711);
});

test("allocate and commit fail with already_exists when a committed image has the id", async () => {
  const store = await newStore();
  const first = await store.allocate("pause", "sb1");
  const second = await store.allocate("pause", "sb1");
  assert.notEqual(first.dir, second.dir);
  await writeImage(first);
  await writeImage(second);
  await store.commit(first);
  await assert.rejects(store.allocate("pause", "sb1"), (err: CubicleError) => err.code === "already_exists");
  await assert.rejects(store.commit(second), (err: CubicleError) => err.code === "already_exists");
  await store.abandon(second);
  assert.deepEqual(await readdir(path.join(store.imagesDir, "paused")), ["sb1"]);
});

test("commit refuses an image without meta.json; abandon drops a pending image", async () => {
  const store = await newStore();
  const pending = await store.allocate("snapshot", "half");
  await assert.rejects(store.commit(pending), (err: CubicleError) => err.code === "internal");
  await store.abandon(pending);
  await store.abandon(pending);
  assert.deepEqual(await readdir(path.join(store.imagesDir, "snapshots")), []);
  assert.equal(await store.exists("snapshot/half"), false);
});

test("remove is idempotent; in the background it is quick and the id can be written again at once; else it waits for the deletion", async () => {
  const store = await newStore();
  const pending = await store.allocate("warm", "base-0123");
  await writeImage(pending);
  // Enough files that deleting them takes a while: a background remove() must not wait for it.
  await mkdir(path.join(pending.dir, "many"));
  await Promise.all(Array.from({ length: 200 }, (_, i) => writeFile(path.join(pending.dir, "many", String(i)), "y")));
  await store.commit(pending);

  await store.remove("warm/base-0123", { background: true });
  assert.equal(await store.exists("warm/base-0123"), false);
  assert.deepEqual(await store.list("warm"), []);
  const again = await store.allocate("warm", "base-0123");
  await writeImage(again);
  await store.commit(again);
  assert.deepEqual(await store.list("warm"), ["warm/base-0123"], "the image being deleted is not listed");

  await store.settled();
  assert.deepEqual(await readdir(path.join(store.imagesDir, "warm")), ["base-0123"], "the removed image was not deleted");
  await store.remove("warm/base-0123");
  assert.deepEqual(await readdir(path.join(store.imagesDir, "warm")), [], "a plain remove resolves once the image is deleted");
  await store.remove("warm/base-0123");
  await store.remove("warm/never-was");
  assert.deepEqual(await readdir(path.join(store.imagesDir, "warm")), []);
});

test("list shows committed images only, not ones being written or deleted, nor an older core's asides", async () => {
  const store = await newStore();
  const committed = await store.allocate("pause", "sb1");
  await writeImage(committed);
  await store.commit(committed);
  const writing = await store.allocate("pause", "sb2");
  await writeImage(writing);
  const paused = path.join(store.imagesDir, "paused");
  await mkdir(path.join(paused, "sb3.removed-1-1"));
  await mkdir(path.join(paused, "sb4.stale-abcd"));
  await mkdir(path.join(paused, ".hidden"));
  assert.deepEqual(await store.list("pause"), ["pause/sb1"]);
});

test("init clears what a crash left (other processes' partial and removed images, asides, CRIU views) and keeps images and the budget", async () => {
  const store = await newStore();
  const kept = await store.allocate("snapshot", "kept");
  await writeImage(kept, { layerBytes: 10_000, criuBytes: 2345 });
  await store.commit(kept);
  const snapshots = path.join(store.imagesDir, "snapshots");
  const paused = path.join(store.imagesDir, "paused");
  const otherPid = process.pid + 1;
  await mkdir(path.join(snapshots, `crashed.partial-${otherPid}-1`));
  await mkdir(path.join(snapshots, `gone.removed-${otherPid}-3`));
  await mkdir(path.join(paused, "sb1.stale-0badc0de"));
  await mkdir(path.join(snapshots, "kept", "criu-view-sb9-1-2"));
  // One being written by this very process stays.
  const ours = await store.allocate("snapshot", "ours");

  const restarted = new ContainerImageStore(store.imagesDir);
  await restarted.init();
  await restarted.settled();
  assert.deepEqual((await readdir(snapshots)).sort(), ["kept", path.basename(ours.dir)].sort());
  assert.deepEqual(await readdir(paused), []);
  assert.deepEqual((await readdir(path.join(snapshots, "kept"))).sort(), ["data", "meta.json"]);
  assert.equal(restarted.usedBytes(), 12_345);
});

test("the budget counts committed images until they are removed", async () => {
  const store = await newStore();
  assert.equal(store.usedBytes(), 0);
  const a = await store.allocate("snapshot", "a");
  await writeImage(a, { layerBytes: 1000, criuBytes: 24 });
  assert.equal(store.usedBytes(), 0, "a pending image counts");
  await store.commit(a);
  const b = await store.allocate("pause", "b");
  await writeImage(b, { memory: false, layerBytes: 500, criuBytes: 0 });
  await store.commit(b);
  assert.equal(store.usedBytes(), 1524);
  await store.remove("snapshot/a");
  assert.equal(store.usedBytes(), 500);
  // An image deleted behind the store's back stops counting too.
  await rm(store.dirOf("pause/b"), { recursive: true });
  assert.equal(store.usedBytes(), 0);
});

test("an image made by another runtime is described as such, and the container runtime refuses to read it", async () => {
  const store = await newStore();
  const pending = await store.allocate("snapshot", "vm");
  await writeFile(path.join(pending.dir, "meta.json"), JSON.stringify({ version: 1, runtime: "microvm", memory: true, createdAt: "2026-12-05T01:00:00.000Z", sizeBytes: 268435456 }));
  const info = await store.commit(pending);
  assert.deepEqual(info, { id: "snapshot/vm", kind: "snapshot", runtime: "microvm", sizeBytes: 268435456, memory: true, createdAt: "2026-12-05T01:00:00.000Z" });
  await assert.rejects(readMeta(store.dirOf("snapshot/vm")), (err: CubicleError) => {
    assert.equal(err.code, "failed_precondition");
    assert.match(err.message, /made by the microvm runtime/);
    return true;
  });
  // Images written before meta.json named its runtime are the container runtime's.
  const old = await store.allocate("snapshot", "old");
  await writeImage(old, { runtime: undefined });
  assert.equal((await store.commit(old)).runtime, "container");
});

test("image ids are <kind>/<name>; anything else is refused", () => {
  assert.equal(imageId("snapshot", "snap_abc"), "snapshot/snap_abc");
  assert.deepEqual(parseImageId("pause/iabc-1"), { kind: "pause", name: "iabc-1" });
  assert.deepEqual(parseImageId("warm/base-0123456789abcdef"), { kind: "warm", name: "base-0123456789abcdef" });
  assert.deepEqual(parseImageId(`snapshot/${"a".repeat(128)}`), { kind: "snapshot", name: "a".repeat(128) });
  const bad = [
    "",
    "snapshot",
    "snapshot/",
    "/snap",
    "snapshots/snap",
    "other/snap",
    "snapshot/../etc",
    "snapshot/a/b",
    "snapshot/.hidden",
    "snapshot/with space",
    `snapshot/${"a".repeat(129)}`,
    "pause/sb1.partial-1-1",
    "pause/sb1.removed-1-1",
    "pause/sb1.stale-00",
    "/var/lib/cubicle/images/snapshots/snap",
  ];
  for (const id of bad) {
    assert.throws(() => parseImageId(id), (err: CubicleError) => err instanceof CubicleError && err.code === "invalid_argument", id);
  }
  assert.throws(() => parseImageId(undefined as unknown as string), (err: CubicleError) => err.code === "invalid_argument");
  assert.throws(() => imageId("snapshot", "../x"), (err: CubicleError) => err.code === "invalid_argument");
  assert.throws(() => imageId("disk" as never, "x"), (err: CubicleError) => err.code === "invalid_argument");
});

test("a string that is no image id (a damaged or hostile record) names no image: not there, nothing removed, no path outside the store", async () => {
  const store = await newStore();
  const pending = await store.allocate("snapshot", "kept");
  await writeImage(pending);
  await store.commit(pending);
  const outside = path.join(store.imagesDir, "..", "outside-the-store");
  await mkdir(outside, { recursive: true });
  for (const id of ["snapshot/", "snapshot/..", "snapshot/../../outside-the-store", "pause/bad name", "pause/sb1.stale-00", "", "kept", "/abs/path", "warm/.hidden"]) {
    assert.equal(await store.exists(id), false, id);
    assert.equal(await store.info(id), undefined, id);
    await store.remove(id);
  }
  assert.deepEqual(await store.list("snapshot"), ["snapshot/kept"]);
  assert.equal((await readdir(path.dirname(store.imagesDir))).includes("outside-the-store"), true, "nothing outside the store was touched");
});
