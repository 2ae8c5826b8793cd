-- marker.lua: every write to a partition marker (`NS:{pNN}:marker`; its
-- fields are described in layout.lua), so that the marker's layout lives in
-- Lua only.
--
-- KEYS   [1] the marker, [2] the partition's Bloom filter of seen ids
--        (`NS:{pNN}:seen`; only 'establish' touches it), [3] the
--        partition's events stream (only 'flushed' reads it).
-- ARGV   [1] verb, then its arguments:
--          'establish' epoch flushed seen_until_ms [filter bytes, filter bits]
--              the partition is (re)established in this Redis: a fresh
--              marker with the epoch, no gate and no heal, and as flushed
--              id the greater of the one it had and `flushed` (Postgres's
--              checkpoint); with seen_until_ms > now and the filter, ids
--              Postgres knew are looked up there until then.
--          'flushed' entry_id    the flusher committed up to entry_id;
--              refused (nothing written, `unheld` in the reply) when the
--              marker is behind entry_id and the stream lacks that entry:
--              this Redis does not hold what the flusher read (a failover
--              to a lagging replica while the batch was being retried),
--              and marking it would hide that rollback from every script
--          'gate' 'on'|'off'     the backlog gate (new demand refused)
--          'heal' until_ms       refuse everything until until_ms; '0' ends it
--          'read'                nothing written
-- Returns {epoch or '', flushed or '', heal or '', gate ('1' or ''),
--         unheld ('1' or '')}: the marker after the write, and whether a
--         'flushed' write was refused.
-- Invariants: `flushed` only moves forward, and only to an entry this
--         Redis holds (the flusher marks before it acknowledges, and an
--         entry is trimmed only once acknowledged); 'flushed', 'gate' and
--         'heal' never create a marker (a partition without one is lost
--         until a warm establishes it).
local key, verb = KEYS[1], ARGV[1]
local exists = redis.call('EXISTS', key) == 1
local unheld = ''

if verb == 'establish' then
  local flushed = redis.call('HGET', key, 'flushed') or ''
  if flushed == '' or (ARGV[3] ~= '' and id_less(flushed, ARGV[3])) then
    flushed = ARGV[3]
  end
  redis.call('DEL', key)
  redis.call('HSET', key, 'epoch', ARGV[2])
  if flushed ~= '' then
    redis.call('HSET', key, 'flushed', flushed)
  end
  if tonumber(ARGV[4]) > NOW and ARGV[5] then
    redis.call('SET', KEYS[2], ARGV[5], 'PXAT', ARGV[4])
    redis.call('HSET', key, 'seen_until', ARGV[4], 'seen_bits', ARGV[6])
  else
    redis.call('DEL', KEYS[2])
  end
elseif exists and verb == 'flushed' then
  local current = redis.call('HGET', key, 'flushed')
  if not current or id_less(current, ARGV[2]) then
    if #redis.call('XRANGE', KEYS[3], ARGV[2], ARGV[2]) > 0 then
      redis.call('HSET', key, 'flushed', ARGV[2])
    else
      unheld = '1'
    end
  end
elseif exists and verb == 'gate' then
  if ARGV[2] == 'on' then
    redis.call('HSET', key, 'gate', '1')
  else
    redis.call('HDEL', key, 'gate')
  end
elseif exists and verb == 'heal' then
  if ARGV[2] == '0' then
    redis.call('HDEL', key, 'heal')
  else
    redis.call('HSET', key, 'heal', ARGV[2])
  end
end

local m = redis.call('HMGET', key, 'epoch', 'flushed', 'heal', 'gate')
return { m[1] or '', m[2] or '', m[3] or '', m[4] or '', unheld }
