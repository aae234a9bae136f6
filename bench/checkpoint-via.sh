#!/usr/bin/env bash
# Snapshots through CRIU's RPC from the resident helper against `runc checkpoint` (CRIU_RPC_NOTE):
# two servers of this code, one with CUBICLE_CHECKPOINT_VIA=runc, the snapshot scenario on each in
# alternating rounds (ROUNDS, default 3, of N snapshots, default 15), the baseline's raw CRIU dump
# as the floor before and after → bench/results/checkpoint-via/. Ports 3181/3182, subnets 10.98/10.99.
set -euo pipefail
cd "$(dirname "$0")/.."
node scripts/build.mjs
. bench/lib.sh
out="${BENCH_OUT:-bench/results}/checkpoint-via"
mkdir -p "$out"
settle() { for _ in $(seq 1 60); do awk '{ exit !($1 < 0.6) }' /proc/loadavg && return 0; sleep 1; done; }
bench_serve 3181 /var/lib/cubicle-via-rpc 10.98.0.0/16 cubicle_via_rpc
bench_serve 3182 /var/lib/cubicle-via-runc 10.99.0.0/16 cubicle_via_runc CUBICLE_CHECKPOINT_VIA=runc
bench() { local port=$1 state=$2; shift 2; CUBICLE_PORT=$port CUBICLE_STATE_DIR=$state node dist/cli.js bench "$@" -o "$out/$(basename "$state")" --quiet; }
settle
bench 3181 /var/lib/cubicle-via-rpc baseline -n 20
for _ in $(seq 1 "${ROUNDS:-3}"); do
  settle; bench 3181 /var/lib/cubicle-via-rpc snapshot -c 1 -n "${N:-15}" -s 0
  settle; bench 3182 /var/lib/cubicle-via-runc snapshot -c 1 -n "${N:-15}" -s 0
done
bench 3181 /var/lib/cubicle-via-rpc baseline -n 20
