#!/usr/bin/env bash
# Compares a server of BASE_REV with one of this checkout, side by side on the same machine:
# each gets its own state directory (the template cache is shared), and this checkout's
# benchmark client measures both, round by round, the order alternating (neither side always
# runs second, warmer or later in a drift). Each round also measures the host's floors
# (`bench baseline`: raw `runc run` + `delete` of /bin/true, a fork+exec from Node), and every
# figure is printed as a ratio to the floors' median over the rounds as well, with after/before
# paired by round.
#
#   NAME=<results dir under bench/results> BASE_REV=<rev> [ROUNDS=6] [SERVER_ENV="K=V …"] \
#     bench/compare-revisions.sh 'create -c 1 -n 40 --wait-pool' 'exec -c 1 -n 300' …
#
# Each argument is one `./cubicle bench` run per side and round. Results land in
# bench/results/$NAME/{before,after,floor}/. Run as root on a quiet machine after `./cubicle up`.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
name="${NAME:?NAME: the results directory under bench/results}"
base_rev="${BASE_REV:?BASE_REV: the revision to compare with}"
rounds="${ROUNDS:-6}"
base_tree=/var/tmp/cubicle-compare-base
out="$repo/bench/results/$name"
templates="${CUBICLE_TEMPLATE_DIR:-/var/lib/cubicle/templates}"
(( $# > 0 )) || { echo "name at least one bench run, e.g. 'create -c 1 -n 40 --wait-pool'" >&2; exit 2; }

node scripts/build.mjs
if [[ ! -d "$base_tree" ]]; then git worktree add -f "$base_tree" "$base_rev" >/dev/null; fi
git -C "$base_tree" checkout -q "$base_rev"
ln -sfn "$repo/node_modules" "$base_tree/node_modules"
(cd "$base_tree" && node scripts/build.mjs)

pids=()
states=(/var/lib/cubicle-compare-before /var/lib/cubicle-compare-after)
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  nft delete table inet cubicle_compare_before 2>/dev/null || true
  nft delete table inet cubicle_compare_after 2>/dev/null || true
  # Each server keeps its storage pool mounted for sandboxes it would adopt; the run is over.
  for state in "${states[@]}"; do CUBICLE_STATE_DIR="$state" node "$repo/dist/cli.js" unmount >/dev/null 2>&1 || true; done
  rm -rf "${states[@]}"
}
trap cleanup EXIT

serve() { # TREE PORT STATE SUBNET TABLE
  rm -rf "$3"
  env CUBICLE_PORT=$2 CUBICLE_STATE_DIR=$3 CUBICLE_TEMPLATE_DIR=$templates CUBICLE_SUBNET=$4 CUBICLE_NFT_TABLE=$5 \
    CUBICLE_POOL_SIZE=base=2 CUBICLE_DEFAULT_TEMPLATES=base,code-interpreter-v1 CUBICLE_LOG_LEVEL=warn ${SERVER_ENV:-} \
    node "$1/dist/cli.js" serve > "$3.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 600); do curl -fs "http://127.0.0.1:$2/health" > /dev/null && return 0; sleep 0.5; done
  echo "server on port $2 did not start; see $3.log" >&2; exit 1
}
serve "$base_tree" 3301 "${states[0]}" 10.93.0.0/16 cubicle_compare_before
serve "$repo" 3302 "${states[1]}" 10.94.0.0/16 cubicle_compare_after
# The interpreter's warm snapshots are made in the background once the templates are ready.
if [[ "${SERVER_ENV:-}" != *CUBICLE_WARM_SNAPSHOT=none* ]]; then
  for port in 3301 3302; do
    for _ in $(seq 1 300); do
      curl -fs -H "x-api-key: $(cat "${states[$((port - 3301))]}/api-key")" "http://127.0.0.1:$port/warm-snapshots" | grep -q '"ready":true' && break
      sleep 1
    done
  done
fi

bench() { # WHICH PORT STATE ARGS...
  local which=$1 port=$2 state=$3; shift 3
  # shellcheck disable=SC2068 # each run's words are its arguments
  CUBICLE_PORT=$port CUBICLE_STATE_DIR=$state node "$repo/dist/cli.js" bench $@ -o "$out/$which" --quiet > /dev/null
}
rm -rf "$out"
for round in $(seq 1 "$rounds"); do
  echo "round $round: floors" >&2
  bench floor 3302 "${states[1]}" baseline -n 40
  order="before after"; (( round % 2 == 0 )) && order="after before"
  for side in $order; do
    if [[ $side == before ]]; then port=3301; state=${states[0]}; else port=3302; state=${states[1]}; fi
    echo "round $round: $side" >&2
    for run in "$@"; do bench "$side" "$port" "$state" "$run"; done
  done
done

node --input-type=module - "$out" <<'EOF'
import fs from "node:fs";
import path from "node:path";
const out = process.argv[2];
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
// p50 per figure and round; runs of one scenario with other parameters (a template, a pool
// wait) are rows of their own. Files sort by time: the n-th result of a run is round n.
const label = (result) => [result.scenario, result.parameters?.template, result.parameters?.waitForPool ? "warm pool" : ""].filter(Boolean).join(" ");
const rows = {};
for (const side of ["before", "after"]) {
  const seen = {};
  for (const result of read(side)) {
    const run = label(result);
    const round = (seen[run] = (seen[run] ?? -1) + 1);
    for (const [key, value] of Object.entries(result.summary ?? {})) {
      if (value && typeof value === "object" && "p50" in value) ((rows[`${run}: ${key}`] ??= { scenario: result.scenario, before: [], after: [] })[side][round] = value.p50);
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
EOF
