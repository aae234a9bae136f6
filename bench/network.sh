#!/usr/bin/env bash
# The network benchmark (issue 14): connection setup and throughput through each egress path as
# ratios to a direct-NAT floor, updateNetwork round trips, and creates with a policy vs without,
# against fake hosts in a test namespace and a dedicated server (scripts/bench-network.ts).
# Results: bench/results/network/. Run as root; everything it makes is removed on exit.
#
#   bench/network.sh [-n CONNECTIONS] [--download-mib N] [--rounds N] [--pairs N] [--cold-pairs N] [--updates N]
set -euo pipefail
cd "$(dirname "$0")/.."
node scripts/build.mjs
exec node --import tsx scripts/bench-network.ts "$@"
