import assert from "node:assert/strict";
import { test } from "node:test";
import { CubicleError } from "../shared/cubicle-error.js";
import { newSnapshotId } from "./ids.js";
import { decodeSnapshotCursor, encodeSnapshotCursor, isSnapshotId, normaliseSnapshotRef, parseSnapshotName } from "./snapshot-names.js";

test("snapshot names are lowercased, a :default tag is dropped, bad ones are invalid_argument", () => {
  assert.equal(parseSnapshotName(undefined), undefined);
  assert.equal(parseSnapshotName(""), undefined);
  assert.equal(parseSnapshotName("My-Env_1.2"), "my-env_1.2");
  assert.equal(parseSnapshotName("trained:default"), "trained");
  for (const bad of ["-leading", "has space", "a/b", "x".repeat(64), 5, "snap-abcdefghij0123456789"]) {
    assert.throws(() => parseSnapshotName(bad), (err: unknown) => err instanceof CubicleError && err.httpStatus === 400, String(bad));
  }
});

test("snapshot ids are valid templateIDs and are recognised; references normalise like names", () => {
  const id = newSnapshotId();
  assert.ok(isSnapshotId(id));
  assert.match(id, /^[a-z0-9-]+$/);
  assert.equal(isSnapshotId("base"), false);
  assert.equal(normaliseSnapshotRef(`${id}:default`), id);
  assert.equal(normaliseSnapshotRef(" Named "), "named");
});

test("snapshot cursors round-trip and foreign tokens are refused", () => {
  const id = newSnapshotId();
  assert.deepEqual(decodeSnapshotCursor(encodeSnapshotCursor(1700000000000, id)), { createdAt: 1700000000000, snapshotId: id });
  assert.equal(decodeSnapshotCursor(undefined), undefined);
  assert.throws(() => decodeSnapshotCursor("bm90LWEtdG9rZW4"), CubicleError);
});
