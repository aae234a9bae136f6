import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { lstat, mkdir, mkdtemp, readdir, readFile, stat, writeFile } from "node:fs/promises";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { createNetworkManager } from "../../network/index.js";
import type { NetworkManager, SandboxNetwork } from "../../network/types.js";
import { defaultRunDir } from "../../shared/config.js";
import { runCommand } from "../../shared/exec.js";
import { imageId, type ImageKind } from "../images.js";
import type { CheckpointTarget, SandboxSpec } from "../types.js";
import { imageLayout } from "./checkpoint-image.js";
import { ContainerRuntime } from "./container-runtime.js";
import { findCriu } from "./criu.js";
import { agentGet, cleanUpRuntimeTest, removeStateAndRunDir, waitForAgentHealth } from "./test-helpers.js";

// Real runc containers checkpointed and restored with CRIU. Needs root, CRIU 4.2+ set up by
// scripts/setup-host.sh and a shifted template rootfs: CUBICLE_TEST_ROOTFS=/var/lib/cubicle/templates/base/rootfs.
// The real agent test also needs the bundle (`node scripts/build.mjs` → dist/agent/agent.js).
const rootfsDir = process.env.CUBICLE_TEST_ROOTFS;
const criuInstalled = existsSync("/var/lib/cubicle/criu/path") || Boolean(process.env.CUBICLE_CRIU);
const skip = process.getuid?.() !== 0 ? "needs root" : !rootfsDir ? "set CUBICLE_TEST_ROOTFS to a shifted rootfs" : !criuInstalled ? "CRIU is not set up (scripts/setup-host.sh)" : false;
const repoRoot = path.join(import.meta.dirname, "..", "..", "..");
const realAgent = path.join(repoRoot, "dist", "agent", "agent.js");

const tag = `k${process.pid.toString(36)}${Date.now().toString(36).slice(-3)}`;
const tableName = `cubicle_criu_${tag}`;
const netnsPrefix = `cubicle-${tag}-`;

let stateDir: string;
let imagesDir: string;
let runtime: ContainerRuntime;
let network: NetworkManager;
let counter = 0;

const get = agentGet;
const waitForAgent = (host: string) => waitForAgentHealth(host);

/** Runs an argv inside the sandbox through the development agent (see container-runtime.test.ts). */
async function sh(sandbox: Sandbox, script: string): Promise<{ exitCode: number; stdout: string; stderr: string }> {
  const res = await get(sandbox.net.sandboxAddress, `/run?argv=${encodeURIComponent(JSON.stringify(["sh", "-c", script]))}`, { timeoutMs: 15_000 });
  return JSON.parse(res.body);
}

async function counterOf(sandbox: Sandbox): Promise<number> {
  return Number((await get(sandbox.net.sandboxAddress, "/counter")).body);
}

interface Sandbox {
  id: string;
  net: SandboxNetwork;
  spec: SandboxSpec;
}

async function specFor(id: string, memoryMiB = 256): Promise<SandboxSpec> {
  const net = await network.allocate(id, { allowInternetAccess: false });
  return {
    sandboxId: id,
    hostname: `sb-${id}`,
    template: { templateId: "base", rootfsDir: rootfsDir!, defaultUser: "root", defaultWorkdir: "/", env: {} },
    resources: { cpuCount: 1, memoryMiB, diskMiB: 0, pidsLimit: 200 },
    network: net,
  };
}

async function newSandbox(on = runtime): Promise<Sandbox> {
  const spec = await specFor(`${tag}s${counter++}`);
  await on.create(spec);
  await waitForAgent(spec.network.sandboxAddress);
  return { id: spec.sandboxId, net: spec.network, spec };
}

async function restoreClone(image: string, memoryMiB = 256, on = runtime): Promise<Sandbox> {
  const spec = await specFor(`${tag}c${counter++}`, memoryMiB);
  await on.restore(spec, image);
  return { id: spec.sandboxId, net: spec.network, spec };
}

async function removeSandbox(sandbox: Sandbox, on = runtime): Promise<void> {
  await on.destroy(sandbox.id);
  await network.release(sandbox.id);
}

/** No runc container, mount, bundle or cgroup is left of the sandbox. */
async function assertGone(id: string, on = runtime): Promise<void> {
  assert.equal(await on.state(id), "missing");
  const bundle = on.bundleDir(id);
  const mountinfo = await readFile("/proc/self/mountinfo", "utf8");
  assert.ok(!mountinfo.includes(bundle), `a mount of ${bundle} is left`);
  assert.ok(!existsSync(bundle), `${bundle} is left`);
  assert.deepEqual(on.cgroupDirectories(id).filter((dir) => existsSync(dir)), []);
}

/** The image `name` of `kind` as checkpoint() is asked for it, as restore() takes it, and where it is on disk. */
function target(name: string, kind: ImageKind = "snapshot"): CheckpointTarget {
  return { kind, name };
}

function idOf(name: string, kind: ImageKind = "snapshot"): string {
  return imageId(kind, name);
}

function imageDir(name: string, kind: ImageKind = "snapshot"): string {
  return runtime.images.dirOf(idOf(name, kind));
}

describe("container checkpoints (CRIU)", { skip }, () => {
  before(async () => {
    stateDir = await mkdtemp(path.join(os.tmpdir(), "cubicle-criu-test-"));
    network = createNetworkManager({ subnet: `10.77.${process.pid % 250}.0/24` }, { tableName, netnsPrefix });
    await network.init();
    runtime = new ContainerRuntime(
      { stateDir, distDir: path.join(repoRoot, "dist"), runcPath: "runc", runDir: defaultRunDir(stateDir), storageBytes: 8 * 1024 ** 3 },
      { agentScript: path.join(repoRoot, "test", "runtime-dev", "health-agent.cjs") },
    );
    await runtime.init();
    // Where the runtime keeps snapshot images (what the tests look into).
    imagesDir = path.dirname(imageDir("any"));
  });

  after(() => cleanUpRuntimeTest({ runtime, network, tableName, stateDir }));

  test("a clone restored into a new netns keeps memory, files, deletions and /dev/shm, while the source runs on", async () => {
    const source = await newSandbox();
    let clone: Sandbox | undefined;
    try {
      assert.equal(await counterOf(source), 1);
      assert.equal(await counterOf(source), 2);
      const prepared = await sh(source, "echo kept > /root/kept && rm /etc/motd && echo shm > /dev/shm/note");
      assert.equal(prepared.exitCode, 0, prepared.stderr);
      // A keep-alive connection from the host, as the server's agent client holds.
      const keepAlive = new http.Agent({ keepAlive: true, maxSockets: 1 });
      assert.equal((await get(source.net.sandboxAddress, "/health", { agent: keepAlive })).status, 204);

      const info = await runtime.checkpoint(source.id, target("clone"), { memory: true, leaveRunning: true });
      assert.equal(info.imageId, idOf("clone"));
      assert.equal(info.memory, true);
      assert.ok(info.frozenMs > 0 && info.sizeBytes > 0, JSON.stringify(info));
      assert.deepEqual((await readdir(imagesDir)).sort(), ["clone"]);
      // CRIU used its kernel-feature cache (the runtime makes one where /run is no tmpfs).
      assert.match(await readFile(path.join(imageDir("clone"), "log", "dump.log"), "utf8"), /Loaded kdat cache/);

      // The source runs on, its established connection still works, its memory moves on.
      assert.equal(await runtime.state(source.id), "running");
      assert.equal((await get(source.net.sandboxAddress, "/health", { agent: keepAlive })).status, 204);
      keepAlive.destroy();
      assert.equal(await counterOf(source), 3);
      assert.equal((await sh(source, "echo changed > /root/kept")).exitCode, 0);

      clone = await restoreClone(idOf("clone"), 300);
      assert.notEqual(clone.net.sandboxAddress, source.net.sandboxAddress);
      assert.equal(await runtime.state(clone.id), "running");
      // The clone's memory is the source's at the checkpoint: its counter goes on from 2.
      assert.equal(await counterOf(clone), 3);
      assert.equal(await counterOf(clone), 4);
      assert.equal(await counterOf(source), 4);
      assert.equal((await sh(clone, "cat /root/kept")).stdout, "kept\n");
      assert.notEqual((await sh(clone, "test -e /etc/motd")).exitCode, 0, "a file deleted before the checkpoint came back");
      assert.equal((await sh(clone, "cat /dev/shm/note")).stdout, "shm\n");
      assert.equal((await sh(source, "cat /root/kept")).stdout, "changed\n");
      // The clone has its own cgroup, with the limits of its own spec.
      const memoryLimit = runtime.cgroupDirectories(clone.id).map((dir) => path.join(dir, existsSync("/sys/fs/cgroup/cgroup.controllers") ? "memory.max" : "memory.limit_in_bytes")).find((file) => existsSync(file));
      assert.ok(memoryLimit, "the clone has no memory cgroup");
      assert.equal((await readFile(memoryLimit, "utf8")).trim(), String(300 * 1024 * 1024));
      // …and its restored processes are in that cgroup (CRIU leaves cgroups to runc).
      const members = (await readFile(path.join(path.dirname(memoryLimit), "cgroup.procs"), "utf8")).split("\n").filter(Boolean);
      assert.ok(members.length >= 2, `the clone's memory cgroup holds ${members.length} processes`);
      // The image is untouched by the restore and can be restored again.
      const second = await restoreClone(idOf("clone"));
      assert.equal(await counterOf(second), 3);
      await removeSandbox(second);
      await assertGone(second.id);
    } finally {
      if (clone) await removeSandbox(clone);
      await removeSandbox(source);
    }
    await assertGone(source.id);
    if (clone) await assertGone(clone.id);
  });

  test("a restore's view of an image left by a crash is removed when the runtime starts again", async () => {
    const source = await newSandbox();
    try {
      await runtime.checkpoint(source.id, target("views"), { memory: true, leaveRunning: true });
      const view = path.join(imageDir("views"), "criu-view-crashed-1");
      await mkdir(view);
      const again = new ContainerRuntime(
        { stateDir, distDir: path.join(repoRoot, "dist"), runcPath: "runc", runDir: defaultRunDir(stateDir) },
        { agentScript: path.join(repoRoot, "test", "runtime-dev", "health-agent.cjs") },
      );
      await again.init();
      assert.ok(!existsSync(view), "the view is left");
      assert.ok(existsSync(path.join(imageDir("views"), "meta.json")), "the image itself stays");
      assert.ok(again.imageBudget().usedBytes > 0, "the image counts against the budget after the restart");
    } finally {
      await removeSandbox(source);
    }
  });

  test("restores one image into several sandboxes at once", async () => {
    const source = await newSandbox();
    const clones: Sandbox[] = [];
    try {
      await counterOf(source);
      await runtime.checkpoint(source.id, target("fanout"), { memory: true, leaveRunning: true });
      const specs = await Promise.all([0, 1, 2].map(() => specFor(`${tag}f${counter++}`)));
      await Promise.all(specs.map((spec) => runtime.restore(spec, idOf("fanout"))));
      clones.push(...specs.map((spec) => ({ id: spec.sandboxId, net: spec.network, spec })));
      for (const clone of clones) assert.equal(await counterOf(clone), 2);
      assert.equal((await sh(clones[0]!, "echo mine > /root/own")).exitCode, 0);
      assert.notEqual((await sh(clones[1]!, "test -e /root/own")).exitCode, 0, "clones share an upper layer");
    } finally {
      for (const clone of clones) await removeSandbox(clone);
      await removeSandbox(source);
    }
    for (const clone of clones) await assertGone(clone.id);
  });

  test("every restore gets its own uid range; files keep their in-sandbox owners, tmpfs ones included", async () => {
    const source = await newSandbox();
    const clones: Sandbox[] = [];
    try {
      const prepared = await sh(source, "echo mine > /root/owned && chown 1000:1000 /root/owned && echo shm > /dev/shm/user && chown 1000:1000 /dev/shm/user && chmod 600 /dev/shm/user");
      assert.equal(prepared.exitCode, 0, prepared.stderr);
      await runtime.checkpoint(source.id, target("ranges"), { memory: true, leaveRunning: true });
      for (let i = 0; i < 2; i++) clones.push(await restoreClone(idOf("ranges")));
      const bases = [source, ...clones].map((sandbox) => runtime.uidBaseOf(sandbox.id)!);
      assert.equal(new Set(bases).size, 3, `uid bases ${bases.join(", ")}`);
      for (const clone of clones) {
        const base = runtime.uidBaseOf(clone.id)!;
        const container = JSON.parse((await runCommand(["runc", "state", `cubicle-${clone.id}`])).stdout) as { pid: number };
        assert.match(await readFile(`/proc/${container.pid}/status`, "utf8"), new RegExp(`^Uid:\\s+${base}\\s`, "m"));
        assert.equal((await sh(clone, "stat -c %u:%g /root/owned /dev/shm/user /dev/shm")).stdout, "1000:1000\n1000:1000\n0:0\n");
        assert.equal((await sh(clone, "setpriv --reuid=1000 --regid=1000 --clear-groups cat /dev/shm/user")).stdout, "shm\n");
      }
    } finally {
      for (const clone of clones) await removeSandbox(clone);
      await removeSandbox(source);
    }
    for (const clone of clones) await assertGone(clone.id);
  });

  test("a durable pause stops the container, keeps the sandbox, and resumes into the same id", async () => {
    const sandbox = await newSandbox();
    try {
      await counterOf(sandbox);
      assert.equal((await sh(sandbox, "echo before-pause > /root/p")).exitCode, 0);
      const info = await runtime.checkpoint(sandbox.id, target("pause", "pause"), { memory: true, leaveRunning: false });
      assert.ok(info.frozenMs > 0);
      assert.equal(await runtime.state(sandbox.id), "missing");
      assert.ok((await runtime.list()).includes(sandbox.id), "the paused sandbox is no longer listed");
      assert.deepEqual(runtime.cgroupDirectories(sandbox.id).filter((dir) => existsSync(dir)), [], "the paused sandbox still holds cgroups");
      await assert.rejects(get(sandbox.net.sandboxAddress, "/health", { timeoutMs: 300 }));
      // IMAGE_COMPRESSION_NOTE: the memory pages are stored compressed (the kernel's extent map says so once written back).
      const criuDir = imageLayout(imageDir("pause", "pause")).criu;
      const pages = (await readdir(criuDir)).filter((name) => /^pages-\d+\.img$/.test(name)).map((name) => path.join(criuDir, name));
      const largest = (await Promise.all(pages.map(async (file) => ({ file, size: (await stat(file)).size })))).sort((a, b) => b.size - a.size)[0];
      assert.ok(largest && largest.size > 256 * 1024, `the image has pages to compress: ${JSON.stringify(largest)}`);
      await runCommand(["sync", largest.file]);
      assert.match((await runCommand(["filefrag", "-v", largest.file])).stdout, /\bencoded\b/, "the pause image's pages are not compressed on the pool");

      await runtime.restore(sandbox.spec, idOf("pause", "pause"));
      assert.equal(await runtime.state(sandbox.id), "running");
      assert.equal(await counterOf(sandbox), 2);
      assert.equal((await sh(sandbox, "cat /root/p")).stdout, "before-pause\n");
    } finally {
      await removeSandbox(sandbox);
    }
    await assertGone(sandbox.id);
  });

  test("destroy cleans a sandbox left in durable pause", async () => {
    const sandbox = await newSandbox();
    await runtime.checkpoint(sandbox.id, target("pause-destroy", "pause"), { memory: true, leaveRunning: false });
    await removeSandbox(sandbox);
    await assertGone(sandbox.id);
    assert.ok(existsSync(path.join(imageDir("pause-destroy", "pause"), "meta.json")), "destroy removed the image");
  });

  test("a rollback (destroy, then restore the same id) brings the snapshot's files and memory back", async () => {
    const sandbox = await newSandbox();
    try {
      await counterOf(sandbox);
      assert.equal((await sh(sandbox, "echo v1 > /root/doc")).exitCode, 0);
      await runtime.checkpoint(sandbox.id, target("rollback"), { memory: true, leaveRunning: true });
      assert.equal((await sh(sandbox, "echo v2 > /root/doc && echo new > /root/added && rm /etc/hostname")).exitCode, 0);
      await counterOf(sandbox);
      await assert.rejects(runtime.restore(sandbox.spec, idOf("rollback")), /destroy it before restoring/);

      await runtime.destroy(sandbox.id);
      await runtime.restore(sandbox.spec, idOf("rollback"));
      assert.equal(await counterOf(sandbox), 2);
      assert.equal((await sh(sandbox, "cat /root/doc")).stdout, "v1\n");
      assert.notEqual((await sh(sandbox, "test -e /root/added")).exitCode, 0);
      assert.equal((await sh(sandbox, "test -e /etc/hostname")).exitCode, 0);
    } finally {
      await removeSandbox(sandbox);
    }
  });

  test("a filesystem-only checkpoint restores the files and starts the agent afresh", async () => {
    const source = await newSandbox();
    let clone: Sandbox | undefined;
    try {
      await counterOf(source);
      await counterOf(source);
      assert.equal((await sh(source, "echo fs-only > /root/f && rm /etc/motd")).exitCode, 0);
      const info = await runtime.checkpoint(source.id, target("fs"), { memory: false, leaveRunning: true });
      assert.equal(info.memory, false);
      assert.ok(!existsSync(path.join(imageDir("fs"), "criu")));
      clone = await restoreClone(idOf("fs"));
      await waitForAgent(clone.net.sandboxAddress);
      assert.equal(await counterOf(clone), 1, "a fresh agent starts counting at 1");
      assert.equal((await sh(clone, "cat /root/f")).stdout, "fs-only\n");
      assert.notEqual((await sh(clone, "test -e /etc/motd")).exitCode, 0);
      assert.equal(await counterOf(source), 3);
    } finally {
      if (clone) await removeSandbox(clone);
      await removeSandbox(source);
    }
  });

  test("a filesystem-only durable pause stops the container and resumes with a fresh agent", async () => {
    const sandbox = await newSandbox();
    try {
      assert.equal((await sh(sandbox, "echo paused > /root/f")).exitCode, 0);
      await runtime.checkpoint(sandbox.id, target("fs-pause", "pause"), { memory: false, leaveRunning: false });
      assert.equal(await runtime.state(sandbox.id), "missing");
      await runtime.restore(sandbox.spec, idOf("fs-pause", "pause"));
      await waitForAgent(sandbox.net.sandboxAddress);
      assert.equal((await sh(sandbox, "cat /root/f")).stdout, "paused\n");
    } finally {
      await removeSandbox(sandbox);
    }
  });

  test("a failed restore leaves the image intact, nothing of the sandbox behind, and says why", async () => {
    const source = await newSandbox();
    try {
      await runtime.checkpoint(source.id, target("corrupt"), { memory: true, leaveRunning: true });
      const pagemap = (await readdir(path.join(imageDir("corrupt"), "criu"))).find((name) => name.startsWith("pagemap-"))!;
      const pagemapFile = path.join(imageDir("corrupt"), "criu", pagemap);
      await writeFile(pagemapFile, "garbage, not a CRIU image");
      const spec = await specFor(`${tag}bad${counter++}`);
      await assert.rejects(runtime.restore(spec, idOf("corrupt")), (err: Error) => {
        assert.match(err.message, /restore of sandbox .* failed/);
        assert.match(err.message, /CRIU log/);
        return true;
      });
      await assertGone(spec.sandboxId);
      await network.release(spec.sandboxId);
      assert.equal(await readFile(pagemapFile, "utf8"), "garbage, not a CRIU image");
      assert.ok(existsSync(path.join(imageDir("corrupt"), "meta.json")));
      // A directory that is not an image is refused before anything is made.
      const other = await specFor(`${tag}bad${counter++}`);
      await assert.rejects(runtime.restore(other, idOf("nothing-here")), /is not complete/);
      await assertGone(other.sandboxId);
      await network.release(other.sandboxId);
      assert.equal(await counterOf(source), 1);
    } finally {
      await removeSandbox(source);
    }
  });

  test("a removed image (its layer a btrfs subvolume) frees its id at once and is deleted in the background", async () => {
    const source = await newSandbox();
    try {
      const first = await runtime.checkpoint(source.id, target("removed", "warm"), { memory: true, leaveRunning: true });
      const usedBefore = runtime.imageBudget().usedBytes;
      await runtime.images.remove(first.imageId);
      assert.equal(await runtime.images.exists(first.imageId), false);
      assert.equal(runtime.imageBudget().usedBytes, usedBefore - first.sizeBytes);
      const second = await runtime.checkpoint(source.id, target("removed", "warm"), { memory: false, leaveRunning: true });
      assert.equal(second.imageId, first.imageId);
      await runtime.images.settled();
      assert.deepEqual(await readdir(path.dirname(imageDir("removed", "warm"))), ["removed"]);
      assert.deepEqual(await runtime.images.list("warm"), [first.imageId]);
      assert.equal((await runtime.images.info(first.imageId))?.memory, false);
      await runtime.images.remove(second.imageId);
      await runtime.images.settled();
      assert.deepEqual(await readdir(path.dirname(imageDir("removed", "warm"))), []);
    } finally {
      await removeSandbox(source);
    }
  });

  test("a failed checkpoint leaves no image and the source running", async () => {
    const source = await newSandbox();
    try {
      await runtime.checkpoint(source.id, target("taken"), { memory: true, leaveRunning: true });
      await assert.rejects(runtime.checkpoint(source.id, target("taken"), { memory: true, leaveRunning: false }), /already exists/);
      // A dump past the image budget (cut to what the images take now plus 1 MiB).
      const budget = runtime.imageBudget();
      runtime.setImageBudget(budget.usedBytes + 1024 * 1024);
      try {
        assert.equal((await sh(source, "head -c 3000000 /dev/urandom > /root/big")).exitCode, 0);
        const before = await readdir(imagesDir);
        await assert.rejects(runtime.checkpoint(source.id, target("over-budget"), { memory: true, leaveRunning: false }), (err: { code?: string }) => err.code === "insufficient_storage");
        assert.deepEqual(await readdir(imagesDir), before);
      } finally {
        runtime.setImageBudget(budget.limitBytes);
      }
      assert.equal(await runtime.state(source.id), "running");
      assert.equal(await counterOf(source), 1);
    } finally {
      await removeSandbox(source);
    }
    await assert.rejects(runtime.checkpoint(source.id, target("gone"), { memory: true, leaveRunning: true }), /not running/);
  });

  test("checkpoints the real agent (through CRIU's RPC) and its clones serve envd and the interpreter port in new netns; runc's CRIU version question is answered from the real CRIU's cached reply", { skip: existsSync(realAgent) ? false : "build the agent first (node scripts/build.mjs)" }, async () => {
    assert.ok(existsSync(path.join(repoRoot, "dist", "criu-front")), "scripts/build.mjs builds dist/criu-front (gcc is a host package)");
    const agentState = await mkdtemp(path.join(os.tmpdir(), "cubicle-criu-agent-"));
    const agentRuntime = new ContainerRuntime({ stateDir: agentState, distDir: path.join(repoRoot, "dist"), runcPath: "runc", runDir: defaultRunDir(agentState), storageBytes: 8 * 1024 ** 3 });
    await agentRuntime.init();
    // A cache from another CRIU binary: the front must ask the real CRIU again, not trust it.
    const versionCache = path.join(defaultRunDir(agentState), "criu-bin", "version-reply");
    const stale = "cubicle-criu-version 1 0 0 0 0.000000000\nstale";
    await writeFile(versionCache, stale);
    const source = await newSandbox(agentRuntime);
    const clones: Sandbox[] = [];
    try {
      await waitForPort(source.net.sandboxAddress, 49999);
      const { imageId: agentImage } = await agentRuntime.checkpoint(source.id, target("real-agent"), { memory: true, leaveRunning: true });
      // The dump went to CRIU's RPC directly (CRIU_RPC_NOTE): runc, and so the front, never ran.
      assert.equal(await readFile(versionCache, "utf8"), stale, "no version question at the checkpoint");
      assert.equal(await readFile(path.join(imageLayout(agentRuntime.images.dirOf(agentImage)).criu, "descriptors.json"), "utf8"), '["/dev/null","/dev/null","/dev/null"]', "runc's descriptors for its restore");
      // CRIU ran Cubicle's tar shim for the tmpfs mounts (TAR_SHIM_NOTE): the host's GNU tar,
      // which it finds when the shim's directory is out of the sandbox's reach, writes gzip.
      const criuDir = imageLayout(agentRuntime.images.dirOf(agentImage)).criu;
      const archives = (await readdir(criuDir)).filter((name) => /^tmpfs-dev-\d+\.tar\.gz\.img$/.test(name));
      assert.ok(archives.length >= 2, `the image holds the sandbox's tmpfs archives: ${archives.join(", ")}`);
      for (const name of archives) {
        const head = (await readFile(path.join(criuDir, name))).subarray(0, 2);
        assert.notDeepEqual([...head], [0x1f, 0x8b], `${name} is gzip: CRIU ran the host's tar, not the shim`);
      }
      // The first restore (runc's) asks the real CRIU through the front, which stores its reply.
      clones.push(await restoreClone(agentImage, 256, agentRuntime));
      const realCriu = await findCriu(agentState, undefined);
      const info = await stat(realCriu);
      const cached = await readFile(versionCache);
      const stampEnd = cached.indexOf(0x0a) + 1;
      assert.match(cached.subarray(0, stampEnd).toString(), new RegExp(`^cubicle-criu-version 1 ${info.dev} ${info.ino} ${info.size} \\d+\\.\\d{9}\\n$`));
      // criu_resp: type = VERSION (10), success = true, then the version message.
      assert.deepEqual([...cached.subarray(stampEnd, stampEnd + 4)], [0x08, 0x0a, 0x10, 0x01]);
      assert.ok((await lstat(path.join(defaultRunDir(agentState), "criu-bin", "criu"))).isFile(), "runc runs the front, not a link to CRIU");
      const cachedAt = (await stat(versionCache)).mtimeMs;
      clones.push(await restoreClone(agentImage, 256, agentRuntime));
      assert.equal((await stat(versionCache)).mtimeMs, cachedAt, "the second restore's version question was answered from the cache, not asked again");
      for (const clone of clones) {
        assert.equal((await get(clone.net.sandboxAddress, "/health")).status, 204);
        await waitForPort(clone.net.sandboxAddress, 49999);
      }
      assert.equal((await get(source.net.sandboxAddress, "/health")).status, 204);
    } finally {
      // Each step even when one before it failed: a runtime left mounted outlives the test.
      const steps = [...clones.map((clone) => () => removeSandbox(clone, agentRuntime)), () => removeSandbox(source, agentRuntime), () => agentRuntime.releaseHostMounts(), () => removeStateAndRunDir(agentState)];
      for (const step of steps) await step().catch((err: unknown) => console.error("clean-up of the real-agent test failed:", err));
    }
  });
});

async function waitForPort(host: string, port: number): Promise<void> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const open = await new Promise<boolean>((resolve) => {
      const socket = net.connect({ host, port, timeout: 500 }, () => {
        socket.destroy();
        resolve(true);
      });
      socket.on("error", () => resolve(false));
      socket.on("timeout", () => {
        socket.destroy();
        resolve(false);
      });
    });
    if (open) return;
    if (Date.now() > deadline) throw new Error(`${host}:${port} does not accept connections`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
