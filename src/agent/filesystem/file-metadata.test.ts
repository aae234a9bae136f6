import { test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { makeTempDir } from "./test-helpers.js";
import { readMetadata, replaceMetadata, validateMetadata } from "./file-metadata.js";
import { execFileSync } from "node:child_process";
import { CubicleError } from "../../shared/cubicle-error.js";

function rejects(metadata: Record<string, string>, message: RegExp): void {
  assert.throws(() => validateMetadata(metadata), (reason: unknown) => reason instanceof CubicleError && reason.code === "invalid_argument" && message.test(reason.message));
}

test("metadata validation follows upstream's limits", () => {
  validateMetadata({});
  validateMetadata({ "content-type": "text/plain", k: "" });
  validateMetadata({ ["k".repeat(246)]: "v" });
  rejects({ "": "v" }, /must not be empty/);
  rejects({ ["k".repeat(247)]: "v" }, /exceeds 246 bytes/);
  rejects({ k: "caf\u00e9" }, /non-printable-ASCII byte 0xc3 at offset 3/);
  rejects({ k: "tab\there" }, /non-printable-ASCII byte 0x09/);
  rejects({ "k\u007f": "v" }, /metadata key contains/);
  // 9 bytes of prefix + key + value per entry, at most 4096 in all.
  validateMetadata({ a: "v".repeat(4096 - 10) });
  rejects({ a: "v".repeat(4096 - 9) }, /total metadata size 4097 exceeds 4096 bytes/);
});

/** Sets an xattr from another process, as a program inside the sandbox would. */
function setxattrFromPython(file: string, name: string, value: string): void {
  execFileSync("/usr/bin/python3", ["-c", "import os, sys; os.setxattr(sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3]))", file, name, Buffer.from(value, "latin1").toString("hex")]);
}

test("metadata is the file's user.e2b.* xattrs: replaced as a set, other attributes untouched", () => {
  const directory = makeTempDir();
  const file = path.join(directory, "f");
  fs.writeFileSync(file, "x");
  setxattrFromPython(file, "user.other", "keep");
  const fd = fs.openSync(file, "r");
  try {
    replaceMetadata(fd, { a: "1", b: "2" });
    assert.deepEqual(readMetadata(file), { a: "1", b: "2" });
    replaceMetadata(fd, { c: "3" });
    assert.deepEqual(readMetadata(fd), { c: "3" }, "the set is replaced, not merged");
    const names = execFileSync("/usr/bin/python3", ["-c", "import os, sys; print(sorted(os.listxattr(sys.argv[1])))", file], { encoding: "utf8" });
    assert.equal(names.trim(), "['user.e2b.c', 'user.other']", "stored as xattrs; a foreign attribute is kept");
    replaceMetadata(fd, {});
    assert.equal(readMetadata(file), undefined, "an empty set clears it");
    assert.throws(() => replaceMetadata(fd, { "bad\n": "x" }), /non-printable/);
  } finally {
    fs.closeSync(fd);
    fs.rmSync(directory, { recursive: true });
  }
});

test("an xattr set by another process is metadata; it follows renames; symlinks are not followed", () => {
  const directory = makeTempDir();
  const file = path.join(directory, "f");
  fs.writeFileSync(file, "x");
  setxattrFromPython(file, "user.e2b.author", "ada");
  setxattrFromPython(file, "user.e2b.", "nameless");
  setxattrFromPython(file, "user.e2b.raw", "caf\xe9");
  assert.deepEqual(readMetadata(file), { author: "ada", raw: "caf\ufffd" }, "an empty key is skipped; invalid UTF-8 is replaced");
  fs.renameSync(file, path.join(directory, "g"));
  assert.deepEqual(readMetadata(path.join(directory, "g"))?.author, "ada");
  fs.symlinkSync(path.join(directory, "g"), path.join(directory, "link"));
  assert.equal(readMetadata(path.join(directory, "link")), undefined, "the link itself has none");
  assert.equal(readMetadata(path.join(directory, "missing")), undefined);
  fs.rmSync(directory, { recursive: true });
});
