#!/usr/bin/env bash
# What the hardening (issue 11) costs on the hot paths, measured before and after in one run:
# a server built from BASE_REV (default 3254f27, the last commit before the hardening) and one
# built from this checkout run side by side, each with its own state directory and the shared
# template cache, and the same benchmark client (this checkout's) measures both, interleaved
# round by round: warm-pool create → first command, commands.run('true'), 1 KiB file read and
# write, runCode('1+1'). Results land in bench/results/hardening-cost/{before,after}/; the
# medians are printed at the end. Run as root on a quiet machine after `./cubicle up` once.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
base_rev="${BASE_REV:-3254f27}"
rounds="${ROUNDS:-5}"
base_tree=/var/tmp/cubicle-hardening-base
out="$repo/bench/results/hardening-cost"
templates="${CUBICLE_TEMPLATE_DIR:-/var/lib/cubicle/templates}"

node scripts/build.mjs
if [[ ! -d "$base_tree" ]]; then git worktree add -f "$base_tree" "$base_rev" >/dev/null; fi
git -C "$base_tree" checkout -q "$base_rev"
ln -sfn "$repo/node_modules" "$base_tree/node_modules"
(cd "$base_tree" && node scripts/build.mjs)

pids=()
states=(/var/lib/cubicle-cost-before /var/lib/cubicle-cost-after)
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  nft delete table inet cubicle_cost_before 2>/dev/null || true
  nft delete table inet cubicle_cost_after 2>/dev/null || true
  # The current server keeps its storage pool mounted for sandboxes it would adopt; the run is over.
  CUBICLE_STATE_DIR="${states[1]}" node "$repo/dist/cli.js" unmount >/dev/null 2>&1 || true
}
trap cleanup EXIT

serve() { # TREE PORT STATE SUBNET TABLE
  rm -rf "$3"
  CUBICLE_PORT=$2 CUBICLE_STATE_DIR=$3 CUBICLE_TEMPLATE_DIR=$templates CUBICLE_SUBNET=$4 CUBICLE_NFT_TABLE=$5 \
    CUBICLE_POOL_SIZE=base=2 CUBICLE_DEFAULT_TEMPLATES=base,code-interpreter-v1 CUBICLE_LOG_LEVEL=warn \
    node "$1/dist/cli.js" serve > "$3.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 600); do curl -fs "http://127.0.0.1:$2/health" > /dev/null && return 0; sleep 0.5; done
  echo "server on port $2 did not start; see $3.log" >&2; exit 1
}
serve "$base_tree" 3301 "${states[0]}" 10.93.0.0/16 cubicle_cost_before
serve "$repo" 3302 "${states[1]}" 10.94.0.0/16 cubicle_cost_after
# The interpreter's warm snapshots are made in the background once the templates are ready.
for port in 3301 3302; do
  for _ in $(seq 1 300); do
    curl -fs -H "x-api-key: $(cat "${states[$((port - 3301))]}/api-key")" "http://127.0.0.1:$port/warm-snapshots" | grep -q '"ready":true' && break
    sleep 1
  done
done

bench() { # WHICH PORT STATE SCENARIO ARGS...
  local which=$1 port=$2 state=$3; shift 3
  CUBICLE_PORT=$port CUBICLE_STATE_DIR=$state node "$repo/dist/cli.js" bench "$@" -o "$out/$which" --quiet > /dev/null
}
rm -rf "$out"
for round in $(seq 1 "$rounds"); do
  for side in before after; do
    if [[ $side == before ]]; then port=3301; state=${states[0]}; else port=3302; state=${states[1]}; fi
    echo "round $round: $side" >&2
    bench $side $port "$state" create -c 1 -n 40 --wait-pool
    bench $side $port "$state" exec -c 1 -n 300
    bench $side $port "$state" files -c 1 -n 100
    bench $side $port "$state" runcode -c 1 -n 100
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
const rows = {};
for (const side of ["before", "after"]) {
  for (const file of fs.readdirSync(path.join(out, side))) {
    const result = JSON.parse(fs.readFileSync(path.join(out, side, file), "utf8"));
    for (const [key, value] of Object.entries(result.summary ?? {})) {
      if (value && typeof value === "object" && "p50" in value) (rows[`${result.scenario} ${key}`] ??= { before: [], after: [] })[side].push(value.p50);
    }
  }
}
console.log("p50 (median over rounds), ms: before → after (ratio)");
for (const [name, { before, after }] of Object.entries(rows)) {
  const [b, a] = [median(before), median(after)];
  console.log(`${name}: ${b.toFixed(2)} → ${a.toFixed(2)} (${(a / b).toFixed(2)}×; rounds ${before.map((v) => v.toFixed(1)).join("/")} → ${after.map((v) => v.toFixed(1)).join("/")})`);
}
EOF
