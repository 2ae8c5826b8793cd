-- set.lua: set `available` of one item to an absolute level, creating the
-- item when Redis lacks it; optionally compare-and-set on its version.
--
-- KEYS   [1] idempotency key; [2] events stream of the item's partition;
--        [3] its backlog gate; [4] the item's stock hash (the standard layout
--        with k = 1, W = 2, n = 1).
-- ARGV   [1] request id, [2] fingerprint, [3] expected version or '' for none
--        (0 = the item must not exist), [4] 1, [5] 1, [6] idempotency window
--        in ms, [7] sku, [8] location, [9] the new available, [10] 1,
--        [11] 'create' to create an item Redis lacks, else '' (the caller
--        first tries to load a missing item from Postgres, so a set never
--        starts a known item over at version 1).
-- Returns {'ok', out} / {'replay', out} with out = {"levels": [[...]]};
--         {'exists', ''}; {'version', <current version>} on a CAS mismatch;
--         {'missing', [[sku, loc]]} when Redis lacks the item and ARGV[11] is not 'create';
--         {'backlog', gate key} while the partition's flush backlog is over its limit.
-- Invariants: reserved is untouched; ver + 1 (1 for a new item, whose event
--         carries deltas from zero); one event; the CAS check and the
--         idempotency check run before the first write.
local W = 2

local replay = replay_of(redis.call('GET', KEYS[1]))
if replay then
  return replay
end

local closed = gate_refusal(W, 2)
if closed then
  return closed
end

local sku, loc, target = line(1)
local avail, resv, ver = read_stock(stock_key(W, 1))
if not avail then
  if ARGV[11] ~= 'create' then
    return { 'missing', cjson.encode({ { sku, loc } }) }
  end
  avail, resv, ver = 0, 0, 0
end
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= ver then
  return { 'version', tostring(ver) }
end

local now = now_ms()
local level = write_stock(stock_key(W, 1), group_key(W, 1, 1), sku, loc, 'set',
  avail, resv, ver, target - avail, 0, ID, now)
local out = cjson.encode({ levels = { level } })
redis.call('SET', KEYS[1], FP .. '\n' .. out, 'PX', ARGV[6])
return { 'ok', out }
