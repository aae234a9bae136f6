#!/usr/bin/env bash
# Idle tiers at scale (issue 15): N sandboxes (default 200, batches of 10) on a server of its own
# (port 3141, subnet 10.97/16; idle freeze after 2 s, to disk 4 s later) are left alone until all
# are on disk; `bench density-idle` records memory per sandbox, the images' size on the storage
# pool and wake times. N=… sets the count (N=10000: ~75 min on 2 cores, ~27 GB of pool file).
# The image budget counts images uncompressed (IMAGE_COMPRESSION_NOTE: ~10 MiB each, ~2.5 MiB
# stored), so it is raised past the pool's half here: CUBICLE_IMAGE_BUDGET_GB (default 200).
set -euo pipefail
cd "$(dirname "$0")/.."
node scripts/build.mjs
. bench/lib.sh
state=/var/lib/cubicle-idle-density
bench_serve 3141 "$state" 10.97.0.0/16 cubicle_idle_density CUBICLE_IDLE_FREEZE_SECONDS=2 CUBICLE_IDLE_DISK_SECONDS=4 \
  "CUBICLE_STORAGE_GB=${CUBICLE_STORAGE_GB:-64}" "CUBICLE_IMAGE_BUDGET_GB=${CUBICLE_IMAGE_BUDGET_GB:-200}"
CUBICLE_PORT=3141 CUBICLE_STATE_DIR=$state node dist/cli.js bench density-idle -n "${N:-200}" -c 10 --settle-ms 3000 -o "${BENCH_OUT:-bench/results}" --quiet
