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
//! Every query is written once, in the portable SQL of
//! [`super::reader`], and runs on SQLite or PostgreSQL alike. Time bounds
//! are inclusive on both ends.

use super::reader::{clamp, Param, Reader, Row};
use super::{LedgerError, RunRecord};
use crate::budget::RestoredRun;
use crate::money::Money;

type Result<T> = std::result::Result<T, LedgerError>;

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

/// `prev_end` of the run row aliased `r`.
const PREV_END: &str = "COALESCE((SELECT MAX(p.ended_ms) FROM runs p
    WHERE p.run_id = r.run_id AND p.started_ms < r.started_ms), -1)";

const RUN_COLUMNS: &str = "r.run_id, r.release, r.request_type, r.status, r.stop_reason,
    r.started_ms, r.ended_ms, r.ceiling_pico, r.cost_pico, r.llm_cost_pico, r.tool_cost_pico,
    r.calls, r.refusals, r.retries, r.repeated_calls, r.breached, r.evicted";

fn ended_run_from_row(row: &Row) -> Result<EndedRun> {
    Ok(EndedRun {
        record: RunRecord {
            run_id: row.text(0)?,
            release: row.text(1)?,
            request_type: row.text(2)?,
            status: row.text(3)?,
            stop_reason: row.text(4)?,
            started_ms: row.uint(5)?,
            ended_ms: row.uint(6)?,
            ceiling: row.money(7)?,
            cost: row.money(8)?,
            llm_cost: row.money(9)?,
            tool_cost: row.money(10)?,
            calls: row.uint(11)?,
            refusals: row.uint(12)?,
            retries: row.uint(13)?,
            repeated_calls: row.uint(14)?,
            breached: row.flag(15)?,
            evicted: row.flag(16)?,
        },
        prev_end_ms: row.int(17)?,
        tokens: Tokens::default(),
        estimated_calls: 0,
    })
}

/// Tokens and estimated-call count of the calls of `run_id` with
/// `after_ms < ts_ms <= until_ms` (`until_ms` `None`: no upper bound).
pub async fn run_call_totals(
    reader: &Reader,
    run_id: &str,
    after_ms: i64,
    until_ms: Option<u64>,
) -> Result<(Tokens, u64)> {
    let row = reader
        .row(
            "SELECT CAST(SUM(prompt_tokens) AS BIGINT), CAST(SUM(cached_tokens) AS BIGINT),
                    CAST(SUM(cache_write_tokens) AS BIGINT), CAST(SUM(completion_tokens) AS BIGINT),
                    CAST(SUM(reasoning_tokens) AS BIGINT), CAST(SUM(estimated) AS BIGINT)
             FROM calls WHERE run_id = ?1 AND ts_ms > ?2 AND ts_ms <= ?3",
            vec![
                Param::text(run_id),
                Param::Int(Some(after_ms)),
                Param::uint(until_ms.unwrap_or(u64::MAX)),
            ],
        )
        .await?;
    Ok((
        Tokens {
            prompt: row.uint(0)?,
            cached_prompt: row.uint(1)?,
            cache_write: row.uint(2)?,
            completion: row.uint(3)?,
            reasoning: row.uint(4)?,
        },
        row.uint(5)?,
    ))
}

/// Sums `tokens` and `estimated_calls` of an ended run from its calls.
pub async fn fill_call_totals(reader: &Reader, run: &mut EndedRun) -> Result<()> {
    let (tokens, estimated) = run_call_totals(
        reader,
        &run.record.run_id,
        run.prev_end_ms,
        Some(run.record.ended_ms),
    )
    .await?;
    run.tokens = tokens;
    run.estimated_calls = estimated;
    Ok(())
}

/// The ended run `run_id`: the one that started at `started_ms`, else the
/// latest.
pub async fn ended_run(
    reader: &Reader,
    run_id: &str,
    started_ms: Option<u64>,
) -> Result<Option<EndedRun>> {
    let sql = format!(
        "SELECT {RUN_COLUMNS}, {PREV_END} FROM runs r
         WHERE r.run_id = ?1 AND (?2 IS NULL OR r.started_ms = ?2)
         ORDER BY r.started_ms DESC LIMIT 1"
    );
    let rows = reader
        .rows(
            &sql,
            vec![Param::text(run_id), Param::Int(started_ms.map(clamp))],
        )
        .await?;
    match rows.first() {
        Some(row) => {
            let mut run = ended_run_from_row(row)?;
            fill_call_totals(reader, &mut run).await?;
            Ok(Some(run))
        }
        None => Ok(None),
    }
}

/// When the id's latest ended run ended (`-1`: never): a live run's calls
/// are the ones after it.
pub async fn last_end(reader: &Reader, run_id: &str) -> Result<i64> {
    reader
        .row(
            "SELECT COALESCE(MAX(ended_ms), -1) FROM runs WHERE run_id = ?1",
            vec![Param::text(run_id)],
        )
        .await?
        .int(0)
}

/// Calls of `run_id` with `after_ms < ts_ms <= until_ms`, in call order,
/// one page, and how many there are.
pub async fn run_calls(
    reader: &Reader,
    run_id: &str,
    after_ms: i64,
    until_ms: Option<u64>,
    limit: u64,
    offset: u64,
) -> Result<(Vec<CallRow>, u64)> {
    let bounds = vec![
        Param::text(run_id),
        Param::Int(Some(after_ms)),
        Param::uint(until_ms.unwrap_or(u64::MAX)),
    ];
    let total = reader
        .row(
            "SELECT COUNT(*) FROM calls WHERE run_id = ?1 AND ts_ms > ?2 AND ts_ms <= ?3",
            bounds.clone(),
        )
        .await?
        .uint(0)?;
    let mut page = bounds;
    page.extend([Param::uint(limit), Param::uint(offset)]);
    let rows = reader
        .rows(
            "SELECT ts_ms, route, provider, model, tool, status, outcome,
                    prompt_tokens, cached_tokens, cache_write_tokens, completion_tokens, reasoning_tokens,
                    cost_pico, latency_ms, ttfb_ms, streamed, estimated, sdk_retry, repeat_after_failure,
                    duplicate_body, price_entry, price_version
             FROM calls WHERE run_id = ?1 AND ts_ms > ?2 AND ts_ms <= ?3
             ORDER BY ts_ms, id LIMIT ?4 OFFSET ?5",
            page,
        )
        .await?;
    let calls = rows
        .iter()
        .map(|row| {
            Ok(CallRow {
                ts_ms: row.uint(0)?,
                route: row.text(1)?,
                provider: row.text(2)?,
                model: row.opt_text(3)?,
                tool: row.opt_text(4)?,
                status: u16::try_from(row.uint(5)?).unwrap_or(0),
                outcome: row.text(6)?,
                tokens: Tokens {
                    prompt: row.uint(7)?,
                    cached_prompt: row.uint(8)?,
                    cache_write: row.uint(9)?,
                    completion: row.uint(10)?,
                    reasoning: row.uint(11)?,
                },
                cost: row.money(12)?,
                latency_ms: row.uint(13)?,
                ttfb_ms: row.opt_uint(14)?,
                streamed: row.flag(15)?,
                estimated: row.flag(16)?,
                sdk_retry: row.flag(17)?,
                repeat_after_failure: row.flag(18)?,
                duplicate_body: row.flag(19)?,
                price_entry: row.opt_text(20)?,
                price_version: row.text(21)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((calls, total))
}

/// Ended runs matching `filter` (ended in `[since, until]`), sorted, one
/// page (`limit` rows from `offset`), and how many match. `tokens` and
/// `estimated_calls` are left at zero: [`fill_call_totals`] adds them for
/// the rows that are shown.
pub async fn ended_runs(
    reader: &Reader,
    filter: &RunFilter,
    sort: RunSort,
    limit: u64,
    offset: u64,
) -> Result<(Vec<EndedRun>, u64)> {
    const WHERE: &str = "r.ended_ms >= ?1 AND r.ended_ms <= ?2
        AND (?3 IS NULL OR r.release = ?3)
        AND (?4 IS NULL OR r.request_type = ?4)
        AND (?5 IS NULL OR r.status = ?5)";
    let mut args = vec![
        Param::uint(filter.since_ms.unwrap_or(0)),
        Param::uint(filter.until_ms),
    ];
    for value in [&filter.release, &filter.request_type, &filter.status] {
        args.push(Param::Text(value.clone()));
    }
    let total = reader
        .row(
            &format!("SELECT COUNT(*) FROM runs r WHERE {WHERE}"),
            args.clone(),
        )
        .await?
        .uint(0)?;
    let order = match sort {
        RunSort::Cost => "r.cost_pico DESC, r.started_ms DESC, r.run_id",
        RunSort::Started => "r.started_ms DESC, r.run_id",
        RunSort::Ended => "r.ended_ms DESC, r.started_ms DESC, r.run_id",
    };
    args.extend([Param::uint(limit), Param::uint(offset)]);
    let sql = format!(
        "SELECT {RUN_COLUMNS}, {PREV_END} FROM runs r WHERE {WHERE}
         ORDER BY {order} LIMIT ?6 OFFSET ?7"
    );
    let runs = reader
        .rows(&sql, args)
        .await?
        .iter()
        .map(ended_run_from_row)
        .collect::<Result<Vec<_>>>()?;
    Ok((runs, total))
}

/// Ids with a call at or after `recent_ms` and no end after their last
/// call: the runs that may be live (the budget registry decides).
pub async fn live_run_candidates(reader: &Reader, recent_ms: u64) -> Result<Vec<String>> {
    reader
        .rows(
            "SELECT c.run_id FROM calls c
             WHERE c.ts_ms >= ?1 AND c.run_id IS NOT NULL
             GROUP BY c.run_id
             HAVING MAX(c.ts_ms) > COALESCE((SELECT MAX(r.ended_ms) FROM runs r WHERE r.run_id = c.run_id), -1)
             ORDER BY c.run_id",
            vec![Param::uint(recent_ms)],
        )
        .await?
        .iter()
        .map(|row| row.text(0))
        .collect()
}

fn key_columns(keys: &[SegmentKey], table: &str) -> String {
    keys.iter()
        .map(|k| format!("{table}.{}", k.column()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn key_values(row: &Row, count: usize) -> Result<SegmentValues> {
    (0..count).map(|i| row.opt_text(i)).collect()
}

fn window_params(window: Window) -> Vec<Param> {
    vec![Param::uint(window.since_ms), Param::uint(window.until_ms)]
}

/// Spend per segment of the calls made in `window`, grouped by the call's
/// own `keys` columns.
pub async fn segment_calls(
    reader: &Reader,
    window: Window,
    keys: &[SegmentKey],
) -> Result<Vec<(SegmentValues, CallAggregate)>> {
    let cols = key_columns(keys, "c");
    let sql = format!(
        "SELECT {cols},
                CAST(SUM(CASE WHEN c.outcome <> 'refused' THEN 1 ELSE 0 END) AS BIGINT),
                CAST(SUM(CASE WHEN c.outcome <> 'refused' AND c.estimated <> 0 THEN 1 ELSE 0 END) AS BIGINT),
                CAST(SUM(c.cost_pico) AS BIGINT),
                CAST(SUM(CASE WHEN c.provider = 'tool' THEN 0 ELSE c.cost_pico END) AS BIGINT),
                CAST(SUM(CASE WHEN c.provider = 'tool' THEN c.cost_pico ELSE 0 END) AS BIGINT)
         FROM calls c WHERE c.ts_ms >= ?1 AND c.ts_ms <= ?2
         GROUP BY {cols}"
    );
    let n = keys.len();
    reader
        .rows(&sql, window_params(window))
        .await?
        .iter()
        .map(|row| {
            Ok((
                key_values(row, n)?,
                CallAggregate {
                    calls: row.uint(n)?,
                    estimated: row.uint(n + 1)?,
                    cost: row.money(n + 2)?,
                    llm_cost: row.money(n + 3)?,
                    tool_cost: row.money(n + 4)?,
                },
            ))
        })
        .collect()
}

/// One entry per (run that ended in `window`, segment it belongs to) with
/// the run's cost in that segment. With run-level keys only, that is the
/// run's total from the `runs` table; with `model` or `tool` among the keys,
/// a run belongs to every segment it has calls in (grouped by the calls'
/// columns) and its cost there is the cost of those calls.
pub async fn segment_runs(
    reader: &Reader,
    window: Window,
    keys: &[SegmentKey],
) -> Result<Vec<(SegmentValues, Money)>> {
    let n = keys.len();
    let sql = if keys.iter().all(|k| !k.is_call_level()) {
        format!(
            "SELECT {}, r.cost_pico FROM runs r WHERE r.ended_ms >= ?1 AND r.ended_ms <= ?2",
            key_columns(keys, "r")
        )
    } else {
        let cols = key_columns(keys, "c");
        format!(
            "WITH w AS (
                SELECT r.run_id, r.started_ms, r.ended_ms, {PREV_END} AS prev_end
                FROM runs r WHERE r.ended_ms >= ?1 AND r.ended_ms <= ?2)
             SELECT {cols}, CAST(SUM(c.cost_pico) AS BIGINT)
             FROM w JOIN calls c ON c.run_id = w.run_id AND c.ts_ms > w.prev_end AND c.ts_ms <= w.ended_ms
             GROUP BY w.run_id, w.started_ms, {cols}"
        )
    };
    reader
        .rows(&sql, window_params(window))
        .await?
        .iter()
        .map(|row| Ok((key_values(row, n)?, row.money(n)?)))
        .collect()
}

/// Figures of `release` for `/api/compare`: its runs that ended in
/// `window` (and their calls), and its calls in the window.
pub async fn release_runs(reader: &Reader, window: Window, release: &str) -> Result<ReleaseRuns> {
    let mut args = window_params(window);
    args.push(Param::text(release));
    let mut out = ReleaseRuns::default();
    let runs = reader
        .rows(
            "SELECT cost_pico, llm_cost_pico, tool_cost_pico, retries, calls FROM runs
             WHERE release = ?3 AND ended_ms >= ?1 AND ended_ms <= ?2",
            args.clone(),
        )
        .await?;
    for row in &runs {
        out.costs.push(row.money(0)?);
        out.llm_cost = out.llm_cost.saturating_add(row.money(1)?);
        out.tool_cost = out.tool_cost.saturating_add(row.money(2)?);
        out.retries = out.retries.saturating_add(row.uint(3)?);
        out.calls = out.calls.saturating_add(row.uint(4)?);
    }
    out.tokens = reader
        .row(
            &format!(
                "WITH w AS (
                    SELECT r.run_id, r.ended_ms, {PREV_END} AS prev_end
                    FROM runs r WHERE r.release = ?3 AND r.ended_ms >= ?1 AND r.ended_ms <= ?2)
                 SELECT CAST(SUM(COALESCE(c.prompt_tokens, 0) + COALESCE(c.completion_tokens, 0)) AS BIGINT)
                 FROM w JOIN calls c ON c.run_id = w.run_id AND c.ts_ms > w.prev_end AND c.ts_ms <= w.ended_ms"
            ),
            args.clone(),
        )
        .await?
        .uint(0)?;
    let spend = reader
        .row(
            "SELECT CAST(SUM(cost_pico) AS BIGINT), COUNT(*) FROM calls
             WHERE release = ?3 AND ts_ms >= ?1 AND ts_ms <= ?2",
            args,
        )
        .await?;
    (out.window_spend, out.window_calls) = (spend.money(0)?, spend.uint(1)?);
    Ok(out)
}

/// Runs with a call since `since_ms` and no end record after it: after a
/// restart their spend goes back into the budgets.
pub const RUNS_TO_RESTORE: &str = "SELECT c.run_id, MAX(c.release), MAX(c.request_type),
        MIN(c.ts_ms), MAX(c.ts_ms),
        CAST(SUM(CASE WHEN c.provider = 'tool' THEN 0 ELSE c.cost_pico END) AS BIGINT),
        CAST(SUM(CASE WHEN c.provider = 'tool' THEN c.cost_pico ELSE 0 END) AS BIGINT),
        CAST(SUM(CASE WHEN c.outcome = 'refused' THEN 0 ELSE 1 END) AS BIGINT),
        CAST(SUM(CASE WHEN c.outcome = 'refused' THEN 1 ELSE 0 END) AS BIGINT),
        CAST(SUM(CASE WHEN c.sdk_retry <> 0 OR c.repeat_after_failure <> 0 THEN 1 ELSE 0 END) AS BIGINT),
        CAST(SUM(c.duplicate_body) AS BIGINT),
        MAX(c.run_ceiling_pico)
     FROM calls c
     WHERE c.run_id IS NOT NULL
       AND c.ts_ms > COALESCE((SELECT MAX(r.ended_ms) FROM runs r WHERE r.run_id = c.run_id), -1)
     GROUP BY c.run_id
     HAVING MAX(c.ts_ms) >= ?1
     ORDER BY c.run_id";

/// One row of [`RUNS_TO_RESTORE`].
pub fn restored_run(row: &Row) -> Result<RestoredRun> {
    Ok(RestoredRun {
        run_id: row.text(0)?,
        release: row.text(1)?,
        request_type: row.text(2)?,
        started_ms: row.uint(3)?,
        last_seen_ms: row.uint(4)?,
        llm_cost: row.money(5)?,
        tool_cost: row.money(6)?,
        calls: row.uint(7)?,
        refusals: row.uint(8)?,
        retries: row.uint(9)?,
        repeated_calls: row.uint(10)?,
        ceiling: row.opt_uint(11)?.map(Money::from_picos),
    })
}

/// [`RUNS_TO_RESTORE`] on `reader`.
pub async fn runs_to_restore(reader: &Reader, since_ms: u64) -> Result<Vec<RestoredRun>> {
    reader
        .rows(RUNS_TO_RESTORE, vec![Param::uint(since_ms)])
        .await?
        .iter()
        .map(restored_run)
        .collect()
}
