-- Helpers every script starts with. Money is integer pico-dollars kept as
-- decimal strings: Lua numbers are doubles (exact only below 2^53), so sums
-- are done by Redis itself (HINCRBY, exact int64) and comparisons on the
-- decimal strings Redis returns.

-- a > b for integers written in decimal without leading zeros.
local function dec_gt(a, b)
  local a_neg = string.sub(a, 1, 1) == '-'
  local b_neg = string.sub(b, 1, 1) == '-'
  if a_neg ~= b_neg then
    return b_neg
  end
  if a_neg then
    a, b = string.sub(b, 2), string.sub(a, 2)
  end
  if #a ~= #b then
    return #a > #b
  end
  return a > b
end

-- The exact sum of decimal strings, added up by Redis in a scratch field of
-- `key` that is gone again before the script ends.
local function dec_sum(key, parts)
  redis.call('HSET', key, '_sum', '0')
  for _, part in ipairs(parts) do
    redis.call('HINCRBY', key, '_sum', part)
  end
  local sum = redis.call('HGET', key, '_sum')
  redis.call('HDEL', key, '_sum')
  return sum
end

local function field(key, name)
  return redis.call('HGET', key, name) or '0'
end

-- Marks the run active now: idle score, last seen, expiry pushed back.
local function touch(run, idle, run_id, now, ttl)
  redis.call('HSET', run, 'last_seen_ms', now)
  redis.call('PEXPIRE', run, ttl)
  redis.call('ZADD', idle, now, run_id)
end

-- A new incarnation of a run id, with a fresh generation number.
local function create_run(run, gen_key, now, ceiling, release, request_type)
  local gen = tostring(redis.call('INCR', gen_key))
  redis.call('HSET', run, 'gen', gen, 'llm', '0', 'tool', '0', 'reserved', '0',
    'ceiling', ceiling, 'calls', '0', 'refusals', '0', 'retries', '0',
    'repeated', '0', 'in_flight', '0', 'release', release,
    'request_type', request_type, 'started_ms', now, 'last_seen_ms', now,
    'last_failed', '0', 'last_kind', 'llm')
  return gen
end

-- Claims a run: its fields (HGETALL) once, then it is gone; false when it is
-- not there or (idle mode) not idle. `idle_before`: last seen before this is
-- idle; `stuck_before`: last seen before this is idle even with calls in
-- flight (the replica that held them died).
local function end_run(run, idle, run_id, mode, now, idle_before, stuck_before)
  if redis.call('EXISTS', run) == 0 then
    redis.call('ZREM', idle, run_id)
    return false
  end
  if mode == 'idle' then
    local seen = tonumber(field(run, 'last_seen_ms'))
    local in_flight = tonumber(field(run, 'in_flight'))
    if seen > tonumber(idle_before) then
      return false
    end
    if in_flight > 0 and seen > tonumber(stuck_before) then
      -- Busy: to the back of the idle queue so it does not hide others.
      redis.call('ZADD', idle, now, run_id)
      return false
    end
  end
  local all = redis.call('HGETALL', run)
  redis.call('DEL', run)
  redis.call('ZREM', idle, run_id)
  return all
end
