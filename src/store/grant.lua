-- grant.lua: add a credit grant to, or void one in, an org's credit hash (see "Credits" in
-- decide.lua). Postgres is written first; this only mirrors the change into Redis.
--
-- KEYS[1]  the org's resident key (see restore.lua)
-- KEYS[2]  the metric's credit hash
-- KEYS[3]  its version key
-- ARGV[1]  "add" or "void"
-- ARGV[2]  the grant's field
-- ARGV[3]  add: its value "<remaining>:<amount>"
--
-- add:  without the resident key the org's data is not (or no longer) in Redis: nothing is
--       written (the next decision restores every grant from Postgres, this one with them, and a
--       version key created here would be older than the flushed one). Returns 1 when added, 0
--       when the field was there already (a repeated request), -1 without the resident key.
-- void: removes the field and returns the units it had left (-1: it was not there).
--
-- The version key is created with the first field and never removed (no expiry): decide.lua
-- reads the hash only when the version key exists, so the two must be written together, here
-- and in restore.lua.

if ARGV[1] == 'add' then
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return -1
  end
  if redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) == 0 then
    return 0
  end
  redis.call('INCR', KEYS[3])
  return 1
end
local v = redis.call('HGET', KEYS[2], ARGV[2])
if not v then
  return -1
end
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('INCR', KEYS[3])
return tonumber(string.sub(v, 1, string.find(v, ':', 1, true) - 1))
