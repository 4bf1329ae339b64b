#!/usr/bin/env bash
# Sign a webhook payload the way its provider does and POST it to the gateway.
#
#   scripts/send-webhook.sh PROVIDER FILE [URL]
#
# PROVIDER: stripe | dodo | polar | standard/NAME (`standard` alone means standard/inhouse).
# FILE is sent byte for byte (the signature covers the exact bytes, so nothing is rewritten).
# URL defaults to http://127.0.0.1:9000/webhooks/PROVIDER.
#
# Environment:
#   QG_WEBHOOK_SECRET  signing secret; defaults to the provider's test secret in
#                      examples/webhooks/billing.toml (for stripe, QG_STRIPE_WEBHOOK_SECRET is
#                      tried first, as the gateway reads it too)
#   QG_WEBHOOK_ID      Standard Webhooks message id; defaults to one derived from FILE, so sending
#                      the same file again is a redelivery (answered "duplicate"), as with Stripe,
#                      whose event id is in the body
#
# Prints the response body on stdout and the HTTP status on stderr; exits 0 on 2xx, else 1.
# Needs bash, openssl and curl.
set -euo pipefail

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 64
}

[ $# -ge 2 ] && [ $# -le 3 ] || usage
provider=$1
file=$2
[ -r "$file" ] || { echo "send-webhook: cannot read $file" >&2; exit 66; }
command -v openssl >/dev/null || { echo "send-webhook: openssl is required" >&2; exit 69; }
command -v curl >/dev/null || { echo "send-webhook: curl is required" >&2; exit 69; }

# Test secrets of examples/webhooks/billing.toml.
case "$provider" in
  stripe)       default_secret=whsec_example_stripe_test_secret ;;
  dodo)         default_secret=whsec_ZG9kby1leGFtcGxlLXNpZ25pbmcta2V5LTAwMDE= ;;
  polar)        default_secret=polar_whs_example_test_secret ;;
  standard)     provider=standard/inhouse
                default_secret=whsec_aW5ob3VzZS1leGFtcGxlLXNpZ25pbmcta2V5LTAx ;;
  standard/?*)  default_secret=whsec_aW5ob3VzZS1leGFtcGxlLXNpZ25pbmcta2V5LTAx ;;
  *)            echo "send-webhook: unknown provider '$provider'" >&2; usage ;;
esac
secret=${QG_WEBHOOK_SECRET:-}
if [ -z "$secret" ] && [ "$provider" = stripe ]; then
  secret=${QG_STRIPE_WEBHOOK_SECRET:-}
fi
if [ -z "$secret" ]; then
  secret=$default_secret
  echo "send-webhook: QG_WEBHOOK_SECRET unset; signing with the test secret of examples/webhooks/billing.toml" >&2
fi
url=${3:-http://127.0.0.1:9000/webhooks/$provider}

# HMAC keys are passed as hex so any byte (a decoded key may hold NUL) survives the command line.
hex() { od -An -vtx1 | tr -d ' \n'; }
# HMAC-SHA256 of stdin, raw bytes out.
hmac() { openssl dgst -sha256 -mac HMAC -macopt "hexkey:$1" -binary; }

t=$(date +%s)
headers=()
case "$provider" in
  stripe)
    # Key: the whole whsec_ string; signed content: "{t}.{body}"; tag in lower-case hex.
    key=$(printf '%s' "$secret" | hex)
    v1=$({ printf '%s.' "$t"; cat "$file"; } | hmac "$key" | hex)
    headers+=(-H "Stripe-Signature: t=$t,v1=$v1")
    ;;
  *)
    # Standard Webhooks: signed content "{id}.{t}.{body}", tag in base64. Polar keys with the
    # UTF-8 bytes of the secret; Dodo and the normalized endpoint base64-decode what follows whsec_.
    if [ "$provider" = polar ]; then
      key=$(printf '%s' "$secret" | hex)
    else
      key=$(printf '%s' "${secret#whsec_}" | openssl base64 -d -A | hex)
      [ -n "$key" ] || { echo "send-webhook: secret is not whsec_ + base64" >&2; exit 65; }
    fi
    id=${QG_WEBHOOK_ID:-msg_$(openssl dgst -sha256 -r "$file" | cut -c1-27)}
    sig=$({ printf '%s.%s.' "$id" "$t"; cat "$file"; } | hmac "$key" | openssl base64 -A)
    headers+=(-H "webhook-id: $id" -H "webhook-timestamp: $t" -H "webhook-signature: v1,$sig")
    ;;
esac

out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=$(curl -sS -o "$out" -w '%{http_code}' -X POST "$url" \
  -H 'Content-Type: application/json' "${headers[@]}" --data-binary "@$file")
cat "$out"
echo
echo "HTTP $status" >&2
case "$status" in 2??) exit 0 ;; *) exit 1 ;; esac
