#!/usr/bin/env bash
# Property-based test of the HTTP API, driven by its own OpenAPI document: schemathesis generates
# requests from /openapi.json (valid and invalid ones, boundary values first) and fails on any
# 5xx, any response whose status or body the document does not describe.
#
#   scripts/schemathesis.sh [--max-examples N] [--seed N]
#
# Builds the gateway, starts it against the local Redis and Postgres (scripts/services.sh) with a
# throwaway config (a fresh database, a unique Redis key prefix, billing webhooks on), runs
# schemathesis from a pinned version in target/schemathesis-venv (installed on first use), then
# removes the database and the keys. Sized to finish within a few minutes on 2 cores.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SCHEMATHESIS_VERSION=4.32.5
MAX_EXAMPLES=${QG_SCHEMATHESIS_EXAMPLES:-100}
SEED=${QG_SCHEMATHESIS_SEED:-}
while [ $# -gt 0 ]; do
  case $1 in
    --max-examples) MAX_EXAMPLES=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 64 ;;
  esac
done

VENV="$ROOT/target/schemathesis-venv"
if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  echo "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION"
fi

bash "$ROOT/scripts/services.sh" >/dev/null
(cd "$ROOT" && cargo build --quiet --bin quota-gateway)

WORK=$(mktemp -d)
PREFIX="qgfuzz-$$"
DB="quota_gateway_fuzz_$$"
ADMIN="fuzz-admin-token"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
GW=""
cleanup() {
  [ -n "$GW" ] && kill "$GW" 2>/dev/null && wait "$GW" 2>/dev/null || true
  redis-cli --scan --pattern "$PREFIX:*" | xargs -r -n 500 redis-cli DEL >/dev/null 2>&1 || true
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

cp "$ROOT/config/plans.toml" "$WORK/plans.toml"
cat > "$WORK/gateway.toml" <<TOML
plans = "plans.toml"
[api]
listen = "127.0.0.1:$PORT"
admin_token = "$ADMIN"
# schemathesis sends hundreds of admin requests a second from one address
guard_per_second = 100000
guard_burst = 100000
[redis]
url = "redis://127.0.0.1:6379/0"
key_prefix = "$PREFIX"
[database]
url = "postgres://postgres@127.0.0.1:5432/$DB"
[log]
format = "json"
level = "warn"
[billing.stripe]
secrets = ["whsec_fuzz_secret"]
plans = { "price_pro" = "pro" }
[billing.dodo]
secrets = ["whsec_ZnV6ei1kb2RvLXNlY3JldA=="]
plans = { "pdt_pro" = "pro" }
[billing.polar]
secrets = ["polar_fuzz_secret"]
plans = { "prod_pro" = "pro" }
TOML
"$ROOT/target/debug/quota-gateway" serve --config "$WORK/gateway.toml" >"$WORK/gateway.log" 2>&1 &
GW=$!
for _ in $(seq 1 150); do
  curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null || { cat "$WORK/gateway.log"; exit 1; }

ARGS=(
  run "http://127.0.0.1:$PORT/openapi.json"
  --url "http://127.0.0.1:$PORT"
  --header "Authorization: Bearer $ADMIN"
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance
  --max-examples "$MAX_EXAMPLES"
  # one worker: hypothesis's lambda descriptions are not thread-safe on CPython 3.11
  --workers 1
  --request-timeout 10
  --generation-database none
  --suppress-health-check all
  --report junit --report-dir "$ROOT/target/schemathesis"
)
[ -n "$SEED" ] && ARGS+=(--seed "$SEED")
status=0
# run from the scratch directory: schemathesis keeps a cache in ./.schemathesis
(cd "$WORK" && "$VENV/bin/schemathesis" "${ARGS[@]}") || status=$?
if grep -q '"level":"ERROR"' "$WORK/gateway.log"; then
  echo "the gateway logged errors during the run:" >&2
  grep '"level":"ERROR"' "$WORK/gateway.log" | head -20 >&2
  status=1
fi
exit $status
