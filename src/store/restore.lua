-- restore.lua: bring back an org's durable counters for one month after Redis lost them.
--
-- The month's marker says the org's counters in Redis are complete. When it is missing,
-- decide.lua looks for the org's resident key, which this script sets and only a loss of Redis
-- data removes: with it, a new month simply begins (decide.lua creates the marker); without it
-- (a Redis restart without persistence, a failover, FLUSHALL, or an org Redis has not seen for a
-- year) decide.lua refuses to touch the counters, and the gateway reads what Postgres holds and
-- runs this script. Every durable key is created past the marker check (decide.lua reads the
-- marker whenever a durable key of its call is missing, and skips it only when all are there),
-- so a missing key here means a lost key: it is set from Postgres; a key that exists is left
-- alone. Two replicas restoring at once are safe: the second one finds the marker and does
-- nothing. A credit hash comes back with its version key (decide.lua reads a hash only when
-- its version key exists).
--
-- KEYS[1]                the month's marker
-- KEYS[2]                the org's resident key (lives a year past ARGV[1], as in decide.lua)
-- KEYS[2i+1], KEYS[2i+2] a durable key and its version key
-- ARGV[1]                the marker's absolute expiry (Unix ms)
-- ARGV[...]              per key pair: value, version, expiry (Unix ms; 0 = none, for gauges)
-- then, only when the org has live credit grants, a credit tail: KEYS go on with a credit hash
-- and its version key per metric, and ARGV with, per metric: the count n of its grants, n pairs
-- field, value (see "Credits" in decide.lua), then the version; last "K<length of the tail>".
-- Fields are set only where missing, like the counters: a grant added since the loss stays.
--
-- Returns 1 when it restored, 0 when the marker was already there.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local last, ctail = #ARGV, nil
if string.byte(ARGV[last]) == 75 then
  ctail = last - tonumber(string.sub(ARGV[last], 2))
  last = ctail - 1
end
local a = 2
local kk = 3 + 2 * ((last - 1) / 3)
for i = 3, kk - 1, 2 do
  local value = ARGV[a]
  local version = ARGV[a + 1]
  local expiry = tonumber(ARGV[a + 2])
  a = a + 3
  if redis.call('SET', KEYS[i], value, 'NX') and expiry > 0 then
    redis.call('PEXPIREAT', KEYS[i], expiry)
  end
  if redis.call('SET', KEYS[i + 1], version, 'NX') and expiry > 0 then
    redis.call('PEXPIREAT', KEYS[i + 1], expiry)
  end
end
if ctail then
  local t = ctail
  while t < #ARGV do
    local n = tonumber(ARGV[t])
    t = t + 1
    for _ = 1, n do
      redis.call('HSETNX', KEYS[kk], ARGV[t], ARGV[t + 1])
      t = t + 2
    end
    redis.call('SET', KEYS[kk + 1], ARGV[t], 'NX')
    t = t + 1
    kk = kk + 2
  end
end
redis.call('SET', KEYS[1], '1', 'PXAT', tonumber(ARGV[1]))
redis.call('SET', KEYS[2], '1', 'PXAT', tonumber(ARGV[1]) + 31622400000)
return 1
