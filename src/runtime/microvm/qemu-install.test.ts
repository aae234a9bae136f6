import assert from "node:assert/strict";
import { chmod, mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { parseQemuVersion, qemuInstall, sharesRamImages, versionAtLeast } from "./qemu-install.js";

test("QEMU versions: parsed from --version, compared, and what they can do (QEMU_INSTALL_NOTE)", () => {
  assert.deepEqual(parseQemuVersion("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright"), { major: 10, minor: 0 });
  assert.deepEqual(parseQemuVersion("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"), { major: 7, minor: 2 });
  assert.deepEqual(parseQemuVersion("bash: qemu: not found"), { major: 0, minor: 0 });
  assert.ok(versionAtLeast({ major: 9, minor: 1 }, 9, 1) && versionAtLeast({ major: 10, minor: 0 }, 9, 1) && !versionAtLeast({ major: 9, minor: 0 }, 9, 1));
  assert.equal(sharesRamImages({ binary: "q", version: { major: 8, minor: 2 } }), true);
  assert.equal(sharesRamImages({ binary: "q", version: { major: 7, minor: 2 } }), false);
});

test("the recorded private tree is found through the state directory, with its firmware; CUBICLE_QEMU wins", async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), "cbm-qemu-install-"));
  try {
    const root = path.join(dir, "qemu", "root");
    const binary = path.join(root, "usr", "bin", "qemu-system-x86_64");
    await mkdir(path.dirname(binary), { recursive: true });
    await mkdir(path.join(root, "usr", "share", "qemu"), { recursive: true });
    await writeFile(path.join(root, "usr", "share", "qemu", "qboot.rom"), "");
    await writeFile(binary, "#!/bin/sh\necho 'QEMU emulator version 10.0.2 (test)'\n");
    await chmod(binary, 0o755);
    await writeFile(path.join(dir, "qemu", "path"), binary + "\n");
    const found = qemuInstall({ CUBICLE_STATE_DIR: dir });
    assert.deepEqual(found, { binary, dataDir: path.join(root, "usr", "share", "qemu"), version: { major: 10, minor: 0 } });
    const explicit = qemuInstall({ CUBICLE_STATE_DIR: dir, CUBICLE_QEMU: "/nonexistent/qemu" });
    assert.equal(explicit.binary, "/nonexistent/qemu");
    assert.deepEqual(explicit.version, { major: 0, minor: 0 }, "a binary that does not run has no features");
    // A recorded binary that is gone is skipped.
    await rm(binary);
    assert.notEqual(qemuInstall({ CUBICLE_STATE_DIR: dir }).binary, binary);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
