// Makes a development rootfs for the container runtime: a Debian minbase tree (mmdebstrap)
// shifted into the sandbox uid range. Usage:
//   node --import tsx test/runtime-dev/prepare-rootfs.ts [/var/tmp/rtdev-rootfs]
// then run the runtime tests with CUBICLE_TEST_ROOTFS=/var/tmp/rtdev-rootfs.
import fs from "node:fs";
import { SANDBOX_UID_BASE } from "../../src/runtime/index.js";
import { runCommand } from "../../src/shared/exec.js";
import { shiftOwnership } from "../../src/template/shift-ownership.js";

const target = process.argv[2] ?? "/var/tmp/rtdev-rootfs";
if (!fs.existsSync(target)) {
  console.log(`bootstrapping ${target} with mmdebstrap …`);
  await runCommand(["mmdebstrap", "--variant=minbase", "--include=bash,coreutils,procps,iproute2", "bookworm", target], { timeoutMs: 600_000 });
}
if (fs.statSync(target).uid === 0) {
  const result = shiftOwnership(target, SANDBOX_UID_BASE);
  console.log(`shifted ${result.entries} entries into uid/gid ${SANDBOX_UID_BASE}+`);
} else {
  console.log(`${target} is already shifted (owner uid ${fs.statSync(target).uid})`);
}
