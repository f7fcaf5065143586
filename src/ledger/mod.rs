//! The ledger: one record per metered call and one per ended run, in an
//! embedded SQLite file (WAL mode).
//!
//! # Flow
//!
//! 1. The request path hands a [`CallRecord`] or [`RunRecord`] to
//!    [`Ledger::record_call`] / [`Ledger::record_run`]: a push onto a bounded
//!    channel. When the channel is full the caller waits for room (bounded
//!    backpressure, counted), so no record is ever dropped.
//! 2. One writer thread drains the channel and commits in batches: when a
//!    batch reaches [`MAX_BATCH`] records or `flush_interval_ms` after its
//!    first record, whichever comes first. Between batches it applies the
//!    retention, deleting expired calls a few thousand rows at a time so a
//!    large cleanup never stalls writes.
//! 3. Durability bound: a record is on disk at most `flush_interval_ms`
//!    after its call ended (plus the commit). After SIGKILL at most the last
//!    flush interval is missing; on SIGTERM the writer drains the channel and
//!    commits before the process exits ([`Ledger::close`]).
//! 4. Readers (the investigation API, the restore at start) use their own
//!    connection; WAL lets them read while the writer writes.
//!
//! A write that fails (disk full, file removed) is retried with the batch
//! kept; each failure is logged and counted, never silent.

pub mod query;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};

use crate::budget::{RestoredRun, RunEnd, RunStatus};
use crate::money::Money;

/// Most records committed in one transaction.
pub const MAX_BATCH: usize = 2_000;
/// Rows deleted per retention step.
const RETENTION_STEP: usize = 5_000;
/// How often retention runs.
const RETENTION_EVERY: Duration = Duration::from_secs(600);

/// `[ledger]` settings, validated.
#[derive(Debug, Clone)]
pub struct LedgerSettings {
    pub path: PathBuf,
    pub flush_interval: Duration,
    pub queue_capacity: usize,
    pub retention_days: u64,
}

/// One metered (or refused) call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallRecord {
    pub ts_ms: u64,
    pub run_id: Option<String>,
    pub release: String,
    pub request_type: String,
    pub route: String,
    /// `openai`, `anthropic`, `gemini` or `tool`.
    pub provider: String,
    pub model: Option<String>,
    /// The price-table entry that priced the call.
    pub price_entry: Option<String>,
    pub tool: Option<String>,
    pub status: u16,
    /// `complete`, `upstream_error`, `client_gone`, `idle_timeout`,
    /// `refused`, `upstream_unreachable`…
    pub outcome: String,
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
    pub price_version: String,
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

enum Entry {
    Call(Box<CallRecord>),
    Run(Box<RunRecord>),
    /// Commit everything before this and answer.
    Flush(mpsc::Sender<()>),
}

/// Counters the writer keeps (exported as metrics).
#[derive(Debug, Default)]
pub struct LedgerStats {
    pub queued: AtomicU64,
    pub written: AtomicU64,
    pub write_errors: AtomicU64,
    pub backpressure_waits: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger {path}: {message}")]
    Open { path: String, message: String },
    #[error("ledger query failed: {0}")]
    Query(String),
}

pub struct Ledger {
    tx: Mutex<Option<SyncSender<Entry>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    reader: Mutex<Connection>,
    pub stats: Arc<LedgerStats>,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    run_id TEXT,
    release TEXT NOT NULL,
    request_type TEXT NOT NULL,
    route TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT,
    price_entry TEXT,
    tool TEXT,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    prompt_tokens INTEGER,
    cached_tokens INTEGER,
    cache_write_tokens INTEGER,
    completion_tokens INTEGER,
    reasoning_tokens INTEGER,
    cost_pico INTEGER NOT NULL,
    latency_ms INTEGER NOT NULL,
    ttfb_ms INTEGER,
    streamed INTEGER NOT NULL,
    estimated INTEGER NOT NULL,
    sdk_retry INTEGER NOT NULL,
    repeat_after_failure INTEGER NOT NULL,
    duplicate_body INTEGER NOT NULL,
    run_ceiling_pico INTEGER,
    price_version TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_ts ON calls(ts_ms);
CREATE INDEX IF NOT EXISTS calls_run ON calls(run_id, ts_ms);
CREATE INDEX IF NOT EXISTS calls_release ON calls(release, ts_ms);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER NOT NULL,
    release TEXT NOT NULL,
    request_type TEXT NOT NULL,
    status TEXT NOT NULL,
    stop_reason TEXT NOT NULL,
    ceiling_pico INTEGER NOT NULL,
    cost_pico INTEGER NOT NULL,
    llm_cost_pico INTEGER NOT NULL,
    tool_cost_pico INTEGER NOT NULL,
    calls INTEGER NOT NULL,
    refusals INTEGER NOT NULL,
    retries INTEGER NOT NULL,
    repeated_calls INTEGER NOT NULL,
    breached INTEGER NOT NULL,
    evicted INTEGER NOT NULL,
    PRIMARY KEY (run_id, started_ms)
);
CREATE INDEX IF NOT EXISTS runs_ended ON runs(ended_ms);
CREATE INDEX IF NOT EXISTS runs_release ON runs(release, ended_ms);
";

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL is durable in WAL mode against process crashes (SIGKILL); a
    // power loss may lose the last commits, which FULL would also fsync.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

impl Ledger {
    /// Opens (creating if needed) the ledger file and starts its writer.
    pub fn open(settings: &LedgerSettings) -> Result<Ledger, LedgerError> {
        let fail = |message: String| LedgerError::Open {
            path: settings.path.display().to_string(),
            message,
        };
        if let Some(dir) = settings.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| fail(format!("cannot create its directory: {e}")))?;
        }
        let writer_conn = open_connection(&settings.path).map_err(|e| fail(e.to_string()))?;
        writer_conn
            .execute_batch(SCHEMA)
            .map_err(|e| fail(format!("schema: {e}")))?;
        let reader = open_connection(&settings.path).map_err(|e| fail(e.to_string()))?;
        let (tx, rx) = mpsc::sync_channel(settings.queue_capacity.max(1));
        let stats = Arc::new(LedgerStats::default());
        let writer_stats = stats.clone();
        let flush_interval = settings.flush_interval;
        let retention = Duration::from_secs(settings.retention_days.saturating_mul(86_400));
        let writer = std::thread::Builder::new()
            .name("tollgate-ledger".into())
            .spawn(move || write_loop(writer_conn, rx, flush_interval, retention, writer_stats))
            .map_err(|e| fail(format!("cannot start the writer thread: {e}")))?;
        Ok(Ledger {
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            reader: Mutex::new(reader),
            stats,
            path: settings.path.clone(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
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
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        match tx.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(entry)) => {
                // Bounded backpressure: wait for the writer rather than drop.
                self.stats
                    .backpressure_waits
                    .fetch_add(1, Ordering::Relaxed);
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

    /// Waits until every record queued before this call is committed.
    pub fn flush(&self) {
        let Some(tx) = lock(&self.tx).clone() else {
            return;
        };
        let (done_tx, done_rx) = mpsc::channel();
        if tx.send(Entry::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv();
        }
    }

    /// Drains the queue, commits, and stops the writer. Idempotent.
    pub fn close(&self) {
        drop(lock(&self.tx).take());
        if let Some(writer) = lock(&self.writer).take() {
            let _ = writer.join();
        }
    }

    /// Runs a read query on the reader connection.
    pub fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, LedgerError> {
        f(&lock(&self.reader)).map_err(|e| LedgerError::Query(e.to_string()))
    }

    /// Runs that were live within `idle_ms` of `now_ms` and have no end
    /// record: their spend goes back into the budgets after a restart.
    pub fn runs_to_restore(
        &self,
        now_ms: u64,
        idle_ms: u64,
    ) -> Result<Vec<RestoredRun>, LedgerError> {
        let since = now_ms.saturating_sub(idle_ms) as i64;
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT c.run_id, c.release, c.request_type,
                        MIN(c.ts_ms), MAX(c.ts_ms),
                        SUM(CASE WHEN c.provider = 'tool' THEN 0 ELSE c.cost_pico END),
                        SUM(CASE WHEN c.provider = 'tool' THEN c.cost_pico ELSE 0 END),
                        SUM(CASE WHEN c.outcome = 'refused' THEN 0 ELSE 1 END),
                        SUM(CASE WHEN c.outcome = 'refused' THEN 1 ELSE 0 END),
                        SUM(c.sdk_retry OR c.repeat_after_failure), SUM(c.duplicate_body),
                        MAX(c.run_ceiling_pico)
                 FROM calls c
                 WHERE c.run_id IS NOT NULL
                   AND c.ts_ms > COALESCE((SELECT MAX(r.ended_ms) FROM runs r WHERE r.run_id = c.run_id), -1)
                 GROUP BY c.run_id
                 HAVING MAX(c.ts_ms) >= ?1",
            )?;
            let rows = stmt.query_map(params![since], |row| {
                let pico = |i: usize| -> rusqlite::Result<Money> { Ok(Money::from_picos(row.get::<_, i64>(i)?.max(0) as u64)) };
                Ok(RestoredRun {
                    run_id: row.get(0)?,
                    release: row.get(1)?,
                    request_type: row.get(2)?,
                    started_ms: row.get::<_, i64>(3)?.max(0) as u64,
                    last_seen_ms: row.get::<_, i64>(4)?.max(0) as u64,
                    llm_cost: pico(5)?,
                    tool_cost: pico(6)?,
                    calls: row.get::<_, i64>(7)?.max(0) as u64,
                    refusals: row.get::<_, i64>(8)?.max(0) as u64,
                    retries: row.get::<_, i64>(9)?.max(0) as u64,
                    repeated_calls: row.get::<_, i64>(10)?.max(0) as u64,
                    ceiling: row.get::<_, Option<i64>>(11)?.map(|p| Money::from_picos(p.max(0) as u64)),
                })
            })?;
            rows.collect()
        })
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

fn write_loop(
    mut conn: Connection,
    rx: Receiver<Entry>,
    flush_interval: Duration,
    retention: Duration,
    stats: Arc<LedgerStats>,
) {
    let mut batch: Vec<Entry> = Vec::with_capacity(MAX_BATCH);
    let mut waiters: Vec<mpsc::Sender<()>> = Vec::new();
    let mut batch_started: Option<Instant> = None;
    let mut last_retention = Instant::now() - RETENTION_EVERY;
    let mut open = true;
    while open || !batch.is_empty() {
        let timeout = match batch_started {
            Some(started) => flush_interval.saturating_sub(started.elapsed()),
            None => RETENTION_EVERY,
        };
        let mut commit_now = if open {
            match rx.recv_timeout(timeout) {
                Ok(Entry::Flush(done)) => {
                    waiters.push(done);
                    true
                }
                Ok(entry) => {
                    batch_started.get_or_insert_with(Instant::now);
                    batch.push(entry);
                    batch.len() >= MAX_BATCH
                }
                Err(RecvTimeoutError::Timeout) => true,
                Err(RecvTimeoutError::Disconnected) => {
                    open = false;
                    true
                }
            }
        } else {
            true
        };
        if batch_started.is_some_and(|s| s.elapsed() >= flush_interval) {
            commit_now = true;
        }
        if !commit_now {
            continue;
        }
        if !batch.is_empty() {
            match commit(&mut conn, &batch) {
                Ok(()) => {
                    stats
                        .written
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    batch.clear();
                    batch_started = None;
                }
                Err(error) => {
                    stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(message = "ledger write failed; keeping the batch and retrying", %error, records = batch.len());
                    std::thread::sleep(Duration::from_millis(500));
                    if !open {
                        // Shutting down and the disk refuses: say exactly
                        // what is lost rather than spin forever.
                        tracing::error!(
                            message = "ledger records lost at shutdown",
                            records = batch.len()
                        );
                        batch.clear();
                    }
                    continue;
                }
            }
        }
        for waiter in waiters.drain(..) {
            let _ = waiter.send(());
        }
        if retention > Duration::ZERO && last_retention.elapsed() >= RETENTION_EVERY && open {
            last_retention = Instant::now();
            apply_retention(&conn, retention);
        }
    }
}

fn commit(conn: &mut Connection, batch: &[Entry]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut call_stmt = tx.prepare_cached(
            "INSERT INTO calls (ts_ms, run_id, release, request_type, route, provider, model, price_entry, tool,
                status, outcome, prompt_tokens, cached_tokens, cache_write_tokens, completion_tokens, reasoning_tokens,
                cost_pico, latency_ms, ttfb_ms, streamed, estimated, sdk_retry, repeat_after_failure, duplicate_body,
                run_ceiling_pico, price_version)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26)",
        )?;
        let mut run_stmt = tx.prepare_cached(
            "INSERT OR REPLACE INTO runs (run_id, started_ms, ended_ms, release, request_type, status, stop_reason,
                ceiling_pico, cost_pico, llm_cost_pico, tool_cost_pico, calls, refusals, retries, repeated_calls, breached, evicted)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        )?;
        let int = |v: u64| v.min(i64::MAX as u64) as i64;
        let opt = |v: Option<u64>| v.map(int);
        for entry in batch {
            match entry {
                Entry::Call(c) => {
                    call_stmt.execute(params![
                        int(c.ts_ms),
                        c.run_id,
                        c.release,
                        c.request_type,
                        c.route,
                        c.provider,
                        c.model,
                        c.price_entry,
                        c.tool,
                        c.status,
                        c.outcome,
                        opt(c.prompt_tokens),
                        opt(c.cached_tokens),
                        opt(c.cache_write_tokens),
                        opt(c.completion_tokens),
                        opt(c.reasoning_tokens),
                        int(c.cost.picos()),
                        int(c.latency_ms),
                        opt(c.ttfb_ms),
                        c.streamed,
                        c.estimated,
                        c.sdk_retry,
                        c.repeat_after_failure,
                        c.duplicate_body,
                        opt(c.run_ceiling.map(Money::picos)),
                        c.price_version,
                    ])?;
                }
                Entry::Run(r) => {
                    run_stmt.execute(params![
                        r.run_id,
                        int(r.started_ms),
                        int(r.ended_ms),
                        r.release,
                        r.request_type,
                        r.status,
                        r.stop_reason,
                        int(r.ceiling.picos()),
                        int(r.cost.picos()),
                        int(r.llm_cost.picos()),
                        int(r.tool_cost.picos()),
                        int(r.calls),
                        int(r.refusals),
                        int(r.retries),
                        int(r.repeated_calls),
                        r.breached,
                        r.evicted,
                    ])?;
                }
                Entry::Flush(_) => {}
            }
        }
    }
    tx.commit()
}

/// Deletes calls and runs older than `retention`, a step at a time.
fn apply_retention(conn: &Connection, retention: Duration) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let cutoff = now_ms - retention.as_millis() as i64;
    for (table, column) in [("calls", "ts_ms"), ("runs", "ended_ms")] {
        loop {
            let sql = format!(
                "DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE {column} < ?1 LIMIT {RETENTION_STEP})"
            );
            match conn.execute(&sql, params![cutoff]) {
                Ok(n) if n == RETENTION_STEP => continue,
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(message = "ledger retention step failed", %error);
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> LedgerSettings {
        LedgerSettings {
            path: dir.join("ledger.db"),
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
            provider: "openai".into(),
            model: Some("gpt-4.1".into()),
            status: 200,
            outcome: "complete".into(),
            cost: Money::from_picos(cost),
            price_version: "v1".into(),
            ..CallRecord::default()
        }
    }

    const T0: u64 = 1_800_000_000_000;

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
        let conn = ledger.reader.lock().unwrap();
        apply_retention(&conn, Duration::from_secs(30 * 86_400));
        let runs: Vec<String> = conn
            .prepare("SELECT run_id FROM calls")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(runs, ["recent"]);
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
        let (count, sum): (i64, i64) = ledger
            .read(|c| {
                c.query_row("SELECT COUNT(*), SUM(cost_pico) FROM calls", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
            })
            .unwrap();
        assert_eq!((count, sum), (5000, 35_000));
        assert_eq!(ledger.stats.written.load(Ordering::Relaxed), 5000);
    }

    #[test]
    fn close_drains_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&settings(dir.path())).unwrap();
        for i in 0..100 {
            ledger.record_call(call("a", i, 1));
        }
        ledger.close();
        let conn = Connection::open(dir.path().join("ledger.db")).unwrap();
        let count: i64 = conn
            .query_row("SELECT COUNT(*) FROM calls", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 100);
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
