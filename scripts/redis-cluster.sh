#!/usr/bin/env bash
# A local 3-primary Redis Cluster on 127.0.0.1:7101-7103 for tests and benchmarks.
#   scripts/redis-cluster.sh [start]   start it (idempotent) and print the seed URLs
#   scripts/redis-cluster.sh stop      stop it and remove its files
# Use it with: [redis] mode = "cluster", url = "redis://127.0.0.1:7101,redis://127.0.0.1:7102,redis://127.0.0.1:7103"
# or, for the test suite: QG_TEST_REDIS_CLUSTER=<that url list> cargo test --test api
set -euo pipefail
PORTS=(7101 7102 7103)
DIR=${QG_CLUSTER_DIR:-/tmp/quota-gateway-cluster}
SEEDS=$(printf 'redis://127.0.0.1:%s,' "${PORTS[@]}"); SEEDS=${SEEDS%,}

case ${1:-start} in
  stop)
    for p in "${PORTS[@]}"; do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done
    rm -rf "$DIR"
    exit 0 ;;
  start) ;;
  *) echo "usage: $0 [start|stop]" >&2; exit 64 ;;
esac

if ! command -v redis-server >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
if [ "$(redis-cli -p "${PORTS[0]}" cluster info 2>/dev/null | tr -d '\r' | sed -n 's/^cluster_state://p')" = ok ]; then
  echo "$SEEDS"; exit 0
fi
mkdir -p "$DIR"
for p in "${PORTS[@]}"; do
  if ! redis-cli -p "$p" ping >/dev/null 2>&1; then
    mkdir -p "$DIR/$p"
    redis-server --port "$p" --bind 127.0.0.1 --daemonize yes --dir "$DIR/$p" \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
      --save "" --appendonly no --maxmemory-policy noeviction --logfile "$DIR/$p/redis.log"
  fi
done
for p in "${PORTS[@]}"; do
  for _ in $(seq 1 50); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${PORTS[@]}") --cluster-replicas 0 --cluster-yes >/dev/null
for _ in $(seq 1 100); do
  state=$(redis-cli -p "${PORTS[0]}" cluster info | tr -d '\r' | sed -n 's/^cluster_state://p')
  [ "$state" = ok ] && break
  sleep 0.1
done
[ "$state" = ok ] || { echo "cluster did not become ready" >&2; exit 1; }
echo "$SEEDS"
