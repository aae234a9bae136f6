import { test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { goFileModeString, readEntryInfo, timestampFromNs } from "./entry-info.js";
import { makeTempDir } from "./test-helpers.js";

test("permissions are formatted like Go's FileMode.String", () => {
  assert.equal(goFileModeString(fs.constants.S_IFREG | 0o644), "-rw-r--r--");
  assert.equal(goFileModeString(fs.constants.S_IFDIR | 0o755), "drwxr-xr-x");
  assert.equal(goFileModeString(fs.constants.S_IFLNK | 0o777), "Lrwxrwxrwx");
  assert.equal(goFileModeString(fs.constants.S_IFCHR | 0o666), "Dcrw-rw-rw-");
  assert.equal(goFileModeString(fs.constants.S_IFDIR | 0o1777), "dtrwxrwxrwx");
  assert.equal(goFileModeString(fs.constants.S_IFREG | 0o4755), "urwxr-xr-x");
  assert.equal(goFileModeString(fs.constants.S_IFIFO | 0o600), "prw-------");
});

test("timestamps are RFC 3339 with protobuf's fraction lengths", () => {
  assert.equal(timestampFromNs(1_700_000_000_000_000_000n), "2023-11-14T22:13:20Z");
  assert.equal(timestampFromNs(1_700_000_000_120_000_000n), "2023-11-14T22:13:20.120Z");
  assert.equal(timestampFromNs(1_700_000_000_000_123_000n), "2023-11-14T22:13:20.000123Z");
  assert.equal(timestampFromNs(1_700_000_000_000_000_001n), "2023-11-14T22:13:20.000000001Z");
  assert.equal(timestampFromNs(0n), undefined);
});

test("a file's EntryInfo carries every field in proto3 JSON form", () => {
  const directory = makeTempDir();
  const file = path.join(directory, "hello.txt");
  fs.writeFileSync(file, "hello");
  fs.chmodSync(file, 0o640);
  const entry = readEntryInfo(file);
  assert.equal(entry.name, "hello.txt");
  assert.equal(entry.type, "FILE_TYPE_FILE");
  assert.equal(entry.path, file);
  assert.equal(entry.size, "5");
  assert.equal(entry.mode, 0o640);
  assert.equal(entry.permissions, "-rw-r-----");
  assert.equal(typeof entry.owner, "string");
  assert.notEqual(entry.owner, "");
  assert.equal(typeof entry.group, "string");
  assert.match(entry.modifiedTime!, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/);
  assert.equal(entry.symlinkTarget, undefined);
  fs.rmSync(directory, { recursive: true });
});

test("a symlink reports its target's type and mode, and a dangling one is unspecified", () => {
  const directory = makeTempDir();
  fs.mkdirSync(path.join(directory, "real"), { mode: 0o750 });
  fs.chmodSync(path.join(directory, "real"), 0o750);
  fs.symlinkSync(path.join(directory, "real"), path.join(directory, "link"));
  fs.symlinkSync(path.join(directory, "missing"), path.join(directory, "dangling"));

  const link = readEntryInfo(path.join(directory, "link"));
  assert.equal(link.type, "FILE_TYPE_DIRECTORY");
  assert.equal(link.mode, 0o750);
  assert.equal(link.permissions, "Lrwxrwxrwx");
  assert.equal(link.symlinkTarget, fs.realpathSync(path.join(directory, "real")));

  const dangling = readEntryInfo(path.join(directory, "dangling"));
  assert.equal(dangling.type, "FILE_TYPE_UNSPECIFIED");
  assert.equal(dangling.mode, 0);
  assert.equal(dangling.symlinkTarget, path.join(directory, "dangling"));
  fs.rmSync(directory, { recursive: true });
});

test("the root directory is named /", () => {
  assert.equal(readEntryInfo("/").name, "/");
});
