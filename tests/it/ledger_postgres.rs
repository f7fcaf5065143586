//! The PostgreSQL ledger, beyond the tests `ledger` runs on both backends:
//! one ledger for two proxies, migrations (repeated, concurrent), text
//! holding a NUL, an outage (records buffered and written when it returns,
//! the overflow dropped and counted), PostgreSQL down at start, a role that
//! may not create the tables, and the `[ledger]` keys `check-config` names.
//! Each test starts its own PostgreSQL and is skipped when PostgreSQL is not
//! installed.

use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::Value;
use tollgate::ledger::postgres::PostgresSettings;
use tollgate::ledger::{CallRecord, Ledger, LedgerBackend, LedgerSettings};
use tollgate::money::Money;

use crate::ledger::{
    binary_config_on, call, sigterm, usage_upstream, LedgerDb, CALL_PICOS, USAGE_BODY,
};
use crate::services::PostgresServer;
use crate::support::*;

/// Long enough for PostgreSQL to come back and the writer's backoff to end.
const DEADLINE: Duration = Duration::from_secs(60);

fn config_with(pg: &PostgresServer, extra: &str) -> String {
    format!(
        "{}\n[[routes]]\nname = \"search\"\nprefix = \"/tools/search\"\nupstream = \"{{upstream}}\"\nkind = \"tool\"\ncost_per_call_usd = 0.001\n{}{extra}",
        config_all_routes(),
        postgres_ledger(&pg.url())
    )
}

/// `(rows, sum of cost_pico)` of the calls matching `filter`.
fn count_and_sum(pg: &PostgresServer, filter: &str) -> (i64, i64) {
    LedgerDb::Postgres(pg).count_and_sum(filter)
}

/// Polls until `filter` matches `want` rows; panics after [`DEADLINE`].
async fn wait_for_rows(pg: &PostgresServer, filter: &str, want: i64) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        // The writer creates the tables once it reaches the database.
        let migrated = pg.sql("SELECT to_regclass('calls') IS NOT NULL") == "t";
        let (rows, _) = if migrated {
            count_and_sum(pg, filter)
        } else {
            (0, 0)
        };
        if rows == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{rows} rows where {filter}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn api(admin: &str, path: &str) -> Value {
    let response = send(
        http::Request::get(format!("http://{admin}{path}"))
            .body(bytes::Bytes::new())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), 200, "{path}");
    serde_json::from_slice(&body_bytes(response).await).unwrap()
}

async fn metric(admin: &str, name: &str) -> f64 {
    let response = send(
        http::Request::get(format!("http://{admin}/metrics"))
            .body(bytes::Bytes::new())
            .unwrap(),
    )
    .await;
    let text = String::from_utf8(body_bytes(response).await.to_vec()).unwrap();
    metric_value(&text, name, &[]).unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Polls `/metrics` until `name` reads `want`; panics after [`DEADLINE`]
/// (records reach the ledger's counters a moment after their call ends).
async fn wait_for_metric(admin: &str, name: &str, want: f64) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let got = metric(admin, name).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name} = {got}, expected {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_share_one_ledger() {
    let Some(pg) = PostgresServer::start("two_proxies_share_one_ledger") else {
        return;
    };
    let upstream = usage_upstream().await;
    let a = Proxy::start(&config_with(&pg, ""), &upstream.url()).await;
    let b = Proxy::start(&config_with(&pg, ""), &upstream.url()).await;
    let (agent_a, agent_b) = (a.agent.to_string(), b.agent.to_string());
    // One run spread over both, and one more run on each.
    for agent in [&agent_a, &agent_b, &agent_a, &agent_b, &agent_a] {
        assert_eq!(call(agent, "shared", "two").await, 200);
    }
    assert_eq!(call(&agent_a, "only-a", "two").await, 200);
    assert_eq!(call(&agent_b, "only-b", "two").await, 200);
    a.state.ledger.clone().unwrap().flush();
    b.state.ledger.clone().unwrap().flush();
    for proxy in [&a, &b] {
        let admin = proxy.admin.to_string();
        let run = api(&admin, "/api/runs/shared").await;
        assert_eq!(run["total"], 5, "{run}");
        assert_eq!(run["calls"].as_array().unwrap().len(), 5);
        let segments = api(&admin, "/api/segments").await;
        let two = &segments["segments"][0];
        assert_eq!(two["key"], serde_json::json!({"release": "two"}));
        assert_eq!(two["calls"], 7, "{segments}");
        assert_eq!(
            two["cost_usd"].as_f64().unwrap(),
            Money::from_picos(7 * CALL_PICOS as u64).as_usd_f64()
        );
    }
    a.shutdown().await;
    b.shutdown().await;
}

fn settings(pg: &PostgresServer, max_buffered_records: usize) -> LedgerSettings {
    LedgerSettings {
        backend: LedgerBackend::Postgres(PostgresSettings {
            url: pg.url(),
            pool_size: 2,
            max_buffered_records,
        }),
        flush_interval: Duration::from_millis(20),
        queue_capacity: 1024,
        retention_days: 30,
    }
}

fn record(run: &str, i: u64) -> CallRecord {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    CallRecord {
        ts_ms: now_ms + i,
        run_id: Some(run.into()),
        release: "mig".into(),
        request_type: "default".into(),
        route: "openai".into(),
        provider: "openai",
        status: 200,
        outcome: "complete",
        cost: Money::from_picos(7),
        price_version: "v".into(),
        ..CallRecord::default()
    }
}

#[test]
fn migrations_run_once_when_replicas_start_together_and_again_is_a_no_op() {
    let Some(pg) = PostgresServer::start(
        "migrations_run_once_when_replicas_start_together_and_again_is_a_no_op",
    ) else {
        return;
    };
    // Four replicas at once: each opens, restores (which migrates) and writes.
    let barrier = Arc::new(Barrier::new(4));
    let replicas: Vec<_> = (0..4)
        .map(|r| {
            let (barrier, settings) = (barrier.clone(), settings(&pg, 1000));
            std::thread::spawn(move || {
                barrier.wait();
                let ledger = Ledger::open(&settings).unwrap();
                // Waits for the writer to connect and migrate.
                ledger.runs_to_restore(0, 0).unwrap();
                for i in 0..10 {
                    ledger.record_call(record(&format!("replica-{r}"), i));
                }
                ledger.close();
            })
        })
        .collect();
    for replica in replicas {
        replica.join().unwrap();
    }
    assert_eq!(count_and_sum(&pg, "release = 'mig'"), (40, 280));
    assert_eq!(
        pg.sql("SELECT string_agg(version::text, ',') FROM schema_migrations"),
        "1"
    );
    // A restart on the migrated database: nothing to apply, writes go on.
    let ledger = Ledger::open(&settings(&pg, 1000)).unwrap();
    let restored = ledger.runs_to_restore(0, 0).unwrap();
    assert_eq!(
        restored.len(),
        4,
        "each replica's run is live: {restored:?}"
    );
    ledger.record_call(record("again", 0));
    ledger.close();
    assert_eq!(count_and_sum(&pg, "release = 'mig'").0, 41);
    assert_eq!(pg.sql("SELECT COUNT(*) FROM schema_migrations"), "1");
}

#[test]
fn text_holding_a_nul_is_written_with_u_fffd_in_its_place() {
    let Some(pg) = PostgresServer::start("text_holding_a_nul_is_written_with_u_fffd_in_its_place")
    else {
        return;
    };
    let ledger = Ledger::open(&settings(&pg, 1000)).unwrap();
    // Waits for the writer to connect and migrate.
    ledger.runs_to_restore(0, 0).unwrap();
    // PostgreSQL text cannot hold NUL; a reply's model could.
    let mut with_nul = record("nul", 0);
    with_nul.release = "nul".into();
    with_nul.model = Some("gpt\0x".into());
    with_nul.tool = Some("\0\0".into());
    ledger.record_call(with_nul);
    let mut plain = record("nul", 1);
    plain.release = "nul".into();
    plain.model = Some("gpt-4o".into());
    ledger.record_call(plain);
    ledger.close();
    assert_eq!(
        pg.sql(
            "SELECT string_agg(model || '|' || COALESCE(tool, '-') || '|' || run_id, ',' ORDER BY ts_ms) \
             FROM calls WHERE release = 'nul'"
        ),
        "gpt\u{FFFD}x|\u{FFFD}\u{FFFD}|nul,gpt-4o|-|nul"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_buffers_records_and_writes_them_when_postgres_returns() {
    let Some(mut pg) =
        PostgresServer::start("an_outage_buffers_records_and_writes_them_when_postgres_returns")
    else {
        return;
    };
    let upstream = usage_upstream().await;
    let proxy = Proxy::start(&config_with(&pg, ""), &upstream.url()).await;
    let agent = proxy.agent.to_string();
    let admin = proxy.admin.to_string();
    assert_eq!(call(&agent, "before", "outage").await, 200);
    proxy.state.ledger.clone().unwrap().flush();
    pg.stop();
    for i in 0..30 {
        assert_eq!(
            call(&agent, &format!("during-{}", i % 3), "outage").await,
            200
        );
    }
    // The writer has tried and failed; the 30 records wait in memory.
    let deadline = Instant::now() + DEADLINE;
    while metric(&admin, "agent_ledger_write_errors").await < 1.0 {
        assert!(Instant::now() < deadline, "no failed write reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for_metric(&admin, "agent_ledger_buffered_records", 30.0).await;
    // The API says the ledger is unreachable rather than failing obscurely.
    let response = send(
        http::Request::get(format!("http://{admin}/api/runs/during-0"))
            .body(bytes::Bytes::new())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), 503);
    pg.restart();
    wait_for_rows(&pg, "release = 'outage'", 31).await;
    proxy.state.ledger.clone().unwrap().flush();
    assert_eq!(
        count_and_sum(&pg, "release = 'outage'"),
        (31, 31 * CALL_PICOS),
        "every record once"
    );
    assert_eq!(metric(&admin, "agent_ledger_buffered_records").await, 0.0);
    assert_eq!(metric(&admin, "agent_ledger_dropped_total").await, 0.0);
    let run = api(&admin, "/api/runs/during-0").await;
    assert_eq!(run["total"], 10);
    proxy.shutdown().await;
}

#[tokio::test]
async fn past_max_buffered_records_calls_are_served_and_records_dropped_counted_and_logged() {
    let Some(mut pg) = PostgresServer::start(
        "past_max_buffered_records_calls_are_served_and_records_dropped_counted_and_logged",
    ) else {
        return;
    };
    let upstream = MockUpstream::start(|_| MockReply::json(200, USAGE_BODY)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config_on(
        dir.path(),
        &upstream.url(),
        &pg,
        "max_buffered_records = 5\n",
    );
    let config_text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("flush_interval_ms = 60000", "flush_interval_ms = 20");
    std::fs::write(&config, config_text).unwrap();
    let mut process = start_binary(&config);
    assert_eq!(call(&process.agent, "first", "drop").await, 200);
    wait_for_rows(&pg, "release = 'drop'", 1).await;
    pg.stop();
    for _ in 0..20 {
        assert_eq!(call(&process.agent, "outage", "drop").await, 200);
    }
    wait_for_metric(&process.admin, "agent_ledger_dropped_total", 15.0).await;
    wait_for_metric(&process.admin, "agent_ledger_buffered_records", 5.0).await;
    let logs = process.logs.clone();
    let deadline = Instant::now() + DEADLINE;
    while !logs
        .lock()
        .unwrap()
        .iter()
        .any(|line| line.contains("ledger records dropped") && line.contains("\"ERROR\""))
    {
        assert!(
            Instant::now() < deadline,
            "the drop was not logged at ERROR"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pg.restart();
    wait_for_rows(&pg, "release = 'drop'", 6).await;
    sigterm(&mut process);
    assert_eq!(count_and_sum(&pg, "release = 'drop'").0, 6);
}

#[test]
fn check_config_names_the_postgres_keys() {
    let base = "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let problems = |ledger: &str| -> String {
        match tollgate::config::Config::from_toml(
            &format!("{base}{ledger}"),
            "t.toml",
            env!("CARGO_MANIFEST_DIR").into(),
        ) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    let missing = problems("[ledger]\nbackend = \"postgres\"\n");
    assert!(missing.contains("ledger.url"), "{missing}");
    let both =
        problems("[ledger]\nbackend = \"postgres\"\nurl = \"postgres://a@h/d\"\nurl_env = \"X\"\n");
    assert!(both.contains("not both"), "{both}");
    let unset =
        problems("[ledger]\nbackend = \"postgres\"\nurl_env = \"TOLLGATE_TEST_UNSET_URL\"\n");
    assert!(
        unset.contains("ledger.url_env") && unset.contains("TOLLGATE_TEST_UNSET_URL"),
        "{unset}"
    );
    let bad =
        problems("[ledger]\nbackend = \"postgres\"\nurl = \"postgres://u:secret@h:notaport/d\"\n");
    assert!(
        bad.contains("ledger.url") && !bad.contains("secret"),
        "{bad}"
    );
    let pool = problems("[ledger]\nbackend = \"postgres\"\nurl = \"postgres://a@h/d\"\npool_size = 0\nmax_buffered_records = 0\n");
    assert!(
        pool.contains("ledger.pool_size") && pool.contains("ledger.max_buffered_records"),
        "{pool}"
    );
    let stray = problems("[ledger]\nurl = \"postgres://a@h/d\"\n");
    assert!(stray.contains("ledger.backend"), "{stray}");
    let engine = problems("[ledger]\nbackend = \"mysql\"\n");
    assert!(engine.contains("mysql"), "{engine}");
    assert_eq!(
        problems("[ledger]\nbackend = \"postgres\"\nurl = \"postgres://a@127.0.0.1:1/d\"\n"),
        ""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_postgres_at_start_is_not_fatal() {
    let Some(mut pg) = PostgresServer::start("an_unreachable_postgres_at_start_is_not_fatal")
    else {
        return;
    };
    pg.stop();
    let upstream = usage_upstream().await;
    let proxy = Proxy::start(&config_with(&pg, ""), &upstream.url()).await;
    let agent = proxy.agent.to_string();
    for _ in 0..5 {
        assert_eq!(call(&agent, "early", "early").await, 200);
    }
    pg.restart();
    // Migrated and written when it comes up, without a restart.
    wait_for_rows(&pg, "release = 'early'", 5).await;
    assert_eq!(pg.sql("SELECT COUNT(*) FROM schema_migrations"), "1");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_role_that_may_not_create_the_tables_is_logged_clearly_and_calls_go_on() {
    let Some(pg) = PostgresServer::start(
        "a_role_that_may_not_create_the_tables_is_logged_clearly_and_calls_go_on",
    ) else {
        return;
    };
    pg.sql("CREATE ROLE nocreate LOGIN");
    let upstream = MockUpstream::start(|_| MockReply::json(200, USAGE_BODY)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config_on(dir.path(), &upstream.url(), &pg, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("postgres://tollgate@", "postgres://nocreate@");
    std::fs::write(&config, text).unwrap();
    let mut process = start_binary(&config);
    assert_eq!(call(&process.agent, "denied", "denied").await, 200);
    let logs = process.logs.clone();
    let deadline = Instant::now() + DEADLINE;
    while !logs.lock().unwrap().iter().any(|line| {
        line.contains("\"ERROR\"")
            && line.contains("permissions")
            && line.contains("SQLSTATE 42501")
    }) {
        assert!(
            Instant::now() < deadline,
            "the refusal was not logged at ERROR"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SIGKILL: on SIGTERM the writer would first retry the records it
    // cannot write for 15 s.
    let pid = process.child.id().to_string();
    let _ = Command::new("kill").args(["-KILL", &pid]).status();
    let _ = process.child.wait();
}
