//! The investigation API on the admin listener (contract: `docs/api.md`):
//!
//! - `GET /api/runs/{id}`: one run (live or ended) and its calls in order.
//! - `GET /api/runs`: runs, most expensive (or newest) first.
//! - `GET /api/segments`: spend, cost per run, p95 and burn rate per
//!   release / model / tool / request type, with a status against the
//!   `[segments]` thresholds.
//! - `GET /api/compare`: one release against another, per run, and which
//!   signal combinations the difference matches.
//!
//! Ended runs and calls come from the ledger ([`crate::ledger::query`], on
//! SQLite or the shared PostgreSQL alike); live runs from the budget registry. "Now" is the
//! instance's clock, so windows given as durations are relative to it.

use std::collections::BTreeMap;

use http::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::admin::json as json_response;
use crate::budget::{civil_from_days, days_from_civil, RunSnapshot};
use crate::ledger::query::{
    self, CallAggregate, CallRow, EndedRun, RunFilter, RunSort, SegmentKey, SegmentValues, Tokens,
    Window,
};
use crate::ledger::reader::Reader;
use crate::ledger::LedgerError;
use crate::money::Money;
use crate::proxy::ProxyBody;
use crate::state::AppState;

/// `[segments]`: thresholds `/api/segments` reports a status against. An
/// unset threshold is not checked.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentsConfig {
    pub cost_per_run_warning_usd: Option<f64>,
    pub cost_per_run_critical_usd: Option<f64>,
    pub cost_p95_warning_usd: Option<f64>,
    pub cost_p95_critical_usd: Option<f64>,
    pub burn_rate_warning_usd_per_hour: Option<f64>,
    pub burn_rate_critical_usd_per_hour: Option<f64>,
}

/// `[compare]`: what `/api/compare` counts as a change.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompareConfig {
    /// A figure is "up" when it grew by more than this many percent, and
    /// "stable" when it moved by at most this many percent either way.
    pub threshold_pct: f64,
}

impl Default for CompareConfig {
    fn default() -> Self {
        CompareConfig {
            threshold_pct: 10.0,
        }
    }
}

/// Largest `limit`.
pub const MAX_LIMIT: u64 = 1_000;
/// Default `limit` of lists.
const DEFAULT_LIMIT: u64 = 50;
/// Default `limit` of a run's calls.
const DEFAULT_CALL_LIMIT: u64 = 200;
/// How far back `/api/runs` looks for calls of live runs, beyond the idle
/// timeout (a live run has had a call within its idle timeout, unless one
/// is still in flight).
const LIVE_LOOKBACK_MS: u64 = 86_400_000;

const MS_PER_DAY: u64 = 86_400_000;

/// An API error: its status and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
        }
    }
}

type ApiResult = Result<Value, ApiError>;

fn respond(result: ApiResult) -> Response<ProxyBody> {
    match result {
        Ok(value) => json_response(StatusCode::OK, &value),
        Err(error) => {
            if error.status.is_server_error() {
                tracing::error!(message = "investigation API query failed", error = %error.message);
            }
            json_response(error.status, &json!({ "error": error.message }))
        }
    }
}

fn no_ledger() -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "the ledger is off (ledger.enabled = false): no ended runs or calls to query"
            .into(),
    }
}

/// A failed ledger query: 503 while its database is unreachable, else 500.
fn ledger_error(error: LedgerError) -> ApiError {
    match error {
        LedgerError::Unavailable(_) => ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: error.to_string(),
        },
        other => ApiError::internal(other.to_string()),
    }
}

// ---------------------------------------------------------------------------
// Parameters

/// The query string, decoded; each name at most once, only known names.
struct Params {
    values: BTreeMap<String, String>,
}

impl Params {
    fn parse(query: Option<&str>, known: &[&str]) -> Result<Params, ApiError> {
        let mut values = BTreeMap::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |text: &str| {
                percent_encoding::percent_decode_str(text)
                    .decode_utf8()
                    .map(|v| v.into_owned())
                    .map_err(|_| ApiError::bad(format!("parameter `{text}` is not UTF-8")))
            };
            let name = decode(name)?;
            let value = decode(value)?;
            if !known.contains(&name.as_str()) {
                return Err(ApiError::bad(format!(
                    "unknown parameter `{name}` (this endpoint takes {})",
                    known.join(", ")
                )));
            }
            if values.insert(name.clone(), value).is_some() {
                return Err(ApiError::bad(format!("parameter `{name}` is given twice")));
            }
        }
        Ok(Params { values })
    }

    /// The value, `None` when absent or empty.
    fn get(&self, name: &str) -> Option<&str> {
        self.values
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn limit(&self, default: u64) -> Result<u64, ApiError> {
        match self.get("limit") {
            None => Ok(default),
            Some(text) => match text.parse::<u64>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
                _ => Err(ApiError::bad(format!(
                    "limit must be an integer from 1 to {MAX_LIMIT} (got `{text}`)"
                ))),
            },
        }
    }

    fn offset(&self) -> Result<u64, ApiError> {
        match self.get("offset") {
            None => Ok(0),
            Some(text) => match text.parse::<u64>() {
                Ok(n) if n <= i64::MAX as u64 / 2 => Ok(n),
                _ => Err(ApiError::bad(format!(
                    "offset must be a non-negative integer (got `{text}`)"
                ))),
            },
        }
    }

    fn time(&self, name: &str, now_ms: u64) -> Result<Option<u64>, ApiError> {
        self.get(name)
            .map(|text| {
                parse_time(text, now_ms).map_err(|why| ApiError::bad(format!("{name}: {why}")))
            })
            .transpose()
    }

    /// `since` (default `default_since_ms` back from now) and `until`
    /// (default now), `since` before `until`.
    fn window(&self, now_ms: u64, default_since_ms: u64) -> Result<Window, ApiError> {
        let until_ms = self.time("until", now_ms)?.unwrap_or(now_ms);
        let since_ms = self
            .time("since", now_ms)?
            .unwrap_or(now_ms.saturating_sub(default_since_ms));
        if since_ms >= until_ms {
            return Err(ApiError::bad(format!(
                "since ({}) must be before until ({})",
                format_rfc3339(since_ms),
                format_rfc3339(until_ms)
            )));
        }
        Ok(Window { since_ms, until_ms })
    }

    /// A label-like value (release, request type, status).
    fn label(&self, name: &str) -> Result<Option<String>, ApiError> {
        match self.get(name) {
            Some(v) if v.len() > 256 => Err(ApiError::bad(format!(
                "{name} must be at most 256 characters"
            ))),
            other => Ok(other.map(str::to_string)),
        }
    }
}

/// A duration back from `now_ms` (`30s`, `15m`, `24h`, `7d`, `2w`) or an
/// RFC 3339 time, as unix milliseconds.
pub fn parse_time(text: &str, now_ms: u64) -> Result<u64, String> {
    let what = || {
        format!("`{text}` is neither a duration (15m, 24h, 7d; units s, m, h, d, w) nor an RFC 3339 time (2026-11-15T10:00:00Z)")
    };
    if let Some(unit) = text.chars().last().filter(|c| c.is_ascii_alphabetic()) {
        let digits = &text[..text.len() - unit.len_utf8()];
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            let unit_ms: u64 = match unit {
                's' => 1_000,
                'm' => 60_000,
                'h' => 3_600_000,
                'd' => MS_PER_DAY,
                'w' => 7 * MS_PER_DAY,
                _ => return Err(what()),
            };
            let amount: u64 = digits.parse().map_err(|_| what())?;
            if amount == 0 {
                return Err(format!("`{text}`: a duration must be positive"));
            }
            let back = amount
                .checked_mul(unit_ms)
                .ok_or_else(|| format!("`{text}` is too long a duration"))?;
            return Ok(now_ms.saturating_sub(back));
        }
    }
    parse_rfc3339(text).ok_or_else(what)
}

/// `YYYY-MM-DDTHH:MM:SS(.fraction)?(Z|±HH:MM)` as unix milliseconds
/// (fractions below a millisecond are dropped; times before 1970 are not
/// accepted).
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(range)?;
        if part.iter().all(u8::is_ascii_digit) {
            std::str::from_utf8(part).ok()?.parse().ok()
        } else {
            None
        }
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0u64;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                millis = millis * 10 + u64::from(b[i] - b'0');
            }
            i += 1;
        }
        let digits = i - start;
        if digits == 0 {
            return None;
        }
        for _ in digits..3 {
            millis *= 10;
        }
    }
    let offset_secs: i64 = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [*h1, *h2, *m1, *m2];
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let d = |x: u8| i64::from(x - b'0');
            let (oh, om) = (d(*h1) * 10 + d(*h2), d(*m1) * 10 + d(*m2));
            if oh > 23 || om > 59 {
                return None;
            }
            let secs = oh * 3_600 + om * 60;
            if *sign == b'+' {
                secs
            } else {
                -secs
            }
        }
        _ => return None,
    };
    let days = days_from_civil(i64::from(year), month, day);
    let secs = days * 86_400
        + i64::from(hour) * 3_600
        + i64::from(minute) * 60
        + i64::from(second.min(59))
        - offset_secs;
    let secs = u64::try_from(secs).ok()?;
    Some(secs * 1_000 + millis)
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        _ => 28,
    }
}

/// `2026-11-15T10:00:00.000Z`.
pub fn format_rfc3339(ms: u64) -> String {
    let days = i64::try_from(ms / MS_PER_DAY).unwrap_or(i64::MAX / 2);
    let (year, month, day) = civil_from_days(days);
    let in_day = ms % MS_PER_DAY;
    let secs = in_day / 1_000;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs / 3_600,
        secs / 60 % 60,
        secs % 60,
        in_day % 1_000
    )
}

// ---------------------------------------------------------------------------
// Numbers

fn round_to(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    let rounded = (value * scale).round() / scale;
    if rounded == 0.0 {
        0.0 // no -0.0
    } else {
        rounded
    }
}

/// USD to the pico-dollar.
fn usd(value: f64) -> f64 {
    round_to(value, 12)
}

fn money_f64(m: Money) -> f64 {
    m.picos() as f64 / 1e12
}

fn per_run(total: Money, runs: u64) -> Option<f64> {
    (runs > 0).then(|| usd(money_f64(total) / runs as f64))
}

fn share(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        round_to(part / whole, 4)
    } else {
        0.0
    }
}

/// Nearest-rank percentile `pct` (1–100) of `values`.
fn nearest_rank(values: &mut [Money], pct: u64) -> Option<Money> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let n = values.len() as u64;
    let rank = (pct * n).div_ceil(100).max(1);
    values.get((rank - 1) as usize).copied()
}

fn hours(window: Window) -> f64 {
    (window.until_ms - window.since_ms) as f64 / 3_600_000.0
}

fn tokens_json(t: &Tokens) -> Value {
    json!({
        "prompt": t.prompt,
        "cached_prompt": t.cached_prompt,
        "cache_write": t.cache_write,
        "completion": t.completion,
        "reasoning": t.reasoning,
    })
}

// ---------------------------------------------------------------------------
// Runs

/// A run as the API shows it, live or ended.
#[derive(Debug, Clone)]
struct Summary {
    run_id: String,
    release: String,
    request_type: String,
    /// `active`, `ok` or `error`.
    status: String,
    stop_reason: Option<String>,
    ceiling: Money,
    cost: Money,
    llm_cost: Money,
    tool_cost: Money,
    tokens: Tokens,
    calls: u64,
    refusals: u64,
    retries: u64,
    repeated_calls: u64,
    estimated_calls: u64,
    started_ms: u64,
    ended_ms: Option<u64>,
    breached: bool,
}

impl Summary {
    fn ended(ended: &EndedRun) -> Summary {
        let run = &ended.record;
        Summary {
            run_id: run.run_id.clone(),
            release: run.release.clone(),
            request_type: run.request_type.clone(),
            status: run.status.clone(),
            stop_reason: Some(run.stop_reason.clone()),
            ceiling: run.ceiling,
            cost: run.cost,
            llm_cost: run.llm_cost,
            tool_cost: run.tool_cost,
            tokens: ended.tokens,
            calls: run.calls,
            refusals: run.refusals,
            retries: run.retries,
            repeated_calls: run.repeated_calls,
            estimated_calls: ended.estimated_calls,
            started_ms: run.started_ms,
            ended_ms: Some(run.ended_ms),
            breached: run.breached,
        }
    }

    fn live(run: &RunSnapshot, tokens: Tokens, estimated_calls: u64) -> Summary {
        Summary {
            run_id: run.run_id.clone(),
            release: run.release.clone(),
            request_type: run.request_type.clone(),
            status: "active".into(),
            stop_reason: None,
            ceiling: run.ceiling,
            cost: run.spent,
            llm_cost: run.llm_cost,
            tool_cost: run.tool_cost,
            tokens,
            calls: run.calls,
            refusals: run.refusals,
            retries: run.retries,
            repeated_calls: run.repeated_calls,
            estimated_calls,
            started_ms: run.started_ms,
            ended_ms: None,
            breached: run.spent > run.ceiling,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "run_id": self.run_id,
            "release": self.release,
            "request_type": self.request_type,
            "status": self.status,
            "stop_reason": self.stop_reason,
            "ceiling_usd": self.ceiling.as_usd_f64(),
            "cost_usd": self.cost.as_usd_f64(),
            "llm_cost_usd": self.llm_cost.as_usd_f64(),
            "tool_cost_usd": self.tool_cost.as_usd_f64(),
            "tokens": tokens_json(&self.tokens),
            "calls": self.calls,
            "refusals": self.refusals,
            "retries": self.retries,
            "repeated_calls": self.repeated_calls,
            "estimated_calls": self.estimated_calls,
            "started_at": format_rfc3339(self.started_ms),
            "started_ms": self.started_ms,
            "ended_at": self.ended_ms.map(format_rfc3339),
            "ended_ms": self.ended_ms,
            "breached": self.breached,
        })
    }
}

fn call_json(call: &CallRow) -> Value {
    json!({
        "ts": format_rfc3339(call.ts_ms),
        "ts_ms": call.ts_ms,
        "route": call.route,
        "provider": call.provider,
        "model": call.model,
        "tool": call.tool,
        "status": call.status,
        "outcome": call.outcome,
        "tokens": tokens_json(&call.tokens),
        "cost_usd": call.cost.as_usd_f64(),
        "latency_ms": call.latency_ms,
        "ttfb_ms": call.ttfb_ms,
        "streamed": call.streamed,
        "estimated": call.estimated,
        "sdk_retry": call.sdk_retry,
        "repeat_after_failure": call.repeat_after_failure,
        "duplicate_body": call.duplicate_body,
        "price_entry": call.price_entry,
        "price_version": call.price_version,
    })
}

/// `GET /api/runs/{id}`.
pub async fn run(state: &AppState, run_id: &str, query: Option<&str>) -> Response<ProxyBody> {
    respond(run_detail(state, run_id, query).await)
}

async fn run_detail(state: &AppState, run_id: &str, query: Option<&str>) -> ApiResult {
    let params = Params::parse(query, &["started_ms", "limit", "offset"])?;
    let limit = params.limit(DEFAULT_CALL_LIMIT)?;
    let offset = params.offset()?;
    let started_ms = match params.get("started_ms") {
        None => None,
        Some(text) => Some(text.parse::<u64>().map_err(|_| {
            ApiError::bad(format!(
                "started_ms must be a run's start in unix milliseconds (got `{text}`)"
            ))
        })?),
    };
    let live = live_snapshot(state, run_id)
        .await
        .filter(|run| started_ms.is_none_or(|s| s == run.started_ms));
    let Some(ledger) = state.ledger.clone() else {
        return match live {
            Some(run) => Ok(json!({
                "run": Summary::live(&run, Tokens::default(), 0).to_json(),
                "calls": [],
                "limit": limit, "offset": offset, "total": 0,
            })),
            None => Err(ApiError::not_found(format!(
                "no active run `{run_id}` (the ledger is off)"
            ))),
        };
    };
    let id = run_id;
    let reader = ledger.reader();
    let (summary, after, until) = match live {
        Some(run) => {
            let after = query::last_end(reader, id).await.map_err(ledger_error)?;
            let (tokens, estimated) = query::run_call_totals(reader, id, after, None)
                .await
                .map_err(ledger_error)?;
            (Summary::live(&run, tokens, estimated), after, None)
        }
        None => match query::ended_run(reader, id, started_ms)
            .await
            .map_err(ledger_error)?
        {
            Some(run) => (
                Summary::ended(&run),
                run.prev_end_ms,
                Some(run.record.ended_ms),
            ),
            None => {
                return Err(ApiError::not_found(match started_ms {
                    Some(s) => format!("no run `{id}` started at started_ms={s}"),
                    None => format!("no run `{id}`"),
                }))
            }
        },
    };
    let (calls, total) = query::run_calls(reader, id, after, until, limit, offset)
        .await
        .map_err(ledger_error)?;
    Ok(json!({
        "run": summary.to_json(),
        "calls": calls.iter().map(call_json).collect::<Vec<_>>(),
        "limit": limit,
        "offset": offset,
        "total": total,
    }))
}

fn sort_key_cmp(sort: RunSort, a: &Summary, b: &Summary) -> std::cmp::Ordering {
    let by_start = b
        .started_ms
        .cmp(&a.started_ms)
        .then_with(|| a.run_id.cmp(&b.run_id));
    match sort {
        RunSort::Cost => b.cost.cmp(&a.cost).then(by_start),
        RunSort::Started => by_start,
        // Live runs (no end yet) first.
        RunSort::Ended => b
            .ended_ms
            .unwrap_or(u64::MAX)
            .cmp(&a.ended_ms.unwrap_or(u64::MAX))
            .then(by_start),
    }
}

/// Live runs matching the filter, with their call totals from the ledger.
/// A live run: the fleet's figures with a shared state backend (this
/// replica's own if the backend does not answer: the failure is counted and
/// logged there), else this replica's.
async fn live_snapshot(state: &AppState, run_id: &str) -> Option<RunSnapshot> {
    if let Some(shared) = &state.shared {
        if let Ok(run) = shared.run_snapshot(run_id).await {
            return run;
        }
    }
    state.budgets.run_snapshot(run_id)
}

async fn live_runs(
    reader: &Reader,
    state: &AppState,
    filter: &RunFilter,
    recent_ms: u64,
) -> Result<Vec<Summary>, ApiError> {
    let candidates = query::live_run_candidates(reader, recent_ms)
        .await
        .map_err(ledger_error)?;
    let mut out = Vec::new();
    for id in candidates {
        let Some(run) = live_snapshot(state, &id).await else {
            continue;
        };
        let keep = filter.release.as_ref().is_none_or(|r| *r == run.release)
            && filter
                .request_type
                .as_ref()
                .is_none_or(|t| *t == run.request_type)
            && run.started_ms <= filter.until_ms;
        if !keep {
            continue;
        }
        let after = query::last_end(reader, &id).await.map_err(ledger_error)?;
        let (tokens, estimated) = query::run_call_totals(reader, &id, after, None)
            .await
            .map_err(ledger_error)?;
        out.push(Summary::live(&run, tokens, estimated));
    }
    Ok(out)
}

/// `GET /api/runs`.
pub async fn runs(state: &AppState, query: Option<&str>) -> Response<ProxyBody> {
    respond(runs_list(state, query).await)
}

async fn runs_list(state: &AppState, query: Option<&str>) -> ApiResult {
    let params = Params::parse(
        query,
        &[
            "sort",
            "limit",
            "offset",
            "since",
            "until",
            "release",
            "request_type",
            "status",
        ],
    )?;
    let sort = match params.get("sort") {
        None | Some("cost") => RunSort::Cost,
        Some("started") => RunSort::Started,
        Some("ended") => RunSort::Ended,
        Some(other) => {
            return Err(ApiError::bad(format!(
                "sort must be cost, started or ended (got `{other}`)"
            )))
        }
    };
    let limit = params.limit(DEFAULT_LIMIT)?;
    let offset = params.offset()?;
    let now_ms = state.clock.now_ms();
    let until_ms = params.time("until", now_ms)?.unwrap_or(now_ms);
    let since_ms = params.time("since", now_ms)?;
    if since_ms.is_some_and(|s| s > until_ms) {
        return Err(ApiError::bad("since must not be after until"));
    }
    let status = match params.get("status") {
        None => None,
        Some(s @ ("ok" | "error" | "active")) => Some(s.to_string()),
        Some(other) => {
            return Err(ApiError::bad(format!(
                "status must be ok, error or active (got `{other}`)"
            )))
        }
    };
    let want_live = status.as_deref().is_none_or(|s| s == "active");
    let want_ended = status.as_deref() != Some("active");
    let filter = RunFilter {
        since_ms,
        until_ms,
        release: params.label("release")?,
        request_type: params.label("request_type")?,
        status: status.filter(|s| s != "active"),
    };
    let Some(ledger) = state.ledger.clone() else {
        return Err(no_ledger());
    };
    let budgets = state.budgets.clone();
    let idle_ms = budgets
        .runs_config()
        .idle_timeout_secs
        .saturating_mul(1_000);
    let recent_ms = now_ms.saturating_sub(idle_ms.saturating_add(LIVE_LOOKBACK_MS));
    let reader = ledger.reader();
    let live = if want_live {
        live_runs(reader, state, &filter, recent_ms).await?
    } else {
        Vec::new()
    };
    // Ended rows come without their call totals; those are summed for
    // the rows of the page only.
    let (ended, ended_total) = match (want_ended, live.is_empty()) {
        (false, _) => (Vec::new(), 0),
        (true, true) => query::ended_runs(reader, &filter, sort, limit, offset)
            .await
            .map_err(ledger_error)?,
        // Merged with live runs: the first `offset + limit` ended runs
        // and every live run hold the page.
        (true, false) => query::ended_runs(reader, &filter, sort, offset.saturating_add(limit), 0)
            .await
            .map_err(ledger_error)?,
    };
    let total = ended_total + live.len() as u64;
    let mut page: Vec<(Summary, Option<EndedRun>)> = ended
        .into_iter()
        .map(|run| (Summary::ended(&run), Some(run)))
        .collect();
    if !live.is_empty() {
        page.extend(live.into_iter().map(|summary| (summary, None)));
        page.sort_by(|a, b| sort_key_cmp(sort, &a.0, &b.0));
        page = page
            .into_iter()
            .skip(offset as usize)
            .take(limit as usize)
            .collect();
    }
    for (summary, ended) in &mut page {
        if let Some(run) = ended {
            query::fill_call_totals(reader, run)
                .await
                .map_err(ledger_error)?;
            summary.tokens = run.tokens;
            summary.estimated_calls = run.estimated_calls;
        }
    }
    Ok(json!({
        "runs": page.iter().map(|(s, _)| s.to_json()).collect::<Vec<_>>(),
        "limit": limit,
        "offset": offset,
        "total": total,
    }))
}

// ---------------------------------------------------------------------------
// Segments

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Ok,
    Warning,
    Critical,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Critical => "critical",
        }
    }
}

/// Worst level of `figures` against `config`, and why.
fn status_of(
    config: &SegmentsConfig,
    cost_per_run: Option<f64>,
    cost_p95: Option<f64>,
    burn_rate: f64,
) -> (Level, Vec<String>) {
    let checks = [
        (
            "cost_per_run",
            cost_per_run,
            config.cost_per_run_warning_usd,
            config.cost_per_run_critical_usd,
        ),
        (
            "cost_p95",
            cost_p95,
            config.cost_p95_warning_usd,
            config.cost_p95_critical_usd,
        ),
        (
            "burn_rate_usd_per_hour",
            Some(burn_rate),
            config.burn_rate_warning_usd_per_hour,
            config.burn_rate_critical_usd_per_hour,
        ),
    ];
    let mut level = Level::Ok;
    let mut reasons = Vec::new();
    for (name, value, warning, critical) in checks {
        let Some(value) = value else { continue };
        let hit = match (critical, warning) {
            (Some(c), _) if value > c => Some((Level::Critical, "critical", c)),
            (_, Some(w)) if value > w => Some((Level::Warning, "warning", w)),
            _ => None,
        };
        if let Some((hit_level, label, threshold)) = hit {
            level = level.max(hit_level);
            reasons.push(format!("{name} {value} > {label} {threshold}"));
        }
    }
    (level, reasons)
}

/// `GET /api/segments`.
pub async fn segments(state: &AppState, query: Option<&str>) -> Response<ProxyBody> {
    respond(segments_report(state, query).await)
}

fn parse_keys(text: Option<&str>) -> Result<Vec<SegmentKey>, ApiError> {
    let Some(text) = text else {
        return Ok(vec![SegmentKey::Release]);
    };
    if text.trim().is_empty() {
        return Err(ApiError::bad(
            "by must name at least one of release, model, tool, request_type",
        ));
    }
    let mut keys = Vec::new();
    for part in text.split(',').map(str::trim) {
        let key = SegmentKey::parse(part).ok_or_else(|| {
            ApiError::bad(format!(
                "by: unknown key `{part}` (use release, model, tool, request_type)"
            ))
        })?;
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys.sort();
    Ok(keys)
}

async fn segments_report(state: &AppState, query: Option<&str>) -> ApiResult {
    let params = Params::parse(query, &["since", "until", "by", "limit", "offset"])?;
    let keys = parse_keys(params.values.get("by").map(String::as_str))?;
    let limit = params.limit(DEFAULT_LIMIT)?;
    let offset = params.offset()?;
    let now_ms = state.clock.now_ms();
    let window = params.window(now_ms, MS_PER_DAY)?;
    let config = state.config.load().raw.segments.clone();
    let Some(ledger) = state.ledger.clone() else {
        return Err(no_ledger());
    };
    let reader = ledger.reader();
    let calls = query::segment_calls(reader, window, &keys)
        .await
        .map_err(ledger_error)?;
    let runs = query::segment_runs(reader, window, &keys)
        .await
        .map_err(ledger_error)?;
    let mut merged: BTreeMap<SegmentValues, (CallAggregate, Vec<Money>)> = BTreeMap::new();
    for (key, aggregate) in calls {
        merged.entry(key).or_default().0 = aggregate;
    }
    for (key, cost) in runs {
        merged.entry(key).or_default().1.push(cost);
    }
    let hours = hours(window);
    let mut rows: Vec<(Money, u64, Value)> = merged
        .into_iter()
        .map(|(values, (agg, mut run_costs))| {
            let runs = run_costs.len() as u64;
            let run_total: Money = run_costs.iter().copied().sum();
            let cost_per_run = per_run(run_total, runs);
            let cost_p95 = nearest_rank(&mut run_costs, 95).map(Money::as_usd_f64);
            let cost = money_f64(agg.cost);
            let burn = usd(cost / hours);
            let (level, reasons) = status_of(&config, cost_per_run, cost_p95, burn);
            let key: serde_json::Map<String, Value> = keys
                .iter()
                .zip(values)
                .map(|(k, v)| (k.name().to_string(), json!(v)))
                .collect();
            let row = json!({
                "key": key,
                "runs": runs,
                "calls": agg.calls,
                "cost_usd": agg.cost.as_usd_f64(),
                "llm_cost_usd": agg.llm_cost.as_usd_f64(),
                "tool_cost_usd": agg.tool_cost.as_usd_f64(),
                "cost_per_run": cost_per_run,
                "cost_p95": cost_p95,
                "burn_rate_usd_per_hour": burn,
                "cost_per_1k_runs": cost_per_run.map(|c| usd(c * 1_000.0)),
                "llm_share": share(money_f64(agg.llm_cost), cost),
                "tool_share": share(money_f64(agg.tool_cost), cost),
                "estimated_share": share(agg.estimated as f64, agg.calls as f64),
                "status": level.as_str(),
                "reasons": reasons,
            });
            (agg.cost, runs, row)
        })
        .collect();
    // Most spend first; the key order (BTreeMap) breaks ties.
    rows.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
    let total = rows.len() as u64;
    let segments: Vec<Value> = rows
        .into_iter()
        .skip(offset as usize)
        .take(limit as usize)
        .map(|(_, _, row)| row)
        .collect();
    Ok(json!({
        "since": format_rfc3339(window.since_ms),
        "since_ms": window.since_ms,
        "until": format_rfc3339(window.until_ms),
        "until_ms": window.until_ms,
        "by": keys.iter().map(|k| k.name()).collect::<Vec<_>>(),
        "segments": segments,
        "limit": limit,
        "offset": offset,
        "total": total,
    }))
}

// ---------------------------------------------------------------------------
// Compare

/// The figures compared, in output order.
const FIGURES: [&str; 9] = [
    "runs",
    "tokens_per_run",
    "llm_cost_per_run",
    "tool_cost_per_run",
    "cost_per_run",
    "cost_p95",
    "retries_per_run",
    "calls_per_run",
    "burn_rate_usd_per_hour",
];

/// One release's figures; per-run figures are 0 with no runs.
#[derive(Debug, Clone, Default)]
struct ReleaseFigures {
    values: BTreeMap<&'static str, f64>,
}

impl ReleaseFigures {
    fn of(runs: &query::ReleaseRuns, window: Window) -> ReleaseFigures {
        let n = runs.costs.len() as u64;
        let total: Money = runs.costs.iter().copied().sum();
        let per = |m: Money| per_run(m, n).unwrap_or(0.0);
        let count = |x: u64| {
            if n == 0 {
                0.0
            } else {
                round_to(x as f64 / n as f64, 4)
            }
        };
        let mut costs = runs.costs.clone();
        let values = BTreeMap::from([
            ("runs", n as f64),
            ("tokens_per_run", count(runs.tokens)),
            ("llm_cost_per_run", per(runs.llm_cost)),
            ("tool_cost_per_run", per(runs.tool_cost)),
            ("cost_per_run", per(total)),
            (
                "cost_p95",
                nearest_rank(&mut costs, 95).map_or(0.0, Money::as_usd_f64),
            ),
            ("retries_per_run", count(runs.retries)),
            ("calls_per_run", count(runs.calls)),
            (
                "burn_rate_usd_per_hour",
                usd(money_f64(runs.window_spend) / hours(window)),
            ),
        ]);
        ReleaseFigures { values }
    }

    fn get(&self, name: &str) -> f64 {
        self.values.get(name).copied().unwrap_or(0.0)
    }

    fn to_json(&self, release: &str) -> Value {
        let mut map = serde_json::Map::new();
        map.insert("release".into(), json!(release));
        for name in FIGURES {
            let v = self.get(name);
            map.insert(
                name.into(),
                if name == "runs" {
                    json!(v as u64)
                } else {
                    json!(v)
                },
            );
        }
        Value::Object(map)
    }
}

/// Percent change base → head, to 2 decimals (as reported; the rules are
/// evaluated on this figure, so evidence and verdict agree); `None` when
/// base is 0 and head is not.
fn pct_change(base: f64, head: f64) -> Option<f64> {
    if base == 0.0 {
        (head == 0.0).then_some(0.0)
    } else {
        Some(round_to((head - base) / base * 100.0, 2))
    }
}

/// Up: grew by more than the threshold (from 0 to anything counts).
fn is_up(base: f64, head: f64, threshold: f64) -> bool {
    pct_change(base, head).map_or(head > base, |p| p > threshold)
}

/// Stable: moved by at most the threshold either way.
fn is_stable(base: f64, head: f64, threshold: f64) -> bool {
    pct_change(base, head).is_some_and(|p| p.abs() <= threshold)
}

/// `GET /api/compare`.
pub async fn compare(state: &AppState, query: Option<&str>) -> Response<ProxyBody> {
    respond(compare_report(state, query).await)
}

async fn compare_report(state: &AppState, query: Option<&str>) -> ApiResult {
    let params = Params::parse(query, &["base", "head", "since", "until"])?;
    let base = params
        .label("base")?
        .ok_or_else(|| ApiError::bad("base is required: the release to compare from"))?;
    let head = params
        .label("head")?
        .ok_or_else(|| ApiError::bad("head is required: the release to compare with base"))?;
    let now_ms = state.clock.now_ms();
    let window = params.window(now_ms, 7 * MS_PER_DAY)?;
    let threshold = state.config.load().raw.compare.threshold_pct;
    let Some(ledger) = state.ledger.clone() else {
        return Err(no_ledger());
    };
    let reader = ledger.reader();
    let base_runs = query::release_runs(reader, window, &base)
        .await
        .map_err(ledger_error)?;
    let head_runs = query::release_runs(reader, window, &head)
        .await
        .map_err(ledger_error)?;
    for (param, release, runs) in [("base", &base, &base_runs), ("head", &head, &head_runs)] {
        if runs.costs.is_empty() && runs.window_calls == 0 {
            return Err(ApiError::not_found(format!(
                "{param}: release `{release}` has no calls and no ended runs between {} and {}",
                format_rfc3339(window.since_ms),
                format_rfc3339(window.until_ms)
            )));
        }
    }
    let bf = ReleaseFigures::of(&base_runs, window);
    let hf = ReleaseFigures::of(&head_runs, window);
    let pct = |name: &str| pct_change(bf.get(name), hf.get(name));
    let up = |name: &str| is_up(bf.get(name), hf.get(name), threshold);
    let stable = |name: &str| is_stable(bf.get(name), hf.get(name), threshold);
    let mut delta = serde_json::Map::new();
    for name in FIGURES {
        let abs = hf.get(name) - bf.get(name);
        let abs = match name {
            "runs" => json!(abs as i64),
            "tokens_per_run" | "retries_per_run" | "calls_per_run" => json!(round_to(abs, 4)),
            _ => json!(usd(abs)),
        };
        delta.insert(name.into(), json!({"abs": abs, "pct": pct(name)}));
    }
    let t = threshold;
    let signals: Vec<(&str, bool, String, [&str; 2])> = vec![
        (
            "more_tokens_per_run",
            up("tokens_per_run") && up("llm_cost_per_run"),
            format!("tokens per run and LLM cost per run both up more than {t}%"),
            ["tokens_per_run", "llm_cost_per_run"],
        ),
        (
            "over_tooling",
            up("tool_cost_per_run") && up("cost_per_run"),
            format!("tool cost per run and total cost per run both up more than {t}%"),
            ["tool_cost_per_run", "cost_per_run"],
        ),
        (
            "prompt_or_reasoning_regression",
            up("llm_cost_per_run") && stable("tool_cost_per_run"),
            format!("LLM cost per run up more than {t}%, tool cost per run within {t}%"),
            ["llm_cost_per_run", "tool_cost_per_run"],
        ),
        (
            "unit_cost_regression",
            up("burn_rate_usd_per_hour") && stable("runs"),
            format!("burn rate up more than {t}%, run count within {t}%"),
            ["burn_rate_usd_per_hour", "runs"],
        ),
        (
            "tail_runs_accelerating_spend",
            up("cost_p95") && up("burn_rate_usd_per_hour"),
            format!("cost p95 and burn rate both up more than {t}%"),
            ["cost_p95", "burn_rate_usd_per_hour"],
        ),
    ];
    let diagnosis: Vec<&str> = signals.iter().filter(|s| s.1).map(|s| s.0).collect();
    let signals: Vec<Value> = signals
        .iter()
        .map(|(name, matched, rule, evidence)| {
            let evidence: serde_json::Map<String, Value> = evidence
                .iter()
                .map(|f| (format!("{f}_pct"), json!(pct(f))))
                .collect();
            json!({"name": name, "matched": matched, "rule": rule, "evidence": evidence})
        })
        .collect();
    Ok(json!({
        "since": format_rfc3339(window.since_ms),
        "since_ms": window.since_ms,
        "until": format_rfc3339(window.until_ms),
        "until_ms": window.until_ms,
        "threshold_pct": threshold,
        "base": bf.to_json(&base),
        "head": hf.to_json(&head),
        "delta": delta,
        "signals": signals,
        "diagnosis": diagnosis,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn durations_go_back_from_now() {
        assert_eq!(parse_time("15m", NOW), Ok(NOW - 900_000));
        assert_eq!(parse_time("24h", NOW), Ok(NOW - 86_400_000));
        assert_eq!(parse_time("7d", NOW), Ok(NOW - 7 * 86_400_000));
        assert_eq!(parse_time("30s", NOW), Ok(NOW - 30_000));
        assert_eq!(parse_time("2w", NOW), Ok(NOW - 14 * 86_400_000));
        for bad in ["0h", "h", "7y", "-1d", "1.5h", "", "99999999999999999999d"] {
            assert!(parse_time(bad, NOW).is_err(), "{bad}");
        }
    }

    #[test]
    fn rfc3339_round_trips() {
        let ms = crate::budget::unix_ms(2026, 11, 15, 10, 30, 5) + 123;
        assert_eq!(format_rfc3339(ms), "2026-11-15T10:30:05.123Z");
        assert_eq!(parse_rfc3339("2026-11-15T10:30:05.123Z"), Some(ms));
        assert_eq!(parse_rfc3339("2026-11-15T10:30:05.123456Z"), Some(ms));
        assert_eq!(parse_rfc3339("2026-11-15T11:30:05.123+01:00"), Some(ms));
        assert_eq!(parse_rfc3339("2026-11-15T08:00:05.123-02:30"), Some(ms));
        assert_eq!(
            parse_rfc3339("2024-02-29T00:00:00Z"),
            Some(crate::budget::unix_ms(2024, 2, 29, 0, 0, 0))
        );
        for bad in [
            "2026-11-15",
            "2026-11-15T10:30:05",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-11-15T24:00:00Z",
            "2026-11-15T10:30:05.Z",
            "2026-11-15T10:30:05+0100",
            "1969-12-31T23:59:59Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn nearest_rank_p95() {
        let mut v: Vec<Money> = (1..=20).map(Money::from_picos).collect();
        // ceil(0.95 * 20) = 19th smallest.
        assert_eq!(nearest_rank(&mut v, 95), Some(Money::from_picos(19)));
        let mut v: Vec<Money> = (1..=10).rev().map(Money::from_picos).collect();
        assert_eq!(nearest_rank(&mut v, 95), Some(Money::from_picos(10)));
        let mut one = vec![Money::from_picos(7)];
        assert_eq!(nearest_rank(&mut one, 95), Some(Money::from_picos(7)));
        assert_eq!(nearest_rank(&mut [], 95), None);
    }

    #[test]
    fn changes_up_and_stable() {
        assert!(is_up(1.0, 1.11, 10.0));
        assert!(!is_up(1.0, 1.1, 10.0));
        assert!(is_up(0.0, 0.5, 10.0));
        assert!(!is_up(0.0, 0.0, 10.0));
        assert!(is_stable(0.0, 0.0, 10.0));
        assert!(is_stable(1.0, 0.9, 10.0));
        assert!(!is_stable(1.0, 0.89, 10.0));
        assert!(!is_stable(0.0, 1.0, 10.0));
    }

    #[test]
    fn worst_threshold_wins() {
        let config = SegmentsConfig {
            cost_per_run_warning_usd: Some(0.01),
            cost_p95_critical_usd: Some(0.05),
            ..SegmentsConfig::default()
        };
        let (level, reasons) = status_of(&config, Some(0.02), Some(0.06), 1.0);
        assert_eq!(level, Level::Critical);
        assert_eq!(
            reasons,
            [
                "cost_per_run 0.02 > warning 0.01",
                "cost_p95 0.06 > critical 0.05"
            ]
        );
        assert_eq!(status_of(&config, None, None, 9.0), (Level::Ok, vec![]));
    }
}
