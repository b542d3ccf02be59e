-- Take up to ARGV[1] messages off a queue's lists and record each as held, in one atomic step.
--
-- KEYS: kombu's unacked hash, its unacked index, the taking process's holder set, then the
-- lists to take from, in the order served (kombu keeps a message sent with a priority in a
-- list of its own).
-- ARGV: most messages, now (Unix s), a byte budget (once the messages taken reach it, no more
-- are taken; the first one always is), a tag for a message without one ('' leaves such a
-- message unrecorded), then per list the tail of its unacked record
-- (`,"<exchange>","<routing key>"]`).
-- Returns list index (1-based), tag, message, ... for each message taken.
--
-- The tag is found by text, not by decoding the JSON in Redis: decoding a 20,000-row batch
-- costs Redis milliseconds. A quote inside the body or any JSON string is escaped, so the
-- first `"delivery_tag"` is a key; clients write properties first, so it is found within
-- the first few hundred bytes.
local want = tonumber(ARGV[1])
local budget = tonumber(ARGV[3])
local bytes = 0
local out = {}
for k = 4, #KEYS do
  while want > 0 and bytes < budget do
    local raw = redis.call('RPOP', KEYS[k])
    if not raw then break end
    want = want - 1
    bytes = bytes + #raw
    local tag = ''
    local at = string.find(raw, '"delivery_tag"', 1, true)
    if at then
      tag = string.match(raw, '^"delivery_tag"%s*:%s*"([^"\\]+)"', at) or ''
      if #tag > 255 then tag = '' end
    end
    if tag == '' then tag = ARGV[4] end
    if tag ~= '' then
      redis.call('ZADD', KEYS[2], ARGV[2], tag)
      redis.call('HSET', KEYS[1], tag, '[' .. raw .. ARGV[k + 1])
      redis.call('SADD', KEYS[3], tag)
    end
    out[#out + 1] = k - 3
    out[#out + 1] = tag
    out[#out + 1] = raw
  end
end
return out
