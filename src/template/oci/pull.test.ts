import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import zlib from "node:zlib";
import { CubicleError } from "../../shared/cubicle-error.js";
import { importImage, pullImage, type PullProgress } from "./pull.js";
import { buildImage, buildIndex, writeDockerSave, writeOciLayout, type TestImage } from "./test-image.js";
import { startSilentServer, startTestRegistry, type TestRegistry } from "./test-registry.js";

const isRoot = process.getuid?.() === 0;
const CREDENTIALS = { username: "cbo-user", password: "s3cret-pass" };

let anonymous: TestRegistry;
let authed: TestRegistry;
const tempDirs: string[] = [];

before(async () => {
  if (!isRoot) return;
  [anonymous, authed] = await Promise.all([startTestRegistry(), startTestRegistry({ auth: CREDENTIALS })]);
});
after(async () => {
  await Promise.all([anonymous?.stop(), authed?.stop()]);
  tempDirs.forEach((dir) => fs.rmSync(dir, { recursive: true, force: true }));
});

function tempDir(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cbo-pull-"));
  tempDirs.push(dir);
  return dir;
}

async function rejectsWith(promise: Promise<unknown>, code: string, message: RegExp): Promise<CubicleError> {
  let caught: CubicleError | undefined;
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(err instanceof CubicleError, String(err));
    assert.equal(err.code, code, err.message);
    assert.match(err.message, message);
    caught = err;
    return true;
  });
  return caught!;
}

/** A small Debian-like image: two layers (the second with a whiteout, an opaque dir, zstd). */
function sampleImage(format: "oci" | "docker" = "oci", marker = "amd64"): TestImage {
  return buildImage({
    format,
    config: { Env: ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"], WorkingDir: "/app", User: "1000", Entrypoint: ["/bin/entry"], Cmd: ["serve"] },
    layers: [
      {
        entries: [
          { path: "usr/bin/", type: "directory" },
          { path: "usr/bin/bash", data: "#!bash", mode: 0o755 },
          { path: "usr/bin/sudo", data: "sudo", mode: 0o4755 },
          { path: "bin", type: "symlink", linkPath: "usr/bin" },
          { path: "etc/passwd", data: "root:x:0:0:root:/root:/bin/bash\n" },
          { path: "etc/group", data: "root:x:0:\n" },
          { path: "etc/resolv.conf", type: "symlink", linkPath: "../run/systemd/resolve/stub-resolv.conf" },
          { path: "etc/old", data: "old" },
          { path: "data/", type: "directory" },
          { path: "data/lower", data: "lower" },
          { path: "app/main", data: "main" },
          { path: "app/main-link", type: "hardlink", linkPath: "app/main" },
        ],
        compression: format === "docker" ? "gzip" : "gzip",
      },
      {
        entries: [
          { path: "etc/.wh.old" },
          { path: "data/", type: "directory" },
          { path: "data/.wh..wh..opq" },
          { path: "data/upper", data: "upper" },
          { path: "arch", data: marker },
        ],
        compression: format === "docker" ? "gzip" : "zstd",
      },
    ],
  });
}

function assertSampleTree(dest: string, marker = "amd64"): void {
  assert.equal(fs.readFileSync(path.join(dest, "arch"), "utf8"), marker);
  assert.equal(fs.readFileSync(path.join(dest, "bin/bash"), "utf8"), "#!bash");
  assert.equal(fs.existsSync(path.join(dest, "etc/old")), false);
  assert.deepEqual(fs.readdirSync(path.join(dest, "data")), ["upper"]);
  assert.equal(fs.lstatSync(path.join(dest, "app/main")).ino, fs.lstatSync(path.join(dest, "app/main-link")).ino);
  assert.equal(fs.lstatSync(path.join(dest, "usr/bin/sudo")).mode & 0o7777, 0o4755);
  assert.equal(fs.lstatSync(path.join(dest, "usr/bin/sudo")).uid, 100000);
  // Prepared for Cubicle.
  assert.match(fs.readFileSync(path.join(dest, "etc/passwd"), "utf8"), /^user:x:1000:1000::\/home\/user:\/bin\/bash$/m);
  assert.match(fs.readFileSync(path.join(dest, "etc/group"), "utf8"), /^user:x:1000:$/m);
  const home = fs.lstatSync(path.join(dest, "home/user"));
  assert.deepEqual([home.isDirectory(), home.uid, home.gid], [true, 101000, 101000]);
  assert.equal(fs.lstatSync(path.join(dest, "tmp")).mode & 0o7777, 0o1777);
  assert.ok(fs.lstatSync(path.join(dest, "etc/resolv.conf")).isFile());
  assert.ok(fs.lstatSync(path.join(dest, "etc/hosts")).isFile());
  assert.equal(fs.lstatSync(path.join(dest, "etc/passwd")).uid, 100000);
}

function assertNothingLeft(dir: string, dest: string): void {
  assert.equal(fs.existsSync(dest), false);
  const leftovers = fs.readdirSync(dir).filter((name) => name.includes(".partial-"));
  assert.deepEqual(leftovers, []);
}

test("pulls an image anonymously: layers applied, config read, rootfs prepared", { skip: !isRoot && "needs root" }, async () => {
  const image = sampleImage("docker");
  const digest = await anonymous.push("cbo/sample", "1.0", image);
  const dir = tempDir();
  const dest = path.join(dir, "rootfs");
  const progress: PullProgress[] = [];
  const result = await pullImage({ reference: `${anonymous.host}/cbo/sample:1.0`, destDir: dest, onProgress: (p) => progress.push(p) });
  assert.equal(result.digest, digest);
  assert.equal(result.manifestDigest, digest);
  assert.deepEqual(result.config.envMap, { PATH: "/usr/bin:/bin", LANG: "C.UTF-8" });
  assert.deepEqual([result.config.workingDir, result.config.user, result.config.entrypoint, result.config.cmd], ["/app", "1000", ["/bin/entry"], ["serve"]]);
  assert.deepEqual(result.user, { name: "user", uid: 1000, gid: 1000, home: "/home/user", shell: "/bin/bash" });
  assertSampleTree(dest);
  for (const layer of image.layers) {
    const last = progress.filter((p) => p.layer === layer.digest).at(-1);
    assert.deepEqual(last, { layer: layer.digest, bytes: layer.size, total: layer.size });
  }
  assertNothingLeft(dir, path.join(dir, "never"));
});

test("token auth: good credentials pull, bad or missing ones are unauthenticated and leave nothing", { skip: !isRoot && "needs root" }, async () => {
  await authed.push("cbo/private", "v1", sampleImage());
  const dir = tempDir();
  const reference = `${authed.host}/cbo/private:v1`;
  const before = authed.tokenRequests();
  await pullImage({ reference, destDir: path.join(dir, "good"), credentials: CREDENTIALS });
  assert.ok(authed.tokenRequests() > before, "the token server was asked");
  assertSampleTree(path.join(dir, "good"));
  // Credentials through the per-registry table work the same.
  await pullImage({ reference, destDir: path.join(dir, "table"), registryHosts: { auth: { [authed.host]: CREDENTIALS } } });

  const wrong = await rejectsWith(pullImage({ reference, destDir: path.join(dir, "bad"), credentials: { username: "cbo-user", password: "wrong-password" } }), "unauthenticated", /refused the credentials/);
  assert.doesNotMatch(JSON.stringify({ message: wrong.message, details: wrong.details }), /wrong-password|s3cret/);
  await rejectsWith(pullImage({ reference, destDir: path.join(dir, "none") }), "unauthenticated", /needs credentials/);
  assertNothingLeft(dir, path.join(dir, "bad"));
  assertNothingLeft(dir, path.join(dir, "none"));
});

test("pull by digest; an index resolves to linux/amd64; arm64-only is refused", { skip: !isRoot && "needs root" }, async () => {
  const amd = sampleImage("oci", "amd64");
  const arm = sampleImage("oci", "arm64");
  for (const image of [amd, arm]) {
    for (const b of image.blobs) await anonymous.pushBlob("cbo/multi", b);
    await anonymous.pushManifest("cbo/multi", image.manifest.digest, image.manifest);
  }
  const index = buildIndex([
    { image: arm, architecture: "arm64", variant: "v8" },
    { image: amd, architecture: "amd64" },
  ]);
  await anonymous.pushManifest("cbo/multi", "latest", index);
  const dir = tempDir();

  const fromIndex = await pullImage({ reference: `${anonymous.host}/cbo/multi`, destDir: path.join(dir, "index") });
  assert.equal(fromIndex.digest, index.digest);
  assert.equal(fromIndex.manifestDigest, amd.manifest.digest);
  assertSampleTree(path.join(dir, "index"), "amd64");

  const byDigest = await pullImage({ reference: `${anonymous.host}/cbo/multi:ignored@${index.digest}`, destDir: path.join(dir, "digest") });
  assert.equal(byDigest.digest, index.digest);

  const armOnly = buildIndex([{ image: arm, architecture: "arm64" }], "docker");
  await anonymous.pushManifest("cbo/multi", "arm-only", armOnly);
  await rejectsWith(pullImage({ reference: `${anonymous.host}/cbo/multi:arm-only`, destDir: path.join(dir, "arm") }), "failed_precondition", /no linux\/amd64 variant \(it has: linux\/arm64\)/);
  await rejectsWith(pullImage({ reference: `${anonymous.host}/cbo/multi@sha256:${"0".repeat(64)}`, destDir: path.join(dir, "unknown") }), "not_found", /not found/);
  assertNothingLeft(dir, path.join(dir, "arm"));
});

test("a missing image is not_found; a corrupt blob in the registry is a digest mismatch and leaves nothing", { skip: !isRoot && "needs root" }, async () => {
  const dir = tempDir();
  await rejectsWith(pullImage({ reference: `${anonymous.host}/cbo/nothing-here:1`, destDir: path.join(dir, "x") }), "not_found", /manifest of .*cbo\/nothing-here:1.*not found/);
  await anonymous.push("cbo/sample", "1.0", sampleImage("docker"));
  await rejectsWith(pullImage({ reference: `${anonymous.host}/cbo/sample:nope`, destDir: path.join(dir, "x") }), "not_found", /MANIFEST_UNKNOWN/);

  const image = buildImage({ layers: [{ entries: [{ path: "big", data: Buffer.alloc(200_000, 1) }] }] });
  await anonymous.push("cbo/corrupt", "1", image);
  const blobFile = anonymous.blobPath(image.layers[0]!.digest);
  const bytes = fs.readFileSync(blobFile);
  bytes[bytes.length >> 1] ^= 0xff;
  fs.writeFileSync(blobFile, bytes);
  const cache = path.join(dir, "cache");
  await rejectsWith(pullImage({ reference: `${anonymous.host}/cbo/corrupt:1`, destDir: path.join(dir, "corrupt"), blobCacheDir: cache }), "failed_precondition", /digest mismatch/);
  assertNothingLeft(dir, path.join(dir, "corrupt"));
  assert.deepEqual(fs.readdirSync(path.join(cache, "sha256")), [], "no partial or corrupt blob kept in the cache");
});

test("a registry that accepts the connection and never answers is deadline_exceeded within the timeout", { skip: !isRoot && "needs root" }, async () => {
  const silent = await startSilentServer();
  const dir = tempDir();
  try {
    const started = Date.now();
    await rejectsWith(pullImage({ reference: `${silent.host}/cbo/x:1`, destDir: path.join(dir, "x"), idleTimeoutMs: 400 }), "deadline_exceeded", /did not answer within 400 ms/);
    assert.ok(Date.now() - started < 3000, `took ${Date.now() - started} ms`);
    assertNothingLeft(dir, path.join(dir, "x"));
  } finally {
    await silent.stop();
  }
});

test("a second pull of the same image downloads nothing: layers come from the blob cache", { skip: !isRoot && "needs root" }, async () => {
  const image = sampleImage();
  await anonymous.push("cbo/cached", "1", image);
  const dir = tempDir();
  const cache = path.join(dir, "cache");
  const first: PullProgress[] = [];
  await pullImage({ reference: `${anonymous.host}/cbo/cached:1`, destDir: path.join(dir, "a"), blobCacheDir: cache, onProgress: (p) => first.push(p) });
  assert.ok(first.every((p) => !p.cached));
  const second: PullProgress[] = [];
  await pullImage({ reference: `${anonymous.host}/cbo/cached:1`, destDir: path.join(dir, "b"), blobCacheDir: cache, onProgress: (p) => second.push(p) });
  assert.deepEqual(
    second.map((p) => [p.layer, p.cached]),
    image.layers.map((layer) => [layer.digest, true]),
  );
  assertSampleTree(path.join(dir, "b"));
  // A destination that exists is refused before any work.
  await rejectsWith(pullImage({ reference: `${anonymous.host}/cbo/cached:1`, destDir: path.join(dir, "b") }), "already_exists", /already exists/);
});

test("a Docker Hub name is served by the configured mirror", { skip: !isRoot && "needs root" }, async () => {
  await anonymous.push("library/cbo-mirrored", "3", sampleImage());
  const dir = tempDir();
  const result = await pullImage({ reference: "cbo-mirrored:3", destDir: path.join(dir, "m"), registryHosts: { mirror: anonymous.url } });
  assert.equal(result.config.workingDir, "/app");
  assertSampleTree(path.join(dir, "m"));
});

test("hostile layers pulled from a registry stay inside the root", { skip: !isRoot && "needs root" }, async () => {
  const image = buildImage({
    layers: [
      { entries: [{ path: "evil", type: "symlink", linkPath: "/etc" }, { path: "../../escape-cbo", data: "x" }, { path: "/abs-cbo", data: "y" }, { path: "etc/passwd", data: "root:x:0:0::/root:/bin/sh\n" }] },
      { entries: [{ path: "evil/cbo-owned", data: "inside" }, { path: "hl", type: "hardlink", linkPath: "../../../etc/passwd" }] },
    ],
  });
  await anonymous.push("cbo/hostile", "1", image);
  const dir = tempDir();
  const dest = path.join(dir, "h");
  await pullImage({ reference: `${anonymous.host}/cbo/hostile:1`, destDir: dest });
  assert.equal(fs.readFileSync(path.join(dest, "etc/cbo-owned"), "utf8"), "inside");
  assert.equal(fs.readFileSync(path.join(dest, "escape-cbo"), "utf8"), "x");
  assert.equal(fs.readFileSync(path.join(dest, "abs-cbo"), "utf8"), "y");
  // The hard link names the image's own /etc/passwd (before prepareRootfs replaced that file).
  assert.match(fs.readFileSync(path.join(dest, "hl"), "utf8"), /^root:x:0:0::/);
  assert.equal(fs.existsSync("/etc/cbo-owned"), false);
  assert.equal(fs.existsSync(path.join(dir, "escape-cbo")), false);
  assert.equal(fs.existsSync("/abs-cbo"), false);

  // A hard link to a host file the image does not have is refused, and nothing is left.
  const outside = buildImage({ layers: [{ entries: [{ path: "hl", type: "hardlink", linkPath: "../../../etc/shadow" }] }] });
  await anonymous.push("cbo/hostile", "2", outside);
  await rejectsWith(pullImage({ reference: `${anonymous.host}/cbo/hostile:2`, destDir: path.join(dir, "h2") }), "failed_precondition", /not in the image/);
  assertNothingLeft(dir, path.join(dir, "h2"));
});

test("imports a docker save tarball (plain and gzipped) and an OCI layout, digests verified", { skip: !isRoot && "needs root" }, async () => {
  const dir = tempDir();
  const image = sampleImage();
  const tarball = path.join(dir, "image.tar");
  writeDockerSave(tarball, image, ["cbo/saved:1"]);
  const fromTar = await importImage({ source: tarball, destDir: path.join(dir, "tar") });
  assert.equal(fromTar.digest, image.config.digest);
  assertSampleTree(path.join(dir, "tar"));

  fs.writeFileSync(`${tarball}.gz`, zlib.gzipSync(fs.readFileSync(tarball)));
  await importImage({ source: `${tarball}.gz`, destDir: path.join(dir, "targz"), image: "cbo/saved:1" });
  assertSampleTree(path.join(dir, "targz"));
  await rejectsWith(importImage({ source: tarball, destDir: path.join(dir, "other"), image: "cbo/other:1" }), "not_found", /no image tagged 'cbo\/other:1'/);

  const layout = path.join(dir, "layout");
  const arm = sampleImage("oci", "arm64");
  const index = buildIndex([
    { image: arm, architecture: "arm64" },
    { image, architecture: "amd64" },
  ]);
  writeOciLayout(layout, index, [image, arm], "cbo/layout:1");
  const fromLayout = await importImage({ source: layout, destDir: path.join(dir, "oci") });
  assert.equal(fromLayout.digest, index.digest);
  assert.equal(fromLayout.manifestDigest, image.manifest.digest);
  assertSampleTree(path.join(dir, "oci"));

  // A tampered layer in the layout, and a layer tar in the docker-save that differs from the config's diff_id.
  const layerFile = path.join(layout, "blobs/sha256", image.layers[1]!.digest.slice("sha256:".length));
  const bytes = fs.readFileSync(layerFile);
  bytes[bytes.length - 5] ^= 0xff;
  fs.writeFileSync(layerFile, bytes);
  await rejectsWith(importImage({ source: layout, destDir: path.join(dir, "bad-oci") }), "failed_precondition", /digest mismatch|zstd|corrupt/);
  const tampered = buildImage({ layers: [{ entries: [{ path: "a", data: "1" }] }] });
  const swapped = { ...tampered, layers: [buildImage({ layers: [{ entries: [{ path: "a", data: "2" }] }] }).layers[0]!] };
  writeDockerSave(path.join(dir, "swapped.tar"), swapped);
  await rejectsWith(importImage({ source: path.join(dir, "swapped.tar"), destDir: path.join(dir, "bad-tar") }), "failed_precondition", /diff_id/);
  assertNothingLeft(dir, path.join(dir, "bad-oci"));
  assertNothingLeft(dir, path.join(dir, "bad-tar"));
});
