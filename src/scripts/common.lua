-- common.lua: helpers every stockd script may use; prepended to all of them
-- (see scripts/mod.rs). It reads no ARGV and no KEYS.

-- Unix milliseconds by the Redis clock, so every instance judges expiry
-- alike. Read once per script.
local NOW = (function()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end)()

-- NOW as text, for events (see int below).
local NOW_TEXT = string.format('%d', NOW)

-- An integer as the text Redis stores. Redis 7.0 turns a Lua number
-- argument into text with printf's "%.17g", whose floating-point path was
-- about 4 % of Redis' CPU under load; "%d" takes the integer path.
local function int(n)
  return string.format('%d', n)
end

-- Largest `available` an item may reach (SetStock's ceiling, and Adjust's).
local MAX_AVAILABLE = 1000000000

-- Stream ids `<ms>-<seq>` compared numerically. Every stock-changing
-- script compares the caller's flushed id with the marker's, which are
-- most often equal: plain string operations, no patterns (the Lua VM was a
-- third of Redis' CPU under load). Ids have no leading zeros, so between
-- parts of equal length text order is numeric order.
local function id_less(a, b)
  if a == b then
    return false
  end
  local ad, bd = string.find(a, '-', 1, true), string.find(b, '-', 1, true)
  if not ad or not bd then
    return false
  end
  if ad ~= bd then
    return ad < bd
  end
  local am, bm = string.sub(a, 1, ad - 1), string.sub(b, 1, bd - 1)
  if am ~= bm then
    return am < bm
  end
  local as, bs = tonumber(string.sub(a, ad + 1)), tonumber(string.sub(b, bd + 1))
  return as ~= nil and bs ~= nil and as < bs
end

-- Every marker a script read, by key: {epoch, flushed, heal, gate,
-- seen_until, seen_bits}. One HMGET per marker and script serves the
-- rollback check, the backlog gate and the Bloom filter's window alike (each
-- redis.call has a fixed cost that is a good part of a request's).
local MARKER_FIELDS = {}

-- Reads a partition marker (`NS:{pNN}:marker`, see layout.lua): returns
-- nil and the marker's flushed id when the partition may be used, else
-- {'lost' | 'healing' | 'rollback', key}. `min_flushed` ('' or nil for
-- none) is the newest flushed id the caller saw in this marker before: a
-- marker behind it belongs to a Redis that rolled back, unless `stream`
-- (the partition's events stream) still holds that entry: the flusher
-- committed it and has not marked it yet (an instance learns a flush at its
-- commit, before the marker write). An entry is only trimmed after the
-- flusher acknowledged it, which it does after marking it, so a Redis that
-- lacks it and whose marker is behind it lacks flushed changes.
local function marker_refusal(key, min_flushed, stream)
  local m = redis.call('HMGET', key, 'epoch', 'flushed', 'heal', 'gate', 'seen_until', 'seen_bits')
  MARKER_FIELDS[key] = m
  if not m[1] then
    return { 'lost', key }
  end
  if m[3] and tonumber(m[3]) > NOW then
    return { 'healing', key }
  end
  if min_flushed and min_flushed ~= '' and id_less(m[2] or '0-0', min_flushed)
    and not (stream and #redis.call('XRANGE', stream, min_flushed, min_flushed) > 0) then
    return { 'rollback', key }
  end
  return nil, m[2] or ''
end

-- avail, resv, ver of a stock hash, or nil when Redis lacks the item.
local function read_stock(key)
  local v = redis.call('HMGET', key, 'avail', 'resv', 'ver')
  if not v[1] then
    return nil
  end
  return tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
end
