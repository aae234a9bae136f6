import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readdir, rm, stat, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { runCommand } from "../../shared/exec.js";
import { SandboxHelper } from "../container/sandbox-helper.js";
import { createOverlay } from "./disk-images.js";
import { prepareGuestAssets } from "./guest-assets.js";
import { buildQemuArgv, helperLauncher, hostTscKhz, kernelCommandLine, MICROVM_UID_COUNT, MICROVM_UID_START, nsenterLauncher, prepareGuestChroot, probeKvm, startMicrovm, type Microvm, type MicrovmConfig } from "./qemu.js";
import { builtHelper, guestSkipReason, localKernelDeb, makeTestNetwork, releaseTestNetwork } from "./test-helpers.js";

/** The host's Debian 12 QEMU (7.2), and a private tree's QEMU 10 (QEMU_INSTALL_NOTE). */
const qemu72 = { binary: "qemu-system-x86_64", version: { major: 7, minor: 2 } };
const qemu10 = { binary: "/q/usr/bin/qemu-system-x86_64", dataDir: "/q/usr/share/qemu", version: { major: 10, minor: 0 } };

const config: MicrovmConfig = {
  qemu: qemu72,
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
  tscKhz: 2096010,
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
  assert.deepEqual(optionValues(argv, "-append"), ["console=ttyS0 quiet panic=-1 reboot=t tsc_early_khz=2096010 cubicle.ip=10.88.0.2/30 cubicle.gw=10.88.0.1 cubicle.host=e2b.local"]);
  const kvm = buildQemuArgv({ ...config, accel: "kvm" });
  assert.deepEqual(optionValues(kvm, "-accel"), ["kvm"]);
  assert.deepEqual(optionValues(kvm, "-cpu"), ["host"]);
  assert.doesNotMatch(optionValues(kvm, "-append")[0]!, /tsc_early_khz/, "KVM guests have kvmclock");
  assert.deepEqual(optionValues(argv, "-L"), [], "the host's QEMU finds its own firmware");
  const privateTree = buildQemuArgv({ ...config, qemu: qemu10 });
  assert.equal(privateTree[0], "/q/usr/bin/qemu-system-x86_64");
  assert.deepEqual(optionValues(privateTree, "-L"), ["/q/usr/share/qemu"], "a private tree's firmware goes with its binary");
});

test("guest RAM as a file (MICROVM_RAM_NOTE): a guest's own, mapped shared; an image's, opened read-only and mapped private", () => {
  const own = buildQemuArgv({ ...config, qemu: qemu10, ram: { file: "/r/sb1.ram", mode: "shared" } });
  assert.deepEqual(optionValues(own, "-object").filter((value) => value.startsWith("memory-backend")), ["memory-backend-file,id=ram,size=512M,mem-path=/r/sb1.ram,share=on"]);
  assert.deepEqual(optionValues(own, "-machine"), ["memory-backend=ram"]);
  const image = buildQemuArgv({ ...config, qemu: qemu10, incoming: true, ram: { file: "/i/snap/ram", mode: "image" } });
  assert.deepEqual(optionValues(image, "-object").filter((value) => value.startsWith("memory-backend")), ["memory-backend-file,id=ram,size=512M,mem-path=/i/snap/ram,share=off,readonly=on,rom=off"]);
  // Shares keep the guest's own RAM file (vhost-user maps it) instead of a memfd.
  const shared = buildQemuArgv({ ...config, qemu: qemu10, ram: { file: "/r/sb1.ram", mode: "shared" }, shares: [{ tag: "volume-0", socket: "/s/v.sock" }] });
  assert.deepEqual(optionValues(shared, "-object").filter((value) => value.startsWith("memory-backend")), ["memory-backend-file,id=ram,size=512M,mem-path=/r/sb1.ram,share=on"]);
  assert.throws(() => buildQemuArgv({ ...config, ram: { file: "/i/ram", mode: "image" }, shares: [{ tag: "v", socket: "/s/v.sock" }] }), /shared/);
  assert.throws(() => buildQemuArgv({ ...config, ram: { file: "relative.ram", mode: "shared" } }), /absolute/);
  assert.throws(() => buildQemuArgv({ ...config, ram: { file: "/r/a,share=on", mode: "image" } }), /comma/);
});

test("refuses what QEMU's option syntax or the guest's command line would misread", () => {
  assert.throws(() => buildQemuArgv({ ...config, rootDisk: "/s/a,format=raw" }), /comma/);
  assert.throws(() => buildQemuArgv({ ...config, cpuCount: 0 }), /cpuCount/);
  assert.throws(() => buildQemuArgv({ ...config, memoryMiB: 64 }), /memoryMiB/);
  assert.throws(() => buildQemuArgv({ ...config, network: { ...config.network!, tapName: "tap0,script=/x" } }), /tap name/);
  assert.throws(() => kernelCommandLine({ hostname: "a b init=/bin/sh" }), /kernel argument/);
  assert.equal(hostTscKhz("processor\t: 0\ncpu MHz\t\t: 2096.013\n"), 2096013);
  assert.equal(hostTscKhz("processor\t: 0\n"), undefined);
});

test("shares: the guest's RAM a shared memfd and one vhost-user-fs device per share, by tag; bad tags and sockets refused", () => {
  const plain = buildQemuArgv(config);
  assert.equal(optionValues(plain, "-chardev").length, 0);
  assert.ok(!plain.some((arg) => arg.startsWith("memory-backend")), "no shared memory without shares");
  assert.equal(optionValues(plain, "-global").length, 0);
  const argv = buildQemuArgv({ ...config, shares: [{ tag: "volume-0", socket: "/s/volume-0.sock" }, { tag: "codebase-0", socket: "/s/codebase-0.sock" }] });
  assert.deepEqual(optionValues(argv, "-object").filter((value) => value.startsWith("memory-backend")), ["memory-backend-memfd,id=ram,size=512M,share=on"]);
  assert.deepEqual(optionValues(argv, "-machine"), ["memory-backend=ram"]);
  assert.deepEqual(optionValues(argv, "-global"), ["virtio-mmio.force-legacy=false"], "vhost-user needs modern virtio transports");
  assert.deepEqual(optionValues(argv, "-chardev"), ["socket,id=fs0,path=/s/volume-0.sock", "socket,id=fs1,path=/s/codebase-0.sock"]);
  assert.deepEqual(optionValues(argv, "-device").slice(-2), ["vhost-user-fs-device,chardev=fs0,tag=volume-0", "vhost-user-fs-device,chardev=fs1,tag=codebase-0"]);
  assert.throws(() => buildQemuArgv({ ...config, shares: [{ tag: "a,b", socket: "/s/x.sock" }] }), /share tag/);
  assert.throws(() => buildQemuArgv({ ...config, shares: [{ tag: "a", socket: "/s/x.sock,server=on" }] }), /comma/);
});

test("a QEMU made to load a state starts stopped and waits for it (MICROVM_STATE_NOTE)", () => {
  const argv = buildQemuArgv({ ...config, incoming: true });
  assert.ok(argv.includes("-S"));
  assert.deepEqual(optionValues(argv, "-incoming"), ["defer"]);
  assert.ok(!buildQemuArgv(config).includes("-incoming"));
});

test("a guest's chroot holds its root disk under its own path, as its uid's, and a channel of root's; a load's own directory is its uid's (MICROVM_STATE_NOTE)", async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), "cbm-chroot-"));
  try {
    const uid = MICROVM_UID_START + 9;
    const disk = path.join(dir, "guest", "root.qcow2");
    await mkdir(path.dirname(disk));
    await writeFile(disk, "disk");
    const chroot = path.join(dir, "guest", "chroot");
    const channel = await prepareGuestChroot(chroot, disk, uid, { incoming: true });
    assert.deepEqual(channel, { hostDir: path.join(chroot, "state"), qemuDir: "/state" });
    const inside = await stat(path.join(chroot, disk));
    assert.equal(inside.ino, (await stat(disk)).ino, "the same file under its host path");
    assert.equal(inside.uid, uid);
    assert.equal(inside.mode & 0o777, 0o600);
    assert.equal((await stat(chroot)).uid, 0);
    assert.equal((await stat(chroot)).mode & 0o777, 0o555);
    assert.equal((await stat(channel.hostDir)).uid, 0);
    assert.equal((await stat(channel.hostDir)).mode & 0o777, 0o711);
    assert.equal((await stat(path.join(channel.hostDir, "incoming"))).uid, uid);
    await prepareGuestChroot(chroot, disk, uid);
    assert.deepEqual(await readdir(channel.hostDir), [], "no load directory unless asked");
    await assert.rejects(prepareGuestChroot(chroot, "relative.qcow2", uid), /absolute/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("a confined QEMU gets the seccomp filter, its own uid and gid and a chroot of its own (QEMU_CONFINE_NOTE); bad ones are refused", () => {
  const uid = MICROVM_UID_START + 7;
  const argv = buildQemuArgv({ ...config, confine: { uid, gid: uid, chrootDir: "/var/lib/cubicle/microvm/empty" } });
  const after = (flag: string) => argv[argv.indexOf(flag) + 1];
  assert.equal(after("-sandbox"), "on,obsolete=deny,elevateprivileges=allow,spawn=allow,resourcecontrol=deny");
  assert.equal(after("-runas"), `${uid}:${uid}`);
  assert.equal(after("-chroot"), "/var/lib/cubicle/microvm/empty");
  assert.ok(!buildQemuArgv(config).includes("-runas"), "unconfined unless asked");
  // QEMU 9.1+ has one option for both (-runas and -chroot are gone).
  const newer = buildQemuArgv({ ...config, qemu: qemu10, confine: { uid, gid: uid, chrootDir: "/var/lib/cubicle/microvm/empty" } });
  assert.deepEqual(optionValues(newer, "-run-with"), [`chroot=/var/lib/cubicle/microvm/empty,user=${uid}:${uid}`]);
  assert.ok(!newer.includes("-runas") && !newer.includes("-chroot"));
  assert.ok(!buildQemuArgv({ ...config, qemu: qemu10 }).includes("-run-with"), "unconfined unless asked");
  for (const bad of [0, 1000, MICROVM_UID_START - 1, MICROVM_UID_START + MICROVM_UID_COUNT, 1.5]) {
    assert.throws(() => buildQemuArgv({ ...config, confine: { uid: bad, gid: uid, chrootDir: "/empty" } }), /uid\/gid/, String(bad));
  }
  assert.throws(() => buildQemuArgv({ ...config, confine: { uid, gid: uid, chrootDir: "relative" } }), /chroot/);
  assert.throws(() => buildQemuArgv({ ...config, confine: { uid, gid: uid, chrootDir: "/a,b" } }), /chroot/);
  assert.ok(MICROVM_UID_START + MICROVM_UID_COUNT <= 2 ** 30, "below the containers' ranges");
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

test("startMicrovm runs QEMU inside the sandbox's netns, through nsenter or the resident helper", async (t) => {
  const reason = await guestSkipReason();
  if (reason) return t.skip(reason);
  if (!builtHelper()) return t.skip("dist/sandbox-helper is missing: run `node scripts/build.mjs` first");
  const dir = await mkdtemp(path.join(os.tmpdir(), "cbm-launch-"));
  const network = await makeTestNetwork("l", 219);
  const helper = new SandboxHelper(builtHelper()!);
  const vms: Microvm[] = [];
  try {
    const assets = await prepareGuestAssets(path.join(dir, "assets"), { kernelDeb: await localKernelDeb() });
    const disk = path.join(dir, "disk.ext4");
    await runCommand(["mke2fs", "-q", "-F", "-t", "ext4", disk, "16M"]);
    await createOverlay(disk, path.join(dir, "root.qcow2"));
    const netnsInode = (await stat(network.netnsPath)).ino;
    for (const [name, launcher] of [["nsenter", nsenterLauncher], ["helper", helperLauncher(helper)]] as const) {
      // Paused before the first instruction: QEMU is set up, the guest costs no CPU.
      const vm = await startMicrovm(
        { accel: "tcg", assets, memoryMiB: 128, cpuCount: 1, rootDisk: path.join(dir, "root.qcow2"), kitDisk: disk, runDir: path.join(dir, name), netnsPath: network.netnsPath, startPaused: true },
        { launcher },
      );
      vms.push(vm);
      assert.equal(await vm.status(), "prelaunch");
      assert.equal((await stat(`/proc/${vm.pid}/ns/net`)).ino, netnsInode, `${name}: QEMU runs in the sandbox's netns`);
      await vm.quit();
      assert.equal(existsSync(`/proc/${vm.pid}`), false);
    }
    // A QEMU that cannot start says why.
    await assert.rejects(
      startMicrovm({ accel: "tcg", assets, memoryMiB: 128, cpuCount: 1, rootDisk: path.join(dir, "missing.qcow2"), kitDisk: disk, runDir: path.join(dir, "bad"), startPaused: true }),
      /QEMU did not start: .*missing\.qcow2/,
    );
  } finally {
    for (const vm of vms) vm.kill();
    helper.close();
    await releaseTestNetwork(network);
    await rm(dir, { recursive: true, force: true });
  }
});
