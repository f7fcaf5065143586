//! The embedded backend: one SQLite file in WAL mode, written by one thread
//! in batches, read on a second connection (WAL lets it read while the
//! writer writes).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use flume::{Receiver, RecvTimeoutError, TryRecvError};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params, params_from_iter, CachedStatement, Connection, ToSql};

use super::reader::{Param, Row, Value};
use super::{
    call_values, run_values, CallRecord, Entry, Field, LedgerError, LedgerStats, CALL_COLUMNS,
    MAX_BATCH, RETENTION_EVERY, RETENTION_STEP, RUN_COLUMNS,
};

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
-- No index on calls(release, ts_ms) (PostgreSQL keeps one): here every
-- index is a B-tree insert per call on the writer thread, which shares the
-- cores with the proxy, and the one query on a release's calls is bounded by
-- a time window that calls_ts serves. Files made before it lose it.
DROP INDEX IF EXISTS calls_release;
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

pub(super) fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL is durable in WAL mode against process crashes (SIGKILL); a
    // power loss may lose the last commits, which FULL would also fsync.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // Checkpoint after 16,384 WAL pages (64 MiB) instead of SQLite's 1,000.
    // A checkpoint writes back every page committed since the last one and
    // syncs: with hundreds of runs live, every commit dirties one index leaf
    // per run, and the same leaves went back to the file every few commits.
    // 8.3-8.8 -> 7.0-7.1 us of writer CPU per record with 500 runs in a
    // 2M-call ledger (BENCHMARKS.md, "Results, thirty-fourth round").
    conn.pragma_update(None, "wal_autocheckpoint", 16_384)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// Opens (creating if needed) the file with its schema: the writer's
/// connection and the reader's.
pub(super) fn open(path: &Path) -> Result<(Connection, Connection), LedgerError> {
    let fail = |message: String| LedgerError::Open {
        path: path.display().to_string(),
        message,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| fail(format!("cannot create its directory: {e}")))?;
    }
    let writer = open_connection(path).map_err(|e| fail(e.to_string()))?;
    writer
        .execute_batch(SCHEMA)
        .map_err(|e| fail(format!("schema: {e}")))?;
    let reader = open_connection(path).map_err(|e| fail(e.to_string()))?;
    Ok((writer, reader))
}

/// Binds a parameter without copying its text (rusqlite's `Value` would own
/// a copy of every string of every record).
impl ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Param::Int(Some(v)) => ValueRef::Integer(*v),
            Param::Text(Some(v)) => ValueRef::Text(v.as_bytes()),
            Param::Int(None) | Param::Text(None) => ValueRef::Null,
        }))
    }
}

/// Binds a record's column value straight from the record.
impl ToSql for Field<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Field::Int(Some(v)) => ValueRef::Integer(v),
            Field::Text(Some(v)) => ValueRef::Text(v.as_bytes()),
            Field::Int(None) | Field::Text(None) => ValueRef::Null,
        }))
    }
}

/// Runs a portable read query (see [`super::reader`]).
pub(super) fn rows(
    conn: &Connection,
    sql: &str,
    params: &[Param],
) -> Result<Vec<Row>, LedgerError> {
    let query = |conn: &Connection| -> rusqlite::Result<Vec<Row>> {
        let mut stmt = conn.prepare_cached(sql)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(params_from_iter(params))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let values = (0..columns)
                .map(|i| {
                    Ok(match row.get_ref(i)? {
                        ValueRef::Null => Value::Null,
                        ValueRef::Integer(v) => Value::Int(v),
                        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                        other => {
                            return Err(rusqlite::Error::InvalidColumnType(
                                i,
                                format!("{other:?}"),
                                other.data_type(),
                            ))
                        }
                    })
                })
                .collect::<rusqlite::Result<Vec<_>>>()?;
            out.push(Row(values));
        }
        Ok(out)
    };
    query(conn).map_err(|e| LedgerError::Query(e.to_string()))
}

pub(super) fn write_loop(
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
        let mut commit_now = !open;
        let mut take = |entry: Entry, batch: &mut Vec<Entry>| match entry {
            Entry::Flush(done) => {
                waiters.push(*done);
                true
            }
            entry => {
                batch_started.get_or_insert_with(Instant::now);
                batch.push(entry);
                batch.len() >= MAX_BATCH
            }
        };
        if open && batch.is_empty() {
            // Nothing pending: block until the first record (one wake-up per
            // batch) or until retention is due.
            match rx.recv_timeout(RETENTION_EVERY) {
                Ok(entry) => commit_now |= take(entry, &mut batch),
                Err(RecvTimeoutError::Timeout) => commit_now = true,
                Err(RecvTimeoutError::Disconnected) => {
                    open = false;
                    commit_now = true;
                }
            }
        }
        // Take what is queued without blocking.
        while open && !commit_now {
            match rx.try_recv() {
                Ok(entry) => commit_now |= take(entry, &mut batch),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    commit_now = true;
                }
            }
        }
        if batch_started.is_some_and(|s| s.elapsed() >= flush_interval) {
            commit_now = true;
        }
        if !commit_now {
            // A batch is open: sleep until it is due rather than wait on the
            // channel, so that the senders on the request path find no
            // parked receiver to wake (a futex call per call). A sender that
            // finds the queue full unparks this thread (`Ledger::push`).
            let left = batch_started.map_or(Duration::ZERO, |s| {
                flush_interval.saturating_sub(s.elapsed())
            });
            std::thread::park_timeout(left);
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

fn insert_sql(verb: &str, table: &str, columns: &[&str], rows: usize) -> String {
    let values = (0..rows)
        .map(|row| {
            let placeholders = (1..=columns.len())
                .map(|i| format!("?{}", row * columns.len() + i))
                .collect::<Vec<_>>()
                .join(", ");
            format!("({placeholders})")
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{verb} INTO {table} ({}) VALUES {values}",
        columns.join(", ")
    )
}

/// Rows the writer inserts between two yields of its core. It shares the
/// cores with the runtime's workers: a scheduler slice (0.75–3 ms) of
/// uninterrupted inserts keeps a worker it preempted waiting, with the
/// connections whose tasks that worker holds, while the other cores may
/// idle. Yielding every few rows (tens of microseconds) lets a waiting
/// worker run at once; with nothing waiting, a yield returns at once.
const ROWS_PER_YIELD: usize = 8;

/// Calls inserted by one execution of the multi-row statement: the
/// statement's own work (opening the table's and indexes' cursors, halting,
/// resetting its registers) is paid once for all of them. One execution
/// is also the writer's unit between two yields. The statement is `INSERT
/// OR ROLLBACK`: a row that fails ends the whole transaction, which the
/// writer retries anyway, so SQLite keeps no statement journal to undo the
/// statement's earlier rows.
const CALLS_PER_INSERT: usize = ROWS_PER_YIELD;

fn commit(conn: &mut Connection, batch: &[Entry]) -> rusqlite::Result<()> {
    static INSERT_CALLS: LazyLock<String> = LazyLock::new(|| {
        insert_sql(
            "INSERT OR ROLLBACK",
            "calls",
            &CALL_COLUMNS,
            CALLS_PER_INSERT,
        )
    });
    static INSERT_CALL: LazyLock<String> =
        LazyLock::new(|| insert_sql("INSERT", "calls", &CALL_COLUMNS, 1));
    static INSERT_RUN: LazyLock<String> =
        LazyLock::new(|| insert_sql("INSERT OR REPLACE", "runs", &RUN_COLUMNS, 1));
    let tx = conn.transaction()?;
    {
        // Calls and runs go to different tables: their order between the
        // two does not matter within the transaction.
        let calls: Vec<&CallRecord> = batch
            .iter()
            .filter_map(|entry| match entry {
                Entry::Call(c) => Some(&**c),
                _ => None,
            })
            .collect();
        let mut chunks = calls.chunks_exact(CALLS_PER_INSERT);
        let mut many = CallInsert::new(tx.prepare_cached(&INSERT_CALLS)?);
        for chunk in chunks.by_ref() {
            std::thread::yield_now();
            many.execute(chunk)?;
        }
        let mut one = CallInsert::new(tx.prepare_cached(&INSERT_CALL)?);
        for call in chunks.remainder() {
            one.execute(std::slice::from_ref(call))?;
        }
        let mut run_stmt = tx.prepare_cached(&INSERT_RUN)?;
        let runs = batch.iter().filter_map(|entry| match entry {
            Entry::Run(r) => Some(r),
            _ => None,
        });
        for (i, run) in runs.enumerate() {
            if i % ROWS_PER_YIELD == ROWS_PER_YIELD - 1 {
                std::thread::yield_now();
            }
            run_stmt.execute(params_from_iter(&run_values(run)))?;
        }
    }
    tx.commit()
}

/// An insert of one or more calls that binds only the values that differ
/// from the ones its placeholders held at the previous execution: a
/// statement keeps its bound values from one execution to the next, and
/// most columns repeat from call to call (release, route, model, price
/// version...), while a text bind is a copy into SQLite (~200 instructions).
struct CallInsert<'conn, 'rec> {
    stmt: CachedStatement<'conn>,
    bound: Vec<[Field<'rec>; CALL_COLUMNS.len()]>,
}

impl<'conn, 'rec> CallInsert<'conn, 'rec> {
    fn new(stmt: CachedStatement<'conn>) -> Self {
        CallInsert {
            stmt,
            bound: Vec::new(),
        }
    }

    /// Inserts `calls`, as many as the statement has rows.
    fn execute(&mut self, calls: &[&'rec CallRecord]) -> rusqlite::Result<()> {
        for (row, call) in calls.iter().enumerate() {
            let values = call_values(call);
            for (column, value) in values.iter().enumerate() {
                let unchanged = self
                    .bound
                    .get(row)
                    .is_some_and(|bound| bound[column] == *value);
                if !unchanged {
                    self.stmt
                        .raw_bind_parameter(row * CALL_COLUMNS.len() + column + 1, value)?;
                }
            }
            match self.bound.get_mut(row) {
                Some(bound) => *bound = values,
                None => self.bound.push(values),
            }
        }
        self.stmt.raw_execute()?;
        Ok(())
    }
}

/// Deletes calls and runs older than `retention`, a step at a time.
pub(super) fn apply_retention(conn: &Connection, retention: Duration) {
    let cutoff = super::now_ms() - retention.as_millis() as i64;
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
