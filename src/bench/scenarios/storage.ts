/**
 * Volumes and codebases (issue 18): creates with a codebase mount and with a volume mount
 * against creates without (cold boots of the same size, the three kinds interleaved, so drift
 * hits all alike), and, in one sandbox with both mounted, the throughput of many small files
 * (N × 1 KiB written, read back, removed) and of one big file (written with an fsync, read back)
 * through the sandbox's own root filesystem, the volume and the codebase (a `write` path served
 * by codebase-fs). The root filesystem is the floor: each path reports its ratio to it, from
 * the same sandbox in the same run. AgentFense's published create with a codebase (150 ms) is
 * given beside ours as theirs, from another machine: not a ratio.
 *
 * Needs a server with CUBICLE_CODEBASE_ROOTS (the bench client reads the same variable and makes
 * its codebase directory under the first root); bench/storage.sh starts one.
 */
import { mkdtemp, mkdir, rm, writeFile } from "node:fs/promises";
import path from "node:path";
import type { BenchOptions } from "../options.js";
import { Progress } from "../progress.js";
import { notAvailable, type ScenarioResult } from "../result.js";
import { errorMessage, round2 } from "../run-helpers.js";
import { pairedRatio, summarize } from "../stats.js";
import { callApi, loadSandboxSdk, type BenchTarget } from "../target.js";
import { firstSuccessfulCommand } from "./create.js";

/** AgentFense's published figure for a sandbox with a codebase, for the report (their machine). */
const AGENTFENSE_CODEBASE_CREATE_MS = 150;
const KINDS = ["plain", "codebase", "volume"] as const;
type Kind = (typeof KINDS)[number];
/** Not a pool size: every create boots, with or without mounts. */
const MEMORY_MB = 640;

/**
 * The in-sandbox measurement, one directory: prints one JSON line. Python's own file calls,
 * so the numbers are the filesystem's, not a process start per file.
 */
const IO_SCRIPT = String.raw`
import json, os, sys, time
target, count, big_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
small = os.path.join(target, "bench-small")
os.makedirs(small, exist_ok=True)
block = b"x" * 1024
t0 = time.perf_counter()
for i in range(count):
    with open(os.path.join(small, "f%d" % i), "wb") as f:
        f.write(block)
t1 = time.perf_counter()
total = 0
for i in range(count):
    with open(os.path.join(small, "f%d" % i), "rb") as f:
        total += len(f.read())
t2 = time.perf_counter()
for i in range(count):
    os.unlink(os.path.join(small, "f%d" % i))
os.rmdir(small)
t3 = time.perf_counter()
chunk = os.urandom(1 << 20)
big = os.path.join(target, "bench-big")
t4 = time.perf_counter()
with open(big, "wb") as f:
    for _ in range(big_mib):
        f.write(chunk)
    f.flush()
    os.fsync(f.fileno())
t5 = time.perf_counter()
read = 0
with open(big, "rb") as f:
    while True:
        data = f.read(1 << 20)
        if not data:
            break
        read += len(data)
t6 = time.perf_counter()
os.unlink(big)
print(json.dumps({"smallWriteS": t1 - t0, "smallReadS": t2 - t1, "smallRemoveS": t3 - t2, "smallBytesRead": total, "bigWriteS": t5 - t4, "bigReadS": t6 - t5, "bigBytesRead": read}))
`;

interface IoResult {
  smallWriteS: number;
  smallReadS: number;
  smallRemoveS: number;
  smallBytesRead: number;
  bigWriteS: number;
  bigReadS: number;
  bigBytesRead: number;
}

export async function benchStorage(options: BenchOptions, target: BenchTarget): Promise<ScenarioResult> {
  const root = (process.env.CUBICLE_CODEBASE_ROOTS ?? "").split(",")[0]?.trim();
  if (!root) return notAvailable("CUBICLE_CODEBASE_ROOTS is not set for the bench client (bench/storage.sh sets it for the server and the client)");
  const Sandbox = await loadSandboxSdk(target);
  const errors: string[] = [];
  const smallFiles = options.smallFiles;
  const bigMiB = options.bigFileMiB;
  await mkdir(root, { recursive: true });
  const repo = await mkdtemp(path.join(root, "bench-codebase-"));
  await mkdir(path.join(repo, "src"));
  await writeFile(path.join(repo, ".env"), "SECRET=bench\n");
  const tag = Date.now().toString(36);
  const codebase = await callApi(target, "POST", "/codebases", { name: `bench-${tag}`, hostPath: repo });
  const volume = await callApi(target, "POST", "/volumes", { name: `bench-${tag}`, sizeMB: bigMiB * 2 + 1024 });
  try {
    if (codebase.status !== 201) return notAvailable(`this server takes no codebase at ${repo}: ${codebase.status} ${JSON.stringify(codebase.json)}`);
    if (volume.status !== 201) return notAvailable(`this server made no volume: ${volume.status} ${JSON.stringify(volume.json)}`);
    const codebaseMounts = [{ codebase: `bench-${tag}`, path: "/workspace", rules: { "**/*.env": "none", "src/**": "write" }, default: "read" }];
    const volumeMounts = [{ name: `bench-${tag}`, path: "/mnt/vol" }];
    const bodyOf = (kind: Kind) => ({
      templateID: options.template,
      timeout: 1800,
      memoryMB: MEMORY_MB,
      ...(kind === "codebase" ? { codebaseMounts } : kind === "volume" ? { volumeMounts } : {}),
    });

    // --- creates ---
    const creates: Record<Kind, number[]> = { plain: [], codebase: [], volume: [] };
    const progress = new Progress("storage", options.total * KINDS.length, options.progress);
    for (let i = -options.warmup; i < options.total; i++) {
      const order = KINDS.map((_, index) => KINDS[(index + Math.max(0, i)) % KINDS.length]!);
      const round: Partial<Record<Kind, number>> = {};
      for (const kind of order) {
        try {
          const started = performance.now();
          const created = await callApi(target, "POST", "/v2/sandboxes", bodyOf(kind));
          if (created.status !== 201) throw new Error(`${kind} create: ${created.status} ${JSON.stringify(created.json)}`);
          const sandbox = await Sandbox.connect(created.json.sandboxID as string);
          round[kind] = (await firstSuccessfulCommand(sandbox, started)).ms;
          await callApi(target, "DELETE", `/sandboxes/${created.json.sandboxID}`);
          if (i >= 0) progress.sample(round[kind]!);
        } catch (err) {
          errors.push(errorMessage(err));
          progress.error(errorMessage(err));
        }
      }
      // Only complete rounds count, so the ratios compare like with like.
      if (i >= 0 && KINDS.every((kind) => round[kind] !== undefined)) for (const kind of KINDS) creates[kind].push(round[kind]!);
    }
    progress.finish();

    // --- throughput, one sandbox with both mounts ---
    const io: Record<string, IoResult> = {};
    const created = await callApi(target, "POST", "/v2/sandboxes", { ...bodyOf("plain"), diskSizeMB: bigMiB * 2 + 2048, codebaseMounts, volumeMounts });
    if (created.status !== 201) {
      errors.push(`throughput sandbox: ${created.status} ${JSON.stringify(created.json)}`);
    } else {
      const sandbox = await Sandbox.connect(created.json.sandboxID as string);
      try {
        await sandbox.files.write("/tmp/bench-io.py", IO_SCRIPT);
        await sandbox.commands.run("mkdir -p /home/user/bench-root");
        for (const [name, dir] of [["rootfs", "/home/user/bench-root"], ["volume", "/mnt/vol"], ["codebase", "/workspace/src"]] as const) {
          try {
            const run = await sandbox.commands.run(`/usr/bin/python3 /tmp/bench-io.py ${dir} ${smallFiles} ${bigMiB}`, { timeoutMs: 1_800_000 });
            io[name] = JSON.parse(run.stdout.trim().split("\n").at(-1)!) as IoResult;
          } catch (err) {
            errors.push(`${name} throughput: ${errorMessage(err)}`);
          }
        }
      } finally {
        await callApi(target, "DELETE", `/sandboxes/${created.json.sandboxID}`);
      }
    }

    const rate = (count: number, seconds: number) => (seconds > 0 ? round2(count / seconds) : undefined);
    const paths = Object.fromEntries(
      Object.entries(io).map(([name, r]) => [
        name,
        {
          smallWriteFilesPerS: rate(smallFiles, r.smallWriteS),
          smallReadFilesPerS: rate(smallFiles, r.smallReadS),
          smallRemoveFilesPerS: rate(smallFiles, r.smallRemoveS),
          bigWriteMiBPerS: rate(bigMiB, r.bigWriteS),
          bigReadMiBPerS: rate(bigMiB, r.bigReadS),
        },
      ]),
    ) as Record<string, Record<string, number | undefined>>;
    // Slowdown against the root filesystem (>1: slower), per measure.
    const floor = paths.rootfs;
    const vsRootfs = Object.fromEntries(
      Object.entries(paths)
        .filter(([name]) => name !== "rootfs" && floor)
        .map(([name, measures]) => [name, Object.fromEntries(Object.entries(measures).map(([key, value]) => [key, value && floor![key] ? round2(floor![key]! / value) : undefined]))]),
    );
    const complete = creates.plain.length > 0;
    return {
      status: complete && Object.keys(io).length === 3 ? "ok" : "failed",
      ...(complete && Object.keys(io).length === 3 ? {} : { reason: errors[0] ?? "no samples" }),
      samples: { creates, io },
      errors,
      summary: {
        smallFiles,
        bigFileMiB: bigMiB,
        firstCommandMs: Object.fromEntries(KINDS.map((kind) => [kind, summarize(creates[kind])])),
        codebaseOverPlain: pairedRatio(creates.plain, creates.codebase),
        volumeOverPlain: pairedRatio(creates.plain, creates.volume),
        agentfenseCodebaseCreateMs: AGENTFENSE_CODEBASE_CREATE_MS,
        throughput: paths,
        slowdownVsRootfs: vsRootfs,
      },
    };
  } finally {
    if (volume.status === 201) await callApi(target, "DELETE", `/volumes/${volume.json.volumeID}`).catch(() => undefined);
    if (codebase.status === 201) await callApi(target, "DELETE", `/codebases/${codebase.json.codebaseID}`).catch(() => undefined);
    await rm(repo, { recursive: true, force: true });
  }
}
