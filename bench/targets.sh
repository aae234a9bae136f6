#!/usr/bin/env bash
# Issue 15's shapes, each against its floor in one run (~15 min on a 2-core VM): the baseline
# (runc run+delete, raw CRIU dump and restore of an idle agent, Node fork+exec) before and after,
# cold creates on a pool-less server, warm-pool creates, c=10 creates that drain the pool,
# commands.run('true'), snapshot of a fresh sandbox, create from a snapshot, rollback, fork of 10.
# `bench report` then shows every ratio and its target ("Targets" section of bench/REPORT.md).
# Run as root on a quiet machine after `./cubicle up` has set the host up once; the two servers
# are its own (own state dirs, ports 3111/3112, subnets 10.93/10.94; bench/lib.sh).
# SCALE=2 doubles every n.
set -euo pipefail
cd "$(dirname "$0")/.."
node scripts/build.mjs
scale="${SCALE:-1}"
n() { echo $(($1 * scale)); }

. bench/lib.sh
out="${BENCH_OUT:-bench/results}"
bench() { CUBICLE_PORT=$port CUBICLE_STATE_DIR=$state node dist/cli.js bench "$@" -o "$out" --quiet; }
settle() {
  for _ in $(seq 1 60); do awk '{ exit !($1 < 0.5) }' /proc/loadavg && return 0; sleep 1; done
}

pooled_state=/var/lib/cubicle-targets-pooled; cold_state=/var/lib/cubicle-targets-cold
bench_serve 3111 "$pooled_state" 10.93.0.0/16 cubicle_targets_pooled CUBICLE_POOL_SIZE=base=2
bench_serve 3112 "$cold_state" 10.94.0.0/16 cubicle_targets_cold

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
