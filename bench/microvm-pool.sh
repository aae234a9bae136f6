#!/usr/bin/env bash
# Warm pools of microVMs (issue 17) beside warm pools of containers: two servers of their own, one
# after the other in one run, each with a pool of one `base` entry (a container; a microVM under
# QEMU's TCG, or KVM with MICROVM=kvm), and creates that each wait for a full pool, so every one
# is a claim (create → first command). The container claim is the comparison.
#
#   bench/microvm-pool.sh [-n CREATES_EACH]
set -euo pipefail
cd "$(dirname "$0")/.."
node scripts/build.mjs
. bench/lib.sh
n=10
[ "${1:-}" = "-n" ] && n=$2
out="${BENCH_OUT:-bench/results}/microvm-pool"
mkdir -p "$out"
state=/var/lib/cubicle-pool-containers
bench_serve 3163 "$state" 10.93.0.0/16 cubicle_pool_c CUBICLE_POOL_SIZE=base=1
CUBICLE_PORT=3163 CUBICLE_STATE_DIR=$state node dist/cli.js bench create -n "$n" -w 1 --wait-pool -o "$out/container" --quiet
bench_cleanup
bench_pids=() bench_states=() bench_tables=()
state=/var/lib/cubicle-pool-microvms
bench_serve 3164 "$state" 10.92.0.0/16 cubicle_pool_m CUBICLE_MICROVM="${MICROVM:-tcg}" CUBICLE_TEMPLATE_RUNTIME=base=microvm CUBICLE_POOL_SIZE=base=1
CUBICLE_PORT=3164 CUBICLE_STATE_DIR=$state node dist/cli.js bench create -n "$n" -w 1 --wait-pool -o "$out/microvm" --quiet
