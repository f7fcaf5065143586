#!/usr/bin/env python3
"""The cost of a release's calls in a window (the query behind /api/compare's
window spend), with and without an index on calls(release, ts_ms).

Builds a throwaway SQLite ledger of CALLS calls (default 1,000,000) over 30
days and four releases, with the `calls_ts` and `calls_run` indexes the
embedded ledger has; times the query (best of 3) for 1-, 7- and 30-day
windows, for the release that fills the latest window and for the first
one, then adds the release index and times it again. Prints each query
plan. Uses Python's own sqlite3 module: the plans are SQLite's, the times
are this machine's. Run: python3 scripts/ledger-release-query.py
"""
import os
import random
import sqlite3
import tempfile
import time

CALLS = int(os.environ.get("CALLS", 1_000_000))
T0 = 1_800_000_000_000
DAY = 86_400_000
RELEASES = ["2026-11-01", "2026-11-15", "2026-11-22", "2026-11-29"]
QUERY = """SELECT CAST(SUM(cost_pico) AS BIGINT), COUNT(*) FROM calls
           WHERE release = ?3 AND ts_ms >= ?1 AND ts_ms <= ?2"""


def build(conn):
    conn.execute(
        "CREATE TABLE calls (id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, run_id TEXT,"
        " release TEXT NOT NULL, cost_pico INTEGER NOT NULL, pad TEXT)"
    )
    rng = random.Random(1)

    def rows():
        for i in range(CALLS):
            # Each release fills a quarter of the month; a tenth of its
            # calls go to the next one (a release rolling out).
            release = min(3, (i * 4) // CALLS + (rng.random() < 0.1))
            yield (T0 + i * 30 * DAY // CALLS, f"run-{i // 20}", RELEASES[release],
                   1000 + i % 7, "x" * 150)

    conn.executemany(
        "INSERT INTO calls (ts_ms, run_id, release, cost_pico, pad) VALUES (?,?,?,?,?)", rows()
    )
    conn.execute("CREATE INDEX calls_ts ON calls(ts_ms)")
    conn.execute("CREATE INDEX calls_run ON calls(run_id, ts_ms)")
    conn.commit()


def measure(conn, label):
    until = T0 + 30 * DAY
    for days in (1, 7, 30):
        for release in (RELEASES[-1], RELEASES[0]):
            args = (until - days * DAY, until, release)
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                calls = conn.execute(QUERY, args).fetchone()[1]
                best = min(best, time.perf_counter() - started)
            plan = conn.execute("EXPLAIN QUERY PLAN " + QUERY, args).fetchall()[-1][-1]
            print(f"{label:16} {days:2}-day window, release {release}: {calls:7} calls,"
                  f" {best * 1000:7.1f} ms ({plan})")


with tempfile.TemporaryDirectory() as work:
    conn = sqlite3.connect(os.path.join(work, "ledger.db"))
    build(conn)
    measure(conn, "no release index")
    conn.execute("CREATE INDEX calls_release ON calls(release, ts_ms)")
    conn.commit()
    measure(conn, "release index")
