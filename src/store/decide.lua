-- decide.lua: check and apply every limit of one decision for ONE org, atomically.
--
-- All keys share the org's {hash tag}, so this runs on one Redis Cluster slot. Nothing is read
-- and written in separate round trips: a decision is this one EVALSHA.
--
-- KEYS, in this order:
--   the idempotency key        only when ARGV[3] > 0
--   the month's restore marker only when ARGV[4] > 0 (see restore.lua), and right after it
--                              the org's resident key
--   per limit: its key, and for durable limits (kinds "m", "M" and "g") its version key right
--                              after; for leased kinds ("C", "M", "R") then its lease hash
--                              (a concurrency slot, kind "s": the org's "inflight" set)
--   per credit group (only with a credit section, see "Credits" below): the metric's credit
--                              hash and its version key
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
--          marker check. The marker is read only when a durable key of the call is missing (or
--          the call has none): a durable key is only ever created past this check (or by
--          restore.lua) and goes with any loss of the org's data, so one that is there proves
--          the data complete. A missing marker with the resident key present (a new month, Redis
--          kept its data) is created here and the decision goes on; with both missing nothing is
--          written and status 5 asks the gateway to restore the org's durable counters from
--          Postgres first
-- ARGV[5]  the lease holder (this replica's id), or '' (see "Leases" below)
-- ARGV[6]  the absolute expiry (Unix microseconds) of a lease granted by this call
-- then 5 arguments per limit, 7 for leased kinds:
--   kind    "c" counter of one period, "m" the calendar-month meter of a counter (durable),
--           "g" gauge level (durable), "r" GCRA rate; "C", "M", "R" the same with leases
--   amount  integer; negative only in "record" mode (counters and gauges never go below 0)
--   limit   integer > 0, or 0 for a metered-only counter that never denies
--   block   "1" when exceeding the limit denies, "0" for a soft limit (still reported), "h"
--           (counters and gauges, amount 0) when the limit must have room left: see
--           "Headroom" below
--   param   c, m: absolute expiry in Unix milliseconds (end of the period plus a grace)
--           g: unused
--           r: the window in microseconds
--   consumed  leased kinds: units this holder admitted from its lease since it last settled;
--             they are added to the counter (rates: to the debt), and the holder's lease on the
--             limit is released. -1: settle nothing and keep the holder's lease
--   want      leased kinds: the largest block to grant the holder (0: none); -1: a checkpoint,
--             which settles `consumed` and keeps the rest of the holder's lease (no new block)
-- Versions. Durable keys carry a version key so the flusher can write them to Postgres
-- monotonically: a value read later never loses to one read earlier. It moves only when the
-- value goes down (a refund, a lowered gauge); between two such moves the value only grows. So
-- (version, value), compared in that order, grows with every change, and that pair is what
-- Postgres keeps the newest of (`db::usage`), for one INCR fewer per charge. The version key
-- may be missing (never lowered): it reads as 0.
-- then, only when the call takes a concurrency slot, one more limit (always the last one, so the
-- others keep their indices), 6 arguments:
--   "s", 1, limit (requests in flight allowed), block ("1"; "0" only in "record" mode),
--   the slot's expiry (Unix ms), the slot's id (never starting with "T")
--   and its key (the org's "inflight" sorted set) last among the per-limit KEYS
-- then, only when some limit has notification thresholds (otherwise nothing at all), a tail:
--   per such limit: its index i (1-based, in the order above), the count n of its thresholds,
--     then n pairs: percent, trigger (the smallest value at or past that percent of the limit)
--   and last an argument "T<length of the tail before it>", which marks that a tail is there
--   KEYS then end with one "fired" hash per such limit, in the tail's order (field = percent)
-- before that tail (last when there is none), only when some counter metric is charged, a
-- credit section:
--   per credit group (one per counter metric of the call): the index m of the metric's first
--     limit (its amount is the group's), the count q of its hard quotas, then their q indices
--   and last an argument "K<length of the section before it>"
--
-- Returns { status, then 3 integers per limit: denied, value, millis, then 3 per leased limit
-- (in the order of the limits): granted, swept, reserved }
--   status  0 applied, 1 denied (nothing applied), 2 dry run allowed (nothing applied),
--           3 duplicate idempotency key (nothing applied), 4 applied although it would have
--           been denied (shadow mode), 5 restore needed (nothing applied), 6 a counter or
--           gauge would pass MAX_COUNTER (nothing applied, in every mode; no limits follow)
--   c/m/g   value = the counter or level before this call
--   s       value = slots held before this call (expired ones swept); millis = slots swept
--   r       value = units remaining (after, when applied); millis = time until the bucket is
--           full again, or, when denied, until this amount would fit
--   granted the block leased to the holder by this call (0 when denied or near the limit)
--   swept   units of other holders' leases found expired and returned
--   reserved  units other holders' live leases reserve (counted in a counter's value above)
--   then, after the lease values, 3 integers per notification threshold this call crossed:
--   the limit's index i, the percent, and the counter or level after the call (none when
--   nothing was crossed: the reply is as it would be without thresholds). Units a lease call
--   settles count towards a crossing whatever the status (see "Leases")
--   Between the lease values and the crossings, only with a credit section, 2 integers per
--   credit group: drawn (units taken from grants by this call, negative when given back; 0
--   unless applied), and the unexpired units left in the metric's grants after the call (-1:
--   the org has no grant of the metric at all)
--
-- Credits. A group's hash holds the org's grants of one metric: field
-- "<priority, 5 digits>:<expiry, Unix ms, 15 digits>:<grant id>" -> "<remaining>:<amount>", so
-- the plain string order of the fields is the spending order (lowest priority first, then the
-- earliest expiry; no expiry is 999999999999999). A charge that would pass hard quotas needs
-- `need` = the most any of them would be passed by (at most the amount: the same units are
-- above every quota they pass, and are paid once). When the unexpired grants hold `need`, those
-- quotas do not deny and, if the call applies, `need` is drawn from the grants in order. When
-- they do not, the quotas deny as without credits ("record" draws what there is; "shadow"
-- applies without drawing). A negative amount ("record": refunds, credits) gives back the units
-- it takes from above the quotas (at most what the grants spent), latest in the order first.
-- The version key moves with every change, for the flusher (see `db::credits`). While the org
-- has grants of a metric (the hash is not empty), its hard quotas grant no lease blocks: blocks
-- other replicas hold count as used, so credits drawn while they exist could pay for units the
-- blocks return unused; without blocks every decision of the metric is exact. The hash is
-- read only when its version key exists (the MGET that reads the limits says): grant.lua and
-- restore.lua create both at once and nothing removes a version key, so an org that never had
-- a grant of the metric (almost all) costs no HGETALL, and a grant made through any replica is
-- seen by the very next decision.
--
-- Leases. A replica may reserve a block of a limit and admit from it without Redis. A lease is a
-- field of the limit's lease hash: holder -> "units:expiry_us". Reserved units count against the
-- limit (counters: used + reserved + amount <= limit; rates: they sit in the bucket undecayed
-- until settled), so no interleaving of replicas admits past a hard limit. What a holder
-- consumed reaches the counter when it settles, which also releases its lease; a lease that
-- expires unsettled (its replica died) is swept here and its units return to the limit. The
-- block granted shrinks with the headroom: half of what is left, shared among the holders, so
-- near the limit there is no block and every decision is exact.
--
-- Checkpoints. A holder may settle what it consumed without giving its block back (want -1):
-- the units go to the counter (or the rate's debt) and the holder's lease shrinks by as many,
-- keeping its expiry. A replica that dies between checkpoints loses only what it admitted since
-- the last one, and no more than that can pass the limit when its lease is swept.
--
-- Settlement happens before the checks and stays applied whatever the status (except 3 and 5,
-- which return before it): it records units already admitted.
--
-- Headroom. A request whose cost is only known after the response (the proxy records it from a
-- response header, a trailer or the stream) charges such a metric nothing up front, yet must not
-- start once the metric's hard quota is used up: its limit comes with amount 0 and block "h", and
-- denies when used + reserved >= limit (in "check", "dry" and "shadow" modes, like a charge that
-- does not fit). It is never leased and never charges anything.

-- Concurrency (kind "s"). An org's requests in flight are the members of one sorted set, each
-- a slot id scored by its expiry (Unix ms). A call first sweeps the members whose expiry has
-- passed (their replica died, or stopped renewing them: see `slots.rs`), then counts the rest;
-- with `limit` of them held the call is denied like any other limit, all or nothing. Applied,
-- the slot is added and the set expires with its latest member, so an idle org leaves nothing.
-- The holder releases its slot with ZREM when the response ends, outside this script.

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

-- Cost matters: this runs once per request, inside Redis's single thread, and most of its cost
-- is Lua work, not Redis commands: `tonumber` (libc's strtod), `string.format("%.0f")`, table
-- allocations (and the garbage collection they bring) each cost about as much as a GET. So: one
-- MGET reads every value the call needs (limits, and whether the org has credits) before
-- anything is written; each argument is parsed once, into flat arrays made at their usual size
-- (no table per limit); numbers go back to Redis as the caller's own argument strings where they
-- can, and as "%d" (exact below 2^53) where they cannot. Measured by
-- `benches/decide_cost.sh` (see README, "Performance").

local MAX_COUNTER = 9007199254740991
local MAX_WAIT_US = 31536000000000
local now = tonumber(ARGV[1])
local mode = ARGV[2]
local k = 1
local idem_key = nil
-- the threshold tail (see above): `tail` is its first argument, `last` the last per-limit one
local last, tail = #ARGV, nil
if string.byte(ARGV[last]) == 84 then
  tail = last - tonumber(string.sub(ARGV[last], 2))
  last = tail - 1
end
-- the credit section (see above): `credits` is its first argument, `cend` its marker
local credits, cend = nil, nil
if string.byte(ARGV[last]) == 75 then
  cend = last
  last = last - 1
end
local mk = nil
if ARGV[3] ~= '0' then
  idem_key = KEYS[k]
  k = k + 1
end
if ARGV[4] ~= '0' then
  mk = k
  k = k + 2
end

local record = mode == 'record'
local holder = ARGV[5]
local out = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 }
local n = 1
-- Per limit i, `pos` holds the index of its key in KEYS (2i - 1) and of its first argument in
-- ARGV (2i); `num` its amount (4i - 3), limit (4i - 2), window (rates, 4i - 1), parsed once
-- (`tonumber` is one of the script's dearest steps), and the counter's value before this call
-- (c/m/g) or the rate's debt after it (r) at 4i. For leased limits, in `leased`, the units
-- other holders reserve, how many they are, and the units swept (tables made only in a call
-- with leases). Tables are made at their usual size: growing one by one reallocates.
local pos = { 0, 0, 0, 0, 0, 0 }
local num = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 }
local lease_at, others, holders, swept, leased = nil, nil, nil, nil, nil
local denied = false
local overflow = false

-- No local functions: each would be a closure allocated on every call. A rate's state is its
-- debt and when it was written, expiring when the bucket is full again; the version key of a
-- durable counter moves when its value goes down (see "Versions" above).

-- Reads first, in one MGET: the value of every limit (a slot, always last, has none), then the
-- version key of each credit group's hash. Nothing is written before the restore check below.
local i = 0
local a = 7
local reads = { false, false, false, false }
local nreads = 0
-- the first durable limit (kinds m, M, g; 0: none) and how many the call has
local durable, ndurable = 0, 0
while a <= last do
  local kind = ARGV[a]
  -- arguments and keys of the limit
  local step, keys = 5, 1
  if kind == 's' then
    step = 6
  elseif kind == 'c' or kind == 'r' then
    keys = 1
  elseif kind == 'm' or kind == 'g' then
    keys = 2
  elseif kind == 'C' or kind == 'R' then
    step, keys = 7, 2
  elseif kind == 'M' then
    step, keys = 7, 3
  else
    -- a number: the first argument of the credit section
    break
  end
  i = i + 1
  pos[2 * i - 1] = k
  pos[2 * i] = a
  if kind ~= 's' then
    nreads = i
    reads[i] = KEYS[k]
    if kind == 'm' or kind == 'M' or kind == 'g' then
      if durable == 0 then durable = i end
      ndurable = ndurable + 1
    end
  end
  if step == 7 then
    -- leased kinds: the lease hash is the limit's last key
    if not holders then lease_at, others, holders, swept, leased = {}, {}, {}, {}, {} end
    lease_at[i] = k + keys - 1
  end
  k = k + keys
  a = a + step
end
local groups = 0
if cend then
  credits = a
  if tail then
    local c = credits
    while c < cend do
      groups = groups + 1
      c = c + 2 + tonumber(ARGV[c + 1])
    end
  else
    -- without a tail, KEYS end with the groups' two keys each
    groups = (#KEYS - k + 1) / 2
  end
  for g = 1, groups do
    reads[nreads + g] = KEYS[k + 2 * g - 1]
  end
end
local vals = nil
if nreads + groups > 0 then vals = redis.call('MGET', unpack(reads, 1, nreads + groups)) end

if mk then
  -- Restore check. A durable key (kinds m, M, g) is only ever created after this check passed
  -- (or by restore.lua), and a loss of Redis data takes it with the rest of the org's data: so
  -- when the call has durable keys and all of them are there, the org's data is complete and
  -- the month's marker need not be read. Only a missing one (a new month, a first charge, or
  -- a loss) needs the marker, and, when it is missing too, the resident key.
  local complete = durable > 0 and vals[durable]
  if complete and ndurable > 1 then
    for j = durable + 1, nreads do
      local kind = ARGV[pos[2 * j]]
      if (kind == 'm' or kind == 'M' or kind == 'g') and not vals[j] then complete = false end
    end
  end
  if not complete and redis.call('EXISTS', KEYS[mk]) == 0 then
    -- A new month, or Redis lost the org's data: only the resident key (set by restore.lua,
    -- gone with any loss) tells them apart. While it is there the org's counters are complete
    -- and the new month's start at zero, so Postgres is not needed at a month boundary.
    if redis.call('EXISTS', KEYS[mk + 1]) == 0 then
      return { 5 }
    end
    local expiry = tonumber(ARGV[4])
    redis.call('SET', KEYS[mk], '1', 'PXAT', expiry)
    -- the same lifetime as in restore.lua: a year past the marker
    redis.call('PEXPIREAT', KEYS[mk + 1], expiry + 31622400000)
  end
end
if idem_key and not redis.call('SET', idem_key, '1', 'NX', 'PX', ARGV[3]) then
  return { 3 }
end

local count = i
for i = 1, count do
  local key = KEYS[pos[2 * i - 1]]
  local a = pos[2 * i]
  local kind = ARGV[a]
  -- most charges are of one unit: comparing interned strings costs nothing, `tonumber` does
  local amount = 1
  if ARGV[a + 1] ~= '1' then amount = tonumber(ARGV[a + 1]) end
  local limit = tonumber(ARGV[a + 2])
  num[4 * i - 3] = amount
  num[4 * i - 2] = limit
  local block = not record and ARGV[a + 3] == '1'
  local consumed, reserved = 0, 0
  local d, value, millis = 0, 0, 0
  if kind == 'C' or kind == 'M' or kind == 'R' then
    kind = string.lower(kind)
    consumed = tonumber(ARGV[a + 5])
    local hkey = KEYS[lease_at[i]]
    local h, sw = 0, 0
    local fields = redis.call('HGETALL', hkey)
    for f = 1, #fields, 2 do
      local v = fields[f + 1]
      local sep = string.find(v, ':', 1, true)
      local units = tonumber(string.sub(v, 1, sep - 1))
      if fields[f] == holder and consumed >= 0 then
        -- want -1: a checkpoint. The consumed units leave the block for the counter and the
        -- rest of the block stays this holder's, so a replica that dies later loses only what
        -- it admitted since (see "Checkpoints" above).
        local left = units - consumed
        if ARGV[a + 6] == '-1' and left > 0 then
          redis.call('HSET', hkey, holder, left .. string.sub(v, sep))
          reserved = reserved + left
          h = h + 1
        else
          redis.call('HDEL', hkey, holder)
        end
      elseif tonumber(string.sub(v, sep + 1)) <= now then
        sw = sw + units
        redis.call('HDEL', hkey, fields[f])
      else
        reserved = reserved + units
        h = h + 1
      end
    end
    others[i], holders[i], swept[i] = reserved, h, sw
    leased[#leased + 1] = i
  end
  if kind == 's' then
    -- Concurrency slot: sweep the expired, count the live (see "Concurrency" above).
    millis = redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.0f', math.floor(now / 1000)))
    value = redis.call('ZCARD', key)
    if block and value + 1 > limit then
      d = 1
      denied = true
    end
    num[4 * i] = value
  elseif kind == 'r' then
    local param = tonumber(ARGV[a + 4])
    num[4 * i - 1] = param
    local debt, stamp = 0, now
    local raw = vals[i]
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
    if consumed > 0 then
      -- settled tokens enter the bucket now, and decay from now on
      debt = debt + consumed * param
      if debt > limit * MAX_WAIT_US then debt = limit * MAX_WAIT_US end
      redis.call('SET', key, string.format('%.0f:', debt) .. ARGV[1], 'PX',
        string.format('%.0f', math.ceil(debt / limit / 1000) + 1000))
    end
    local cap = param * limit
    local held = reserved * param
    local new_debt = debt + amount * param
    value = math.floor((cap - debt - held) / param)
    if value < 0 then value = 0 end
    if block and new_debt + held > cap then
      d = 1
      denied = true
      if amount > limit then
        millis = math.ceil(param / 1000)
      else
        millis = math.ceil((debt + held - param * (limit - amount)) / limit / 1000)
      end
    else
      millis = math.ceil(debt / limit / 1000)
    end
    if new_debt > limit * MAX_WAIT_US then new_debt = limit * MAX_WAIT_US end
    num[4 * i] = new_debt
  else
    -- durable kinds (m, g) have their version key right after the value key
    local current = tonumber(vals[i] or '0')
    if consumed > 0 then
      current = redis.call('INCRBY', key, consumed)
      if current == consumed then redis.call('PEXPIREAT', key, ARGV[a + 4]) end
    end
    if amount > 0 and current + amount > MAX_COUNTER then
      overflow = true
    end
    if block and limit > 0 and amount > 0 and current + reserved + amount > limit then
      d = 1
      denied = true
    end
    -- Headroom (see above): no room left at all denies a charge of nothing.
    if not record and limit > 0 and ARGV[a + 3] == 'h' and current + reserved >= limit then
      d = 1
      denied = true
    end
    value = current + reserved
    num[4 * i] = current
  end
  out[n + 1] = d
  out[n + 2] = value
  out[n + 3] = millis
  n = n + 3
end
-- `out` was made with 10 slots: clear those no limit used, so that `#out` is `n`
for x = n + 1, 10 do
  out[x] = nil
end

-- Credits (only with a credit section; see "Credits" above). Per group, `cdata` keeps five
-- values: the index of its hash in KEYS, the units to draw (negative: to give back), the
-- unexpired units left before the call, and (false when the hash is empty) the sorted field
-- names of the unexpired grants and a table name -> value.
local cdata, nolease = nil, nil
-- credit groups of a call whose org has no grant of any metric it charges: 0, -1 each
local bare = 0
if credits then
  for g = 1, groups do
    if vals[nreads + g] then cdata = {} end
  end
  -- the threshold tail's keys follow the credit groups' two each
  if not cdata then
    bare = groups
    k = k + 2 * groups
  end
end
if cdata then
  local c, g, seen = credits, 0, false
  while c < cend do
    g = g + 1
    local q = tonumber(ARGV[c + 1])
    local draw, avail, names, gvals = 0, 0, false, false
    -- A hash that was never written has no version key either (grant.lua and restore.lua
    -- write both at once, and nothing takes the version key away), so the MGET above already
    -- told whether the org has any grant of the metric: most have none, and pay no HGETALL
    -- (without grants nothing is drawn and no quota is overridden).
    if vals[nreads + g] then
      seen = true
      local m = tonumber(ARGV[c])
      local amount = num[4 * m - 3]
      local size = amount
      if size < 0 then size = -size end
      local need = 0
      for x = c + 2, c + 1 + q do
        local j = tonumber(ARGV[x])
        local over = num[4 * j] - num[4 * j - 2]
        if amount > 0 then over = over + (others and others[j] or 0) + amount end
        if over > size then over = size end
        if over > need then need = over end
      end
      local fields = redis.call('HGETALL', KEYS[k])
      local horizon = math.floor(now / 1000)
      local spent = 0
      if #fields > 0 then
        -- true: the org has grants of the metric; the sorted names of the unexpired ones
        -- (and `gvals`, name -> value) are made below only when the call draws or gives back
        names = true
        for f = 1, #fields, 2 do
          if tonumber(string.sub(fields[f], 7, 21)) > horizon then
            local v = fields[f + 1]
            local sep = string.find(v, ':', 1, true)
            local rem = tonumber(string.sub(v, 1, sep - 1))
            avail = avail + rem
            spent = spent + tonumber(string.sub(v, sep + 1)) - rem
          end
        end
        -- An org with grants of the metric gets no new blocks of its hard quotas: every
        -- decision is exact, so no credit is drawn for units another replica's block reserves
        -- and then returns unused (see "Leases").
        if leased then
          nolease = nolease or {}
          for x = c + 2, c + 1 + q do
            nolease[tonumber(ARGV[x])] = true
          end
        end
      end
      if amount > 0 and need > 0 then
        if need <= avail then
          draw = need
          -- the grants cover what passes the quotas: they do not deny
          for x = c + 2, c + 1 + q do
            out[2 + 3 * (tonumber(ARGV[x]) - 1)] = 0
          end
        elseif record then
          draw = avail
        end
      elseif amount < 0 and need > 0 then
        if need > spent then need = spent end
        draw = -need
      elseif amount == 0 and avail > 0 then
        -- Headroom (block "h", amount 0): unexpired grants are room left, so a used-up quota
        -- does not deny; the charge made after the response draws from them.
        for x = c + 2, c + 1 + q do
          out[2 + 3 * (tonumber(ARGV[x]) - 1)] = 0
        end
      end
      if draw ~= 0 then
        names, gvals = {}, {}
        for f = 1, #fields, 2 do
          local name = fields[f]
          if tonumber(string.sub(name, 7, 21)) > horizon then
            names[#names + 1] = name
            gvals[name] = fields[f + 1]
          end
        end
        table.sort(names)
      end
    end
    cdata[#cdata + 1] = k
    cdata[#cdata + 1] = draw
    cdata[#cdata + 1] = avail
    cdata[#cdata + 1] = names
    cdata[#cdata + 1] = gvals
    k = k + 2
    c = c + 2 + q
  end
  if seen then
    denied = false
    for j = 1, i do
      if out[2 + 3 * (j - 1)] == 1 then denied = true end
    end
  end
end

if overflow then
  if idem_key then redis.call('DEL', idem_key) end
  return { 6 }
end
local apply = true
if denied and mode ~= 'shadow' then
  out[1] = 1
  if idem_key then redis.call('DEL', idem_key) end
  apply = false
elseif mode == 'dry' then
  out[1] = 2
  apply = false
end

if apply then
  for j = 1, i do
    local key = KEYS[pos[2 * j - 1]]
    local b = pos[2 * j]
    local kind = ARGV[b]
    if kind == 's' then
      -- take the slot; the set lives as long as its latest slot
      redis.call('ZADD', key, ARGV[b + 4], ARGV[b + 5])
      local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
      redis.call('PEXPIREAT', key, top[2])
    elseif kind == 'r' or kind == 'R' then
      local limit = num[4 * j - 2]
      local param = num[4 * j - 1]
      local debt = num[4 * j]
      if debt < 0 then debt = 0 end
      local millis = math.ceil(debt / limit / 1000)
      -- "%d" is exact below 2^53 and far cheaper than "%.0f"; millis stays below 2^35
      local fmt = '%d:%s'
      if debt > MAX_COUNTER then fmt = '%.0f:%s' end
      redis.call('SET', key, string.format(fmt, debt, ARGV[1]), 'PX', string.format('%d', millis + 1000))
      local o = 1 + (j - 1) * 3
      local left = math.floor((param * limit - debt) / param) - (others and others[j] or 0)
      if left < 0 then left = 0 end
      out[o + 2] = left
      out[o + 3] = millis
    else
      local amount = num[4 * j - 3]
      if amount >= 0 then
        local v = redis.call('INCRBY', key, ARGV[b + 1])
        if kind ~= 'g' and v == amount then
          redis.call('PEXPIREAT', key, ARGV[b + 4])
        end
      elseif num[4 * j] > 0 then
        local lowered = num[4 * j] + amount
        if lowered < 0 then lowered = 0 end
        redis.call('SET', key, lowered, 'KEEPTTL')
        -- Only a durable value that goes down moves its version (see "Versions" above).
        if kind ~= 'c' and kind ~= 'C' then
          local version = KEYS[pos[2 * j - 1] + 1]
          if redis.call('INCR', version) == 1 and kind ~= 'g' then
            redis.call('PEXPIREAT', version, ARGV[b + 4])
          end
        end
      end
    end
  end
  if denied then out[1] = 4 end
  -- Draw from (or give back to) the grants, in their order (backwards to give back).
  if cdata then
    for g = 1, #cdata, 5 do
      local draw = cdata[g + 1]
      if draw ~= 0 then
        local names, gvals, hkey = cdata[g + 3], cdata[g + 4], KEYS[cdata[g]]
        local left, from, to, step = draw, 1, #names, 1
        if draw < 0 then left, from, to, step = -draw, #names, 1, -1 end
        for x = from, to, step do
          if left == 0 then break end
          local v = gvals[names[x]]
          local sep = string.find(v, ':', 1, true)
          local rem = tonumber(string.sub(v, 1, sep - 1))
          local amt = string.sub(v, sep + 1)
          local t = rem
          if draw < 0 then t = tonumber(amt) - rem end
          if t > left then t = left end
          if t > 0 then
            if draw < 0 then rem = rem + t else rem = rem - t end
            redis.call('HSET', hkey, names[x], string.format('%.0f:', rem) .. amt)
            left = left - t
          end
        end
        redis.call('INCR', KEYS[cdata[g] + 1])
      end
    end
  end
end

-- The lease part of the reply: per leased limit, the block granted (only by an applied check),
-- the units swept and the units others reserve.
if leased then
  for _, j in ipairs(leased) do
    local granted = 0
    local b = pos[2 * j]
    local want = tonumber(ARGV[b + 6])
    local limit = num[4 * j - 2]
    if apply and mode == 'check' and want > 0 and limit > 0 and ARGV[b + 3] == '1'
      and not (nolease and nolease[j]) then
      local avail
      if ARGV[b] == 'R' then
        local param = tonumber(ARGV[b + 4])
        avail = math.floor((param * limit - num[4 * j]) / param) - others[j]
      else
        avail = limit - num[4 * j] - num[4 * j - 3] - others[j]
      end
      granted = math.floor(avail / (2 * (holders[j] + 1)))
      if granted > want then granted = want end
      if granted > 0 then
        local hkey = KEYS[lease_at[j]]
        redis.call('HSET', hkey, holder, granted .. ':' .. ARGV[6])
        -- A counter's hash lives as long as the counter, so a dead holder's lease stays until a
        -- decision sweeps (and counts) it; a rate's only as long as the lease.
        if ARGV[b] == 'R' then
          redis.call('PEXPIREAT', hkey, math.floor(tonumber(ARGV[6]) / 1000) + 1)
        else
          redis.call('PEXPIREAT', hkey, ARGV[b + 4])
        end
      else
        granted = 0
      end
    end
    out[#out + 1] = granted
    out[#out + 1] = swept[j]
    out[#out + 1] = others[j]
  end
end

-- The credit part of the reply: per group, what was drawn and what is left.
for _ = 1, bare do
  out[#out + 1] = 0
  out[#out + 1] = -1
end
if cdata then
  for g = 1, #cdata, 5 do
    local draw = 0
    if apply then draw = cdata[g + 1] end
    out[#out + 1] = draw
    if cdata[g + 3] then
      out[#out + 1] = cdata[g + 2] - draw
    else
      out[#out + 1] = -1
    end
  end
end

-- Thresholds (only with a tail): a crossing is this call taking a counter or gauge from below a
-- trigger to at or past it (with leases, the units a holder settles count as part of the call).
-- The "fired" hash remembers it for the period (it expires with the counter; a new period has a
-- new key), so a crossing is reported once whatever the concurrency, and a credit that goes back
-- below and a charge that crosses again report nothing. A gauge has no period: its threshold
-- re-arms when the level falls back below the trigger. Appended after the lease values.
if tail then
  local t = tail
  while t < #ARGV do
    local j = tonumber(ARGV[t])
    local count = tonumber(ARGV[t + 1])
    t = t + 2
    local b = pos[2 * j]
    local gauge = ARGV[b] == 'g'
    local amount = 0
    if apply then amount = num[4 * j - 3] end
    local after = num[4 * j] + amount
    if after < 0 then after = 0 end
    local before = num[4 * j]
    if ARGV[b] == 'C' or ARGV[b] == 'M' then
      local consumed = tonumber(ARGV[b + 5])
      if consumed > 0 then before = before - consumed end
    end
    local fired = KEYS[k]
    k = k + 1
    for _ = 1, count do
      local trigger = tonumber(ARGV[t + 1])
      if after > before and before < trigger and after >= trigger then
        if redis.call('HSETNX', fired, ARGV[t], ARGV[1]) == 1 then
          out[#out + 1] = j
          out[#out + 1] = tonumber(ARGV[t])
          out[#out + 1] = after
          if not gauge then redis.call('PEXPIREAT', fired, ARGV[b + 4]) end
        end
      elseif gauge and amount < 0 and after < trigger then
        redis.call('HDEL', fired, ARGV[t])
      end
      t = t + 2
    end
  end
end
return out
