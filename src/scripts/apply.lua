-- apply.lua: change `available` of every line by a signed delta, all or
-- nothing; used by Decrement (negative deltas) and Adjust (one line).
--
-- KEYS   [1] idempotency key NS:{pR}:idem:<request_id> (R = partition of the
--        id); per partition group j (W = 2): events stream, backlog gate;
--        then the stock
--        hash of every line.
-- ARGV   [1] request id, [2] fingerprint of the request, [3] op:
--        'decrement' | 'adjust', [4] k, [5] n, [6] idempotency window in ms,
--        [7..] lines (sku, location, delta of available, group).
-- Returns {'ok', out} / {'replay', out} with out = {"levels": [...]};
--         {'exists', ''} the id was used for another payload;
--         {'missing', [[sku, loc], ...]}; {'short', [[sku, loc, requested, available], ...]};
--         {'backlog', gate key} while a partition's flush backlog is over its limit.
-- Invariants: every check runs before the first write; avail never goes
--         negative; ver + 1 and one event per item; the outcome is stored
--         under the id in the same script, so a retry can only replay it.
local W = 2
local op = ARGV[3]

local replay = replay_of(redis.call('GET', KEYS[1]))
if replay then
  return replay
end

local closed = gate_refusal(W, 2)
if closed then
  return closed
end

local state, refusal = check_lines(W, function(delta) return delta end)
if refusal then
  return refusal
end

local now = now_ms()
local levels = {}
for i = 1, N do
  local sku, loc, delta, j = line(i)
  local s = state[i]
  levels[i] = write_stock(stock_key(W, i), group_key(W, j, 1), sku, loc, op,
    s[1], s[2], s[3], delta, 0, ID, now)
end
local out = cjson.encode({ levels = levels })
redis.call('SET', KEYS[1], FP .. '\n' .. out, 'PX', ARGV[6])
return { 'ok', out }
