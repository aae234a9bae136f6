import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, stat } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { createNetworkManager } from "../../network/index.js";
import type { NetworkManager, SandboxNetwork } from "../../network/types.js";
import { defaultRunDir } from "../../shared/config.js";
import { mountPoints } from "../../shared/fs.js";
import { runCommand } from "../../shared/exec.js";
import { SANDBOX_UID_BASE, type SandboxSpec } from "../types.js";
import { CONTAINER_PREFIX, ContainerRuntime } from "./container-runtime.js";
import { agentGet, cleanUpRuntimeTest, waitForAgentHealth } from "./test-helpers.js";

// Real runc containers in real namespaces. Needs root and a template rootfs shifted into the
// sandbox uid range: CUBICLE_TEST_ROOTFS=/var/tmp/rtdev-rootfs (make one with
// `node --import tsx test/runtime-dev/prepare-rootfs.ts`). Without it the tests skip rather
// than bootstrap Debian (a minute and a mirror) on every run.
const rootfsDir = process.env.CUBICLE_TEST_ROOTFS;
const skip = process.getuid?.() !== 0 ? "needs root" : !rootfsDir ? "set CUBICLE_TEST_ROOTFS to a shifted rootfs (test/runtime-dev/prepare-rootfs.ts)" : false;

const tag = `r${process.pid.toString(36)}${Date.now().toString(36).slice(-4)}`;
const tableName = `cubicle_test_${tag}`;
const netnsPrefix = `cubicle-${tag}-`;
const repoRoot = path.join(import.meta.dirname, "..", "..", "..");
const agentScript = path.join(repoRoot, "test", "runtime-dev", "health-agent.cjs");
// The sandbox helper and the CRIU shim (`node scripts/build.mjs`).
const distDir = path.join(repoRoot, "dist");

let stateDir: string;
let runtime: ContainerRuntime;
let network: NetworkManager;
let counter = 0;

const get = (host: string, urlPath: string, timeoutMs = 1000) => agentGet(host, urlPath, { timeoutMs });
const waitForAgent = (host: string) => waitForAgentHealth(host, 10_000);

/**
 * Runs a command inside a sandbox through the development agent, so it has the agent's cgroup,
 * capabilities and seccomp filter. (`runc exec` 1.1.5 cannot be used: it joins the container's
 * user namespace before the host-owned netns, and setns then fails with EPERM.)
 */
async function execIn(net: SandboxNetwork, argv: string[]): Promise<{ exitCode: number; stdout: string; stderr: string }> {
  const res = await get(net.sandboxAddress, `/run?argv=${encodeURIComponent(JSON.stringify(argv))}`, 15_000);
  return JSON.parse(res.body);
}

async function newSandbox(overrides: Partial<SandboxSpec["resources"]> = {}, background = false): Promise<{ id: string; net: SandboxNetwork }> {
  const id = `${tag}s${counter++}`;
  const net = await network.allocate(id, { allowInternetAccess: false });
  await runtime.create({
    sandboxId: id,
    hostname: `sb-${id}`,
    template: { templateId: "dev", rootfsDir: rootfsDir!, defaultUser: "root", defaultWorkdir: "/", env: { LANG: "C.UTF-8" } },
    resources: { cpuCount: 1.5, memoryMiB: 256, diskMiB: 0, pidsLimit: 200, ...overrides },
    network: net,
    background,
  });
  return { id, net };
}

async function removeSandbox(id: string): Promise<void> {
  await runtime.destroy(id);
  await network.release(id);
}

/** The host uid that owns a process's user namespace (ioctl NS_GET_OWNER_UID). */
async function userNamespaceOwner(pid: number): Promise<number> {
  const script = "import fcntl,os,struct,sys\nfd=os.open(sys.argv[1],os.O_RDONLY)\nb=bytearray(4)\nfcntl.ioctl(fd,0xb704,b)\nprint(struct.unpack('I',b)[0])";
  return Number((await runCommand(["/usr/bin/python3", "-c", script, `/proc/${pid}/ns/user`])).stdout);
}

async function mountsMentioning(text: string): Promise<string[]> {
  return (await readFile("/proc/self/mountinfo", "utf8")).split("\n").filter((line) => line.includes(text));
}

describe("container runtime", { skip }, () => {
  before(async () => {
    stateDir = await mkdtemp(path.join(os.tmpdir(), "cubicle-rt-test-"));
    network = createNetworkManager({ subnet: `10.230.${process.pid % 250}.0/24` }, { tableName, netnsPrefix });
    await network.init();
    runtime = new ContainerRuntime({ stateDir, distDir, runcPath: "runc", runDir: defaultRunDir(stateDir), storageBytes: 8 * 1024 ** 3 }, { agentScript });
    await runtime.init();
  });

  after(() => cleanUpRuntimeTest({ runtime, network, tableName, stateDir }));

  test("runs the agent as the mapped root, reachable from the host at the sandbox address", async () => {
    const { id, net } = await newSandbox();
    try {
      await waitForAgent(net.sandboxAddress);
      assert.equal(await runtime.state(id), "running");
      assert.deepEqual(await runtime.list(), [id]);
      const info = JSON.parse((await get(net.sandboxAddress, "/info")).body);
      assert.equal(info.uid, 0);
      // tini is PID 1 (when the host has tini-static) and the agent its child; else the agent.
      const init = (await execIn(net, ["cat", "/proc/1/cmdline"])).stdout.split("\0");
      assert.ok(info.pid === 1 || init[0] === "/.cubicle/init", `PID 1 is ${init.join(" ")}, the agent is ${info.pid}`);
      assert.equal(info.hostname, `sb-${id}`);
      assert.equal(info.env.CUBICLE_AGENT, "1");
      // Root inside is the first uid of the sandbox's own range, far above host users.
      const uidBase = runtime.uidBaseOf(id)!;
      assert.ok(uidBase >= 2 ** 30, `uid base ${uidBase}`);
      assert.match(info.uidMap, new RegExp(`^\\s*0\\s+${uidBase}\\s+65536\\s*$`));
      // Seen from the host, the agent is that unprivileged uid.
      const container = JSON.parse((await runCommand(["runc", "state", CONTAINER_PREFIX + id])).stdout) as { pid: number };
      assert.match(await readFile(`/proc/${container.pid}/status`, "utf8"), new RegExp(`^Uid:\\s+${uidBase}\\s`, "m"));
      // A file written inside lands in the layer with the canonical id on disk (idmapped mount).
      assert.equal((await execIn(net, ["sh", "-c", "echo hi > /root/note"])).exitCode, 0);
      const note = await stat(path.join(runtime.layerDir(id), "upper", "root", "note"));
      assert.equal(note.uid, SANDBOX_UID_BASE);
      // The template's tree is untouched.
      assert.ok(!existsSync(path.join(rootfsDir!, "root", "note")));
    } finally {
      await removeSandbox(id);
    }
  });

  test("applies memory, CPU and pids limits through cgroups", async () => {
    const { id, net } = await newSandbox({ memoryMiB: 300, cpuCount: 1.5, pidsLimit: 123 });
    try {
      await waitForAgent(net.sandboxAddress);
      const dirs = runtime.cgroupDirectories(id);
      const find = (file: string) => dirs.map((d) => path.join(d, file)).find((f) => existsSync(f));
      const v2 = existsSync("/sys/fs/cgroup/cgroup.controllers");
      if (v2) {
        assert.equal((await readFile(find("memory.max")!, "utf8")).trim(), String(300 * 1024 * 1024));
        assert.equal((await readFile(find("cpu.max")!, "utf8")).trim(), "150000 100000");
        assert.equal((await readFile(find("pids.max")!, "utf8")).trim(), "123");
      } else {
        assert.equal((await readFile(find("memory.limit_in_bytes")!, "utf8")).trim(), String(300 * 1024 * 1024));
        assert.equal((await readFile(find("cpu.cfs_quota_us")!, "utf8")).trim(), "150000");
        assert.equal((await readFile(find("pids.max")!, "utf8")).trim(), "123");
      }
      // The limit is enforced: a fork bomb stops at pids.max (counted on the host).
      await execIn(net, ["sh", "-c", "for i in $(seq 300); do sleep 3 </dev/null >/dev/null 2>&1 & done; exit 0"]);
      const current = Number((await readFile(find("pids.current")!, "utf8")).trim());
      const refused = Number(/max (\d+)/.exec(await readFile(find("pids.events")!, "utf8"))?.[1] ?? 0);
      assert.ok(current <= 123 && current > 50, `pids.current ${current}`);
      assert.ok(refused > 0, "pids.events shows no refused fork");
    } finally {
      await removeSandbox(id);
    }
  });

  test("hardens the sandbox: capabilities, no_new_privs, seccomp, masked and read-only /proc, /dev", async () => {
    const { id, net } = await newSandbox();
    try {
      await waitForAgent(net.sandboxAddress);
      const status = (await execIn(net, ["cat", "/proc/self/status"])).stdout;
      // Off on purpose so that sudo works (oci-spec.ts); root inside is unprivileged outside.
      assert.match(status, /^NoNewPrivs:\s+0$/m);
      assert.match(status, /^Seccomp:\s+2$/m);
      const capEff = BigInt("0x" + /^CapEff:\s+([0-9a-f]+)$/m.exec(status)![1]);
      const CAP_SYS_ADMIN = 21n;
      const CAP_NET_ADMIN = 12n;
      assert.equal(capEff & (1n << CAP_SYS_ADMIN), 0n);
      assert.equal(capEff & (1n << CAP_NET_ADMIN), 0n);
      assert.equal((await execIn(net, ["sh", "-c", "echo 1 > /proc/sys/kernel/panic"])).exitCode !== 0, true);
      assert.equal((await execIn(net, ["cat", "/proc/kcore"])).stdout, "");
      assert.equal((await execIn(net, ["cat", "/proc/keys"])).stdout, "");
      const devices = (await execIn(net, ["ls", "/dev"])).stdout.split(/\s+/);
      for (const device of ["null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm"]) assert.ok(devices.includes(device), device);
      assert.ok(!devices.includes("vda") && !devices.includes("kmsg"));
      // The agent's stdio is /dev/null, never a host pipe (CRIU cannot dump those).
      const fds = (await execIn(net, ["ls", "-l", "/proc/1/fd/0", "/proc/1/fd/1", "/proc/1/fd/2"])).stdout;
      assert.equal((fds.match(/-> \/dev\/null/g) ?? []).length, 3, fds);
      // The kit is read-only; unprivileged ports below 1024 can be bound.
      assert.notEqual((await execIn(net, ["touch", "/.cubicle/x"])).exitCode, 0);
      const lowPort = await execIn(net, [...["/.cubicle/lib/ld-linux-x86-64.so.2", "--library-path", "/.cubicle/lib", "/.cubicle/node"], "-e", "require('net').createServer().listen(80, () => process.exit(0))"]);
      assert.equal(lowPort.exitCode, 0, lowPort.stderr);
    } finally {
      await removeSandbox(id);
    }
  });

  test("freeze stops the agent answering and thaw brings it back", async () => {
    const { id, net } = await newSandbox();
    try {
      await waitForAgent(net.sandboxAddress);
      await runtime.freeze(id);
      assert.equal(await runtime.state(id), "frozen");
      await assert.rejects(get(net.sandboxAddress, "/health", 300), /timeout/);
      await runtime.thaw(id);
      assert.equal(await runtime.state(id), "running");
      assert.equal((await get(net.sandboxAddress, "/health")).status, 204);
      // Destroying a frozen sandbox works too.
      await runtime.freeze(id);
    } finally {
      await removeSandbox(id);
    }
    assert.equal(await runtime.state(id), "missing");
  });

  test("a background start has the lowest cgroup weight until foreground(), which works frozen; its processes are not niced", async () => {
    const { id, net } = await newSandbox({}, true);
    try {
      await waitForAgent(net.sandboxAddress);
      const v2 = existsSync("/sys/fs/cgroup/cgroup.controllers");
      const dir = runtime.cgroupDirectories(id).find((d) => existsSync(path.join(d, v2 ? "cpu.weight" : "cpu.shares")))!;
      const weight = async () => (await readFile(path.join(dir, v2 ? "cpu.weight" : "cpu.shares"), "utf8")).trim();
      const niceValues = async () => {
        const tids = (await readFile(path.join(dir, v2 ? "cgroup.threads" : "tasks"), "utf8")).split("\n").filter(Boolean);
        return Promise.all(tids.map(async (tid) => {
          const stat = await readFile(`/proc/${tid}/stat`, "utf8");
          return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[16]);
        }));
      };
      assert.equal(await weight(), v2 ? "1" : "2");
      await runtime.freeze(id);
      await runtime.foreground(id);
      await runtime.thaw(id);
      assert.equal(await weight(), v2 ? "100" : "1024");
      const after = await niceValues();
      assert.ok(after.length > 1 && after.every((nice) => nice === 0), `every thread at nice 0: ${after}`);
      assert.equal((await execIn(net, ["sh", "-c", "cut -d' ' -f19 /proc/self/stat"])).stdout, "0\n", "and a process started inside");
    } finally {
      await removeSandbox(id);
    }
    await assert.rejects(runtime.foreground(id), /not running/);
  });

  test("reports CPU, memory and disk use", async () => {
    const { id, net } = await newSandbox({ memoryMiB: 256, cpuCount: 2 });
    try {
      await waitForAgent(net.sandboxAddress);
      const before = await runtime.stats(id);
      assert.equal(before.cpuCount, 2);
      assert.equal(before.memTotalBytes, 256 * 1024 * 1024);
      assert.ok(before.memUsedBytes > 0);
      await execIn(net, ["sh", "-c", "head -c 3000000 /dev/urandom > /root/blob"]);
      const afterWrite = await runtime.stats(id);
      assert.ok(afterWrite.diskUsedBytes - before.diskUsedBytes >= 3_000_000, `${before.diskUsedBytes} → ${afterWrite.diskUsedBytes}`);
      assert.ok(afterWrite.cpuUsedPct >= 0 && afterWrite.cpuUsedPct <= 100);
    } finally {
      await removeSandbox(id);
    }
  });

  test("destroy removes container, mount, directory and cgroups, and can be repeated", async () => {
    const { id } = await newSandbox();
    // The storage pool and kit cannot be unmounted from under a live sandbox (`./cubicle unmount`).
    await assert.rejects(runtime.releaseHostMounts(), /sandboxes still use the storage pool/);
    assert.ok((await mountsMentioning(path.join(defaultRunDir(stateDir), "pool"))).length > 0, "the pool is still mounted");
    const bundle = runtime.bundleDir(id);
    const cgroupDirs = runtime.cgroupDirectories(id);
    assert.ok(cgroupDirs.some((d) => existsSync(d)));
    await runtime.destroy(id);
    await runtime.destroy(id);
    await network.release(id);
    assert.equal(await runtime.state(id), "missing");
    assert.deepEqual(await mountsMentioning(bundle), []);
    assert.ok(!existsSync(bundle));
    assert.deepEqual(cgroupDirs.filter((d) => existsSync(d)), []);
    assert.ok(!(await runtime.list()).includes(id));
  });

  test("destroy cleans a half-made sandbox (bundle, layer and overlay mount, no container)", async () => {
    const id = `${tag}half`;
    const bundle = runtime.bundleDir(id);
    const layer = runtime.layerDir(id);
    await runCommand(["btrfs", "subvolume", "create", layer]);
    await mkdir(path.join(layer, "upper"));
    await mkdir(path.join(layer, "work"));
    await mkdir(path.join(bundle, "rootfs"), { recursive: true });
    await runCommand(["mount", "-t", "overlay", "overlay", "-o", `lowerdir=${rootfsDir},upperdir=${layer}/upper,workdir=${layer}/work`, `${bundle}/rootfs`]);
    assert.ok((await runtime.list()).includes(id));
    await runtime.destroy(id);
    assert.deepEqual(await mountsMentioning(bundle), []);
    assert.ok(!existsSync(bundle));
    assert.ok(!existsSync(layer));
  });

  test("a failed create leaves nothing behind", async () => {
    const id = `${tag}bad`;
    const net = await network.allocate(id, { allowInternetAccess: false });
    try {
      await assert.rejects(
        runtime.create({
          sandboxId: id,
          hostname: "bad",
          template: { templateId: "missing", rootfsDir: "/nonexistent/rootfs", defaultUser: "root", defaultWorkdir: "/", env: {} },
          resources: { cpuCount: 1, memoryMiB: 128, diskMiB: 0, pidsLimit: 100 },
          network: net,
        }),
        /root filesystem is missing/,
      );
      assert.ok(!existsSync(runtime.bundleDir(id)));
      assert.equal(await runtime.state(id), "missing");
    } finally {
      await network.release(id);
    }
  });
  test("each sandbox has its own uid range and owns its user namespace: inotify exhausted in one leaves the others and the host theirs", async () => {
    const a = await newSandbox();
    const b = await newSandbox();
    try {
      await Promise.all([waitForAgent(a.net.sandboxAddress), waitForAgent(b.net.sandboxAddress)]);
      const [baseA, baseB] = [runtime.uidBaseOf(a.id)!, runtime.uidBaseOf(b.id)!];
      assert.ok(Math.abs(baseA - baseB) >= 65536, `${baseA} and ${baseB} overlap`);
      for (const [id, base] of [[a.id, baseA], [b.id, baseB]] as const) {
        const container = JSON.parse((await runCommand(["runc", "state", CONTAINER_PREFIX + id])).stdout) as { pid: number };
        assert.equal(await userNamespaceOwner(container.pid), base, `owner of ${id}'s user namespace`);
        // Its pin and root served runc's start only: both leave the host's mounts once the sandbox runs (MOUNT_COUNT_NOTE).
        const startMounts = ["userns", "rootfs"].map((name) => path.join(runtime.bundleDir(id), name));
        const left = async () => (await mountPoints()).filter((point) => startMounts.includes(point));
        for (let i = 0; i < 50 && (await left()).length > 0; i++) await new Promise((r) => setTimeout(r, 50));
        assert.deepEqual(await left(), [], "still mounted on the host");
      }
      // Sandbox A takes every inotify instance its user may have (the host's per-user limit) and keeps them.
      const hog = "import ctypes,time\nlibc=ctypes.CDLL(None)\nfds=[]\nwhile len(fds)<100000:\n  fd=libc.inotify_init()\n  if fd<0: break\n  fds.append(fd)\nopen('/tmp/held','w').write(str(len(fds)))\ntime.sleep(120)\n";
      await execIn(a.net, ["sh", "-c", `printf '%s' "${hog.replace(/"/g, '\\"')}" > /tmp/hog.py && (/usr/bin/python3 /tmp/hog.py </dev/null >/dev/null 2>&1 &)`]);
      let held = 0;
      for (let i = 0; i < 100 && !held; i++) {
        held = Number((await execIn(a.net, ["cat", "/tmp/held"])).stdout) || 0;
        if (!held) await new Promise((r) => setTimeout(r, 100));
      }
      const limit = Number((await readFile("/proc/sys/fs/inotify/max_user_instances", "utf8")).trim());
      assert.ok(held > 0 && held <= limit, `sandbox A holds ${held} inotify instances (limit ${limit})`);
      const one = "import ctypes; print(ctypes.CDLL(None).inotify_init())";
      assert.ok(Number((await execIn(b.net, ["/usr/bin/python3", "-c", one])).stdout) >= 0, "sandbox B cannot create an inotify instance");
      const host = await runCommand(["/usr/bin/python3", "-c", one]);
      assert.ok(Number(host.stdout) >= 0, "host root cannot create an inotify instance");
    } finally {
      await removeSandbox(a.id);
      await removeSandbox(b.id);
    }
  });

  test("the disk quota is enforced by the kernel: writes past it fail inside, other sandboxes write on", async () => {
    const small = await newSandbox({ diskMiB: 64 });
    const other = await newSandbox();
    try {
      await Promise.all([waitForAgent(small.net.sandboxAddress), waitForAgent(other.net.sandboxAddress)]);
      const full = await execIn(small.net, ["sh", "-c", "dd if=/dev/zero of=/root/fill bs=1M count=200 2>&1; sync"]);
      assert.match(full.stdout + full.stderr, /Disk quota exceeded|No space left/);
      const size = Number((await execIn(small.net, ["stat", "-c", "%s", "/root/fill"])).stdout);
      assert.ok(size <= 64 * 1024 * 1024 && size > 32 * 1024 * 1024, `wrote ${size} bytes into a 64 MiB disk`);
      const stats = await runtime.stats(small.id);
      assert.equal(stats.diskTotalBytes, 64 * 1024 * 1024);
      const written = await execIn(other.net, ["sh", "-c", "dd if=/dev/zero of=/root/more bs=1M count=100 2>&1"]);
      assert.equal(written.exitCode, 0, written.stdout + written.stderr);
    } finally {
      await removeSandbox(small.id);
      await removeSandbox(other.id);
    }
  });
});
