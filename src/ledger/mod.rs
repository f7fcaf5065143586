//! The ledger: one record per metered call and one per ended run, in an
//! embedded SQLite file (WAL mode, `sqlite.rs`) or in a PostgreSQL database
//! that several replicas share ([`postgres`]).
//!
//! # Flow
//!
//! 1. The request path hands a [`CallRecord`] or [`RunRecord`] to
//!    [`Ledger::record_call`] / [`Ledger::record_run`]: a push onto a bounded
//!    channel. When the channel is full the caller waits for room (bounded
//!    backpressure, counted).
//! 2. One writer thread per backend commits the channel's records in
//!    batches: when a batch reaches [`MAX_BATCH`] records or
//!    `flush_interval_ms` after its first record, whichever comes first.
//!    The thread that drains the channel (the SQLite writer, PostgreSQL's
//!    intake) sleeps while its batch fills rather than wait on the channel,
//!    so a send wakes no one; senders wake it once per `MAX_BATCH` records,
//!    so a fast stream of calls does not hold a whole interval's records in
//!    memory. While the SQLite writer commits it yields its
//!    core every few rows, so a runtime worker waiting for that core is not
//!    held back for a whole scheduler slice of inserts.
//!    Between batches it applies the retention, deleting expired calls a few
//!    thousand rows at a time so a large cleanup never stalls writes.
//! 3. Durability bound: a record is committed at most `flush_interval_ms`
//!    after its call ended (plus the commit). After SIGKILL at most the last
//!    flush interval is missing; on SIGTERM the writer drains the channel and
//!    commits before the process exits ([`Ledger::close`]).
//! 4. Readers (the investigation API, the restore at start) go through
//!    [`reader::Reader`]: SQLite's own reader connection, or the PostgreSQL
//!    pool; [`query`] holds each query once for both.
//!
//! A write that fails (disk full, file removed, PostgreSQL down) is retried
//! with the records kept; each failure is logged and counted, never silent.
//! SQLite never drops a record. PostgreSQL keeps up to
//! `max_buffered_records` in memory during an outage and drops (counts and
//! logs) what comes past that, so the request path never waits on it.

pub mod postgres;
pub mod query;
pub mod reader;
mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use compact_str::CompactString;
use flume::TrySendError;

use crate::budget::{RestoredRun, RunEnd, RunStatus};
use crate::money::Money;
use reader::{clamp, Param, Reader};

/// Most records committed in one transaction.
pub const MAX_BATCH: usize = 2_000;
/// Rows deleted per retention step.
const RETENTION_STEP: usize = 5_000;
/// How often retention runs.
const RETENTION_EVERY: Duration = Duration::from_secs(600);

/// `[ledger]` settings, validated.
#[derive(Debug, Clone)]
pub struct LedgerSettings {
    pub backend: LedgerBackend,
    pub flush_interval: Duration,
    pub queue_capacity: usize,
    pub retention_days: u64,
}

/// Where the records go.
#[derive(Debug, Clone)]
pub enum LedgerBackend {
    /// The embedded file.
    Sqlite { path: PathBuf },
    /// A PostgreSQL database shared by every replica.
    Postgres(postgres::PostgresSettings),
}

/// One metered (or refused) call.
///
/// Its text fields hold up to 24 bytes inline ([`CompactString`]):
/// releases, routes, model names, price versions and most run ids fit, so
/// a record is usually one allocation (its box on the queue). A longer text
/// (a 36-character UUID run id) keeps the heap buffer it came in, without a
/// copy. The writer thread frees what the request path allocated; one block
/// a record instead of up to nine keeps that traffic between the threads'
/// allocator arenas small.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallRecord {
    pub ts_ms: u64,
    pub run_id: Option<CompactString>,
    pub release: CompactString,
    pub request_type: CompactString,
    pub route: CompactString,
    /// `openai`, `anthropic`, `gemini` or `tool`.
    pub provider: &'static str,
    pub model: Option<CompactString>,
    /// The price-table entry that priced the call.
    pub price_entry: Option<CompactString>,
    pub tool: Option<CompactString>,
    pub status: u16,
    /// `complete`, `upstream_error`, `client_gone`, `idle_timeout`,
    /// `refused`, `upstream_unreachable`…
    pub outcome: &'static str,
    pub prompt_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    pub cache_write_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
    pub cost: Money,
    pub latency_ms: u64,
    pub ttfb_ms: Option<u64>,
    pub streamed: bool,
    pub estimated: bool,
    pub sdk_retry: bool,
    pub repeat_after_failure: bool,
    pub duplicate_body: bool,
    /// The run's ceiling when the call was made (restores it after restart).
    pub run_ceiling: Option<Money>,
    pub price_version: CompactString,
}

/// One ended run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub run_id: String,
    pub release: String,
    pub request_type: String,
    pub status: String,
    pub stop_reason: String,
    pub started_ms: u64,
    pub ended_ms: u64,
    pub ceiling: Money,
    pub cost: Money,
    pub llm_cost: Money,
    pub tool_cost: Money,
    pub calls: u64,
    pub refusals: u64,
    pub retries: u64,
    pub repeated_calls: u64,
    pub breached: bool,
    pub evicted: bool,
}

impl From<&RunEnd> for RunRecord {
    fn from(end: &RunEnd) -> RunRecord {
        RunRecord {
            run_id: end.run_id.clone(),
            release: end.release.clone(),
            request_type: end.request_type.clone(),
            status: match end.status {
                RunStatus::Ok => "ok",
                RunStatus::Error => "error",
            }
            .into(),
            stop_reason: end.stop_reason.clone(),
            started_ms: end.started_ms,
            ended_ms: end.ended_ms,
            ceiling: end.ceiling,
            cost: end.cost,
            llm_cost: end.llm_cost,
            tool_cost: end.tool_cost,
            calls: end.calls,
            refusals: end.refusals,
            retries: end.retries,
            repeated_calls: end.repeated_calls,
            breached: end.breached,
            evicted: end.evicted,
        }
    }
}

/// What goes through the writer's channel. Every variant is boxed, so an
/// entry waiting in the queue takes 16 bytes (the queue grows with what
/// waits, up to `queue_capacity`, 65 536 by default, and keeps its
/// high-water mark).
enum Entry {
    Call(Box<CallRecord>),
    Run(Box<RunRecord>),
    /// Commit everything before this and answer.
    Flush(Box<mpsc::Sender<()>>),
    /// Find the runs to restore (PostgreSQL: on the writer's connection).
    Restore(Box<postgres::RestoreRequest>),
}

/// Counters the writer keeps (exported as metrics).
#[derive(Debug, Default)]
pub struct LedgerStats {
    pub queued: AtomicU64,
    pub written: AtomicU64,
    pub write_errors: AtomicU64,
    pub backpressure_waits: AtomicU64,
    /// Records accepted and not yet committed (PostgreSQL: its outage
    /// buffer).
    pub buffered: AtomicU64,
    /// Records dropped because the outage buffer was full.
    pub dropped: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger {path}: {message}")]
    Open { path: String, message: String },
    #[error("ledger query failed: {0}")]
    Query(String),
    #[error("ledger database unreachable: {0}")]
    Unavailable(String),
}

pub struct Ledger {
    tx: Mutex<Option<flume::Sender<Entry>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// The thread that drains the channel (SQLite's writer, PostgreSQL's
    /// intake), woken by a sender that finds the queue full or has just
    /// sent a batch's worth, and by a flush, a restore and close (it
    /// otherwise sleeps until its batch is due).
    wake_writer: Option<std::thread::Thread>,
    reader: Reader,
    pub stats: Arc<LedgerStats>,
    path: Option<PathBuf>,
}

/// Columns of `calls` a record fills, in the order of [`call_values`].
const CALL_COLUMNS: [&str; 26] = [
    "ts_ms",
    "run_id",
    "release",
    "request_type",
    "route",
    "provider",
    "model",
    "price_entry",
    "tool",
    "status",
    "outcome",
    "prompt_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cost_pico",
    "latency_ms",
    "ttfb_ms",
    "streamed",
    "estimated",
    "sdk_retry",
    "repeat_after_failure",
    "duplicate_body",
    "run_ceiling_pico",
    "price_version",
];

/// One column value of a record being written, borrowed from the record:
/// the writers bind it without copying its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field<'a> {
    Int(Option<i64>),
    Text(Option<&'a str>),
}

impl<'a> Field<'a> {
    fn uint(value: u64) -> Field<'a> {
        Field::Int(Some(clamp(value)))
    }

    fn opt_uint(value: Option<u64>) -> Field<'a> {
        Field::Int(value.map(clamp))
    }

    fn flag(value: bool) -> Field<'a> {
        Field::Int(Some(i64::from(value)))
    }

    fn text(value: &'a str) -> Field<'a> {
        Field::Text(Some(value))
    }

    fn opt_text(value: &'a Option<CompactString>) -> Field<'a> {
        Field::Text(value.as_deref())
    }
}

fn call_values(c: &CallRecord) -> [Field<'_>; 26] {
    [
        Field::uint(c.ts_ms),
        Field::opt_text(&c.run_id),
        Field::text(&c.release),
        Field::text(&c.request_type),
        Field::text(&c.route),
        Field::text(c.provider),
        Field::opt_text(&c.model),
        Field::opt_text(&c.price_entry),
        Field::opt_text(&c.tool),
        Field::uint(u64::from(c.status)),
        Field::text(c.outcome),
        Field::opt_uint(c.prompt_tokens),
        Field::opt_uint(c.cached_tokens),
        Field::opt_uint(c.cache_write_tokens),
        Field::opt_uint(c.completion_tokens),
        Field::opt_uint(c.reasoning_tokens),
        Field::uint(c.cost.picos()),
        Field::uint(c.latency_ms),
        Field::opt_uint(c.ttfb_ms),
        Field::flag(c.streamed),
        Field::flag(c.estimated),
        Field::flag(c.sdk_retry),
        Field::flag(c.repeat_after_failure),
        Field::flag(c.duplicate_body),
        Field::opt_uint(c.run_ceiling.map(Money::picos)),
        Field::text(&c.price_version),
    ]
}

/// Columns of `runs`, in the order of [`run_values`]; the first two are
/// the key.
const RUN_COLUMNS: [&str; 17] = [
    "run_id",
    "started_ms",
    "ended_ms",
    "release",
    "request_type",
    "status",
    "stop_reason",
    "ceiling_pico",
    "cost_pico",
    "llm_cost_pico",
    "tool_cost_pico",
    "calls",
    "refusals",
    "retries",
    "repeated_calls",
    "breached",
    "evicted",
];

fn run_values(r: &RunRecord) -> [Field<'_>; 17] {
    [
        Field::text(&r.run_id),
        Field::uint(r.started_ms),
        Field::uint(r.ended_ms),
        Field::text(&r.release),
        Field::text(&r.request_type),
        Field::text(&r.status),
        Field::text(&r.stop_reason),
        Field::uint(r.ceiling.picos()),
        Field::uint(r.cost.picos()),
        Field::uint(r.llm_cost.picos()),
        Field::uint(r.tool_cost.picos()),
        Field::uint(r.calls),
        Field::uint(r.refusals),
        Field::uint(r.retries),
        Field::uint(r.repeated_calls),
        Field::flag(r.breached),
        Field::flag(r.evicted),
    ]
}

/// Unix milliseconds now.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| clamp(d.as_millis() as u64))
}

impl Ledger {
    /// Opens the backend and starts its writer. SQLite: creates the file
    /// and its schema (an error here is fatal). PostgreSQL: builds the pool;
    /// the writer connects, migrates and writes in the background, so an
    /// unreachable database at start only delays the writes.
    pub fn open(settings: &LedgerSettings) -> Result<Ledger, LedgerError> {
        let (tx, rx) = flume::bounded(settings.queue_capacity.max(1));
        let stats = Arc::new(LedgerStats::default());
        let retention = Duration::from_secs(settings.retention_days.saturating_mul(86_400));
        let (writer, reader, path, wake_writer) = match &settings.backend {
            LedgerBackend::Sqlite { path } => {
                let (writer_conn, reader_conn) = sqlite::open(path)?;
                let writer_stats = stats.clone();
                let flush_interval = settings.flush_interval;
                let writer = std::thread::Builder::new()
                    .name("tollgate-ledger".into())
                    .spawn(move || {
                        sqlite::write_loop(writer_conn, rx, flush_interval, retention, writer_stats)
                    })
                    .map_err(|e| LedgerError::Open {
                        path: path.display().to_string(),
                        message: format!("cannot start the writer thread: {e}"),
                    })?;
                let reader = Reader::Sqlite(Arc::new(Mutex::new(reader_conn)));
                let wake = writer.thread().clone();
                (writer, reader, Some(path.clone()), Some(wake))
            }
            LedgerBackend::Postgres(pg) => {
                let (writer, intake, pool) =
                    postgres::start(pg, settings.flush_interval, retention, rx, stats.clone())?;
                (writer, Reader::Postgres(pool), None, Some(intake))
            }
        };
        Ok(Ledger {
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            wake_writer,
            reader,
            stats,
            path,
        })
    }

    /// The SQLite file (`None` with PostgreSQL).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Where read queries ([`query`]) run.
    pub fn reader(&self) -> &Reader {
        &self.reader
    }

    pub fn record_call(&self, record: CallRecord) {
        self.push(Entry::Call(Box::new(record)));
    }

    pub fn record_run(&self, record: RunRecord) {
        self.push(Entry::Run(Box::new(record)));
    }

    fn push(&self, entry: Entry) {
        let Some(tx) = lock(&self.tx).clone() else {
            tracing::error!(message = "ledger record after close; not written");
            self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let queued = self.stats.queued.fetch_add(1, Ordering::Relaxed) + 1;
        match tx.try_send(entry) {
            Ok(()) => {
                // Every `MAX_BATCH` records, wake the writer so that a full
                // batch commits now rather than when its interval ends:
                // what waits in memory stays within about two batches at
                // any call rate, not a whole interval's worth. (The count
                // is of every record sent, not of the open batch; a writer
                // woken with less than a batch goes back to sleep.)
                if queued.is_multiple_of(MAX_BATCH as u64) {
                    self.wake_writer();
                }
            }
            Err(TrySendError::Full(entry)) => {
                // Bounded backpressure: wait for the writer rather than drop.
                self.stats
                    .backpressure_waits
                    .fetch_add(1, Ordering::Relaxed);
                self.wake_writer();
                if tx.send(entry).is_err() {
                    self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!(message = "ledger writer is gone; record not written");
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Ends the draining thread's sleep before its batch is due.
    fn wake_writer(&self) {
        if let Some(writer) = &self.wake_writer {
            writer.unpark();
        }
    }

    /// Waits until every record queued before this call is committed (or,
    /// with PostgreSQL, dropped because the outage buffer was full).
    pub fn flush(&self) {
        let Some(tx) = lock(&self.tx).clone() else {
            return;
        };
        let (done_tx, done_rx) = mpsc::channel();
        if tx.send(Entry::Flush(Box::new(done_tx))).is_ok() {
            self.wake_writer();
            let _ = done_rx.recv();
        }
    }

    /// Drains the queue, commits, and stops the writer. Idempotent.
    pub fn close(&self) {
        drop(lock(&self.tx).take());
        self.wake_writer();
        if let Some(writer) = lock(&self.writer).take() {
            let _ = writer.join();
        }
    }

    /// Runs that were live within `idle_ms` of `now_ms` and have no end
    /// record: their spend goes back into the budgets after a restart.
    /// With PostgreSQL unreachable (WARN) or refusing (ERROR: schema,
    /// permissions) at start this logs and returns none: serving goes on,
    /// those runs start from zero.
    pub fn runs_to_restore(
        &self,
        now_ms: u64,
        idle_ms: u64,
    ) -> Result<Vec<RestoredRun>, LedgerError> {
        let since_ms = now_ms.saturating_sub(idle_ms);
        match &self.reader {
            Reader::Sqlite(conn) => sqlite::rows(
                &lock(conn),
                query::RUNS_TO_RESTORE,
                &[Param::uint(since_ms)],
            )?
            .iter()
            .map(query::restored_run)
            .collect(),
            Reader::Postgres(_) => {
                let Some(tx) = lock(&self.tx).clone() else {
                    return Ok(Vec::new());
                };
                match postgres::restore_through_writer(&tx, || self.wake_writer(), since_ms) {
                    Ok(runs) => Ok(runs),
                    Err(error @ LedgerError::Unavailable(_)) => {
                        tracing::warn!(
                            message = "PostgreSQL ledger unreachable at start: live runs' spend not restored; records are buffered until it is reachable",
                            %error
                        );
                        Ok(Vec::new())
                    }
                    Err(error) => {
                        tracing::error!(
                            message = "PostgreSQL ledger refused at start (check the schema and the role's permissions): live runs' spend not restored; records are buffered and retried",
                            %error
                        );
                        Ok(Vec::new())
                    }
                }
            }
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.close();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> LedgerSettings {
        LedgerSettings {
            backend: LedgerBackend::Sqlite {
                path: ledger_file(dir),
            },
            flush_interval: Duration::from_millis(50),
            queue_capacity: 16,
            retention_days: 30,
        }
    }

    fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    /// A call `ts` ms after the test's start (recent, so retention keeps it).
    fn call(run: &str, ts: u64, cost: u64) -> CallRecord {
        CallRecord {
            ts_ms: T0 + ts,
            run_id: Some(run.into()),
            release: "r1".into(),
            request_type: "default".into(),
            route: "openai".into(),
            provider: "openai",
            model: Some("gpt-4.1".into()),
            status: 200,
            outcome: "complete",
            cost: Money::from_picos(cost),
            price_version: "v1".into(),
            ..CallRecord::default()
        }
    }

    const T0: u64 = 1_800_000_000_000;

    fn ledger_file(dir: &Path) -> std::path::PathBuf {
        dir.join("ledger.db")
    }

    /// A connection of its own to the ledger file of [`settings`]`(dir)`.
    fn open_file(dir: &Path) -> rusqlite::Connection {
        rusqlite::Connection::open(ledger_file(dir)).unwrap()
    }

    /// The first column of every row `sql` returns, as text.
    fn texts(conn: &rusqlite::Connection, sql: &str) -> Vec<String> {
        conn.prepare(sql)
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn calls_in(conn: &rusqlite::Connection) -> i64 {
        conn.query_row("SELECT COUNT(*) FROM calls", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_channel_entry_is_a_tag_and_a_pointer() {
        // A burst can queue `queue_capacity` of them.
        assert_eq!(
            std::mem::size_of::<Entry>(),
            2 * std::mem::size_of::<usize>()
        );
    }

    #[test]
    fn retention_removes_only_expired_records() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&settings(dir.path())).unwrap();
        let mut old = call("old", 0, 1);
        old.ts_ms = now_ms() - 31 * 86_400_000;
        let mut recent = call("recent", 0, 1);
        recent.ts_ms = now_ms() - 86_400_000;
        ledger.record_call(old);
        ledger.record_call(recent);
        ledger.flush();
        let conn = open_file(dir.path());
        sqlite::apply_retention(&conn, Duration::from_secs(30 * 86_400));
        assert_eq!(texts(&conn, "SELECT run_id FROM calls"), ["recent"]);
    }

    #[test]
    fn every_record_is_written_under_backpressure() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&settings(dir.path())).unwrap();
        // 16-slot queue, 5000 records: the writer must keep up or callers wait.
        for i in 0..5000 {
            ledger.record_call(call("a", i, 7));
        }
        ledger.flush();
        let conn = open_file(dir.path());
        let (count, sum): (i64, i64) = conn
            .query_row("SELECT COUNT(*), SUM(cost_pico) FROM calls", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((count, sum), (5000, 35_000));
        assert_eq!(ledger.stats.written.load(Ordering::Relaxed), 5000);
    }

    #[test]
    fn a_full_queue_wakes_a_writer_whose_batch_is_not_due() {
        // The writer sleeps until its batch is due (an hour here); senders
        // that find the 16-slot queue full must wake it rather than wait.
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(
            Ledger::open(&LedgerSettings {
                flush_interval: Duration::from_secs(3600),
                ..settings(dir.path())
            })
            .unwrap(),
        );
        let (done_tx, done_rx) = mpsc::channel();
        let sender = ledger.clone();
        std::thread::spawn(move || {
            for i in 0..500 {
                sender.record_call(call("a", i, 1));
            }
            let _ = done_tx.send(());
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(60)).is_ok(),
            "senders held back by a sleeping writer"
        );
        assert!(ledger.stats.backpressure_waits.load(Ordering::Relaxed) > 0);
        ledger.close();
        assert_eq!(ledger.stats.written.load(Ordering::Relaxed), 500);
    }

    #[test]
    fn a_batch_worth_of_records_commits_before_the_interval_ends() {
        // An hour-long interval and a queue with room for everything: only
        // the wake-up per `MAX_BATCH` records sent can get them committed.
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&LedgerSettings {
            flush_interval: Duration::from_secs(3600),
            queue_capacity: 4 * MAX_BATCH,
            ..settings(dir.path())
        })
        .unwrap();
        for i in 0..MAX_BATCH as u64 + 10 {
            ledger.record_call(call("a", i, 1));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while ledger.stats.written.load(Ordering::Relaxed) < MAX_BATCH as u64 {
            assert!(
                std::time::Instant::now() < deadline,
                "a full batch waited for the interval"
            );
            std::thread::yield_now();
        }
        // The 10 records past the batch wait for their interval (or close).
        assert_eq!(
            ledger.stats.written.load(Ordering::Relaxed),
            MAX_BATCH as u64
        );
        ledger.close();
        assert_eq!(
            ledger.stats.written.load(Ordering::Relaxed),
            MAX_BATCH as u64 + 10
        );
    }

    #[test]
    fn every_column_is_stored_as_recorded_when_calls_repeat_some_values() {
        // The writer binds only the columns that changed since the previous
        // call: each column here changes with its own period (text and
        // integers to and from NULL), runs are written in between, and a
        // flush splits the calls into two batches.
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&settings(dir.path())).unwrap();
        let pick = |i: u64, period: u64, text: &str| {
            (!i.is_multiple_of(period)).then(|| CompactString::from(text))
        };
        let records: Vec<CallRecord> = (0..60u64)
            .map(|i| CallRecord {
                ts_ms: T0 + i / 4,
                run_id: pick(i, 5, &format!("run-{}", i / 7)),
                release: format!("r{}", i / 11).into(),
                request_type: if i % 6 < 3 { "a" } else { "b" }.into(),
                route: format!("route{}", i % 2).into(),
                provider: if i.is_multiple_of(9) {
                    "tool"
                } else {
                    "openai"
                },
                model: pick(i, 2, "gpt-4.1"),
                price_entry: pick(i, 3, "gpt-4.1"),
                tool: pick(i, 4, "search"),
                status: if i.is_multiple_of(13) { 500 } else { 200 },
                outcome: if i.is_multiple_of(13) {
                    "upstream_error"
                } else {
                    "complete"
                },
                prompt_tokens: (!i.is_multiple_of(3)).then_some(100 + i % 2),
                cached_tokens: i.is_multiple_of(4).then_some(7),
                cache_write_tokens: (i % 5 == 1).then_some(i),
                completion_tokens: Some(i / 3),
                reasoning_tokens: i.is_multiple_of(2).then_some(3),
                cost: Money::from_picos(i / 2),
                latency_ms: i % 7,
                ttfb_ms: (!i.is_multiple_of(8)).then_some(i % 3),
                streamed: i.is_multiple_of(2),
                estimated: i.is_multiple_of(3),
                sdk_retry: i.is_multiple_of(4),
                repeat_after_failure: i.is_multiple_of(5),
                duplicate_body: i.is_multiple_of(6),
                run_ceiling: (i % 10 < 5).then(|| Money::from_picos(1_000)),
                price_version: format!("v{}", i / 20).into(),
            })
            .collect();
        for (i, record) in records.iter().enumerate() {
            ledger.record_call(record.clone());
            if i % 9 == 4 {
                ledger.record_run(RunRecord {
                    run_id: format!("ended-{i}"),
                    release: "x".into(),
                    request_type: "y".into(),
                    status: "ok".into(),
                    stop_reason: "completed".into(),
                    started_ms: T0,
                    ended_ms: T0 + 1,
                    ceiling: Money::ZERO,
                    cost: Money::ZERO,
                    llm_cost: Money::ZERO,
                    tool_cost: Money::ZERO,
                    calls: 0,
                    refusals: 0,
                    retries: 0,
                    repeated_calls: 0,
                    breached: false,
                    evicted: false,
                });
            }
            if i == 30 {
                ledger.flush();
            }
        }
        ledger.flush();
        let conn = open_file(dir.path());
        let sql = format!("SELECT {} FROM calls ORDER BY id", CALL_COLUMNS.join(", "));
        let mut stmt = conn.prepare(&sql).unwrap();
        let stored: Vec<Vec<rusqlite::types::Value>> = stmt
            .query_map([], |row| {
                (0..CALL_COLUMNS.len())
                    .map(|i| row.get::<_, rusqlite::types::Value>(i))
                    .collect()
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(stored.len(), records.len());
        for (n, (record, row)) in records.iter().zip(&stored).enumerate() {
            for (column, (field, value)) in call_values(record).iter().zip(row).enumerate() {
                let expected = match *field {
                    Field::Int(v) => v.map_or(
                        rusqlite::types::Value::Null,
                        rusqlite::types::Value::Integer,
                    ),
                    Field::Text(v) => v.map_or(rusqlite::types::Value::Null, |t| {
                        rusqlite::types::Value::Text(t.to_string())
                    }),
                };
                assert_eq!(
                    *value, expected,
                    "call {n}, column {}",
                    CALL_COLUMNS[column]
                );
            }
        }
        let runs: i64 = conn
            .query_row("SELECT COUNT(*) FROM runs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(runs, 7);
    }

    #[test]
    fn close_drains_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&settings(dir.path())).unwrap();
        for i in 0..100 {
            ledger.record_call(call("a", i, 1));
        }
        ledger.close();
        let conn = open_file(dir.path());
        assert_eq!(calls_in(&conn), 100);
    }

    #[test]
    fn a_record_after_close_is_counted_as_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&settings(dir.path())).unwrap();
        ledger.record_call(call("a", 0, 1));
        ledger.close();
        ledger.record_call(call("a", 1, 1));
        assert_eq!(ledger.stats.write_errors.load(Ordering::Relaxed), 1);
        assert_eq!(ledger.stats.written.load(Ordering::Relaxed), 1);
        let conn = open_file(dir.path());
        assert_eq!(calls_in(&conn), 1);
    }

    #[test]
    fn a_file_from_before_loses_the_release_index_and_keeps_its_calls() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&settings(dir.path())).unwrap();
        ledger.record_call(call("a", 0, 1));
        ledger.close();
        let conn = open_file(dir.path());
        conn.execute_batch("CREATE INDEX calls_release ON calls(release, ts_ms)")
            .unwrap();
        drop(conn);

        let ledger = Ledger::open(&settings(dir.path())).unwrap();
        ledger.record_call(call("a", 1, 1));
        ledger.close();
        let conn = open_file(dir.path());
        let indexes = texts(
            &conn,
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'calls' ORDER BY name",
        );
        assert_eq!(indexes, ["calls_run", "calls_ts"]);
        assert_eq!(calls_in(&conn), 2);
    }

    #[test]
    fn live_runs_are_found_for_restore_and_ended_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&settings(dir.path())).unwrap();
        let mut live = call("live", 1_000, 300);
        live.run_ceiling = Some(Money::from_picos(5_000));
        ledger.record_call(live);
        ledger.record_call(call("live", 2_000, 200));
        ledger.record_call(call("ended", 1_500, 100));
        ledger.record_run(RunRecord {
            run_id: "ended".into(),
            release: "r1".into(),
            request_type: "default".into(),
            status: "ok".into(),
            stop_reason: "completed".into(),
            started_ms: T0 + 1_500,
            ended_ms: T0 + 1_600,
            ceiling: Money::from_picos(1_000),
            cost: Money::from_picos(100),
            llm_cost: Money::from_picos(100),
            tool_cost: Money::ZERO,
            calls: 1,
            refusals: 0,
            retries: 0,
            repeated_calls: 0,
            breached: false,
            evicted: false,
        });
        ledger.record_call(call("stale", 10, 100));
        ledger.flush();
        let restored = ledger.runs_to_restore(T0 + 2_500, 1_000).unwrap();
        assert_eq!(restored.len(), 1, "{restored:?}");
        let run = &restored[0];
        assert_eq!(run.run_id, "live");
        assert_eq!(run.llm_cost, Money::from_picos(500));
        assert_eq!(run.ceiling, Some(Money::from_picos(5_000)));
        assert_eq!(
            (run.started_ms, run.last_seen_ms, run.calls),
            (T0 + 1_000, T0 + 2_000, 2)
        );
    }
}
