-- repair.lua: make Postgres follow Redis for one drifted item, by writing a
-- `set` event that restates Redis's quantities (reconcile, REPAIR mode).
--
-- KEYS   [1] the item's stock hash, [2] its partition's events stream,
--        [3] its partition's marker.
-- ARGV   [1] reference (the reconcile run), [2] the version the reconcile
--        saw, [3] sku, [4] location, [5] d_avail, [6] d_resv: the event's
--        deltas, relative to what Postgres's ledger holds, so that its
--        deltas sum to the row again.
-- Returns {'ok', <new version>}; {'changed', <version>} when the item
--         changed (or vanished) since the reconcile looked: nothing written;
--         {'lost' | 'healing', marker key}.
-- Invariants: Redis quantities never change (Redis is the truth), so a
--         repair cannot oversell; the version goes up by exactly 1 with
--         exactly one event; the checks run before the only writes.
local key, events = KEYS[1], KEYS[2]
local refusal = marker_refusal(KEYS[3], nil)
if refusal then
  return refusal
end
local avail, resv, ver = read_stock(key)
if not avail or ver ~= tonumber(ARGV[2]) then
  return { 'changed', tostring(ver) }
end
redis.call('HSET', key, 'ver', ver + 1)
redis.call('XADD', events, '*', 'sku', ARGV[3], 'loc', ARGV[4], 'op', 'set',
  'd_avail', ARGV[5], 'd_resv', ARGV[6], 'avail', avail, 'resv', resv, 'ver', ver + 1,
  'ref', ARGV[1], 'ts', NOW)
return { 'ok', tostring(ver + 1) }
