-- extend.lua: a held reservation now expires ttl from now.
--
-- KEYS   [1] home record; per partition group j (W = 4): resv record, rexp
--        zset, events stream, backlog gate (unused: finishing is bounded
--        by what is held, so it goes on while the gate is closed) (unused: an extension changes no stock).
-- ARGV   [1] reservation id, [2] fingerprint read from the home record by the
--        caller, [3] ttl in ms, [4] k.
-- Returns {'ok', expires_at_ms}; {'unknown', ''}; {'state', <state>} when the
--         reservation is not held (a held one past its expiry counts as
--         expired: it cannot be revived).
-- Invariants: every record of the reservation and every rexp entry carry the
--         same expiry; no stock, version or event changes.
local W = 4
local home = KEYS[1]

local rec = redis.call('HMGET', home, 'state', 'exp', 'fp')
if not rec[1] or rec[3] ~= FP then
  return { 'unknown', '' }
end
local now = now_ms()
if rec[1] ~= 'held' then
  return { 'state', rec[1] }
end
if now >= tonumber(rec[2]) then
  return { 'state', 'expired' }
end

local exp = now + tonumber(ARGV[3])
redis.call('HSET', home, 'exp', exp)
for j = 1, K do
  redis.call('HSET', group_key(W, j, 1), 'exp', exp)
  redis.call('ZADD', group_key(W, j, 2), exp, ID)
end
return { 'ok', tostring(exp) }
