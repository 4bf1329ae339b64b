#!/usr/bin/env bash
# What one exact decision costs Redis, before and after a change, in one run:
#
#   benches/decide_cost.sh [--base REV] [--rounds N] [--decisions N]
#
# Starts a private redis-server (no persistence, nothing else on it, so `INFO commandstats` counts
# only these decisions), builds `examples/decide_cost.rs` for the work tree and, with --base, for
# REV (a temporary worktree with the same example copied in), then runs them in turn, N rounds
# each, and prints per scenario: EVALSHA calls, Redis's µs per EVALSHA (`usec_per_call`, Redis's
# own time for the command, whatever the client) and the commands the script ran per call.
# Debug builds: the client's speed does not enter Redis's own time per call.
# REV must build the example as it is (`Limit::scope`, `Metric::leases`: main from 5db5207 on;
# the README's figures came from e6a71df with the example of that day).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BASE=""
ROUNDS=3
DECISIONS=50000
while [ $# -gt 0 ]; do
  case $1 in
    --base) BASE=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --decisions) DECISIONS=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 64 ;;
  esac
done

WORK=$(mktemp -d)
PORT=$((20000 + $$ % 20000))
cleanup() {
  redis-cli -p "$PORT" SHUTDOWN NOSAVE >/dev/null 2>&1 || true
  if [ -n "$BASE" ] && [ -d "$WORK/base" ]; then
    git -C "$ROOT" worktree remove --force "$WORK/base" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# Each tree builds into a target directory of its own: cargo decides freshness by file times,
# so two checkouts of one package sharing a directory can take each other's build for theirs.
build() {
  (cd "$1" && CARGO_TARGET_DIR="$2" cargo build --quiet --example decide_cost)
  cp "$2/debug/examples/decide_cost" "$3"
}
build "$ROOT" "$ROOT/target" "$WORK/after"
if [ -n "$BASE" ]; then
  git -C "$ROOT" worktree add --quiet --detach "$WORK/base" "$BASE"
  cp "$ROOT/examples/decide_cost.rs" "$WORK/base/examples/decide_cost.rs"
  build "$WORK/base" "$ROOT/target/decide-cost-base" "$WORK/before"
fi

redis-server --port "$PORT" --save '' --appendonly no --dir "$WORK" --daemonize yes \
  --pidfile "$WORK/redis.pid" --logfile "$WORK/redis.log"
for _ in $(seq 1 50); do redis-cli -p "$PORT" PING >/dev/null 2>&1 && break; sleep 0.1; done

for r in $(seq 1 "$ROUNDS"); do
  if [ -n "$BASE" ]; then
    echo "round $r, before ($BASE):"
    "$WORK/before" "redis://127.0.0.1:$PORT/0" "$DECISIONS" | sed 's/^/  /'
  fi
  echo "round $r, after (work tree):"
  "$WORK/after" "redis://127.0.0.1:$PORT/0" "$DECISIONS" | sed 's/^/  /'
done
