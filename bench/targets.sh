#!/usr/bin/env bash
# Issue 15's shapes, each against its floor in one run (~15 min on a 2-core VM): the baseline
# (runc run+delete, raw CRIU dump and restore of an idle agent, Node fork+exec) before and after,
# cold creates on a pool-less server, warm-pool creates, c=10 creates that drain the pool,
# commands.run('true'), snapshot of a fresh sandbox, create from a snapshot, rollback, fork of 10.
# `bench report` then shows every ratio and its target ("Targets" section of bench/REPORT.md).
# Run as root on a quiet machine after `./cubicle up` has set the host up once; the two servers
# are its own (own state dirs, ports 3111/3112, subnets 10.93/10.94) and are stopped by PID.
# SCALE=2 doubles every n.
set -euo pipefail
cd "$(dirname "$0")/.."
node scripts/build.mjs
scale="${SCALE:-1}"
n() { echo $(($1 * scale)); }

templates="${CUBICLE_TEMPLATE_DIR:-/var/lib/cubicle/templates}"
out="${BENCH_OUT:-bench/results}"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  nft delete table inet cubicle_targets_pooled 2>/dev/null || true
  nft delete table inet cubicle_targets_cold 2>/dev/null || true
  # The servers leave their storage pools mounted for sandboxes they would adopt; none are left.
  for dir in "${pooled_state:-}" "${cold_state:-}"; do
    [ -n "$dir" ] && CUBICLE_STATE_DIR=$dir node dist/cli.js unmount > /dev/null 2>&1 || true
  done
}
trap cleanup EXIT

serve() { # PORT STATE_DIR SUBNET TABLE POOL
  CUBICLE_PORT=$1 CUBICLE_STATE_DIR=$2 CUBICLE_TEMPLATE_DIR=$templates CUBICLE_SUBNET=$3 CUBICLE_NFT_TABLE=$4 \
    CUBICLE_POOL_SIZE=$5 CUBICLE_DEFAULT_TEMPLATES=base CUBICLE_LOG_LEVEL=${BENCH_SERVER_LOG_LEVEL:-warn} CUBICLE_HTTPS_PORT=off \
    node dist/cli.js serve > "$2.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 600); do curl -fs "http://127.0.0.1:$1/health" > /dev/null && return 0; sleep 0.5; done
  echo "server on port $1 did not start; see $2.log" >&2; exit 1
}
bench() { CUBICLE_PORT=$port CUBICLE_STATE_DIR=$state node dist/cli.js bench "$@" -o "$out" --quiet; }
settle() {
  for _ in $(seq 1 60); do awk '{ exit !($1 < 0.5) }' /proc/loadavg && return 0; sleep 1; done
}

pooled_state=/var/lib/cubicle-targets-pooled; cold_state=/var/lib/cubicle-targets-cold
rm -rf "$pooled_state" "$cold_state"
serve 3111 "$pooled_state" 10.93.0.0/16 cubicle_targets_pooled "base=2"
serve 3112 "$cold_state" 10.94.0.0/16 cubicle_targets_cold ""

port=3112 state=$cold_state
settle
bench baseline -n "$(n 40)"
bench create -c 1 -n "$(n 40)" -w 2

port=3111 state=$pooled_state
settle
bench create -c 1 -n "$(n 60)" -w 2
bench create -c 10 -n "$(n 50)" -w 2
settle
bench exec -n "$(n 300)"
bench snapshot -c 1 -n "$(n 10)" -s 0
bench restore -c 1 -n "$(n 30)"
bench rollback -c 1 -n "$(n 20)"
bench fork -c 10 -n "$(n 5)"

port=3112 state=$cold_state
settle
bench baseline -n "$(n 40)"
node dist/cli.js bench report -o "$out"
