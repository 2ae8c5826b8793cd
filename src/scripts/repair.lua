-- repair.lua: make Postgres follow Redis for one drifted item, by writing a
-- `set` event that restates Redis's quantities (reconcile, REPAIR mode).
--
-- KEYS   [1] the item's stock hash, [2] its partition's events stream
--        (the standard layout with no own key: see prelude.lua).
-- ARGV   [1] reference (the reconcile run), [2] unused, [3] the version the
--        reconcile saw, [4] 0, [5] 0, [6] unused, [7] sku, [8] location,
--        [9] d_avail, [10] d_resv: the event's deltas, relative to what
--        Postgres's ledger holds, so that its deltas sum to the row again.
-- Returns {'ok', <new version>}; {'changed', <version>} when the item
--         changed (or vanished) since the reconcile looked: nothing written.
-- Invariants: Redis quantities never change (Redis is the truth), so a
--         repair cannot oversell; the version goes up by exactly 1 with
--         exactly one event; the check runs before the only writes.
local key, events = KEYS[1], KEYS[2]
local sku, loc = ARGV[7], ARGV[8]
local avail, resv, ver = read_stock(key)
if not avail or ver ~= tonumber(ARGV[3]) then
  return { 'changed', tostring(ver) }
end
local now = now_ms()
redis.call('HSET', key, 'ver', ver + 1)
redis.call('XADD', events, '*', 'sku', sku, 'loc', loc, 'op', 'set',
  'd_avail', ARGV[9], 'd_resv', ARGV[10], 'avail', avail, 'resv', resv, 'ver', ver + 1,
  'ref', ARGV[1], 'ts', now)
return { 'ok', tostring(ver + 1) }
