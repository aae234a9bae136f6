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

. bench/lib.sh
bench() { CUBICLE_PORT=$port CUBICLE_STATE_DIR=$state node dist/cli.js bench "$@" --quiet; }
# Waits (at most 2 min) for the 1-minute load average to fall below 0.5. A burst of hundreds of
# sandboxes leaves the kernel tearing down their namespaces in the background for a while; the
# next scenario would otherwise pay for the last one.
settle() {
  for _ in $(seq 1 120); do awk '{ exit !($1 < 0.5) }' /proc/loadavg && return 0; sleep 1; done
}

pooled_state=/var/lib/cubicle-bench-pooled; cold_state=/var/lib/cubicle-bench-cold
bench_serve 3101 "$pooled_state" 10.91.0.0/16 cubicle_bench_pooled CUBICLE_POOL_SIZE=base=2 CUBICLE_DEFAULT_TEMPLATES=base,code-interpreter-v1
bench_serve 3102 "$cold_state" 10.92.0.0/16 cubicle_bench_cold CUBICLE_DEFAULT_TEMPLATES=base,code-interpreter-v1

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
