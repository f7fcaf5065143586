//! Sustained ledger write rate: queues N call records (default 200 000) as
//! fast as one thread can, waits until all are committed, and prints
//! records per second, with the default batch and queue settings, and the
//! writer thread's CPU time per record.
//! Run with `cargo bench --bench ledger_writes` (optionally `-- 500000`);
//! with a `postgres://…` argument it writes to that database instead of a
//! SQLite file (`-- 200000 postgres://tollgate@127.0.0.1:5432/tollgate`).
//! `producers=2` queues from two threads at once, as the runtime's workers
//! do, and prints the time each record took to queue (contention included);
//! `runs=32` spreads the calls over 32 run ids instead of 5,000.

use std::time::{Duration, Instant};

use tollgate::ledger::postgres::PostgresSettings;
use tollgate::ledger::{CallRecord, Ledger, LedgerBackend, LedgerSettings};
use tollgate::money::Money;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let count: u64 = args.iter().find_map(|a| a.parse().ok()).unwrap_or(200_000);
    let producers: u64 = args
        .iter()
        .find_map(|a| a.strip_prefix("producers=")?.parse().ok())
        .unwrap_or(1)
        .max(1);
    let runs: u64 = args
        .iter()
        .find_map(|a| a.strip_prefix("runs=")?.parse().ok())
        .unwrap_or(5_000)
        .max(1);
    let dir = std::env::temp_dir().join(format!("tollgate-ledger-bench-{}", std::process::id()));
    let backend = match args.iter().find(|a| a.starts_with("postgres")) {
        Some(url) => LedgerBackend::Postgres(PostgresSettings {
            url: url.clone(),
            pool_size: 2,
            max_buffered_records: count as usize,
        }),
        None => LedgerBackend::Sqlite {
            path: dir.join("ledger.db"),
        },
    };
    let name = match backend {
        LedgerBackend::Sqlite { .. } => "sqlite",
        LedgerBackend::Postgres(_) => "postgres",
    };
    let settings = LedgerSettings {
        backend,
        flush_interval: Duration::from_millis(200),
        queue_capacity: 65_536,
        retention_days: 30,
    };
    let ledger = match Ledger::open(&settings) {
        Ok(l) => l,
        Err(e) => panic!("cannot open the bench ledger: {e}"),
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let template = CallRecord {
        ts_ms: now_ms,
        run_id: Some("run-0000000000".into()),
        release: "2026-11-15".into(),
        request_type: "research".into(),
        route: "openai".into(),
        provider: "openai",
        model: Some("gpt-4.1-mini-2025-04-14".into()),
        price_entry: Some("gpt-4.1-mini".into()),
        status: 200,
        outcome: "complete",
        prompt_tokens: Some(1200),
        cached_tokens: Some(800),
        completion_tokens: Some(150),
        cost: Money::from_picos(840_000_000),
        latency_ms: 812,
        ttfb_ms: Some(230),
        streamed: true,
        price_version: "3f2a9c1d0b7e".into(),
        ..CallRecord::default()
    };
    let started = Instant::now();
    std::thread::scope(|scope| {
        for producer in 0..producers {
            let (ledger, template) = (&ledger, &template);
            scope.spawn(move || {
                for i in (producer..count).step_by(producers as usize) {
                    let mut record = template.clone();
                    record.run_id = Some(format!("run-{:010}", i % runs).into());
                    record.ts_ms = now_ms + i;
                    ledger.record_call(record);
                }
            });
        }
    });
    let queued = started.elapsed();
    ledger.flush();
    let total = started.elapsed();
    let waits = ledger
        .stats
        .backpressure_waits
        .load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "ledger ({name}): {count} records committed in {:.2} s = {:.0} records/s sustained (queueing took {:.2} s; {waits} backpressure waits)",
        total.as_secs_f64(),
        count as f64 / total.as_secs_f64(),
        queued.as_secs_f64()
    );
    println!(
        "queueing: {:.0} ns per record per producer ({producers} producer threads)",
        queued.as_nanos() as f64 * producers as f64 / count as f64
    );
    // The rate above is bounded by the producing thread as much as by the
    // writer on two cores; the writer's own CPU time is its cost.
    match writer_cpu_ns() {
        Some(ns) => println!(
            "writer thread: {:.2} µs of CPU per record",
            ns as f64 / 1_000.0 / count as f64
        ),
        None => println!("writer thread: not found in /proc/self/task"),
    }
    ledger.close();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Time on CPU of the thread named `tollgate-ledger`, in nanoseconds (the
/// first field of its `/proc/self/task/<tid>/schedstat`).
fn writer_cpu_ns() -> Option<u64> {
    std::fs::read_dir("/proc/self/task").ok()?.find_map(|task| {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        if comm.trim_end() != "tollgate-ledger" {
            return None;
        }
        let schedstat = std::fs::read_to_string(dir.join("schedstat")).ok()?;
        schedstat.split_whitespace().next()?.parse().ok()
    })
}
