import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Readable } from "node:stream";
import { after, before, test } from "node:test";
import { CubicleError } from "../shared/cubicle-error.js";
import { MAX_LIST_ENTRIES, pathNames, VolumeContent } from "./volume-content.js";
import { CANONICAL_ID_BASE } from "./volume-service.js";

// A volume directory and an "outside" directory beside it that nothing may reach through the
// volume (VOLUME_PATHS_NOTE). Symlinks are planted on disk, as a sandbox mounting the volume could.
const isRoot = process.getuid?.() === 0;
let base: string;
let root: string;
let outside: string;
let volume: VolumeContent;

before(() => {
  base = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-volume-"));
  root = path.join(base, "volume");
  outside = path.join(base, "outside");
  fs.mkdirSync(root);
  fs.mkdirSync(outside);
  fs.writeFileSync(path.join(outside, "secret"), "host secret");
  fs.chmodSync(path.join(outside, "secret"), 0o640);
  fs.symlinkSync(outside, path.join(root, "link"));
  fs.symlinkSync(path.join(outside, "secret"), path.join(root, "file-link"));
  volume = new VolumeContent(root);
});

after(() => fs.rmSync(base, { recursive: true, force: true }));

const body = (text: string) => Readable.from([Buffer.from(text)]);

async function refused(action: Promise<unknown>, code: string): Promise<void> {
  await assert.rejects(action, (err: unknown) => err instanceof CubicleError && err.code === code, `expected ${code}`);
}

test("paths: '..' and NUL are refused, '.' and empty names dropped, '/' is the root", () => {
  assert.deepEqual(pathNames("/"), []);
  assert.deepEqual(pathNames("a//./b/"), ["a", "b"]);
  for (const bad of ["..", "/../x", "a/../../etc/passwd", "a\0b", "", "x".repeat(5000)]) {
    assert.throws(() => pathNames(bad), (err: unknown) => err instanceof CubicleError && err.code === "invalid_argument", JSON.stringify(bad.slice(0, 20)));
  }
  assert.throws(() => pathNames(undefined), /path is required/);
});

test("files are written with the sandbox's default user as owner (canonical ids on disk), read back and listed", { skip: !isRoot && "needs root (chown)" }, async () => {
  const written = await volume.writeFile("/docs/readme.txt", body("hello"), {});
  assert.equal(written.uid, 1000);
  assert.equal(written.size, 5);
  assert.equal(fs.statSync(path.join(root, "docs", "readme.txt")).uid, CANONICAL_ID_BASE + 1000);
  const read = await volume.readFile("/docs/readme.txt");
  assert.equal(await new Response(Readable.toWeb(read.stream) as ReadableStream).text(), "hello");
  const owned = await volume.writeFile("/docs/root-only", body("x"), { uid: 0, gid: 0, mode: 0o600 });
  assert.deepEqual([owned.uid, owned.gid, owned.mode], [0, 0, 0o600]);
  const listing = await volume.list("/", 2);
  assert.ok(listing.some((entry) => entry.path === "/docs/readme.txt" && entry.type === "file"));
  const link = listing.find((entry) => entry.path === "/link");
  assert.equal(link?.type, "symlink", "symlinks are listed as such");
  assert.equal(link?.target, outside);
  assert.ok(!listing.some((entry) => entry.path.startsWith("/link/")), "a listing does not descend through a symlink");
  await refused(volume.makeDir("/docs/a/b", {}, false), "not_found");
  assert.equal((await volume.makeDir("/docs/a/b", { mode: 0o700 }, true)).mode, 0o700);
});

test("a symlink planted in the volume is never followed: no read, write, listing, chmod or removal reaches what it points to", { skip: !isRoot && "needs root (chown)" }, async () => {
  await refused(volume.readFile("/link/secret"), "invalid_argument");
  await refused(volume.readFile("/file-link"), "invalid_argument");
  await refused(volume.list("/link", 1), "invalid_argument");
  await refused(volume.writeFile("/link/planted", body("x"), {}), "invalid_argument");
  await refused(volume.makeDir("/link/sub", {}, true), "invalid_argument");
  await refused(volume.updateMetadata("/file-link", { mode: 0o777 }), "invalid_argument");
  await refused(volume.stat("/link/secret"), "invalid_argument");
  assert.equal(fs.existsSync(path.join(outside, "planted")), false);
  assert.equal(fs.existsSync(path.join(outside, "sub")), false);
  assert.equal(fs.statSync(path.join(outside, "secret")).mode & 0o777, 0o640);
  // Writing over a symlink replaces the link, not the file it names.
  await volume.writeFile("/file-link", body("mine"), {});
  assert.equal(fs.lstatSync(path.join(root, "file-link")).isFile(), true);
  assert.equal(fs.readFileSync(path.join(outside, "secret"), "utf8"), "host secret");
  // Removing a directory that holds a symlink removes the link only.
  fs.mkdirSync(path.join(root, "tree"));
  fs.symlinkSync(outside, path.join(root, "tree", "escape"));
  await volume.remove("/tree");
  assert.equal(fs.existsSync(path.join(root, "tree")), false);
  assert.equal(fs.readFileSync(path.join(outside, "secret"), "utf8"), "host secret");
  await volume.remove("/link");
  assert.equal(fs.existsSync(outside), true);
  await refused(volume.remove("/"), "invalid_argument");
});

test("a listing past MAX_LIST_ENTRIES is refused as a whole, not cut short", async () => {
  const dir = path.join(root, "many");
  fs.mkdirSync(dir);
  try {
    for (let i = 0; i <= MAX_LIST_ENTRIES; i++) fs.writeFileSync(path.join(dir, `f${i}`), "");
    await refused(volume.list("/many", 1), "resource_exhausted");
    fs.rmSync(path.join(dir, "f0"));
    assert.equal((await volume.list("/many", 1)).length, MAX_LIST_ENTRIES);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
