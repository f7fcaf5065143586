//! The shared backend: one PostgreSQL database that every replica writes
//! its records to and reads the investigation API from.
//!
//! # Flow
//!
//! 1. An intake thread drains the ledger's bounded channel at memory speed
//!    into the writer's queue, counting what it holds in
//!    [`LedgerStats::buffered`]. Past `max_buffered_records` it drops new
//!    records (counted in [`LedgerStats::dropped`], logged at ERROR), so a
//!    slow or absent database never holds up the request path. It hands
//!    records over in bunches, each within `flush_interval / 2` of its
//!    first record (see [`intake`]), so that no thread is woken per record.
//! 2. The writer thread (its own single-threaded runtime and a one-connection
//!    pool) connects, applies the schema migrations under an advisory lock,
//!    and commits the queue in order, up to [`MAX_BATCH`] records per
//!    transaction, one multi-row `INSERT … SELECT FROM UNNEST(…)` per table.
//! 3. A failed write keeps its records at the head of the queue and is
//!    retried with exponential backoff (up to [`BACKOFF_MAX`]); when the
//!    database returns, the queue is written in order without a restart.
//! 4. Every call record carries `(writer_id, writer_seq)`: this process's
//!    random id and a sequence number. A batch retried after a commit whose
//!    outcome was lost (connection cut after `COMMIT` was sent) is inserted
//!    with `ON CONFLICT DO NOTHING`, so it is not written twice; run records
//!    are keyed by `(run_id, started_ms)` and upserted.
//! 5. Reads use a separate pool of `pool_size` connections on the caller's
//!    runtime (see [`super::reader`]).

use std::borrow::Cow;
use std::collections::hash_map::Entry as Slot;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::NoTls;

use super::reader::{postgres_placeholders, Param, Reader, Row, Value};
use super::{
    call_values, now_ms, query, run_values, CallRecord, Entry, Field, LedgerError, LedgerStats,
    RunRecord, CALL_COLUMNS, MAX_BATCH, RETENTION_EVERY, RETENTION_STEP, RUN_COLUMNS,
};
use crate::budget::RestoredRun;

/// Connecting gives up after this unless the URL sets `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A batch that takes longer is treated as failed (its outcome unknown: the
/// retry is deduplicated).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between retries while the database is down.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// After close (SIGTERM), how long the writer keeps retrying before it
/// reports the records it could not write.
pub const CLOSE_RETRY_FOR: Duration = Duration::from_secs(15);
/// How long the restore at start waits for the database.
const RESTORE_WAIT: Duration = Duration::from_secs(20);
/// A failure that goes on is logged again at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// `pg_advisory_xact_lock` key that serialises migrations across replicas.
const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465;

/// Schema versions, applied in order, each once (`schema_migrations`).
/// Text columns use the "C" collation so sorting and comparison are
/// bytewise, as in SQLite; flags are 0/1 `BIGINT`s.
const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    r#"
CREATE TABLE calls (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts_ms BIGINT NOT NULL,
    run_id TEXT COLLATE "C",
    release TEXT COLLATE "C" NOT NULL,
    request_type TEXT COLLATE "C" NOT NULL,
    route TEXT COLLATE "C" NOT NULL,
    provider TEXT COLLATE "C" NOT NULL,
    model TEXT COLLATE "C",
    price_entry TEXT COLLATE "C",
    tool TEXT COLLATE "C",
    status BIGINT NOT NULL,
    outcome TEXT COLLATE "C" NOT NULL,
    prompt_tokens BIGINT,
    cached_tokens BIGINT,
    cache_write_tokens BIGINT,
    completion_tokens BIGINT,
    reasoning_tokens BIGINT,
    cost_pico BIGINT NOT NULL,
    latency_ms BIGINT NOT NULL,
    ttfb_ms BIGINT,
    streamed BIGINT NOT NULL,
    estimated BIGINT NOT NULL,
    sdk_retry BIGINT NOT NULL,
    repeat_after_failure BIGINT NOT NULL,
    duplicate_body BIGINT NOT NULL,
    run_ceiling_pico BIGINT,
    price_version TEXT COLLATE "C" NOT NULL,
    writer_id TEXT COLLATE "C" NOT NULL,
    writer_seq BIGINT NOT NULL,
    UNIQUE (writer_id, writer_seq)
);
CREATE INDEX calls_ts ON calls(ts_ms);
CREATE INDEX calls_run ON calls(run_id, ts_ms);
CREATE INDEX calls_release ON calls(release, ts_ms);
CREATE TABLE runs (
    run_id TEXT COLLATE "C" NOT NULL,
    started_ms BIGINT NOT NULL,
    ended_ms BIGINT NOT NULL,
    release TEXT COLLATE "C" NOT NULL,
    request_type TEXT COLLATE "C" NOT NULL,
    status TEXT COLLATE "C" NOT NULL,
    stop_reason TEXT COLLATE "C" NOT NULL,
    ceiling_pico BIGINT NOT NULL,
    cost_pico BIGINT NOT NULL,
    llm_cost_pico BIGINT NOT NULL,
    tool_cost_pico BIGINT NOT NULL,
    calls BIGINT NOT NULL,
    refusals BIGINT NOT NULL,
    retries BIGINT NOT NULL,
    repeated_calls BIGINT NOT NULL,
    breached BIGINT NOT NULL,
    evicted BIGINT NOT NULL,
    PRIMARY KEY (run_id, started_ms)
);
CREATE INDEX runs_ended ON runs(ended_ms);
CREATE INDEX runs_release ON runs(release, ended_ms);
"#,
)];

/// `[ledger]` settings of the PostgreSQL backend.
#[derive(Clone)]
pub struct PostgresSettings {
    /// `postgres://user:password@host:port/database` (may hold a password:
    /// never logged).
    pub url: String,
    /// Connections the investigation API may use at once.
    pub pool_size: usize,
    /// Records held in memory while the database is unreachable.
    pub max_buffered_records: usize,
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &"<redacted>")
            .field("pool_size", &self.pool_size)
            .field("max_buffered_records", &self.max_buffered_records)
            .finish()
    }
}

/// Parses a connection URL (or key=value string); the error never repeats
/// the URL, which may hold a password.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| format!("not a PostgreSQL connection URL: {e}"))?;
    if config.get_hosts().is_empty() {
        return Err("the URL names no host".into());
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("tollgate");
    }
    Ok(config)
}

fn pool(config: tokio_postgres::Config, size: usize) -> Result<Pool, String> {
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(CONNECT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| e.to_string())
}

/// A request for the runs to restore, answered by the writer thread (the
/// caller, at start, may be on a runtime thread that cannot wait on async
/// I/O).
pub struct RestoreRequest {
    since_ms: u64,
    reply: mpsc::Sender<Result<Vec<RestoredRun>, LedgerError>>,
}

/// Asks the writer for the runs to restore and waits (bounded); `wake`
/// ends the intake's sleep so the request is handed over at once.
pub(super) fn restore_through_writer(
    tx: &flume::Sender<Entry>,
    wake: impl Fn(),
    since_ms: u64,
) -> Result<Vec<RestoredRun>, LedgerError> {
    let (reply, answer) = mpsc::channel();
    tx.send(Entry::Restore(Box::new(RestoreRequest { since_ms, reply })))
        .map_err(|_| LedgerError::Unavailable("the ledger writer is gone".into()))?;
    wake();
    answer.recv_timeout(RESTORE_WAIT).map_err(|_| {
        LedgerError::Unavailable(format!("no answer within {} s", RESTORE_WAIT.as_secs()))
    })?
}

/// Starts the intake and writer threads; returns the writer's handle, the
/// intake's thread (for senders to unpark) and the read pool.
pub(super) fn start(
    settings: &PostgresSettings,
    flush_interval: Duration,
    retention: Duration,
    rx: flume::Receiver<Entry>,
    stats: Arc<LedgerStats>,
) -> Result<(std::thread::JoinHandle<()>, std::thread::Thread, Pool), LedgerError> {
    let fail = |message: String| LedgerError::Open {
        path: "ledger.url (PostgreSQL)".into(),
        message,
    };
    let config = parse_url(&settings.url).map_err(fail)?;
    let read_pool = pool(config.clone(), settings.pool_size).map_err(fail)?;
    let write_pool = pool(config, 1).map_err(fail)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(format!("cannot start the writer runtime: {e}")))?;
    let (queue_tx, queue_rx) = unbounded_channel();
    let max_buffered = settings.max_buffered_records as u64;
    let intake_stats = stats.clone();
    let intake = std::thread::Builder::new()
        .name("tollgate-ledger-intake".into())
        .spawn(move || intake(rx, queue_tx, intake_stats, max_buffered, flush_interval))
        .map_err(|e| fail(format!("cannot start the intake thread: {e}")))?;
    let writer = Writer {
        pool: write_pool,
        stats,
        flush_interval,
        retention,
        writer_id: writer_id(),
        next_seq: 1,
        queue: VecDeque::new(),
        waiters: Vec::new(),
        migrated: false,
        backoff: BACKOFF_MIN,
        failing: None,
    };
    let handle = std::thread::Builder::new()
        .name("tollgate-ledger".into())
        .spawn(move || runtime.block_on(writer.run(queue_rx)))
        .map_err(|e| fail(format!("cannot start the writer thread: {e}")))?;
    Ok((handle, intake.thread().clone(), read_pool))
}

/// A random id for this process's records (with the sequence number, the
/// key that makes a retried batch idempotent).
fn writer_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_i64(now_ms());
    format!("{:016x}", hasher.finish())
}

/// Entries the intake hands to the writer at once, in their order, with
/// the time the first of them left the channel.
struct Handoff {
    entries: Vec<Entry>,
    first_at: Instant,
}

/// Moves entries from the bounded channel to the writer's queue, dropping
/// records past `max_buffered`.
///
/// It hands them over in bunches rather than one by one, as the SQLite
/// writer batches: after the first entry it sleeps (not waiting on the
/// channel, so senders find no parked receiver to wake, which would be a
/// futex call per call on the request path) and hands over what came
/// within `flush_interval / 2`, or at once on a flush, a restore, close, or
/// a batch's worth ([`MAX_BATCH`]); senders unpark it on the last three
/// ([`super::Ledger::push`]). The writer commits a handoff by `first_at +
/// flush_interval`, so the durability bound counts from the channel, not
/// from the handoff.
fn intake(
    rx: flume::Receiver<Entry>,
    queue: UnboundedSender<Handoff>,
    stats: Arc<LedgerStats>,
    max_buffered: u64,
    flush_interval: Duration,
) {
    let nap = flush_interval / 2;
    let mut drops = DropLog::default();
    while let Ok(first) = rx.recv() {
        let first_at = Instant::now();
        let mut entries = Vec::new();
        let mut urgent = drops.admit(first, &mut entries, &stats, max_buffered);
        let mut open = true;
        loop {
            loop {
                match rx.try_recv() {
                    Ok(entry) => urgent |= drops.admit(entry, &mut entries, &stats, max_buffered),
                    Err(flume::TryRecvError::Empty) => break,
                    Err(flume::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            let waited = first_at.elapsed();
            if urgent || !open || entries.len() >= MAX_BATCH || waited >= nap {
                break;
            }
            std::thread::park_timeout(nap - waited);
        }
        // (Empty when the outage buffer dropped every record.)
        let handed = entries.is_empty() || queue.send(Handoff { entries, first_at }).is_ok();
        if !handed || !open {
            break;
        }
    }
}

/// The intake's account of the records it drops while the outage buffer
/// is full, logged at most every [`LOG_EVERY`].
#[derive(Default)]
struct DropLog {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl DropLog {
    /// Adds `entry` to `entries` unless it is a record past the outage
    /// buffer; returns whether the entry wants an answer now (a flush or a
    /// restore).
    fn admit(
        &mut self,
        entry: Entry,
        entries: &mut Vec<Entry>,
        stats: &LedgerStats,
        max_buffered: u64,
    ) -> bool {
        if matches!(entry, Entry::Call(_) | Entry::Run(_)) {
            if stats.buffered.load(Ordering::Relaxed) >= max_buffered {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                self.unlogged += 1;
                if self.last_logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                    tracing::error!(
                        message = "ledger records dropped: the PostgreSQL outage buffer is full (ledger.max_buffered_records)",
                        dropped = self.unlogged,
                        dropped_total = stats.dropped.load(Ordering::Relaxed),
                        max_buffered_records = max_buffered
                    );
                    self.last_logged = Some(Instant::now());
                    self.unlogged = 0;
                }
                return false;
            }
            stats.buffered.fetch_add(1, Ordering::Relaxed);
            entries.push(entry);
            return false;
        }
        entries.push(entry);
        true
    }
}

/// One queued record with its sequence number.
enum Queued {
    Call(i64, Box<CallRecord>),
    Run(i64, Box<RunRecord>),
}

impl Queued {
    fn seq(&self) -> i64 {
        match self {
            Queued::Call(seq, _) | Queued::Run(seq, _) => *seq,
        }
    }
}

/// Why a write failed.
enum WriteError {
    /// Could not connect, connection lost, or timed out.
    Unreachable(String),
    /// The database refused (permissions, schema): needs an operator.
    Rejected(String),
}

impl WriteError {
    fn from_pg(error: &tokio_postgres::Error) -> WriteError {
        match error.as_db_error() {
            Some(db) => {
                WriteError::Rejected(format!("{} (SQLSTATE {})", db.message(), db.code().code()))
            }
            None => WriteError::Unreachable(describe(error)),
        }
    }
}

/// An error with its causes ("error connecting to server: Connection
/// refused"): tokio-postgres keeps the cause out of its own message.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

/// An outage in progress: since when, and when it was last logged.
struct Failing {
    since: Instant,
    logged: Instant,
}

struct Writer {
    pool: Pool,
    stats: Arc<LedgerStats>,
    flush_interval: Duration,
    retention: Duration,
    writer_id: String,
    next_seq: i64,
    queue: VecDeque<Queued>,
    /// Flush callers, each with the last sequence number it waits for.
    waiters: Vec<(i64, mpsc::Sender<()>)>,
    migrated: bool,
    backoff: Duration,
    failing: Option<Failing>,
}

impl Writer {
    async fn run(mut self, mut rx: UnboundedReceiver<Handoff>) {
        // Migrate at once so the API's reads find the tables before the
        // first write. If PostgreSQL does not answer yet (or refuses), the
        // first write tries again and reports why.
        let _ = self.client().await;
        let mut open = true;
        let mut closed_at: Option<Instant> = None;
        // When the oldest queued record is due to be written.
        let mut due: Option<Instant> = None;
        let mut retry_at: Option<Instant> = None;
        let mut last_retention = Instant::now();
        loop {
            // Take everything queued without waiting.
            while open {
                match rx.try_recv() {
                    Ok(handoff) => self.accept(handoff, &mut due).await,
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                        open = false;
                        closed_at = Some(Instant::now());
                    }
                }
            }
            let now = Instant::now();
            let want_write = !self.queue.is_empty()
                && (self.queue.len() >= MAX_BATCH
                    || !self.waiters.is_empty()
                    || !open
                    || due.is_some_and(|d| now >= d));
            if want_write && retry_at.is_none_or(|t| now >= t) {
                match self.write_batch().await {
                    Ok(()) => {
                        retry_at = None;
                        due = (!self.queue.is_empty()).then_some(now);
                    }
                    Err(error) => retry_at = Some(Instant::now() + self.failed(error)),
                }
                self.answer_waiters();
                continue;
            }
            self.answer_waiters();
            // The tables come first, write or not: the API reads them.
            if open && !self.migrated && retry_at.is_none_or(|t| now >= t) {
                if let Err(error) = self.client().await {
                    retry_at = Some(Instant::now() + self.failed(error));
                }
                continue;
            }
            if !open {
                if self.queue.is_empty() {
                    break;
                }
                if closed_at.is_some_and(|t| t.elapsed() >= CLOSE_RETRY_FOR) {
                    tracing::error!(
                        message = "ledger records lost at shutdown: PostgreSQL stayed unreachable",
                        records = self.queue.len()
                    );
                    break;
                }
            }
            if open
                && self.retention > Duration::ZERO
                && self.queue.is_empty()
                && self.failing.is_none()
                && last_retention.elapsed() >= RETENTION_EVERY
            {
                last_retention = Instant::now();
                self.apply_retention().await;
                continue;
            }
            // The next write is due at `due`, but never before `retry_at`.
            let next_write = due
                .filter(|_| !self.queue.is_empty())
                .map(|d| retry_at.map_or(d, |r| d.max(r)));
            let next_migration = retry_at.filter(|_| !self.migrated);
            let next_retention = last_retention + RETENTION_EVERY;
            let wake = [next_write, next_migration]
                .into_iter()
                .flatten()
                .fold(next_retention, Instant::min);
            let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(wake));
            if open {
                tokio::select! {
                    entry = rx.recv() => match entry {
                        Some(handoff) => self.accept(handoff, &mut due).await,
                        None => {
                            open = false;
                            closed_at = Some(Instant::now());
                        }
                    },
                    () = sleep => {}
                }
            } else {
                sleep.await;
            }
        }
        // Anything still waiting is answered as the writer stops.
        for (_, waiter) in self.waiters.drain(..) {
            let _ = waiter.send(());
        }
    }

    /// Queues a handoff's records (due `flush_interval` after the first
    /// of them left the channel), registers its flush callers and answers
    /// its restore requests.
    async fn accept(&mut self, handoff: Handoff, due: &mut Option<Instant>) {
        for entry in handoff.entries {
            let seq = self.next_seq;
            match entry {
                Entry::Call(call) => self.queue.push_back(Queued::Call(seq, call)),
                Entry::Run(run) => self.queue.push_back(Queued::Run(seq, run)),
                Entry::Flush(done) => {
                    self.waiters.push((seq - 1, *done));
                    continue;
                }
                Entry::Restore(request) => {
                    let _ = request.reply.send(self.restore(request.since_ms).await);
                    continue;
                }
            }
            self.next_seq += 1;
            due.get_or_insert(handoff.first_at + self.flush_interval);
        }
    }

    /// Answers the flush callers whose records are all written.
    fn answer_waiters(&mut self) {
        let first_pending = self.queue.front().map_or(i64::MAX, Queued::seq);
        self.waiters.retain(|(last, waiter)| {
            let done = *last < first_pending;
            if done {
                let _ = waiter.send(());
            }
            !done
        });
    }

    /// Logs and counts a failed write; returns how long to wait before the
    /// next attempt.
    fn failed(&mut self, error: WriteError) -> Duration {
        self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
        if matches!(error, WriteError::Rejected(_)) {
            // A dropped or restored database: migrate again before the retry.
            self.migrated = false;
        }
        let buffered = self.stats.buffered.load(Ordering::Relaxed);
        let now = Instant::now();
        let log_now = match &self.failing {
            None => true,
            Some(failing) => failing.logged.elapsed() >= LOG_EVERY,
        };
        if log_now {
            let failing_for_ms = self
                .failing
                .as_ref()
                .map_or(0, |f| f.since.elapsed().as_millis() as u64);
            match &error {
                WriteError::Unreachable(error) => tracing::warn!(
                    message = "PostgreSQL ledger unreachable; records are buffered and retried",
                    %error, buffered, failing_for_ms
                ),
                WriteError::Rejected(error) => tracing::error!(
                    message = "PostgreSQL ledger refused the write (check the schema and the role's permissions); records are buffered and retried",
                    %error, buffered, failing_for_ms
                ),
            }
        }
        let since = self.failing.as_ref().map_or(now, |f| f.since);
        let logged = match (&self.failing, log_now) {
            (Some(f), false) => f.logged,
            _ => now,
        };
        self.failing = Some(Failing { since, logged });
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        wait
    }

    async fn client(&mut self) -> Result<deadpool_postgres::Object, WriteError> {
        let mut client = self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => WriteError::from_pg(&e),
            other => WriteError::Unreachable(other.to_string()),
        })?;
        if !self.migrated {
            migrate(&mut client).await.map_err(|e| match e {
                WriteError::Rejected(message) => {
                    WriteError::Rejected(format!("schema migration failed: {message}"))
                }
                unreachable => unreachable,
            })?;
            self.migrated = true;
        }
        Ok(client)
    }

    /// Writes the head of the queue (up to [`MAX_BATCH`]) in one
    /// transaction and removes it from the queue once committed.
    async fn write_batch(&mut self) -> Result<(), WriteError> {
        let count = self.queue.len().min(MAX_BATCH);
        let mut client = self.client().await?;
        let batch = Batch::of(self.queue.iter().take(count), &self.writer_id);
        match tokio::time::timeout(WRITE_TIMEOUT, batch.commit(&mut client)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(WriteError::from_pg(&error)),
            Err(_) => {
                return Err(WriteError::Unreachable(format!(
                    "no commit within {} s",
                    WRITE_TIMEOUT.as_secs()
                )))
            }
        }
        self.queue.drain(..count);
        let n = count as u64;
        self.stats.written.fetch_add(n, Ordering::Relaxed);
        self.stats.buffered.fetch_sub(n, Ordering::Relaxed);
        self.backoff = BACKOFF_MIN;
        if let Some(failing) = self.failing.take() {
            tracing::info!(
                message = "PostgreSQL ledger writes resumed",
                failed_for_ms = failing.since.elapsed().as_millis() as u64,
                still_buffered = self.queue.len()
            );
        }
        Ok(())
    }

    async fn restore(&mut self, since_ms: u64) -> Result<Vec<RestoredRun>, LedgerError> {
        let client = self.client().await.map_err(|e| match e {
            WriteError::Unreachable(m) => LedgerError::Unavailable(m),
            WriteError::Rejected(m) => LedgerError::Query(m),
        })?;
        // The read goes through the same one-connection pool.
        drop(client);
        query::runs_to_restore(&Reader::Postgres(self.pool.clone()), since_ms).await
    }

    /// Deletes calls and runs older than the retention, a step at a time.
    async fn apply_retention(&mut self) {
        let Ok(client) = self.client().await else {
            return;
        };
        let cutoff = now_ms() - self.retention.as_millis() as i64;
        for (table, column, key) in [("calls", "ts_ms", "id"), ("runs", "ended_ms", "ctid")] {
            let sql = format!(
                "DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE {column} < $1 LIMIT {RETENTION_STEP})"
            );
            loop {
                match client.execute(sql.as_str(), &[&cutoff]).await {
                    Ok(n) if n as usize == RETENTION_STEP => continue,
                    Ok(_) => break,
                    Err(error) => {
                        tracing::warn!(message = "ledger retention step failed", %error);
                        break;
                    }
                }
            }
        }
    }
}

/// Applies the migrations this build knows and the database lacks, under
/// an advisory lock so replicas starting together migrate once.
async fn migrate(client: &mut deadpool_postgres::Object) -> Result<(), WriteError> {
    let pg = |e: tokio_postgres::Error| WriteError::from_pg(&e);
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT PRIMARY KEY,
            applied_ms BIGINT NOT NULL)",
    )
    .await
    .map_err(pg)?;
    let current: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )
        .await
        .map_err(pg)?
        .get(0);
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql).await.map_err(pg)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)",
            &[version, &now_ms()],
        )
        .await
        .map_err(pg)?;
        tracing::info!(
            message = "applied a ledger schema migration",
            version = *version
        );
    }
    tx.commit().await.map_err(pg)?;
    let known = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    if current > known {
        tracing::warn!(
            message = "the ledger schema is newer than this build knows; writing with the columns it knows",
            database_version = current,
            known_version = known
        );
    }
    Ok(())
}

/// One column of a batch, as a PostgreSQL array. Text borrows from the
/// queued records: a batch of 2,000 calls would otherwise copy ~20,000
/// strings, allocated and freed on every commit.
enum Column<'a> {
    Int(Vec<Option<i64>>),
    Text(Vec<Option<Cow<'a, str>>>),
}

impl<'a> Column<'a> {
    fn new(like: &Field, capacity: usize) -> Column<'a> {
        match like {
            Field::Int(_) => Column::Int(Vec::with_capacity(capacity)),
            Field::Text(_) => Column::Text(Vec::with_capacity(capacity)),
        }
    }

    fn push(&mut self, value: Field<'a>) {
        match (self, value) {
            (Column::Int(v), Field::Int(x)) => v.push(x),
            (Column::Text(v), Field::Text(x)) => v.push(x.map(without_nul)),
            (Column::Int(v), Field::Text(_)) => v.push(None),
            (Column::Text(v), Field::Int(_)) => v.push(None),
        }
    }

    fn array_type(&self) -> &'static str {
        match self {
            Column::Int(_) => "BIGINT[]",
            Column::Text(_) => "TEXT[]",
        }
    }

    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Column::Int(v) => v,
            Column::Text(v) => v,
        }
    }
}

/// PostgreSQL text cannot hold NUL, and a provider could send one: each
/// becomes U+FFFD. Copies only a string that has one.
fn without_nul(text: &str) -> Cow<'_, str> {
    if memchr::memchr(0, text.as_bytes()).is_some() {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// Rows as columns, each row's fields in column order; room for `rows`.
fn columns<'a, R>(rows: usize, each: impl IntoIterator<Item = R>) -> Vec<Column<'a>>
where
    R: IntoIterator<Item = Field<'a>>,
{
    let mut columns: Vec<Column<'a>> = Vec::new();
    for row in each {
        if columns.is_empty() {
            for value in row {
                let mut column = Column::new(&value, rows);
                column.push(value);
                columns.push(column);
            }
        } else {
            for (column, value) in columns.iter_mut().zip(row) {
                column.push(value);
            }
        }
    }
    columns
}

/// `INSERT INTO table (names) SELECT * FROM UNNEST($1::T[], …)`.
fn unnest_insert(table: &str, names: &[&str], columns: &[Column]) -> String {
    let arrays = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("${}::{}", i + 1, c.array_type()))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO {table} ({}) SELECT * FROM UNNEST({arrays})",
        names.join(", ")
    )
}

/// The head of the queue as column arrays, borrowing its records.
struct Batch<'a> {
    calls: Vec<Column<'a>>,
    runs: Vec<Column<'a>>,
}

impl<'a> Batch<'a> {
    fn of(queued: impl Iterator<Item = &'a Queued>, writer_id: &'a str) -> Batch<'a> {
        let mut calls = Vec::new();
        // One row per run key, the last one winning (an upsert may not touch
        // a row twice in one statement).
        let mut runs: Vec<&'a RunRecord> = Vec::new();
        let mut run_index: HashMap<(&'a str, u64), usize> = HashMap::new();
        for entry in queued {
            match entry {
                Queued::Call(seq, call) => calls.push((*seq, &**call)),
                Queued::Run(_, run) => match run_index.entry((&run.run_id, run.started_ms)) {
                    Slot::Occupied(i) => runs[*i.get()] = run,
                    Slot::Vacant(slot) => {
                        slot.insert(runs.len());
                        runs.push(run);
                    }
                },
            }
        }
        let call_rows = calls.iter().map(|&(seq, call)| {
            call_values(call)
                .into_iter()
                .chain([Field::text(writer_id), Field::Int(Some(seq))])
        });
        Batch {
            calls: columns(calls.len(), call_rows),
            runs: columns(runs.len(), runs.iter().map(|run| run_values(run))),
        }
    }

    async fn commit(
        &self,
        client: &mut deadpool_postgres::Object,
    ) -> Result<(), tokio_postgres::Error> {
        let tx = client.transaction().await?;
        if !self.calls.is_empty() {
            let mut names = CALL_COLUMNS.to_vec();
            names.extend(["writer_id", "writer_seq"]);
            let sql = format!(
                "{} ON CONFLICT (writer_id, writer_seq) DO NOTHING",
                unnest_insert("calls", &names, &self.calls)
            );
            let stmt = tx.prepare_cached(&sql).await?;
            let params: Vec<&(dyn ToSql + Sync)> = self.calls.iter().map(Column::as_sql).collect();
            tx.execute(&stmt, &params).await?;
        }
        if !self.runs.is_empty() {
            let updates = RUN_COLUMNS[2..]
                .iter()
                .map(|c| format!("{c} = EXCLUDED.{c}"))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "{} ON CONFLICT (run_id, started_ms) DO UPDATE SET {updates}",
                unnest_insert("runs", &RUN_COLUMNS, &self.runs)
            );
            let stmt = tx.prepare_cached(&sql).await?;
            let params: Vec<&(dyn ToSql + Sync)> = self.runs.iter().map(Column::as_sql).collect();
            tx.execute(&stmt, &params).await?;
        }
        tx.commit().await
    }
}

/// Runs a portable read query (see [`super::reader`]) on the pool.
pub(super) async fn rows(
    pool: &Pool,
    sql: &str,
    params: &[Param],
) -> Result<Vec<Row>, LedgerError> {
    let failed = |e: tokio_postgres::Error| match e.as_db_error() {
        // The server's message and SQLSTATE (the error's own text is only "db error").
        Some(db) => LedgerError::Query(format!("{} ({})", db.message(), db.code().code())),
        None => LedgerError::Unavailable(describe(&e)),
    };
    let client = pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(e) => failed(e),
        other => LedgerError::Unavailable(other.to_string()),
    })?;
    let types: Vec<Type> = params
        .iter()
        .map(|p| match p {
            Param::Int(_) => Type::INT8,
            Param::Text(_) => Type::TEXT,
        })
        .collect();
    let stmt = client
        .prepare_typed_cached(&postgres_placeholders(sql), &types)
        .await
        .map_err(failed)?;
    let values: Vec<&(dyn ToSql + Sync)> = params
        .iter()
        .map(|p| match p {
            Param::Int(v) => v as &(dyn ToSql + Sync),
            Param::Text(v) => v,
        })
        .collect();
    let rows = client.query(&stmt, &values).await.map_err(failed)?;
    rows.iter().map(row_values).collect()
}

fn row_values(row: &tokio_postgres::Row) -> Result<Row, LedgerError> {
    let get_err = |e: tokio_postgres::Error| LedgerError::Query(e.to_string());
    row.columns()
        .iter()
        .enumerate()
        .map(|(i, column)| {
            let ty = column.type_();
            let value = if *ty == Type::INT8 {
                row.try_get::<_, Option<i64>>(i)
                    .map_err(get_err)?
                    .map(Value::Int)
            } else if *ty == Type::INT4 {
                row.try_get::<_, Option<i32>>(i)
                    .map_err(get_err)?
                    .map(|v| Value::Int(i64::from(v)))
            } else if *ty == Type::INT2 {
                row.try_get::<_, Option<i16>>(i)
                    .map_err(get_err)?
                    .map(|v| Value::Int(i64::from(v)))
            } else if *ty == Type::BOOL {
                row.try_get::<_, Option<bool>>(i)
                    .map_err(get_err)?
                    .map(|v| Value::Int(i64::from(v)))
            } else if [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(ty) {
                row.try_get::<_, Option<String>>(i)
                    .map_err(get_err)?
                    .map(Value::Text)
            } else {
                return Err(LedgerError::Query(format!(
                    "column {} has type {ty}, which the ledger does not read",
                    column.name()
                )));
            };
            Ok(value.unwrap_or(Value::Null))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Row)
}
