#!/usr/bin/env bash
# Run README.md's quick start against a real gateway and compare what it prints with what README
# shows. CI runs it (.ci/run); run it yourself after editing the quick start.
#
# What it runs: the part of README.md between `<!-- readme-check:begin -->` and
# `<!-- readme-check:end -->`. Every ```sh block there is run, in order, in one bash session
# (so `KEY=…` from one block is seen by the next), with `localhost:9000` / `localhost:8080`
# pointed at this script's gateway. The output block that follows a ```sh block (```text or
# ```json) is what that block must print:
#   - a block that is JSON as a whole (one or more objects or arrays) is compared value by value;
#   - otherwise line by line: a line holding JSON (or `prefix: {json}`) is compared as JSON, any
#     other line as text;
#   - JSON: the same keys at every level; booleans, null, strings and `status` numbers equal;
#     other numbers only by type (counts depend on timing); `…` in an expected string or text
#     line stands for any text.
#
# Isolation, as in the tests: the example config (config/gateway.toml + plans.toml) with a fresh
# Postgres database and a fresh Redis key prefix, free ports, and a random admin token passed as
# QG_ADMIN_TOKEN (the quick start reads it from there); everything is removed at the end.
# Needs Redis and Postgres (scripts/services.sh), curl and jq (installed when missing, on Debian).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
log() { printf '[readme-check] %s\n' "$*"; }

if ! command -v jq >/dev/null 2>&1; then
  log "installing jq"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq >/dev/null
fi

cargo build -q --bin quota-gateway
BIN="$ROOT/target/debug/quota-gateway"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
API=$(free_port); PROXY=$(free_port); UPSTREAM=$(free_port)
ID=$(python3 -c 'import uuid; print(uuid.uuid4().hex[:12])')
DB="qg_readme_$ID"
PREFIX="qgreadme-$ID"
WORK=$(mktemp -d)
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  psql -h 127.0.0.1 -U postgres -w -d postgres -qAtc "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 || true
  redis-cli -h 127.0.0.1 -p 6379 --scan --pattern "$PREFIX:*" | xargs -r -n 100 redis-cli -h 127.0.0.1 -p 6379 del >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# The example config, unchanged but for the key prefix (no environment variable sets it).
cp config/plans.toml "$WORK/plans.toml"
sed "s/^key_prefix = \"qg\"/key_prefix = \"$PREFIX\"/" config/gateway.toml > "$WORK/gateway.toml"
grep -q "^key_prefix = \"$PREFIX\"" "$WORK/gateway.toml" || { log "config/gateway.toml has no key_prefix = \"qg\" line"; exit 1; }

export QG_ADMIN_TOKEN
QG_ADMIN_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
QG_DEMO_UPSTREAM_LISTEN="127.0.0.1:$UPSTREAM" "$BIN" demo-upstream >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
QG_API_LISTEN="127.0.0.1:$API" QG_PROXY_LISTEN="127.0.0.1:$PROXY" \
  QG_PROXY_UPSTREAM="http://127.0.0.1:$UPSTREAM" \
  DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB" REDIS_URL="redis://127.0.0.1:6379/0" \
  "$BIN" serve --config "$WORK/gateway.toml" >"$WORK/gateway.log" 2>&1 &
PIDS+=($!)

for _ in $(seq 1 120); do
  curl -fs "http://127.0.0.1:$API/readyz" >/dev/null 2>&1 \
    && curl -fs "http://127.0.0.1:$UPSTREAM/health" >/dev/null 2>&1 && break
  sleep 0.25
done
if ! curl -fs "http://127.0.0.1:$API/readyz" >/dev/null 2>&1; then
  log "the gateway did not become ready; its log:"; cat "$WORK/gateway.log"; exit 1
fi
log "gateway on API :$API, proxy :$PROXY, demo upstream :$UPSTREAM (database $DB, prefix $PREFIX)"

status=0
README="$ROOT/README.md" WORK="$WORK" API="$API" PROXY="$PROXY" python3 - <<'PY' || status=$?
import json, os, re, subprocess, sys

readme = open(os.environ["README"], encoding="utf-8").read()
try:
    section = readme.split("<!-- readme-check:begin -->", 1)[1].split("<!-- readme-check:end -->", 1)[0]
except IndexError:
    sys.exit("README.md has no <!-- readme-check:begin --> … <!-- readme-check:end --> section")

# (kind, body) for every fenced block, in order.
blocks = [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", section, re.S)]
steps = []  # (commands, expected or None)
for kind, body in blocks:
    if kind == "sh":
        steps.append([body, None])
    elif steps and steps[-1][1] is None:
        steps[-1][1] = body
    else:
        sys.exit(f"an output block follows no command block:\n{body}")
if not steps:
    sys.exit("the readme-check section holds no ```sh block")

api, proxy = os.environ["API"], os.environ["PROXY"]
work = os.environ["WORK"]
script = ["set -euo pipefail"]
for i, (commands, _) in enumerate(steps):
    commands = commands.replace("localhost:9000", f"127.0.0.1:{api}").replace("localhost:8080", f"127.0.0.1:{proxy}")
    script.append(f"{{\n{commands}\n}} > {work}/out.{i} 2>&1")
run = subprocess.run(["bash", "-c", "\n".join(script)])

def json_values(text):
    """The JSON values `text` holds, one after another; None when it is not only JSON."""
    dec, values, i, text = json.JSONDecoder(), [], 0, text.strip()
    while i < len(text):
        try:
            v, i = dec.raw_decode(text, i)
        except ValueError:
            return None
        values.append(v)
        while i < len(text) and text[i].isspace():
            i += 1
    # Only objects and arrays: a line of numbers (`201 201 402`) is text, compared exactly.
    return values if values and all(isinstance(v, (dict, list)) for v in values) else None

def text_matches(expected, actual):
    pattern = "^" + ".*".join(re.escape(part) for part in expected.split("…")) + "$"
    return re.match(pattern, actual, re.S) is not None

def same_shape(exp, act, path="$"):
    """Problems found comparing an expected JSON value with an actual one."""
    if isinstance(exp, dict):
        if not isinstance(act, dict):
            return [f"{path}: expected an object, got {json.dumps(act)}"]
        if set(exp) != set(act):
            return [f"{path}: keys {sorted(act)}, expected {sorted(exp)}"]
        return [p for k in exp for p in same_shape(exp[k], act[k], f"{path}.{k}")]
    if isinstance(exp, list):
        if not isinstance(act, list) or len(exp) != len(act):
            return [f"{path}: expected {len(exp)} items, got {json.dumps(act)}"]
        return [p for i, (e, a) in enumerate(zip(exp, act)) for p in same_shape(e, a, f"{path}[{i}]")]
    if isinstance(exp, bool) or exp is None:
        return [] if exp == act and type(exp) is type(act) else [f"{path}: expected {json.dumps(exp)}, got {json.dumps(act)}"]
    if isinstance(exp, (int, float)):
        ok = isinstance(act, (int, float)) and not isinstance(act, bool)
        ok = ok and (exp == act or not path.endswith(".status"))
        want = json.dumps(exp) if path.endswith(".status") else "a number"
        return [] if ok else [f"{path}: expected {want}, got {json.dumps(act)}"]
    if isinstance(exp, str):
        ok = isinstance(act, str) and text_matches(exp, act)
        return [] if ok else [f"{path}: expected {json.dumps(exp)}, got {json.dumps(act)}"]
    return [f"{path}: unexpected {exp!r}"]

def line_problems(exp, act):
    brace = exp.find("{")
    exp_json = json_values(exp[brace:]) if brace >= 0 else None
    if exp_json is None:
        return [] if text_matches(exp, act) else [f"expected {exp!r}, got {act!r}"]
    prefix = exp[:brace]
    if not act.startswith(prefix):
        return [f"expected a line starting {prefix!r}, got {act!r}"]
    act_json = json_values(act[len(prefix):])
    if act_json is None or len(act_json) != len(exp_json):
        return [f"expected JSON, got {act!r}"]
    return [p for e, a in zip(exp_json, act_json) for p in same_shape(e, a)]

failures = 0
for i, (commands, expected) in enumerate(steps):
    actual = open(f"{work}/out.{i}", encoding="utf-8", errors="replace").read() if os.path.exists(f"{work}/out.{i}") else ""
    first = commands.strip().splitlines()[0]
    if expected is None:
        print(f"ran    {first}")
        continue
    problems = []
    exp_json = json_values(expected)
    if exp_json is not None:
        act_json = json_values(actual)
        if act_json is None or len(act_json) != len(exp_json):
            problems = [f"expected {len(exp_json)} JSON value(s)"]
        else:
            problems = [p for e, a in zip(exp_json, act_json) for p in same_shape(e, a)]
    else:
        exp_lines = expected.rstrip("\n").split("\n")
        act_lines = actual.rstrip("\n").split("\n")
        if len(exp_lines) != len(act_lines):
            problems = [f"expected {len(exp_lines)} line(s), got {len(act_lines)}"]
        else:
            problems = [p for e, a in zip(exp_lines, act_lines) for p in line_problems(e, a)]
    if problems:
        failures += 1
        print(f"FAILED {first}")
        for p in problems:
            print(f"       {p}")
        print("       README shows:\n" + "".join(f"         {l}\n" for l in expected.rstrip("\n").split("\n")))
        print("       it printed:\n" + "".join(f"         {l}\n" for l in actual.rstrip("\n").split("\n")))
    else:
        print(f"ok     {first}")
if run.returncode != 0:
    print(f"the commands stopped with exit code {run.returncode}")
    failures += 1
sys.exit(1 if failures else 0)
PY
if [ "$status" != 0 ]; then
  log "README quick start does not match; gateway log:"; tail -n 30 "$WORK/gateway.log"
  exit 1
fi
log "README quick start: every command printed what README shows"
