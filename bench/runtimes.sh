#!/usr/bin/env bash
# Containers and microVMs side by side (issue 17): a server of its own that runs both
# (CUBICLE_MICROVM=tcg: this project's machines have no KVM; set MICROVM=kvm on a KVM host), cold
# creates of each alternating, pause/resume, idle memory per sandbox, and the QEMU start floor.
#
#   [LOG_LEVEL=debug] bench/runtimes.sh [-n CREATES_EACH] [--background IDLE_EACH]
set -euo pipefail
cd "$(dirname "$0")/.."
node scripts/build.mjs
. bench/lib.sh
state=/var/lib/cubicle-runtimes
# LOG_LEVEL=debug: the server's log ($state.log) then has the runtime's own timings (a trace).
bench_serve 3161 "$state" 10.97.0.0/16 cubicle_runtimes CUBICLE_MICROVM="${MICROVM:-tcg}" CUBICLE_IDLE_FREEZE_SECONDS=0 CUBICLE_LOG_LEVEL="${LOG_LEVEL:-warn}"
CUBICLE_PORT=3161 CUBICLE_STATE_DIR=$state CUBICLE_MICROVM="${MICROVM:-tcg}" node dist/cli.js bench runtimes -n 5 --background 5 "$@" -o "${BENCH_OUT:-bench/results}" --quiet
node dist/cli.js bench report -o "${BENCH_OUT:-bench/results}"
