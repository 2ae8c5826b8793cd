-- unlock.lua: release a lock, or renew it, only if we still hold it.
--
-- KEYS   [1] the lock key.
-- ARGV   [1] the token the holder set; [2] (optional) a new time to live
--        in ms: renew instead of release.
-- Returns 1 when released (renewed), 0 when the lock had expired or another
--         holder has it now (whose lock must not be touched).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[2] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
  return redis.call('DEL', KEYS[1])
end
return 0
