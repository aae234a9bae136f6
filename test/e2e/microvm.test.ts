/**
 * The microVM runtime (first slice) through the server: with CUBICLE_MICROVM=tcg a create that
 * asks for `runtime: "microvm"` boots a QEMU guest (its own kernel) with the agent, which the
 * official SDK then drives like any sandbox; a server crash leaves it running and the next server
 * adopts it; a kill ends QEMU and leaves nothing; what is not there yet (snapshots) is a clear
 * error. Skipped where QEMU or the guest kernel package is missing.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";
import { Sandbox, Template } from "e2b";
import { guestSkipReason } from "../../src/runtime/microvm/test-helpers.js";
import { parseBenchArgs, runBench, writeReport, type BenchResultFile } from "../../src/bench/index.js";
import { benchTargetOf, spareQemuPids, startTestServer, useServerForSdk, type TestServer } from "./harness.js";

let skipReason: string | undefined;
let server: TestServer | undefined;

before(async () => {
  // What the microVM unit tests need too: QEMU and the guest kernel package setup-host keeps in apt's cache.
  skipReason = await guestSkipReason();
  if (skipReason) return;
  server = await startTestServer({ extraEnv: { CUBICLE_MICROVM: "tcg", CUBICLE_DURABLE_PAUSE_AFTER_SEC: "3" } });
  useServerForSdk(server);
});

after(async () => {
  await server?.stop();
});

/** The server's QEMUs, spares included (SPARE_QEMU_NOTE). */
function allQemuPids(): number[] {
  try {
    return execFileSync("pgrep", ["-f", `qemu-system-x86_64.*${server!.runDir}`], { encoding: "utf8" }).trim().split("\n").filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

/** The QEMUs of the server's guests: not the spares still waiting for a state. */
function qemuPids(): number[] {
  const spares = new Set(spareQemuPids(server!));
  return allQemuPids().filter((pid) => !spares.has(pid) && !processArgv(pid).includes(`${server!.runDir}/microvm-spares/`) || guestPidFiles().has(pid));
}

function processArgv(pid: number): string {
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, "utf8");
  } catch {
    return "";
  }
}

/** Pids in the guests' pid files (a spare taken by a restore has its pid file in the guest's directory). */
function guestPidFiles(): Set<number> {
  const root = path.join(server!.runDir, "microvm");
  const ids = fs.existsSync(root) ? fs.readdirSync(root) : [];
  return new Set(ids.map((id) => Number((() => { try { return fs.readFileSync(path.join(root, id, "run", "qemu.pid"), "utf8"); } catch { return ""; } })().trim())));
}

/** The spare waiting for an image whose id contains `name` (any: ""), of the server in `runDir`, within `ms` (SPARE_QEMU_NOTE). */
async function spareFor(name: string, runDir = server!.runDir, ms = 60_000): Promise<{ dir: string; pid: number } | undefined> {
  const root = path.join(runDir, "microvm-spares");
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    // Spares are `s<n>`; `c<n>` is an image's conversion to a RAM file (RAM_FILE_CONVERSION_NOTE).
    for (const slot of (fs.existsSync(root) ? fs.readdirSync(root) : []).filter((name) => name.startsWith("s"))) {
      try {
        const { imageId } = JSON.parse(fs.readFileSync(path.join(root, slot, "spare.json"), "utf8")) as { imageId: string };
        const pid = Number(fs.readFileSync(path.join(root, slot, "run", "qemu.pid"), "utf8").trim());
        if (imageId.includes(name) && pid > 1) return { dir: path.join(root, slot), pid };
      } catch {
        // being made or taken
      }
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  return undefined;
}

test("runtime microvm: a QEMU guest with its own kernel runs the agent; the SDK drives it; a restart adopts it; kill ends QEMU", { timeout: 10 * 60_000 }, async (t) => {
  if (skipReason || !server) return t.skip(skipReason ?? "no server");
  const created = await server.api("POST", "/v2/sandboxes", { templateID: "base", runtime: "microvm", timeout: 600 });
  assert.equal(created.status, 201, `${JSON.stringify(created.json)}\n${server.log().slice(-3000)}`);
  const id = created.json.sandboxID as string;
  try {
    assert.equal((await server.api("GET", `/sandboxes/${id}`)).json.runtime, "microvm");
    assert.equal(qemuPids().length, 1, "one QEMU for the guest");
    const sandbox = await Sandbox.connect(id);
    const kernel = await sandbox.commands.run("uname -r; cat /proc/1/comm; id -un; echo $HOME");
    const [release, init, user, home] = kernel.stdout.trim().split("\n");
    assert.match(release!, /cloud-amd64$/, "the guest's own kernel, not the host's");
    assert.notEqual(release, execFileSync("uname", ["-r"], { encoding: "utf8" }).trim());
    assert.equal(init, "init");
    assert.equal(user, "user");
    assert.equal(home, "/home/user");
    // The guest's root file system is the sandbox's disk size, and a write past it fails in the guest.
    const diskMB = (await server.api("GET", `/sandboxes/${id}`)).json.diskSizeMB as number;
    const sizeMB = Number((await sandbox.commands.run("df -m --output=size / | tail -1")).stdout.trim());
    assert.ok(sizeMB > diskMB * 0.9 && sizeMB <= diskMB, `root file system ${sizeMB} MB for a ${diskMB} MB disk`);
    const fill = await sandbox.commands.run(`fallocate -l ${diskMB + 64}M /home/user/too-big 2>&1; echo "rc=$?"; rm -f /home/user/too-big`);
    assert.match(fill.stdout, /No space left on device[\s\S]*rc=1/);
    await sandbox.files.write("/home/user/in-the-vm.txt", "written through envd");
    assert.equal(await sandbox.files.read("/home/user/in-the-vm.txt"), "written through envd");
    // A pause without memory keeps the disk (synced first) and boots a new guest on it (MICROVM_FILES_NOTE).
    await sandbox.commands.run("sleep 600", { background: true });
    const bootBefore = (await sandbox.commands.run("cat /proc/sys/kernel/random/boot_id")).stdout;
    const [qemuBeforePause] = qemuPids();
    assert.equal((await server.api("POST", `/sandboxes/${id}/pause`, { memory: false })).status, 204);
    assert.deepEqual(qemuPids(), [], "the guest's QEMU has ended");
    const rebooted = await Sandbox.connect(id);
    assert.equal((await rebooted.commands.run("cat /home/user/in-the-vm.txt")).stdout, "written through envd");
    assert.equal((await rebooted.commands.run("pgrep -x sleep | wc -l")).stdout.trim(), "0", "its processes did not survive");
    assert.notEqual((await rebooted.commands.run("cat /proc/sys/kernel/random/boot_id")).stdout, bootBefore, "a new boot");
    assert.notDeepEqual(qemuPids(), [qemuBeforePause]);
    // Pause keeps the guest in RAM (QMP stop); connect resumes it.
    assert.equal((await server.api("POST", `/sandboxes/${id}/pause`)).status, 204);
    assert.equal((await server.api("GET", `/sandboxes/${id}`)).json.state, "paused");
    await new Promise((resolve) => setTimeout(resolve, 6000));
    const resumed = await Sandbox.connect(id);
    assert.equal((await resumed.commands.run("echo awake")).stdout, "awake\n");
    // Its clock stood still while it was paused; the agent sets it from the RTC (GUEST_MACHINE_NOTE).
    const guestSeconds = Number((await resumed.commands.run("date +%s")).stdout.trim());
    assert.ok(Math.abs(guestSeconds - Date.now() / 1000) < 3, `after a 6 s pause the guest's clock says ${guestSeconds}, the host's ${Math.round(Date.now() / 1000)}`);
    // A server crash leaves the guest running: the next server adopts it (same QEMU, same files).
    // The spare QEMU a snapshot got (SPARE_QEMU_NOTE) is no guest: the next server ends it.
    const snapshot = await server.api("POST", `/sandboxes/${id}/snapshots`, {});
    assert.equal(snapshot.status, 201, JSON.stringify(snapshot.json));
    const spare = await spareFor(snapshot.json.snapshotID as string);
    assert.ok(spare, "a spare QEMU waits for the snapshot's image");
    const [qemuBefore] = qemuPids();
    await server.crashAndRestart();
    assert.deepEqual(qemuPids(), [qemuBefore], "the same QEMU, adopted");
    assert.ok(!allQemuPids().includes(spare.pid), "the crashed server's spare QEMU has ended");
    assert.ok(!fs.existsSync(spare.dir), "and its directory is gone");
    assert.equal((await server.api("DELETE", `/templates/${snapshot.json.snapshotID as string}`)).status, 204);
    const info = await server.api("GET", `/sandboxes/${id}`);
    assert.equal(info.json.state, "running", JSON.stringify(info.json));
    const adopted = await Sandbox.connect(id);
    assert.equal((await adopted.commands.run("cat /home/user/in-the-vm.txt")).stdout, "written through envd");
  } finally {
    assert.equal((await server.api("DELETE", `/sandboxes/${id}`)).status, 204);
  }
  for (let i = 0; i < 50 && qemuPids().length > 0; i++) await new Promise((resolve) => setTimeout(resolve, 100));
  assert.deepEqual(qemuPids(), [], "QEMU has ended");
  const containers = await server.api("POST", "/v2/sandboxes", { templateID: "base", timeout: 60 });
  assert.equal(containers.status, 201, "containers stay the default");
  assert.equal((await server.api("GET", `/sandboxes/${containers.json.sandboxID}`)).json.runtime, "container");
  await server.api("DELETE", `/sandboxes/${containers.json.sandboxID}`);
});

/** A command's stdout in a sandbox, as root. */
async function run(sandbox: Sandbox, command: string): Promise<string> {
  return (await sandbox.commands.run(command, { user: "root" })).stdout.trim();
}

test("microVM memory images (MICROVM_IMAGE_NOTE): snapshot, create from it, fork, rollback and pause to disk bring back the guest's RAM, processes and files; kill and delete leave nothing", { timeout: 15 * 60_000 }, async (t) => {
  if (skipReason || !server) return t.skip(skipReason ?? "no server");
  const created = await server.api("POST", "/v2/sandboxes", { templateID: "base", runtime: "microvm", timeout: 900 });
  assert.equal(created.status, 201, JSON.stringify(created.json));
  const sourceId = created.json.sandboxID as string;
  const made: string[] = [sourceId];
  const imagesDir = path.join(server.stateDir, "microvm", "images");
  try {
    const source = await Sandbox.connect(sourceId);
    await source.files.write("/home/user/note.txt", "version 1");
    // RAM only (a tmpfs of the guest) and a process that counts: both must come back.
    await run(source, "echo ram-only > /dev/shm/marker");
    await source.commands.run("sh -c 'i=0; while sleep 0.2; do i=$((i+1)); echo $i > /dev/shm/count; done'", { background: true, user: "root" });
    const identity = (sandbox: Sandbox) => run(sandbox, "cat /proc/sys/kernel/random/boot_id /etc/machine-id 2>/dev/null; true");
    const sourceIdentity = await identity(source);

    const snapshot = await server.api("POST", `/sandboxes/${sourceId}/snapshots`, {});
    assert.equal(snapshot.status, 201, JSON.stringify(snapshot.json));
    const snapshotId = snapshot.json.snapshotID as string;
    assert.equal(await run(source, "cat /dev/shm/marker"), "ram-only", "the source runs on");
    await source.files.write("/home/user/note.txt", "version 2");
    assert.equal(fs.readdirSync(path.join(imagesDir, "snapshots")).length, 1, "the image is the microVM runtime's");

    const restored = await Sandbox.create(snapshotId, { timeoutMs: 600_000 });
    made.push(restored.sandboxId);
    assert.equal((await server.api("GET", `/sandboxes/${restored.sandboxId}`)).json.runtime, "microvm");
    assert.equal(await run(restored, "cat /dev/shm/marker"), "ram-only", "the guest's RAM came back");
    assert.equal(await restored.files.read("/home/user/note.txt"), "version 1", "its disk is the snapshot's");
    const count = Number(await run(restored, "cat /dev/shm/count"));
    await new Promise((resolve) => setTimeout(resolve, 1500));
    assert.ok(Number(await run(restored, "cat /dev/shm/count")) > count, "the counting process runs on in the restored guest");
    assert.equal(await run(restored, "hostname"), restored.sandboxId, "it is named after its own id");
    assert.equal(await source.files.read("/home/user/note.txt"), "version 2", "the source kept its own disk");
    // GUEST_MACHINE_NOTE: a new machine (ids, randomness), with the time of now, not of the snapshot.
    const restoredIdentity = await identity(restored);
    assert.notEqual(restoredIdentity.split("\n")[0], sourceIdentity.split("\n")[0], "a new boot id");
    assert.match(restoredIdentity.split("\n")[1] ?? "", /^[0-9a-f]{32}$/);
    assert.notEqual(restoredIdentity.split("\n")[1], sourceIdentity.split("\n")[1], "a new machine id");
    const guestSeconds = Number(await run(restored, "date +%s"));
    assert.ok(Math.abs(guestSeconds - Date.now() / 1000) < 5, `the guest's clock says ${guestSeconds}, the host's ${Math.round(Date.now() / 1000)}`);

    // A snapshot of a restored guest (its RAM a private mapping) holds its RAM in its stream at
    // first; in the background it gets a RAM file and a device-only state (RAM_FILE_CONVERSION_NOTE),
    // which a create from it then maps: the image's pages, shared, not a copy of its own.
    const second = await server.api("POST", `/sandboxes/${restored.sandboxId}/snapshots`, {});
    assert.equal(second.status, 201, JSON.stringify(second.json));
    const secondDir = path.join(imagesDir, "snapshots", second.json.snapshotID as string);
    const converted = () => {
      const meta = JSON.parse(fs.readFileSync(path.join(secondDir, "meta.json"), "utf8")) as { ramFile?: boolean; stateFile?: string };
      return meta.ramFile === true && meta.stateFile === "state.ram" && !fs.existsSync(path.join(secondDir, "state")) && fs.existsSync(path.join(secondDir, "ram"));
    };
    for (let i = 0; i < 300 && !converted(); i++) await new Promise((resolve) => setTimeout(resolve, 200));
    assert.ok(converted(), `the image got its RAM file: ${fs.readdirSync(secondDir).join(", ")}`);
    const fromSecond = await Sandbox.create(second.json.snapshotID as string, { timeoutMs: 600_000 });
    made.push(fromSecond.sandboxId);
    assert.equal(await run(fromSecond, "cat /dev/shm/marker"), "ram-only", "the converted image holds the guest's RAM");
    assert.equal(await run(fromSecond, "hostname"), fromSecond.sandboxId);
    const secondPid = fs.readFileSync(path.join(server.runDir, "microvm", fromSecond.sandboxId, "run", "qemu.pid"), "utf8").trim();
    assert.ok(fs.readFileSync(`/proc/${secondPid}/maps`, "utf8").includes(path.join(secondDir, "ram")), "its QEMU maps the image's RAM file");
    await fromSecond.kill();

    const forks = await restored.fork({ count: 2, timeoutMs: 600_000 });
    assert.equal(forks.length, 2);
    const randomness: string[] = [];
    for (const fork of forks) {
      assert.ok(fork instanceof Sandbox, String(fork));
      made.push(fork.sandboxId);
      randomness.push(await run(fork, "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"));
      assert.equal(await run(fork, "cat /dev/shm/marker"), "ram-only");
      assert.equal(await run(fork, "hostname"), fork.sandboxId);
      assert.notEqual((await identity(fork)).split("\n")[0], restoredIdentity.split("\n")[0], "a fork is a new machine too");
    }
    assert.notEqual(randomness[0], randomness[1], "two forks of one image read different random bytes");
    await (forks[0] as Sandbox).files.write("/home/user/note.txt", "fork 0");
    assert.equal(await (forks[1] as Sandbox).files.read("/home/user/note.txt"), "version 1", "forks are independent");

    // Rollback in place: same id, the snapshot's RAM and files; its restore takes the QEMU
    // started ahead for the snapshot's image (SPARE_QEMU_NOTE), which a restore made.
    await run(source, "rm /dev/shm/marker");
    const spare = await spareFor(snapshotId);
    assert.ok(spare, "a spare QEMU waits for the snapshot's image");
    const rolled = await server.api("POST", `/sandboxes/${sourceId}/rollback`, { snapshotID: snapshotId });
    assert.equal(rolled.status, 200, JSON.stringify(rolled.json));
    assert.equal(fs.readFileSync(path.join(server.runDir, "microvm", sourceId, "run", "qemu.pid"), "utf8").trim(), String(spare.pid), "the rolled-back guest runs in the spare's QEMU");
    assert.ok(!fs.existsSync(spare.dir), "the spare's directory became the guest's");
    const back = await Sandbox.connect(sourceId);
    assert.equal(await run(back, "cat /dev/shm/marker"), "ram-only");
    assert.equal(await back.files.read("/home/user/note.txt"), "version 1");
    assert.equal(await run(back, "hostname"), sourceId);
    assert.equal(await identity(back), sourceIdentity, "a rollback brings back the same machine");

    // A pause goes to disk after CUBICLE_DURABLE_PAUSE_AFTER_SEC: QEMU ends, the resume loads its image.
    const qemuCount = qemuPids().length;
    assert.equal((await server.api("POST", `/sandboxes/${sourceId}/pause`)).status, 204);
    for (let i = 0; i < 100 && qemuPids().length === qemuCount; i++) await new Promise((resolve) => setTimeout(resolve, 200));
    assert.equal(qemuPids().length, qemuCount - 1, "the paused guest's QEMU ended: its memory is on disk");
    assert.equal(fs.readdirSync(path.join(imagesDir, "paused")).length, 1);
    const woken = await Sandbox.connect(sourceId);
    assert.equal(await run(woken, "cat /dev/shm/marker"), "ram-only", "the pause image held the RAM");
    assert.equal(qemuPids().length, qemuCount);
  } finally {
    for (const id of made) await server.api("DELETE", `/sandboxes/${id}`);
  }
  for (let i = 0; i < 50 && qemuPids().length > 0; i++) await new Promise((resolve) => setTimeout(resolve, 100));
  assert.deepEqual(qemuPids(), [], "every QEMU has ended");
  assert.deepEqual(fs.readdirSync(path.join(imagesDir, "paused")), [], "the pause image went with its resume");
  const snapshots = (await server.api("GET", "/snapshots")).json as { snapshotID: string }[];
  for (const snapshot of snapshots) assert.equal((await server.api("DELETE", `/templates/${snapshot.snapshotID}`)).status, 204);
  for (let i = 0; i < 50 && fs.readdirSync(path.join(imagesDir, "snapshots")).length > 0; i++) await new Promise((resolve) => setTimeout(resolve, 100));
  assert.deepEqual(fs.readdirSync(path.join(imagesDir, "snapshots")), [], "a deleted snapshot's image is gone");
  assert.deepEqual(fs.readdirSync(path.join(server.runDir, "microvm")), [], "no guest directory is left");
  // A deleted image's spares end with it (they map its RAM file and hold a copy of its disk).
  for (let i = 0; i < 100 && allQemuPids().length > 0; i++) await new Promise((resolve) => setTimeout(resolve, 100));
  assert.deepEqual(allQemuPids(), [], "no spare QEMU outlives its image");
  assert.deepEqual(fs.readdirSync(path.join(server.runDir, "microvm-spares")), [], "no spare's directory is left");
});

test("a template made by the template builder runs in a microVM: its layer over its base, removed files gone; its guest image goes with the template (BUILT_TEMPLATE_IMAGE_NOTE)", { timeout: 10 * 60_000 }, async (t) => {
  if (skipReason || !server) return t.skip(skipReason ?? "no server");
  const template = Template()
    .fromTemplate("base")
    .runCmd("mkdir -p /opt/vm && echo built-for-the-vm > /opt/vm/marker && rm /etc/debian_version", { user: "root" });
  await Template.build(template, "e2e-microvm-built");
  const created = await server.api("POST", "/v2/sandboxes", { templateID: "e2e-microvm-built", runtime: "microvm", timeout: 300 });
  assert.equal(created.status, 201, `${JSON.stringify(created.json)}\n${server.log().slice(-3000)}`);
  const id = created.json.sandboxID as string;
  try {
    assert.equal((await server.api("GET", `/sandboxes/${id}`)).json.runtime, "microvm");
    const sandbox = await Sandbox.connect(id);
    const seen = await sandbox.commands.run("cat /opt/vm/marker; test -e /etc/debian_version && echo still-there || echo removed; uname -r");
    const [marker, removed, release] = seen.stdout.trim().split("\n");
    assert.equal(marker, "built-for-the-vm");
    assert.equal(removed, "removed", "the step's rm (a whiteout in the layer) holds in the guest");
    assert.match(release!, /cloud-amd64$/);
  } finally {
    assert.equal((await server.api("DELETE", `/sandboxes/${id}`)).status, 204);
    const removed = await server.api("DELETE", "/templates/e2e-microvm-built");
    assert.ok(removed.status === 204 || removed.status === 200, JSON.stringify(removed.json));
  }
  // Its guest disk image goes with it at the next start (its layer image is gone).
  const builtImages = () => fs.readdirSync(path.join(server!.stateDir, "microvm")).filter((name) => name.startsWith("template-built."));
  assert.equal(builtImages().length, 1, "the built template's guest image");
  await server.crashAndRestart();
  assert.deepEqual(builtImages(), [], "removed once its template is gone");
});

test("./cubicle bench runtimes: both runtimes side by side, the QEMU start floor, the report's section; nothing left running", { timeout: 10 * 60_000 }, async (t) => {
  if (skipReason || !server) return t.skip(skipReason ?? "no server");
  const resultsDir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-bench-runtimes-"));
  try {
    const file = await runBench(parseBenchArgs(["runtimes", "-n", "1", "--background", "1", "--settle-ms", "200", "-o", resultsDir, "--quiet"]), benchTargetOf(server));
    const result = JSON.parse(fs.readFileSync(file, "utf8")) as BenchResultFile;
    assert.equal(result.status, "ok", `${result.reason} ${result.errors.join("; ")}`);
    assert.deepEqual(result.errors, []);
    const s = result.summary as Record<string, any>;
    for (const runtime of ["container", "microvm"]) {
      assert.equal(s.runtimes[runtime].creates, 1, runtime);
      assert.ok(s.runtimes[runtime].firstCommandMs.p50 > 0 && s.runtimes[runtime].resumeMs.p50 > 0, JSON.stringify(s.runtimes[runtime]));
      assert.equal(s.runtimes[runtime].idleMemory.sandboxes, 1, runtime);
    }
    assert.ok(s.qemuStartFloorMs.p50 > 0 && s.microvmFirstCommandOverQemuStart > 1, JSON.stringify(s));
    assert.ok(s.runtimes.microvm.firstCommandMs.p50 > s.qemuStartFloorMs.p50);
    // The second create from the snapshot found the spare QEMU waiting for it (SPARE_QEMU_NOTE).
    assert.equal(s.runtimes.microvm.spareWaited, 1, JSON.stringify(s.runtimes.microvm));
    assert.ok(s.runtimes.microvm.restoreAgainFirstCommandMs.p50 > 0 && s.runtimes.container.restoreAgainFirstCommandMs.p50 > 0);
    const report = writeReport({ resultsDir, reportDir: resultsDir });
    assert.match(fs.readFileSync(report.reportPath, "utf8"), /## Runtimes: containers and microVMs side by side[\s\S]*\| microvm \| 1 \|/);
    assert.deepEqual(qemuPids(), [], "no QEMU left running");
    const live = await server.api("GET", "/v2/sandboxes");
    assert.deepEqual(live.json, [], "no sandbox left");
  } finally {
    fs.rmSync(resultsDir, { recursive: true, force: true });
  }
});

test("a warm pool of microVMs: a create of a microVM template claims a frozen guest (its QEMU stopped) and runs at once; a create that asks for a container boots one; the pool refills", { timeout: 10 * 60_000 }, async (t) => {
  if (skipReason || !server) return t.skip(skipReason ?? "no server");
  const pooled = await startTestServer({ extraEnv: { CUBICLE_MICROVM: "tcg", CUBICLE_TEMPLATE_RUNTIME: "base=microvm", CUBICLE_POOL_SIZE: "base=1" } });
  const qemuOf = () => {
    try {
      return execFileSync("pgrep", ["-f", `qemu-system-x86_64.*${pooled.runDir}`], { encoding: "utf8" }).trim().split("\n").filter(Boolean).map(Number);
    } catch {
      return [];
    }
  };
  const ready = async (count: number) => {
    const deadline = Date.now() + 5 * 60_000;
    for (;;) {
      const pools = (await pooled.api("GET", "/pools")).json;
      if ((pools?.base?.ready ?? 0) >= count) return;
      if (Date.now() > deadline) throw new Error(`the microVM pool did not fill: ${JSON.stringify(pools)}\n${pooled.log().slice(-3000)}`);
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  };
  const made: string[] = [];
  try {
    await ready(1);
    const [entryQemu] = qemuOf();
    assert.ok(entryQemu, "the pool entry is a QEMU guest");
    // Frozen: QEMU stopped its vCPUs (QMP stop), so the guest uses no CPU while it waits (an idle
    // running guest under TCG takes ~8 % of a core: ~17 ticks in 2 s, measured).
    const cpuTicks = () => fs.readFileSync(`/proc/${entryQemu}/stat`, "utf8").split(") ")[1]!.split(" ").slice(11, 13).reduce((sum, value) => sum + Number(value), 0);
    const before = cpuTicks();
    await new Promise((resolve) => setTimeout(resolve, 2000));
    assert.ok(cpuTicks() - before <= 3, `the frozen guest's QEMU used ${cpuTicks() - before} ticks in 2 s`);
    const created = await pooled.api("POST", "/v2/sandboxes", { templateID: "base", timeout: 300 });
    assert.equal(created.status, 201, JSON.stringify(created.json));
    made.push(created.json.sandboxID);
    assert.equal((await pooled.api("GET", `/sandboxes/${created.json.sandboxID}`)).json.runtime, "microvm");
    assert.ok(qemuOf().includes(entryQemu), "the claim took the pool's guest, not a new QEMU");
    assert.equal((await pooled.api("GET", "/pools")).json.base.ready, 0, "the entry was claimed");
    useServerForSdk(pooled);
    const sandbox = await Sandbox.connect(created.json.sandboxID);
    const run = await sandbox.commands.run("uname -r; hostname");
    assert.match(run.stdout, /cloud-amd64\n/, "the guest's own kernel");
    assert.equal(run.stdout.split("\n")[1], created.json.sandboxID, "the claimed guest carries the sandbox's name");
    // A create that asks for a container does not take a microVM entry.
    const container = await pooled.api("POST", "/v2/sandboxes", { templateID: "base", runtime: "container", timeout: 60 });
    assert.equal(container.status, 201, JSON.stringify(container.json));
    made.push(container.json.sandboxID);
    assert.equal((await pooled.api("GET", `/sandboxes/${container.json.sandboxID}`)).json.runtime, "container");
    await ready(1);
  } finally {
    if (server) useServerForSdk(server);
    for (const id of made) await pooled.api("DELETE", `/sandboxes/${id}`).catch(() => undefined);
    await pooled.stop();
  }
  assert.deepEqual(qemuOf(), [], "the pool's guests end with the server");
});

test("a microVM template's warm snapshot: creates restore a guest whose agent already runs, each a new machine; a create the image cannot serve boots", { timeout: 10 * 60_000 }, async (t) => {
  if (skipReason || !server) return t.skip(skipReason ?? "no server");
  const warm = await startTestServer({ extraEnv: { CUBICLE_MICROVM: "tcg", CUBICLE_TEMPLATE_RUNTIME: "base=microvm", CUBICLE_POOL_SIZE: "", CUBICLE_WARM_SNAPSHOT: "base" } });
  const counts = async () => ((await warm.api("GET", "/warm-snapshots")).json ?? {}).base as { ready: boolean; restores: number } | undefined;
  const made: string[] = [];
  try {
    const deadline = Date.now() + 5 * 60_000;
    while (!(await counts())?.ready) {
      if (Date.now() > deadline) throw new Error(`no warm snapshot of the microVM template: ${JSON.stringify(await counts())}\n${warm.log().slice(-3000)}`);
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
    assert.equal(fs.readdirSync(path.join(warm.stateDir, "microvm", "images", "warm")).length, 1, "a microVM image");
    useServerForSdk(warm);
    const ids: string[] = [];
    for (let i = 0; i < 2; i++) {
      const restoresBefore = (await counts())!.restores;
      // The second create restores into the QEMU started ahead for the warm image (SPARE_QEMU_NOTE).
      const spare = i === 1 ? (await spareFor("", warm.runDir))?.pid : undefined;
      if (i === 1) assert.ok(spare, "a spare QEMU waits for the warm image");
      const started = performance.now();
      const created = await warm.api("POST", "/v2/sandboxes", { templateID: "base", timeout: 300 });
      assert.equal(created.status, 201, JSON.stringify(created.json));
      made.push(created.json.sandboxID);
      const sandbox = await Sandbox.connect(created.json.sandboxID);
      const out = (await sandbox.commands.run("hostname; cat /proc/sys/kernel/random/boot_id; uname -r")).stdout.trim().split("\n");
      console.log(`microVM create from the warm snapshot → first command: ${Math.round(performance.now() - started)} ms`);
      assert.equal((await counts())!.restores, restoresBefore + 1, "restored from the warm snapshot");
      assert.equal((await warm.api("GET", `/sandboxes/${created.json.sandboxID}`)).json.runtime, "microvm");
      assert.equal(out[0], created.json.sandboxID);
      assert.match(out[2]!, /cloud-amd64$/);
      ids.push(out[1]!);
      if (spare) assert.equal(fs.readFileSync(path.join(warm.runDir, "microvm", created.json.sandboxID, "run", "qemu.pid"), "utf8").trim(), String(spare), "the create ran in the spare's QEMU");
    }
    assert.notEqual(ids[0], ids[1], "each restored guest is a new machine (its own boot id)");
    // Env vars at create are the image's agent's business at boot: such a create boots cold.
    const restoresBefore = (await counts())!.restores;
    const cold = await warm.api("POST", "/v2/sandboxes", { templateID: "base", timeout: 300, envVars: { WHO: "cold" } });
    assert.equal(cold.status, 201, JSON.stringify(cold.json));
    made.push(cold.json.sandboxID);
    assert.equal((await counts())!.restores, restoresBefore, "not from the image");
  } finally {
    if (server) useServerForSdk(server);
    for (const id of made) await warm.api("DELETE", `/sandboxes/${id}`).catch(() => undefined);
    await warm.stop();
  }
  const left = (() => {
    try {
      return execFileSync("pgrep", ["-f", `qemu-system-x86_64.*${warm.runDir}`], { encoding: "utf8" }).trim();
    } catch {
      return "";
    }
  })();
  assert.equal(left, "", "the server's spare QEMUs end with it");
});

test("the image budget bounds microVM images too (IMAGE_BUDGET_NOTE): a snapshot past it is a 507 that leaves nothing, and the guest runs on", { timeout: 10 * 60_000 }, async (t) => {
  if (skipReason || !server) return t.skip(skipReason ?? "no server");
  // 20 MiB: a guest's memory image (its touched RAM) is far bigger.
  const bounded = await startTestServer({ extraEnv: { CUBICLE_MICROVM: "tcg", CUBICLE_POOL_SIZE: "", CUBICLE_WARM_SNAPSHOT: "none", CUBICLE_IMAGE_BUDGET_GB: String(20 / 1024) } });
  let id: string | undefined;
  try {
    const created = await bounded.api("POST", "/v2/sandboxes", { templateID: "base", runtime: "microvm", timeout: 300 });
    assert.equal(created.status, 201, JSON.stringify(created.json));
    id = created.json.sandboxID as string;
    const refused = await bounded.api("POST", `/sandboxes/${id}/snapshots`, {});
    assert.equal(refused.status, 507, JSON.stringify(refused.json));
    assert.equal(refused.json.code, 507);
    assert.match(refused.json.message, /no space left|storage .* is full|free (some )?space/i);
    assert.doesNotMatch(refused.json.message, /\/var|\/tmp|\/run/, "no host paths");
    assert.match(bounded.log(), /the image budget is used up \(\d+ of 20 MiB in use; this image needs about \d+ MiB\)/, "refused by the budget, before anything was written");
    const snapshots = path.join(bounded.stateDir, "microvm", "images", "snapshots");
    assert.deepEqual(fs.existsSync(snapshots) ? fs.readdirSync(snapshots) : [], [], "nothing written");
    assert.deepEqual((await bounded.api("GET", "/snapshots")).json, []);
    const info = await bounded.api("GET", `/sandboxes/${id}`);
    assert.equal(info.json.state, "running");
    useServerForSdk(bounded);
    const sandbox = await Sandbox.connect(id);
    assert.equal((await sandbox.commands.run("echo still here")).stdout, "still here\n", "the guest was resumed");
  } finally {
    if (server) useServerForSdk(server);
    if (id) await bounded.api("DELETE", `/sandboxes/${id}`).catch(() => undefined);
    await bounded.stop();
  }
});
