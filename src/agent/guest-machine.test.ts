import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
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
  const bind = (addon as unknown as { bindReadOnly(...args: unknown[]): void }).bindReadOnly;
  assert.throws(() => bind(), /a source and a target path/);
  assert.throws(() => bind("/etc/hostname"), /a source and a target path/);
  assert.throws(() => bind("relative", "/etc/hostname"), /source must be an absolute path/);
  assert.throws(() => bind("/etc/hostname", ""), /target must be an absolute path/);
  assert.throws(() => bind("/etc/hostname", 7), /target must be an absolute path/);
  assert.throws(() => bind("/etc/hostname", `/${"x".repeat(5000)}`), /target must be an absolute path/);
});

/**
 * bindReadOnly as a restored guest's /init uses it on the boot id (GUEST_MACHINE_NOTE), in a
 * mount namespace of its own (`unshare -m`, private propagation) so the host's mounts are
 * untouched: the target shows the source, refuses writes, and a second call (a fork of a fork)
 * replaces the first bind instead of stacking on it.
 */
test("the guest addon binds a file read-only over another, replacing an earlier bind, by syscalls", (t) => {
  if (!existsSync(addonFile)) return t.skip("dist/agent/guest.node is not built: run `node scripts/build.mjs`");
  if (process.getuid?.() !== 0) return t.skip("needs root (a mount namespace of its own)");
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cbs-bind-"));
  try {
    for (const [name, text] of [["target", "host's\n"], ["first", "first\n"], ["second", "second\n"]]) fs.writeFileSync(path.join(dir, name!), text!);
    const script = `
      const fs = require("node:fs");
      const module = { exports: {} };
      process.dlopen(module, ${JSON.stringify(addonFile)});
      const target = ${JSON.stringify(path.join(dir, "target"))};
      const binds = () => fs.readFileSync("/proc/self/mountinfo", "utf8").split("\\n").filter((line) => line.split(" ")[4] === target).length;
      const seen = [];
      module.exports.bindReadOnly(${JSON.stringify(path.join(dir, "first"))}, target);
      seen.push(fs.readFileSync(target, "utf8"), binds());
      try { fs.writeFileSync(target, "written"); seen.push("writable"); } catch (error) { seen.push(error.code); }
      module.exports.bindReadOnly(${JSON.stringify(path.join(dir, "second"))}, target);
      seen.push(fs.readFileSync(target, "utf8"), binds());
      try { module.exports.bindReadOnly(${JSON.stringify(path.join(dir, "missing"))}, target); } catch (error) { seen.push(error.code); }
      process.stdout.write(JSON.stringify(seen));
    `;
    const out = execFileSync("unshare", ["--mount", "--propagation", "private", process.execPath, "-e", script], { encoding: "utf8" });
    assert.deepEqual(JSON.parse(out), ["first\n", 1, "EROFS", "second\n", 1, "ENOENT"]);
    // Outside that namespace nothing was bound: the host's file is as it was.
    assert.equal(fs.readFileSync(path.join(dir, "target"), "utf8"), "host's\n");
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
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
