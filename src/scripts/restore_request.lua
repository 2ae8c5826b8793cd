-- restore_request.lua: put a request's record (decrement, adjust, set) back
-- into Redis from Postgres, where Redis lacks it, so that a retry replays.
--
-- KEYS   [1] the record (`NS:{pNN}:idem:<request_id>`).
-- ARGV   [1] fingerprint, [2] outcome (JSON), [3] every line (JSON; when
--        this record is also the locator) or '', [4] the partitions or '',
--        [5] how long to keep it, in ms.
-- Returns 1 when written, 0 when Redis already had the record.
-- Invariants: the same fields as apply.lua and set.lua write.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'out', ARGV[2])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'all', ARGV[3], 'parts', ARGV[4])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
return 1
