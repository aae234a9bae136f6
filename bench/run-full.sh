#!/usr/bin/env bash
# The full benchmark run behind bench/REPORT.md. Run as root on a quiet machine (no tests or
# other benchmarks at the same time) after `./cubicle up` has set the host up once.
#
# It starts two servers of its own, each with its own state directory and the shared template
# cache: the default configuration (warm pool base=2) and a pool-less one that measures the
# cold path (runc run + agent start). Both are stopped, by PID, at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
node scripts/build.mjs

templates="${CUBICLE_TEMPLATE_DIR:-/var/lib/cubicle/templates}"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  # The servers keep their nftables tables for sandboxes they would adopt; this run is over.
  nft delete table inet cubicle_bench_pooled 2>/dev/null || true
  nft delete table inet cubicle_bench_cold 2>/dev/null || true
  for dir in "${pooled_state:-}" "${cold_state:-}"; do
    [ -n "$dir" ] && CUBICLE_STATE_DIR=$dir node dist/cli.js unmount > /dev/null 2>&1 || true
  done
}
trap cleanup EXIT

serve() { # PORT STATE_DIR SUBNET TABLE POOL
  CUBICLE_PORT=$1 CUBICLE_STATE_DIR=$2 CUBICLE_TEMPLATE_DIR=$templates CUBICLE_SUBNET=$3 CUBICLE_NFT_TABLE=$4 \
    CUBICLE_POOL_SIZE=$5 CUBICLE_DEFAULT_TEMPLATES=base,code-interpreter-v1 CUBICLE_LOG_LEVEL=warn CUBICLE_HTTPS_PORT=off \
    node dist/cli.js serve > "$2.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 600); do curl -fs "http://127.0.0.1:$1/health" > /dev/null && return 0; sleep 0.5; done
  echo "server on port $1 did not start; see $2.log" >&2; exit 1
}
bench() { CUBICLE_PORT=$port CUBICLE_STATE_DIR=$state node dist/cli.js bench "$@" --quiet; }
# Waits (at most 2 min) for the 1-minute load average to fall below 0.5. A burst of hundreds of
# sandboxes leaves the kernel tearing down their namespaces in the background for a while; the
# next scenario would otherwise pay for the last one.
settle() {
  for _ in $(seq 1 120); do awk '{ exit !($1 < 0.5) }' /proc/loadavg && return 0; sleep 1; done
}

pooled_state=/var/lib/cubicle-bench-pooled; cold_state=/var/lib/cubicle-bench-cold
rm -rf "$pooled_state" "$cold_state"
serve 3101 "$pooled_state" 10.91.0.0/16 cubicle_bench_pooled "base=2"
serve 3102 "$cold_state" 10.92.0.0/16 cubicle_bench_cold ""

port=3102 state=$cold_state
bench baseline -n 100
for c in 1 10 20 50; do bench create -c $c -n $((c < 10 ? 100 : 10 * c)) -w 2; done
if [ "${BENCH_SKIP_DENSITY:-}" != 1 ]; then # BENCH_SKIP_DENSITY=1: keep the last density results
  bench density -c 1 -n 10
  bench density -c 50 -n 1000
fi

port=3101 state=$pooled_state
settle
bench create -c 1 -n 100 -w 2 --wait-pool
bench create -t code-interpreter-v1 -c 1 -n 30 -w 2   # no pool of its own: the warm snapshot
for c in 1 10; do bench create -c $c -n 100 -w 2; done
settle
bench exec -n 1000
bench files -n 200
bench runcode -n 200
for c in 1 10; do
  settle
  bench snapshot -c $c -n 5 -s 0,10,100,500
  bench restore -c $c -n 50
  bench rollback -c $c -n 20
  bench pause-resume -c $c -n 20
done
bench fork -c 1 -n 20
bench fork -c 10 -n 10

port=3102 state=$cold_state
settle
bench baseline -n 100
node dist/cli.js bench report
