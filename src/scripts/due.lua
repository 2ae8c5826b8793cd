-- due.lua: reservation ids of one partition whose hold has lapsed.
--
-- KEYS   [1] rexp zset of the partition, [2] its marker.
-- ARGV   [1] most ids to return.
-- Returns the ids scored at or before now (Redis clock), oldest first;
--         none while the partition is lost or being healed.
-- Invariants: read-only; the reaper then finishes each with op 'expire',
--         which re-checks the state, so a stale answer is harmless.
if marker_refusal(KEYS[2], nil) then
  return {}
end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[1]))
