-- set.lua: set `available` of one item to an absolute level, creating the
-- item when Redis lacks it (flag X); optionally compare-and-set on its
-- version.
--
-- KEYS   the layout of layout.lua with k = 1, n = 1; the coordinator is the
--        request's record (`NS:{pNN}:idem:<request_id>`); W = 2: the events
--        stream and the marker of the item's partition.
-- ARGV   the layout; [6] expected version or '' for none (0 = the item must
--        not exist), [7] idempotency window in ms; the line's amount is the
--        new available. Flag X: create an item Redis lacks (the caller first
--        tries to load it from Postgres, so a set never starts a known item
--        over at version 1).
-- Returns {'ok', out} / {'replay', out} with out = {"levels": [[...]]};
--         {'exists'}; {'version', <current version>} on a CAS mismatch
--         (stored: a later copy replays it);
--         {'missing', [[sku, loc]]} when Redis lacks the item and X is not set;
--         {'check'}; {'backlog' | 'lost' | 'healing' | 'rollback', marker key}.
-- Invariants: reserved is untouched; ver + 1 (1 for a new item, whose event
--         carries deltas from zero); one event; the CAS check and the
--         idempotency check run before the first write.
local W = 2
local expected, WINDOW = P1, tonumber(P2)

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

local sku, loc, target = line(1)
local avail, resv, ver = read_stock(stock_key(W, 1))
if not avail then
  if not CREATE then
    return reply('missing', cjson.encode({ { sku, loc } }))
  end
  avail, resv, ver = 0, 0, 0
end
if expected ~= '' and tonumber(expected) ~= ver then
  redis.call('HSET', KEYS[1], 'fp', FP, 'why', 'version', 'out', tostring(ver))
  redis.call('PEXPIRE', KEYS[1], WINDOW)
  write_locator(WINDOW)
  return reply('version', tostring(ver))
end

local level = write_stock(stock_key(W, 1), group_key(W, 1, 1), sku, loc, 'set',
  avail, resv, ver, target - avail, 0)
local out = cjson.encode({ levels = { level } })
-- Without a separate locator the record is the locator: one HSET.
redis.call('HSET', KEYS[1], 'fp', FP, 'out', out, unpack(locator_fields()))
redis.call('PEXPIRE', KEYS[1], WINDOW)
if HAS_LOCATOR then
  write_locator(WINDOW)
end
return reply('ok', out)
