#!/usr/bin/env bash
# What the hardening (issue 11) costs on the hot paths: a server of the last commit before it
# (3254f27) against one of this checkout (bench/compare-revisions.sh): warm-pool create → first
# command, commands.run('true'), file read and write, runCode('1+1'), each as a ratio to the
# host's floors measured in the same rounds. Results: bench/results/hardening-cost/.
set -euo pipefail
cd "$(dirname "$0")"
NAME=hardening-cost BASE_REV="${BASE_REV:-3254f27}" exec ./compare-revisions.sh \
  'create -c 1 -n 40 --wait-pool' 'exec -c 1 -n 300' 'files -c 1 -n 100' 'runcode -c 1 -n 100'
