-- reserve.lua: hold units of every line for a reservation, all or nothing.
--
-- KEYS   [1] home record NS:{pH}:resv:<id> (H = partition of the id);
--        per partition group j (W = 4): resv record, rexp zset, events
--        stream, backlog gate;
--        then the stock hash of every line.
-- ARGV   [1] reservation id, [2] fingerprint of (lines, ttl), [3] ttl in ms,
--        [4] k, [5] n, [6] unused, [7..] lines (sku, location, quantity, group).
-- Returns {'ok', out} or {'replay', out} with
--          out = {"exp": expires_at_ms, "levels": [[sku, loc, avail, resv, ver], ...]};
--         {'exists', ''} when the id holds a reservation of another payload;
--         {'missing', [[sku, loc], ...]} when Redis lacks an item;
--         {'short', [[sku, loc, requested, available], ...]} on short stock;
--         {'backlog', gate key} while a partition's flush backlog is over its limit.
-- Invariants: every check runs before the first write, so a refusal changes
-- nothing; avail never goes negative; each item's ver goes up by exactly 1
-- with one event; the home record exists iff the reservation does, and it is
-- written in the same script as every partition's record and rexp entry.
local W = 4
local home = KEYS[1]

local prior = redis.call('HMGET', home, 'fp', 'out')
if prior[1] then
  if prior[1] ~= FP then
    return { 'exists', '' }
  end
  return { 'replay', prior[2] }
end

local closed = gate_refusal(W, 4)
if closed then
  return closed
end

local state, refusal = check_lines(W, function(qty) return -qty end)
if refusal then
  return refusal
end

local now = now_ms()
local exp = now + tonumber(ARGV[3])
local levels, all, per_group = {}, {}, {}
for i = 1, N do
  local sku, loc, qty, j = line(i)
  local s = state[i]
  levels[i] = write_stock(stock_key(W, i), group_key(W, j, 3), sku, loc, 'reserve',
    s[1], s[2], s[3], -qty, qty, ID, now, exp)
  all[i] = { sku, loc, qty }
  per_group[j] = per_group[j] or {}
  table.insert(per_group[j], { sku, loc, qty })
end

for j = 1, K do
  redis.call('HSET', group_key(W, j, 1), 'state', 'held', 'exp', exp, 'fp', FP,
    'lines', cjson.encode(per_group[j]))
  redis.call('ZADD', group_key(W, j, 2), exp, ID)
end
local out = cjson.encode({ exp = exp, levels = levels })
-- The home record may also be one of the groups' records; these fields add to it.
redis.call('HSET', home, 'state', 'held', 'exp', exp, 'fp', FP, 'all', cjson.encode(all), 'out', out)
return { 'ok', out }
