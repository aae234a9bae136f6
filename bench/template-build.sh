#!/usr/bin/env bash
# Issue 16's numbers: the template-build scenario against a server of its own (fresh state, the
# shared template cache, no pool), results in bench/results/. Usage: bench/template-build.sh [N] [K]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
n=${1:-10}
k=${2:-5}
bench_serve 3391 /var/lib/cubicle-bench-tb 10.231.0.0/16 cubicle_benchtb
CUBICLE_PORT=3391 CUBICLE_STATE_DIR=/var/lib/cubicle-bench-tb node dist/cli.js bench template-build -n "$n" --templates "$k"
