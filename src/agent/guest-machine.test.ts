import assert from "node:assert/strict";
import fs, { existsSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { applyGuestInit, checkGuestClock, ensureGuestMachineId, startGuestClockSync } from "./guest-machine.js";

const addonFile = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../../dist/agent/guest.node");

test("outside a guest the agent leaves the clock and the machine's ids alone", async () => {
  const before = Date.now();
  // A timestamp a year off and a new identity: nothing happens without CUBICLE_AGENT_GUEST=1.
  await applyGuestInit({ timestamp: "2025-01-01T00:00:00.000Z", machine: { machineId: "0".repeat(32), bootId: "00000000-0000-0000-0000-000000000000", entropy: "A".repeat(88) } }, {});
  startGuestClockSync({});
  checkGuestClock();
  assert.ok(Math.abs(Date.now() - before) < 5000, "the host's clock was not touched");
});

test("the guest addon refuses arguments it cannot use, without touching the kernel", (t) => {
  if (!existsSync(addonFile)) return t.skip("dist/agent/guest.node is not built: run `node scripts/build.mjs`");
  const module = { exports: {} as { reseed(bytes: unknown): void; setTime(ms: unknown): void } };
  process.dlopen(module, addonFile);
  const addon = module.exports;
  assert.throws(() => addon.reseed(Buffer.alloc(0)), /1 to 512 bytes/);
  assert.throws(() => addon.reseed(Buffer.alloc(513)), /1 to 512 bytes/);
  assert.throws(() => addon.reseed("not a buffer"), /1 to 512 bytes/);
  assert.throws(() => addon.setTime(-1), /milliseconds since the epoch/);
  assert.throws(() => addon.setTime(Number.NaN), /milliseconds since the epoch/);
  assert.throws(() => addon.setTime("now"), /milliseconds since the epoch/);
});

test("a guest whose /etc/machine-id is empty (Debian's, never booted by systemd) gets one at the agent's start; one it has is kept; containers are left alone", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cbs-machine-id-"));
  try {
    const file = path.join(dir, "machine-id");
    fs.writeFileSync(file, "");
    ensureGuestMachineId({}, file);
    assert.equal(fs.readFileSync(file, "utf8"), "", "outside a guest: untouched");
    ensureGuestMachineId({ CUBICLE_AGENT_GUEST: "1" }, file);
    const given = fs.readFileSync(file, "utf8");
    assert.match(given, /^[0-9a-f]{32}\n$/);
    ensureGuestMachineId({ CUBICLE_AGENT_GUEST: "1" }, file);
    assert.equal(fs.readFileSync(file, "utf8"), given, "kept across the agent's restarts");
    fs.rmSync(file);
    ensureGuestMachineId({ CUBICLE_AGENT_GUEST: "1" }, file);
    assert.match(fs.readFileSync(file, "utf8"), /^[0-9a-f]{32}\n$/, "a missing file is made");
    assert.notEqual(fs.readFileSync(file, "utf8"), given);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
