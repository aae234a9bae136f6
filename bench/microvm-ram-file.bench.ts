/**
 * RAM_FILE_CONVERSION_NOTE, measured (issue 17): under TCG, on a server of its own (the e2e
 * harness's), a microVM restored from a snapshot (its RAM a private mapping of the image's) is
 * snapshotted; one create from that image before its conversion (it loads the stream), three
 * after (they map the image's RAM file), each QEMU's private memory (smaps_rollup) once they
 * idle; then a fork of 10 of the restored guest (its image converted before the copies are
 * made), its time and the copies' private memory. Writes
 * bench/results/microvm-ram-file/ram-file-<time>.json and prints the figures.
 *
 *   node --import tsx --test bench/microvm-ram-file.bench.ts
 */
import fs from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { Sandbox } from "e2b";
import { startTestServer, useServerForSdk } from "../test/e2e/harness.js";

const privateMiB = (pid: string) => {
  const text = fs.readFileSync(`/proc/${pid}/smaps_rollup`, "utf8");
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+)`, "m").exec(text)?.[1] ?? NaN) / 1024;
  return Math.round((kb("Private_Clean") + kb("Private_Dirty")) * 10) / 10;
};
const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;

test("microVM images of restored guests: RAM file conversion", { timeout: 60 * 60_000 }, async () => {
  const server = await startTestServer({ extraEnv: { CUBICLE_MICROVM: "tcg" } });
  useServerForSdk(server);
  const pidOf = (id: string) => fs.readFileSync(path.join(server.runDir, "microvm", id, "run", "qemu.pid"), "utf8").trim();
  const since = (t: number) => Math.round(performance.now() - t);
  const result: Record<string, unknown> = { scenario: "microvm-ram-file", startedAt: new Date().toISOString(), accel: "tcg" };
  try {
    const booted = await server.api("POST", "/v2/sandboxes", { templateID: "base", runtime: "microvm", timeout: 1800 });
    const first = await server.api("POST", `/sandboxes/${booted.json.sandboxID}/snapshots`, {});
    await server.api("DELETE", `/sandboxes/${booted.json.sandboxID}`);
    const restored = await Sandbox.create(first.json.snapshotID, { timeoutMs: 1_800_000 });
    await restored.commands.run("echo kept > /dev/shm/marker && dd if=/dev/urandom of=/dev/shm/blob bs=1M count=20 2>/dev/null", { user: "root" });

    let t = performance.now();
    const second = await server.api("POST", `/sandboxes/${restored.sandboxId}/snapshots`, {});
    result.snapshotOfRestoredGuestMs = since(t);
    const imageDir = path.join(server.stateDir, "microvm", "images", "snapshots", second.json.snapshotID as string);
    t = performance.now();
    const early = await Sandbox.create(second.json.snapshotID, { timeoutMs: 1_800_000 });
    await early.commands.run("cat /dev/shm/marker");
    result.createFromStreamFirstCommandMs = since(t);
    const converted = () => (JSON.parse(fs.readFileSync(path.join(imageDir, "meta.json"), "utf8")) as { ramFile?: boolean }).ramFile === true;
    while (!converted()) await new Promise((resolve) => setTimeout(resolve, 100));
    result.imageFilesMiB = Object.fromEntries(fs.readdirSync(imageDir).map((file) => [file, Math.round((fs.statSync(path.join(imageDir, file)).blocks * 512) / 2 ** 20)]));
    await new Promise((resolve) => setTimeout(resolve, 3000));
    const mapped: Sandbox[] = [];
    const mappedMs: number[] = [];
    for (let i = 0; i < 3; i++) {
      t = performance.now();
      const sandbox = await Sandbox.create(second.json.snapshotID, { timeoutMs: 1_800_000 });
      await sandbox.commands.run("cat /dev/shm/marker");
      mappedMs.push(since(t));
      mapped.push(sandbox);
    }
    result.createFromRamFileFirstCommandMs = mappedMs;
    await new Promise((resolve) => setTimeout(resolve, 5000));
    result.privateMiBStreamLoaded = privateMiB(pidOf(early.sandboxId));
    result.privateMiBRamFileMapped = mapped.map((sandbox) => privateMiB(pidOf(sandbox.sandboxId)));
    for (const sandbox of [early, ...mapped]) await sandbox.kill();

    t = performance.now();
    const forks = (await restored.fork({ count: 10, timeoutMs: 1_800_000 })) as Sandbox[];
    result.forkOf10ApiMs = since(t);
    await Promise.all(forks.map((fork) => fork.commands.run("cat /dev/shm/marker")));
    result.forkOf10AllAnsweredMs = since(t);
    await new Promise((resolve) => setTimeout(resolve, 3000));
    const forkPrivate = forks.map((fork) => privateMiB(pidOf(fork.sandboxId)));
    result.forkPrivateMiB = { p50: median(forkPrivate), total: Math.round(forkPrivate.reduce((a, b) => a + b, 0)) };
    for (const fork of forks) await fork.kill();
    await restored.kill();
  } finally {
    await server.stop();
  }
  const out = path.join(path.dirname(new URL(import.meta.url).pathname), "results", "microvm-ram-file", `ram-file-${String(result.startedAt).replace(/[:.]/g, "-")}.json`);
  fs.writeFileSync(out, JSON.stringify(result, null, 2) + "\n");
  console.log(JSON.stringify(result, null, 2));
});
