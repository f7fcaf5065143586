-- RESERVE: check the window caps and the run's ceiling, and reserve the
-- call's expected cost, in one step.
-- KEYS: gen counter, idle set, run hash, window counters...
-- ARGV: run id ('' without a run), reservation, ceiling of a new run,
--       header ceiling (already clamped) or '', mode (reserve|soft), now,
--       ttl, release, request type, retry (0|1), repeated (0|1),
--       one limit per window counter.
-- Returns {'admitted'|'run'|'window', gen, spent, reserved, ceiling} where
-- for 'window' spent/ceiling are the period's spend and the cap's limit and
-- gen is replaced by the 1-based index of the cap that refused.
local gen_key, idle, run = KEYS[1], KEYS[2], KEYS[3]
local run_id, reservation = ARGV[1], ARGV[2]
local now, ttl = ARGV[6], ARGV[7]
local has_run = run_id ~= ''

if has_run then
  if redis.call('EXISTS', run) == 0 then
    create_run(run, gen_key, now, ARGV[3], ARGV[8], ARGV[9])
  end
  if ARGV[4] ~= '' then
    redis.call('HSET', run, 'ceiling', ARGV[4])
  end
  touch(run, idle, run_id, now, ttl)
end

for i = 4, #KEYS do
  local spent = redis.call('GET', KEYS[i]) or '0'
  local limit = ARGV[8 + i]
  if not dec_gt(limit, spent) then
    if has_run then
      redis.call('HINCRBY', run, 'refusals', 1)
    end
    return {'window', tostring(i - 3), spent, '0', limit}
  end
end

if not has_run then
  return {'admitted', '0', '0', '0', '0'}
end

local gen = field(run, 'gen')
local spent = dec_sum(run, {field(run, 'llm'), field(run, 'tool')})
local ceiling = field(run, 'ceiling')
local refuse
if ARGV[5] == 'soft' then
  refuse = not dec_gt(ceiling, spent)
else
  refuse = dec_gt(dec_sum(run, {spent, field(run, 'reserved'), reservation}), ceiling)
end
if refuse then
  redis.call('HINCRBY', run, 'refusals', 1)
  return {'run', gen, spent, field(run, 'reserved'), ceiling}
end

redis.call('HINCRBY', run, 'reserved', reservation)
redis.call('HINCRBY', run, 'calls', 1)
redis.call('HINCRBY', run, 'in_flight', 1)
if ARGV[10] == '1' then
  redis.call('HINCRBY', run, 'retries', 1)
end
if ARGV[11] == '1' then
  redis.call('HINCRBY', run, 'repeated', 1)
end
return {'admitted', gen, spent, field(run, 'reserved'), ceiling}
