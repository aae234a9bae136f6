import assert from "node:assert/strict";
import { test } from "node:test";
import { PinnedAddresses } from "./pinned-addresses.js";

function fakeClock(start = 1_000_000): { now: () => number; advance: (ms: number) => void } {
  let time = start;
  return { now: () => time, advance: (ms) => void (time += ms) };
}

test("a pinned address is pinned for its name and sandbox only, ignoring case and a trailing dot", () => {
  const pins = new PinnedAddresses();
  pins.pin("sb-a", "API.Example.com.", ["192.0.2.1", "192.0.2.2"], 300);
  assert.equal(pins.isPinned("sb-a", "api.example.com", "192.0.2.1"), true);
  assert.equal(pins.isPinned("sb-a", "api.example.com.", "192.0.2.2"), true);
  assert.equal(pins.isPinned("sb-a", "api.example.com", "::ffff:192.0.2.2"), true);
  assert.equal(pins.isPinned("sb-a", "api.example.com", "192.0.2.3"), false);
  assert.equal(pins.isPinned("sb-a", "other.example.com", "192.0.2.1"), false);
  assert.equal(pins.isPinned("sb-b", "api.example.com", "192.0.2.1"), false);
});

test("a pin lasts the TTL clamped to between 30 s and 1 h", () => {
  const clock = fakeClock();
  const pins = new PinnedAddresses({ now: clock.now });
  pins.pin("sb", "zero.example", ["192.0.2.1"], 0);
  pins.pin("sb", "normal.example", ["192.0.2.2"], 120);
  pins.pin("sb", "week.example", ["192.0.2.3"], 7 * 24 * 3600);
  clock.advance(29_999);
  assert.equal(pins.isPinned("sb", "zero.example", "192.0.2.1"), true, "a TTL of 0 still lasts 30 s");
  clock.advance(1);
  assert.equal(pins.isPinned("sb", "zero.example", "192.0.2.1"), false);
  clock.advance(90_000 - 1);
  assert.equal(pins.isPinned("sb", "normal.example", "192.0.2.2"), true);
  clock.advance(1);
  assert.equal(pins.isPinned("sb", "normal.example", "192.0.2.2"), false);
  clock.advance(3_600_000 - 120_000 - 1);
  assert.equal(pins.isPinned("sb", "week.example", "192.0.2.3"), true);
  clock.advance(1);
  assert.equal(pins.isPinned("sb", "week.example", "192.0.2.3"), false, "a week-long TTL is cut to an hour");
});

test("pinning again extends a pin, never shortens it", () => {
  const clock = fakeClock();
  const pins = new PinnedAddresses({ now: clock.now });
  pins.pin("sb", "a.example", ["192.0.2.1"], 600);
  clock.advance(60_000);
  pins.pin("sb", "a.example", ["192.0.2.1"], 30);
  clock.advance(500_000);
  assert.equal(pins.isPinned("sb", "a.example", "192.0.2.1"), true);
});

test("namesFor lists the unexpired names an address was given for", () => {
  const clock = fakeClock();
  const pins = new PinnedAddresses({ now: clock.now });
  pins.pin("sb", "www.example.com", ["192.0.2.9"], 60);
  pins.pin("sb", "cdn.example.net", ["192.0.2.9", "192.0.2.10"], 600);
  pins.pin("other", "evil.example", ["192.0.2.9"], 600);
  assert.deepEqual(pins.namesFor("sb", "192.0.2.9"), ["cdn.example.net", "www.example.com"]);
  assert.deepEqual(pins.namesFor("sb", "192.0.2.10"), ["cdn.example.net"]);
  assert.deepEqual(pins.namesFor("sb", "192.0.2.11"), []);
  clock.advance(60_000);
  assert.deepEqual(pins.namesFor("sb", "192.0.2.9"), ["cdn.example.net"]);
});

test("keeps at most the configured number of pins per sandbox, dropping the oldest", () => {
  const pins = new PinnedAddresses({ maxPinsPerSandbox: 3 });
  pins.pin("sb", "one.example", ["192.0.2.1"], 60);
  pins.pin("sb", "two.example", ["192.0.2.2"], 60);
  pins.pin("sb", "three.example", ["192.0.2.3"], 60);
  pins.pin("sb", "one.example", ["192.0.2.1"], 60); // refreshed: now the newest
  pins.pin("sb", "four.example", ["192.0.2.4"], 60);
  assert.equal(pins.size("sb"), 3);
  assert.equal(pins.isPinned("sb", "two.example", "192.0.2.2"), false);
  assert.deepEqual(pins.namesFor("sb", "192.0.2.2"), []);
  assert.equal(pins.isPinned("sb", "one.example", "192.0.2.1"), true);
  assert.equal(pins.isPinned("sb", "four.example", "192.0.2.4"), true);
  // A flood from one sandbox does not touch another's pins.
  pins.pin("other", "kept.example", ["198.51.100.1"], 60);
  for (let i = 0; i < 100; i++) pins.pin("sb", `flood${i}.example`, [`10.0.0.${i}`], 60);
  assert.equal(pins.size("sb"), 3);
  assert.equal(pins.isPinned("other", "kept.example", "198.51.100.1"), true);
});

test("drop forgets a sandbox's pins", () => {
  const pins = new PinnedAddresses();
  pins.pin("sb", "a.example", ["192.0.2.1"], 60);
  pins.pin("keep", "a.example", ["192.0.2.1"], 60);
  pins.drop("sb");
  assert.equal(pins.isPinned("sb", "a.example", "192.0.2.1"), false);
  assert.deepEqual(pins.namesFor("sb", "192.0.2.1"), []);
  assert.equal(pins.isPinned("keep", "a.example", "192.0.2.1"), true);
});
