import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { createNetworkManager } from "../../network/index.js";
import type { NetworkManager } from "../../network/types.js";
import { defaultRunDir } from "../../shared/config.js";
import type { SandboxSpec } from "../types.js";
import { identityFiles, identityFor, newBootId, newMachineId, validBootId, validMachineId } from "./boot-identity.js";
import { ContainerRuntime } from "./container-runtime.js";
import { agentGet, cleanUpRuntimeTest, waitForAgentHealth } from "./test-helpers.js";

const repoRoot = path.join(import.meta.dirname, "..", "..", "..");
const sandboxBoot = path.join(repoRoot, "dist", "sandbox-boot");

test("new ids have the kernel's and systemd's formats and differ every time", () => {
  const bootIds = new Set(Array.from({ length: 50 }, newBootId));
  const machineIds = new Set(Array.from({ length: 50 }, newMachineId));
  assert.equal(bootIds.size, 50);
  assert.equal(machineIds.size, 50);
  for (const id of bootIds) assert.equal(validBootId(id), id);
  for (const id of machineIds) assert.equal(validMachineId(id), id);
});

test("damaged or hostile recorded ids are not ids", () => {
  for (const bad of [undefined, null, 42, "", "\n", "../../etc/passwd\n", "0123456789abcdef0123456789abcdef", "0123456789ABCDEF0123456789ABCDEF\n", "00000000000000000000000000000000\n", "0123456789abcdef0123456789abcdef\nextra\n"]) {
    assert.equal(validMachineId(bad), undefined, JSON.stringify(bad));
  }
  for (const bad of [undefined, 7, "", "1b4e28ba-2fa1-41d2-883f-0016d3cca427", "1b4e28ba-2fa1-41d2-883f-0016d3cca427\n\n", "1b4e28ba2fa141d2883f0016d3cca427\n", "x".repeat(36) + "\n"]) {
    assert.equal(validBootId(bad), undefined, JSON.stringify(bad));
  }
});

test("the same machine keeps its machine id, and its boot id only when its processes come back; anything else is new", () => {
  const recorded = { bootId: newBootId(), machineId: newMachineId() };
  const resumed = identityFor({ kind: "image", memory: true, sameMachine: true, recorded });
  assert.deepEqual(resumed, recorded, "a resume or rollback with memory did not reboot");
  const rebooted = identityFor({ kind: "image", memory: false, sameMachine: true, recorded });
  assert.equal(rebooted.machineId, recorded.machineId, "a filesystem-only resume is the same machine");
  assert.notEqual(rebooted.bootId, recorded.bootId, "… booted again");
  for (const memory of [true, false]) {
    const copy = identityFor({ kind: "image", memory, sameMachine: false, recorded });
    assert.notEqual(copy.bootId, recorded.bootId, "a fork or a create from a snapshot is another machine");
    assert.notEqual(copy.machineId, recorded.machineId);
  }
  const fresh = [identityFor({ kind: "fresh" }), identityFor({ kind: "fresh" })];
  assert.notEqual(fresh[0]!.bootId, fresh[1]!.bootId);
  assert.notEqual(fresh[0]!.machineId, fresh[1]!.machineId);
  // Images made before ids were recorded, or with damaged ones, get new ones.
  const old = identityFor({ kind: "image", memory: true, sameMachine: true, recorded: {} });
  assert.ok(validBootId(old.bootId) && validMachineId(old.machineId));
  const damaged = identityFor({ kind: "image", memory: true, sameMachine: true, recorded: { bootId: "../x\n", machineId: "zz\n" } });
  assert.ok(validBootId(damaged.bootId) && validMachineId(damaged.machineId));
});

test("sandbox-boot refuses a bad call, and never execs the init without a boot id to bind", { skip: !existsSync(sandboxBoot) ? "build it first (node scripts/build.mjs)" : process.getuid?.() !== 0 ? "needs root" : false }, () => {
  const usage = spawnSync(sandboxBoot, ["/bin/echo", "ran"], { encoding: "utf8" });
  assert.equal(usage.status, 2);
  assert.match(usage.stderr, /usage/);
  assert.equal(usage.stdout, "");
  // On the host (in a private mount namespace, should anything be mounted) there is no
  // /.cubicle/boot-id: it stops before the exec, with the reason.
  const missing = spawnSync("unshare", ["--mount", "--propagation", "private", sandboxBoot, "--", "/bin/echo", "ran"], { encoding: "utf8" });
  assert.equal(missing.status, 1, missing.stderr);
  assert.match(missing.stderr, /sandbox-boot: \/\.cubicle\/boot-id: No such file or directory/);
  assert.equal(missing.stdout, "");
});

// Real sandboxes (root, CRIU from scripts/setup-host.sh, a shifted template rootfs).
const rootfsDir = process.env.CUBICLE_TEST_ROOTFS;
const criuInstalled = existsSync("/var/lib/cubicle/criu/path") || Boolean(process.env.CUBICLE_CRIU);
const skip = process.getuid?.() !== 0 ? "needs root" : !rootfsDir ? "set CUBICLE_TEST_ROOTFS to a shifted rootfs" : !criuInstalled ? "CRIU is not set up (scripts/setup-host.sh)" : false;

const tag = `b${process.pid.toString(36)}${Date.now().toString(36).slice(-3)}`;
const tableName = `cubicle_boot_${tag}`;

/** What a sandbox says about itself. */
interface Seen {
  bootId: string;
  machineId: string;
  uptimeSec: number;
  /** CapInh/CapPrm/CapEff/CapBnd/CapAmb of PID 1 and of a fresh process, as numbers. */
  caps: bigint[];
}

const PROBE = [
  "cat /proc/sys/kernel/random/boot_id /etc/machine-id",
  "cut -d' ' -f1 /proc/uptime",
  "grep -h '^Cap' /proc/1/status /proc/self/status | cut -f2",
].join("; ");

describe("the identity of container sandboxes", { skip }, () => {
  let stateDir: string;
  let runtime: ContainerRuntime;
  let network: NetworkManager;
  let counter = 0;
  const hostBootId = () => readFile("/proc/sys/kernel/random/boot_id", "utf8");

  before(async () => {
    stateDir = await mkdtemp(path.join(os.tmpdir(), "cubicle-boot-test-"));
    network = createNetworkManager({ subnet: `10.79.${process.pid % 250}.0/24` }, { tableName, netnsPrefix: `cubicle-${tag}-` });
    await network.init();
    runtime = new ContainerRuntime(
      { stateDir, distDir: path.join(repoRoot, "dist"), runcPath: "runc", runDir: defaultRunDir(stateDir), storageBytes: 4 * 1024 ** 3 },
      { agentScript: path.join(repoRoot, "test", "runtime-dev", "health-agent.cjs") },
    );
    await runtime.init();
  });

  after(() => cleanUpRuntimeTest({ runtime, network, tableName, stateDir }));

  async function specFor(id: string): Promise<SandboxSpec> {
    const net = await network.allocate(id, { allowInternetAccess: false });
    return {
      sandboxId: id,
      hostname: `sb-${id}`,
      template: { templateId: "base", rootfsDir: rootfsDir!, defaultUser: "root", defaultWorkdir: "/", env: {} },
      resources: { cpuCount: 1, memoryMiB: 256, diskMiB: 0, pidsLimit: 200 },
      network: net,
    };
  }

  async function sh(id: string, script: string): Promise<{ exitCode: number; stdout: string; stderr: string }> {
    const res = await agentGet(addresses.get(id)!, `/run?argv=${encodeURIComponent(JSON.stringify(["sh", "-c", script]))}`, { timeoutMs: 15_000 });
    return JSON.parse(res.body);
  }

  const addresses = new Map<string, string>();

  async function boot(): Promise<string> {
    const spec = await specFor(`${tag}s${counter++}`);
    await runtime.create(spec);
    addresses.set(spec.sandboxId, spec.network.sandboxAddress);
    await waitForAgentHealth(spec.network.sandboxAddress);
    return spec.sandboxId;
  }

  async function restore(imageId: string, sameMachine: boolean): Promise<string> {
    const spec = await specFor(`${tag}r${counter++}`);
    await runtime.restore({ ...spec, sameMachine }, imageId);
    addresses.set(spec.sandboxId, spec.network.sandboxAddress);
    await waitForAgentHealth(spec.network.sandboxAddress);
    return spec.sandboxId;
  }

  async function remove(id: string): Promise<void> {
    await runtime.destroy(id);
    await network.release(id);
  }

  async function seen(id: string): Promise<Seen> {
    const result = await sh(id, PROBE);
    assert.equal(result.exitCode, 0, result.stderr);
    const [bootId, machineId, uptime, ...caps] = result.stdout.split("\n").filter(Boolean);
    return { bootId: `${bootId}\n`, machineId: `${machineId}\n`, uptimeSec: Number(uptime), caps: caps.map((hex) => BigInt(`0x${hex}`)) };
  }

  test("every sandbox boots with its own boot id, machine id and clocks, none of them the host's, and without the boot capabilities", async () => {
    const started = performance.now();
    const ids = [await boot(), await boot()];
    try {
      const [a, b] = await Promise.all(ids.map(seen));
      const host = await hostBootId();
      assert.ok(validBootId(a!.bootId) && validBootId(b!.bootId), `${a!.bootId} ${b!.bootId}`);
      assert.ok(validMachineId(a!.machineId) && validMachineId(b!.machineId), `${a!.machineId} ${b!.machineId}`);
      assert.notEqual(a!.bootId, b!.bootId);
      assert.notEqual(a!.machineId, b!.machineId);
      for (const sandbox of [a!, b!]) {
        assert.notEqual(sandbox.bootId, host);
        if (existsSync("/etc/machine-id")) assert.notEqual(sandbox.machineId, await readFile("/etc/machine-id", "utf8"));
        // Uptime counts from the sandbox's boot, not the host's.
        assert.ok(sandbox.uptimeSec * 1000 <= performance.now() - started + 50, `uptime ${sandbox.uptimeSec} s`);
        // CAP_SYS_ADMIN (21) and CAP_SYS_TIME (25) are gone from every set of every process.
        assert.equal(sandbox.caps.length, 10);
        for (const set of sandbox.caps) assert.equal(set & ((1n << 21n) | (1n << 25n)), 0n, `capability set ${set.toString(16)}`);
      }
      // What the sandbox shows is what its bundle holds.
      const files = identityFiles(runtime.bundleDir(ids[0]!));
      assert.equal(await readFile(files.bootId, "utf8"), a!.bootId);
      assert.equal(await readFile(files.machineId, "utf8"), a!.machineId);
    } finally {
      for (const id of ids) await remove(id);
    }
  });

  test("restores: the same machine keeps its ids and clocks, a new machine gets new ids, a filesystem-only image reboots", async () => {
    const source = await boot();
    const made: string[] = [];
    try {
      await new Promise((r) => setTimeout(r, 1500));
      const before = await seen(source);
      const memory = await runtime.checkpoint(source, { kind: "snapshot", name: `${tag}mem` }, { memory: true, leaveRunning: true });
      const files = await runtime.checkpoint(source, { kind: "snapshot", name: `${tag}fs` }, { memory: false, leaveRunning: true });

      const resumed = await restore(memory.imageId, true);
      made.push(resumed);
      const same = await seen(resumed);
      assert.equal(same.bootId, before.bootId, "a memory restore of the same machine did not reboot");
      assert.equal(same.machineId, before.machineId);
      assert.ok(same.uptimeSec >= before.uptimeSec, `the clocks go on from the dump: ${same.uptimeSec} < ${before.uptimeSec}`);

      const copies = [await restore(memory.imageId, false), await restore(memory.imageId, false)];
      made.push(...copies);
      const [first, second] = await Promise.all(copies.map(seen));
      for (const copy of [first!, second!]) {
        assert.notEqual(copy.bootId, before.bootId);
        assert.notEqual(copy.machineId, before.machineId);
        assert.ok(copy.uptimeSec >= before.uptimeSec, "restored clocks go on from the dump");
      }
      assert.notEqual(first!.bootId, second!.bootId, "two restores of one image are two machines");
      assert.notEqual(first!.machineId, second!.machineId);

      const rebootStarted = performance.now();
      const rebooted = await restore(files.imageId, true);
      made.push(rebooted);
      const boot2 = await seen(rebooted);
      assert.notEqual(boot2.bootId, before.bootId, "a filesystem-only resume is a boot");
      assert.equal(boot2.machineId, before.machineId, "of the same machine");
      assert.ok(boot2.uptimeSec * 1000 <= performance.now() - rebootStarted + 50, `uptime ${boot2.uptimeSec} s after a reboot`);

      const other = await restore(files.imageId, false);
      made.push(other);
      const otherSeen = await seen(other);
      assert.notEqual(otherSeen.bootId, before.bootId);
      assert.notEqual(otherSeen.machineId, before.machineId);
    } finally {
      for (const id of [...made, source]) await remove(id);
    }
  });

  test("an image whose recorded ids are damaged restores with new ids, not with what it says", async () => {
    const source = await boot();
    let restored: string | undefined;
    try {
      const image = await runtime.checkpoint(source, { kind: "snapshot", name: `${tag}bad` }, { memory: true, leaveRunning: true });
      const metaFile = path.join(runtime.images.dirOf(image.imageId), "meta.json");
      const meta = JSON.parse(await readFile(metaFile, "utf8"));
      await writeFile(metaFile, JSON.stringify({ ...meta, bootId: "/etc/shadow\n", machineId: "../../../etc/passwd" }));
      restored = await restore(image.imageId, true);
      const after = await seen(restored);
      assert.ok(validBootId(after.bootId) && validMachineId(after.machineId), `${after.bootId} ${after.machineId}`);
      assert.notEqual(after.machineId, (await seen(source)).machineId);
    } finally {
      if (restored) await remove(restored);
      await remove(source);
    }
  });

  test("the sandbox's root can neither change its ids nor uncover the host's", async () => {
    const ids = [await boot(), await boot()];
    try {
      const [victim, other] = ids as [string, string];
      const before = await Promise.all(ids.map(seen));
      const host = await hostBootId();
      const attempts: [string, RegExp][] = [
        ["echo 00000000-0000-0000-0000-000000000000 > /proc/sys/kernel/random/boot_id", /Read-only file system/],
        ["echo 00000000000000000000000000000001 > /etc/machine-id", /Read-only file system/],
        ["echo x > /.cubicle/boot-id", /Read-only file system/],
        ["umount /proc/sys/kernel/random/boot_id", /superuser|not permitted|denied/i],
        ["umount /etc/machine-id", /superuser|not permitted|denied/i],
        ["mount --bind /tmp /proc/sys/kernel/random", /denied|not permitted/i],
        ["rm -f /etc/machine-id", /busy|Read-only|denied/i],
        // Its own user namespace gives it CAP_SYS_ADMIN over copies of the mounts, locked together.
        ["unshare -Urm sh -c 'umount -l /proc/sys/kernel/random/boot_id || exit 1; cat /proc/sys/kernel/random/boot_id'", /./],
        // A new procfs would show the kernel's own id: refused while /proc has covered files.
        ["unshare -Urmpf --mount-proc cat /proc/sys/kernel/random/boot_id", /not permitted|denied/i],
      ];
      for (const [script, message] of attempts) {
        const result = await sh(victim, script);
        assert.notEqual(result.exitCode, 0, `${script} succeeded: ${result.stdout}`);
        assert.match(result.stderr, message, script);
        assert.ok(!result.stdout.includes(host.trim()), `${script} showed the host's boot id`);
      }
      const after = await Promise.all(ids.map(seen));
      assert.equal(after[0]!.bootId, before[0]!.bootId);
      assert.equal(after[0]!.machineId, before[0]!.machineId);
      assert.equal(after[1]!.bootId, before[1]!.bootId, "another sandbox is untouched");
      assert.equal(after[1]!.machineId, before[1]!.machineId);
      assert.equal(await hostBootId(), host, "the host's boot id is untouched");
      assert.equal(await readFile(identityFiles(runtime.bundleDir(victim)).bootId, "utf8"), before[0]!.bootId);
      assert.equal(await readFile(identityFiles(runtime.bundleDir(other)).machineId, "utf8"), before[1]!.machineId);
    } finally {
      for (const id of ids) await remove(id);
    }
  });
});
