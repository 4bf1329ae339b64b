-- wrk script: optional POST body from env, and one machine-readable summary line at the end.
local body = os.getenv("QG_BODY")
local auth = os.getenv("QG_AUTH")
if body and body ~= "" then
  wrk.method = "POST"
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
end
if auth and auth ~= "" then
  wrk.headers["Authorization"] = auth
end

-- Soak mode paces each connection (milliseconds between its requests).
local pace = tonumber(os.getenv("QG_DELAY_MS") or "0")
function delay()
  return pace
end

function done(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format("QG_RESULT requests=%d seconds=%.3f errors=%d p50=%d p99=%d p999=%d\n",
    summary.requests, summary.duration / 1e6, errors,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
