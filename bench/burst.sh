#!/usr/bin/env bash
# The burst of issue 11: 1000 creates at concurrency 50 while 300 other sandboxes live
# (`bench create -c 50 -n 1000 --background 300`), against a server of this checkout and, for
# comparison, one of BASE_REV (default 3254f27, before the hardening), one after the other. Each
# burst is framed by the host's floors (`bench baseline`, before and after it), and the amortized
# time per sandbox is printed as a ratio to the raw `runc run` + `delete` floor of the same run.
# Results land in bench/results/burst/{after,before}/. Run as root on a quiet machine after
# `./cubicle up` once; SIDES="after" skips the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
base_rev="${BASE_REV:-3254f27}"
base_tree=/var/tmp/cubicle-hardening-base
out="$repo/bench/results/burst"
templates="${CUBICLE_TEMPLATE_DIR:-/var/lib/cubicle/templates}"
sides="${SIDES:-after before}"

node scripts/build.mjs
if [[ " $sides " == *" before "* ]]; then
  if [[ ! -d "$base_tree" ]]; then git worktree add -f "$base_tree" "$base_rev" >/dev/null; fi
  git -C "$base_tree" checkout -q "$base_rev"
  ln -sfn "$repo/node_modules" "$base_tree/node_modules"
  (cd "$base_tree" && node scripts/build.mjs)
fi

pid=""
state=""
stop() {
  [[ -n "$pid" ]] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
  pid=""
  nft delete table inet cubicle_burst 2>/dev/null || true
  [[ -n "$state" ]] && CUBICLE_STATE_DIR="$state" node "$repo/dist/cli.js" unmount >/dev/null 2>&1 || true
}
trap stop EXIT

rm -rf "$out"
for side in $sides; do
  tree="$repo"; [[ $side == before ]] && tree="$base_tree"
  state=/var/lib/cubicle-burst-$side
  rm -rf "$state"
  CUBICLE_PORT=3401 CUBICLE_STATE_DIR=$state CUBICLE_TEMPLATE_DIR=$templates CUBICLE_SUBNET=10.95.0.0/16 CUBICLE_NFT_TABLE=cubicle_burst \
    CUBICLE_POOL_SIZE=base=2 CUBICLE_DEFAULT_TEMPLATES=base CUBICLE_WARM_SNAPSHOT=none CUBICLE_LOG_LEVEL=warn \
    node "$tree/dist/cli.js" serve > "$state.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 300); do curl -fs http://127.0.0.1:3401/health > /dev/null && break; sleep 0.5; done
  bench() { CUBICLE_PORT=3401 CUBICLE_STATE_DIR=$state node "$repo/dist/cli.js" bench "$@" -o "$out/$side" --quiet > /dev/null; }
  echo "$side: floors, burst, floors" >&2
  bench baseline -n 40
  bench create -c 50 -n 1000 -w 0 --background 300
  bench baseline -n 40
  stop
  rm -rf "$state" "$state.log"
done

node --input-type=module - "$out" $sides <<'EOF'
import fs from "node:fs";
import path from "node:path";
const [out, ...sides] = process.argv.slice(2);
for (const side of sides) {
  const results = fs.readdirSync(path.join(out, side)).map((file) => JSON.parse(fs.readFileSync(path.join(out, side, file), "utf8")));
  const floors = results.filter((r) => r.scenario === "baseline").map((r) => r.summary.runc.totalMs.p50);
  const floor = floors.reduce((a, b) => a + b, 0) / floors.length;
  const burst = results.find((r) => r.scenario === "create").summary;
  const first = burst.createToFirstCommandMs;
  console.log(
    `${side}: ${Math.round(burst.successRate * 1000)} of 1000 succeeded; create → first command p50 ${first.p50} ms, p99 ${first.p99} ms; ` +
      `${burst.amortizedMsPerSandbox} ms amortized per sandbox = ${(burst.amortizedMsPerSandbox / floor).toFixed(1)}× the runc run + delete floor (${floors.map((f) => f.toFixed(1)).join(" and ")} ms)`,
  );
}
EOF
