//! Three tollgate processes sharing one Redis (budgets) and one PostgreSQL
//! (ledger): one ceiling and one window cap hold across all of them, a run
//! ends once in the sum of their metrics, and every replica's API sees every
//! replica's calls.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tollgate::money::Money;

use crate::budget::{chat_body, held_upstream, reservation, USAGE_BODY};
use crate::services::{PostgresServer, RedisServer};
use crate::support::*;

const CHAT: &str = "/openai/v1/chat/completions";
const REPLICAS: usize = 3;

/// A replica process, killed when the test ends however it ends.
struct Replica(Process);

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}

fn replica_config(dir: &std::path::Path, upstream: &str, redis: &str, postgres: &str) -> String {
    let routes = config_all_routes().replace(
        TEST_PRICING,
        &format!("{}/{TEST_PRICING}", env!("CARGO_MANIFEST_DIR")),
    );
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[state]
backend = "redis"
url = "{redis}"
on_state_error = "fail_closed"

[ledger]
backend = "postgres"
url = "{postgres}"
path = "{ledger}"
flush_interval_ms = 20

[[budget.windows]]
release = "capped"
period = "day"
limit_usd = 0.001

{routes}"#,
        ledger = dir.join("unused.db").display(),
    )
    .replace("{upstream}", upstream)
}

fn start_replicas(dir: &std::path::Path, config: &str) -> Vec<Replica> {
    (0..REPLICAS)
        .map(|i| {
            let path = dir.join(format!("replica-{i}.toml"));
            std::fs::write(&path, config).unwrap();
            Replica(start_binary(&path))
        })
        .collect()
}

async fn get(url: String) -> (u16, String) {
    let response = send(http::Request::get(url).body(Bytes::new()).unwrap()).await;
    let status = response.status().as_u16();
    (
        status,
        String::from_utf8(body_bytes(response).await.to_vec()).unwrap(),
    )
}

/// Sum of every series of `name` whose labels include `labels`, over all
/// replicas.
async fn summed(replicas: &[Replica], name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut texts = Vec::new();
    for replica in replicas {
        texts.push(get(format!("http://{}/metrics", replica.0.admin)).await.1);
    }
    metric_sum(&texts, name, labels)
}

fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The run's settled spend in pico-dollars, read from Redis.
fn redis_spend(redis: &RedisServer, run: &str) -> u64 {
    let reply = redis.command(&["HMGET", &format!("tollgate:run:{run}"), "llm", "tool"]);
    reply.lines().filter_map(|l| l.parse::<u64>().ok()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_hold_one_ceiling_one_window_and_end_a_run_once() {
    let test = "three_replicas_hold_one_ceiling_one_window_and_end_a_run_once";
    let Some(redis) = RedisServer::start(test) else {
        return;
    };
    let Some(postgres) = PostgresServer::start(test) else {
        return;
    };
    let (upstream, held) = held_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = replica_config(dir.path(), &upstream.url(), &redis.url(), &postgres.url());
    let replicas = start_replicas(dir.path(), &config);

    // One run, a ceiling worth 5.5 reservations, 60 concurrent calls spread
    // over the three replicas; the upstream holds every admitted call open.
    let reserve = {
        let local = Proxy::start(&config_all_routes(), &upstream.url()).await;
        let r = reservation(&local);
        local.shutdown().await;
        r
    };
    let ceiling = Money::from_picos(reserve.picos() * 11 / 2);
    let ceiling_header = ceiling.to_string();
    let refused_so_far = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..60 {
        let url = format!("http://{}{CHAT}", replicas[i % REPLICAS].0.agent);
        let header = ceiling_header.clone();
        let refused_so_far = refused_so_far.clone();
        tasks.push(tokio::spawn(async move {
            let response = post_json(
                url,
                &[
                    ("x-agent-run-id", "shared-crowd"),
                    ("x-agent-release", "r-shared"),
                    ("x-agent-budget-usd", &header),
                ],
                &chat_body(),
            )
            .await;
            let status = response.status().as_u16();
            if status == 402 {
                refused_so_far.fetch_add(1, Ordering::SeqCst);
            }
            let _ = body_bytes(response).await;
            status
        }));
    }
    // Every call is decided (refused, or admitted and held upstream) before
    // any body is released.
    let deadline = Instant::now() + Duration::from_secs(30);
    while refused_so_far.load(Ordering::SeqCst) + held.lock().unwrap().len() < 60 {
        assert!(Instant::now() < deadline, "calls were not all decided");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for tx in held.lock().unwrap().drain(..) {
        let _ = tx.try_send(Ok(Bytes::from(USAGE_BODY)));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 402).count();
    assert_eq!(ok + refused, 60, "only 200 or 402: {statuses:?}");
    assert_eq!(
        ok, 5,
        "exactly ceiling-worth of calls pass across 3 replicas"
    );
    assert_eq!(upstream.hits(), 5);
    let per_call = 25 * 2_000_000 + 50 * 6_000_000;
    eventually("settles reach Redis", || {
        redis_spend(&redis, "shared-crowd") == 5 * per_call
    });
    assert!(Money::from_picos(redis_spend(&redis, "shared-crowd")) <= ceiling);

    // While it is live, every replica reports the fleet's figures for it.
    for replica in &replicas {
        let (status, body) = get(format!("http://{}/api/runs/shared-crowd", replica.0.admin)).await;
        assert_eq!(status, 200, "{body}");
        let run: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(run["run"]["ended_at"], serde_json::Value::Null, "{body}");
        assert_eq!(run["run"]["calls"], 5, "{body}");
        assert_eq!(run["run"]["refusals"], 55, "{body}");
        assert_eq!(run["run"]["cost_usd"], 0.00175, "{body}");
    }

    // The run ends once: the first finish wins, the others find nothing.
    let mut finished = Vec::new();
    for replica in &replicas {
        let response = send(
            http::Request::post(format!(
                "http://{}/api/runs/shared-crowd/finish",
                replica.0.admin
            ))
            .header("content-type", "application/json")
            .body(Bytes::from_static(br#"{"status":"completed"}"#))
            .unwrap(),
        )
        .await;
        finished.push(response.status().as_u16());
    }
    assert_eq!(finished, [200, 404, 404]);
    assert_eq!(
        summed(&replicas, "agent_run_total", &[("release", "r-shared")]).await,
        1.0
    );
    assert_eq!(
        summed(
            &replicas,
            "agent_run_cost_usd_count",
            &[("release", "r-shared")]
        )
        .await,
        1.0
    );
    let calls_metric = summed(&replicas, "agent_calls_total", &[("status", "200")]).await;
    assert_eq!(calls_metric, 5.0, "admitted calls in the summed metrics");
    let llm_cost = summed(
        &replicas,
        "agent_llm_cost_usd_total",
        &[("release", "r-shared")],
    )
    .await;
    assert!(
        (llm_cost - 0.00175).abs() < 1e-12,
        "summed LLM cost {llm_cost}"
    );
    let refusals = summed(
        &replicas,
        "agent_budget_rejections_total",
        &[("release", "r-shared")],
    )
    .await;
    assert_eq!(refusals, 55.0);

    // One ledger for all: 60 call records and one run record in PostgreSQL,
    // and each replica's API shows the calls the others served.
    eventually("call records in PostgreSQL", || {
        postgres.sql("SELECT count(*) FROM calls WHERE run_id = 'shared-crowd'") == "60"
    });
    eventually("the run record in PostgreSQL", || {
        postgres.sql("SELECT count(*) FROM runs WHERE run_id = 'shared-crowd'") == "1"
    });
    assert_eq!(
        postgres
            .sql("SELECT sum(cost_pico) FROM calls WHERE run_id = 'shared-crowd' AND status = 200"),
        (5 * per_call).to_string()
    );
    for replica in &replicas {
        let (status, body) = get(format!("http://{}/api/runs/shared-crowd", replica.0.admin)).await;
        assert_eq!(status, 200, "{body}");
        let run: serde_json::Value = serde_json::from_str(&body).unwrap();
        let calls = run["calls"].as_array().expect("calls listed");
        assert_eq!(calls.len(), 60, "every replica sees all 60 calls: {body}");
    }

    // A window cap of $0.001 holds across replicas: calls of $0.00035 each,
    // sent in turn to each replica, pass until the day's spend reaches it.
    let mut passed = 0;
    for i in 0..9 {
        let url = format!("http://{}{CHAT}", replicas[i % REPLICAS].0.agent);
        let run = format!("capped-{i}");
        let sender = tokio::spawn(async move {
            let response = post_json(
                url,
                &[("x-agent-run-id", &run), ("x-agent-release", "capped")],
                &chat_body(),
            )
            .await;
            let status = response.status().as_u16();
            let _ = body_bytes(response).await;
            status
        });
        // Release this call's body as soon as the upstream holds it.
        let status = loop {
            if let Some(tx) = held.lock().unwrap().pop() {
                let _ = tx.try_send(Ok(Bytes::from(USAGE_BODY)));
            }
            if sender.is_finished() {
                break sender.await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        match status {
            200 => {
                passed += 1;
                // The next admit, on another replica, must see this spend.
                let expected = (passed * per_call).to_string();
                eventually("the window spend in Redis", || {
                    let keys = redis.command(&["KEYS", "tollgate:win:*"]);
                    let key = keys.lines().find(|l| l.starts_with("tollgate:win:"));
                    key.is_some_and(|k| {
                        redis.command(&["GET", k]).lines().nth(1) == Some(expected.as_str())
                    })
                });
            }
            402 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    // $0.00035 × 3 = $0.00105 ≥ $0.001: the fourth call is refused wherever it lands.
    assert_eq!(
        passed, 3,
        "the window admits until its spend reaches the cap"
    );
}
