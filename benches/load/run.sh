#!/usr/bin/env bash
# The load benchmark: one command, one run, one table.
#
#   [QG_BIN=path/to/quota-gateway] benches/load/run.sh [--duration SECONDS] [--connections N] [--warmup SECONDS]
#                       [--rows 1,2,3,4,5] [--soak MINUTES]
#
# Starts a tiny upstream (nginx answering 200), nginx as a plain reverse proxy to it, and the
# gateway (release build) against the local Redis and Postgres, then drives each with wrk over
# loopback and prints requests/s, p50, p99, p99.9, errors and Redis commands per request for:
#   1. the upstream directly
#   2. nginx as a plain reverse proxy (no metering)
#   3. the gateway proxy, every request metered (api_key identity, two limits per request)
#   4. /v1/check directly
#   5. redis-benchmark running the decide script with the same arguments (the ceiling for 4)
#   6. a bare hyper-util reverse proxy (examples/floor_proxy.rs): the gateway's stack, no metering
#   7. the same plus one trivial EVALSHA per request: the floor of any one-round-trip design
#   8. the gateway proxy as in 3, with [leases] on (a second gateway, org far from its limits)
#   9. /v1/check with [leases] on
# Quote the ratios between rows; absolute numbers on a shared machine mean little.
# --soak MINUTES then drives the gateway at half its measured peak for that long, sampling its
# RSS and open fds every 10 s.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DURATION=10
CONNS=64
SOAK=0
WARMUP=2
ROW_SET=1,2,3,4,5,6,7,8,9
while [ $# -gt 0 ]; do
  case $1 in
    --duration) DURATION=$2; shift 2 ;;
    --connections) CONNS=$2; shift 2 ;;
    --soak) SOAK=$2; shift 2 ;;
    --rows) ROW_SET=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 64 ;;
  esac
done

want() { [[ ",$ROW_SET," == *",$1,"* ]]; }

for tool in wrk nginx; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "installing $tool"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool" >/dev/null
  fi
done
bash "$ROOT/scripts/services.sh" >/dev/null
# QG_BIN runs a gateway binary built elsewhere (an older commit, another profile) under the same
# harness, so before/after figures come from one script.
if [ -z "${QG_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release --quiet --bin quota-gateway)
  QG_BIN="$ROOT/target/release/quota-gateway"
fi
if [[ ",$ROW_SET," == *",6,"* || ",$ROW_SET," == *",7,"* ]]; then
  (cd "$ROOT" && cargo build --release --quiet --example floor_proxy)
fi

WORK=$(mktemp -d)
UP=18081; NGX=18082; API=18090; PXY=18091; FLR=18083; FLR2=18084; API2=18092; PXY2=18093
PREFIX="qgbench-$$"
DB="quota_gateway_bench_$$"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/up.pid" ] && kill "$(cat "$WORK/up.pid")" 2>/dev/null || true
  [ -f "$WORK/ngx.pid" ] && kill "$(cat "$WORK/ngx.pid")" 2>/dev/null || true
  redis-cli --scan --pattern "$PREFIX:*" | xargs -r -n 500 redis-cli DEL >/dev/null 2>&1 || true
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

cat > "$WORK/up.conf" <<NGX
worker_processes 1;
pid $WORK/up.pid;
error_log $WORK/up.err;
events { worker_connections 4096; }
http {
  access_log off;
  server { listen 127.0.0.1:$UP; location / { return 200 "ok\n"; } }
}
NGX
cat > "$WORK/ngx.conf" <<NGX
worker_processes auto;
pid $WORK/ngx.pid;
error_log $WORK/ngx.err;
events { worker_connections 4096; }
http {
  access_log off;
  upstream up { server 127.0.0.1:$UP; keepalive 128; }
  server {
    listen 127.0.0.1:$NGX;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
NGX
nginx -c "$WORK/up.conf" -p "$WORK"
nginx -c "$WORK/ngx.conf" -p "$WORK"

cat > "$WORK/plans.toml" <<TOML
default_plan = "bench"
[metrics]
requests = { unit = "request" }
[plans.bench]
quotas = { requests = { limit = 1000000000000, period = "month" } }
rates  = { requests = { limit = 1000000000, window = "1s" } }
TOML
cat > "$WORK/gateway.toml" <<TOML
plans = "plans.toml"
[api]
listen = "127.0.0.1:$API"
admin_token = "bench-admin"
[redis]
url = "redis://127.0.0.1:6379/0"
key_prefix = "$PREFIX"
[database]
url = "postgres://postgres@127.0.0.1:5432/$DB"
[log]
level = "warn"
[proxy]
listen = "127.0.0.1:$PXY"
upstream = "http://127.0.0.1:$UP"
[identity]
mode = "api_key"
[proxy.default_route]
charges = [{ metric = "requests", amount = 1 }]
TOML
# The same gateway with leases, on its own ports (and its own org, so that no decision of one
# org mixes replicas with and without leases).
sed -e "s/127.0.0.1:$API/127.0.0.1:$API2/" -e "s/127.0.0.1:$PXY/127.0.0.1:$PXY2/" "$WORK/gateway.toml" >"$WORK/gateway-leases.toml"
printf '[leases]\nenabled = true\n' >>"$WORK/gateway-leases.toml"
# ready PORT LOG: wait for a gateway's /readyz, or show its log and stop.
ready() {
  for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  cat "$2"; exit 1
}
"$QG_BIN" serve --config "$WORK/gateway.toml" >"$WORK/gateway.log" 2>&1 &
GW=$!
PIDS+=("$GW")
ready "$API" "$WORK/gateway.log"
GWL=""
if want 8 || want 9; then
  "$QG_BIN" serve --no-migrate --config "$WORK/gateway-leases.toml" >"$WORK/gateway-leases.log" 2>&1 &
  GWL=$!
  PIDS+=("$GWL")
  ready "$API2" "$WORK/gateway-leases.log"
fi
new_key() {
  curl -fs -X POST "http://127.0.0.1:$API/admin/orgs/$1/keys" \
    -H 'authorization: Bearer bench-admin' -H 'content-type: application/json' -d '{"name":"bench"}' \
    | sed -n 's/.*"key":"\([^"]*\)".*/\1/p'
}
KEY=$(new_key bench)
KEYL=$(new_key benchl)

# Round trips to Redis per request: EVALSHA calls (INFO commandstats also counts the commands a
# script runs inside Redis; those are no round trips). Measured on the whole Redis, so run this
# on a quiet one.
redis_calls() {
  redis-cli INFO commandstats | tr -d '\r' | awk -F'[:=,]' \
    '$1 == "cmdstat_evalsha" { n += $3 } END { print n + 0 }'
}

# CPU time (user + system, in clock ticks) of the given processes, summed. Per-request CPU by
# component is what shows where a shared machine's cores go: wrk, the upstream, Redis and the
# proxy under test all run on the same few cores, so throughput alone hides who spent them.
TICK_US=$((1000000 / $(getconf CLK_TCK)))
cpu_ticks() {
  local total=0 p
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] && total=$((total + $(awk '{ print $14 + $15 }' "/proc/$p/stat")))
  done
  echo "$total"
}
workers() { pgrep -P "$(cat "$1")" | tr '\n' ' '; }
UP_PIDS=$(workers "$WORK/up.pid")
NGX_PIDS=$(workers "$WORK/ngx.pid")
REDIS_PID=$(redis-cli INFO server | tr -d '\r' | sed -n 's/^process_id://p')

ROWS=()
# run NAME URL BODY AUTH PROXY_PIDS
run() {
  local name=$1 url=$2 body=$3 auth=$4 proxy_pids=$5
  LAST_RPS=0; LAST_P99=0; LAST_REDIS_CPU=0
  want "${name%%.*}" || return 0
  local before after out cpu_before cpu_after
  # Unmeasured first: connection set-up and cold caches are not the steady state.
  if [ "$WARMUP" != "0" ]; then
    QG_BODY="$body" QG_AUTH="$auth" wrk -t2 -c"$CONNS" -d"${WARMUP}s" -s "$ROOT/benches/load/report.lua" "$url" >/dev/null
  fi
  before=$(redis_calls)
  # shellcheck disable=SC2086
  cpu_before=($(cpu_ticks $proxy_pids) $(cpu_ticks $UP_PIDS) $(cpu_ticks "$REDIS_PID"))
  out=$(QG_BODY="$body" QG_AUTH="$auth" wrk -t2 -c"$CONNS" -d"${DURATION}s" -s "$ROOT/benches/load/report.lua" "$url" | grep QG_RESULT)
  after=$(redis_calls)
  # shellcheck disable=SC2086
  cpu_after=($(cpu_ticks $proxy_pids) $(cpu_ticks $UP_PIDS) $(cpu_ticks "$REDIS_PID"))
  local requests seconds errors p50 p99 p999
  requests=$(sed -n 's/.*requests=\([0-9]*\).*/\1/p' <<<"$out")
  seconds=$(sed -n 's/.*seconds=\([0-9.]*\).*/\1/p' <<<"$out")
  errors=$(sed -n 's/.*errors=\([0-9]*\).*/\1/p' <<<"$out")
  p50=$(sed -n 's/.* p50=\([0-9]*\).*/\1/p' <<<"$out")
  p99=$(sed -n 's/.* p99=\([0-9]*\).*/\1/p' <<<"$out")
  p999=$(sed -n 's/.* p999=\([0-9]*\).*/\1/p' <<<"$out")
  local rps per
  rps=$(awk -v r="$requests" -v s="$seconds" 'BEGIN { printf "%.0f", r / s }')
  per=$(awk -v a="$after" -v b="$before" -v r="$requests" 'BEGIN { printf "%.2f", (a - b) / r }')
  local cpu=() i
  for i in 0 1 2; do
    cpu+=("$(awk -v a="${cpu_after[$i]}" -v b="${cpu_before[$i]}" -v t="$TICK_US" -v r="$requests" \
      'BEGIN { printf "%.1f", (a - b) * t / r }')")
  done
  [ -z "$proxy_pids" ] && cpu[0]="-"
  ROWS+=("$(printf '%-34s %10s %9s %9s %9s %8s %10s %8s %8s %8s' "$name" "$rps" "$p50" "$p99" "$p999" "$errors" "$per" "${cpu[@]}")")
  LAST_RPS=$rps; LAST_P99=$p99; LAST_REDIS_CPU=${cpu[2]}
}

run "1. upstream (nginx return 200)" "http://127.0.0.1:$UP/" "" "" ""
run "2. nginx reverse proxy" "http://127.0.0.1:$NGX/" "" "" "$NGX_PIDS"; NGX_RPS=$LAST_RPS; NGX_P99=$LAST_P99
run "3. gateway proxy, metered" "http://127.0.0.1:$PXY/" "" "Bearer $KEY" "$GW"; GW_RPS=$LAST_RPS; GW_P99=$LAST_P99; GW_REDIS=$LAST_REDIS_CPU
run "4. /v1/check" "http://127.0.0.1:$API/v1/check" '{"org_id":"bench","metric":"requests"}' "" "$GW"; CHECK_RPS=$LAST_RPS
run "8. gateway proxy, leases" "http://127.0.0.1:$PXY2/" "" "Bearer $KEYL" "$GWL"; GWL_RPS=$LAST_RPS; GWL_P99=$LAST_P99; GWL_REDIS=$LAST_REDIS_CPU
run "9. /v1/check, leases" "http://127.0.0.1:$API2/v1/check" '{"org_id":"benchl","metric":"requests"}' "" "$GWL"; CHECKL_RPS=$LAST_RPS

# 6 and 7. The floors: the gateway's own stack (hyper, hyper-util, redis-rs), nothing else.
floor() {
  local port=$1 redis=$2
  # shellcheck disable=SC2086
  "$ROOT/target/release/examples/floor_proxy" "127.0.0.1:$port" "http://127.0.0.1:$UP" $redis >/dev/null 2>&1 &
  FLOOR_PID=$!; PIDS+=("$FLOOR_PID")
  for _ in $(seq 1 50); do curl -fs "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done
}
FLOOR_RPS=0; FLOOR_P99=0; FLOOR2_RPS=0; FLOOR2_P99=0
GW_RPS=${GW_RPS:-0}; GWL_RPS=${GWL_RPS:-0}; CHECKL_RPS=${CHECKL_RPS:-0}
if want 6; then
  floor "$FLR" ""
  run "6. bare hyper-util proxy" "http://127.0.0.1:$FLR/" "" "" "$FLOOR_PID"; FLOOR_RPS=$LAST_RPS; FLOOR_P99=$LAST_P99
fi
if want 7; then
  floor "$FLR2" "redis://127.0.0.1:6379/0"
  run "7. bare proxy + 1 EVALSHA" "http://127.0.0.1:$FLR2/" "" "" "$FLOOR_PID"; FLOOR2_RPS=$LAST_RPS; FLOOR2_P99=$LAST_P99
fi

# 5. The decide script itself, with the arguments a /v1/check of the bench plan sends.
RB_RPS=0
if want 5; then
  SHA=$(redis-cli SCRIPT LOAD "$(cat "$ROOT/src/store/decide.lua")")
  MONTH=$(date -u +%Y-%m-01T00:00:00Z)
  START=$(date -u -d "$MONTH" +%s)
  NEXT=$(date -u -d "$MONTH +1 month +7 days" +%s)
  NOW_US=$(($(date +%s) * 1000000))
  redis-cli SET "$PREFIX:{rb}:restored:$START" 1 >/dev/null
  redis-cli SET "$PREFIX:{rb}:restored:resident" 1 >/dev/null
  RB=$(redis-benchmark -h 127.0.0.1 -p 6379 -c "$CONNS" -n 200000 --csv EVALSHA "$SHA" 5 \
    "$PREFIX:{rb}:restored:$START" "$PREFIX:{rb}:restored:resident" \
    "$PREFIX:{rb}:c:requests:month:$START" "$PREFIX:{rb}:c:requests:month:$START:v" \
    "$PREFIX:{rb}:r:requests:1000" \
    "$NOW_US" check 0 $((NEXT * 1000)) "" 0 m 1 1000000000000 1 $((NEXT * 1000)) r 1 1000000000 1 1000000 | tail -n 1)
  RB_RPS=$(awk -F'","' '{ printf "%.0f", $2 }' <<<"$RB")
  RB_P50=$(awk -F'","' '{ printf "%.0f", $5 * 1000 }' <<<"$RB")
  RB_P99=$(awk -F'","' '{ printf "%.0f", $7 * 1000 }' <<<"$RB")
  ROWS+=("$(printf '%-34s %10s %9s %9s %9s %8s %10s %8s %8s %8s' "5. redis-benchmark EVALSHA decide" "$RB_RPS" "$RB_P50" "$RB_P99" "-" "-" "1.00" "-" "-" "-")")
fi
echo
printf '%-34s %10s %9s %9s %9s %8s %10s %8s %8s %8s\n' "target ($CONNS connections, ${DURATION}s)" "req/s" "p50 µs" "p99 µs" "p99.9 µs" "errors" "EVALSHA/req" "proxy" "upstream" "redis"
for r in "${ROWS[@]}"; do echo "$r"; done
echo "(proxy, upstream, redis: CPU µs per request of that process, user + system)"
echo
awk -v g="$GW_RPS" -v n="$NGX_RPS" -v gp="$GW_P99" -v np="$NGX_P99" -v c="$CHECK_RPS" -v rb="$RB_RPS" \
  -v f="$FLOOR_RPS" -v f2="$FLOOR2_RPS" -v f2p="$FLOOR2_P99" -v fp="$FLOOR_P99" \
  -v gl="$GWL_RPS" -v glp="${GWL_P99:-0}" -v gw_r="${GW_REDIS:-0}" -v gl_r="${GWL_REDIS:-0}" -v cl="$CHECKL_RPS" 'BEGIN {
  if (g > 0 && f2 > 0) {
    printf "gateway / (bare proxy + 1 EVALSHA): %.2f   (target >= 0.90)\n", g / f2
    printf "gateway p99 / its p99:              %.2f\n", gp / f2p
  }
  if (c > 0 && f2 > 0) printf "/v1/check / (bare proxy + 1 EVALSHA): %.2f\n", c / f2
  if (f > 0 && n > 0) printf "bare hyper-util proxy / nginx:      %.2f\n", f / n
  if (g > 0 && n > 0) {
    printf "gateway / nginx throughput: %.2f   (target >= 0.80)\n", g / n
    printf "gateway / nginx p99:        %.2f   (target <= 1.50)\n", gp / np
  }
  if (c > 0 && rb > 0) printf "/v1/check / redis-benchmark: %.2f  (target >= 0.50)\n", c / rb
  if (gl > 0 && f > 0) {
    printf "gateway with leases / bare hyper-util proxy: %.2f   (target >= 0.85)\n", gl / f
    printf "gateway with leases p99 / bare proxy p99:    %.2f   (target <= 1.30)\n", glp / fp
  }
  if (gl > 0 && n > 0) printf "gateway with leases / nginx: %.2f\n", gl / n
  if (gw_r > 0 && gl > 0) printf "Redis CPU per request, leases / exact path: %.3f   (target <= 0.10)\n", gl_r / gw_r
  if (cl > 0 && c > 0) printf "/v1/check with leases / /v1/check: %.2f   (target >= 2)\n", cl / c
}'

if [ "$SOAK" != "0" ]; then
  HALF=$((GW_RPS / 2))
  DELAY=$(awk -v c="$CONNS" -v h="$HALF" 'BEGIN { d = c * 1000 / h; printf "%d", (d < 1 ? 1 : d) }')
  echo
  echo "soak: ${SOAK} min at ~${HALF} req/s (each connection paced ${DELAY} ms)"
  QG_AUTH="Bearer $KEY" QG_DELAY_MS=$DELAY wrk -t2 -c"$CONNS" -d"$((SOAK * 60))s" \
    -s "$ROOT/benches/load/report.lua" "http://127.0.0.1:$PXY/" >"$WORK/soak.out" &
  WRK=$!
  printf '%8s %12s %8s\n' "t (s)" "RSS (KiB)" "fds"
  FIRST_RSS=""; FIRST_FDS=""
  for t in $(seq 0 10 $((SOAK * 60))); do
    RSS=$(awk '/VmRSS/ { print $2 }' "/proc/$GW/status")
    FDS=$(ls "/proc/$GW/fd" | wc -l)
    [ -z "$FIRST_RSS" ] && [ "$t" -ge 10 ] && FIRST_RSS=$RSS && FIRST_FDS=$FDS
    printf '%8s %12s %8s\n' "$t" "$RSS" "$FDS"
    sleep 10
  done
  wait "$WRK" || true
  grep QG_RESULT "$WORK/soak.out" || true
  awk -v a="$FIRST_RSS" -v b="$RSS" -v fa="$FIRST_FDS" -v fb="$FDS" 'BEGIN {
    printf "RSS growth after warm-up: %.1f %% (target <= 10 %%); fds: %d -> %d\n", (b - a) * 100 / a, fa, fb }'
fi
