import { test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { shiftOwnership } from "./shift-ownership.js";

const isRoot = process.getuid?.() === 0;

function makeTree(): string {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-shift-"));
  fs.mkdirSync(path.join(root, "usr/bin"), { recursive: true });
  fs.writeFileSync(path.join(root, "usr/bin/sudo"), "#!/bin/sh\n");
  fs.chmodSync(path.join(root, "usr/bin/sudo"), 0o4755);
  fs.mkdirSync(path.join(root, "var/mail"), { recursive: true });
  fs.chmodSync(path.join(root, "var/mail"), 0o2775);
  fs.mkdirSync(path.join(root, "home/user"), { recursive: true });
  fs.writeFileSync(path.join(root, "home/user/.bashrc"), "# hi\n");
  fs.chownSync(path.join(root, "home/user"), 1000, 1000);
  fs.chownSync(path.join(root, "home/user/.bashrc"), 1000, 1000);
  fs.writeFileSync(path.join(root, "usr/bin/python3.11"), "elf");
  fs.linkSync(path.join(root, "usr/bin/python3.11"), path.join(root, "usr/bin/python3-hardlink"));
  // Absolute and dangling on purpose: it must be changed itself, never followed to the host.
  fs.symlinkSync("/etc/passwd", path.join(root, "usr/bin/passwd-link"));
  return root;
}

test("shifts every owner by the base and keeps setuid and setgid bits", { skip: !isRoot && "needs root" }, () => {
  const root = makeTree();
  const hostPasswd = fs.lstatSync("/etc/passwd");
  try {
    const result = shiftOwnership(root, 100000);
    const owner = (p: string) => {
      const s = fs.lstatSync(path.join(root, p));
      return [s.uid, s.gid];
    };
    assert.deepEqual(owner("."), [100000, 100000]);
    assert.deepEqual(owner("usr/bin/sudo"), [100000, 100000]);
    assert.deepEqual(owner("home/user"), [101000, 101000]);
    assert.deepEqual(owner("home/user/.bashrc"), [101000, 101000]);
    assert.deepEqual(owner("usr/bin/passwd-link"), [100000, 100000]);
    assert.equal(fs.lstatSync(path.join(root, "usr/bin/sudo")).mode & 0o7777, 0o4755);
    assert.equal(fs.lstatSync(path.join(root, "var/mail")).mode & 0o7777, 0o2775);
    // The hard-linked inode was shifted once, not twice.
    assert.deepEqual(owner("usr/bin/python3.11"), [100000, 100000]);
    assert.deepEqual(owner("usr/bin/python3-hardlink"), [100000, 100000]);
    const after = fs.lstatSync("/etc/passwd");
    assert.deepEqual([after.uid, after.gid], [hostPasswd.uid, hostPasswd.gid]);
    // root dir, usr, usr/bin, sudo, python (one inode), link, var, var/mail, home, home/user, .bashrc
    assert.equal(result.entries, 11);
    assert.ok(result.sizeBytes > 0);
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
});

test("refuses a path that is not a directory", () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-shift-"));
  try {
    fs.writeFileSync(path.join(root, "file"), "");
    assert.throws(() => shiftOwnership(path.join(root, "file"), 100000), { code: "invalid_argument" });
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
});
