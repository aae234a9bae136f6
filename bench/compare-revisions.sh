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
#     [BASE_TEMPLATE_DIR=<dir>] bench/compare-revisions.sh 'create -c 1 -n 40 --wait-pool' …
#
# BASE_TEMPLATE_DIR gives the base side a template cache of its own: needed when the two
# revisions build a template from different recipes (each would rebuild it in a shared cache).
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
base_templates="${BASE_TEMPLATE_DIR:-$templates}"
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

serve() { # TREE PORT STATE SUBNET TABLE TEMPLATES
  rm -rf "$3"
  env CUBICLE_PORT=$2 CUBICLE_STATE_DIR=$3 CUBICLE_TEMPLATE_DIR=$6 CUBICLE_SUBNET=$4 CUBICLE_NFT_TABLE=$5 \
    CUBICLE_POOL_SIZE=base=2 CUBICLE_DEFAULT_TEMPLATES=base,code-interpreter-v1 CUBICLE_LOG_LEVEL=warn ${SERVER_ENV:-} \
    node "$1/dist/cli.js" serve > "$3.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 600); do curl -fs "http://127.0.0.1:$2/health" > /dev/null && return 0; sleep 0.5; done
  echo "server on port $2 did not start; see $3.log" >&2; exit 1
}
serve "$base_tree" 3301 "${states[0]}" 10.93.0.0/16 cubicle_compare_before "$base_templates"
serve "$repo" 3302 "${states[1]}" 10.94.0.0/16 cubicle_compare_after "$templates"
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

node bench/compare-summary.mjs "$out"
