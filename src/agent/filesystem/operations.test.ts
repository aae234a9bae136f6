import { test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { execFileSync } from "node:child_process";
import { isRoot, makeTempDir, measureEventLoop, rootUser, syntheticUser, withTmpfs } from "./test-helpers.js";
import { listDirectory, makeDirectory, movePath, removePath, resolveRequestPath, statPath } from "./operations.js";
import { replaceMetadata } from "./file-metadata.js";
import { CubicleError } from "../../shared/cubicle-error.js";

async function assertRejectsCubicleError(fn: () => Promise<unknown>, code: string, message?: RegExp): Promise<void> {
  await assert.rejects(fn, (reason: unknown) => {
    assert.ok(reason instanceof CubicleError, `expected a CubicleError, got ${String(reason)}`);
    assert.equal(reason.code, code);
    if (message) assert.match(reason.message, message);
    return true;
  });
}

function assertCubicleError(fn: () => unknown, code: string, message?: RegExp): void {
  assert.throws(fn, (reason: unknown) => {
    assert.ok(reason instanceof CubicleError, `expected a CubicleError, got ${String(reason)}`);
    assert.equal(reason.code, code);
    if (message) assert.match(reason.message, message);
    return true;
  });
}

test("paths resolve against the user's home: ~, relative and empty", () => {
  const user = syntheticUser("/home/someone");
  assert.equal(resolveRequestPath("~", user), "/home/someone");
  assert.equal(resolveRequestPath("~/a/b", user), "/home/someone/a/b");
  assert.equal(resolveRequestPath("notes.txt", user), "/home/someone/notes.txt");
  assert.equal(resolveRequestPath("", user), "/home/someone");
  assert.equal(resolveRequestPath(undefined, user), "/home/someone");
  assert.equal(resolveRequestPath("/etc/../tmp/x", user), "/tmp/x");
});

test("Stat of a missing path is not_found with upstream's message", () => {
  const directory = makeTempDir();
  const missing = path.join(directory, "nope");
  assertCubicleError(() => statPath(rootUser, missing), "not_found", new RegExp(`^file not found: lstat ${missing}: no such file or directory$`));
  fs.rmSync(directory, { recursive: true });
});

test("ListDir honours depth, skips nothing the user can see and reports under a symlinked path", async () => {
  const directory = makeTempDir();
  fs.mkdirSync(path.join(directory, "real/sub/deeper"), { recursive: true });
  fs.writeFileSync(path.join(directory, "real/a.txt"), "a");
  fs.writeFileSync(path.join(directory, "real/sub/b.txt"), "b");
  fs.writeFileSync(path.join(directory, "real/sub/deeper/c.txt"), "c");
  fs.symlinkSync(path.join(directory, "real"), path.join(directory, "link"));

  const names = async (depth: number) => (await listDirectory(rootUser, path.join(directory, "real"), depth)).entries.map((entry) => entry.path.slice(directory.length + 6));
  assert.deepEqual(await names(1), ["a.txt", "sub"]);
  assert.deepEqual(await names(2), ["a.txt", "sub", "sub/b.txt", "sub/deeper"]);
  assert.deepEqual(await names(0), ["a.txt", "sub"], "depth 0 means 1");

  const viaLink = (await listDirectory(rootUser, path.join(directory, "link"), 1)).entries;
  assert.deepEqual(
    viaLink.map((entry) => entry.path),
    [path.join(directory, "link/a.txt"), path.join(directory, "link/sub")],
  );
  await assertRejectsCubicleError(() => listDirectory(rootUser, path.join(directory, "real/a.txt"), 1), "invalid_argument", /path is not a directory/);
  await assertRejectsCubicleError(() => listDirectory(rootUser, path.join(directory, "missing"), 1), "not_found");
  fs.rmSync(directory, { recursive: true });
});

test("MakeDir creates parents, then reports already_exists, and refuses a file in the way", () => {
  const directory = makeTempDir();
  const target = path.join(directory, "a/b/c");
  const { entry } = makeDirectory(rootUser, target);
  assert.equal(entry.type, "FILE_TYPE_DIRECTORY");
  assert.equal(entry.path, target);
  assertCubicleError(() => makeDirectory(rootUser, target), "already_exists", /^directory already exists: /);
  fs.writeFileSync(path.join(directory, "file"), "");
  assertCubicleError(() => makeDirectory(rootUser, path.join(directory, "file")), "invalid_argument", /not a directory/);
  fs.rmSync(directory, { recursive: true });
});

test("Move creates destination parents, carries metadata and reports not_found for a missing source", () => {
  const directory = makeTempDir();
  const source = path.join(directory, "tree/file.txt");
  fs.mkdirSync(path.dirname(source), { recursive: true });
  fs.writeFileSync(source, "x");
  const fd = fs.openSync(source, "r");
  replaceMetadata(fd, { owner: "test" });
  fs.closeSync(fd);

  const destination = path.join(directory, "moved/deeper/tree");
  const { entry } = movePath(rootUser, path.join(directory, "tree"), destination);
  assert.equal(entry.path, destination);
  assert.equal(entry.type, "FILE_TYPE_DIRECTORY");
  assert.deepEqual(statPath(rootUser, path.join(destination, "file.txt")).entry.metadata, { owner: "test" });

  assertCubicleError(() => movePath(rootUser, path.join(directory, "missing"), path.join(directory, "x")), "not_found", /^source file not found/);
  fs.rmSync(directory, { recursive: true });
});

test("Remove deletes recursively and succeeds for a missing path", async () => {
  const directory = makeTempDir();
  fs.mkdirSync(path.join(directory, "a/b"), { recursive: true });
  fs.writeFileSync(path.join(directory, "a/b/c"), "");
  assert.deepEqual(await removePath(rootUser, path.join(directory, "a")), {});
  assert.equal(fs.existsSync(path.join(directory, "a")), false);
  assert.deepEqual(await removePath(rootUser, path.join(directory, "a")), {});
  fs.rmSync(directory, { recursive: true });
});

test("a non-root user is denied what its permissions deny, and owns what it creates", { skip: !isRoot && "needs root" }, async () => {
  const directory = makeTempDir();
  const secret = path.join(directory, "secret");
  fs.mkdirSync(secret, { mode: 0o700 });
  fs.writeFileSync(path.join(secret, "key"), "k");
  const home = path.join(directory, "home");
  fs.mkdirSync(home);
  const user = syntheticUser(home);
  fs.chownSync(home, user.uid, user.gid);

  await assertRejectsCubicleError(() => listDirectory(user, secret, 1), "permission_denied");
  assertCubicleError(() => statPath(user, path.join(secret, "key")), "permission_denied");
  await assertRejectsCubicleError(() => removePath(user, path.join(secret, "key")), "permission_denied");
  assertCubicleError(() => makeDirectory(user, path.join(secret, "sub")), "permission_denied");
  assert.equal(fs.existsSync(path.join(secret, "key")), true);

  makeDirectory(user, "projects/app");
  const created = fs.statSync(path.join(home, "projects"));
  assert.equal(created.uid, user.uid);
  assert.equal(created.gid, user.gid);
  assert.equal(fs.statSync(path.join(home, "projects/app")).uid, user.uid);
  assert.equal(process.geteuid!(), 0, "credentials are restored");
  assert.equal(process.getegid!(), 0);
  fs.rmSync(directory, { recursive: true });
});

test("a NUL byte in any path of an RPC is invalid_argument", async () => {
  const bad = "/tmp/a\0b";
  assertCubicleError(() => statPath(rootUser, bad), "invalid_argument", /NUL byte/);
  await assertRejectsCubicleError(() => listDirectory(rootUser, bad, 1), "invalid_argument", /NUL byte/);
  assertCubicleError(() => makeDirectory(rootUser, bad), "invalid_argument", /NUL byte/);
  assertCubicleError(() => movePath(rootUser, bad, "/tmp/x"), "invalid_argument", /NUL byte/);
  assertCubicleError(() => movePath(rootUser, "/tmp/x", bad), "invalid_argument", /NUL byte/);
  await assertRejectsCubicleError(() => removePath(rootUser, bad), "invalid_argument", /NUL byte/);
});

test("a read-only filesystem is permission_denied for MakeDir, Move and Remove, not internal", { skip: !isRoot && "needs root (mounts a read-only tmpfs)" }, async () => {
  await withTmpfs("ro,size=64k", (readOnly) => {
    assertCubicleError(() => makeDirectory(rootUser, path.join(readOnly, "a/b")), "permission_denied", /read-only file system/);
    assertCubicleError(() => makeDirectory(rootUser, path.join(readOnly, "a")), "permission_denied", /read-only file system/);
    assertCubicleError(() => movePath(rootUser, "/tmp", path.join(readOnly, "x/y")), "permission_denied", /read-only file system/);
  });
  await withTmpfs("size=64k", async (writable) => {
    fs.writeFileSync(path.join(writable, "f"), "x");
    execFileSync("mount", ["-o", "remount,ro", writable]);
    await assertRejectsCubicleError(() => removePath(rootUser, path.join(writable, "f")), "permission_denied", /read-only file system/);
    assertCubicleError(() => movePath(rootUser, path.join(writable, "f"), path.join(writable, "g")), "permission_denied", /read-only file system/);
  });
});

test("symlink loops, over-long names, busy and non-empty targets are 4xx codes, not internal", async () => {
  const directory = makeTempDir();
  fs.symlinkSync("b", path.join(directory, "a"));
  fs.symlinkSync("a", path.join(directory, "b"));
  await assertRejectsCubicleError(() => listDirectory(rootUser, path.join(directory, "a"), 1), "invalid_argument");
  assertCubicleError(() => makeDirectory(rootUser, path.join(directory, "a/sub")), "invalid_argument", /too many levels of symbolic links/);
  assertCubicleError(() => statPath(rootUser, path.join(directory, "a/sub")), "invalid_argument", /too many levels of symbolic links/);
  assertCubicleError(() => statPath(rootUser, path.join(directory, "n".repeat(300))), "invalid_argument", /file name too long/);
  assertCubicleError(() => makeDirectory(rootUser, path.join(directory, "n".repeat(300))), "invalid_argument", /file name too long/);
  fs.mkdirSync(path.join(directory, "full/inner"), { recursive: true });
  fs.mkdirSync(path.join(directory, "other"));
  assertCubicleError(() => movePath(rootUser, path.join(directory, "other"), path.join(directory, "full")), "failed_precondition", /directory not empty/);
  fs.rmSync(directory, { recursive: true });
});

test("a deep ListDir and the Remove of a big tree do not hold up the agent, and a listing is capped", async () => {
  const directory = makeTempDir();
  try {
    for (let index = 0; index < 3000; index++) {
      const sub = path.join(directory, `top${index % 30}`, `d${index}`);
      fs.mkdirSync(sub, { recursive: true });
      for (let file = 0; file < 10; file++) fs.writeFileSync(path.join(sub, `f${file}`), "");
    }
    let listed = 0;
    const listing = await measureEventLoop(async () => (listed = (await listDirectory(rootUser, directory, 10)).entries.length));
    assert.equal(listed, 30 + 3000 + 30_000);
    assert.ok(listing.ticks >= 5, `only ${listing.ticks} timers ran during ListDir`);
    assert.ok(listing.longestBusyMs < 100, `ListDir held the event loop for ${Math.round(listing.longestBusyMs)} ms of CPU`);
    await assertRejectsCubicleError(() => listDirectory(rootUser, directory, 10, 1000), "failed_precondition", /more than 1000 entries/);

    const removal = await measureEventLoop(() => removePath(rootUser, directory));
    assert.equal(fs.existsSync(directory), false);
    assert.ok(removal.ticks >= 5, `only ${removal.ticks} timers ran during Remove`);
    assert.ok(removal.longestBusyMs < 100, `Remove held the event loop for ${Math.round(removal.longestBusyMs)} ms of CPU`);
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});
