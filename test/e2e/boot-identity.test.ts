/**
 * Every sandbox is a machine of its own, through the official `e2b` and `@e2b/code-interpreter`
 * SDKs: its own boot id and machine id (never the host's), its own uptime; a memory pause and
 * resume keeps them (it did not reboot), a filesystem-only pause and resume is a reboot (new boot
 * id, uptime from zero, processes gone, files kept), and every create from a snapshot and every
 * fork is a new machine. Randomness: the kernel's pool is the host's, so every copy reads its own
 * bytes; the interpreter's kernels are reseeded; a user process restored from a snapshot keeps
 * its in-memory random state in every copy. The sandbox's users, root included, cannot change
 * their ids, nor another sandbox's or the host's.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import { after, before, describe, test } from "node:test";
import { CommandExitError, Sandbox } from "e2b";
import { Sandbox as CodeInterpreter } from "@e2b/code-interpreter";
import { e2eRuntime, startTestServer, useServerForSdk, type TestServer } from "./harness.js";

let server: TestServer;
const DURABLE_AFTER_SEC = 3;

before(async () => {
  server = await startTestServer({
    defaultTemplates: ["base", "code-interpreter-v1"],
    // A warm pool entry for base (the default create path) and a short hot-pause tier.
    extraEnv: { CUBICLE_POOL_SIZE: "base=1", CUBICLE_DURABLE_PAUSE_AFTER_SEC: String(DURABLE_AFTER_SEC) },
  });
  useServerForSdk(server);
});

after(async () => {
  await server?.stop();
});

const hostBootId = () => fs.readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim();
const hostMachineId = () => (fs.existsSync("/etc/machine-id") ? fs.readFileSync("/etc/machine-id", "utf8").trim() : "");

interface Identity {
  bootId: string;
  machineId: string;
  /** /proc/uptime's first field. */
  uptimeSec: number;
  /** Python's time.monotonic() in a new process. */
  monotonicSec: number;
}

async function identityOf(sandbox: Sandbox): Promise<Identity> {
  const run = await sandbox.commands.run(
    "cat /proc/sys/kernel/random/boot_id /etc/machine-id; cut -d' ' -f1 /proc/uptime; python3 -c 'import time; print(time.monotonic())'",
  );
  const [bootId, machineId, uptime, monotonic] = run.stdout.trim().split("\n");
  assert.match(bootId!, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
  assert.match(machineId!, /^[0-9a-f]{32}$/);
  return { bootId: bootId!, machineId: machineId!, uptimeSec: Number(uptime), monotonicSec: Number(monotonic) };
}

/** A command's outcome, also when it exits non-zero (the SDK throws then). */
async function attempt(sandbox: Sandbox, cmd: string, user: "root" | "user"): Promise<{ exitCode: number; stdout: string; stderr: string }> {
  try {
    const result = await sandbox.commands.run(cmd, { user });
    return { exitCode: result.exitCode, stdout: result.stdout, stderr: result.stderr };
  } catch (err) {
    if (err instanceof CommandExitError) return { exitCode: err.exitCode, stdout: err.stdout, stderr: err.stderr };
    throw err;
  }
}

/** Starts `sleep` in the background and returns its pid. */
async function startSleeper(sandbox: Sandbox): Promise<string> {
  await sandbox.commands.run("sleep 3600", { background: true });
  for (let i = 0; i < 50; i++) {
    const pid = (await attempt(sandbox, "pgrep -x sleep", "user")).stdout.trim();
    if (pid) return pid;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error("the background sleep never showed up");
}

/** runc's status of a sandbox's container ("paused" = frozen in RAM), or "gone" (on disk). */
function containerStatus(sandboxId: string): string {
  try {
    return JSON.parse(execFileSync("runc", ["state", `cubicle-${sandboxId}`], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] })).status;
  } catch {
    return "gone";
  }
}

async function waitFor(what: string, check: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (check()) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}\n${server.log().slice(-3000)}`);
}

describe("boot identity", () => {
  test("two sandboxes have their own boot id, machine id and uptime, none of them the host's", async () => {
    const started = Date.now();
    const sandboxes = [await Sandbox.create(), await Sandbox.create()];
    try {
      const [a, b] = await Promise.all(sandboxes.map(identityOf));
      assert.notEqual(a!.bootId, b!.bootId);
      assert.notEqual(a!.machineId, b!.machineId);
      for (const seen of [a!, b!]) {
        assert.notEqual(seen.bootId, hostBootId());
        assert.notEqual(seen.machineId, hostMachineId());
        // A pool entry may have booted before the test: its age is bounded by the server's.
        const serverAgeSec = (Date.now() - started) / 1000 + 600;
        assert.ok(seen.uptimeSec < serverAgeSec, `uptime ${seen.uptimeSec} s`);
        assert.ok(seen.monotonicSec < serverAgeSec, `monotonic ${seen.monotonicSec} s`);
      }
      const hostUptimeSec = Number(fs.readFileSync("/proc/uptime", "utf8").split(" ")[0]);
      assert.ok(a!.uptimeSec < hostUptimeSec && b!.uptimeSec < hostUptimeSec);
    } finally {
      await Promise.all(sandboxes.map((s) => s.kill()));
    }
  });

  test("a memory pause and resume keeps the boot id, the machine id, the clocks and the processes, in RAM and from disk", async () => {
    const sandbox = await Sandbox.create({ timeoutMs: 300_000 });
    try {
      const sleeper = await startSleeper(sandbox);
      const before = await identityOf(sandbox);

      assert.equal(await sandbox.pause(), true);
      await Sandbox.connect(sandbox.sandboxId);
      const hot = await identityOf(sandbox);
      assert.equal(hot.bootId, before.bootId, "a resume is no reboot");
      assert.equal(hot.machineId, before.machineId);
      assert.ok(hot.uptimeSec >= before.uptimeSec);
      assert.equal((await attempt(sandbox, "pgrep -x sleep", "user")).stdout.trim(), sleeper, "the background process survived");

      await sandbox.pause();
      await waitFor("the pause to move to disk", () => containerStatus(sandbox.sandboxId) === "gone", (DURABLE_AFTER_SEC + 30) * 1000);
      await Sandbox.connect(sandbox.sandboxId);
      const durable = await identityOf(sandbox);
      assert.equal(durable.bootId, before.bootId, "a resume from disk is no reboot either");
      assert.equal(durable.machineId, before.machineId);
      assert.ok(durable.uptimeSec >= hot.uptimeSec, `the clocks go on from the dump: ${durable.uptimeSec} < ${hot.uptimeSec}`);
      assert.equal((await attempt(sandbox, "pgrep -x sleep", "user")).stdout.trim(), sleeper, "the background process came back from disk");
    } finally {
      await sandbox.kill();
    }
  });

  test("pause({keepMemory: false}) and resume is a reboot: new boot id, same machine, uptime from zero, processes gone, files kept", async () => {
    const created = Date.now();
    const sandbox = await Sandbox.create({ timeoutMs: 300_000 });
    try {
      await sandbox.files.write("/home/user/kept.txt", "written before the reboot");
      await startSleeper(sandbox);
      // Enough age that an uptime carried over would show.
      await new Promise((r) => setTimeout(r, 3000));
      const before = await identityOf(sandbox);
      assert.ok(before.uptimeSec >= 3, `uptime ${before.uptimeSec} s`);

      assert.equal(await sandbox.pause({ keepMemory: false }), true);
      const resumeStarted = Date.now();
      await Sandbox.connect(sandbox.sandboxId);
      const after = await identityOf(sandbox);
      const sinceResumeSec = (Date.now() - resumeStarted) / 1000;
      assert.notEqual(after.bootId, before.bootId, "a boot id per boot");
      assert.notEqual(after.bootId, hostBootId());
      assert.equal(after.machineId, before.machineId, "the same machine");
      assert.ok(after.uptimeSec <= sinceResumeSec + 0.05, `uptime ${after.uptimeSec} s, ${sinceResumeSec} s since the resume`);
      assert.ok(after.uptimeSec * 1000 < Date.now() - created, "less than the time since the create");
      assert.ok(after.monotonicSec <= sinceResumeSec + 0.05, `monotonic ${after.monotonicSec} s`);
      assert.match((await sandbox.commands.run("uptime")).stdout, /up 0 min/);
      assert.equal((await attempt(sandbox, "pgrep -x sleep", "user")).exitCode, 1, "the background process is gone");
      assert.equal(await sandbox.files.read("/home/user/kept.txt"), "written before the reboot");
    } finally {
      await sandbox.kill();
    }
  });

  test("every create from a snapshot and every fork is a new machine, with its own randomness from the kernel", async () => {
    const source = await Sandbox.create({ timeoutMs: 300_000 });
    const copies: Sandbox[] = [];
    try {
      // A process that drew its random state before the snapshot and prints a number on request.
      await source.files.write(
        "/home/user/draw.py",
        "import os, random, time\nrandom.random()\nopen('/home/user/seeded', 'w').close()\nwhile not os.path.exists('/home/user/go'):\n    time.sleep(0.02)\nopen('/home/user/drawn', 'w').write(repr(random.random()))\n",
      );
      await source.commands.run("python3 /home/user/draw.py", { background: true });
      // Wait until it has seeded itself (not merely started: under TCG an import takes a while), so
      // the snapshot holds its random state rather than a process that seeds itself after restore.
      for (let i = 0; i < 300 && !(await source.files.exists("/home/user/seeded")); i++) await new Promise((r) => setTimeout(r, 100));
      assert.ok(await source.files.exists("/home/user/seeded"), "the drawing process seeded itself within 30 s");
      const sourceId = await identityOf(source);
      const snapshot = await source.createSnapshot();
      copies.push(await Sandbox.create(snapshot.snapshotId), await Sandbox.create(snapshot.snapshotId));
      const forks = await source.fork({ count: 2, timeoutMs: 120_000 });
      for (const fork of forks) {
        if (!(fork instanceof Sandbox)) throw fork;
        copies.push(fork);
      }
      const seen = await Promise.all(copies.map(identityOf));
      assert.equal(new Set([sourceId, ...seen].map((s) => s.bootId)).size, 5, "five machines, five boot ids");
      assert.equal(new Set([sourceId, ...seen].map((s) => s.machineId)).size, 5, "and five machine ids");
      for (const copy of seen) {
        assert.notEqual(copy.bootId, hostBootId());
        assert.ok(copy.uptimeSec >= sourceId.uptimeSec, "restored clocks go on from the snapshot");
      }

      // The kernel's random pool is the host's, never part of an image: every copy reads its own.
      const urandom = await Promise.all(copies.map(async (c) => (await c.commands.run("head -c 16 /dev/urandom | od -An -tx1")).stdout.trim()));
      assert.equal(new Set(urandom).size, copies.length, urandom.join(" | "));
      const fresh = await Promise.all(copies.map(async (c) => (await c.commands.run("python3 -c 'import random; print(random.random())'")).stdout.trim()));
      assert.equal(new Set(fresh).size, copies.length, "a new process seeds itself from the kernel");
      // A process that was running at the snapshot carries its random state in its memory: every
      // copy of it draws the same number (only the interpreter's kernels are reseeded, below).
      const drawn = await Promise.all(
        copies.map(async (c) => {
          await c.files.write("/home/user/go", "");
          // The file exists from its open() on; its number arrives at close: wait for the content.
          for (let i = 0; i < 200; i++) {
            if (await c.files.exists("/home/user/drawn")) {
              const text = await c.files.read("/home/user/drawn");
              if (text !== "") return text;
            }
            await new Promise((r) => setTimeout(r, 50));
          }
          return "(nothing drawn in 10 s)";
        }),
      );
      assert.equal(new Set(drawn).size, 1, `restored copies of one process repeat its random sequence: ${drawn.join(" | ")}`);
    } finally {
      await Promise.all(copies.map((c) => c.kill()));
      await source.kill();
    }
  });

  test("the interpreter's Python kernel draws different random numbers in every copy of a snapshot", async () => {
    const source = await CodeInterpreter.create({ timeoutMs: 300_000 });
    const copies: CodeInterpreter[] = [];
    try {
      // A seeded kernel: without the reseed every copy would print random.Random(1234)'s first number.
      assert.equal((await source.runCode("import random\nrandom.seed(1234)\n'seeded'")).text, "seeded");
      const snapshot = await source.createSnapshot();
      copies.push(await CodeInterpreter.create(snapshot.snapshotId), await CodeInterpreter.create(snapshot.snapshotId));
      const numbers = await Promise.all(copies.map(async (c) => (await c.runCode("random.random()")).text));
      const unseeded = (await source.runCode("random.random()")).text;
      assert.equal(unseeded, "0.9664535356921388", "the source goes on with its seeded sequence");
      assert.equal(new Set([...numbers, unseeded]).size, 3, numbers.join(" | "));
      const ids = await Promise.all(copies.map(async (c) => (await c.commands.run("cat /proc/sys/kernel/random/boot_id")).stdout));
      assert.notEqual(ids[0], ids[1]);
    } finally {
      await Promise.all(copies.map((c) => c.kill()));
      await source.kill();
    }
  });

  test("neither the sandbox's user nor its root can change the ids, uncover the host's, or touch another sandbox's", async () => {
    const sandboxes = [await Sandbox.create(), await Sandbox.create()];
    try {
      const [victim, other] = sandboxes as [Sandbox, Sandbox];
      const before = await Promise.all(sandboxes.map(identityOf));
      const host = hostBootId();
      const attempts = [
        "echo 00000000-0000-0000-0000-000000000000 > /proc/sys/kernel/random/boot_id",
        "echo 00000000000000000000000000000001 > /etc/machine-id",
        "echo x > /.cubicle/boot-id",
        "rm -f /etc/machine-id",
        "mv /etc/hostname /etc/machine-id",
        "umount /proc/sys/kernel/random/boot_id",
        "umount -l /etc/machine-id",
        "mount --bind /tmp /proc/sys/kernel/random",
        // A user namespace of its own: CAP_SYS_ADMIN over copies of the mounts, which are locked.
        "unshare -Urm sh -c 'umount -l /proc/sys/kernel/random/boot_id && cat /proc/sys/kernel/random/boot_id'",
        // A new procfs would show the kernel's own id: refused while /proc has covered files.
        "unshare -Urmpf --mount-proc cat /proc/sys/kernel/random/boot_id",
      ];
      for (const user of ["user", "root"] as const) {
        for (const cmd of attempts) {
          const result = await attempt(victim, cmd, user);
          assert.ok(!result.stdout.includes(host), `${user}: ${cmd} showed the host's boot id`);
          // A microVM's kernel is its own: its root is that machine's root (it may rename the
          // machine it owns), and a new procfs shows that kernel's boot id, the guest's, never the
          // host's. Its user may not change a thing; nobody reaches the host's or another's ids.
          if (e2eRuntime === "microvm" && (user === "root" || cmd.includes("--mount-proc"))) continue;
          assert.notEqual(result.exitCode, 0, `${user}: ${cmd} succeeded: ${result.stdout}`);
        }
      }
      // procps' sysctl reports a read-only key on stderr but exits 0: what counts is the id after.
      // (A guest's root may have covered its own /proc/sys above.)
      const sysctl = await attempt(victim, "sysctl -w kernel.random.boot_id=00000000-0000-0000-0000-000000000000", "root");
      if (e2eRuntime !== "microvm") assert.match(sysctl.stderr, /sysctl: setting key "kernel.random.boot_id": /, JSON.stringify(sysctl));
      // (A guest's root may have rewritten its own ids above: only the other sandbox is checked then.)
      const after = e2eRuntime === "microvm" ? [before[0]!, await identityOf(other)] : await Promise.all(sandboxes.map(identityOf));
      assert.equal(after[0]!.bootId, before[0]!.bootId);
      assert.equal(after[0]!.machineId, before[0]!.machineId);
      assert.equal(after[1]!.bootId, before[1]!.bootId, "the other sandbox keeps its ids");
      assert.equal(after[1]!.machineId, before[1]!.machineId);
      assert.equal(hostBootId(), host, "the host's boot id is the kernel's, untouched");
      assert.equal((await other.commands.run("cat /etc/hostname")).exitCode, 0);
    } finally {
      await Promise.all(sandboxes.map((s) => s.kill()));
    }
  });
});
