//! Read queries of the investigation API (`/api/runs`, `/api/segments`,
//! `/api/compare`) on the ledger's reader connection.
//!
//! # Which calls belong to which run
//!
//! A run id can be reused: a call with the id of an ended run starts a new
//! run (SPEC §9), and the `runs` table tells them apart by `started_ms`. The
//! calls of one run instance are the calls with its id made after the
//! previous instance of that id ended and no later than its own end:
//! `prev_end < ts_ms <= ended_ms`. The calls of a live run are those after
//! the id's last end.
//!
//! Every function here is blocking (SQLite); the API runs them in
//! `spawn_blocking`. Time bounds are inclusive on both ends.

use super::RunRecord;
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, Row};

use crate::money::Money;

/// `[since, until]` in unix milliseconds, both inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub since_ms: u64,
    pub until_ms: u64,
}

/// Token counts of a call or summed over a run. `prompt` includes cache
/// reads and writes; `completion` includes reasoning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub cached_prompt: u64,
    pub cache_write: u64,
    pub completion: u64,
    pub reasoning: u64,
}

impl Tokens {
    /// Prompt plus completion: every billed token once.
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// One ended run, from the `runs` table, with figures summed from its calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedRun {
    /// The run's own record, as the writer stored it.
    pub record: RunRecord,
    /// End of the previous run under the same id (`-1`: none): the run's
    /// calls are those after it.
    pub prev_end_ms: i64,
    pub tokens: Tokens,
    pub estimated_calls: u64,
}

/// One call of the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRow {
    pub ts_ms: u64,
    pub route: String,
    pub provider: String,
    pub model: Option<String>,
    pub tool: Option<String>,
    pub status: u16,
    pub outcome: String,
    pub tokens: Tokens,
    pub cost: Money,
    pub latency_ms: u64,
    pub ttfb_ms: Option<u64>,
    pub streamed: bool,
    pub estimated: bool,
    pub sdk_retry: bool,
    pub repeat_after_failure: bool,
    pub duplicate_body: bool,
    pub price_entry: Option<String>,
    pub price_version: String,
}

/// Order of `/api/runs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunSort {
    /// Most expensive first.
    Cost,
    /// Newest start first.
    Started,
    /// Newest end first.
    Ended,
}

/// Filters of `/api/runs` that the ledger applies.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub since_ms: Option<u64>,
    pub until_ms: u64,
    pub release: Option<String>,
    pub request_type: Option<String>,
    /// `ok` or `error`.
    pub status: Option<String>,
}

/// A grouping key of `/api/segments`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SegmentKey {
    Release,
    Model,
    Tool,
    RequestType,
}

impl SegmentKey {
    pub const ALL: [SegmentKey; 4] = [
        SegmentKey::Release,
        SegmentKey::Model,
        SegmentKey::Tool,
        SegmentKey::RequestType,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SegmentKey::Release => "release",
            SegmentKey::Model => "model",
            SegmentKey::Tool => "tool",
            SegmentKey::RequestType => "request_type",
        }
    }

    pub fn parse(text: &str) -> Option<SegmentKey> {
        SegmentKey::ALL.into_iter().find(|k| k.name() == text)
    }

    /// `model` and `tool` are properties of calls, not of runs.
    pub fn is_call_level(self) -> bool {
        matches!(self, SegmentKey::Model | SegmentKey::Tool)
    }

    /// The column (same name in `calls` and, for run-level keys, `runs`).
    fn column(self) -> &'static str {
        self.name()
    }
}

/// The values of a segment's keys, in the order of the requested keys.
pub type SegmentValues = Vec<Option<String>>;

/// Spend of one segment in the window (all calls, refused ones included in
/// the sums, where they cost nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallAggregate {
    /// Calls that were not refused.
    pub calls: u64,
    /// Of those, calls charged an estimate.
    pub estimated: u64,
    pub cost: Money,
    pub llm_cost: Money,
    pub tool_cost: Money,
}

/// Per-run figures of one release over the runs that ended in a window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReleaseRuns {
    /// Run totals, one per run.
    pub costs: Vec<Money>,
    pub llm_cost: Money,
    pub tool_cost: Money,
    pub tokens: u64,
    pub retries: u64,
    pub calls: u64,
    /// All calls of the release in the window (for the burn rate).
    pub window_spend: Money,
    /// Calls of the release in the window, refused ones included.
    pub window_calls: u64,
}

fn u(row: &Row<'_>, i: usize) -> rusqlite::Result<u64> {
    Ok(row.get::<_, Option<i64>>(i)?.unwrap_or(0).max(0) as u64)
}

fn money(row: &Row<'_>, i: usize) -> rusqlite::Result<Money> {
    u(row, i).map(Money::from_picos)
}

fn int(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// `prev_end` of the run row aliased `r`.
const PREV_END: &str = "COALESCE((SELECT MAX(p.ended_ms) FROM runs p
    WHERE p.run_id = r.run_id AND p.started_ms < r.started_ms), -1)";

const RUN_COLUMNS: &str = "r.run_id, r.release, r.request_type, r.status, r.stop_reason,
    r.started_ms, r.ended_ms, r.ceiling_pico, r.cost_pico, r.llm_cost_pico, r.tool_cost_pico,
    r.calls, r.refusals, r.retries, r.repeated_calls, r.breached, r.evicted";

fn ended_run_from_row(row: &Row<'_>) -> rusqlite::Result<EndedRun> {
    Ok(EndedRun {
        record: RunRecord {
            run_id: row.get(0)?,
            release: row.get(1)?,
            request_type: row.get(2)?,
            status: row.get(3)?,
            stop_reason: row.get(4)?,
            started_ms: u(row, 5)?,
            ended_ms: u(row, 6)?,
            ceiling: money(row, 7)?,
            cost: money(row, 8)?,
            llm_cost: money(row, 9)?,
            tool_cost: money(row, 10)?,
            calls: u(row, 11)?,
            refusals: u(row, 12)?,
            retries: u(row, 13)?,
            repeated_calls: u(row, 14)?,
            breached: row.get(15)?,
            evicted: row.get(16)?,
        },
        prev_end_ms: row.get(17)?,
        tokens: Tokens::default(),
        estimated_calls: 0,
    })
}

/// Tokens and estimated-call count of the calls of `run_id` with
/// `after_ms < ts_ms <= until_ms` (`until_ms` `None`: no upper bound).
pub fn run_call_totals(
    conn: &Connection,
    run_id: &str,
    after_ms: i64,
    until_ms: Option<u64>,
) -> rusqlite::Result<(Tokens, u64)> {
    conn.query_row(
        "SELECT SUM(prompt_tokens), SUM(cached_tokens), SUM(cache_write_tokens),
                SUM(completion_tokens), SUM(reasoning_tokens), SUM(estimated)
         FROM calls WHERE run_id = ?1 AND ts_ms > ?2 AND ts_ms <= ?3",
        params![run_id, after_ms, int(until_ms.unwrap_or(u64::MAX))],
        |row| {
            Ok((
                Tokens {
                    prompt: u(row, 0)?,
                    cached_prompt: u(row, 1)?,
                    cache_write: u(row, 2)?,
                    completion: u(row, 3)?,
                    reasoning: u(row, 4)?,
                },
                u(row, 5)?,
            ))
        },
    )
}

/// Sums `tokens` and `estimated_calls` of an ended run from its calls.
pub fn fill_call_totals(conn: &Connection, run: &mut EndedRun) -> rusqlite::Result<()> {
    let (tokens, estimated) = run_call_totals(
        conn,
        &run.record.run_id,
        run.prev_end_ms,
        Some(run.record.ended_ms),
    )?;
    run.tokens = tokens;
    run.estimated_calls = estimated;
    Ok(())
}

fn with_call_totals(conn: &Connection, mut run: EndedRun) -> rusqlite::Result<EndedRun> {
    let (tokens, estimated) = run_call_totals(
        conn,
        &run.record.run_id,
        run.prev_end_ms,
        Some(run.record.ended_ms),
    )?;
    run.tokens = tokens;
    run.estimated_calls = estimated;
    Ok(run)
}

/// The ended run `run_id`: the one that started at `started_ms`, else the
/// latest.
pub fn ended_run(
    conn: &Connection,
    run_id: &str,
    started_ms: Option<u64>,
) -> rusqlite::Result<Option<EndedRun>> {
    let sql = format!(
        "SELECT {RUN_COLUMNS}, {PREV_END} FROM runs r
         WHERE r.run_id = ?1 AND (?2 IS NULL OR r.started_ms = ?2)
         ORDER BY r.started_ms DESC LIMIT 1"
    );
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query_map(params![run_id, started_ms.map(int)], ended_run_from_row)?;
    match rows.next() {
        Some(run) => with_call_totals(conn, run?).map(Some),
        None => Ok(None),
    }
}

/// When the id's latest ended run ended (`-1`: never): a live run's calls
/// are the ones after it.
pub fn last_end(conn: &Connection, run_id: &str) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COALESCE(MAX(ended_ms), -1) FROM runs WHERE run_id = ?1",
        params![run_id],
        |row| row.get(0),
    )
}

/// Calls of `run_id` with `after_ms < ts_ms <= until_ms`, in call order,
/// one page, and how many there are.
pub fn run_calls(
    conn: &Connection,
    run_id: &str,
    after_ms: i64,
    until_ms: Option<u64>,
    limit: u64,
    offset: u64,
) -> rusqlite::Result<(Vec<CallRow>, u64)> {
    let until = int(until_ms.unwrap_or(u64::MAX));
    let total: i64 = conn.query_row(
        "SELECT COUNT(*) FROM calls WHERE run_id = ?1 AND ts_ms > ?2 AND ts_ms <= ?3",
        params![run_id, after_ms, until],
        |row| row.get(0),
    )?;
    let mut stmt = conn.prepare(
        "SELECT ts_ms, route, provider, model, tool, status, outcome,
                prompt_tokens, cached_tokens, cache_write_tokens, completion_tokens, reasoning_tokens,
                cost_pico, latency_ms, ttfb_ms, streamed, estimated, sdk_retry, repeat_after_failure,
                duplicate_body, price_entry, price_version
         FROM calls WHERE run_id = ?1 AND ts_ms > ?2 AND ts_ms <= ?3
         ORDER BY ts_ms, id LIMIT ?4 OFFSET ?5",
    )?;
    let rows = stmt.query_map(
        params![run_id, after_ms, until, int(limit), int(offset)],
        |row| {
            Ok(CallRow {
                ts_ms: u(row, 0)?,
                route: row.get(1)?,
                provider: row.get(2)?,
                model: row.get(3)?,
                tool: row.get(4)?,
                status: u16::try_from(u(row, 5)?).unwrap_or(0),
                outcome: row.get(6)?,
                tokens: Tokens {
                    prompt: u(row, 7)?,
                    cached_prompt: u(row, 8)?,
                    cache_write: u(row, 9)?,
                    completion: u(row, 10)?,
                    reasoning: u(row, 11)?,
                },
                cost: money(row, 12)?,
                latency_ms: u(row, 13)?,
                ttfb_ms: row.get::<_, Option<i64>>(14)?.map(|v| v.max(0) as u64),
                streamed: row.get(15)?,
                estimated: row.get(16)?,
                sdk_retry: row.get(17)?,
                repeat_after_failure: row.get(18)?,
                duplicate_body: row.get(19)?,
                price_entry: row.get(20)?,
                price_version: row.get(21)?,
            })
        },
    )?;
    let calls = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((calls, total.max(0) as u64))
}

/// Ended runs matching `filter` (ended in `[since, until]`), sorted, one
/// page (`limit` rows from `offset`), and how many match. `tokens` and
/// `estimated_calls` are left at zero: [`fill_call_totals`] adds them for
/// the rows that are shown.
pub fn ended_runs(
    conn: &Connection,
    filter: &RunFilter,
    sort: RunSort,
    limit: u64,
    offset: u64,
) -> rusqlite::Result<(Vec<EndedRun>, u64)> {
    const WHERE: &str = "r.ended_ms >= ?1 AND r.ended_ms <= ?2
        AND (?3 IS NULL OR r.release = ?3)
        AND (?4 IS NULL OR r.request_type = ?4)
        AND (?5 IS NULL OR r.status = ?5)";
    let mut args: Vec<Value> = vec![
        Value::Integer(int(filter.since_ms.unwrap_or(0))),
        Value::Integer(int(filter.until_ms)),
    ];
    for value in [&filter.release, &filter.request_type, &filter.status] {
        args.push(value.clone().map_or(Value::Null, Value::Text));
    }
    let total: i64 = conn.query_row(
        &format!("SELECT COUNT(*) FROM runs r WHERE {WHERE}"),
        params_from_iter(args.iter()),
        |row| row.get(0),
    )?;
    let order = match sort {
        RunSort::Cost => "r.cost_pico DESC, r.started_ms DESC, r.run_id",
        RunSort::Started => "r.started_ms DESC, r.run_id",
        RunSort::Ended => "r.ended_ms DESC, r.started_ms DESC, r.run_id",
    };
    args.push(Value::Integer(int(limit)));
    args.push(Value::Integer(int(offset)));
    let sql = format!(
        "SELECT {RUN_COLUMNS}, {PREV_END} FROM runs r WHERE {WHERE}
         ORDER BY {order} LIMIT ?6 OFFSET ?7"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params_from_iter(args.iter()), ended_run_from_row)?;
    let runs = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((runs, total.max(0) as u64))
}

/// Ids with a call at or after `recent_ms` and no end after their last
/// call: the runs that may be live (the budget registry decides).
pub fn live_run_candidates(conn: &Connection, recent_ms: u64) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(
        "SELECT c.run_id FROM calls c
         WHERE c.ts_ms >= ?1 AND c.run_id IS NOT NULL
         GROUP BY c.run_id
         HAVING MAX(c.ts_ms) > COALESCE((SELECT MAX(r.ended_ms) FROM runs r WHERE r.run_id = c.run_id), -1)",
    )?;
    let rows = stmt.query_map(params![int(recent_ms)], |row| row.get(0))?;
    rows.collect()
}

fn key_columns(keys: &[SegmentKey], table: &str) -> String {
    keys.iter()
        .map(|k| format!("{table}.{}", k.column()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn key_values(row: &Row<'_>, count: usize) -> rusqlite::Result<SegmentValues> {
    (0..count)
        .map(|i| row.get::<_, Option<String>>(i))
        .collect()
}

/// Spend per segment of the calls made in `window`, grouped by the call's
/// own `keys` columns.
pub fn segment_calls(
    conn: &Connection,
    window: Window,
    keys: &[SegmentKey],
) -> rusqlite::Result<Vec<(SegmentValues, CallAggregate)>> {
    let cols = key_columns(keys, "c");
    let sql = format!(
        "SELECT {cols},
                SUM(c.outcome <> 'refused'),
                SUM(c.outcome <> 'refused' AND c.estimated),
                SUM(c.cost_pico),
                SUM(CASE WHEN c.provider = 'tool' THEN 0 ELSE c.cost_pico END),
                SUM(CASE WHEN c.provider = 'tool' THEN c.cost_pico ELSE 0 END)
         FROM calls c WHERE c.ts_ms >= ?1 AND c.ts_ms <= ?2
         GROUP BY {cols}"
    );
    let n = keys.len();
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params![int(window.since_ms), int(window.until_ms)], |row| {
        Ok((
            key_values(row, n)?,
            CallAggregate {
                calls: u(row, n)?,
                estimated: u(row, n + 1)?,
                cost: money(row, n + 2)?,
                llm_cost: money(row, n + 3)?,
                tool_cost: money(row, n + 4)?,
            },
        ))
    })?;
    rows.collect()
}

/// One entry per (run that ended in `window`, segment it belongs to) with
/// the run's cost in that segment. With run-level keys only, that is the
/// run's total from the `runs` table; with `model` or `tool` among the keys,
/// a run belongs to every segment it has calls in (grouped by the calls'
/// columns) and its cost there is the cost of those calls.
pub fn segment_runs(
    conn: &Connection,
    window: Window,
    keys: &[SegmentKey],
) -> rusqlite::Result<Vec<(SegmentValues, Money)>> {
    let n = keys.len();
    let window_params = params![int(window.since_ms), int(window.until_ms)];
    if keys.iter().all(|k| !k.is_call_level()) {
        let sql = format!(
            "SELECT {}, r.cost_pico FROM runs r WHERE r.ended_ms >= ?1 AND r.ended_ms <= ?2",
            key_columns(keys, "r")
        );
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(window_params, |row| {
            Ok((key_values(row, n)?, money(row, n)?))
        })?;
        return rows.collect();
    }
    let cols = key_columns(keys, "c");
    let sql = format!(
        "WITH w AS (
            SELECT r.run_id, r.started_ms, r.ended_ms, {PREV_END} AS prev_end
            FROM runs r WHERE r.ended_ms >= ?1 AND r.ended_ms <= ?2)
         SELECT {cols}, SUM(c.cost_pico)
         FROM w JOIN calls c ON c.run_id = w.run_id AND c.ts_ms > w.prev_end AND c.ts_ms <= w.ended_ms
         GROUP BY w.run_id, w.started_ms, {cols}"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(window_params, |row| {
        Ok((key_values(row, n)?, money(row, n)?))
    })?;
    rows.collect()
}

/// Figures of `release` for `/api/compare`: its runs that ended in
/// `window` (and their calls), and its calls in the window.
pub fn release_runs(
    conn: &Connection,
    window: Window,
    release: &str,
) -> rusqlite::Result<ReleaseRuns> {
    let bounds = (int(window.since_ms), int(window.until_ms));
    let mut out = ReleaseRuns::default();
    {
        let mut stmt = conn.prepare(
            "SELECT cost_pico, llm_cost_pico, tool_cost_pico, retries, calls FROM runs
             WHERE release = ?3 AND ended_ms >= ?1 AND ended_ms <= ?2",
        )?;
        let mut rows = stmt.query(params![bounds.0, bounds.1, release])?;
        while let Some(row) = rows.next()? {
            out.costs.push(money(row, 0)?);
            out.llm_cost = out.llm_cost.saturating_add(money(row, 1)?);
            out.tool_cost = out.tool_cost.saturating_add(money(row, 2)?);
            out.retries = out.retries.saturating_add(u(row, 3)?);
            out.calls = out.calls.saturating_add(u(row, 4)?);
        }
    }
    out.tokens = conn.query_row(
        &format!(
            "WITH w AS (
                SELECT r.run_id, r.ended_ms, {PREV_END} AS prev_end
                FROM runs r WHERE r.release = ?3 AND r.ended_ms >= ?1 AND r.ended_ms <= ?2)
             SELECT SUM(COALESCE(c.prompt_tokens, 0) + COALESCE(c.completion_tokens, 0))
             FROM w JOIN calls c ON c.run_id = w.run_id AND c.ts_ms > w.prev_end AND c.ts_ms <= w.ended_ms"
        ),
        params![bounds.0, bounds.1, release],
        |row| u(row, 0),
    )?;
    (out.window_spend, out.window_calls) = conn.query_row(
        "SELECT SUM(cost_pico), COUNT(*) FROM calls
         WHERE release = ?3 AND ts_ms >= ?1 AND ts_ms <= ?2",
        params![bounds.0, bounds.1, release],
        |row| Ok((money(row, 0)?, u(row, 1)?)),
    )?;
    Ok(out)
}
