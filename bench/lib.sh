# Sourced by the bench scripts (after `cd` to the repository): servers of their own, each with a
# fresh state directory and the shared template cache, stopped by PID at exit, their nftables
# tables deleted and their storage pools unmounted.
bench_pids=()
bench_states=()
bench_tables=()
bench_cleanup() {
  for pid in "${bench_pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  for table in "${bench_tables[@]}"; do nft delete table inet "$table" 2>/dev/null || true; done
  for dir in "${bench_states[@]}"; do CUBICLE_STATE_DIR=$dir node dist/cli.js unmount > /dev/null 2>&1 || true; done
}
trap bench_cleanup EXIT

# bench_serve PORT STATE_DIR SUBNET TABLE [NAME=VALUE ...]: starts a server (the base template,
# no pool, log level warn, no HTTPS; NAME=VALUE pairs override) and waits for /health. Its log is
# STATE_DIR.log.
bench_serve() {
  local port=$1 state=$2 subnet=$3 table=$4
  shift 4
  rm -rf "$state"
  bench_states+=("$state")
  bench_tables+=("$table")
  env CUBICLE_PORT="$port" CUBICLE_STATE_DIR="$state" CUBICLE_TEMPLATE_DIR="${CUBICLE_TEMPLATE_DIR:-/var/lib/cubicle/templates}" \
    CUBICLE_SUBNET="$subnet" CUBICLE_NFT_TABLE="$table" CUBICLE_POOL_SIZE= CUBICLE_DEFAULT_TEMPLATES=base \
    CUBICLE_LOG_LEVEL=warn CUBICLE_HTTPS_PORT=off "$@" node dist/cli.js serve > "$state.log" 2>&1 &
  bench_pids+=($!)
  for _ in $(seq 1 600); do curl -fs "http://127.0.0.1:$port/health" > /dev/null && return 0; sleep 0.5; done
  echo "server on port $port did not start; see $state.log" >&2
  exit 1
}
