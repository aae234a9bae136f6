#!/usr/bin/env bash
# Where the milliseconds go (issue 15): a pool-less server of its own at debug level (port 3131,
# subnet 10.96/16), cold creates, snapshots, creates from a snapshot and forks of 10 through the
# SDK, each path's client time beside the server's phases for the same calls
# (scripts/bench-trace.mjs) → bench/results/trace/. ROUNDS (default 10). Stops its server by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
node scripts/build.mjs
state=/var/lib/cubicle-trace
log="$state.log"
rm -rf "$state"
pid=
cleanup() {
  [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
  nft delete table inet cubicle_trace 2>/dev/null || true
  CUBICLE_STATE_DIR=$state node dist/cli.js unmount > /dev/null 2>&1 || true
}
trap cleanup EXIT
CUBICLE_PORT=3131 CUBICLE_STATE_DIR=$state CUBICLE_TEMPLATE_DIR=${CUBICLE_TEMPLATE_DIR:-/var/lib/cubicle/templates} \
  CUBICLE_SUBNET=10.96.0.0/16 CUBICLE_NFT_TABLE=cubicle_trace CUBICLE_POOL_SIZE= CUBICLE_DEFAULT_TEMPLATES=base \
  CUBICLE_LOG_LEVEL=debug CUBICLE_HTTPS_PORT=off node dist/cli.js serve > "$log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do curl -fs http://127.0.0.1:3131/health > /dev/null && break; sleep 0.5; done
CUBICLE_PORT=3131 CUBICLE_STATE_DIR=$state node scripts/bench-trace.mjs "$log" "${BENCH_OUT:-bench/results}/trace" "${ROUNDS:-10}"
