#!/usr/bin/env bash
# Idle tiers at scale (issue 15): N sandboxes (default 200, batches of 10) on a server of its own
# (port 3141, subnet 10.97/16; idle freeze after 2 s, to disk 4 s later) are left alone until all
# are on disk; `bench density-idle` records memory per sandbox in each tier, the images' size on
# the storage pool and wake times. N=… sets the count. Stops its server by PID and unmounts.
set -euo pipefail
cd "$(dirname "$0")/.."
node scripts/build.mjs
n="${N:-200}"
state=/var/lib/cubicle-idle-density
rm -rf "$state"
pid=
cleanup() {
  [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
  nft delete table inet cubicle_idle_density 2>/dev/null || true
  CUBICLE_STATE_DIR=$state node dist/cli.js unmount > /dev/null 2>&1 || true
}
trap cleanup EXIT
CUBICLE_PORT=3141 CUBICLE_STATE_DIR=$state CUBICLE_TEMPLATE_DIR=${CUBICLE_TEMPLATE_DIR:-/var/lib/cubicle/templates} \
  CUBICLE_SUBNET=10.97.0.0/16 CUBICLE_NFT_TABLE=cubicle_idle_density CUBICLE_POOL_SIZE= CUBICLE_DEFAULT_TEMPLATES=base \
  CUBICLE_IDLE_FREEZE_SECONDS=2 CUBICLE_IDLE_DISK_SECONDS=4 CUBICLE_STORAGE_GB=${CUBICLE_STORAGE_GB:-60} \
  CUBICLE_LOG_LEVEL=warn CUBICLE_HTTPS_PORT=off node dist/cli.js serve > "$state.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do curl -fs http://127.0.0.1:3141/health > /dev/null && break; sleep 0.5; done
CUBICLE_PORT=3141 CUBICLE_STATE_DIR=$state node dist/cli.js bench density-idle -n "$n" -c 10 --settle-ms 3000 -o "${BENCH_OUT:-bench/results}" --quiet
