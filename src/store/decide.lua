-- decide.lua: check and apply every limit of one decision for ONE org, atomically.
--
-- All keys share the org's {hash tag}, so this runs on one Redis Cluster slot. Nothing is read
-- and written in separate round trips: a decision is this one EVALSHA.
--
-- KEYS[1]      the idempotency key, present only when ARGV[3] > 0
-- KEYS[...]    one key per limit, in the order of the limit arguments below
--
-- ARGV[1]  now, integer microseconds since the Unix epoch (the gateway's clock, so tests can
--          inject it)
-- ARGV[2]  mode: "check"  deny when any blocking limit would be exceeded, else apply all
--                "dry"    the same checks, apply nothing
--                "record" never deny, apply all (post-hoc usage reports, adjustments)
--                "shadow" the same checks, but apply all even when one would deny (shadow
--                         enforcement: count and report, never block)
-- ARGV[3]  idempotency TTL in milliseconds; 0 when there is no idempotency key
-- then 5 arguments per limit:
--   kind    "c" counter of one period, "g" gauge level, "r" GCRA rate
--   amount  integer; negative only in "record" mode (counters and gauges never go below 0)
--   limit   integer > 0, or 0 for a metered-only counter that never denies
--   block   "1" when exceeding the limit denies, "0" for a soft limit (still reported)
--   param   c: absolute expiry in Unix milliseconds (end of the period plus a grace)
--           g: unused
--           r: the window in microseconds
--
-- Returns { status, then 3 integers per limit: denied, value, millis }
--   status  0 applied, 1 denied (nothing applied), 2 dry run allowed (nothing applied),
--           3 duplicate idempotency key (nothing applied), 4 applied although it would have
--           been denied (shadow mode)
--   c / g   value = the counter or level before this call
--   r       value = units remaining (after, when applied); millis = time until the bucket is
--           full again, or, when denied, until this amount would fit
--
-- Rates use GCRA (burst = limit, emission interval T = window / limit). The state is kept as a
-- "debt" D = max(0, TAT - now) in microseconds *scaled by the limit*, plus the time it was
-- written. Scaling makes every step an exact integer in a Lua double: a charge adds
-- amount * window, and it fits when D + amount * window <= window * limit, so a fresh burst admits
-- exactly `limit` units, never one more.

local now = tonumber(ARGV[1])
local mode = ARGV[2]
local idem_ttl = tonumber(ARGV[3])
local first = 1
if idem_ttl > 0 then
  first = 2
  if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', idem_ttl) then
    return { 3 }
  end
end

local n = #KEYS - first + 1
local out = { 0 }
local plan = {}
local denied = false

for i = 0, n - 1 do
  local key = KEYS[first + i]
  local a = 4 + i * 5
  local kind = ARGV[a]
  local amount = tonumber(ARGV[a + 1])
  local limit = tonumber(ARGV[a + 2])
  local block = ARGV[a + 3] == '1' and mode ~= 'record'
  local param = tonumber(ARGV[a + 4])
  local d, value, millis = 0, 0, 0
  local step = { kind = kind, key = key, amount = amount, param = param }

  if kind == 'r' then
    local debt, stamp = 0, now
    local raw = redis.call('GET', key)
    if raw then
      local ds, ss = string.match(raw, '^([^:]+):(.+)$')
      debt, stamp = tonumber(ds) or 0, tonumber(ss) or now
    end
    local elapsed = now - stamp
    if elapsed > 0 then
      if elapsed * limit >= debt then debt = 0 else debt = debt - elapsed * limit end
    end
    local cap = param * limit
    local new_debt = debt + amount * param
    if block and new_debt > cap then
      d = 1
      denied = true
      value = math.max(0, math.floor((cap - debt) / param))
      if amount > limit then
        millis = math.ceil(param / 1000)
      else
        millis = math.ceil((debt - param * (limit - amount)) / limit / 1000)
      end
    else
      value = math.max(0, math.floor((cap - debt) / param))
      millis = math.ceil(debt / limit / 1000)
    end
    step.debt = debt
    step.new_debt = new_debt
    step.limit = limit
    step.cap = cap
  else
    local current = tonumber(redis.call('GET', key) or '0')
    if block and limit > 0 and amount > 0 and current + amount > limit then
      d = 1
      denied = true
    end
    value = current
    step.current = current
  end

  plan[i + 1] = step
  out[#out + 1] = d
  out[#out + 1] = value
  out[#out + 1] = millis
end

if denied and mode ~= 'shadow' then
  out[1] = 1
  if first == 2 then redis.call('DEL', KEYS[1]) end
  return out
end
if mode == 'dry' then
  out[1] = 2
  return out
end

for i = 1, n do
  local s = plan[i]
  if s.kind == 'r' then
    local debt = math.max(0, s.new_debt)
    redis.call('SET', s.key, string.format('%.0f:%.0f', debt, now), 'PX',
      math.ceil(debt / s.limit / 1000) + 1000)
    local o = 1 + (i - 1) * 3
    out[o + 2] = math.max(0, math.floor((s.cap - debt) / s.param))
    out[o + 3] = math.ceil(debt / s.limit / 1000)
  elseif s.amount >= 0 then
    local v = redis.call('INCRBY', s.key, s.amount)
    if s.kind == 'c' and v == s.amount then
      redis.call('PEXPIREAT', s.key, s.param)
    end
  elseif s.current > 0 then
    redis.call('SET', s.key, math.max(0, s.current + s.amount), 'KEEPTTL')
  end
end
if denied then out[1] = 4 end
return out
