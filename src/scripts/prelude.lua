-- prelude.lua: helpers prepended to every stockd script (see scripts/mod.rs).
--
-- Layout shared by the line-based scripts (reserve, finish, extend, apply):
--   KEYS[1]                       the request's own record (reservation home
--                                 record or idempotency key)
--   KEYS[1 + (j-1)*W + s]         slot s (1..W) of partition group j (1..k)
--   KEYS[1 + k*W + i]             stock hash of line i (1..n)
--   ARGV[1] id, ARGV[2] request fingerprint, ARGV[3] a per-script parameter,
--   ARGV[4] k, ARGV[5] n, ARGV[6] a per-script parameter,
--   ARGV[7 + 4*(i-1) ...]         sku, location, quantity or delta, group j
--
-- Stock hashes hold `sku loc avail resv ver`; values are integers.

-- Unix milliseconds by the Redis clock, so every instance judges expiry alike.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local ID, FP = ARGV[1], ARGV[2]
local K, N = tonumber(ARGV[4]) or 0, tonumber(ARGV[5]) or 0

-- Line i as (sku, location, quantity, group).
local function line(i)
  local b = 7 + 4 * (i - 1)
  return ARGV[b], ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
end

local function group_key(width, j, slot)
  return KEYS[1 + (j - 1) * width + slot]
end

local function stock_key(width, i)
  return KEYS[1 + K * width + i]
end

-- avail, resv, ver of a stock hash, or nil when Redis lacks the item.
local function read_stock(key)
  local v = redis.call('HMGET', key, 'avail', 'resv', 'ver')
  if not v[1] then
    return nil
  end
  return tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
end

-- Writes the new state of one item (version + 1) and appends its event;
-- `exp` (reserve events only) is the hold's expiry, for the flusher.
-- Returns the level {sku, loc, avail, resv, ver} for the reply.
local function write_stock(key, events, sku, loc, op, avail, resv, ver, d_avail, d_resv, ref, ts, exp)
  local a, r, v = avail + d_avail, resv + d_resv, ver + 1
  if ver == 0 then
    redis.call('HSET', key, 'sku', sku, 'loc', loc, 'avail', a, 'resv', r, 'ver', v)
  else
    redis.call('HSET', key, 'avail', a, 'resv', r, 'ver', v)
  end
  if exp then
    redis.call('XADD', events, '*', 'sku', sku, 'loc', loc, 'op', op,
      'd_avail', d_avail, 'd_resv', d_resv, 'avail', a, 'resv', r, 'ver', v,
      'ref', ref, 'ts', ts, 'exp', exp)
  else
    redis.call('XADD', events, '*', 'sku', sku, 'loc', loc, 'op', op,
      'd_avail', d_avail, 'd_resv', d_resv, 'avail', a, 'resv', r, 'ver', v,
      'ref', ref, 'ts', ts)
  end
  return { sku, loc, a, r, v }
end

-- The flusher closes a partition's gate while its unflushed backlog is over
-- the limit; new demand on that partition is then refused (UNAVAILABLE).
-- Returns the refusal, or nil when every group's gate (slot `slot`) is open.
local function gate_refusal(width, slot)
  for j = 1, K do
    if redis.call('EXISTS', group_key(width, j, slot)) == 1 then
      return { 'backlog', group_key(width, j, slot) }
    end
  end
  return nil
end

-- For idempotency records stored as "<fingerprint>\n<outcome json>":
-- nil when the id is new, else the reply to give.
local function replay_of(record)
  if not record then
    return nil
  end
  local nl = string.find(record, '\n', 1, true)
  if string.sub(record, 1, nl - 1) ~= FP then
    return { 'exists', '' }
  end
  return { 'replay', string.sub(record, nl + 1) }
end

-- Validates every line's item before any write: returns nil when all lines
-- can be applied, else the refusal. `delta_of(qty)` gives the change of avail.
local function check_lines(width, delta_of)
  local missing, short, state = {}, {}, {}
  for i = 1, N do
    local sku, loc, qty = line(i)
    local avail, resv, ver = read_stock(stock_key(width, i))
    if not avail then
      missing[#missing + 1] = { sku, loc }
    else
      local d = delta_of(qty)
      if avail + d < 0 then
        short[#short + 1] = { sku, loc, -d, avail }
      end
      state[i] = { avail, resv, ver }
    end
  end
  if #missing > 0 then
    return nil, { 'missing', cjson.encode(missing) }
  end
  if #short > 0 then
    return nil, { 'short', cjson.encode(short) }
  end
  return state, nil
end

