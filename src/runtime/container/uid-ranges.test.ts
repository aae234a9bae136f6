import assert from "node:assert/strict";
import { test } from "node:test";
import { CubicleError } from "../../shared/cubicle-error.js";
import { slotOfUidBase, UID_RANGE_SLOTS, UID_RANGE_START, uidBaseOfSlot, UidRanges } from "./uid-ranges.js";

test("ranges are disjoint 65536-id blocks from 2^30, below 2^32", () => {
  assert.equal(uidBaseOfSlot(0), 2 ** 30);
  assert.equal(uidBaseOfSlot(1) - uidBaseOfSlot(0), 65536);
  assert.ok(uidBaseOfSlot(UID_RANGE_SLOTS - 1) + 65536 <= 2 ** 32 - 1);
  assert.equal(slotOfUidBase(uidBaseOfSlot(7)), 7);
});

test("bases that are not a range's start are not ours: host users, subuid ranges, misaligned or past the end", () => {
  for (const base of [0, 1000, 100000, 165536, UID_RANGE_START + 1, UID_RANGE_START - 65536, uidBaseOfSlot(UID_RANGE_SLOTS), Number.NaN, 1.5]) {
    assert.equal(slotOfUidBase(base), undefined, String(base));
    assert.equal(new UidRanges().claim(base), false, String(base));
  }
});

test("a freed range is handed out again as late as possible; a claimed one never twice", () => {
  const ranges = new UidRanges();
  assert.equal(ranges.claim(uidBaseOfSlot(1)), true);
  const first = ranges.allocate();
  const second = ranges.allocate();
  assert.deepEqual([first, second], [uidBaseOfSlot(0), uidBaseOfSlot(2)], "slot 1 was claimed (a sandbox found after a restart)");
  ranges.release(first);
  assert.equal(ranges.allocate(), uidBaseOfSlot(3), "round-robin: the freed slot 0 waits");
  assert.equal(ranges.inUse, 3);
  ranges.release(uidBaseOfSlot(3));
  ranges.release(uidBaseOfSlot(3));
  assert.equal(ranges.inUse, 2, "a second release of the same range changes nothing");
});

test("when every range is in use, a create gets resource_exhausted (429), not a shared range", () => {
  const ranges = new UidRanges();
  for (let slot = 0; slot < UID_RANGE_SLOTS; slot++) ranges.claim(uidBaseOfSlot(slot));
  assert.throws(() => ranges.allocate(), (err: unknown) => err instanceof CubicleError && err.httpStatus === 429);
});
