#!/usr/bin/env bash
# Check what deploy/ ships: the Prometheus alert rules (promtool check rules + the unit tests in
# alerts.test.yml) and the Kubernetes manifests (deploy/kubernetes/check.py). CI runs it
# (.ci/run). promtool comes from Debian's `prometheus` package, installed only when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[deploy-check] %s\n' "$*"; }

if ! command -v promtool >/dev/null 2>&1; then
  log "installing promtool (Debian package prometheus)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

promtool check rules deploy/prometheus/alerts.yml

# promtool test rules compares annotations exactly: test a copy without the long `runbook`
# annotations (a `runbook: >-` line and the lines indented under it), so the tests pin what
# each alert fires on and its summary, not the prose.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
awk '
  skip && match($0, /^ */) && RLENGTH <= indent { skip = 0 }
  !skip && /^ *runbook: >-$/ { skip = 1; match($0, /^ */); indent = RLENGTH; next }
  !skip { print }
' deploy/prometheus/alerts.yml > "$work/alerts.yml"
cp deploy/prometheus/alerts.test.yml "$work/"
promtool test rules "$work/alerts.test.yml"

if [ -f deploy/kubernetes/check.py ]; then
  python3 deploy/kubernetes/check.py
fi
