/**
 * Containers and microVMs side by side (issue 17), in one run against one server that runs both
 * (CUBICLE_MICROVM=tcg or kvm): per runtime, cold create → first command (the two runtimes
 * alternating, so drift hits both alike), pause → connect → first command, and host memory per
 * idle sandbox with `--background N` (default 5) of each alive (MemAvailable before and after,
 * settled). The floor
 * for the microVMs, measured in the same run: a QEMU microvm start (`-S`, no guest) until QMP
 * answers, then its quit; the containers' floor (runc run+delete) is the baseline scenario's.
 * Memory images: per create, a snapshot of the running sandbox and a create from it → first
 * command (the container's of the same round is the microVM's floor); and host memory per idle
 * sandbox made from one snapshot (`--background N` of each from one image), beside the cold
 * ones: how much of an image's pages sandboxes made from it share. Warm pools of microVMs have
 * their own bench (bench/microvm-pool.sh).
 */
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { QmpClient } from "../../runtime/microvm/qmp.js";
import { qemuCommand, qemuInstall } from "../../runtime/microvm/qemu-install.js";
import { runCommand } from "../../shared/exec.js";
import { memAvailableBytes } from "../machine.js";
import { microvmQemuMemory, spareQemuMemory } from "../process-memory.js";
import type { BenchOptions } from "../options.js";
import { Progress } from "../progress.js";
import { notAvailable, type ScenarioResult } from "../result.js";
import { errorMessage, round2 } from "../run-helpers.js";
import { summarize } from "../stats.js";
import { callApi, loadSandboxSdk, type BenchTarget } from "../target.js";
import { firstSuccessfulCommand } from "./create.js";

const RUNTIMES = ["container", "microvm"] as const;

/** Host memory per idle sandbox (MemAvailable before and after), and for microVMs each QEMU's smaps means. */
interface IdleMemory {
  sandboxes: number;
  perSandboxMiB: number;
  qemu?: { processes: number; rssMiB: number; pssMiB: number; privateMiB: number };
}
type RuntimeName = (typeof RUNTIMES)[number];
/** A TCG guest boots in seconds: its first command may take this long. */
const FIRST_COMMAND_DEADLINE_MS = 180_000;

interface CreateSample {
  runtime: RuntimeName;
  apiMs: number;
  firstCommandMs: number;
  resumeMs: number;
  /** POST /sandboxes/{id}/snapshots of the running sandbox until its 201. */
  snapshotMs: number;
  /** Create from that snapshot → its first command. */
  restoreFirstCommandMs: number;
  /**
   * A second create from the same snapshot → its first command, once the microVM runtime's spare
   * QEMU for the image waits (SPARE_QEMU_NOTE; the container's of the same round is its floor).
   */
  restoreAgainFirstCommandMs: number;
  /** Whether a spare QEMU waited for the image before that second create (microVMs). */
  spareWaited?: boolean;
  /** What that waiting spare QEMU held (smaps_rollup), MiB. */
  spareQemu?: { rssMiB: number; pssMiB: number; privateMiB: number };
}

/**
 * Waits up to `ms` for a spare QEMU of the server in `runDir` for an image whose id names
 * `snapshotId`; its memory once it waits, or undefined when none came.
 */
async function spareWaits(runDir: string | undefined, snapshotId: string, ms: number): Promise<{ rssMiB: number; pssMiB: number; privateMiB: number } | undefined> {
  if (!runDir) return undefined;
  const root = path.join(runDir, "microvm-spares");
  const mib = (bytes: number) => round2(bytes / 2 ** 20);
  for (const deadline = Date.now() + ms; Date.now() < deadline; await new Promise((resolve) => setTimeout(resolve, 100))) {
    // Spares are `s<n>`; `c<n>` is an image's conversion to a RAM file (RAM_FILE_CONVERSION_NOTE).
    for (const slot of (await readdir(root).catch(() => [] as string[])).filter((name) => name.startsWith("s"))) {
      const spare = await readFile(path.join(root, slot, "spare.json"), "utf8").catch(() => "");
      if (!spare.includes(snapshotId)) continue;
      const memory = (await spareQemuMemory(runDir)).find((found) => found.slot === slot)?.memory;
      return memory ? { rssMiB: mib(memory.rssBytes), pssMiB: mib(memory.pssBytes), privateMiB: mib(memory.privateBytes) } : { rssMiB: NaN, pssMiB: NaN, privateMiB: NaN };
    }
  }
  return undefined;
}

/** A QEMU microvm without a guest (`-S`): spawned, daemonized, QMP answering, then quit. */
async function qemuStartFloorMs(): Promise<number> {
  const dir = await mkdtemp(path.join(os.tmpdir(), "cubicle-bench-qemu-"));
  const socket = path.join(dir, "qmp.sock");
  const started = performance.now();
  try {
    await runCommand([...qemuCommand(qemuInstall()), "-M", "microvm", "-accel", "tcg", "-nodefaults", "-no-user-config", "-display", "none", "-S", "-qmp", `unix:${socket},server=on,wait=off`, "-pidfile", path.join(dir, "pid"), "-daemonize"], { timeoutMs: 30_000 });
    const qmp = await QmpClient.connect(socket);
    await qmp.execute("query-status");
    const ms = performance.now() - started;
    await qmp.execute("quit").catch(() => undefined);
    qmp.close();
    return round2(ms);
  } finally {
    const pid = Number((await readFile(path.join(dir, "pid"), "utf8").catch(() => "")).trim());
    if (pid > 1) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // quit already ended it
      }
    }
    await rm(dir, { recursive: true, force: true });
  }
}

export async function benchRuntimes(options: BenchOptions, target: BenchTarget): Promise<ScenarioResult> {
  const Sandbox = await loadSandboxSdk(target);
  const errors: string[] = [];
  const probe = await callApi(target, "POST", "/v2/sandboxes", { templateID: options.template, runtime: "microvm", timeout: 120 });
  if (probe.status !== 201) return notAvailable(`this server runs no microVMs: ${probe.status} ${JSON.stringify(probe.json)}`);
  await callApi(target, "DELETE", `/sandboxes/${probe.json.sandboxID}`);

  const createOne = async (runtime: RuntimeName): Promise<{ sample: CreateSample; id: string }> => {
    const started = performance.now();
    const created = await callApi(target, "POST", "/v2/sandboxes", { templateID: options.template, runtime, timeout: 1800 });
    if (created.status !== 201) throw new Error(`${runtime} create: ${created.status} ${JSON.stringify(created.json)}`);
    const apiMs = round2(performance.now() - started);
    const id = created.json.sandboxID as string;
    const sandbox = await Sandbox.connect(id, { timeoutMs: 1_800_000 });
    const first = await firstSuccessfulCommand(sandbox, started, FIRST_COMMAND_DEADLINE_MS);
    const paused = await callApi(target, "POST", `/sandboxes/${id}/pause`);
    if (paused.status !== 204) throw new Error(`${runtime} pause: ${paused.status}`);
    const resumeStarted = performance.now();
    const resumed = await Sandbox.connect(id, { timeoutMs: 1_800_000 });
    const resume = await firstSuccessfulCommand(resumed, resumeStarted, FIRST_COMMAND_DEADLINE_MS);
    const snapshotStarted = performance.now();
    const snapshot = await callApi(target, "POST", `/sandboxes/${id}/snapshots`, {});
    if (snapshot.status !== 201) throw new Error(`${runtime} snapshot: ${snapshot.status} ${JSON.stringify(snapshot.json)}`);
    const snapshotMs = round2(performance.now() - snapshotStarted);
    const snapshotId = snapshot.json.snapshotID as string;
    try {
      const restoreStarted = performance.now();
      const fromSnapshot = await callApi(target, "POST", "/v2/sandboxes", { templateID: snapshotId, timeout: 1800 });
      if (fromSnapshot.status !== 201) throw new Error(`${runtime} create from a snapshot: ${fromSnapshot.status} ${JSON.stringify(fromSnapshot.json)}`);
      const restored = await firstSuccessfulCommand(await Sandbox.connect(fromSnapshot.json.sandboxID, { timeoutMs: 1_800_000 }), restoreStarted, FIRST_COMMAND_DEADLINE_MS);
      await callApi(target, "DELETE", `/sandboxes/${fromSnapshot.json.sandboxID}`);
      // Again from the same image, as a snapshot that serves many creates is: a microVM's now
      // runs in the QEMU the runtime started for it meanwhile (both runtimes wait the same).
      const spare = runtime === "microvm" ? await spareWaits(target.runDir, snapshotId, 15_000) : (await new Promise((resolve) => setTimeout(resolve, 2000)), undefined);
      const spareWaited = runtime === "microvm" ? spare !== undefined : undefined;
      const againStarted = performance.now();
      const again = await callApi(target, "POST", "/v2/sandboxes", { templateID: snapshotId, timeout: 1800 });
      if (again.status !== 201) throw new Error(`${runtime} second create from a snapshot: ${again.status} ${JSON.stringify(again.json)}`);
      const restoredAgain = await firstSuccessfulCommand(await Sandbox.connect(again.json.sandboxID, { timeoutMs: 1_800_000 }), againStarted, FIRST_COMMAND_DEADLINE_MS);
      await callApi(target, "DELETE", `/sandboxes/${again.json.sandboxID}`);
      return {
        sample: { runtime, apiMs, firstCommandMs: first.ms, resumeMs: resume.ms, snapshotMs, restoreFirstCommandMs: restored.ms, restoreAgainFirstCommandMs: restoredAgain.ms, ...(spareWaited === undefined ? {} : { spareWaited }), ...(spare ? { spareQemu: spare } : {}) },
        id,
      };
    } finally {
      await callApi(target, "DELETE", `/templates/${snapshotId}`).catch(() => undefined);
    }
  };

  const floors: number[] = [];
  const samples: CreateSample[] = [];
  const progress = new Progress("runtimes", options.total * 2, options.progress);
  for (let i = 0; i < options.total; i++) {
    floors.push(await qemuStartFloorMs());
    for (const runtime of i % 2 === 0 ? RUNTIMES : [...RUNTIMES].reverse()) {
      try {
        const { sample, id } = await createOne(runtime);
        samples.push(sample);
        progress.sample(sample.firstCommandMs);
        await callApi(target, "DELETE", `/sandboxes/${id}`);
      } catch (err) {
        errors.push(errorMessage(err));
        progress.error(errorMessage(err));
      }
    }
  }
  progress.finish();

  // Host memory per idle sandbox: `--background N` (default 5) of one runtime alive at once, settled.
  const idle = options.background > 0 ? options.background : 5;
  const memory: Record<string, IdleMemory> = {};
  const restoredMemory: Record<string, IdleMemory> = {};
  const idleMemory = async (runtime: RuntimeName, templateID: string): Promise<IdleMemory> => {
    const before = memAvailableBytes();
    const ids: string[] = [];
    try {
      for (let i = 0; i < idle; i++) {
        const created = await callApi(target, "POST", "/v2/sandboxes", { templateID, runtime, timeout: 1800 });
        if (created.status !== 201) throw new Error(`${runtime} create: ${created.status} ${JSON.stringify(created.json)}`);
        ids.push(created.json.sandboxID as string);
        await firstSuccessfulCommand(await Sandbox.connect(created.json.sandboxID, { timeoutMs: 1_800_000 }), performance.now(), FIRST_COMMAND_DEADLINE_MS);
      }
      await new Promise((resolve) => setTimeout(resolve, options.settleMs));
      const perSandboxMiB = round2((before - memAvailableBytes()) / ids.length / (1 << 20));
      if (runtime !== "microvm") return { sandboxes: ids.length, perSandboxMiB };
      // Each QEMU's own view (MICROVM_RAM_NOTE): Private is what it holds alone, Pss its share of what it shares.
      const qemus = await microvmQemuMemory(target.runDir);
      const mean = (field: "rssBytes" | "pssBytes" | "privateBytes") => round2(qemus.reduce((sum, q) => sum + q.memory[field], 0) / Math.max(1, qemus.length) / (1 << 20));
      return { sandboxes: ids.length, perSandboxMiB, qemu: { processes: qemus.length, rssMiB: mean("rssBytes"), pssMiB: mean("pssBytes"), privateMiB: mean("privateBytes") } };
    } finally {
      await Promise.all(ids.map((id) => callApi(target, "DELETE", `/sandboxes/${id}`).catch(() => undefined)));
    }
  };
  for (const runtime of RUNTIMES) {
    try {
      memory[runtime] = await idleMemory(runtime, options.template);
    } catch (err) {
      errors.push(errorMessage(err));
    }
    // Sandboxes made from one image of an idle sandbox of this runtime.
    let sourceId: string | undefined;
    let snapshotId: string | undefined;
    try {
      const source = await callApi(target, "POST", "/v2/sandboxes", { templateID: options.template, runtime, timeout: 1800 });
      if (source.status !== 201) throw new Error(`${runtime} create: ${source.status} ${JSON.stringify(source.json)}`);
      sourceId = source.json.sandboxID as string;
      await firstSuccessfulCommand(await Sandbox.connect(sourceId, { timeoutMs: 1_800_000 }), performance.now(), FIRST_COMMAND_DEADLINE_MS);
      const snapshot = await callApi(target, "POST", `/sandboxes/${sourceId}/snapshots`, {});
      if (snapshot.status !== 201) throw new Error(`${runtime} snapshot: ${snapshot.status} ${JSON.stringify(snapshot.json)}`);
      snapshotId = snapshot.json.snapshotID as string;
      await callApi(target, "DELETE", `/sandboxes/${sourceId}`);
      sourceId = undefined;
      restoredMemory[runtime] = await idleMemory(runtime, snapshotId);
    } catch (err) {
      errors.push(errorMessage(err));
    } finally {
      if (sourceId) await callApi(target, "DELETE", `/sandboxes/${sourceId}`).catch(() => undefined);
      if (snapshotId) await callApi(target, "DELETE", `/templates/${snapshotId}`).catch(() => undefined);
    }
  }

  const floor = summarize(floors);
  const byRuntime = Object.fromEntries(
    RUNTIMES.map((runtime) => {
      const mine = samples.filter((s) => s.runtime === runtime);
      return [
        runtime,
        {
          creates: mine.length,
          apiMs: summarize(mine.map((s) => s.apiMs)),
          firstCommandMs: summarize(mine.map((s) => s.firstCommandMs)),
          resumeMs: summarize(mine.map((s) => s.resumeMs)),
          snapshotMs: summarize(mine.map((s) => s.snapshotMs)),
          restoreFirstCommandMs: summarize(mine.map((s) => s.restoreFirstCommandMs)),
          restoreAgainFirstCommandMs: summarize(mine.map((s) => s.restoreAgainFirstCommandMs)),
          ...(runtime === "microvm"
            ? {
                spareWaited: mine.filter((s) => s.spareWaited).length,
                // What one spare QEMU holds while it waits (SPARE_QEMU_NOTE): its cost per image.
                spareQemuRssMiB: summarize(mine.flatMap((s) => (s.spareQemu && Number.isFinite(s.spareQemu.rssMiB) ? [s.spareQemu.rssMiB] : []))),
                spareQemuPrivateMiB: summarize(mine.flatMap((s) => (s.spareQemu && Number.isFinite(s.spareQemu.privateMiB) ? [s.spareQemu.privateMiB] : []))),
              }
            : {}),
          idleMemory: memory[runtime],
          idleMemoryFromOneSnapshot: restoredMemory[runtime],
        },
      ];
    }),
  );
  const p50 = (runtime: RuntimeName, field: "firstCommandMs" | "snapshotMs" | "restoreFirstCommandMs" | "restoreAgainFirstCommandMs" = "firstCommandMs") => (byRuntime[runtime] as Record<typeof field, { p50: number }>)[field].p50;
  const ratio = (a: number, b: number) => (b > 0 && Number.isFinite(a) ? round2(a / b) : undefined);
  return {
    status: samples.length > 0 ? "ok" : "failed",
    ...(samples.length > 0 ? {} : { reason: errors[0] ?? "no samples" }),
    samples: { creates: samples, qemuStartFloorMs: floors },
    errors,
    summary: {
      runtimes: byRuntime,
      qemuStartFloorMs: floor,
      microvmFirstCommandOverQemuStart: floor.p50 > 0 ? round2(p50("microvm") / floor.p50) : undefined,
      microvmOverContainerFirstCommand: ratio(p50("microvm"), p50("container")),
      microvmOverContainerSnapshot: ratio(p50("microvm", "snapshotMs"), p50("container", "snapshotMs")),
      microvmOverContainerRestore: ratio(p50("microvm", "restoreFirstCommandMs"), p50("container", "restoreFirstCommandMs")),
      // The second create from a snapshot, into a spare QEMU (SPARE_QEMU_NOTE), against the container's and the first.
      microvmOverContainerRestoreAgain: ratio(p50("microvm", "restoreAgainFirstCommandMs"), p50("container", "restoreAgainFirstCommandMs")),
      microvmRestoreAgainOverFirst: ratio(p50("microvm", "restoreAgainFirstCommandMs"), p50("microvm", "restoreFirstCommandMs")),
      // A create from a memory image against a cold boot of the same runtime.
      microvmRestoreOverColdCreate: ratio(p50("microvm", "restoreFirstCommandMs"), p50("microvm")),
      // The server's CUBICLE_MICROVM, as bench/runtimes.sh passes it to the client too.
      accelerator: process.env.CUBICLE_MICROVM ?? "not stated (CUBICLE_MICROVM unset for the bench client)",
    },
  };
}
