import assert from "node:assert/strict";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { runCommand } from "../../shared/exec.js";
import { mountsBelow } from "../../shared/fs.js";
import { stopShares } from "./shares.js";

test("stopShares: a mount its teardown leaves stops it before anything is removed through it; a teardown that unmounts lets it finish", async (t) => {
  if (process.getuid?.() !== 0) return t.skip("needs root to mount");
  const dir = await mkdtemp(path.join(os.tmpdir(), "cbm-shares-"));
  const share = path.join(dir, "mounts", "volumes", "0");
  await mkdir(share, { recursive: true });
  await runCommand(["mount", "-t", "tmpfs", "-o", "size=1m", "cbm-share", share]);
  try {
    await writeFile(path.join(share, "precious"), "kept");
    // A stale pid file naming a process that is not a virtiofsd for this socket: nothing is signalled.
    await writeFile(path.join(dir, "volume-0.sock.pid"), `${process.pid}\n`);
    assert.deepEqual(await mountsBelow(dir), [share]);
    await assert.rejects(stopShares(dir, async () => undefined), /still mounted/);
    assert.equal(await readFile(path.join(share, "precious"), "utf8"), "kept");
    await stopShares(dir, async (mounts) => {
      assert.equal(mounts, path.join(dir, "mounts"));
      await runCommand(["umount", share]);
    });
    assert.deepEqual(await mountsBelow(dir), []);
  } finally {
    await runCommand(["umount", share], { allowFailure: true });
    await rm(dir, { recursive: true, force: true });
  }
});

test("mountsBelow reads mountinfo's escaped paths and does not match a sibling with the same prefix", async (t) => {
  if (process.getuid?.() !== 0) return t.skip("needs root to mount");
  const dir = await mkdtemp(path.join(os.tmpdir(), "cbm-shares-"));
  const spaced = path.join(dir, "a b");
  const sibling = `${dir}-sibling`;
  await mkdir(spaced);
  await mkdir(sibling);
  await runCommand(["mount", "-t", "tmpfs", "-o", "size=1m", "cbm-share", spaced]);
  await runCommand(["mount", "-t", "tmpfs", "-o", "size=1m", "cbm-share", sibling]);
  try {
    assert.deepEqual(await mountsBelow(dir), [spaced]);
  } finally {
    await runCommand(["umount", spaced], { allowFailure: true });
    await runCommand(["umount", sibling], { allowFailure: true });
    await rm(dir, { recursive: true, force: true });
    await rm(sibling, { recursive: true, force: true });
  }
});
