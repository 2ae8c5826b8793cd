-- claim.lua: write a request's locator in the id's own partition, after the
-- request was carried out in the one partition of its items (on a Redis
-- Cluster, where one script may not touch both). The locator is a hint:
-- Commit, Release and Extend find the reservation through it, and the
-- script they run checks the fingerprint in the item's partition.
--
-- KEYS   [1] the locator record (`NS:{pH}:resv:<id>` or `NS:{pH}:idem:<id>`),
--        [2] its partition's marker.
-- ARGV   [1] fingerprint, [2] partitions, [3] every line (JSON), [4] how
--        long to keep it, in ms.
-- Returns {'ok'} when written or already this request's; {'exists', fp}
--         when the id's locator names another request (an id reused for
--         another request in another partition: the caller logs and counts
--         it); {'lost' | 'healing', key}.
local refusal = marker_refusal(KEYS[2], nil)
if refusal then
  return refusal
end
local fp = redis.call('HGET', KEYS[1], 'fp')
if fp and fp ~= ARGV[1] then
  return { 'exists', fp }
end
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'parts', ARGV[2], 'all', ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
return { 'ok' }
