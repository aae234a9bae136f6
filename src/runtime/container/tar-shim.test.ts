import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, openSync, closeSync } from "node:fs";
import { chmod, chown, link, lstat, mkdir, mkdtemp, readdir, readFile, readlink, rm, symlink, truncate, utimes, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { tarShimEnv, writeTarShim } from "./criu.js";

const repoRoot = path.join(import.meta.dirname, "..", "..", "..");
const builtShim = path.join(repoRoot, "dist", "tar-shim");

/** Runs `tar args` as CRIU does: stdin and stdout are image files (or the directory to archive). */
function runAsCriu(shim: string, args: string[], io: { stdin?: string; stdout?: string }, realTar = "/usr/bin/tar"): void {
  const stdin = io.stdin ? openSync(io.stdin, "r") : "ignore";
  const stdout = io.stdout ? openSync(io.stdout, "w") : "ignore";
  try {
    execFileSync(shim, args, { stdio: [stdin, stdout, "pipe"], env: { PATH: "/usr/bin:/bin", ...tarShimEnv(realTar) } });
  } finally {
    if (typeof stdin === "number") closeSync(stdin);
    if (typeof stdout === "number") closeSync(stdout);
  }
}

// The arguments CRIU 4.2 gives tar for a tmpfs mount (mount.c), with --gzip it cannot leave out.
const dumpArgs = (dir: string) => ["--create", "--gzip", "--no-unquote", "--no-wildcards", "--one-file-system", "--check-links", "--preserve-permissions", "--sparse", "--numeric-owner", "--directory", dir, "."];
const restoreArgs = (dir: string) => ["--extract", "--gzip", "--no-unquote", "--no-wildcards", "--directory", dir];

describe("CRIU's tar shim (TAR_SHIM_NOTE)", () => {
  let work: string;
  before(async () => {
    work = await mkdtemp(path.join(os.tmpdir(), "cubicle-tar-shim-"));
    await mkdir(path.join(work, "source", "sub"), { recursive: true });
    await writeFile(path.join(work, "source", "sub", "note"), "kept\n");
  });
  after(() => rm(work, { recursive: true, force: true }));

  it("is built (scripts/build.mjs, gcc is a host package)", () => assert.ok(existsSync(builtShim), builtShim));

  for (const kind of ["static", "shell"] as const) {
    it(`${kind}: archives without gzip and restores both its own archives and gzip ones made before the shim`, async () => {
      const dir = path.join(work, kind);
      await writeTarShim(dir, "/usr/bin/tar", kind === "static" ? builtShim : undefined);
      const shim = path.join(dir, "tar");
      assert.equal((await readFile(shim)).subarray(0, 2).toString() === "#!", kind === "shell");

      const image = path.join(work, `${kind}.tar.gz.img`);
      runAsCriu(shim, dumpArgs(path.join(work, "source")), { stdout: image });
      const header = await readFile(image);
      assert.notDeepEqual([...header.subarray(0, 2)], [0x1f, 0x8b], "no gzip magic: the shim dropped --gzip");

      const oldImage = path.join(work, `${kind}-old.tar.gz.img`);
      execFileSync("/usr/bin/tar", ["--create", "--gzip", "--file", oldImage, "--directory", path.join(work, "source"), "."]);
      for (const source of [image, oldImage]) {
        const target = path.join(work, `${kind}-restored-${path.basename(source)}`);
        await mkdir(target);
        runAsCriu(shim, restoreArgs(target), { stdin: source });
        assert.equal(await readFile(path.join(target, "sub", "note"), "utf8"), "kept\n");
      }
    });
  }
});

// CRIU 4.2.1's argv exactly (filesystems.c tmpfs_dump): the directory is its stdin.
const criuDumpArgs = ["--create", "--gzip", "--no-unquote", "--no-wildcards", "--one-file-system", "--check-links", "--preserve-permissions", "--sparse", "--numeric-owner", "--directory", "/proc/self/fd/0", "."];
// Set as the real tar where the shim must not need it: a run that execs it fails.
const noRealTar = "/nonexistent/t15f-tar";

/** Every entry below `root`: type, mode, owner, mtime (seconds: all the format keeps), contents, link counts. */
async function describeTree(root: string): Promise<Record<string, string>> {
  const tree: Record<string, string> = {};
  const visit = async (relative: string): Promise<void> => {
    const full = path.join(root, relative);
    const st = await lstat(full);
    let detail = "";
    if (st.isFile()) detail = createHash("sha256").update(await readFile(full)).digest("hex");
    else if (st.isSymbolicLink()) detail = await readlink(full);
    else if (st.isCharacterDevice() || st.isBlockDevice()) detail = String(st.rdev);
    const mtime = relative === "." ? "" : String(Math.floor(st.mtimeMs / 1000)); // "." is the target itself
    tree[relative] = [st.mode.toString(8), st.uid, st.gid, mtime, st.nlink, st.size, detail].join(" ");
    if (st.isDirectory()) for (const name of await readdir(full)) await visit(relative === "." ? name : path.join(relative, name));
  };
  await visit(".");
  tree["."] = tree["."].split(" ").slice(0, 3).join(" ");
  return tree;
}

/** A tree with every entry type the shim handles, long names, odd modes and owners, a 50 MiB file. */
async function makeTree(root: string): Promise<void> {
  const longDir = path.join(root, "d".repeat(150));
  const deepName = path.join(longDir, "e".repeat(120), "f".repeat(200)); // > 255 chars in all
  await mkdir(path.dirname(deepName), { recursive: true });
  await writeFile(deepName, "deep\n");
  await mkdir(path.join(root, "empty", "nested-empty"), { recursive: true });
  await writeFile(path.join(root, "setuid"), "#!/bin/sh\n");
  await chown(path.join(root, "setuid"), 1234, 5678);
  await chmod(path.join(root, "setuid"), 0o4751);
  await chmod(path.join(root, "empty"), 0o1777);
  await chmod(path.join(root, "empty", "nested-empty"), 0o2700);
  await chown(path.join(root, "empty", "nested-empty"), 1000, 1000);
  await link(path.join(root, "setuid"), path.join(root, "empty", "hard-link"));
  await link(deepName, path.join(root, "hard-link-to-long"));
  await symlink("/proc/self/fd", path.join(root, "fd"));
  await symlink("../setuid", path.join(root, "empty", "relative-link"));
  await symlink("t".repeat(300), path.join(root, "long-target"));
  execFileSync("mknod", [path.join(root, "null"), "c", "1", "3"]);
  execFileSync("mknod", [path.join(root, "loop"), "b", "7", "200"]);
  execFileSync("mkfifo", [path.join(root, "fifo")]);
  await writeFile(path.join(root, "empty-file"), "");
  const big = Buffer.alloc(50 * 1024 * 1024);
  for (let i = 0; i < big.length; i += 4096) big.writeUInt32LE((i ^ 0x9e3779b9) >>> 0, i);
  await writeFile(path.join(root, "big"), big);
  for (const [name, seconds] of [["setuid", 1e9], ["empty", 1.2e9], ["fd", 1.3e9], [deepName, 1.4e9], ["empty/nested-empty", 1.5e9]] as const) {
    const full = path.isAbsolute(name) ? name : path.join(root, name);
    if (name === "fd") execFileSync("touch", ["-h", "-d", `@${seconds}`, full]);
    else await utimes(full, seconds, seconds);
  }
}

describe("the tar shim archives and extracts CRIU's tmpfs mounts itself", () => {
  let work: string;
  let shim: string;
  let source: string;
  let expected: Record<string, string>;
  before(async () => {
    work = await mkdtemp(path.join(os.tmpdir(), "t15f-tar-native-"));
    await writeTarShim(path.join(work, "bin"), "/usr/bin/tar", builtShim);
    shim = path.join(work, "bin", "tar");
    source = path.join(work, "source");
    await mkdir(source);
    await makeTree(source);
    expected = await describeTree(source);
  });
  after(() => rm(work, { recursive: true, force: true }));

  it("archives every entry type without GNU tar, and GNU tar extracts the same tree", async () => {
    const image = path.join(work, "native.img");
    runAsCriu(shim, criuDumpArgs, { stdin: source, stdout: image }, noRealTar);
    const target = path.join(work, "gnu-extracted");
    await mkdir(target);
    execFileSync("/usr/bin/tar", ["--extract", "--file", image, "--directory", target]);
    assert.deepEqual(await describeTree(target), expected);
    const listing = execFileSync("/usr/bin/tar", ["--list", "--verbose", "--numeric-owner", "--file", image]).toString();
    assert.match(listing, /hrwsr-x--x 1234\/5678 .* \.\/empty\/hard-link link to \.\/setuid/);
  });

  it("extracts GNU tar's archive of the same tree without GNU tar", async () => {
    const image = path.join(work, "gnu.img");
    execFileSync("/usr/bin/tar", ["--create", "--one-file-system", "--numeric-owner", "--file", image, "--directory", source, "."]);
    const target = path.join(work, "native-extracted");
    await mkdir(target);
    runAsCriu(shim, restoreArgs(target), { stdin: image }, noRealTar);
    assert.deepEqual(await describeTree(target), expected);
  });

  it("leaves a sparse file to GNU tar, whose archive it then also leaves to GNU tar to extract", async () => {
    const dir = path.join(work, "sparse");
    await mkdir(dir);
    await writeFile(path.join(dir, "hole"), "start");
    await truncate(path.join(dir, "hole"), 64 * 1024 * 1024);
    const image = path.join(work, "sparse.img");
    assert.throws(() => runAsCriu(shim, criuDumpArgs, { stdin: dir, stdout: image }, noRealTar), /t15f-tar/);
    runAsCriu(shim, criuDumpArgs, { stdin: dir, stdout: image });
    assert.ok((await lstat(image)).size < 1024 * 1024, "GNU tar's --sparse archive, not 64 MiB of zeros");
    const target = path.join(work, "sparse-extracted");
    await mkdir(target);
    runAsCriu(shim, restoreArgs(target), { stdin: image });
    assert.deepEqual(await describeTree(target), await describeTree(dir));
  });

  it("writes nothing outside the directory from a hostile archive", async () => {
    const outside = path.join(work, "outside");
    const stage = path.join(work, "hostile-stage");
    await mkdir(outside);
    await mkdir(stage);
    await writeFile(path.join(stage, "evil"), "escaped\n");
    const image = (name: string) => path.join(work, `hostile-${name}.img`);
    const tar = (args: string[]) => execFileSync("/usr/bin/tar", ["--numeric-owner", ...args]);
    // ../ and absolute member names, and a hard link to a file outside.
    tar(["--create", "--absolute-names", "--file", image("dotdot"), "--directory", stage, "--transform", "s,^evil,../outside/evil,", "evil"]);
    tar(["--create", "--absolute-names", "--file", image("absolute"), "--directory", stage, "--transform", `s,^evil,${outside}/evil,`, "evil"]);
    // A symlink out of the directory, then a file through it: absolute and relative targets.
    for (const [name, target] of [["symlink-absolute", outside], ["symlink-relative", "../outside"]]) {
      await rm(path.join(stage, "link"), { force: true });
      await symlink(target, path.join(stage, "link"));
      tar(["--create", "--file", image(name), "--directory", stage, "link"]);
      tar(["--append", "--file", image(name), "--directory", stage, "--transform", "s,^evil,link/evil,", "evil"]);
    }
    for (const name of ["dotdot", "absolute", "symlink-absolute", "symlink-relative"]) {
      const target = path.join(work, `hostile-${name}`, "root");
      await mkdir(target, { recursive: true });
      try {
        runAsCriu(shim, restoreArgs(target), { stdin: image(name) });
      } catch {
        // GNU tar and the shim both exit 2 on a refused member; what matters is where files landed.
      }
      assert.deepEqual(await readdir(outside), [], name);
      assert.deepEqual(await readdir(path.dirname(target)), ["root"], name);
    }
  });
});
