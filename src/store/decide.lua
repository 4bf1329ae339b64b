-- decide.lua: check and apply every limit of one decision for ONE org, atomically.
--
-- All keys share the org's {hash tag}, so this runs on one Redis Cluster slot. Nothing is read
-- and written in separate round trips: a decision is this one EVALSHA.
--
-- KEYS, in this order:
--   the idempotency key        only when ARGV[3] > 0
--   the month's restore marker only when ARGV[4] > 0 (see restore.lua), and right after it
--                              the org's resident key
--   per limit: its key, and for durable limits (kinds "m" and "g") its version key right after
--
-- ARGV[1]  now, integer microseconds since the Unix epoch (the gateway's clock, so tests can
--          inject it)
-- ARGV[2]  mode: "check"  deny when any blocking limit would be exceeded, else apply all
--                "dry"    the same checks, apply nothing
--                "record" never deny, apply all (post-hoc usage reports, adjustments, replays)
--                "shadow" the same checks, but apply all even when one would deny (shadow
--                         enforcement: count and report, never block)
-- ARGV[3]  idempotency TTL in milliseconds; 0 when there is no idempotency key
-- ARGV[4]  the restore marker's absolute expiry (Unix ms) when the marker must exist; 0: no
--          marker check. A missing marker with the resident key present (a new month, Redis kept
--          its data) is created here and the decision goes on; with both missing nothing is read
--          or written and status 5 asks the gateway to restore the org's durable counters from
--          Postgres first
-- then 5 arguments per limit:
--   kind    "c" counter of one period, "m" the calendar-month meter of a counter (durable),
--           "g" gauge level (durable), "r" GCRA rate
--   amount  integer; negative only in "record" mode (counters and gauges never go below 0)
--   limit   integer > 0, or 0 for a metered-only counter that never denies
--   block   "1" when exceeding the limit denies, "0" for a soft limit (still reported)
--   param   c, m: absolute expiry in Unix milliseconds (end of the period plus a grace)
--           g: unused
--           r: the window in microseconds
-- Durable keys carry a version (incremented on every change) so the flusher can write them to
-- Postgres monotonically: a value read later never loses to one read earlier.
-- then, only when some limit has notification thresholds (otherwise nothing at all), a tail:
--   per such limit: its index i (1-based, in the order above), the count n of its thresholds,
--     then n pairs: percent, trigger (the smallest value at or past that percent of the limit)
--   and last an argument "T<length of the tail before it>", which marks that a tail is there
--   KEYS then end with one "fired" hash per such limit, in the tail's order (field = percent)
--
-- Returns { status, then 3 integers per limit: denied, value, millis }
--   status  0 applied, 1 denied (nothing applied), 2 dry run allowed (nothing applied),
--           3 duplicate idempotency key (nothing applied), 4 applied although it would have
--           been denied (shadow mode), 5 restore needed (nothing applied), 6 a counter or
--           gauge would pass MAX_COUNTER (nothing applied, in every mode; no limits follow)
--   c/m/g   value = the counter or level before this call
--   r       value = units remaining (after, when applied); millis = time until the bucket is
--           full again, or, when denied, until this amount would fit
--   then, for status 0 and 4 only, 2 integers per threshold crossed by this call: the limit's
--   index i and the percent (none when nothing was crossed: the reply is unchanged)
--
-- Rates use GCRA (burst = limit, emission interval T = window / limit). The state is kept as a
-- "debt" D = max(0, TAT - now) in microseconds *scaled by the limit*, plus the time it was
-- written. Scaling makes every step an exact integer in a Lua double: a charge adds
-- amount * window, and it fits when D + amount * window <= window * limit, so a fresh burst admits
-- exactly `limit` units, never one more.

-- MAX_COUNTER is 2^53 - 1, the same as `domain::decision::MAX_COUNTER`: the largest integer a
-- Lua double (and a JSON client) holds exactly. No counter or gauge is taken past it, so INCRBY
-- never overflows Redis's 64-bit integers and every value read back here is exact. Rate debts
-- are capped at a year's wait (MAX_WAIT_US, scaled by the limit) for the same reason: a
-- recorded amount of 2^53 must not make the key's expiry unrepresentable.

-- Cost matters: this runs once per request, inside Redis's single thread. The first pass keeps
-- what the second needs in flat arrays (no table per limit); numbers go back to Redis as the
-- caller's own argument strings where they can, sparing a number-to-string conversion per call.

local MAX_COUNTER = 9007199254740991
local MAX_WAIT_US = 31536000000000
local now = tonumber(ARGV[1])
local mode = ARGV[2]
local idem_ttl = tonumber(ARGV[3])
local k = 1
local idem_key = nil
-- the threshold tail (see above): `tail` is its first argument, `last` the last per-limit one
local last, tail = #ARGV, nil
if string.byte(ARGV[last]) == 84 then
  tail = last - tonumber(string.sub(ARGV[last], 2))
  last = tail - 1
end
if idem_ttl > 0 then
  idem_key = KEYS[k]
  k = k + 1
end
if ARGV[4] ~= '0' then
  if redis.call('EXISTS', KEYS[k]) == 0 then
    -- A new month, or Redis lost the org's data: only the resident key (set by restore.lua,
    -- gone with any loss) tells them apart. While it is there the org's counters are complete
    -- and the new month's start at zero, so Postgres is not needed at a month boundary.
    if redis.call('EXISTS', KEYS[k + 1]) == 0 then
      return { 5 }
    end
    local expiry = tonumber(ARGV[4])
    redis.call('SET', KEYS[k], '1', 'PXAT', expiry)
    -- the same lifetime as in restore.lua: a year past the marker
    redis.call('PEXPIREAT', KEYS[k + 1], expiry + 31622400000)
  end
  k = k + 2
end
if idem_key and not redis.call('SET', idem_key, '1', 'NX', 'PX', ARGV[3]) then
  return { 3 }
end

local record = mode == 'record'
local out = { 0 }
local n = 1
-- per limit i: the index of its key in KEYS, of its first argument in ARGV, and the counter's
-- value before this call (c/m/g) or the rate's debt after it (r)
local key_at, arg_at, state = {}, {}, {}
local denied = false
local overflow = false
local i = 0
for a = 5, last, 5 do
  i = i + 1
  key_at[i] = k
  arg_at[i] = a
  local key = KEYS[k]
  local kind = ARGV[a]
  local amount = tonumber(ARGV[a + 1])
  local limit = tonumber(ARGV[a + 2])
  local block = not record and ARGV[a + 3] == '1'
  local d, value, millis = 0, 0, 0
  if kind == 'r' then
    k = k + 1
    local param = tonumber(ARGV[a + 4])
    local debt, stamp = 0, now
    local raw = redis.call('GET', key)
    if raw then
      local sep = string.find(raw, ':', 1, true)
      if sep then
        debt = tonumber(string.sub(raw, 1, sep - 1)) or 0
        stamp = tonumber(string.sub(raw, sep + 1)) or now
      end
    end
    local elapsed = now - stamp
    if elapsed > 0 then
      if elapsed * limit >= debt then debt = 0 else debt = debt - elapsed * limit end
    end
    local cap = param * limit
    local new_debt = debt + amount * param
    value = math.floor((cap - debt) / param)
    if value < 0 then value = 0 end
    if block and new_debt > cap then
      d = 1
      denied = true
      if amount > limit then
        millis = math.ceil(param / 1000)
      else
        millis = math.ceil((debt - param * (limit - amount)) / limit / 1000)
      end
    else
      millis = math.ceil(debt / limit / 1000)
    end
    if new_debt > limit * MAX_WAIT_US then new_debt = limit * MAX_WAIT_US end
    state[i] = new_debt
  else
    -- durable kinds (m, g) have their version key right after the value key
    if kind == 'c' then k = k + 1 else k = k + 2 end
    local current = tonumber(redis.call('GET', key) or '0')
    if amount > 0 and current + amount > MAX_COUNTER then
      overflow = true
    end
    if block and limit > 0 and amount > 0 and current + amount > limit then
      d = 1
      denied = true
    end
    value = current
    state[i] = current
  end
  out[n + 1] = d
  out[n + 2] = value
  out[n + 3] = millis
  n = n + 3
end

if overflow then
  if idem_key then redis.call('DEL', idem_key) end
  return { 6 }
end
if denied and mode ~= 'shadow' then
  out[1] = 1
  if idem_key then redis.call('DEL', idem_key) end
  return out
end
if mode == 'dry' then
  out[1] = 2
  return out
end

for j = 1, i do
  local key = KEYS[key_at[j]]
  local a = arg_at[j]
  local kind = ARGV[a]
  if kind == 'r' then
    local limit = tonumber(ARGV[a + 2])
    local param = tonumber(ARGV[a + 4])
    local debt = state[j]
    if debt < 0 then debt = 0 end
    local millis = math.ceil(debt / limit / 1000)
    redis.call('SET', key, string.format('%.0f:', debt) .. ARGV[1], 'PX', string.format('%.0f', millis + 1000))
    local o = 1 + (j - 1) * 3
    local left = math.floor((param * limit - debt) / param)
    if left < 0 then left = 0 end
    out[o + 2] = left
    out[o + 3] = millis
  else
    local amount = tonumber(ARGV[a + 1])
    local changed = false
    if amount >= 0 then
      local v = redis.call('INCRBY', key, ARGV[a + 1])
      if kind ~= 'g' and v == amount then
        redis.call('PEXPIREAT', key, ARGV[a + 4])
      end
      changed = amount > 0
    elseif state[j] > 0 then
      local lowered = state[j] + amount
      if lowered < 0 then lowered = 0 end
      redis.call('SET', key, lowered, 'KEEPTTL')
      changed = true
    end
    if changed and kind ~= 'c' then
      local version = KEYS[key_at[j] + 1]
      if redis.call('INCR', version) == 1 and kind == 'm' then
        redis.call('PEXPIREAT', version, ARGV[a + 4])
      end
    end
  end
end
-- Thresholds: a crossing is this call taking a counter or gauge from below a trigger to at or
-- past it. The "fired" hash remembers it for the period (it expires with the counter; a new
-- period has a new key), so a crossing is reported once whatever the concurrency, and a credit
-- that goes back below and a charge that crosses again report nothing. A gauge has no period:
-- its threshold re-arms when the level falls back below the trigger.
if tail then
  local t = tail
  while t < #ARGV do
    local j = tonumber(ARGV[t])
    local count = tonumber(ARGV[t + 1])
    t = t + 2
    local a = arg_at[j]
    local gauge = ARGV[a] == 'g'
    local amount = tonumber(ARGV[a + 1])
    local before = state[j]
    local after = before + amount
    if after < 0 then after = 0 end
    local fired = KEYS[k]
    k = k + 1
    for _ = 1, count do
      local trigger = tonumber(ARGV[t + 1])
      if amount > 0 and before < trigger and after >= trigger then
        if redis.call('HSETNX', fired, ARGV[t], ARGV[1]) == 1 then
          out[#out + 1] = j
          out[#out + 1] = tonumber(ARGV[t])
          if not gauge then redis.call('PEXPIREAT', fired, ARGV[a + 4]) end
        end
      elseif gauge and amount < 0 and after < trigger then
        redis.call('HDEL', fired, ARGV[t])
      end
      t = t + 2
    end
  end
end
if denied then out[1] = 4 end
return out
