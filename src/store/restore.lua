-- restore.lua: bring back an org's durable counters for one month after Redis lost them.
--
-- The month's marker says the org's counters in Redis are complete. When it is missing,
-- decide.lua looks for the org's resident key, which this script sets and only a loss of Redis
-- data removes: with it, a new month simply begins (decide.lua creates the marker); without it
-- (a Redis restart without persistence, a failover, FLUSHALL, or an org Redis has not seen for a
-- year) decide.lua refuses to touch the counters, and the gateway reads what Postgres holds and
-- runs this script. Every write to a durable counter goes through the marker check, so a missing
-- key here means a lost key: it is set from Postgres; a key that exists is left alone. Two
-- replicas restoring at once are safe: the second one finds the marker and does nothing.
--
-- KEYS[1]                the month's marker
-- KEYS[2]                the org's resident key (lives a year past ARGV[1], as in decide.lua)
-- KEYS[2i+1], KEYS[2i+2] a durable key and its version key
-- ARGV[1]                the marker's absolute expiry (Unix ms)
-- ARGV[...]              per key pair: value, version, expiry (Unix ms; 0 = none, for gauges)
--
-- Returns 1 when it restored, 0 when the marker was already there.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local a = 2
for i = 3, #KEYS, 2 do
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
redis.call('SET', KEYS[1], '1', 'PXAT', tonumber(ARGV[1]))
redis.call('SET', KEYS[2], '1', 'PXAT', tonumber(ARGV[1]) + 31622400000)
return 1
