-- reservation.lua: end a reservation exactly once (see store/reservations.rs).
--
-- KEYS[1]  the reservation's record, a hash in the org's {hash tag}: `charges` (JSON of the
--          reserved amounts), `expires` (Unix ms), and once ended `ending` (JSON, how it ended);
--          `done` once the ending's differences are in the counters
-- ARGV[1]  now, Unix ms
-- ARGV[2]  the ending this call asks for (JSON), or '' to end it only if it has expired
-- ARGV[3]  the ending of an expired reservation (JSON)
--
-- Returns { status, charges, ending, done } (always four; '' where there is nothing)
--   status  0 no such reservation (never was, or forgotten)
--           1 this call ended it with ARGV[2]
--           2 it had ended before (ending = how)
--           3 it had expired: this call ended it with ARGV[3]
--           4 still open and not expired, and ARGV[2] was '' (nothing done)
-- Whoever gets status 1 or 3 applies the ending; a caller that finds it ended but not done
-- applies it again, which the idempotency keys of that step make harmless.
local r = redis.call('HMGET', KEYS[1], 'charges', 'expires', 'ending', 'done')
if not r[1] then
  return { 0, '', '', '' }
end
local done = r[4] or ''
if r[3] then
  return { 2, r[1], r[3], done }
end
if tonumber(r[2]) <= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'ending', ARGV[3])
  return { 3, r[1], ARGV[3], done }
end
if ARGV[2] == '' then
  return { 4, r[1], '', done }
end
redis.call('HSET', KEYS[1], 'ending', ARGV[2])
return { 1, r[1], ARGV[2], done }
