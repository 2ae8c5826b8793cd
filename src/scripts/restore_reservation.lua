-- restore_reservation.lua: put one record of a reservation back into Redis
-- from Postgres, where Redis lacks it (a re-warm after a data loss, a heal
-- after a rollback, a retry whose record only Postgres still knows).
--
-- KEYS   [1] the record (`NS:{pNN}:resv:<id>`), [2] the partition's rexp zset.
-- ARGV   [1] id, [2] fingerprint, [3] state ('held', 'committed',
--        'released', 'expired', or '' for a record that is only a
--        locator), [4] expiry in ms or '', [5] this partition's lines
--        (JSON) or '', [6] reserve outcome (JSON) or '', [7] finish
--        outcome or '', [8] every line (JSON; the locator) or '', [9] the
--        partitions or '', [10] how long a finished record or a locator is
--        kept, in ms.
-- Returns 1 when written; 2 when Redis held the reservation that Postgres
--         has since finished (a rollback): the record is finished the same
--         way, without touching stock (the stock was loaded from Postgres);
--         0 when Redis already had the record (newer or equal: kept).
-- Invariants: the same fields as reserve.lua and finish.lua write; a held
--         record with lines gets its rexp entry, so the reaper sees it; a
--         finished record or a locator expires like the ones the scripts
--         write (a held record keeps no expiry, like reserve.lua's).
local id, state, exp = ARGV[1], ARGV[3], ARGV[4]
if redis.call('EXISTS', KEYS[1]) == 1 then
  local current = redis.call('HGET', KEYS[1], 'state')
  if current == 'held' and state ~= '' and state ~= 'held' then
    redis.call('HSET', KEYS[1], 'state', state)
    if ARGV[7] ~= '' then
      redis.call('HSET', KEYS[1], 'fin', ARGV[7])
    end
    redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[10]))
    redis.call('ZREM', KEYS[2], id)
    return 2
  end
  return 0
end
local fields = { 'fp', ARGV[2] }
local function add(name, value)
  if value ~= '' then
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
end
add('state', state)
add('exp', exp)
add('lines', ARGV[5])
add('out', ARGV[6])
add('fin', ARGV[7])
add('all', ARGV[8])
add('parts', ARGV[9])
add('coord', ARGV[11] or '')
redis.call('HSET', KEYS[1], unpack(fields))
if state == 'held' and ARGV[5] ~= '' then
  redis.call('ZADD', KEYS[2], tonumber(exp), id)
elseif state ~= 'held' then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[10]))
end
return 1
