import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { prepareGuestAssets } from "./guest-assets.js";
import { buildQemuArgv, kernelCommandLine, macAddressFrom, probeKvm, type MicrovmConfig } from "./qemu.js";
import { guestSkipReason, localKernelDeb } from "./test-helpers.js";

const config: MicrovmConfig = {
  accel: "tcg",
  assets: { kernel: "/k/vmlinuz", initramfs: "/k/initramfs.cpio" },
  memoryMiB: 512,
  cpuCount: 2,
  rootDisk: "/s/root.qcow2",
  kitDisk: "/c/kit.ext4",
  network: { tapName: "tap0", macAddress: "02:aa:bb:cc:dd:ee", address: "10.88.0.2", prefixLength: 30, gateway: "10.88.0.1" },
  hostname: "e2b.local",
  launchFile: "/s/launch",
  runDir: "/s/run",
};

function optionValues(argv: string[], option: string): string[] {
  return argv.flatMap((arg, i) => (arg === option ? [argv[i + 1]!] : []));
}

test("the QEMU argv: microvm, TCG with a bounded translation cache, the disks by serial, the tap, QMP, daemonized", () => {
  const argv = buildQemuArgv(config);
  assert.equal(argv[0], "qemu-system-x86_64");
  assert.deepEqual(optionValues(argv, "-M"), ["microvm"]);
  assert.deepEqual(optionValues(argv, "-accel"), ["tcg,tb-size=64"]);
  assert.deepEqual(optionValues(argv, "-m"), ["512M"]);
  assert.deepEqual(optionValues(argv, "-smp"), ["2"]);
  assert.deepEqual(optionValues(argv, "-device"), [
    "virtio-blk-device,drive=root,serial=cubicle-root",
    "virtio-blk-device,drive=kit,serial=cubicle-kit",
    "virtio-rng-device,rng=rng",
    "virtio-net-device,netdev=net,mac=02:aa:bb:cc:dd:ee",
  ]);
  assert.ok(optionValues(argv, "-drive")[1]!.includes("readonly=on"));
  assert.deepEqual(optionValues(argv, "-netdev"), ["tap,id=net,ifname=tap0,script=no,downscript=no"]);
  assert.deepEqual(optionValues(argv, "-qmp"), ["unix:/s/run/qmp.sock,server=on,wait=off"]);
  assert.deepEqual(optionValues(argv, "-fw_cfg"), ["name=opt/cubicle/launch,file=/s/launch"]);
  for (const flag of ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-daemonize"]) assert.ok(argv.includes(flag), flag);
  assert.deepEqual(optionValues(argv, "-append"), ["console=ttyS0 quiet panic=-1 reboot=t cubicle.ip=10.88.0.2/30 cubicle.gw=10.88.0.1 cubicle.host=e2b.local"]);
  const kvm = buildQemuArgv({ ...config, accel: "kvm" });
  assert.deepEqual(optionValues(kvm, "-accel"), ["kvm"]);
  assert.deepEqual(optionValues(kvm, "-cpu"), ["host"]);
});

test("refuses what QEMU's option syntax or the guest's command line would misread", () => {
  assert.throws(() => buildQemuArgv({ ...config, rootDisk: "/s/a,format=raw" }), /comma/);
  assert.throws(() => buildQemuArgv({ ...config, cpuCount: 0 }), /cpuCount/);
  assert.throws(() => buildQemuArgv({ ...config, memoryMiB: 64 }), /memoryMiB/);
  assert.throws(() => buildQemuArgv({ ...config, network: { ...config.network!, tapName: "tap0,script=/x" } }), /tap name/);
  assert.throws(() => kernelCommandLine({ hostname: "a b init=/bin/sh" }), /kernel argument/);
  assert.equal(macAddressFrom("0123456789abcdef"), "02:01:23:45:67:89");
});

test("probeKvm answers no at once where KVM cannot run a guest", async (t) => {
  const reason = await guestSkipReason();
  if (reason) return t.skip(reason);
  const dir = await mkdtemp(path.join(os.tmpdir(), "cbm-probe-"));
  try {
    const assets = await prepareGuestAssets(dir, { kernelDeb: await localKernelDeb() });
    const result = await probeKvm(assets);
    console.log(`probeKvm: ${JSON.stringify(result)}`);
    if (existsSync("/dev/kvm")) {
      // A host with KVM: whichever the answer, it must come within the probe's timeout.
      assert.ok(result.ms < 15_000);
    } else {
      assert.equal(result.usable, false);
      assert.match(result.reason, /QEMU exited/);
      assert.ok(result.ms < 5000, `answered in ${result.ms} ms`);
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
