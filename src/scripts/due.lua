-- due.lua: reservation ids of one partition whose hold has lapsed.
--
-- KEYS   [1] rexp zset of the partition.
-- ARGV   [1] (ignored), [2] (ignored), [3] most ids to return.
-- Returns the ids scored at or before now (Redis clock), oldest first.
-- Invariants: read-only; the reaper then finishes each with op 'expire',
--         which re-checks the state, so a stale answer is harmless.
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[3]))
