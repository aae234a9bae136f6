#!/usr/bin/env bash
# Volumes and codebases (issue 18): creates with a codebase or a volume mounted against creates
# without, and small-file and big-file throughput through the sandbox's root filesystem, a volume
# and a codebase, in one sandbox (src/bench/scenarios/storage.ts). A server of its own with a
# codebase root it owns, removed at exit.
#
#   bench/storage.sh [-n CREATES_EACH] [--small-files N] [--big-mib N]
set -euo pipefail
cd "$(dirname "$0")/.."
node scripts/build.mjs
. bench/lib.sh
state=/var/lib/cubicle-storage
roots=$(mktemp -d /tmp/cubicle-bench-codebases-XXXXXX)
trap 'bench_cleanup; rm -rf "$roots"' EXIT
bench_serve 3162 "$state" 10.95.0.0/16 cubicle_storage CUBICLE_CODEBASE_ROOTS="$roots"
CUBICLE_PORT=3162 CUBICLE_STATE_DIR=$state CUBICLE_CODEBASE_ROOTS="$roots" node dist/cli.js bench storage "$@" -o "${BENCH_OUT:-bench/results}" --quiet
node dist/cli.js bench report -o "${BENCH_OUT:-bench/results}"
