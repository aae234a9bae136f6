#!/usr/bin/env bash
# Where the milliseconds go (issue 15): a pool-less server of its own at debug level (port 3131,
# subnet 10.96/16), cold creates, snapshots, creates from a snapshot and forks of 10 through the
# SDK, each path's client time beside the server's phases for the same calls
# (scripts/bench-trace.mjs) → bench/results/trace/. ROUNDS (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
node scripts/build.mjs
. bench/lib.sh
state=/var/lib/cubicle-trace
bench_serve 3131 "$state" 10.96.0.0/16 cubicle_trace CUBICLE_LOG_LEVEL=debug
CUBICLE_PORT=3131 CUBICLE_STATE_DIR=$state node scripts/bench-trace.mjs "$state.log" "${BENCH_OUT:-bench/results}/trace" "${ROUNDS:-10}"
