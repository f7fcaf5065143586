-- SWEEP: claim up to `limit` runs idle since before `idle_before`.
-- KEYS: idle set.
-- ARGV: run key prefix, now, idle_before, stuck_before, limit.
-- Run keys are built here from the ids in the idle set (fine on one Redis
-- server or a replicated pair; not for Redis Cluster).
-- Returns {run id, fields, run id, fields, ...} of the runs claimed.
local idle = KEYS[1]
local ids = redis.call('ZRANGEBYSCORE', idle, '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[5]))
local claimed = {}
for _, run_id in ipairs(ids) do
  local fields = end_run(ARGV[1] .. run_id, idle, run_id, 'idle', ARGV[2], ARGV[3], ARGV[4])
  if fields then
    claimed[#claimed + 1] = run_id
    claimed[#claimed + 1] = fields
  end
end
return claimed
