import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { ExitWatcher } from "./sandbox-helper.js";

// The static helper (`node scripts/build.mjs`, which compiles native/sandbox-helper.c).
const binary = path.join(import.meta.dirname, "..", "..", "..", "dist", "sandbox-helper");
const skip = existsSync(binary) ? false : "build the helper first (node scripts/build.mjs)";

function helper(...args: string[]): { status: number | null; stderr: string } {
  const result = spawnSync(binary, args, { encoding: "utf8" });
  return { status: result.status, stderr: result.stderr };
}

test("the helper refuses malformed calls with exit 2 and says why, before touching anything", { skip }, () => {
  const cases: [string[], RegExp][] = [
    [[], /usage/],
    [["mount-everything"], /unknown subcommand/],
    [["prepare", "--base"], /pairs/],
    [["prepare", "--base", "1073741824"], /needs --lower/],
    [["prepare", "--base", "0", "--lower", "/x", "--layer", "/y", "--rootfs", "/z", "--quota", "0"], /outside the sandbox id ranges/],
    [["prepare", "--base", "4294967295", "--lower", "/x", "--layer", "/y", "--rootfs", "/z", "--quota", "0"], /outside the sandbox id ranges/],
    [["prepare", "--base", "1073741824", "--lower", "/x", "--layer", "/y", "--rootfs", "/z", "--quota", "12x"], /--quota is not a number/],
    [["prepare", "--base", "1073741824", "--lower", "/x", "--layer", "/y", "--rootfs", "/z", "--quota", "0", "--criu-images", "/i"], /go together/],
    [["hostname", "--pid", "-1", "--name", "x"], /--pid is not a number/],
  ];
  for (const [args, message] of cases) {
    const result = helper(...args);
    assert.equal(result.status, 2, `${args.join(" ")}: ${result.stderr}`);
    assert.match(result.stderr, message, args.join(" "));
  }
});

test("a layer outside a btrfs pool is refused (exit 1, the step named) and nothing is mounted", { skip: process.getuid?.() !== 0 ? "needs root" : skip }, () => {
  const result = helper("prepare", "--base", "1073741824", "--lower", "/", "--layer", "/tmp/not-a-pool-layer", "--rootfs", "/tmp/not-a-pool-root", "--quota", "0");
  assert.equal(result.status, 1, result.stderr);
  assert.match(result.stderr, /sandbox-helper: layer: creating a layer subvolume/);
  assert.ok(!existsSync("/tmp/not-a-pool-layer"));
});

test("the exit watcher reports a watched process's end at once, and nothing for unwatched or malformed entries", { skip }, async () => {
  const ended: string[] = [];
  const watcher = new ExitWatcher(binary, (tag) => ended.push(tag));
  const sleepers = [0, 1, 2].map(() => spawn("sleep", ["30"], { stdio: "ignore" }));
  try {
    watcher.watch("first", sleepers[0]!.pid!);
    watcher.watch("second", sleepers[1]!.pid!);
    watcher.watch("bad tag with spaces", sleepers[2]!.pid!);
    watcher.watch("x".repeat(200), sleepers[2]!.pid!);
    watcher.watch("negative", -5);
    watcher.unwatch("second");
    watcher.watch("gone", 2 ** 22 + 12345);
    sleepers[0]!.kill("SIGKILL");
    sleepers[1]!.kill("SIGKILL");
    const deadline = Date.now() + 5000;
    while (ended.length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    await new Promise((r) => setTimeout(r, 200));
    assert.deepEqual(ended.sort(), ["first", "gone"], "the killed watched process and the pid that never existed");
  } finally {
    watcher.close();
    for (const sleeper of sleepers) sleeper.kill("SIGKILL");
  }
});
