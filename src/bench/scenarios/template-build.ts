/**
 * `template-build`: issue 16's numbers, through the official `e2b` SDK's `Template()` builder
 * against a running server.
 *
 * 1. Cold build of a Dockerfile-like template (`fromImage` of a "python:3.12-slim-like" image
 *    from a loopback registry + 3 RUN steps), from the first request to "ready"; pull and
 *    unpack are split out of the build log's timestamps.
 * 2. A fully cached rebuild of it (every step CACHED, the image "unpacked already"), n times.
 * 3. A rebuild after changing the last step (a new value each time), n times.
 * 4. Create → first command from (a) that template (no start command: the cold path on its
 *    layer image), (b) a template on it with `setStartCmd(…, waitForPort)` (its warm snapshot),
 *    beside a cold `base` create in the same rounds (order base, a, b in every round).
 * 5. Disk per additional template: K templates each adding a small file on the template of 1;
 *    the storage pool's growth per template, each layer image's qgroup counters, and the state
 *    dir's `images/` growth (none for a template from a template; one image base per image).
 *
 * Floors in the same run: GNU `tar -xzf` of the same layer (pull + unpack), a cold
 * `base` create → first command (creates and rebuilds: every rebuild needs at least the base's
 * rootfs and a sandbox's worth of setup). The image is made once per run, outside the timings,
 * from the server's `base` template rootfs; its layer carries the run's id, so its pull is cold.
 * At the end the templates are deleted (DELETE /templates/NAME), the image base and layer blob
 * this run made are removed from the state dir, the registry is stopped, temp files removed.
 */
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { LogEntry } from "e2b";
import { runCommand } from "../../shared/exec.js";
import { startTestRegistry, type TestRegistry } from "../../template/oci/test-registry.js";
import type { BenchOptions } from "../options.js";
import type { ScenarioResult } from "../result.js";
import { errorMessage, round2 } from "../run-helpers.js";
import { summarize } from "../stats.js";
import { callApi, loadSandboxSdk, loadTemplateSdk, type BenchTarget } from "../target.js";
import { firstSuccessfulCommand } from "./create.js";
import { templateMemoryMB } from "./network.js";
import { findPool, imageBasesUsage, layerImageBytes, layerImageNames, poolUsedBytes, settlePool, warmImageNames, type PoolProbe } from "./template-build-disk.js";
import { benchImage, findBaseRootfs, makeBaseLayer } from "./template-build-image.js";

type SandboxClass = Awaited<ReturnType<typeof loadSandboxSdk>>;
type TemplateSdk = Awaited<ReturnType<typeof loadTemplateSdk>>;

/** Names of the templates a run builds start with this (a leftover is easy to find and delete). */
export const TEMPLATE_BUILD_PREFIX = "bench-tb-";
const REPOSITORY = "bench/python-slim-like";
const BUILD_TIMEOUT_MS = 15 * 60_000;

/** The three RUN steps; the last one's value changes for the "changed last step" rebuilds. */
function stepCommands(version: string): string[] {
  return [
    "mkdir -p /home/user/app && printf 'import json\\nprint(json.dumps({\"ok\": 1}))\\n' > /home/user/app/main.py",
    "python3 -m compileall -q /home/user/app && python3 /home/user/app/main.py > /home/user/app/out.json",
    `echo ${version} > /home/user/app/VERSION`,
  ];
}

interface BuildRun {
  /** Client wall time of `Template.build` (includes the SDK's 200 ms status polling). */
  ms: number;
  /** Server time: the SDK's "Build started" to the server's "is ready" log entry (same host clock). */
  serverMs?: number;
  logs: { at: number; message: string }[];
}

async function timedBuild(sdk: TemplateSdk, template: Parameters<TemplateSdk["Template"]["build"]>[0], name: string): Promise<BuildRun> {
  const logs: { at: number; message: string }[] = [];
  const t0 = performance.now();
  const wallStart = Date.now();
  await sdk.Template.build(template, name, { onBuildLogs: (entry: LogEntry) => logs.push({ at: entry.timestamp.getTime(), message: entry.message }), requestTimeoutMs: BUILD_TIMEOUT_MS });
  const ms = round2(performance.now() - t0);
  const ready = logs.find((entry) => / is ready \(/.test(entry.message));
  return { ms, ...(ready ? { serverMs: ready.at - wallStart } : {}), logs };
}

const cachedSteps = (run: BuildRun) => run.logs.filter((entry) => entry.message.startsWith("CACHED ")).length;

/**
 * Pull phases from the build log (ImageBases.pull): "pulling REF" → the layer's last progress
 * line (bytes = total: downloaded and verified) → "pulled REF" (unpacked, ids shifted). Then the
 * steps, commits and registration until "is ready".
 */
function coldPhases(run: BuildRun): Record<string, number | undefined> {
  const find = (test: (m: string) => boolean) => run.logs.find((entry) => test(entry.message))?.at;
  const pullStart = find((m) => m.startsWith("pulling "));
  const downloaded = run.logs.filter((entry) => {
    const match = /^layer [0-9a-f]+: (.+) \/ (.+)$/.exec(entry.message);
    return (match && match[1] === match[2]) || /^layer [0-9a-f]+: cached$/.test(entry.message);
  }).at(-1)?.at;
  const pulled = find((m) => m.startsWith("pulled "));
  const ready = find((m) => / is ready \(/.test(m));
  const diff = (a?: number, b?: number) => (a !== undefined && b !== undefined ? b - a : undefined);
  return { pullMs: diff(pullStart, pulled), downloadMs: diff(pullStart, downloaded), unpackMs: diff(downloaded, pulled), stepsToReadyMs: diff(pulled, ready) };
}

function ratio(value: number | undefined, floor: number | undefined): number | undefined {
  return value !== undefined && floor !== undefined && Number.isFinite(value) && Number.isFinite(floor) && floor > 0 ? Math.round((value / floor) * 100) / 100 : undefined;
}

function note(options: BenchOptions, text: string): void {
  if (options.progress) process.stderr.write(`template-build: ${text}\n`);
}

export async function benchTemplateBuild(options: BenchOptions, target: BenchTarget): Promise<ScenarioResult> {
  const rootfs = findBaseRootfs(target.templateDir);
  if (!rootfs) throw new Error(`no base template rootfs with python3 under ${target.templateDir} or the default template cache`);
  const Sandbox = await loadSandboxSdk(target);
  const sdk = await loadTemplateSdk(target);
  const runId = `${Date.now().toString(36)}${randomBytes(3).toString("hex")}`;
  const names = { cold: `${TEMPLATE_BUILD_PREFIX}${runId}`, start: `${TEMPLATE_BUILD_PREFIX}${runId}-start`, extra: (i: number) => `${TEMPLATE_BUILD_PREFIX}${runId}-k${i}` };
  const built: string[] = [];
  const errors: string[] = [];
  const workDir = fs.mkdtempSync(path.join(os.tmpdir(), "cubicle-bench-tb-"));
  const imagesBefore = await imageBasesUsage(target.stateDir);
  const pool = findPool(target.runDir);
  const poolStart = pool ? { layers: new Set(layerImageNames(pool)), warm: new Set(warmImageNames(pool)), usedBytes: await settlePool(pool).then(() => poolUsedBytes(pool)) } : undefined;
  const deleteTemplates = async () => {
    for (const name of built.splice(0).reverse()) {
      const res = await callApi(target, "DELETE", `/templates/${name}`).catch((err: unknown) => ({ status: 0, json: errorMessage(err) }));
      if (res.status !== 204 && res.status !== 404) errors.push(`DELETE /templates/${name}: ${res.status} ${JSON.stringify(res.json)}`);
    }
  };
  let registry: TestRegistry | undefined;
  let layerDigest: string | undefined;
  try {
    // --- the image (not timed) ---
    note(options, `making the image from ${rootfs}`);
    const layer = await makeBaseLayer(rootfs, workDir, runId);
    layerDigest = layer.digest;
    registry = await startTestRegistry();
    const image = benchImage(layer);
    await registry.push(REPOSITORY, runId, image);
    const reference = `${registry.host}/${REPOSITORY}:${runId}`;

    // --- floor: GNU tar -xzf of the same layer ---
    const floorRuns = Math.max(1, Math.min(3, options.total));
    const tarSamples: number[] = [];
    for (let i = 0; i < floorRuns; i++) {
      const dest = fs.mkdtempSync(path.join(workDir, "untar-"));
      const t0 = performance.now();
      await runCommand(["tar", "-xzf", layer.file, "-C", dest], { timeoutMs: 600_000 });
      tarSamples.push(round2(performance.now() - t0));
      fs.rmSync(dest, { recursive: true, force: true });
    }
    const tarFloor = summarize(tarSamples);

    // --- 1. cold build ---
    note(options, `cold build of ${reference} + 3 steps`);
    const steps = stepCommands("v1");
    const coldTemplate = (last: string) => steps.slice(0, 2).concat(last).reduce((t, cmd) => t.runCmd(cmd), sdk.Template().fromImage(reference));
    const cold = await timedBuild(sdk, coldTemplate(steps[2]!), names.cold);
    built.push(names.cold);
    const phases = coldPhases(cold);
    const imagesAfterCold = await imageBasesUsage(target.stateDir);

    // --- 2. fully cached rebuilds ---
    note(options, `${options.total} cached rebuilds`);
    const cached: BuildRun[] = [];
    for (let i = 0; i < options.total; i++) {
      const run = await timedBuild(sdk, coldTemplate(steps[2]!), names.cold);
      if (cachedSteps(run) !== 3 || !run.logs.some((entry) => entry.message.includes("unpacked already"))) {
        errors.push(`cached rebuild ${i}: expected 3 CACHED steps and the image unpacked already:\n${run.logs.map((e) => e.message).join("\n").slice(-1500)}`);
      }
      cached.push(run);
    }

    // --- 3. rebuilds after changing the last step ---
    note(options, `${options.total} rebuilds with a changed last step`);
    const changed: BuildRun[] = [];
    for (let i = 0; i < options.total; i++) {
      const run = await timedBuild(sdk, coldTemplate(stepCommands(`v${i + 2}`)[2]!), names.cold);
      if (cachedSteps(run) !== 2) errors.push(`changed-last-step rebuild ${i}: expected 2 CACHED steps, saw ${cachedSteps(run)}`);
      changed.push(run);
    }
    // The rounds of 4. use the template as the cold build made it.
    await timedBuild(sdk, coldTemplate(steps[2]!), names.cold);

    // --- 4. creates: base (cold), the built template (layer), a start-command template (warm snapshot) ---
    note(options, "building the start-command template");
    const startBuild = await timedBuild(sdk, sdk.Template().fromTemplate(names.cold).setStartCmd("python3 -m http.server 8080 --bind 127.0.0.1 --directory /home/user/app", sdk.waitForPort(8080)), names.start);
    built.push(names.start);
    const pools = (await callApi(target, "GET", "/pools")).json as Record<string, { target?: number }> | undefined;
    const basePooled = Object.entries(pools ?? {}).some(([id, p]) => (id === "base" || id.startsWith("base")) && Number(p?.target ?? 0) > 0);
    // A pool claim is not a cold create: a memory size no pool entry has makes base boot.
    const baseMemoryMB = basePooled ? (await templateMemoryMB(target, "base")) + 128 : undefined;
    const startCmdSeen = await checkStartCommand(Sandbox, names.start);
    if (!startCmdSeen) errors.push(`a sandbox of ${names.start} does not list its start command (tag start-cmd)`);
    const kinds = [
      { key: "base", template: "base", memoryMB: baseMemoryMB },
      { key: "builtTemplate", template: names.cold, memoryMB: undefined },
      { key: "startCmdTemplate", template: names.start, memoryMB: undefined },
    ] as const;
    const createSamples: Record<(typeof kinds)[number]["key"], number[]> = { base: [], builtTemplate: [], startCmdTemplate: [] };
    note(options, `${options.warmup} + ${options.total} rounds of creates (base, built, start command)`);
    for (let round = -options.warmup; round < options.total; round++) {
      for (const kind of kinds) {
        try {
          const ms = await createToFirstCommand(Sandbox, target, kind.template, kind.memoryMB);
          if (round >= 0) createSamples[kind.key].push(ms);
        } catch (err) {
          errors.push(`create ${kind.template} (round ${round}): ${errorMessage(err)}`);
        }
      }
    }
    const createSummary = Object.fromEntries(Object.entries(createSamples).map(([key, samples]) => [key, summarize(samples)])) as Record<keyof typeof createSamples, ReturnType<typeof summarize>>;
    const baseCreateP50 = createSummary.base.count ? createSummary.base.p50 : undefined;

    // --- 5. disk per additional template ---
    note(options, `disk: ${options.templateCount} templates sharing ${names.cold}`);
    const disk = await measureDisk(sdk, target, pool, names, built, options.templateCount, layer.tarBytes).catch((err: unknown) => ({ status: "failed", reason: errorMessage(err) }));
    if ((disk as { status?: string }).status === "failed") errors.push(`disk: ${(disk as { reason: string }).reason}`);

    // What deleting the templates gives back: their layer and warm images stay in the pool today.
    await deleteTemplates();
    let afterDelete: Record<string, unknown> = { status: "not available", reason: "no storage pool on this host" };
    if (pool && poolStart) {
      await settlePool(pool);
      afterDelete = {
        status: "ok",
        layerImagesLeft: layerImageNames(pool).filter((name) => !poolStart.layers.has(name)).length,
        warmImagesLeft: warmImageNames(pool).filter((name) => !poolStart.warm.has(name)).length,
        poolBytesLeft: (await poolUsedBytes(pool)) - poolStart.usedBytes,
      };
    }

    const cachedMs = summarize(cached.map((r) => r.ms));
    const cachedServerMs = summarize(cached.flatMap((r) => (r.serverMs !== undefined ? [r.serverMs] : [])));
    const changedServerMs = summarize(changed.flatMap((r) => (r.serverMs !== undefined ? [r.serverMs] : [])));
    const changedMs = summarize(changed.map((r) => r.ms));
    const pullPlusUnpack = phases.pullMs;
    return {
      status: "ok",
      samples: {
        tarExtractFloorMs: tarSamples,
        coldBuild: { ms: cold.ms, serverMs: cold.serverMs, log: cold.logs },
        cachedRebuilds: cached.map((r) => ({ ms: r.ms, serverMs: r.serverMs, cachedSteps: cachedSteps(r) })),
        changedLastStepRebuilds: changed.map((r) => ({ ms: r.ms, serverMs: r.serverMs, cachedSteps: cachedSteps(r) })),
        createToFirstCommandMs: createSamples,
      },
      errors,
      summary: {
        image: { reference, rootfs, compressedBytes: layer.compressedBytes, tarBytes: layer.tarBytes, layers: 1, makeMs: layer.makeMs },
        floors: { tarExtractMs: tarFloor, baseColdCreateToFirstCommandMs: createSummary.base, baseCreatePath: basePooled ? `cold (memoryMB ${baseMemoryMB}: no pool entry fits)` : "cold (no pool)" },
        coldBuild: {
          ms: cold.ms,
          serverMs: cold.serverMs,
          ...phases,
          imageBasesAdded: imagesAfterCold.entries.filter((e) => !imagesBefore.entries.includes(e)).length,
          imagesDirGrowthBytes: imagesAfterCold.bytes - imagesBefore.bytes,
          pullAndUnpackPerTarFloor: ratio(pullPlusUnpack, tarFloor.p50),
          unpackPerTarFloor: ratio(phases.unpackMs, tarFloor.p50),
          msPerTarFloorPlusBaseCreate: ratio(cold.ms, baseCreateP50 !== undefined ? tarFloor.p50 + baseCreateP50 : undefined),
        },
        cachedRebuild: {
          ms: cachedMs,
          serverMs: cachedServerMs,
          p50PerBaseCreate: ratio(cachedMs.p50, baseCreateP50),
          serverP50PerBaseCreate: ratio(cachedServerMs.p50, baseCreateP50),
          p50PerColdBuild: ratio(cachedMs.p50, cold.ms),
        },
        changedLastStep: {
          ms: changedMs,
          serverMs: changedServerMs,
          p50PerBaseCreate: ratio(changedMs.p50, baseCreateP50),
          serverP50PerBaseCreate: ratio(changedServerMs.p50, baseCreateP50),
          p50PerCachedRebuild: ratio(changedMs.p50, cachedMs.p50),
        },
        startCmdTemplateBuild: { ms: startBuild.ms, serverMs: startBuild.serverMs, startCmdRunningInSandbox: startCmdSeen },
        createToFirstCommand: {
          ...createSummary,
          builtTemplateP50PerBase: ratio(createSummary.builtTemplate.p50, baseCreateP50),
          startCmdTemplateP50PerBase: ratio(createSummary.startCmdTemplate.p50, baseCreateP50),
        },
        disk,
        afterDelete,
      },
    };
  } finally {
    await deleteTemplates();
    removeRunImage(target.stateDir, imagesBefore.entries, layerDigest, errors);
    await registry?.stop().catch((err: unknown) => errors.push(`registry stop: ${errorMessage(err)}`));
    fs.rmSync(workDir, { recursive: true, force: true });
  }
}

/** Create (the SDK, or REST with a memory size when base has a pool) → first successful command; kill untimed. */
async function createToFirstCommand(Sandbox: SandboxClass, target: BenchTarget, template: string, memoryMB: number | undefined): Promise<number> {
  const t0 = performance.now();
  let sandbox: InstanceType<SandboxClass>;
  if (memoryMB === undefined) sandbox = await Sandbox.create(template, { timeoutMs: 600_000 });
  else {
    const res = await callApi(target, "POST", "/sandboxes", { templateID: template, timeout: 600, memoryMB });
    if (res.status !== 201) throw new Error(`POST /sandboxes answered ${res.status}: ${JSON.stringify(res.json)}`);
    sandbox = await Sandbox.connect(res.json.sandboxID);
  }
  try {
    return (await firstSuccessfulCommand(sandbox, t0)).ms;
  } finally {
    await sandbox.kill().catch(() => false);
  }
}

/** A sandbox of the start-command template lists the start command already (it came from the warm snapshot). */
async function checkStartCommand(Sandbox: SandboxClass, template: string): Promise<boolean> {
  const sandbox = await Sandbox.create(template, { timeoutMs: 120_000 });
  try {
    return (await sandbox.commands.list()).some((p) => p.tag === "start-cmd");
  } finally {
    await sandbox.kill().catch(() => false);
  }
}

/**
 * K templates, each `fromTemplate(cold).runCmd(write a small file)`: the pool's growth per
 * template (after the pool settles), each new layer image's referenced/exclusive bytes, and the
 * image bases' growth (expected 0: a template from a template pulls nothing).
 */
async function measureDisk(sdk: TemplateSdk, target: BenchTarget, pool: PoolProbe | undefined, names: { cold: string; extra: (i: number) => string }, built: string[], count: number, imageTarBytes: number) {
  if (!pool) return { status: "not available", reason: `no btrfs storage pool mounted at ${path.join(target.runDir, "pool")} on this host` };
  await settlePool(pool);
  const layersBefore = new Set(layerImageNames(pool));
  const poolBefore = await poolUsedBytes(pool);
  const imagesBefore = await imageBasesUsage(target.stateDir);
  const buildMs: number[] = [];
  for (let i = 0; i < count; i++) {
    const run = await timedBuild(sdk, sdk.Template().fromTemplate(names.cold).runCmd(`echo template ${i} > /home/user/extra-${i}.txt`), names.extra(i));
    built.push(names.extra(i));
    buildMs.push(run.ms);
  }
  await settlePool(pool);
  const poolAfter = await poolUsedBytes(pool);
  const imagesAfter = await imageBasesUsage(target.stateDir);
  const newLayers = layerImageNames(pool).filter((name) => !layersBefore.has(name));
  const layers = await Promise.all(newLayers.map((name) => layerImageBytes(pool, name)));
  const perTemplate = (poolAfter - poolBefore) / count;
  return {
    status: "ok",
    templates: count,
    buildMs: summarize(buildMs),
    poolGrowthBytes: poolAfter - poolBefore,
    poolBytesPerTemplate: Math.round(perTemplate),
    newLayerImages: layers.length,
    layerReferencedBytes: summarize(layers.map((l) => l.referencedBytes)),
    layerExclusiveBytes: summarize(layers.map((l) => l.exclusiveBytes)),
    imagesDirGrowthBytes: imagesAfter.bytes - imagesBefore.bytes,
    imageBasesAdded: imagesAfter.entries.filter((e) => !imagesBefore.entries.includes(e)).length,
    /** Pool growth per template ÷ the image's uncompressed size: what a full copy per template would cost. */
    poolBytesPerTemplatePerImageBytes: Math.round((perTemplate / imageTarBytes) * 10_000) / 10_000,
  };
}

/**
 * The image base and layer blob this run's pull left in the server's state dir: new since the
 * run started, made from this run's layer (its templates are deleted by now). Without this every
 * run would leave an unpacked rootfs behind.
 */
function removeRunImage(stateDir: string, before: string[], layerDigest: string | undefined, errors: string[]): void {
  try {
    const imagesDir = path.join(stateDir, "images");
    for (const entry of fs.existsSync(imagesDir) ? fs.readdirSync(imagesDir) : []) {
      if (before.includes(entry) || !/^[a-f0-9]{64}$/.test(entry)) continue;
      const stored = JSON.parse(fs.readFileSync(path.join(imagesDir, entry, "image.json"), "utf8")) as { reference?: string };
      if (stored.reference?.includes(`/${REPOSITORY}:`)) fs.rmSync(path.join(imagesDir, entry), { recursive: true, force: true });
    }
    if (layerDigest) fs.rmSync(path.join(stateDir, "image-blobs", "sha256", layerDigest.replace(/^sha256:/, "")), { force: true });
  } catch (err) {
    errors.push(`removing the run's image base: ${errorMessage(err)}`);
  }
}
