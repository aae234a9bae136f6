#!/usr/bin/env bash
# The burst of issue 11: 1000 creates at concurrency 50 while 300 other sandboxes live
# (`bench create -c 50 -n 1000 --background 300`), against a server of this checkout and one of
# BASE_REV (default 3254f27, before the hardening), with the host's floors measured in the same
# run (bench/compare-revisions.sh, one round). Results: bench/results/burst/.
set -euo pipefail
cd "$(dirname "$0")"
NAME=burst BASE_REV="${BASE_REV:-3254f27}" ROUNDS="${ROUNDS:-1}" SERVER_ENV="CUBICLE_DEFAULT_TEMPLATES=base CUBICLE_WARM_SNAPSHOT=none" \
  exec ./compare-revisions.sh 'create -c 50 -n 1000 -w 0 --background 300'
