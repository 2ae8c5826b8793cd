-- finish.lua: end a held reservation: commit, release or expire it.
--
-- KEYS   the layout of layout.lua (no locator); W = 4 keys per group: the
--        partition's record, rexp zset, events stream, marker.
-- ARGV   the layout; [2] the fingerprint the caller knows the reservation
--        by (from its locator: guards against the id being recycled in
--        between), [6] 'commit' | 'release' | 'expire', [7] idempotency
--        window in ms; lines are every line of the reservation (amounts are
--        quantities).
-- Returns {'ok', out} / {'replay', out}, out = {"levels": [...]};
--         {'unknown'} no such reservation (or one that was refused);
--         {'state', <state>} the reservation is committed, released or
--         expired (a held one past its expiry counts as expired) and the op
--         does not apply; a release of an expired one is a replay instead;
--         {'noop', <state>} for 'expire' when the hold is not (or no longer) due;
--         {'corrupt', <detail>} when a stock hash cannot take the change;
--         {'lost' | 'healing' | 'rollback', marker key}.
-- A part (flag P<n>) applies the op its coordinator decided, whatever its
-- own expiry says.
-- Invariants: held is the only state that moves, and it moves exactly once
-- (so the reapers of several instances expire a hold exactly once); expiry
-- is judged by the Redis clock; every check runs before the first write.
-- The backlog gate does not apply: finishing is bounded by what is held.
local W = 4
local op, WINDOW = P1, tonumber(P2)

local refused = check_markers(W, 4)
if refused then
  return refused
end

local rec = redis.call('HMGET', KEYS[1], 'state', 'exp', 'fp', 'fin')
if not rec[1] or rec[3] ~= FP or rec[1] == 'refused' then
  return reply('unknown')
end
local state = rec[1]
local due = state == 'held' and NOW >= tonumber(rec[2])
local replayed = false
local final_of = { commit = 'committed', release = 'released', expire = 'expired' }

if PART_OF then
  -- A part does what its coordinator decided, whatever its own expiry.
  if state == final_of[op] then
    return reply('replay', rec[4])
  end
  if state ~= 'held' then
    return reply('state', state)
  end
elseif op == 'commit' then
  if state == 'committed' then
    return reply('replay', rec[4])
  end
  if state ~= 'held' or due then
    return reply('state', due and 'expired' or state)
  end
elseif op == 'release' then
  if state == 'released' or state == 'expired' then
    return reply('replay', rec[4])
  end
  if state ~= 'held' then
    return reply('state', state)
  end
  if due then
    -- The hold lapsed before the release arrived: record the expiry it is;
    -- the client learns its units are back, as a replay.
    op, replayed = 'expire', true
  end
else
  if not due then
    return reply('noop', state)
  end
end

-- Every item must still hold the reserved units before anything is written.
local stock = {}
for i = 1, N do
  local sku, loc, qty = line(i)
  local avail, resv, ver = read_stock(stock_key(W, i))
  if not avail or resv < qty then
    return reply('corrupt', string.format('%s/%s holds %s reserved, reservation %s needs %d',
      loc, sku, tostring(resv), ID, qty))
  end
  stock[i] = { avail, resv, ver }
end

local d_avail_per_unit = (op == 'commit') and 0 or 1
local levels = {}
for i = 1, N do
  local sku, loc, qty, j = line(i)
  local s = stock[i]
  levels[i] = write_stock(stock_key(W, i), group_key(W, j, 3), sku, loc, op,
    s[1], s[2], s[3], d_avail_per_unit * qty, -qty)
end

local final = final_of[op]
local out = cjson.encode({ levels = levels })
-- The coordinator may be one of the groups' records (always, for a
-- reservation in one partition): then one HSET and one PEXPIRE serve both.
local coordinator_written = false
for j = 1, K do
  local record = group_key(W, j, 1)
  if record == KEYS[1] then
    redis.call('HSET', record, 'state', final, 'fin', out)
    coordinator_written = true
  else
    redis.call('HSET', record, 'state', final)
  end
  redis.call('PEXPIRE', record, WINDOW)
  redis.call('ZREM', group_key(W, j, 2), ID)
end
if not coordinator_written then
  redis.call('HSET', KEYS[1], 'state', final, 'fin', out)
  redis.call('PEXPIRE', KEYS[1], WINDOW)
end
return reply(replayed and 'replay' or 'ok', out)
