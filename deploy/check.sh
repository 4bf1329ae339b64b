#!/usr/bin/env bash
# Check what deploy/ ships: the Prometheus alert rules (promtool check rules + the unit tests in
# alerts.test.yml), the Grafana dashboard's queries (PromQL syntax) and the Kubernetes manifests
# (deploy/kubernetes/check.py). tests/api/deploy.rs checks that the metrics they name exist. CI runs it
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

# The dashboard's queries parse as PromQL: promtool checks them as recording rules, with
# Grafana's variables replaced by values of the same kind.
python3 - "$work/dashboard-rules.yml" <<'PY'
import json, sys
exprs = []
def walk(v):
    if isinstance(v, dict):
        for k, x in v.items():
            if k == "expr" and isinstance(x, str):
                exprs.append(x)
            else:
                walk(x)
    elif isinstance(v, list):
        for x in v:
            walk(x)
walk(json.load(open("deploy/grafana/quota-gateway.json")))
with open(sys.argv[1], "w") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(exprs):
        e = e.replace("$__rate_interval", "5m").replace("$instance", ".*")
        out.write(f"      - record: dashboard:panel_{i}\n        expr: {json.dumps(e)}\n")
print(f"deploy/grafana/quota-gateway.json: {len(exprs)} queries")
PY
promtool check rules "$work/dashboard-rules.yml"

# The manifests, their ConfigMaps run through the binary's own check-config.
python3 -c 'import yaml' 2>/dev/null || {
  log "installing python3-yaml"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-yaml >/dev/null
}
cargo build -q --bin quota-gateway
python3 deploy/kubernetes/check.py
