-- END: claim one run exactly once.
-- KEYS: run hash, idle set.
-- ARGV: run id, mode (explicit|idle), now, idle_before, stuck_before.
-- Returns the run's fields (HGETALL) to the one caller that claimed it,
-- nil to everyone else.
return end_run(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
