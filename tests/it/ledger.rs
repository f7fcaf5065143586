//! The ledger, on SQLite and on PostgreSQL (one test body, one entry point
//! per backend): one record per call under concurrent load, nothing lost at
//! SIGTERM with the real binary. On SQLite: refusals and run ends are
//! recorded, run spend survives a restart, SIGKILL loses at most the last
//! flush interval. What only PostgreSQL does (one ledger for several
//! proxies, migrations, outages) is in `ledger_postgres`.

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::types::ValueRef;
use tollgate::money::Money;

use crate::services::PostgresServer;
use crate::support::*;

pub const USAGE_BODY: &str = r#"{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":25,"completion_tokens":50,"total_tokens":75}}"#;
/// gpt-4o-mini at the test prices: 25 prompt and 50 completion tokens.
pub const CALL_PICOS: i64 = 25 * 2_000_000 + 50 * 6_000_000;

/// Chat completions answer [`USAGE_BODY`], anything else (tools) `{}`.
pub async fn usage_upstream() -> MockUpstream {
    MockUpstream::start(|request| match request.uri.path() {
        "/v1/chat/completions" => MockReply::json(200, USAGE_BODY),
        _ => MockReply::json(200, "{}"),
    })
    .await
}

/// One LLM call of `run` through `agent` (`host:port`); its status.
pub async fn call(agent: &str, run: &str, release: &str) -> u16 {
    let response = post_json(
        format!("http://{agent}/openai/v1/chat/completions"),
        &[("x-agent-run-id", run), ("x-agent-release", release)],
        r#"{"model":"gpt-4o-mini"}"#,
    )
    .await;
    let status = response.status().as_u16();
    let _ = body_bytes(response).await;
    status
}

/// Sends SIGTERM to the binary and checks it exits 0.
pub fn sigterm(process: &mut Process) {
    let pid = process.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = process.wait_exit();
    assert!(status.success(), "exit 0 on SIGTERM, got {status}");
}

/// The binary's config (see [`binary_config`], a one-minute flush interval)
/// with the ledger in PostgreSQL; `extra` goes into its `[ledger]` section.
pub fn binary_config_on(
    dir: &std::path::Path,
    upstream: &str,
    pg: &PostgresServer,
    extra: &str,
) -> std::path::PathBuf {
    let path = binary_config(dir, upstream, 60_000);
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "[ledger]\n",
        &format!(
            "[ledger]\nbackend = \"postgres\"\nurl = \"{}\"\n{extra}",
            pg.url()
        ),
        1,
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn open_db(path: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}

/// The PostgreSQL server a test on `backend` writes to (`Some(None)` on
/// SQLite); `None` when PostgreSQL is not installed (the test is skipped).
fn postgres_for(backend: Backend, test: &str) -> Option<Option<PostgresServer>> {
    match backend {
        Backend::Sqlite => Some(None),
        Backend::Postgres => PostgresServer::start(test).map(Some),
    }
}

/// A ledger's database, read back with SQL: the SQLite file or the
/// PostgreSQL server.
pub enum LedgerDb<'a> {
    Sqlite(rusqlite::Connection),
    Postgres(&'a PostgresServer),
}

impl<'a> LedgerDb<'a> {
    /// What a binary configured by [`binary_config`] in `dir` (or by
    /// [`binary_config_on`] with `pg`) wrote.
    fn written_by_binary(pg: &'a Option<PostgresServer>, dir: &std::path::Path) -> Self {
        match pg {
            Some(pg) => LedgerDb::Postgres(pg),
            None => LedgerDb::Sqlite(open_db(&dir.join("ledger.db"))),
        }
    }

    /// The first row of `query`, each column as text (NULL as "").
    pub fn row(&self, query: &str) -> Vec<String> {
        match self {
            LedgerDb::Sqlite(conn) => {
                let mut statement = conn.prepare(query).unwrap();
                let columns = statement.column_count();
                statement
                    .query_row([], |r| {
                        (0..columns)
                            .map(|i| {
                                Ok(match r.get_ref(i)? {
                                    ValueRef::Null => String::new(),
                                    ValueRef::Integer(n) => n.to_string(),
                                    ValueRef::Real(x) => x.to_string(),
                                    ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                                    ValueRef::Blob(_) => panic!("a blob column in {query}"),
                                })
                            })
                            .collect()
                    })
                    .unwrap()
            }
            LedgerDb::Postgres(pg) => pg.sql(query).split('|').map(str::to_string).collect(),
        }
    }

    /// `(rows, sum of cost_pico)` of the calls matching `filter`.
    pub fn count_and_sum(&self, filter: &str) -> (i64, i64) {
        let row = self.row(&format!(
            "SELECT COUNT(*), COALESCE(SUM(cost_pico), 0) FROM calls WHERE {filter}"
        ));
        assert_eq!(row.len(), 2, "two columns: {row:?}");
        (row[0].parse().unwrap(), row[1].parse().unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_one_record_under_concurrent_load() {
    every_call_is_one_record(
        Backend::Sqlite,
        "every_call_is_one_record_under_concurrent_load",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_one_record_under_concurrent_load_on_postgres() {
    every_call_is_one_record(
        Backend::Postgres,
        "every_call_is_one_record_under_concurrent_load_on_postgres",
    )
    .await;
}

async fn every_call_is_one_record(backend: Backend, test: &str) {
    let upstream = usage_upstream().await;
    let config = format!(
        "{}\n[[routes]]\nname = \"search\"\nprefix = \"/tools/search\"\nupstream = \"{{upstream}}\"\nkind = \"tool\"\ncost_per_call_usd = 0.001\n",
        config_all_routes()
    );
    let Some((proxy, pg)) = start_on(backend, test, &config, &upstream).await else {
        return;
    };
    let mut tasks = Vec::new();
    for i in 0..200 {
        let path = if i % 4 == 0 {
            "/tools/search"
        } else {
            "/openai/v1/chat/completions"
        };
        let (url, run) = (proxy.url(path), format!("load-{}", i % 10));
        tasks.push(tokio::spawn(async move {
            let response = post_json(
                url,
                &[("x-agent-run-id", &run), ("x-agent-release", "load")],
                r#"{"model":"gpt-4o-mini"}"#,
            )
            .await;
            let status = response.status();
            let _ = body_bytes(response).await;
            status
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    let ledger = proxy.state.ledger.clone().unwrap();
    ledger.flush();
    let db = match &pg {
        Some(pg) => LedgerDb::Postgres(pg),
        None => LedgerDb::Sqlite(open_db(ledger.path().unwrap())),
    };
    let (calls, picos) = db.count_and_sum("release = 'load'");
    assert_eq!(calls, 200);
    let llm = 150 * CALL_PICOS;
    let tools = 50 * 1_000_000_000;
    assert_eq!(picos, llm + tools, "ledger sums equal the calls' costs");
    let metrics = proxy.metrics().await;
    let metric_total = metric_value(
        &metrics,
        "agent_segment_cost_usd_total",
        &[("release", "load")],
    )
    .unwrap();
    assert_eq!(
        metric_total,
        Money::from_picos(picos as u64).as_usd_f64(),
        "ledger and metrics agree"
    );
    assert_eq!(
        metric_value(&metrics, "agent_ledger_records_written", &[]),
        Some(200.0)
    );
    assert_eq!(
        metric_value(&metrics, "agent_ledger_buffered_records", &[]),
        Some(0.0)
    );
    let row = db.row(
        "SELECT SUM(prompt_tokens), MIN(price_version) FROM calls WHERE release = 'load' AND provider = 'openai'",
    );
    assert_eq!(row[0], (150 * 25).to_string());
    assert_eq!(row[1], proxy.state.pricing.load().version());
    proxy.shutdown().await;
}

#[tokio::test]
async fn refusals_and_run_ends_are_recorded() {
    let upstream = MockUpstream::start(|_| MockReply::json(200, USAGE_BODY)).await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    let url = proxy.url("/openai/v1/chat/completions");
    let _ = body_bytes(
        post_json(
            &url,
            &[("x-agent-run-id", "rec"), ("x-agent-budget-usd", "0.0004")],
            r#"{"model":"gpt-4o-mini","max_tokens":10}"#,
        )
        .await,
    )
    .await;
    let refused = post_json(
        &url,
        &[("x-agent-run-id", "rec"), ("x-agent-budget-usd", "0.0004")],
        r#"{"model":"gpt-4o-mini","max_tokens":10}"#,
    )
    .await;
    assert_eq!(refused.status(), 402);
    let finish = post_json(
        format!("http://{}/api/runs/rec/finish", proxy.admin),
        &[],
        r#"{"status":"ok"}"#,
    )
    .await;
    assert_eq!(finish.status(), 200);
    let ledger = proxy.state.ledger.clone().unwrap();
    ledger.flush();
    let conn = open_db(ledger.path().unwrap());
    let outcomes: Vec<String> = conn
        .prepare("SELECT outcome FROM calls WHERE run_id = 'rec' ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(outcomes, ["complete", "refused"]);
    let (stop_reason, cost, refusals): (String, i64, i64) = conn
        .query_row(
            "SELECT stop_reason, cost_pico, refusals FROM runs WHERE run_id = 'rec'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(stop_reason, "budget_exceeded");
    assert_eq!(cost, CALL_PICOS);
    assert_eq!(refusals, 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_restart_keeps_a_live_runs_spend_and_ceiling() {
    let upstream = MockUpstream::start(|_| MockReply::json(200, USAGE_BODY)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[ledger]\npath = \"{}\"\nflush_interval_ms = 20\n",
        config_all_routes(),
        dir.path().join("ledger.db").display()
    );
    // $0.00075 pays for two calls of $0.00035, not a third reservation.
    let headers = [
        ("x-agent-run-id", "survivor"),
        ("x-agent-budget-usd", "0.00075"),
    ];
    let body = r#"{"model":"gpt-4o-mini","max_tokens":10}"#;
    let first = Proxy::start(&config, &upstream.url()).await;
    assert_eq!(
        post_json(first.url("/openai/v1/chat/completions"), &headers, body)
            .await
            .status(),
        200
    );
    assert_eq!(
        post_json(first.url("/openai/v1/chat/completions"), &headers, body)
            .await
            .status(),
        200
    );
    first.shutdown().await;

    let second = Proxy::start(&config, &upstream.url()).await;
    let run = second
        .state
        .budgets
        .run_snapshot("survivor")
        .expect("the live run is restored");
    assert_eq!(
        run.spent,
        Money::from_picos(2 * (25 * 2_000_000 + 50 * 6_000_000))
    );
    assert_eq!(run.ceiling, Money::parse_usd("0.00075").unwrap());
    // Without the header the restored ceiling still holds.
    let response = post_json(
        second.url("/openai/v1/chat/completions"),
        &[("x-agent-run-id", "survivor")],
        body,
    )
    .await;
    assert_eq!(response.status(), 402);
    assert_eq!(upstream.hits(), 2);
    second.shutdown().await;
}

/// Sends a call every 10 ms for `period`; returns when each ended. (At
/// that rate a batch fills in 20 s, so only the flush interval commits.)
async fn send_calls_for(agent: &str, release: &str, period: Duration) -> Vec<Instant> {
    let started = Instant::now();
    let mut done = Vec::new();
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    while started.elapsed() < period {
        pace.tick().await;
        let response = post_json(
            format!("http://{agent}/openai/v1/chat/completions"),
            &[("x-agent-release", release)],
            r#"{"model":"gpt-4o-mini"}"#,
        )
        .await;
        let _ = body_bytes(response).await;
        done.push(Instant::now());
    }
    done
}

#[tokio::test]
async fn sigterm_loses_nothing() {
    sigterm_loses_nothing_on(Backend::Sqlite, "sigterm_loses_nothing").await;
}

#[tokio::test]
async fn sigterm_loses_nothing_on_postgres() {
    sigterm_loses_nothing_on(Backend::Postgres, "sigterm_loses_nothing_on_postgres").await;
}

async fn sigterm_loses_nothing_on(backend: Backend, test: &str) {
    let Some(pg) = postgres_for(backend, test) else {
        return;
    };
    let upstream = MockUpstream::start(|_| MockReply::json(200, USAGE_BODY)).await;
    let dir = tempfile::tempdir().unwrap();
    // A one-minute flush interval: only the drain at shutdown writes these.
    let config = match &pg {
        None => binary_config(dir.path(), &upstream.url(), 60_000),
        Some(pg) => binary_config_on(dir.path(), &upstream.url(), pg, ""),
    };
    let mut process = start_binary(&config);
    for i in 0..40 {
        assert_eq!(
            call(&process.agent, &format!("term-{}", i % 4), "term").await,
            200
        );
    }
    sigterm(&mut process);
    let db = LedgerDb::written_by_binary(&pg, dir.path());
    assert_eq!(db.count_and_sum("release = 'term'"), (40, 40 * CALL_PICOS));
}

#[tokio::test]
async fn sigkill_loses_at_most_the_last_flush_interval() {
    sigkill_loses_at_most_the_last_flush_interval_on(
        Backend::Sqlite,
        "sigkill_loses_at_most_the_last_flush_interval",
        Duration::from_millis(100),
    )
    .await;
}

/// A record crosses two threads here (the intake, then the writer): a bound
/// counted from the handoff instead of from the call would let records
/// that ended up to twice the interval before the kill be lost, and fail.
#[tokio::test]
async fn sigkill_loses_at_most_the_last_flush_interval_on_postgres() {
    sigkill_loses_at_most_the_last_flush_interval_on(
        Backend::Postgres,
        "sigkill_loses_at_most_the_last_flush_interval_on_postgres",
        Duration::from_secs(2),
    )
    .await;
}

async fn sigkill_loses_at_most_the_last_flush_interval_on(
    backend: Backend,
    test: &str,
    flush: Duration,
) {
    let Some(pg) = postgres_for(backend, test) else {
        return;
    };
    let upstream = MockUpstream::start(|_| MockReply::json(200, USAGE_BODY)).await;
    let dir = tempfile::tempdir().unwrap();
    let flush_ms = flush.as_millis() as u64;
    let config = match &pg {
        None => binary_config(dir.path(), &upstream.url(), flush_ms),
        Some(pg) => {
            let path = binary_config_on(dir.path(), &upstream.url(), pg, "");
            let text = std::fs::read_to_string(&path).unwrap().replace(
                "flush_interval_ms = 60000",
                &format!("flush_interval_ms = {flush_ms}"),
            );
            std::fs::write(&path, text).unwrap();
            path
        }
    };
    let mut process = start_binary(&config);
    // Calls that ended more than the flush interval (plus a generous second
    // for the writer on a loaded machine) before the kill must be written.
    // Calls go on past that bound by one more interval and half a second,
    // so that some must be written and, with a 2 s interval, some ended
    // between the bound and twice the interval before the kill.
    let bound = flush + Duration::from_secs(1);
    let period = bound + flush + Duration::from_millis(500);
    let done = send_calls_for(&process.agent, "kill", period).await;
    process.child.kill().unwrap(); // SIGKILL
    let killed = Instant::now();
    let _ = process.child.wait();
    let db = LedgerDb::written_by_binary(&pg, dir.path());
    let (calls, _) = db.count_and_sum("release = 'kill'");
    let must_have = done
        .iter()
        .filter(|t| killed.duration_since(**t) > bound)
        .count() as i64;
    assert!(must_have > 0, "no call ended {bound:?} before SIGKILL");
    assert!(
        calls >= must_have,
        "{calls} records written, {must_have} calls ended more than {bound:?} before SIGKILL"
    );
    let lost = done.len() as i64 - calls;
    eprintln!(
        "SIGKILL: {lost} of {} records lost (flush interval {flush:?})",
        done.len()
    );
}

#[tokio::test]
async fn a_second_instance_on_a_taken_port_exits_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(dir.path(), "http://127.0.0.1:9", 100);
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{}\"", taken.local_addr().unwrap()),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("server.listen") && stderr.contains("cannot listen"),
        "{stderr}"
    );
    let _ = Bytes::new();
}
