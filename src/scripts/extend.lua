-- extend.lua: a held reservation now expires ttl from now.
--
-- KEYS   the layout of layout.lua (with flag L: the locator, whose life
--        follows the hold); W = 4 keys per group: the partition's record,
--        rexp zset, events stream, marker.
-- ARGV   the layout; [2] the fingerprint the caller knows the reservation
--        by, [6] ttl in ms, [7] idempotency window in ms; lines are every
--        line of the reservation.
-- Returns {'ok', expires_at_ms}; {'unknown'}; {'state', <state>} when the
--         reservation is not held (a held one past its expiry counts as
--         expired: it cannot be revived); {'lost' | 'healing' | 'rollback', key}.
-- Invariants: every record of the reservation and every rexp entry carry the
--         same expiry; no stock or version changes; each group's stream
--         gets one `extend` entry (no sku: not a change event) so that the
--         new expiry reaches Postgres and survives a re-warm.
local W = 4
local TTL, WINDOW = tonumber(P1), tonumber(P2)

local refused = check_markers(W, 4)
if refused then
  return refused
end

local rec = redis.call('HMGET', KEYS[1], 'state', 'exp', 'fp')
if not rec[1] or rec[3] ~= FP or rec[1] == 'refused' then
  return reply('unknown')
end
if rec[1] ~= 'held' then
  return reply('state', rec[1])
end
if NOW >= tonumber(rec[2]) then
  return reply('state', 'expired')
end

local exp = NOW + TTL
redis.call('HSET', KEYS[1], 'exp', exp)
for j = 1, K do
  redis.call('HSET', group_key(W, j, 1), 'exp', exp)
  redis.call('ZADD', group_key(W, j, 2), exp, ID)
  redis.call('XADD', group_key(W, j, 3), '*', 'op', 'extend', 'ref', ID, 'fp', FP,
    'exp', exp, 'ts', NOW)
end
if HAS_LOCATOR then
  redis.call('PEXPIRE', KEYS[4], TTL + WINDOW + 3600000)
end
return reply('ok', tostring(exp))
