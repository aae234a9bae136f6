// Where the milliseconds of a path go (issue 15): drives a running server (CUBICLE_PORT,
// CUBICLE_STATE_DIR; run by bench/trace.sh, which starts one at debug level) through the `e2b`
// SDK — cold creates, snapshots, creates from a snapshot, a fork of 10 — measuring each from the
// client, then reads the phases the server logged for the same sandboxes ("booted", "created",
// "checkpointed", "restored") and writes both, with medians, to a JSON file.
import fs from "node:fs";
import path from "node:path";

const [logFile, outDir, rounds = "10"] = process.argv.slice(2);
if (!logFile || !outDir) throw new Error("usage: node scripts/bench-trace.mjs SERVER_LOG OUT_DIR [ROUNDS]");
const port = process.env.CUBICLE_PORT ?? "3000";
const stateDir = process.env.CUBICLE_STATE_DIR ?? "/var/lib/cubicle";
process.env.E2B_API_URL = process.env.E2B_SANDBOX_URL = `http://127.0.0.1:${port}`;
process.env.E2B_API_KEY = fs.readFileSync(path.join(stateDir, "api-key"), "utf8").trim();
process.env.E2B_DOMAIN = process.env.CUBICLE_DOMAIN ?? "cubicle.localhost";
const { Sandbox } = await import("e2b");

const n = Number(rounds);
const since = new Date().toISOString();
const client = { coldCreate: [], coldFirstCommand: [], snapshot: [], restoreCreate: [], restoreFirstCommand: [], forkOf10: [] };
const pause = () => new Promise((r) => setTimeout(r, 300));
/** Which loop ran when, to give each logged phase to its path. */
const stages = [];
const stage = (name) => {
  const at = new Date().toISOString();
  if (stages.length) stages[stages.length - 1].to = at;
  stages.push({ name, from: at, to: undefined });
};
const timed = async (fn) => {
  const t0 = performance.now();
  const value = await fn();
  return [Math.round((performance.now() - t0) * 100) / 100, value];
};

const source = await Sandbox.create("base");
try {
  await source.commands.run("true");
  stage("coldCreate");
  for (let i = 0; i < n; i++) {
    await pause();
    const [createMs, sandbox] = await timed(() => Sandbox.create("base"));
    const [firstMs] = await timed(() => sandbox.commands.run("true"));
    client.coldCreate.push(createMs);
    client.coldFirstCommand.push(firstMs);
    await sandbox.kill();
  }
  let snapshotId;
  stage("snapshot");
  for (let i = 0; i < n; i++) {
    await pause();
    const [ms, snap] = await timed(() => source.createSnapshot());
    client.snapshot.push(ms);
    if (snapshotId) await Sandbox.deleteSnapshot(snap.snapshotId);
    else snapshotId = snap.snapshotId;
  }
  stage("restoreCreate");
  for (let i = 0; i < n; i++) {
    await pause();
    const [createMs, sandbox] = await timed(() => Sandbox.create(snapshotId));
    const [firstMs] = await timed(() => sandbox.commands.run("true"));
    client.restoreCreate.push(createMs);
    client.restoreFirstCommand.push(firstMs);
    await sandbox.kill();
  }
  stage("forkOf10");
  for (let i = 0; i < Math.max(1, Math.floor(n / 4)); i++) {
    await pause();
    const [ms, forks] = await timed(async () => {
      const made = await source.fork({ count: 10, timeoutMs: 600_000 });
      await Promise.all(made.map((f) => (f instanceof Error ? Promise.reject(f) : f.commands.run("true"))));
      return made;
    });
    client.forkOf10.push(ms);
    await Promise.all(forks.map((f) => (f instanceof Error ? undefined : f.kill())));
  }
  await Sandbox.deleteSnapshot(snapshotId);
  stage("end");
} finally {
  await source.kill();
}

// The server's phases, from its debug log lines of this run.
const phases = {};
for (const line of fs.readFileSync(logFile, "utf8").split("\n")) {
  const match = /^(\S+) debug \[(\w+)\] (booted|created|checkpointed|restored) (\{.*\})$/.exec(line);
  if (!match || match[1] < since) continue;
  const during = stages.find((s) => s.to && match[1] >= s.from && match[1] < s.to)?.name ?? "setup";
  (phases[`${during}: ${match[3]}`] ??= []).push(JSON.parse(match[4]));
}
const median = (values) => {
  const sorted = values.filter((v) => typeof v === "number").sort((a, b) => a - b);
  return sorted.length ? sorted[Math.floor((sorted.length - 1) / 2)] : undefined;
};
const medians = (records) => {
  const keys = [...new Set(records.flatMap((r) => Object.keys(r)))].filter((k) => records.some((r) => typeof r[k] === "number"));
  return Object.fromEntries(keys.map((k) => [k, median(records.map((r) => r[k]))]));
};
const result = {
  schema: "cubicle-trace/1",
  startedAt: since,
  rounds: n,
  clientMedianMs: Object.fromEntries(Object.entries(client).map(([k, v]) => [k, median(v)])),
  serverPhaseMedianMs: Object.fromEntries(Object.entries(phases).map(([k, v]) => [k, { count: v.length, ...medians(v) }])),
  client,
  phases,
};
fs.mkdirSync(outDir, { recursive: true });
const file = path.join(outDir, `trace-${since.replace(/[:.]/g, "-")}.json`);
fs.writeFileSync(file, JSON.stringify(result, null, 2) + "\n");
console.log(JSON.stringify({ clientMedianMs: result.clientMedianMs, serverPhaseMedianMs: result.serverPhaseMedianMs }, null, 2));
console.log(`trace: ${file}`);
