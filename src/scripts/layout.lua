-- layout.lua: the key and argument layout shared by every stock-changing
-- script (reserve, finish, extend, apply, set), and the helpers that depend
-- on it; prepended to each of them after common.lua (see scripts/mod.rs). The Rust side that builds this layout is
-- `scripts::Layout` in scripts/mod.rs: change both together.
--
-- ARGV   [1] id (reservation or request id), [2] fingerprint of the request,
--        [3] k = partition groups, [4] n = lines,
--        [5] flags, a string of letters:
--            L  a locator record and its marker follow (KEYS[4], KEYS[5])
--            C  the id was already looked up in Postgres: do not answer 'check'
--            X  create an item Redis lacks (set)
--            P<n>  a part of a reservation whose coordinator is in partition
--               <n> (on a Redis Cluster, where a script may not span
--               partitions): the part follows the coordinator's decisions
--               and stores no refusal and no locator of its own
--        [6], [7] two parameters of the script (see its header),
--        [8] the groups' partition numbers joined by ',' (for the locator),
--        [9 .. 8+k] per group: the newest flushed entry id this instance has
--            seen in that partition's marker or flushed itself ('' for
--            none): a marker behind it, in a Redis whose stream lacks that
--            entry, means Redis rolled back,
--        [9+k ..] 4 per line: sku, location, amount, group (1..k),
--        then two 32-bit hashes of the id for its Bloom filter (maybe_seen).
-- KEYS   [1] the coordinator record: where the request's outcome is stored
--            (the record in the one partition of a single-partition request;
--            the record in the id's own partition for a request spanning
--            partitions);
--        [2] the coordinator partition's marker, [3] its Bloom filter;
--        [4], [5] with flag L: the locator record in the id's own partition
--            and that partition's marker;
--        then W keys per group (W and their meaning per script; the last
--            two are always the partition's events stream and its marker);
--        then the stock hash of every line.
--
-- Every reply is {status, payload, flushed}: `status` a word (see
-- scripts/mod.rs, `ScriptReply`), `payload` a string (often JSON), and
-- `flushed` the groups' flushed entry ids joined by ',' so that the caller
-- learns how far Postgres is known to be.
--
-- Partition markers (`NS:{pNN}:marker`, a hash) are what lets a script
-- refuse to answer from a Redis that lost or rolled back its data, in the
-- same script that would change it:
--   epoch       present while this Redis holds the partition (written after
--               a warm); missing means the data is gone: answer 'lost'
--   flushed     newest stream entry id written to Postgres (set by the
--               flusher after its commit; only ever moves forward)
--   heal        refuse everything until this time (ms): a rollback is healed
--   gate        present while the partition's unflushed backlog is over its
--               limit: new demand is refused ('backlog')
--   seen_until  while now is before it, `NS:{pNN}:seen` (`seen_bits` bits)
--               is a Bloom filter of
--               the ids Postgres knew when the partition was last
--               re-established: an id Redis has no record of but the filter
--               may hold is looked up in Postgres first ('check'), so that a
--               retry after a data loss replays instead of applying twice.

local ID, FP = ARGV[1], ARGV[2]
local K, N = tonumber(ARGV[3]), tonumber(ARGV[4])
local FLAGS = ARGV[5]
local P1, P2 = ARGV[6], ARGV[7]
local HAS_LOCATOR = string.find(FLAGS, 'L', 1, true) ~= nil
local CHECKED = string.find(FLAGS, 'C', 1, true) ~= nil
local CREATE = string.find(FLAGS, 'X', 1, true) ~= nil
local PART_OF = string.match(FLAGS, 'P(%d+)')
local PARTS = ARGV[8]
local FIRST_GROUP_KEY = HAS_LOCATOR and 6 or 4
local LINES_AT = 9 + K

-- Line i as (sku, location, amount, group).
local function line(i)
  local b = LINES_AT + 4 * (i - 1)
  return ARGV[b], ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
end

local function group_key(width, j, slot)
  return KEYS[FIRST_GROUP_KEY + (j - 1) * width + slot - 1]
end

local function stock_key(width, i)
  return KEYS[FIRST_GROUP_KEY + K * width + i - 1]
end

-- The groups' flushed ids, read by check_markers, for the reply.
local FLUSHED = {}

local function reply(status, payload)
  return { status, payload or '', table.concat(FLUSHED, ',') }
end

-- Checks every group's marker, then the coordinator's and the locator's
-- where they are not one of those. `marker_slot` is the slot of the marker
-- in a group. Returns the refusal reply, or nil.
local function check_markers(width, marker_slot)
  local checked = {}
  for j = 1, K do
    local key = group_key(width, j, marker_slot)
    -- Every script keeps a group's events stream just before its marker.
    local stream = group_key(width, j, marker_slot - 1)
    local bad, flushed = marker_refusal(key, ARGV[8 + j], stream)
    if bad then
      return reply(bad[1], bad[2])
    end
    FLUSHED[j] = flushed
    checked[key] = true
  end
  local others = HAS_LOCATOR and { KEYS[2], KEYS[5] } or { KEYS[2] }
  for _, key in ipairs(others) do
    if not checked[key] then
      local bad = marker_refusal(key, nil)
      if bad then
        return reply(bad[1], bad[2])
      end
      checked[key] = true
    end
  end
  return nil
end

-- New demand (reserve, decrement, adjust, set) is refused while a group's
-- backlog gate is closed; finishing what is held is not.
local function gate_refusal(width, marker_slot)
  for j = 1, K do
    local key = group_key(width, j, marker_slot)
    -- check_markers read every group's marker just before.
    local m = MARKER_FIELDS[key]
    if (m and m[4]) or (not m and redis.call('HEXISTS', key, 'gate') == 1) then
      return reply('backlog', key)
    end
  end
  return nil
end

-- A request id Redis has no record of: was it maybe seen before the
-- coordinator's partition was last re-established? Only then must Postgres
-- be asked ('check'): every probe of the id in the filter is set. The
-- caller passes two 32-bit hashes of the id; probe i is (h1 + i * h2) mod m
-- (scripts::bloom_positions computes the same when building the filter).
local function maybe_seen()
  if CHECKED or PART_OF then
    return false
  end
  -- check_markers read the coordinator's marker (KEYS[2]) just before.
  local m = MARKER_FIELDS[KEYS[2]]
  if not m then
    m = redis.call('HMGET', KEYS[2], 'epoch', 'flushed', 'heal', 'gate', 'seen_until', 'seen_bits')
  end
  if not m[5] or tonumber(m[5]) <= NOW or not m[6] then
    return false
  end
  local bits = tonumber(m[6])
  local at = LINES_AT + 4 * N
  local h1, h2 = tonumber(ARGV[at]), tonumber(ARGV[at + 1])
  for i = 0, 6 do
    if redis.call('GETBIT', KEYS[3], (h1 + i * h2) % bits) == 0 then
      return false
    end
  end
  return true
end

-- Writes the new state of one item (version + 1) and appends its event;
-- `exp` (reserve events only) is the hold's expiry, for the flusher; `fp`
-- the request's fingerprint, so that Postgres can answer replays.
-- Returns the level {sku, loc, avail, resv, ver} for the reply.
local function write_stock(key, events, sku, loc, op, avail, resv, ver, d_avail, d_resv, exp)
  local a, r, v = avail + d_avail, resv + d_resv, ver + 1
  local ta, tr, tv = int(a), int(r), int(v)
  if ver == 0 then
    redis.call('HSET', key, 'sku', sku, 'loc', loc, 'avail', ta, 'resv', tr, 'ver', tv)
  else
    redis.call('HSET', key, 'avail', ta, 'resv', tr, 'ver', tv)
  end
  if exp then
    redis.call('XADD', events, '*', 'sku', sku, 'loc', loc, 'op', op,
      'd_avail', int(d_avail), 'd_resv', int(d_resv), 'avail', ta, 'resv', tr, 'ver', tv,
      'ref', ID, 'ts', NOW_TEXT, 'fp', FP, 'exp', int(exp))
  else
    redis.call('XADD', events, '*', 'sku', sku, 'loc', loc, 'op', op,
      'd_avail', int(d_avail), 'd_resv', int(d_resv), 'avail', ta, 'resv', tr, 'ver', tv,
      'ref', ID, 'ts', NOW_TEXT, 'fp', FP)
  end
  return { sku, loc, a, r, v }
end

-- Validates every line's item before any write: returns the items' state
-- when all lines can be applied, else the status and payload of the refusal.
-- `delta_of(qty)` gives the change of avail.
local function check_lines(width, delta_of)
  local missing, short, over, state = {}, {}, {}, {}
  for i = 1, N do
    local sku, loc, qty = line(i)
    local avail, resv, ver = read_stock(stock_key(width, i))
    if not avail then
      missing[#missing + 1] = { sku, loc }
    else
      local d = delta_of(qty)
      if avail + d < 0 then
        short[#short + 1] = { sku, loc, -d, avail }
      elseif avail + d > MAX_AVAILABLE then
        over[#over + 1] = { sku, loc, d, avail }
      end
      state[i] = { avail, resv, ver }
    end
  end
  if #missing > 0 then
    return nil, 'missing', cjson.encode(missing)
  end
  if #short > 0 then
    return nil, 'short', cjson.encode(short)
  end
  if #over > 0 then
    return nil, 'ceiling', cjson.encode(over)
  end
  return state
end

-- The locator: fingerprint, partitions and every line of the request, in
-- the id's own partition, so that an operation that carries only the id
-- (Commit, Release, Extend, a retry) finds it; and it makes an id reused for
-- another request visible whatever partitions the earlier one touched.
local function locator_key()
  return HAS_LOCATOR and KEYS[4] or KEYS[1]
end

-- True when the locator names another request under this id.
local function locator_conflict()
  if not HAS_LOCATOR then
    return false
  end
  local fp = redis.call('HGET', KEYS[4], 'fp')
  return fp ~= false and fp ~= FP
end

-- Every line as {sku, location, amount}, in request order.
local function all_lines()
  local all = {}
  for i = 1, N do
    local sku, loc, amount = line(i)
    all[i] = { sku, loc, amount }
  end
  return cjson.encode(all)
end

-- The locator's fields, for the coordinator record's own HSET when the
-- record is the locator (no flag L): one redis.call fewer than
-- write_locator, and a call is a good part of a request's cost. Empty
-- when the locator is separate (then write_locator writes it).
-- `all_json`, when the caller has it, is all_lines() already encoded.
local function locator_fields(all_json)
  if HAS_LOCATOR then
    return {}
  end
  return { 'parts', PARTS, 'all', all_json or all_lines() }
end

-- Writes the locator; `ttl_ms` bounds a separate locator's life (the
-- coordinator record gets its own expiry when the request finishes).
local function write_locator(ttl_ms)
  local key = locator_key()
  redis.call('HSET', key, 'fp', FP, 'parts', PARTS, 'all', all_lines())
  if HAS_LOCATOR then
    redis.call('PEXPIRE', key, ttl_ms)
  end
end
