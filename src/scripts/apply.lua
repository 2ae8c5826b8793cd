-- apply.lua: change `available` of every line by a signed delta, all or
-- nothing; used by Decrement (negative deltas) and Adjust (one line).
--
-- KEYS   the layout of layout.lua; the coordinator is the request's record
--        (`NS:{pNN}:idem:<request_id>`, a hash) in the partition of its
--        items, or in the id's own partition when they span partitions;
--        W = 2 keys per group: the partition's events stream, its marker.
-- ARGV   the layout; [6] op: 'decrement' | 'adjust', [7] idempotency window
--        in ms; amounts are signed deltas of available.
-- Returns {'ok', out} / {'replay', out} with out = {"levels": [...]};
--         {'exists'} the id was used for another payload;
--         {'missing', [[sku, loc], ...]};
--         {'short', [[sku, loc, requested, available], ...]} and
--         {'ceiling', [[sku, loc, delta, available], ...]} (available would
--           pass 1,000,000,000), both stored: a later copy replays them;
--         {'check'}; {'backlog' | 'lost' | 'healing' | 'rollback', marker key}.
-- Invariants: every check runs before the first write; avail never goes
--         negative nor past the ceiling; ver + 1 and one event per item;
--         the first definite outcome is stored under the id in the same
--         script, so a retry can only replay it.
local W = 2
local op, WINDOW = P1, tonumber(P2)

local refused = check_markers(W, 2)
if refused then
  return refused
end

local prior = redis.call('HMGET', KEYS[1], 'fp', 'out', 'why')
if prior[1] then
  if prior[1] ~= FP then
    return reply('exists')
  end
  return reply(prior[3] or 'replay', prior[2])
end
if locator_conflict() then
  return reply('exists')
end
if maybe_seen() then
  return reply('check')
end
local closed = gate_refusal(W, 2)
if closed then
  return closed
end

local state, why, detail = check_lines(W, function(delta) return delta end)
if not state then
  if why ~= 'missing' then
    redis.call('HSET', KEYS[1], 'fp', FP, 'why', why, 'out', detail)
    redis.call('PEXPIRE', KEYS[1], WINDOW)
    write_locator(WINDOW)
  end
  return reply(why, detail)
end

local levels = {}
for i = 1, N do
  local sku, loc, delta, j = line(i)
  local s = state[i]
  levels[i] = write_stock(stock_key(W, i), group_key(W, j, 1), sku, loc, op,
    s[1], s[2], s[3], delta, 0)
end
local out = cjson.encode({ levels = levels })
-- Without a separate locator the record is the locator: one HSET.
redis.call('HSET', KEYS[1], 'fp', FP, 'out', out, unpack(locator_fields()))
redis.call('PEXPIRE', KEYS[1], WINDOW)
if HAS_LOCATOR then
  write_locator(WINDOW)
end
return reply('ok', out)
