/**
 * `./cubicle bench report`: the newest result of each scenario shape → REPORT.md + SVG charts.
 * Every figure printed comes from a result file, named beside it; nothing is typed by hand
 * except the published reference figures, which are quoted with their source hardware.
 */
import fs from "node:fs";
import path from "node:path";
import type { BenchResultFile } from "./result.js";
import { renderLineChart, type ChartSeries } from "./svg-chart.js";

export interface ReportInput {
  resultsDir: string;
  /** REPORT.md goes here, charts under `<reportDir>/charts/`. */
  reportDir: string;
}

export interface ReportOutput {
  reportPath: string;
  charts: string[];
  filesUsed: string[];
}

/** Published figures to compare against; `hardware` is stated beside every one. */
export const REFERENCE_SYSTEMS = {
  CubeSandbox: {
    hardware: "16-core PVM server (CubeSandbox's published cube-bench figures)",
    figures: { create: 67, snapshot: 41, restore: 67, rollback: 90, fork1: 270, pause: 371, resume: 19 } as Record<string, number>,
  },
  Coppice: { hardware: "—", figures: {} as Record<string, number> },
  AgentFense: { hardware: "—", figures: {} as Record<string, number> },
};

interface Loaded {
  file: string;
  data: BenchResultFile;
}

type Summary = { count?: number; avg?: number; min?: number; p50?: number; p90?: number; p95?: number; p99?: number; max?: number };

/** Reads a nested field (`a.b.c`) of a result without trusting its shape. */
function pick(value: unknown, dotted: string): any {
  return dotted.split(".").reduce<any>((v, key) => (v === null || v === undefined ? undefined : v[key]), value);
}

function fmt(v: unknown, digits = 1): string {
  return typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "—";
}

function pct(v: unknown): string {
  return typeof v === "number" ? `${Math.round(v * 1000) / 10} %` : "—";
}

function ratio(value: unknown, floor: unknown): string {
  return typeof value === "number" && typeof floor === "number" && floor > 0 ? `${(value / floor).toFixed(1)}×` : "—";
}

/** Network results live in `<results>/network/` (bench/network.sh runs them on a server of their own). */
const NETWORK_SUBDIR = "network";

function loadResults(dir: string): Loaded[] {
  if (!fs.existsSync(dir)) return [];
  const networkDir = path.join(dir, NETWORK_SUBDIR);
  const names = [
    ...fs.readdirSync(dir),
    ...(fs.existsSync(networkDir) && fs.statSync(networkDir).isDirectory() ? fs.readdirSync(networkDir).map((f) => path.join(NETWORK_SUBDIR, f)) : []),
  ];
  return names
    .filter((f) => f.endsWith(".json"))
    .flatMap((f) => {
      try {
        const data = JSON.parse(fs.readFileSync(path.join(dir, f), "utf8")) as BenchResultFile;
        // Files of the first harness (no schema, no status) are not read: their shapes differ.
        return data.schema === "cubicle-bench/1" && typeof data.scenario === "string" && typeof data.startedAt === "string" ? [{ file: f, data }] : [];
      } catch {
        return [];
      }
    });
}

/**
 * Which create path a run measured: "warm pool" when the server had a pool for some template
 * (creates claim frozen sandboxes), "cold" (runc run + agent start) when it had none.
 */
function createPath(data: BenchResultFile): string {
  const pools = (data.target?.pools ?? {}) as Record<string, { target?: number }>;
  const template = String(data.parameters?.template ?? "base");
  // The code interpreter without a pool of its own: its creates restore the warm snapshot.
  if (template === "code-interpreter-v1" && !(Number(pools[template]?.target ?? 0) > 0)) return "code-interpreter-v1 warm snapshot";
  if (!Object.values(pools).some((pool) => Number(pool?.target ?? 0) > 0)) return "cold";
  // --wait-pool: every create claimed from a full pool, none raced the refill of the last one.
  return data.parameters?.waitForPool === true ? "warm pool, refilled" : "warm pool";
}

/** The shape a result belongs to: the newest result per shape is reported. */
function shapeOf(data: BenchResultFile): string {
  const p = data.parameters ?? {};
  if (data.scenario === "create") return `create|${p.mode ?? "create-delete"}|${createPath(data)}|${p.concurrency}|${Number(p.background ?? 0)}`;
  if (data.scenario === "density") return `density|${p.concurrency}`;
  if (data.scenario === "density-idle") return `density-idle|${p.total}`;
  if (data.scenario === "baseline") return data.scenario;
  if (["exec", "files", "runcode"].includes(data.scenario)) return `${data.scenario}|${p.concurrency}`;
  return `${data.scenario}|${p.concurrency}`;
}

function newestPerShape(all: Loaded[]): Loaded[] {
  const newest = new Map<string, Loaded>();
  for (const entry of all) {
    const key = shapeOf(entry.data);
    const seen = newest.get(key);
    if (!seen || entry.data.startedAt > seen.data.startedAt) newest.set(key, entry);
  }
  return [...newest.values()].sort((a, b) => Number(a.data.parameters?.concurrency ?? 0) - Number(b.data.parameters?.concurrency ?? 0));
}

function table(header: string[], rows: string[][]): string {
  return [`| ${header.join(" | ")} |`, `|${header.map(() => "---").join("|")}|`, ...rows.map((r) => `| ${r.join(" | ")} |`)].join("\n");
}

function latencyCells(s: Summary | undefined): string[] {
  return [fmt(s?.avg), fmt(s?.min), fmt(s?.p50), fmt(s?.p90), fmt(s?.p95), fmt(s?.p99), fmt(s?.max)];
}
const LATENCY_HEADER = ["avg", "min", "p50", "p90", "p95", "p99", "max"];

function fileRef(entry: Loaded): string {
  return `\`${entry.file}\``;
}

/** A reason (maybe a multi-line CRIU log) made fit for one table cell. */
function brief(text: unknown, max = 200): string {
  const line = String(text ?? "no reason recorded").replace(/\s+/g, " ").replace(/\|/g, "\\|");
  return line.length > max ? `${line.slice(0, max)}…` : line;
}

function notAvailableLine(entry: Loaded): string {
  return `**${entry.data.status}** — ${brief(entry.data.reason, 400)} (${fileRef(entry)})`;
}

/** Writes REPORT.md and the charts; returns what it wrote. */
export function writeReport(input: ReportInput): ReportOutput {
  const all = loadResults(input.resultsDir);
  const chosen = newestPerShape(all);
  const of = (scenario: string) => chosen.filter((e) => e.data.scenario === scenario);
  const chartsDir = path.join(input.reportDir, "charts");
  fs.mkdirSync(chartsDir, { recursive: true });
  const charts: string[] = [];
  const chart = (name: string, svg: string) => {
    const file = path.join(chartsDir, name);
    fs.writeFileSync(file, svg);
    charts.push(file);
    return `![${name}](charts/${name})`;
  };
  const resultsRel = path.relative(input.reportDir, input.resultsDir) || ".";
  const out: string[] = [
    "# Cubicle benchmark report",
    "",
    `Generated by \`./cubicle bench report\` from the newest result of each scenario shape in \`${resultsRel}/\` (${chosen.length} of ${all.length} result files). Do not edit by hand: rerun the commands in \`bench/README.md\` and regenerate. Latencies are milliseconds; each figure names its result file.`,
    "",
  ];

  // Machine and revision.
  const machines = new Map<string, string[]>();
  for (const e of chosen) {
    const m = e.data.machine ?? {};
    const key = `${m.hostname} · ${m.cpuModel} · ${m.cores} cores · ${m.memoryGiB} GiB · kernel ${m.kernel} · Node ${m.node} · cgroup ${m.cgroup} · git ${m.gitRevision}`;
    machines.set(key, [...(machines.get(key) ?? []), e.file]);
  }
  out.push("## Machine", "");
  if (machines.size === 0) out.push("No result files yet.", "");
  for (const [key, files] of machines) out.push(`- ${key} (${files.length === chosen.length ? "all files" : files.map((f) => `\`${f}\``).join(", ")})`);
  if (machines.size > 1) out.push("", "⚠ The results come from more than one machine or revision: compare ratios, not absolute numbers.");
  out.push("");

  // Floors.
  const baseline = of("baseline")[0];
  const runcFloor = pick(baseline?.data.summary, "runc.totalMs.p50");
  const criuFloor = pick(baseline?.data.summary, "criu.totalMs.p50");
  const spawnFloor = pick(baseline?.data.summary, "spawn.totalMs.p50");
  out.push("## Floor (baseline in the same run)", "");
  if (!baseline) out.push("No baseline result: run `./cubicle bench baseline`.", "");
  else {
    const rows = (["runc", "criuDump", "criu", "spawn"] as const).map((k) => {
      const part = pick(baseline.data.summary, k) ?? {};
      const what = {
        runc: "`runc run --keep` + `runc delete` of `/bin/true` (userns, read-only template rootfs)",
        criuDump: "raw `criu dump --leave-running` of an idle agent process",
        criu: pick(part, "process") === "agent" ? "raw `criu restore` of that agent's image" : "raw `criu restore` of one process",
        spawn: "Node fork+exec of `/bin/true`",
      }[k];
      if (part.status !== "ok") return [what, `${part.status ?? "missing"}: ${brief(part.reason ?? pick(baseline.data.errors, "0"))}`, "", "", "", "", "", "", fileRef(baseline)];
      return [what, ...latencyCells(part.totalMs), fileRef(baseline)];
    });
    out.push(table(["floor", ...LATENCY_HEADER, "file"], rows), "");
  }

  out.push(...targetsSection(chosen, baseline), "");

  // Create.
  const creates = of("create");
  out.push("## Create → first successful command", "");
  if (creates.length === 0) out.push("No create results.", "");
  else {
    const label = (e: Loaded) => `${e.data.parameters.mode ?? "create-delete"}, ${createPath(e.data)}`;
    const modes = [...new Set(creates.map(label))];
    const series: ChartSeries[] = modes.flatMap((mode) => {
      const rows = creates.filter((e) => label(e) === mode && e.data.status === "ok");
      return (["p50", "p95"] as const).map((p) => ({
        name: `${p} ${mode}`,
        points: rows.map((e) => [Number(e.data.parameters.concurrency), Number(pick(e.data.summary, `createToFirstCommandMs.${p}`))] as const),
      }));
    });
    out.push(chart("create-latency-vs-concurrency.svg", renderLineChart({ title: "create → first command vs concurrency", xLabel: "concurrency", yLabel: "ms", series })), "");
    out.push(
      table(
        ["c", "mode", "path", "n", "success", ...LATENCY_HEADER, "wall", "per sandbox (amortized)", "API p50", "p50 ÷ runc floor", "file"],
        creates.map((e) => {
          const s = e.data.summary;
          return [
            String(e.data.parameters.concurrency),
            String(e.data.parameters.mode ?? "create-delete"),
            createPath(e.data),
            String(e.data.parameters.total),
            pct(pick(s, "successRate")),
            ...latencyCells(pick(s, "createToFirstCommandMs")),
            fmt(pick(s, "wallMs"), 0),
            fmt(pick(s, "amortizedMsPerSandbox")),
            fmt(pick(s, "createApiMs.p50")),
            ratio(pick(s, "createToFirstCommandMs.p50"), runcFloor),
            fileRef(e),
          ];
        }),
      ),
      "",
    );
  }

  // Density.
  const densities = of("density");
  out.push("## Density: idle sandboxes vs host memory", "");
  if (densities.length === 0) out.push("No density result.", "");
  for (const [index, density] of densities.entries()) {
    const points = (density.data.samples as any[]) ?? [];
    out.push(`### batches of ${density.data.parameters.concurrency}`, "");
    out.push(
      chart(
        index === densities.length - 1 ? "memory-vs-sandboxes.svg" : `memory-vs-sandboxes-c${density.data.parameters.concurrency}.svg`,
        renderLineChart({
          title: "memory per idle sandbox",
          xLabel: "live sandboxes",
          yLabel: "MiB per sandbox",
          series: [
            { name: "MemAvailable Δ ÷ N", points: points.map((p) => [p.sandboxes, p.perSandboxMiB] as const) },
            { name: "MemFree Δ ÷ N", points: points.map((p) => [p.sandboxes, p.perSandboxFreeMiB] as const) },
            { name: "agent PSS", points: points.map((p) => [p.sandboxes, pick(p, "agents.avgPssMiB")] as const) },
            { name: "agent private", points: points.map((p) => [p.sandboxes, pick(p, "agents.avgPrivateMiB")] as const) },
          ],
        }),
      ),
      "",
      `Stopped: ${pick(density.data.summary, "stoppedBecause")} (${fileRef(density)}).`,
      "",
      table(
        ["sandboxes", "MemAvailable Δ ÷ N (MiB)", "MemFree Δ ÷ N (MiB)", "agent PSS avg (MiB)", "agent private avg (MiB)", "agents measured"],
        points.map((p) => [String(p.sandboxes), fmt(p.perSandboxMiB, 2), fmt(p.perSandboxFreeMiB, 2), fmt(pick(p, "agents.avgPssMiB"), 2), fmt(pick(p, "agents.avgPrivateMiB"), 2), String(pick(p, "agents.measured") ?? "—")]),
      ),
      "",
    );
  }

  // Round trips.
  out.push("## Round trips on one sandbox", "");
  const roundRows: string[][] = [];
  for (const e of [...of("exec"), ...of("files"), ...of("runcode")]) {
    const s = e.data.summary as Record<string, any>;
    for (const [key, value] of Object.entries(s)) {
      if (!value || typeof value !== "object" || !("p50" in value)) continue;
      roundRows.push([`${e.data.scenario} ${key}`, String(e.data.parameters.concurrency), String(value.count), ...latencyCells(value), ratio(value.p50, spawnFloor), fileRef(e)]);
    }
    if (e.data.scenario === "runcode") roundRows.push(["runcode: create → first runCode('1+1')", "1", "1", "—", "—", fmt(s.createToFirstRunCodeMs), "—", "—", "—", "—", ratio(s.createToFirstRunCodeMs, spawnFloor), fileRef(e)]);
  }
  out.push(roundRows.length ? table(["operation", "c", "n", ...LATENCY_HEADER, "p50 ÷ spawn floor", "file"], roundRows) : "No exec, files or runcode results.", "");

  // Snapshot family.
  out.push("## Snapshots, restore, rollback, fork, pause/resume", "");
  const snapshots = of("snapshot");
  for (const e of snapshots) {
    out.push(`### snapshot vs dirty memory, c=${e.data.parameters.concurrency}`, "");
    if (e.data.status !== "ok") {
      out.push(notAvailableLine(e), "");
      continue;
    }
    const bySize = (pick(e.data.summary, "byDirtyMiB") ?? {}) as Record<string, any>;
    out.push(
      chart(
        `snapshot-vs-dirty-c${e.data.parameters.concurrency}.svg`,
        renderLineChart({
          title: `createSnapshot vs dirty /dev/shm, c=${e.data.parameters.concurrency}`,
          xLabel: "dirty MiB",
          yLabel: "ms",
          series: (["p50", "p95"] as const).map((p) => ({ name: p, points: Object.entries(bySize).map(([mib, v]) => [Number(mib), Number(pick(v, `snapshotMs.${p}`))] as const) })),
        }),
      ),
      "",
      table(
        ["dirty MiB", "status", ...LATENCY_HEADER, "file"],
        Object.entries(bySize).map(([mib, v]) => (v.status === "ok" ? [mib, `ok, ${pct(v.successRate)} succeeded`, ...latencyCells(v.snapshotMs), fileRef(e)] : [mib, `${v.status}: ${brief(v.reason)}`, "", "", "", "", "", "", "", fileRef(e)])),
      ),
      "",
    );
  }
  const simple: [string, string, string][] = [
    ["restore", "create from snapshot → first command", "firstCommandMs"],
    ["rollback", "POST /sandboxes/{id}/rollback", "rollbackMs"],
    ["fork", "fork of N → all forks answer", "allForksAnswerMs"],
  ];
  const lifecycleRows: string[][] = [];
  for (const [scenario, label, field] of simple) {
    for (const e of of(scenario)) {
      const c = String(e.data.parameters.concurrency);
      if (e.data.status !== "ok") lifecycleRows.push([label, c, `${e.data.status}: ${brief(e.data.reason)}`, ...LATENCY_HEADER.map(() => ""), "", fileRef(e)]);
      else lifecycleRows.push([label, c, pct(pick(e.data.summary, "successRate")), ...latencyCells(pick(e.data.summary, field)), ratio(pick(e.data.summary, `${field}.p50`), criuFloor), fileRef(e)]);
    }
  }
  for (const e of of("pause-resume")) {
    const c = String(e.data.parameters.concurrency);
    if (e.data.status !== "ok" && !pick(e.data.summary, "byVariant")) {
      lifecycleRows.push(["pause / resume", c, `${e.data.status}: ${brief(e.data.reason)}`, ...LATENCY_HEADER.map(() => ""), "", fileRef(e)]);
      continue;
    }
    for (const [variant, v] of Object.entries((pick(e.data.summary, "byVariant") ?? {}) as Record<string, any>)) {
      for (const field of ["pauseMs", "resumeMs", "resumeToFirstCommandMs"]) {
        if (v.status !== "ok") lifecycleRows.push([`${variant} ${field}`, c, `${v.status}: ${brief(v.reason)}`, ...LATENCY_HEADER.map(() => ""), "", fileRef(e)]);
        else lifecycleRows.push([`${variant} ${field}`, c, pct(v.successRate), ...latencyCells(v[field]), ratio(v[field]?.p50, criuFloor), fileRef(e)]);
      }
    }
  }
  if (snapshots.length === 0 && lifecycleRows.length === 0) out.push("No snapshot-family results.", "");
  if (lifecycleRows.length) out.push(table(["operation", "c", "success", ...LATENCY_HEADER, "p50 ÷ CRIU floor", "file"], lifecycleRows), "");

  out.push(...costCurves(chosen, chart), "");

  out.push(...networkSection(of("network")[0]), "");

  out.push(...templateBuildSection(of("template-build")[0]), "");

  out.push(...runtimesSection(of("runtimes")[0]), "");

  out.push(...storageSection(of("storage")[0]), "");

  // Comparison.
  const p50 = (scenario: string, field: string, c = 1, path?: string): { value?: number; file?: string; note?: string } => {
    const e = chosen.find(
      (x) =>
        x.data.scenario === scenario &&
        Number(x.data.parameters.concurrency) === c &&
        (scenario !== "create" || ((x.data.parameters.mode ?? "create-delete") === "create-delete" && (!path || createPath(x.data) === path))),
    );
    if (!e) return { note: "not measured" };
    if (e.data.status !== "ok" && !field.startsWith("byVariant")) return { note: e.data.status, file: e.file };
    const value = pick(e.data.summary, field);
    if (typeof value === "number") return { value, file: e.file };
    const variantStatus = pick(e.data.summary, field.split(".").slice(0, 2).join(".") + ".status");
    if (variantStatus === "not available") return { note: "not available", file: e.file };
    const prefix = field.split(".").slice(0, -2).join(".");
    const successRate = pick(e.data.summary, prefix ? `${prefix}.successRate` : "successRate");
    return { note: successRate === 0 ? "every attempt failed" : "not measured", file: e.file };
  };
  const smallestDirty = (() => {
    const e = chosen.find((x) => x.data.scenario === "snapshot" && Number(x.data.parameters.concurrency) === 1 && x.data.status === "ok");
    const sizes = Object.keys((pick(e?.data.summary, "byDirtyMiB") ?? {}) as object).map(Number).sort((a, b) => a - b);
    return sizes[0] ?? 0;
  })();
  const comparisons: [string, string, { value?: number; file?: string; note?: string }][] = [
    ["create from a full warm pool (→ first command, c=1, p50)", "create", p50("create", "createToFirstCommandMs.p50", 1, "warm pool, refilled")],
    ["create from the warm pool, back to back with its refill (→ first command, c=1, p50)", "create", p50("create", "createToFirstCommandMs.p50", 1, "warm pool")],
    ["create, cold: runc run + agent start (→ first command, c=1, p50)", "create", p50("create", "createToFirstCommandMs.p50", 1, "cold")],
    ["create from the code interpreter's warm snapshot (→ first command, c=1, p50)", "restore", p50("create", "createToFirstCommandMs.p50", 1, "code-interpreter-v1 warm snapshot")],
    [`snapshot (${smallestDirty} MiB dirty, c=1, p50)`, "snapshot", p50("snapshot", `byDirtyMiB.${smallestDirty}.snapshotMs.p50`)],
    ["create from snapshot (c=1, p50)", "restore", p50("restore", "firstCommandMs.p50")],
    ["rollback (c=1, p50)", "rollback", p50("rollback", "rollbackMs.p50")],
    ["clone / fork of one (p50)", "fork1", p50("fork", "allForksAnswerMs.p50")],
    ["pause (c=1, p50)", "pause", p50("pause-resume", "byVariant.pause().pauseMs.p50")],
    ["resume (c=1, p50)", "resume", p50("pause-resume", "byVariant.pause().resumeMs.p50")],
  ];
  const cube = REFERENCE_SYSTEMS.CubeSandbox;
  out.push(
    "## Comparison with published figures",
    "",
    `CubeSandbox figures are its published numbers on a ${cube.hardware}; Cubicle's are from the files named, on the machine above. Different hardware and isolation (KVM microVMs vs runc containers): read these as orders of magnitude, and the ratios to the floor above as the fairer measure.`,
    "",
    table(
      ["operation", "Cubicle (this machine)", "file", "CubeSandbox (16-core PVM server)", "Coppice", "AgentFense"],
      comparisons.map(([label, key, ours]) => [
        label,
        ours.value !== undefined ? `${fmt(ours.value)} ms` : ours.note ?? "—",
        ours.file ? `\`${ours.file}\`` : "—",
        cube.figures[key] !== undefined ? `${key === "fork1" ? "~" : ""}${cube.figures[key]} ms` : "—",
        "no comparable published figure",
        "no comparable published figure",
      ]),
    ),
    "",
  );

  // Errors.
  const withErrors = chosen.filter((e) => (e.data.errors ?? []).length > 0);
  if (withErrors.length) {
    out.push("## Errors recorded", "");
    for (const e of withErrors) out.push(`- ${fileRef(e)}: ${e.data.errors.length} — first: ${brief(e.data.errors[0], 300)}`);
    out.push("");
  }
  out.push("## Files used", "", ...chosen.map((e) => `- \`${e.file}\` (${e.data.scenario}, ${e.data.startedAt})`), "");

  fs.mkdirSync(input.reportDir, { recursive: true });
  const reportPath = path.join(input.reportDir, "REPORT.md");
  fs.writeFileSync(reportPath, out.join("\n"));
  return { reportPath, charts, filesUsed: chosen.map((e) => e.file) };
}

/**
 * How cost grows with work: create → first command at c=1 against the number of sandboxes
 * already live (`create --background N` runs), and create from a snapshot against the image's
 * size (`restore-size`), beside snapshot against dirty memory (the snapshot section).
 */
function costCurves(chosen: Loaded[], chart: (name: string, svg: string) => string): string[] {
  const out = ["## Cost curves", ""];
  const creates = chosen
    .filter((e) => e.data.scenario === "create" && e.data.status === "ok" && Number(e.data.parameters.concurrency) === 1 && (e.data.parameters.mode ?? "create-delete") === "create-delete")
    .sort((a, b) => Number(a.data.parameters.background ?? 0) - Number(b.data.parameters.background ?? 0));
  const byPath = new Map<string, Loaded[]>();
  for (const e of creates) byPath.set(createPath(e.data), [...(byPath.get(createPath(e.data)) ?? []), e]);
  const curves = [...byPath.entries()].filter(([, runs]) => runs.length > 1);
  if (curves.length === 0) out.push("Create vs live sandboxes: fewer than two `create -c 1 --background N` results per path.", "");
  else {
    const series: ChartSeries[] = curves.flatMap(([name, runs]) =>
      (["p50", "p95"] as const).map((p) => ({ name: `${p} ${name}`, points: runs.map((e) => [Number(e.data.parameters.background ?? 0), Number(pick(e.data.summary, `createToFirstCommandMs.${p}`))] as const) })),
    );
    out.push(chart("create-vs-live-sandboxes.svg", renderLineChart({ title: "create → first command vs live sandboxes (c=1)", xLabel: "live sandboxes", yLabel: "ms", series })), "");
    out.push(
      table(
        ["path", "live sandboxes", "n", "p50", "p95", "file"],
        curves.flatMap(([name, runs]) => runs.map((e) => [name, String(e.data.parameters.background ?? 0), String(e.data.parameters.total), fmt(pick(e.data.summary, "createToFirstCommandMs.p50")), fmt(pick(e.data.summary, "createToFirstCommandMs.p95")), fileRef(e)])),
      ),
      "",
    );
  }
  const idle = chosen.filter((e) => e.data.scenario === "density-idle").sort((a, b) => Number(pick(a.data.summary, "sandboxes") ?? 0) - Number(pick(b.data.summary, "sandboxes") ?? 0));
  if (idle.length === 0) out.push("Idle tiers at scale: no `density-idle` result.", "");
  else {
    out.push(
      "Idle tiers at scale (`density-idle`: sandboxes left alone on a server with short idle settings until all are on disk; host memory per sandbox awake, frozen and on disk; the images' bytes (their files' sizes) and the storage pool's use (compressed, with layers and metadata) per sandbox; a sample's first command after a wake):",
      "",
      table(
        ["sandboxes", "awake MiB each", "asleep MiB each (frozen or on disk)", "on disk MiB each", "image MiB each (files)", "pool MiB each (stored)", "wake from disk p50", "wake from frozen p50", "file"],
        idle.map((e) =>
          e.data.status !== "ok"
            ? [String(pick(e.data.summary, "sandboxes") ?? "—"), `${e.data.status}: ${brief(e.data.reason)}`, "", "", "", "", "", "", fileRef(e)]
            : [
                String(pick(e.data.summary, "sandboxes")),
                fmt(pick(e.data.summary, "awake.perSandboxMiB"), 2),
                fmt(pick(e.data.summary, "frozen.perSandboxMiB"), 2),
                fmt(pick(e.data.summary, "onDisk.perSandboxMiB"), 2),
                fmt(pick(e.data.summary, "onDisk.imageMiBPerSandbox"), 2),
                fmt(pick(e.data.summary, "onDisk.poolMiBPerSandbox"), 2),
                fmt(pick(e.data.summary, "wakeFromDiskToFirstCommandMs.p50")),
                fmt(pick(e.data.summary, "wakeFromFrozenToFirstCommandMs.p50")),
                fileRef(e),
              ],
        ),
      ),
      "",
    );
  }
  const sized = chosen.find((e) => e.data.scenario === "restore-size" && e.data.status === "ok");
  if (!sized) out.push("Restore vs image size: no `restore-size` result.", "");
  else {
    const bySize = (pick(sized.data.summary, "byDirtyMiB") ?? {}) as Record<string, any>;
    const ok = Object.entries(bySize).filter(([, v]) => v.status === "ok");
    out.push(
      chart("restore-vs-image-size.svg", renderLineChart({ title: "create from a snapshot → first command vs dirty memory in the image", xLabel: "dirty MiB", yLabel: "ms", series: (["p50", "p95"] as const).map((p) => ({ name: p, points: ok.map(([mib, v]) => [Number(mib), Number(pick(v, `firstCommandMs.${p}`))] as const) })) })),
      "",
      table(
        ["dirty MiB", "status", ...LATENCY_HEADER, "file"],
        Object.entries(bySize).map(([mib, v]) => (v.status === "ok" ? [mib, `ok, ${pct(v.successRate)} succeeded`, ...latencyCells(v.firstCommandMs), fileRef(sized)] : [mib, `${v.status}: ${brief(v.reason)}`, "", "", "", "", "", "", "", fileRef(sized)])),
      ),
      "",
    );
  }
  return out;
}

/**
 * Issue 15's targets: each shape as a ratio to the floor it stands on, all from the newest
 * result of each shape (the floors from the newest baseline; run them in one session).
 */
function targetsSection(chosen: Loaded[], baseline: Loaded | undefined): string[] {
  const find = (scenario: string, c: number, path?: string) =>
    chosen.find(
      (e) =>
        e.data.scenario === scenario &&
        e.data.status === "ok" &&
        Number(e.data.parameters.concurrency) === c &&
        (scenario !== "create" || ((e.data.parameters.mode ?? "create-delete") === "create-delete" && createPath(e.data) === path)),
    );
  const floor = (key: string) => ({ value: pick(baseline?.data.summary, `${key}.totalMs.p50`) as number | undefined, file: baseline?.file });
  const restore = floor("criu");
  const exec = find("exec", 1);
  const coldOne = find("create", 1, "cold");
  const rows: { shape: string; measured?: Loaded; value?: number; floorName: string; floorValue?: number; target: number }[] = [
    { shape: "create from a snapshot → first command", measured: find("restore", 1), value: pick(find("restore", 1)?.data.summary, "firstCommandMs.p50"), floorName: "raw CRIU restore", floorValue: restore.value, target: 1.5 },
    { shape: "rollback", measured: find("rollback", 1), value: pick(find("rollback", 1)?.data.summary, "rollbackMs.p50"), floorName: "raw CRIU restore", floorValue: restore.value, target: 1.5 },
    { shape: "snapshot of a fresh sandbox", measured: find("snapshot", 1), value: pick(find("snapshot", 1)?.data.summary, "byDirtyMiB.0.snapshotMs.p50"), floorName: "raw CRIU dump (leave running)", floorValue: floor("criuDump").value, target: 1.5 },
    { shape: "fork of 10 → all answer", measured: find("fork", 10), value: pick(find("fork", 10)?.data.summary, "allForksAnswerMs.p50"), floorName: "one raw CRIU restore", floorValue: restore.value, target: 4 },
    { shape: "cold create → first command", measured: coldOne, value: pick(coldOne?.data.summary, "createToFirstCommandMs.p50"), floorName: "runc run + delete", floorValue: floor("runc").value, target: 1.2 },
    { shape: "warm pool → first command", measured: find("create", 1, "warm pool"), value: pick(find("create", 1, "warm pool")?.data.summary, "createToFirstCommandMs.p50"), floorName: "one commands.run('true')", floorValue: pick(exec?.data.summary, "commandMs.p50"), target: 2 },
    { shape: "commands.run('true')", measured: exec, value: pick(exec?.data.summary, "commandMs.p50"), floorName: "Node fork+exec", floorValue: floor("spawn").value, target: 1.3 },
    { shape: "c=10 creates, pool drained (amortized per sandbox)", measured: find("create", 10, "warm pool"), value: pick(find("create", 10, "warm pool")?.data.summary, "amortizedMsPerSandbox"), floorName: "c=1 cold create p50", floorValue: pick(coldOne?.data.summary, "createToFirstCommandMs.p50"), target: 2 },
  ];
  const out = [
    "## Targets: each shape ÷ its floor",
    "",
    "p50 of the newest result of each shape ÷ the floor it stands on, measured on the same machine (the floors from the newest baseline). A ratio holds across machines where absolute times do not.",
    "",
  ];
  out.push(
    table(
      ["shape", "p50", "floor", "floor p50", "ratio", "target", "met", "file"],
      rows.map((r) => {
        const ok = typeof r.value === "number" && typeof r.floorValue === "number" && r.floorValue > 0;
        const value = ok ? r.value! / r.floorValue! : undefined;
        return [r.shape, fmt(r.value), r.floorName, fmt(r.floorValue), value === undefined ? "—" : `${value.toFixed(2)}×`, `≤ ${r.target}×`, value === undefined ? "not measured" : value <= r.target ? "yes" : "no", r.measured ? fileRef(r.measured) : "—"];
      }),
    ),
  );
  return out;
}

/** Issue 14's numbers: each egress path as a ratio to the direct-NAT floor, updateNetwork, creates with a policy. */
function networkSection(entry: Loaded | undefined): string[] {
  const out = ["## Network: egress paths, updateNetwork, creates with a policy", ""];
  if (!entry) return [...out, "No network result: run `bench/network.sh`."];
  if (entry.data.status !== "ok") return [...out, notAvailableLine(entry)];
  const s = entry.data.summary as Record<string, any>;
  const mib = Number(s.downloadBytes) / 1024 / 1024;
  out.push(
    `Against fake hosts in a test namespace (${fileRef(entry)}): ${s.connectionsPerPath} connections per path over ${s.rounds} rounds (path order rotating), one ${fmt(mib, 0)} MiB download per path and round, the same Python client everywhere. ` +
      "The floor is a plain namespace behind the kernel's forwarding and masquerade. Inside a sandbox *connect* ends at Cubicle's proxy (the kernel redirects every TCP connection to it), so *first byte* (TCP connect → first response byte, TLS included) is the setup cost to compare; paths by name resolve before each connection (resolve, not included). Ratios: path ÷ floor of the same scheme; for throughput floor MB/s ÷ path MB/s (> 1 = slower).",
    "",
  );
  const rows = Object.entries((s.paths ?? {}) as Record<string, any>).map(([id, p]) => [
    String(p.label ?? id),
    String(p.connections ?? "—"),
    fmt(pick(p, "resolveMs.p50"), 2),
    fmt(pick(p, "connectMs.p50"), 2),
    fmt(pick(p, "ttfbMs.p50"), 2),
    fmt(pick(p, "ttfbMs.p90"), 2),
    fmt(pick(p, "downloadMBps.median"), 0),
    p.vsFloor ? `${fmt(p.vsFloor.connectP50, 2)}×` : "floor",
    p.vsFloor ? `${fmt(p.vsFloor.ttfbP50, 2)}×` : "floor",
    p.vsFloor ? `${fmt(p.vsFloor.throughputSlowdown, 2)}×` : "floor",
    String(p.errors ?? 0),
  ]);
  out.push(table(["path", "n", "resolve p50", "connect p50", "first byte p50", "first byte p90", "MB/s (median)", "connect ÷ floor", "first byte ÷ floor", "throughput slowdown", "errors"], rows), "");
  const header = pick(s, "paths.header-https.headerInjected");
  if (header !== undefined) out.push(`Header injection: the fake server ${header ? "received" : "did **not** receive"} the header with the secret's value.`, "");
  const u = s.updateNetworkMs as Summary | undefined;
  out.push("`PUT /sandboxes/{id}/network` round trip (alternating between two allowlists):", "", table(["n", ...LATENCY_HEADER], [[String(u?.count ?? "—"), ...latencyCells(u)]]), "");
  const createRows: string[][] = [];
  for (const [label, key] of [["warm-pool claim", "claims"], ["cold (no pool entry fits)", "cold"]] as const) {
    const c = pick(s, `createsWithPolicy.${key}`);
    if (!c) continue;
    if (c.status) {
      createRows.push([label, `${c.status}: ${brief(c.reason)}`, "", "", "", "", ""]);
      continue;
    }
    for (const [what, field, ratioKey] of [["→ first command", "firstCommandMs", "firstCommandRatio"], ["API (201)", "apiMs", "apiRatio"]] as const) {
      const r = c[ratioKey] ?? {};
      createRows.push([`${label}, ${what}`, String(c.pairs), fmt(pick(c, `withoutPolicy.${field}.p50`), 1), fmt(pick(c, `withPolicy.${field}.p50`), 1), fmt(r.ratio, 3), Array.isArray(r.ci95) ? `${fmt(r.ci95[0], 3)} – ${fmt(r.ci95[1], 3)}` : "—", fmt(r.medianPairRatio, 3)]);
    }
  }
  out.push(
    "Creates with an allowlist policy vs without, paired back to back (order alternating), each claim from a full pool. Ratio = median with ÷ median without; 95 % interval by bootstrap over pairs. Issue 14's target: within 5 %.",
    "",
    table(["create", "pairs", "without p50", "with policy p50", "ratio", "95 % interval", "median pair ratio"], createRows),
  );
  return out;
}

function mib(bytes: unknown, digits = 1): string {
  return typeof bytes === "number" && Number.isFinite(bytes) ? `${(bytes / 1024 / 1024).toFixed(digits)} MiB` : "—";
}

function times(value: unknown): string {
  return typeof value === "number" && Number.isFinite(value) ? `${value.toFixed(2)}×` : "—";
}

/**
 * Issue 17's numbers so far (`runtimes`): containers and microVMs side by side from one run, the
 * QEMU start floor beside them.
 */
function runtimesSection(entry: Loaded | undefined): string[] {
  const out = ["## Runtimes: containers and microVMs side by side", ""];
  if (!entry) return [...out, "No runtimes result: run `./cubicle bench runtimes` against a server with `CUBICLE_MICROVM=tcg` (`bench/runtimes.sh`)."];
  if (entry.data.status !== "ok") return [...out, notAvailableLine(entry)];
  const s = entry.data.summary as Record<string, any>;
  const floor = pick(s, "qemuStartFloorMs.p50");
  out.push(
    `One server running both (${fileRef(entry)}; microVM accelerator: ${String(s.accelerator ?? "not stated")}): cold creates of \`${String(entry.data.parameters.template)}\` alternating between the runtimes, then pause → connect → first command, then host memory per idle sandbox (MemAvailable, ${String(pick(s, "runtimes.container.idleMemory.sandboxes") ?? "—")} alive of each, settled). ` +
      `Floor in the same run: a QEMU microvm start without a guest until QMP answers (p50 ${fmt(floor)} ms); the containers' floor (runc run+delete) is the baseline scenario's. ` +
      `Then per create a snapshot of the running sandbox and a create from it → first command (the container's of the same round is the microVM's floor), and the idle host memory of sandboxes made from one snapshot. Warm pools of microVMs: bench/microvm-pool.sh.`,
    "",
    table(
      ["runtime", "creates", "create → first command p50", "p95", "p50 ÷ QEMU start floor", "pause → resume → first command p50", "snapshot p50", "create from snapshot → first command p50", "… again from it (spare QEMU) p50", "idle host memory per sandbox", "… made from one snapshot"],
      (["container", "microvm"] as const).map((runtime) => [
        runtime,
        String(pick(s, `runtimes.${runtime}.creates`) ?? "—"),
        fmt(pick(s, `runtimes.${runtime}.firstCommandMs.p50`)),
        fmt(pick(s, `runtimes.${runtime}.firstCommandMs.p95`)),
        runtime === "microvm" ? times(s.microvmFirstCommandOverQemuStart) : "",
        fmt(pick(s, `runtimes.${runtime}.resumeMs.p50`)),
        fmt(pick(s, `runtimes.${runtime}.snapshotMs.p50`)),
        fmt(pick(s, `runtimes.${runtime}.restoreFirstCommandMs.p50`)),
        fmt(pick(s, `runtimes.${runtime}.restoreAgainFirstCommandMs.p50`)) + (runtime === "microvm" && pick(s, "runtimes.microvm.spareWaited") !== undefined ? ` (spare waited ${String(pick(s, "runtimes.microvm.spareWaited"))}×)` : ""),
        mib((pick(s, `runtimes.${runtime}.idleMemory.perSandboxMiB`) ?? NaN) * (1 << 20)),
        mib((pick(s, `runtimes.${runtime}.idleMemoryFromOneSnapshot.perSandboxMiB`) ?? NaN) * (1 << 20)),
      ]),
    ),
    "",
    `microVM ÷ container, p50: create → first command ${times(s.microvmOverContainerFirstCommand)}, snapshot ${times(s.microvmOverContainerSnapshot)}, create from a snapshot → first command ${times(s.microvmOverContainerRestore)}, a second create from it (the microVM's into a spare QEMU, SPARE_QEMU_NOTE) ${times(s.microvmOverContainerRestoreAgain)} (${times(s.microvmRestoreAgainOverFirst)} the microVM's first; a waiting spare QEMU holds ${fmt(pick(s, "runtimes.microvm.spareQemuRssMiB.p50"))} MiB resident, ${fmt(pick(s, "runtimes.microvm.spareQemuPrivateMiB.p50"))} MiB of it private); a microVM's create from a snapshot ÷ its cold create: ${times(s.microvmRestoreOverColdCreate)}. Targets for a KVM host (to be measured there): restore → first command ≤ 30 ms, ≤ 10 MiB private memory per idle microVM restored from a shared snapshot.`,
  );
  const qemu = (key: string) => pick(s, `runtimes.microvm.${key}.qemu`) as { processes: number; rssMiB: number; pssMiB: number; privateMiB: number } | undefined;
  const booted = qemu("idleMemory");
  const restored = qemu("idleMemoryFromOneSnapshot");
  if (booted || restored) {
    out.push(
      "",
      "Each idle microVM's QEMU as the kernel counts it (means of /proc/PID/smaps_rollup; a booted guest's RAM is a tmpfs file of its own, a restored one maps the image's RAM copy-on-write: MICROVM_RAM_NOTE):",
      "",
      table(
        ["microVMs", "QEMUs", "Rss", "Pss", "Private"],
        ([["booted", booted], ["made from one snapshot", restored]] as const).map(([label, m]) => [label, String(m?.processes ?? "—"), mib((m?.rssMiB ?? NaN) * (1 << 20)), mib((m?.pssMiB ?? NaN) * (1 << 20)), mib((m?.privateMiB ?? NaN) * (1 << 20))]),
      ),
    );
  }
  return out;
}

/**
 * Issue 18's numbers (`storage`): creates with a codebase or a volume mounted against plain
 * creates, and throughput through a volume and a codebase against the sandbox's root filesystem.
 */
function storageSection(entry: Loaded | undefined): string[] {
  const out = ["## Volumes and codebases: creates with mounts, throughput against the root filesystem", ""];
  if (!entry) return [...out, "No storage result: run `bench/storage.sh`."];
  if (entry.data.status !== "ok") return [...out, notAvailableLine(entry)];
  const s = entry.data.summary as Record<string, any>;
  const pathsShown = ["rootfs", "volume", "codebase"] as const;
  out.push(
    `One server (${fileRef(entry)}): cold creates of \`${String(entry.data.parameters.template)}\` (640 MB, so no pool entry fits), plain, with a codebase mounted (codebase-fs, 2 rules) and with a volume mounted, interleaved; ` +
      `then in one sandbox with both mounted, ${String(s.smallFiles)} files of 1 KiB written, read back and removed, and one ${String(s.bigFileMiB)} MiB file written (with an fsync) and read back, through each path (Python file calls inside the sandbox; reads are from the page cache where it still holds them).`,
    "",
    table(
      ["create", "→ first command p50", "p95", "÷ plain (paired, 95 % CI)"],
      (["plain", "codebase", "volume"] as const).map((kind) => {
        const ratio = kind === "plain" ? undefined : (s[`${kind}OverPlain`] as { ratio: number; ci95: [number, number] } | undefined);
        return [
          kind,
          fmt(pick(s, `firstCommandMs.${kind}.p50`)),
          fmt(pick(s, `firstCommandMs.${kind}.p95`)),
          ratio ? `${times(ratio.ratio)} [${ratio.ci95.map((v) => v.toFixed(2)).join("–")}]` : "",
        ];
      }),
    ),
    "",
    `AgentFense publishes ${String(s.agentfenseCodebaseCreateMs)} ms for a sandbox with a codebase, on its own machine: beside our p50 above, not a ratio.`,
    "",
    table(
      ["path", "small writes/s", "small reads/s", "small removes/s", "big write MiB/s", "big read MiB/s", "slowdown vs rootfs (small write, big write)"],
      pathsShown.map((name) => [
        name,
        fmt(pick(s, `throughput.${name}.smallWriteFilesPerS`)),
        fmt(pick(s, `throughput.${name}.smallReadFilesPerS`)),
        fmt(pick(s, `throughput.${name}.smallRemoveFilesPerS`)),
        fmt(pick(s, `throughput.${name}.bigWriteMiBPerS`)),
        fmt(pick(s, `throughput.${name}.bigReadMiBPerS`)),
        name === "rootfs" ? "floor" : `${times(pick(s, `slowdownVsRootfs.${name}.smallWriteFilesPerS`))}, ${times(pick(s, `slowdownVsRootfs.${name}.bigWriteMiBPerS`))}`,
      ]),
    ),
  );
  return out;
}

/**
 * Issue 16's numbers (`template-build`): cold build of an image + 3 steps with pull and unpack
 * split out, cached and changed-step rebuilds, creates from built templates, disk per template;
 * each beside the floor measured in the same run.
 */
function templateBuildSection(entry: Loaded | undefined): string[] {
  const out = ["## Template builds: cold, cached, one step changed; creates from built templates; disk per template", ""];
  if (!entry) return [...out, "No template-build result: run `./cubicle bench template-build`."];
  if (entry.data.status !== "ok") return [...out, notAvailableLine(entry)];
  const s = entry.data.summary as Record<string, any>;
  const tarFloor = pick(s, "floors.tarExtractMs.p50");
  const baseCreate = pick(s, "floors.baseColdCreateToFirstCommandMs.p50");
  out.push(
    `Through the \`e2b\` SDK's \`Template()\` builder (${fileRef(entry)}): \`fromImage\` of a python:3.12-slim-like image (the base template's rootfs as one gzip layer, ${mib(pick(s, "image.compressedBytes"))} compressed, ${mib(pick(s, "image.tarBytes"))} as tar) from a loopback registry, then 3 RUN steps. ` +
      `Build times are the client's (\`Template.build\` call → resolved, including the SDK's 200 ms status polling); *server* is the SDK's start → the server's "ready" log entry. ` +
      `Floors from the same run: GNU \`tar -xzf\` of the same layer (p50 ${fmt(tarFloor)} ms) and a cold \`base\` create → first command (p50 ${fmt(baseCreate)} ms, ${pick(s, "floors.baseCreatePath") ?? "—"}).`,
    "",
  );
  const cold = s.coldBuild ?? {};
  out.push(
    table(
      ["build", "n", "p50 (client)", "p50 (server)", "ratio", "floor"],
      [
        ["cold: pull + unpack + 3 steps → ready", "1", fmt(cold.ms), fmt(cold.serverMs), times(cold.msPerTarFloorPlusBaseCreate), "tar -xzf + base create"],
        ["… of which pull (download + verify + unpack)", "1", "—", fmt(cold.pullMs), times(cold.pullAndUnpackPerTarFloor), "tar -xzf"],
        ["… download (resolve → last byte)", "1", "—", fmt(cold.downloadMs), "", ""],
        ["… unpack (ids shifted)", "1", "—", fmt(cold.unpackMs), times(cold.unpackPerTarFloor), "tar -xzf"],
        ["… steps, commits, register → ready", "1", "—", fmt(cold.stepsToReadyMs), "", ""],
        ["fully cached rebuild", String(pick(s, "cachedRebuild.ms.count") ?? "—"), fmt(pick(s, "cachedRebuild.ms.p50")), fmt(pick(s, "cachedRebuild.serverMs.p50")), `${times(pick(s, "cachedRebuild.p50PerBaseCreate"))} (server ${times(pick(s, "cachedRebuild.serverP50PerBaseCreate"))})`, "base create"],
        ["rebuild, last step changed", String(pick(s, "changedLastStep.ms.count") ?? "—"), fmt(pick(s, "changedLastStep.ms.p50")), fmt(pick(s, "changedLastStep.serverMs.p50")), `${times(pick(s, "changedLastStep.p50PerBaseCreate"))} (server ${times(pick(s, "changedLastStep.serverP50PerBaseCreate"))})`, "base create"],
        ["template with a start command (+ warm snapshot)", "1", fmt(pick(s, "startCmdTemplateBuild.ms")), fmt(pick(s, "startCmdTemplateBuild.serverMs")), "", ""],
      ],
    ),
    "",
    `The cold build added ${String(cold.imageBasesAdded ?? "—")} image base (${mib(cold.imagesDirGrowthBytes)} in the state dir's \`images/\`).`,
    "",
  );
  const creates = s.createToFirstCommand ?? {};
  out.push(
    "Create → first command, rounds interleaved (base, built template, start-command template):",
    "",
    table(
      ["template", "path", ...LATENCY_HEADER, "p50 ÷ base cold create"],
      [
        ["base", String(pick(s, "floors.baseCreatePath") ?? "cold"), ...latencyCells(creates.base), "floor"],
        ["built (fromImage + 3 steps, no start command)", "cold, the template's layer snapshot", ...latencyCells(creates.builtTemplate), times(creates.builtTemplateP50PerBase)],
        ["built with setStartCmd + waitForPort", "warm snapshot (start command running)", ...latencyCells(creates.startCmdTemplate), times(creates.startCmdTemplateP50PerBase)],
      ],
    ),
    "",
  );
  const disk = s.disk ?? {};
  if (disk.status !== "ok") out.push(`Disk per template: ${disk.status ?? "missing"}: ${brief(disk.reason)}`, "");
  else {
    out.push(
      `Disk per additional template: ${disk.templates} templates, each \`fromTemplate(built).runCmd(write a small file)\` (build p50 ${fmt(pick(disk, "buildMs.p50"))} ms):`,
      "",
      table(
        ["storage pool growth per template", "÷ image size", "layer image exclusive (p50)", "layer image referenced (p50)", "state dir images/ growth", "image bases added"],
        [[mib(disk.poolBytesPerTemplate, 2), typeof disk.poolBytesPerTemplatePerImageBytes === "number" ? `${(disk.poolBytesPerTemplatePerImageBytes * 100).toFixed(3)} %` : "—", mib(pick(disk, "layerExclusiveBytes.p50"), 2), mib(pick(disk, "layerReferencedBytes.p50"), 2), mib(disk.imagesDirGrowthBytes, 2), String(disk.imageBasesAdded)]],
      ),
      "",
    );
  }
  const left = s.afterDelete ?? {};
  if (left.status === "ok") {
    out.push(`After \`DELETE /templates/NAME\` of every template of the run: ${left.layerImagesLeft} layer images and ${left.warmImagesLeft} warm images still in the pool, ${mib(left.poolBytesLeft, 2)} not given back.`, "");
  }
  return out;
}
