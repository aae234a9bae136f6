import { test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { runAsUser } from "./as-user.js";
import type { AgentUser } from "./users.js";

const isRoot = process.geteuid?.() === 0;
const user: AgentUser = { name: "t1598", uid: 1598, gid: 1598, groups: [1598, 1597], home: "/tmp", shell: "/bin/sh" };

test("the callback runs with the user's uid, gid and groups, and root is restored afterwards", { skip: !isRoot && "needs root" }, () => {
  const seen = runAsUser(user, () => ({ euid: process.geteuid!(), egid: process.getegid!(), groups: process.getgroups!() }));
  assert.equal(seen.euid, 1598);
  assert.equal(seen.egid, 1598);
  // getgroups() also lists the effective gid; root's group 0 must be gone.
  assert.deepEqual([...new Set(seen.groups)].sort(), [1597, 1598]);
  assert.equal(process.geteuid!(), 0);
  assert.equal(process.getegid!(), 0);
  assert.deepEqual([...new Set(process.getgroups!())], [0]);
});

test("root is restored when the callback throws", { skip: !isRoot && "needs root" }, () => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), "as-user-"));
  fs.chmodSync(directory, 0o700);
  assert.throws(() => runAsUser(user, () => fs.readdirSync(directory)), /EACCES/);
  assert.equal(process.geteuid!(), 0);
  assert.deepEqual(fs.readdirSync(directory), []);
  fs.rmSync(directory, { recursive: true });
});

test("an asynchronous callback is refused", { skip: !isRoot && "needs root" }, () => {
  assert.throws(() => runAsUser(user, async () => 1), /must be synchronous/);
  assert.equal(process.geteuid!(), 0);
});

test("files created inside belong to the user", { skip: !isRoot && "needs root" }, () => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), "as-user-"));
  fs.chmodSync(directory, 0o777);
  runAsUser(user, () => fs.writeFileSync(path.join(directory, "mine"), "x"));
  const stats = fs.statSync(path.join(directory, "mine"));
  assert.equal(stats.uid, 1598);
  assert.equal(stats.gid, 1598);
  fs.rmSync(directory, { recursive: true });
});
