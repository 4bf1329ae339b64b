#!/usr/bin/env bash
# Make sure Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432, user postgres, trust auth
# on loopback) are running on this machine, installing the Debian packages only where missing.
# nginx is only installed (the path-normalisation test starts its own on a free port).
# Used by .ci/run and by developers without Docker; with Docker, `docker compose up -d redis
# postgres` does the same.
set -euo pipefail

log() { printf '[services] %s\n' "$*"; }

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

wait_for() {
  local what=$1; shift
  for _ in $(seq 1 60); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  log "$what did not come up"; return 1
}

ensure_redis() {
  if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
    log "redis: running"; return
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    log "redis: installing redis-server"; apt_install redis-server
  fi
  log "redis: starting"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --maxmemory-policy noeviction
  wait_for redis redis-cli -h 127.0.0.1 -p 6379 ping
}

pg_ok() { psql -h 127.0.0.1 -U postgres -w -d postgres -Atc 'SELECT 1' >/dev/null 2>&1; }

ensure_postgres() {
  if pg_ok; then log "postgres: running"; return; fi
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    log "postgres: installing postgresql"; apt_install postgresql
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
    log "postgres: starting cluster $version/main"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for postgres pg_isready -h 127.0.0.1 -p 5432
  fi
  if ! pg_ok; then
    # Loopback trust for the test user, placed first so it wins over password rules.
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    log "postgres: trusting 127.0.0.1 and ::1 in $hba"
    { printf 'host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n'; cat "$hba"; } > "$hba.new"
    mv "$hba.new" "$hba"
    chown postgres:postgres "$hba" 2>/dev/null || true
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    wait_for "postgres (trust)" pg_ok
  fi
  log "postgres: running"
}

ensure_nginx() {
  if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    log "nginx: installed"; return
  fi
  log "nginx: installing nginx"; apt_install nginx
}

ensure_redis
ensure_postgres
ensure_nginx
