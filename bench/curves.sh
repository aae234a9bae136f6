#!/usr/bin/env bash
# Cost curves (issue 15): create → first command at c=1 with 0, 100 and 1000 sandboxes already
# live (pool-less server: cold creates), and create from a snapshot against the image's size
# (dirty /dev/shm 0, 10, 100 MiB). A server of its own (port 3151, subnet 10.98/16); `bench
# report` draws both curves. LIVE="0 100 1000" sets the points.
set -euo pipefail
cd "$(dirname "$0")/.."
node scripts/build.mjs
. bench/lib.sh
state=/var/lib/cubicle-curves
bench_serve 3151 "$state" 10.98.0.0/16 cubicle_curves CUBICLE_IDLE_FREEZE_SECONDS=0
bench() { CUBICLE_PORT=3151 CUBICLE_STATE_DIR=$state node dist/cli.js bench "$@" -o "${BENCH_OUT:-bench/results}" --quiet; }
bench restore-size -n 10 -s 0,10,100
for live in ${LIVE:-0 100 1000}; do bench create -c 1 -n 20 -w 1 --background "$live"; done
node dist/cli.js bench report -o "${BENCH_OUT:-bench/results}"
