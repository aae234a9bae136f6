#!/usr/bin/env bash
# Cost curves (issue 15): create → first command at c=1 with 0, 100 and 1000 sandboxes already
# live (pool-less server: cold creates), and create from a snapshot against the image's size
# (dirty /dev/shm 0, 10, 100 MiB). A server of its own (port 3151, subnet 10.98/16), stopped by
# PID at the end; `bench report` draws both curves. LIVE="0 100 1000" sets the points.
set -euo pipefail
cd "$(dirname "$0")/.."
node scripts/build.mjs
state=/var/lib/cubicle-curves
rm -rf "$state"
pid=
cleanup() {
  [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
  nft delete table inet cubicle_curves 2>/dev/null || true
  CUBICLE_STATE_DIR=$state node dist/cli.js unmount > /dev/null 2>&1 || true
}
trap cleanup EXIT
CUBICLE_PORT=3151 CUBICLE_STATE_DIR=$state CUBICLE_TEMPLATE_DIR=${CUBICLE_TEMPLATE_DIR:-/var/lib/cubicle/templates} \
  CUBICLE_SUBNET=10.98.0.0/16 CUBICLE_NFT_TABLE=cubicle_curves CUBICLE_POOL_SIZE= CUBICLE_DEFAULT_TEMPLATES=base \
  CUBICLE_IDLE_FREEZE_SECONDS=0 CUBICLE_LOG_LEVEL=warn CUBICLE_HTTPS_PORT=off node dist/cli.js serve > "$state.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do curl -fs http://127.0.0.1:3151/health > /dev/null && break; sleep 0.5; done
bench() { CUBICLE_PORT=3151 CUBICLE_STATE_DIR=$state node dist/cli.js bench "$@" -o "${BENCH_OUT:-bench/results}" --quiet; }
bench restore-size -n 10 -s 0,10,100
for live in ${LIVE:-0 100 1000}; do bench create -c 1 -n 20 -w 1 --background "$live"; done
node dist/cli.js bench report -o "${BENCH_OUT:-bench/results}"
