-- coordinate.lua: the coordinator of a reservation or decrement that spans
-- partitions on a Redis Cluster, where no script may touch two partitions.
-- It lives in the id's own partition and is the one place where the
-- request's fate is decided; the parts (reserve.lua / finish.lua with flag
-- P<n> in each partition) follow it. Every decision is a compare-and-set on
-- the coordinator's state, so concurrent attempts, the client's retries
-- and the reapers of every instance agree.
--
-- States: pending → held | refused | aborted (a reservation);
--         held → committed | released | expired;
--         pending → applied | refused (a decrement, whose parts are an
--         internal hold and its commit; `attempt` numbers the hold).
--
-- KEYS   [1] the coordinator record (`NS:{pH}:resv:<id>` or
--        `NS:{pH}:idem:<id>`), [2] the partition's marker, [3] its Bloom
--        filter of ids Postgres knew.
-- ARGV   [1] id, [2] fingerprint, [3] verb, [4] flags ('C': Postgres was
--        asked already), [5], [6] two hashes of the id (see layout.lua),
--        then the verb's arguments:
--          'begin' parts all window
--              → 'new' | 'pending' attempt | 'exists' | 'check'
--                | 'decided' state out | 'refused' why out
--          'decide' state out window [ttl_ms]
--              pending → state ('held': exp = now + ttl_ms, stored in out's
--              place of "%EXP%"; 'refused': why = first word of out)
--              → 'ok' out | 'decided' state out | 'refused' why out
--              (someone decided first)
--          'finish' op        held → committed|released|expired ('unknown'
--              when the request never held: refused, aborted, pending); a commit
--              of a lapsed hold is refused ('state' expired); a release of
--              a lapsed one expires it (a replay for the client)
--              → 'ok' final | 'replay' final fin | 'state' state
--          'fin' out window   stores the finish outcome; the record expires
--              after the window
--          'extend' ttl_ms    → 'ok' exp | 'state' state
--          'abort' stale_ms   pending and older than stale_ms → aborted
--              → 'ok' state (the state after)
--          'reattempt'        pending → attempt + 1 → 'ok' attempt
--          'read'             → 'ok' state exp attempt
-- Returns a flat array {status, ...} as above, or {'lost'|'healing', key}.
local key = KEYS[1]
local ID, FP, verb, flags = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local refused = marker_refusal(KEYS[2], nil)
if refused then
  return refused
end

local rec = redis.call('HMGET', key, 'fp', 'state', 'out', 'why', 'exp', 'attempt', 'since', 'fin')
local fp, state, out, why, exp, attempt, since, fin =
  rec[1], rec[2], rec[3], rec[4], rec[5], rec[6], rec[7], rec[8]

if verb == 'begin' then
  local parts, all, window = ARGV[7], ARGV[8], tonumber(ARGV[9])
  if fp then
    if fp ~= FP then
      return { 'exists' }
    end
    if state == 'pending' then
      return { 'pending', attempt or '1' }
    end
    if state == 'refused' then
      return { 'refused', why or 'short', out or '' }
    end
    return { 'decided', state, out or '', fin or '' }
  end
  if not string.find(flags, 'C', 1, true) then
    local m = redis.call('HMGET', KEYS[2], 'seen_until', 'seen_bits')
    if m[1] and tonumber(m[1]) > NOW and m[2] then
      local bits = tonumber(m[2])
      local h1, h2 = tonumber(ARGV[5]), tonumber(ARGV[6])
      local maybe = true
      for i = 0, 6 do
        if redis.call('GETBIT', KEYS[3], (h1 + i * h2) % bits) == 0 then
          maybe = false
          break
        end
      end
      if maybe then
        return { 'check' }
      end
    end
  end
  redis.call('HSET', key, 'fp', FP, 'parts', parts, 'all', all, 'state', 'pending',
    'since', NOW, 'attempt', 1)
  -- A pending request nobody finishes goes away with the window.
  redis.call('PEXPIRE', key, window)
  return { 'new' }
end

if not fp or fp ~= FP then
  return { 'unknown' }
end

-- A reservation that was refused, aborted or is still being decided never
-- held anything: to Commit, Release and Extend it does not exist, as on a
-- single Redis (finish.lua answers 'unknown' for a stored refusal).
if (verb == 'finish' or verb == 'extend')
  and (state == 'refused' or state == 'aborted' or state == 'pending') then
  return { 'unknown' }
end

if verb == 'decide' then
  local decided, payload, window = ARGV[7], ARGV[8], tonumber(ARGV[9])
  if state == 'refused' then
    return { 'refused', why or 'short', out or '' }
  end
  if state ~= 'pending' then
    return { 'decided', state, out or '' }
  end
  if decided == 'held' then
    local at = NOW + tonumber(ARGV[10])
    payload = string.gsub(payload, '"%%EXP%%"', tostring(at))
    redis.call('HSET', key, 'state', 'held', 'out', payload, 'exp', at)
    redis.call('PERSIST', key)
  elseif decided == 'refused' then
    local reason, detail = string.match(payload, '^(%S+) (.*)$')
    redis.call('HSET', key, 'state', 'refused', 'why', reason, 'out', detail)
    redis.call('PEXPIRE', key, window)
  else
    redis.call('HSET', key, 'state', decided, 'out', payload)
  end
  return { 'ok', payload }
end

if verb == 'finish' then
  local op = ARGV[7]
  local final = ({ commit = 'committed', release = 'released', expire = 'expired' })[op]
  if state == final then
    return { 'replay', final, fin or '' }
  end
  if state ~= 'held' then
    return { 'state', state }
  end
  local due = NOW >= tonumber(exp)
  if op == 'commit' and due then
    return { 'state', 'expired' }
  end
  if op == 'expire' and not due then
    return { 'state', 'held' }
  end
  if op == 'release' and due then
    final = 'expired'
  end
  redis.call('HSET', key, 'state', final)
  return { 'ok', final }
end

if verb == 'fin' then
  redis.call('HSET', key, 'fin', ARGV[7])
  redis.call('PEXPIRE', key, tonumber(ARGV[8]))
  return { 'ok' }
end

if verb == 'extend' then
  if state ~= 'held' then
    return { 'state', state }
  end
  if NOW >= tonumber(exp) then
    return { 'state', 'expired' }
  end
  local at = NOW + tonumber(ARGV[7])
  redis.call('HSET', key, 'exp', at)
  return { 'ok', tostring(at) }
end

if verb == 'abort' then
  if state == 'pending' and NOW - tonumber(since) >= tonumber(ARGV[7]) then
    redis.call('HSET', key, 'state', 'aborted')
    return { 'ok', 'aborted' }
  end
  return { 'ok', state }
end

if verb == 'reattempt' then
  if state ~= 'pending' then
    return { 'state', state }
  end
  local next_attempt = tonumber(attempt or '1') + 1
  redis.call('HSET', key, 'attempt', next_attempt)
  return { 'ok', tostring(next_attempt) }
end

if verb == 'read' then
  return { 'ok', state, exp or '', attempt or '1' }
end

return redis.error_reply('coordinate.lua: unknown verb ' .. tostring(verb))
