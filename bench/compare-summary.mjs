// Prints what bench/compare-revisions.sh measured (its results directory as the argument):
// each figure's p50, median over the rounds, before → after, as a ratio to the host's floor of
// the same run, and after/before paired by round (median [range]).
import fs from "node:fs";
import path from "node:path";

const out = process.argv[2];
if (!out) {
  console.error("usage: node bench/compare-summary.mjs bench/results/<name>");
  process.exit(2);
}
const median = (values) => {
  const sorted = values.filter(Number.isFinite).sort((a, b) => a - b);
  const middle = sorted.length / 2;
  return sorted.length === 0 ? NaN : Number.isInteger(middle) ? (sorted[middle - 1] + sorted[middle]) / 2 : sorted[Math.floor(middle)];
};
const read = (side) => fs.readdirSync(path.join(out, side)).sort().map((file) => JSON.parse(fs.readFileSync(path.join(out, side, file), "utf8")));
const floors = read("floor").map((result) => ({ runc: result.summary.runc?.totalMs?.p50, spawn: result.summary.spawn?.totalMs?.p50 }));
const floor = { runc: median(floors.map((f) => f.runc)), spawn: median(floors.map((f) => f.spawn)) };
// Sandbox lifecycle steps are framed by a container's run + delete, the rest by a process spawn.
const lifecycle = new Set(["create", "restore", "snapshot", "rollback", "fork", "pause-resume"]);
// Runs of one scenario with other parameters (a template, a pool wait) are rows of their own.
const label = (result) => [result.scenario, result.parameters?.template, result.parameters?.waitForPool ? "warm pool" : ""].filter(Boolean).join(" ");

/** Every distribution in a summary (an object with a p50), by its key path (`byDirtyMiB 0 snapshotMs`). */
function distributions(value, prefix = []) {
  if (!value || typeof value !== "object") return [];
  if ("p50" in value) return [[prefix.join(" "), value.p50]];
  return Object.entries(value).flatMap(([key, inner]) => distributions(inner, [...prefix, key]));
}

// p50 per figure and round: files sort by time, so the n-th result of a run is round n.
const rows = {};
for (const side of ["before", "after"]) {
  const seen = {};
  for (const result of read(side)) {
    const run = label(result);
    const round = (seen[run] = (seen[run] ?? -1) + 1);
    for (const [key, p50] of distributions(result.summary)) {
      (rows[`${run}: ${key}`] ??= { scenario: result.scenario, before: [], after: [] })[side][round] = p50;
    }
  }
}
console.log(`floors (median over ${floors.length} rounds): runc run + delete ${floor.runc.toFixed(2)} ms, fork+exec from Node ${floor.spawn.toFixed(2)} ms`);
console.log("p50, median over rounds: before → after, each as a ratio to its floor (sandbox lifecycle: runc run + delete; the rest: fork+exec); after/before paired by round: median [range]");
for (const [name, row] of Object.entries(rows)) {
  const f = lifecycle.has(row.scenario) ? floor.runc : floor.spawn;
  const [b, a] = [median(row.before), median(row.after)];
  const paired = row.after.map((value, i) => value / row.before[i]).filter(Number.isFinite);
  console.log(`${name}: ${b.toFixed(2)} → ${a.toFixed(2)} ms = ${(b / f).toFixed(2)} → ${(a / f).toFixed(2)}× floor; after/before ${median(paired).toFixed(2)} [${Math.min(...paired).toFixed(2)}–${Math.max(...paired).toFixed(2)}]`);
}
