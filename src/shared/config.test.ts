import assert from "node:assert/strict";
import os from "node:os";
import { test } from "node:test";
import { defaultMaxMemoryMB, loadConfig } from "./config.js";

test("create limits default to the host: its cores, its memory less 1 GiB, 64 GiB of disk; secure sandboxes are required", () => {
  const config = loadConfig({});
  assert.equal(config.maxCpuCount, os.availableParallelism());
  assert.equal(config.maxMemoryMB, Math.floor(os.totalmem() / 1024 / 1024) - 1024);
  assert.equal(config.maxDiskMB, 65536);
  assert.equal(config.requireSecure, true);
  assert.equal(defaultMaxMemoryMB(1024 * 1024 * 1024), 512, "a small host still allows 512 MiB");
});

test("create limits and CUBICLE_REQUIRE_SECURE from the environment; nonsense is refused at start", () => {
  const config = loadConfig({ CUBICLE_MAX_CPU_COUNT: "4", CUBICLE_MAX_MEMORY_MB: "2048", CUBICLE_MAX_DISK_MB: "1024", CUBICLE_REQUIRE_SECURE: "false" });
  assert.deepEqual([config.maxCpuCount, config.maxMemoryMB, config.maxDiskMB, config.requireSecure], [4, 2048, 1024, false]);
  assert.equal(loadConfig({ CUBICLE_REQUIRE_SECURE: "0" }).requireSecure, false);
  assert.equal(loadConfig({ CUBICLE_REQUIRE_SECURE: "yes" }).requireSecure, true);
  assert.throws(() => loadConfig({ CUBICLE_MAX_CPU_COUNT: "0" }), /CUBICLE_MAX_CPU_COUNT/);
  assert.throws(() => loadConfig({ CUBICLE_MAX_MEMORY_MB: "64" }), /CUBICLE_MAX_MEMORY_MB/);
  assert.throws(() => loadConfig({ CUBICLE_MAX_DISK_MB: "lots" }), /CUBICLE_MAX_DISK_MB/);
  assert.throws(() => loadConfig({ CUBICLE_REQUIRE_SECURE: "maybe" }), /CUBICLE_REQUIRE_SECURE/);
});
