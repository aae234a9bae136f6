import assert from "node:assert/strict";
import { after, test } from "node:test";
import { runCommand } from "../shared/exec.js";
import { NftShell } from "./nft-shell.js";

const isRoot = process.getuid?.() === 0;
const table = `cubicle_shell_${process.pid.toString(36)}`;
const shell = new NftShell();

after(async () => {
  shell.close();
  if (isRoot) await runCommand(["nft", "delete", "table", "inet", table], { allowFailure: true });
});

test("a multi-line script is one atomic transaction; a failing one changes nothing and the shell goes on", { skip: !isRoot && "needs root" }, async () => {
  await shell.run(`table inet ${table} {\n  set s {\n    type ipv4_addr; flags interval\n  }\n}\n`);
  await assert.rejects(shell.run(`add element inet ${table} s { 192.0.2.1 }\nadd element inet ${table} nosuch { 192.0.2.2 }\n`), /nftables refused a change: Error: No such file or directory/);
  let listing = await shell.run(`list set inet ${table} s`);
  assert.doesNotMatch(listing, /192\.0\.2\.1/);
  await shell.run(`add element inet ${table} s { 192.0.2.1 }\n# a comment\n\nadd element inet ${table} s { 198.51.100.0/24 }`);
  listing = await shell.run(`list set inet ${table} s`);
  assert.match(listing, /192\.0\.2\.1/);
  assert.match(listing, /198\.51\.100\.0\/24/);
});

test("transactions queue in order, and a killed nft is replaced", { skip: !isRoot && "needs root" }, async () => {
  await shell.run(`add table inet ${table}\nadd set inet ${table} q { type ipv4_addr; }`);
  const runs = Array.from({ length: 50 }, (_, i) => shell.run(`add element inet ${table} q { 203.0.113.${i} }`));
  await Promise.all(runs);
  assert.equal(((await shell.run(`list set inet ${table} q`)).match(/203\.0\.113\.\d+/g) ?? []).length, 50);
  // Kill the resident nft behind the shell's back: the next transaction starts a new one.
  const pids = (await runCommand(["pgrep", "-P", String(process.pid), "-x", "nft"], { allowFailure: true })).stdout.trim().split("\n").filter(Boolean);
  assert.ok(pids.length >= 1, "a resident nft runs");
  for (const pid of pids) process.kill(Number(pid), "SIGKILL");
  await new Promise((resolve) => setTimeout(resolve, 100));
  await shell.run(`add element inet ${table} q { 203.0.113.200 }`);
  assert.match(await shell.run(`list set inet ${table} q`), /203\.0\.113\.200/);
});
