-- SETTLE: swap a call's reservation for its cost, and add the cost to the
-- window counters.
-- KEYS: gen counter, idle set, run hash, window counters...
-- ARGV: run id ('' without a run), gen ('' when admitted without the store),
--       reservation, cost, kind (llm|tool), failed (0|1), now, ttl,
--       mode (settle|reconcile), ceiling, release, request type,
--       one ttl per window counter.
-- `settle` touches the run only when its generation matches (a call of an
-- ended incarnation must not charge a newer run of the same id).
-- `reconcile` (a settle that failed earlier, or a call admitted while the
-- store was unreachable) adds the cost to the run's current incarnation,
-- creating it if it is gone, and releases the reservation only for a
-- matching generation.
-- Returns 'settled', 'reconciled', 'stale' or 'windows'.
local gen_key, idle, run = KEYS[1], KEYS[2], KEYS[3]
local run_id, gen, reservation, cost = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now, ttl, mode = ARGV[7], ARGV[8], ARGV[9]

for i = 4, #KEYS do
  redis.call('INCRBY', KEYS[i], cost)
  redis.call('PEXPIRE', KEYS[i], ARGV[9 + i])
end
if run_id == '' then
  return 'windows'
end

local current = redis.call('HGET', run, 'gen')
local matches = current ~= false and current == gen
if not matches then
  if mode ~= 'reconcile' then
    return 'stale'
  end
  if current == false then
    create_run(run, gen_key, now, ARGV[10], ARGV[11], ARGV[12])
  end
  if gen == '' then
    -- Admitted while the store was unreachable: never counted here.
    redis.call('HINCRBY', run, 'calls', 1)
  end
else
  if reservation ~= '0' then
    redis.call('HINCRBY', run, 'reserved', '-' .. reservation)
  end
  redis.call('HINCRBY', run, 'in_flight', -1)
end
redis.call('HINCRBY', run, ARGV[5], cost)
redis.call('HSET', run, 'last_failed', ARGV[6], 'last_kind', ARGV[5])
touch(run, idle, run_id, now, ttl)
if matches then
  return 'settled'
end
return 'reconciled'
