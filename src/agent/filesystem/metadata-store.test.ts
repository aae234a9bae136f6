import { test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { makeTempDir } from "./test-helpers.js";
import { MetadataStore, validateMetadata } from "./metadata-store.js";
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

test("metadata is replaced as a set, survives a reload and is dropped for a recreated file", () => {
  const storeDirectory = makeTempDir();
  const directory = makeTempDir();
  const file = path.join(directory, "f");
  fs.writeFileSync(file, "x");
  const identity = fs.statSync(file, { bigint: true });

  const store = new MetadataStore(storeDirectory);
  store.replace(file, identity, { a: "1", b: "2" });
  store.replace(file, identity, { c: "3" });
  assert.deepEqual(store.get(file, identity), { c: "3" });
  assert.deepEqual(new MetadataStore(storeDirectory).get(file, identity), { c: "3" }, "persisted on disk");

  // Same device, other inode: the file was deleted and recreated by someone else.
  assert.equal(store.get(file, { dev: identity.dev, ino: identity.ino + 1000n }), undefined);
  assert.equal(store.get(file, identity), undefined, "the stale entry is gone");

  store.replace(file, identity, { d: "4" });
  // Another device (a restored snapshot): trusted by path and re-stamped.
  assert.deepEqual(store.get(file, { dev: identity.dev + 1n, ino: 42n }), { d: "4" });
  assert.deepEqual(store.get(file, { dev: identity.dev + 1n, ino: 42n }), { d: "4" });
  store.replace(file, identity, {});
  assert.equal(store.get(file, identity), undefined, "an empty set clears it");
  fs.rmSync(storeDirectory, { recursive: true });
  fs.rmSync(directory, { recursive: true });
});

test("moving and removing a tree moves and drops the entries below it", () => {
  const storeDirectory = makeTempDir();
  const store = new MetadataStore(storeDirectory);
  const id = { dev: 1n, ino: 2n };
  store.replace("/t/a/x", id, { k: "x" });
  store.replace("/t/a/y/z", id, { k: "z" });
  store.replace("/t/ab", id, { k: "ab" });
  store.move("/t/a", "/t/b");
  assert.equal(store.get("/t/a/x", id), undefined);
  assert.deepEqual(store.get("/t/b/x", id), { k: "x" });
  assert.deepEqual(store.get("/t/b/y/z", id), { k: "z" });
  assert.deepEqual(store.get("/t/ab", id), { k: "ab" }, "a sibling sharing the prefix is untouched");
  store.removeTree("/t/b");
  assert.equal(store.get("/t/b/y/z", id), undefined);
  assert.deepEqual(store.get("/t/ab", id), { k: "ab" });
  fs.rmSync(storeDirectory, { recursive: true });
});
