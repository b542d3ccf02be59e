-- Store result documents as Celery's Redis backend does (SET with a TTL, then PUBLISH for
-- AsyncResult.get()), with Celery's rule: a stored SUCCESS is never overwritten, whoever
-- sends a job under the same task id afterwards.
--
-- KEYS: the result keys. ARGV: the TTL in seconds, then one document per key.
-- Returns the keys left as they were.
--
-- An existing document is decoded only when there is one (a job run twice, or a task id
-- reused): the common case costs a GET.
local kept = {}
for i, key in ipairs(KEYS) do
  local current = redis.call('GET', key)
  local final = false
  if current then
    local ok, doc = pcall(cjson.decode, current)
    final = ok and type(doc) == 'table' and doc['status'] == 'SUCCESS'
  end
  if final then
    kept[#kept + 1] = key
  else
    redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1])
    redis.call('PUBLISH', key, ARGV[i + 1])
  end
end
return kept
