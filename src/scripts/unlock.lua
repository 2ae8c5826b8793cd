-- unlock.lua: release a lock only if we still hold it.
--
-- KEYS   [1] the lock key.
-- ARGV   [1] the token the holder set.
-- Returns 1 when released, 0 when the lock had expired or another holder
--         has it now (whose lock must not be removed).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
