-- reserve.lua: hold units of every line for a reservation, all or nothing.
--
-- KEYS   the layout of layout.lua; the coordinator is the reservation's
--        record (`NS:{pNN}:resv:<id>`) in its one partition, or in the id's
--        own partition when the lines span partitions; W = 4 keys per
--        group: the partition's record of this reservation, its rexp zset,
--        its events stream, its marker.
-- ARGV   the layout; [6] ttl in ms (of a part: its provisional expiry,
--        until the reaper asks the coordinator), [7] idempotency window in
--        ms; amounts are quantities.
-- Returns {'ok', out} or {'replay', out} with
--          out = {"exp": expires_at_ms, "levels": [[sku, loc, avail, resv, ver], ...]};
--         {'exists'} when the id names a reservation of another payload;
--         {'missing', [[sku, loc], ...]} when Redis lacks an item;
--         {'short', [[sku, loc, requested, available], ...]} on short stock,
--           and stored: a later copy of this request answers the same;
--         {'check'} when Postgres may know the id (see layout.lua);
--         {'backlog' | 'lost' | 'healing' | 'rollback', marker key}.
-- Invariants: every check runs before the first write, so a refusal changes
-- nothing but the stored refusal; avail never goes negative; each item's
-- ver goes up by exactly 1 with one event; the locator, every partition's
-- record and rexp entry are written in the same script.
local W = 4
local TTL, WINDOW = tonumber(P1), tonumber(P2)
-- A separate locator outlives the records it points to (finished records
-- are kept for the window after the hold ends).
local LOCATOR_TTL = TTL + WINDOW + 3600000

local refused = check_markers(W, 4)
if refused then
  return refused
end

local prior = redis.call('HMGET', KEYS[1], 'fp', 'state', 'out', 'why')
if prior[1] then
  if prior[1] ~= FP then
    return reply('exists')
  end
  if prior[2] == 'refused' then
    return reply(prior[4], prior[3])
  end
  return reply('replay', prior[3])
end
if locator_conflict() then
  return reply('exists')
end
if maybe_seen() then
  return reply('check')
end
local closed = gate_refusal(W, 4)
if closed then
  return closed
end

local state, why, detail = check_lines(W, function(qty) return -qty end)
if not state then
  -- A part's refusal is the coordinator's to store.
  if why ~= 'missing' and not PART_OF then
    -- One outcome per id: a late copy of this request replays the refusal.
    redis.call('HSET', KEYS[1], 'fp', FP, 'state', 'refused', 'why', why, 'out', detail)
    redis.call('PEXPIRE', KEYS[1], WINDOW)
    write_locator(WINDOW)
  end
  return reply(why, detail)
end

local exp = NOW + TTL
local levels, per_group = {}, {}
for i = 1, N do
  local sku, loc, qty, j = line(i)
  local s = state[i]
  levels[i] = write_stock(stock_key(W, i), group_key(W, j, 3), sku, loc, 'reserve',
    s[1], s[2], s[3], -qty, qty, exp)
  per_group[j] = per_group[j] or {}
  table.insert(per_group[j], { sku, loc, qty })
end
local out = cjson.encode({ exp = exp, levels = levels })
local exp_text = int(exp)
-- Without a separate locator the coordinator record is the locator (a
-- part writes none: its coordinator does).
local group_lines = {}
for j = 1, K do
  group_lines[j] = cjson.encode(per_group[j])
end
-- With one group, its lines are every line in request order: the
-- locator's `all` (one encoding fewer).
local in_record = PART_OF and {} or locator_fields(K == 1 and group_lines[1] or nil)
-- The coordinator may be one of the groups' records (always, for a request
-- in one partition): then one HSET writes both.
local coordinator_written = false
for j = 1, K do
  -- `parts` tells the reaper, which finds the id in this partition's rexp,
  -- whether this record holds every line.
  local record = group_key(W, j, 1)
  if record == KEYS[1] then
    redis.call('HSET', record, 'state', 'held', 'exp', exp_text, 'fp', FP,
      'lines', group_lines[j], 'parts', PARTS, 'out', out, unpack(in_record))
    coordinator_written = true
  else
    redis.call('HSET', record, 'state', 'held', 'exp', exp_text, 'fp', FP,
      'lines', group_lines[j], 'parts', PARTS)
  end
  redis.call('ZADD', group_key(W, j, 2), exp_text, ID)
end
if not coordinator_written then
  redis.call('HSET', KEYS[1], 'state', 'held', 'exp', exp_text, 'fp', FP, 'out', out,
    unpack(in_record))
end
if PART_OF then
  -- The reaper asks the coordinator what became of a part when its
  -- (provisional) expiry comes.
  redis.call('HSET', KEYS[1], 'coord', PART_OF)
elseif HAS_LOCATOR then
  write_locator(LOCATOR_TTL)
end
return reply('ok', out)
