import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Readable } from "node:stream";
import zlib from "node:zlib";
import { CubicleError } from "../../shared/cubicle-error.js";
import { readTar } from "./tar-reader.js";
import { layerBlob, sha256, writeTar, type Compression, type TarSpecEntry } from "./test-image.js";
import { unpackLayers, type LayerSource } from "./unpack.js";
import { loadNativeAddon } from "../../shared/native-addon.js";

const isRoot = process.getuid?.() === 0;
const tempDirs: string[] = [];
after(() => tempDirs.forEach((dir) => fs.rmSync(dir, { recursive: true, force: true })));

function tempDir(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cbo-unpack-"));
  tempDirs.push(dir);
  return dir;
}

/** A layer fed in small uneven chunks, to shake out framing bugs. */
function layer(entries: TarSpecEntry[], compression: Compression = "gzip", chunkBytes = 0): LayerSource & { data: Buffer } {
  const built = layerBlob(writeTar(entries), compression);
  return {
    name: built.digest.slice(0, 19),
    data: built.data,
    digest: built.digest,
    diffId: built.diffId,
    open: () => {
      if (!chunkBytes) return Readable.from([built.data]);
      const chunks: Buffer[] = [];
      for (let i = 0, n = 1; i < built.data.length; i += n, n = (n % chunkBytes) + 1) chunks.push(built.data.subarray(i, i + n));
      return Readable.from(chunks);
    },
  };
}

async function rejectsWith(promise: Promise<unknown>, code: string, message: RegExp): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(err instanceof CubicleError, String(err));
    assert.equal(err.code, code, err.message);
    assert.match(err.message, message);
    return true;
  });
}

const owner = (p: string) => {
  const s = fs.lstatSync(p);
  return [s.uid, s.gid];
};

test("reads its own archives in tiny chunks and GNU tar's (gnu and pax long names) alike", async () => {
  const dir = tempDir();
  const src = path.join(dir, "src");
  const longDir = path.join(src, "d".repeat(90), "e".repeat(90));
  fs.mkdirSync(longDir, { recursive: true });
  fs.writeFileSync(path.join(longDir, "f".repeat(120)), "long");
  fs.symlinkSync("x".repeat(150), path.join(src, "longlink"));
  for (const format of ["gnu", "pax"]) {
    const tar = spawnSync("tar", [`--format=${format}`, "-C", src, "-cf", "-", "."], { maxBuffer: 1 << 24 }).stdout;
    const seen = new Map<string, string>();
    const chunks: Buffer[] = [];
    for (let i = 0; i < tar.length; i += 7) chunks.push(tar.subarray(i, i + 7));
    for await (const { entry, body } of readTar(Readable.from(chunks))) {
      let text = "";
      for await (const chunk of body) text += chunk.toString();
      seen.set(entry.path.replace(/^\.\//, ""), entry.type === "symlink" ? `-> ${entry.linkPath}` : text);
    }
    assert.equal(seen.get(`${"d".repeat(90)}/${"e".repeat(90)}/${"f".repeat(120)}`), "long", format);
    assert.equal(seen.get("longlink"), `-> ${"x".repeat(150)}`, format);
  }
});

test("applies files, dirs, symlinks, hard links and fifos with modes, shifted owners and times", { skip: !isRoot && "needs root" }, async () => {
  const dest = path.join(tempDir(), "root");
  const stats = await unpackLayers(
    [
      layer(
        [
          { path: "./", type: "directory", mode: 0o755 },
          { path: "usr/", type: "directory" },
          { path: "usr/bin/", type: "directory" },
          { path: "usr/bin/sudo", data: "#!/bin/sh\n", mode: 0o4755 },
          { path: "usr/bin/tool", data: "tool", mode: 0o755, mtime: 1_600_000_000 },
          { path: "usr/bin/tool2", type: "hardlink", linkPath: "usr/bin/tool" },
          { path: "bin", type: "symlink", linkPath: "usr/bin" },
          { path: "home/user/.bashrc", data: "# hi\n", uid: 1000, gid: 1000 },
          { path: "odd", data: "x", uid: 70000, gid: 5 },
          { path: "run/pipe", type: "fifo", mode: 0o620 },
          { path: "dev/null", type: "chardev" },
          { path: "cap", data: "x", pax: { "SCHILY.xattr.security.capability": "abc" } },
          { path: "var/mail/", type: "directory", mode: 0o2775 },
        ],
        "gzip",
        13,
      ),
    ],
    dest,
  );
  assert.equal(fs.readFileSync(path.join(dest, "bin/tool"), "utf8"), "tool");
  assert.equal(fs.lstatSync(path.join(dest, "usr/bin/sudo")).mode & 0o7777, 0o4755);
  assert.equal(fs.lstatSync(path.join(dest, "var/mail")).mode & 0o7777, 0o2775);
  assert.deepEqual(owner(path.join(dest, "usr/bin/sudo")), [100000, 100000]);
  assert.deepEqual(owner(path.join(dest, "home/user/.bashrc")), [101000, 101000]);
  // Parents the archive never listed are made, owned by the sandbox's root.
  assert.deepEqual(owner(path.join(dest, "home/user")), [100000, 100000]);
  assert.deepEqual(owner(dest), [100000, 100000]);
  assert.deepEqual(owner(path.join(dest, "odd")), [165534, 100005]);
  assert.equal(fs.lstatSync(path.join(dest, "usr/bin/tool")).ino, fs.lstatSync(path.join(dest, "usr/bin/tool2")).ino);
  assert.equal(fs.lstatSync(path.join(dest, "usr/bin/tool")).mtimeMs, 1_600_000_000_000);
  assert.equal(fs.lstatSync(path.join(dest, "usr")).mtimeMs, 1_700_000_000_000);
  assert.ok(fs.lstatSync(path.join(dest, "run/pipe")).isFIFO());
  assert.equal(fs.lstatSync(path.join(dest, "run/pipe")).mode & 0o7777, 0o620);
  assert.equal(fs.existsSync(path.join(dest, "dev/null")), false);
  assert.equal(stats.devicesSkipped, 1);
  assert.equal(stats.xattrsDropped, 1);
  assert.equal(stats.idsOutOfRange, 1);
});

test("whiteouts remove lower files, opaque directories hide lower contents; gzip, zstd and plain layers mix", { skip: !isRoot && "needs root" }, async () => {
  const dest = path.join(tempDir(), "root");
  await unpackLayers(
    [
      layer([
        { path: "etc/keep", data: "1" },
        { path: "etc/gone", data: "1" },
        { path: "etc/gonedir/a", data: "1" },
        { path: "opaque/old", data: "1" },
        { path: "opaque/olddir/x", data: "1" },
      ]),
      layer(
        [
          { path: "etc/.wh.gone" },
          { path: "etc/.wh.gonedir" },
          { path: "etc/.wh.never-existed" },
          { path: "opaque/", type: "directory" },
          { path: "opaque/.wh..wh..opq" },
          { path: "opaque/new", data: "2" },
        ],
        "zstd",
        5,
      ),
      layer([{ path: "etc/keep", data: "3" }], "none"),
    ],
    dest,
  );
  assert.deepEqual(fs.readdirSync(path.join(dest, "etc")).sort(), ["keep"]);
  assert.equal(fs.readFileSync(path.join(dest, "etc/keep"), "utf8"), "3");
  assert.deepEqual(fs.readdirSync(path.join(dest, "opaque")), ["new"]);
});

test("hostile names, symlinks and hard links stay inside the root", { skip: !isRoot && "needs root" }, async () => {
  const box = tempDir();
  const dest = path.join(box, "root");
  const hostPasswd = createHash("sha256").update(fs.readFileSync("/etc/passwd")).digest("hex");
  const stats = await unpackLayers(
    [
      layer([
        { path: "../x", data: "dotdot" },
        { path: "a/../../../y", data: "deep" },
        { path: "/abs", data: "absolute" },
        { path: "usr/bin/", type: "directory" },
        { path: "bin", type: "symlink", linkPath: "/usr/bin" },
        { path: "evil", type: "symlink", linkPath: "/etc" },
        { path: "up", type: "symlink", linkPath: "../../../../.." },
        { path: "loop", type: "symlink", linkPath: "loop/x" },
        { path: "a/b/abs", type: "symlink", linkPath: "/etc" },
        { path: "a/b/rel", type: "symlink", linkPath: "../../usr/./bin/../bin" },
      ]),
      layer([
        { path: "bin/ls", data: "ls" },
        { path: "evil/passwd", data: "not the host's" },
        { path: "up/tmp/escaped", data: "no" },
        { path: "a/b/abs/nested", data: "nested" },
        { path: "a/b/rel/cat", data: "cat" },
        { path: "link-to-host", type: "hardlink", linkPath: "../../../../etc/passwd" },
        { path: "link-via-symlink", type: "hardlink", linkPath: "evil/passwd" },
      ]),
    ],
    dest,
  );
  assert.deepEqual(fs.readdirSync(box), ["root"]);
  assert.equal(fs.readFileSync(path.join(dest, "x"), "utf8"), "dotdot");
  assert.equal(fs.readFileSync(path.join(dest, "y"), "utf8"), "deep");
  assert.equal(fs.readFileSync(path.join(dest, "abs"), "utf8"), "absolute");
  assert.equal(fs.readFileSync(path.join(dest, "usr/bin/ls"), "utf8"), "ls");
  assert.equal(fs.readFileSync(path.join(dest, "etc/passwd"), "utf8"), "not the host's");
  assert.equal(fs.readFileSync(path.join(dest, "tmp/escaped"), "utf8"), "no");
  assert.equal(fs.readFileSync(path.join(dest, "etc/nested"), "utf8"), "nested");
  assert.equal(fs.readFileSync(path.join(dest, "usr/bin/cat"), "utf8"), "cat");
  // `../../../../etc/passwd` is `/etc/passwd` inside the root: the image's own file.
  assert.equal(fs.lstatSync(path.join(dest, "link-to-host")).ino, fs.lstatSync(path.join(dest, "etc/passwd")).ino);
  assert.equal(fs.lstatSync(path.join(dest, "link-via-symlink")).ino, fs.lstatSync(path.join(dest, "etc/passwd")).ino);
  assert.equal(createHash("sha256").update(fs.readFileSync("/etc/passwd")).digest("hex"), hostPasswd);
  assert.equal(fs.existsSync("/tmp/escaped"), false);
  assert.ok(stats.namesClamped >= 3);

  // A hard link to a host file that the image does not have is refused, never made.
  const dest2 = path.join(box, "root2");
  await rejectsWith(unpackLayers([layer([{ path: "h", type: "hardlink", linkPath: "../../../../../etc/shadow" }])], dest2), "failed_precondition", /not in the image/);
  assert.equal(fs.existsSync(dest2), false);
  // A symlink loop is an error, not a hang.
  await rejectsWith(unpackLayers([layer([{ path: "loop", type: "symlink", linkPath: "loop/x" }, { path: "loop/y", data: "" }])], dest2), "failed_precondition", /too many levels/);
});

test("a digest mismatch, a corrupt stream or a truncated archive fails clearly and leaves nothing", { skip: !isRoot && "needs root" }, async () => {
  const box = tempDir();
  const dest = path.join(box, "root");
  const good = layer([{ path: "a", data: "a".repeat(10_000) }]);
  await rejectsWith(unpackLayers([{ ...good, digest: sha256("other") }], dest), "failed_precondition", /digest mismatch/);
  assert.equal(fs.existsSync(dest), false);
  await rejectsWith(unpackLayers([{ ...good, diffId: sha256("other") }], dest), "failed_precondition", /diff_id/);

  const flipped = Buffer.from(good.data);
  flipped[20] ^= 0xff;
  await rejectsWith(unpackLayers([{ name: "bad", open: () => Readable.from([flipped]) }], dest), "failed_precondition", /gzip|corrupt|checksum/);
  const zstdLayer = layer([{ path: "a", data: "z".repeat(100_000) }], "zstd");
  const zstdBroken = Buffer.concat([zstdLayer.data.subarray(0, 12), Buffer.alloc(64, 0x55)]);
  await rejectsWith(unpackLayers([{ name: "badzstd", open: () => Readable.from([zstdBroken]) }], dest), "failed_precondition", /zstd|corrupt/);
  const tar = writeTar([{ path: "a", data: "a".repeat(3000) }]);
  await rejectsWith(unpackLayers([{ name: "short", open: () => Readable.from([tar.subarray(0, 1500)]) }], dest), "failed_precondition", /unexpected end/);
  const badSum = Buffer.from(tar);
  badSum[0] = 0x41;
  await rejectsWith(unpackLayers([{ name: "sum", open: () => Readable.from([badSum]) }], dest), "failed_precondition", /checksum/);
  assert.deepEqual(fs.readdirSync(box), []);
});

test("maxBytes bounds the unpacked size", { skip: !isRoot && "needs root" }, async () => {
  const box = tempDir();
  const dest = path.join(box, "root");
  const big = layer([{ path: "a", data: Buffer.alloc(600_000) }, { path: "b", data: Buffer.alloc(600_000) }]);
  await rejectsWith(unpackLayers([big], dest, { maxBytes: 1_000_000 }), "resource_exhausted", /larger than the limit/);
  assert.equal(fs.existsSync(dest), false);
  await rejectsWith(unpackLayers([layer([{ path: "a" }, { path: "b" }, { path: "c" }])], dest, { maxEntries: 2 }), "resource_exhausted", /more than 2 files/);
});

test("a full disk is insufficient_storage and the partial tree is removed", { skip: !isRoot && "needs root" }, async () => {
  const box = tempDir();
  const mounted = spawnSync("mount", ["-t", "tmpfs", "-o", "size=1m", "cbo-unpack-tmpfs", box]);
  assert.equal(mounted.status, 0, String(mounted.stderr));
  try {
    const dest = path.join(box, "root");
    const huge = { name: "huge", open: () => Readable.from([zlib.gzipSync(writeTar([{ path: "small", data: "s" }, { path: "big", data: Buffer.alloc(4 << 20, 7) }]))]) };
    await rejectsWith(unpackLayers([huge], dest), "insufficient_storage", /no space left/);
    assert.deepEqual(fs.readdirSync(box), []);
  } finally {
    spawnSync("umount", [box]);
  }
});

/** The built xattr addon (src/agent/native/xattr.c), which the unpacker is given as the server gives it. */
const XATTR_ADDON = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../../../dist/agent/xattr.node");

function listXattrs(file: string): Map<string, Buffer> {
  return new Map(loadNativeAddon<{ list(target: string, prefix: string): [string, Buffer][] }>(XATTR_ADDON).list(file, ""));
}

/** A file-capability value: `revision` 2 (host) or 3 (namespaced, with `rootId`), `bits` permitted, effective. */
function capability(revision: 2 | 3, bits: number, rootId = 0): Buffer {
  const value = Buffer.alloc(revision === 3 ? 24 : 20);
  value.writeUInt32LE((revision << 24) | 1, 0);
  value.writeUInt32LE(bits, 4);
  if (revision === 3) value.writeUInt32LE(rootId, 20);
  return value;
}

test("LAYER_XATTRS_NOTE: user attributes kept, file capabilities rewritten for the sandbox's root, the rest dropped", { skip: !isRoot && "needs root" }, async () => {
  const dest = path.join(tempDir(), "root");
  const bindService = 1 << 10; // CAP_NET_BIND_SERVICE
  const stats = await unpackLayers(
    [
      layer([
        { path: "etc/", type: "directory", pax: { "SCHILY.xattr.user.dir": "d" } },
        { path: "srv/server", data: "#!/bin/sh\n", mode: 0o755, pax: { "SCHILY.xattr.security.capability": capability(2, bindService), "SCHILY.xattr.user.origin": "registry" } },
        { path: "srv/ns3", data: "x", mode: 0o755, pax: { "LIBARCHIVE.xattr.security.capability": capability(3, bindService, 0) } },
        { path: "srv/labelled", data: "x", pax: { "SCHILY.xattr.security.selinux": "system_u:object_r:bin_t:s0", "SCHILY.xattr.trusted.x": "t" } },
        { path: "srv/link", type: "symlink", linkPath: "server", pax: { "SCHILY.xattr.user.link": "l" } },
        { path: "srv/bad-cap", data: "x", pax: { "SCHILY.xattr.security.capability": Buffer.from([9, 9, 9]) } },
      ]),
    ],
    dest,
    { xattrAddon: XATTR_ADDON },
  );
  assert.deepEqual([...listXattrs(path.join(dest, "etc"))], [["user.dir", Buffer.from("d")]]);
  const server = listXattrs(path.join(dest, "srv/server"));
  assert.deepEqual(server.get("user.origin"), Buffer.from("registry"));
  // Never the host's revision 2: namespaced, its root the tree's root on disk (100000).
  assert.deepEqual(server.get("security.capability"), capability(3, bindService, 100000));
  assert.deepEqual(listXattrs(path.join(dest, "srv/ns3")).get("security.capability"), capability(3, bindService, 100000));
  assert.deepEqual([...listXattrs(path.join(dest, "srv/labelled")).keys()].filter((name) => !name.startsWith("security.") || name === "security.selinux"), []);
  assert.deepEqual([...listXattrs(path.join(dest, "srv/bad-cap")).keys()].filter((name) => name === "security.capability"), []);
  // labelled (two), the symlink and the bad capability.
  assert.equal(stats.xattrsDropped, 3);
  // The host's root gains nothing: a capability set for the sandbox's root is not one for uid 0.
  const getcap = spawnSync("/usr/sbin/getcap", ["-n", path.join(dest, "srv/server")], { encoding: "utf8" });
  assert.equal(getcap.status, 0, getcap.stderr);
  assert.match(getcap.stdout, /\[rootid=100000\]/);
});
