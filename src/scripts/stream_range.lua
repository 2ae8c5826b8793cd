-- stream_range.lua: a partition stream's bounds, for a Watch resume check,
-- in one round trip.
--
-- KEYS   [1] the partition's events stream.
-- ARGV   [1] the resume entry id.
-- Returns {length, entries added ever, first entry id or '',
--          last generated id, 1 when ARGV[1] is an entry of the stream else 0};
--         {0, 0, '', '0-0', 0} when the stream does not exist.
-- Invariants: reads only.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0, '', '0-0', 0}
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local f = {}
for i = 1, #info, 2 do f[info[i]] = info[i + 1] end
local first = ''
if type(f['first-entry']) == 'table' then first = f['first-entry'][1] end
local hit = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
return {f['length'], f['entries-added'], first, f['last-generated-id'], #hit}
