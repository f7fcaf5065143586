-- END: claim one run exactly once.
-- KEYS: run hash, idle set.
-- ARGV: run id, mode (explicit|idle), now, idle_before, stuck_before,
--       gen ('' for any incarnation; else only that one is claimed).
-- Returns the run's fields (HGETALL) to the one caller that claimed it,
-- nil to everyone else.
if ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'gen') ~= ARGV[6] then
  return false
end
return end_run(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
