-- load.lua: copy items from Postgres into Redis where Redis lacks them or
-- holds an older version (preload, load on miss, re-warm).
--
-- KEYS   the stock hash of every item.
-- ARGV   5 per item, in KEYS order: sku, location, available, reserved,
--        version (as Postgres holds them).
-- Returns {loaded, skipped}: skipped items were at the same or a newer
--         version in Redis and are left untouched.
-- Invariants: never overwrites a newer (or equal) Redis state; writes no
--         event, because nothing changed: the item is copied at its
--         Postgres version, whose events are already in the ledger.
local loaded, skipped = 0, 0
for i = 1, #KEYS do
  local b = 5 * (i - 1)
  local version = tonumber(ARGV[b + 5])
  local current = redis.call('HGET', KEYS[i], 'ver')
  if current and tonumber(current) >= version then
    skipped = skipped + 1
  else
    redis.call('HSET', KEYS[i], 'sku', ARGV[b + 1], 'loc', ARGV[b + 2],
      'avail', ARGV[b + 3], 'resv', ARGV[b + 4], 'ver', version)
    loaded = loaded + 1
  end
end
return { loaded, skipped }
