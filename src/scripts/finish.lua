-- finish.lua: end a held reservation: commit, release or expire it.
--
-- KEYS   [1] home record; per partition group j (W = 4): resv record, rexp
--        zset, events stream, backlog gate (unused: finishing is bounded
--        by what is held, so it goes on while the gate is closed); then the stock hash of every line.
-- ARGV   [1] reservation id, [2] fingerprint read from the home record by
--        the caller (guards against the id being recycled in between),
--        [3] op: 'commit' | 'release' | 'expire', [4] k, [5] n,
--        [6] retention in ms of the finished records (idempotency window),
--        [7..] every line of the reservation (sku, location, quantity, group).
-- Returns {'ok', out} / {'replay', out}, out = {"levels": [...]} as in reserve;
--         {'unknown', ''} no such reservation;
--         {'state', <state>} the reservation is committed, released or
--         expired (a held one past its expiry counts as expired) and the op
--         does not apply; a release of an expired one is a replay instead;
--         {'noop', <state>} for 'expire' when the hold is not (or no longer) due;
--         {'corrupt', <detail>} when a stock hash cannot take the change.
-- Invariants: held is the only state that moves, and it moves exactly once
-- (so the reaper of several instances expires a hold exactly once); expiry is
-- judged by the Redis clock; every check runs before the first write.
local W = 4
local home = KEYS[1]
local op = ARGV[3]

local rec = redis.call('HMGET', home, 'state', 'exp', 'fp', 'fin')
if not rec[1] or rec[3] ~= FP then
  return { 'unknown', '' }
end
local state = rec[1]
local now = now_ms()
local due = state == 'held' and now >= tonumber(rec[2])
local replayed = false

if op == 'commit' then
  if state == 'committed' then
    return { 'replay', rec[4] }
  end
  if state ~= 'held' or due then
    return { 'state', due and 'expired' or state }
  end
elseif op == 'release' then
  if state == 'released' or state == 'expired' then
    return { 'replay', rec[4] }
  end
  if state ~= 'held' then
    return { 'state', state }
  end
  if due then
    -- The hold lapsed before the release arrived: record the expiry it is;
    -- the client learns its units are back, as a replay.
    op, replayed = 'expire', true
  end
else
  if not due then
    return { 'noop', state }
  end
end

-- Every item must still hold the reserved units before anything is written.
local stock = {}
for i = 1, N do
  local sku, loc, qty = line(i)
  local avail, resv, ver = read_stock(stock_key(W, i))
  if not avail or resv < qty then
    return { 'corrupt', string.format('%s/%s holds %s reserved, reservation %s needs %d',
      loc, sku, tostring(resv), ID, qty) }
  end
  stock[i] = { avail, resv, ver }
end

local d_avail_per_unit = (op == 'commit') and 0 or 1
local levels = {}
for i = 1, N do
  local sku, loc, qty, j = line(i)
  local s = stock[i]
  levels[i] = write_stock(stock_key(W, i), group_key(W, j, 3), sku, loc, op,
    s[1], s[2], s[3], d_avail_per_unit * qty, -qty, ID, now)
end

local final = ({ commit = 'committed', release = 'released', expire = 'expired' })[op]
local retention = tonumber(ARGV[6])
for j = 1, K do
  redis.call('HSET', group_key(W, j, 1), 'state', final)
  redis.call('PEXPIRE', group_key(W, j, 1), retention)
  redis.call('ZREM', group_key(W, j, 2), ID)
end
local out = cjson.encode({ levels = levels })
redis.call('HSET', home, 'state', final, 'fin', out)
redis.call('PEXPIRE', home, retention)
return { replayed and 'replay' or 'ok', out }
