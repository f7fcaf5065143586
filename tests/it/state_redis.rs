//! The Redis state backend with in-process proxies: one ceiling and one
//! window cap across proxies sharing a Redis, run ends claimed once, stale
//! settlements kept off newer runs, and the failure policies while Redis is
//! down and after it is back. Each test starts its own `redis-server`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tollgate::budget::{period_id, Clock, WindowPeriod};
use tollgate::money::Money;

use crate::budget::{chat_body, held_upstream, reservation, USAGE_BODY};
use crate::services::RedisServer;
use crate::support::*;

const CHAT: &str = "/openai/v1/chat/completions";
const PREFIX: &str = "tollgate:";

/// A test config with the Redis backend. The timeout is generous: a loaded
/// test machine must not turn into the failure policy by accident.
fn redis_config(redis: &RedisServer, on_error: &str, timeout_ms: u64, extra: &str) -> String {
    format!(
        "{}\n[state]\nbackend = \"redis\"\nurl = \"{}\"\nkey_prefix = \"{PREFIX}\"\ntimeout_ms = {timeout_ms}\non_state_error = \"{on_error}\"\n{extra}",
        config_all_routes(),
        redis.url()
    )
}

/// gpt-4o-mini in the test table: $2/M input, $6/M output; 25 + 50 tokens.
fn call_cost() -> Money {
    Money::from_picos(25 * 2_000_000 + 50 * 6_000_000)
}

/// One field of a hash in Redis, `None` when absent.
fn hget(redis: &RedisServer, key: &str, field: &str) -> Option<String> {
    let reply = redis.command(&["HGET", key, field]);
    if reply.starts_with("$-1") {
        return None;
    }
    reply.split("\r\n").nth(1).map(str::to_string)
}

fn run_key(run: &str) -> String {
    format!("{PREFIX}run:{run}")
}

/// Polls `condition` until it holds, failing after a generous deadline.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls the proxies' `/metrics` until their `agent_run_total` adds up to
/// `want`: a replica counts a run's end once Redis has answered its claim,
/// a moment after the call or sweep that caused it.
async fn wait_for_run_ends(proxies: &[&Proxy], want: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut texts = Vec::with_capacity(proxies.len());
        for proxy in proxies {
            texts.push(proxy.metrics().await);
        }
        let got = metric_sum(&texts, "agent_run_total", &[]);
        if got >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "agent_run_total = {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn finish(proxy: &Proxy, run: &str) -> u16 {
    let url = format!("http://{}/api/runs/{run}/finish", proxy.admin);
    post_json(url, &[], r#"{"status":"completed"}"#)
        .await
        .status()
        .as_u16()
}

async fn call(proxy: &Proxy, headers: &[(&str, &str)]) -> (u16, http::HeaderMap) {
    let response = post_json(proxy.url(CHAT), headers, &chat_body()).await;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let _ = body_bytes(response).await;
    (status, headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ceiling_across_proxies_and_one_run_end() {
    let Some(redis) = RedisServer::start("one_ceiling_across_proxies_and_one_run_end") else {
        return;
    };
    let (upstream, held) = held_upstream().await;
    let config = redis_config(&redis, "fail_closed", 2_000, "");
    let a = Proxy::start(&config, &upstream.url()).await;
    let b = Proxy::start(&config, &upstream.url()).await;
    let reserve = reservation(&a);
    // A ceiling worth 5.5 reservations.
    let ceiling = Money::from_picos(reserve.picos() * 11 / 2).to_string();

    let mut tasks = Vec::new();
    for _ in 0..50 {
        let url = a.url(CHAT);
        let ceiling = ceiling.clone();
        tasks.push(tokio::spawn(async move {
            let headers = [
                ("x-agent-run-id", "crowd"),
                ("x-agent-budget-usd", &ceiling),
            ];
            let response = post_json(url, &headers, &chat_body()).await;
            let status = response.status().as_u16();
            let _ = body_bytes(response).await;
            status
        }));
    }
    eventually("every call refused or held upstream", || {
        a.state.budgets.totals().run_refusals as usize + held.lock().unwrap().len() == 50
    })
    .await;
    for tx in held.lock().unwrap().drain(..) {
        let _ = tx.try_send(Ok(Bytes::from(USAGE_BODY)));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            200 => ok += 1,
            402 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(ok, 5, "exactly ceiling-worth of calls reach the upstream");
    assert_eq!(upstream.hits(), 5);

    // Redis holds the run's spend, equal to the proxy's cost metric.
    let spent = Money::from_picos(call_cost().picos() * 5);
    eventually("the five settlements reach Redis", || {
        hget(&redis, &run_key("crowd"), "llm") == Some(spent.picos().to_string())
    })
    .await;
    assert_eq!(hget(&redis, &run_key("crowd"), "reserved").unwrap(), "0");
    assert_eq!(hget(&redis, &run_key("crowd"), "in_flight").unwrap(), "0");
    assert_eq!(hget(&redis, &run_key("crowd"), "calls").unwrap(), "5");
    let metric = metric_value(
        &a.metrics().await,
        "agent_llm_cost_usd_total",
        &[("model", "gpt-4o-mini")],
    )
    .unwrap();
    assert!((metric - spent.as_usd_f64()).abs() < 1e-12, "{metric}");

    // Proxy B never saw this run, yet refuses it on A's spend: under this
    // ceiling B alone (nothing spent) would admit the call.
    let lower = spent
        .saturating_add(Money::from_picos(reserve.picos() / 2))
        .to_string();
    let headers = [("x-agent-run-id", "crowd"), ("x-agent-budget-usd", &lower)];
    let (status, response_headers) = call(&b, &headers).await;
    assert_eq!(status, 402);
    assert_eq!(
        response_headers["x-agent-run-cost-usd"],
        spent.to_header_value().as_str()
    );
    assert_eq!(upstream.hits(), 5);

    // Ended once: on A; B's finish finds nothing, and B's sweep long after
    // the idle timeout does not end it again.
    assert_eq!(finish(&a, "crowd").await, 200);
    assert_eq!(finish(&b, "crowd").await, 404);
    b.clock.advance(3_600_000);
    let shared = b.state.shared.as_ref().unwrap();
    assert_eq!(shared.sweep(300_000).await.unwrap(), 0);
    let texts = [a.metrics().await, b.metrics().await];
    assert_eq!(metric_sum(&texts, "agent_run_total", &[]), 1.0);
    assert_eq!(
        metric_value(
            &texts[0],
            "agent_run_total",
            &[("stop_reason", "budget_exceeded")]
        ),
        Some(1.0)
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_cap_holds_across_proxies() {
    let Some(redis) = RedisServer::start("window_cap_holds_across_proxies") else {
        return;
    };
    let upstream = MockUpstream::start(|_| MockReply::json(200, USAGE_BODY)).await;
    // The cap is passed by the second call: A alone spent below it.
    let limit = call_cost().as_usd_f64() * 1.5;
    let window = format!(
        "[[budget.windows]]\nrelease = \"capped\"\nperiod = \"day\"\nlimit_usd = {limit}\n"
    );
    let config = redis_config(&redis, "fail_closed", 2_000, &window);
    let a = Proxy::start(&config, &upstream.url()).await;
    let b = Proxy::start(&config, &upstream.url()).await;
    let day = period_id(WindowPeriod::Day, a.clock.now_ms());
    let key = format!("{PREFIX}win:day:release=capped:{day}");
    let capped = [("x-agent-release", "capped")];
    let spent_in_redis = |calls: u64| {
        let want = (call_cost().picos() * calls).to_string();
        let redis = &redis;
        let key = key.clone();
        move || redis.command(&["GET", &key]).split("\r\n").nth(1) == Some(want.as_str())
    };

    assert_eq!(call(&a, &capped).await.0, 200);
    eventually("A's spend in the window", spent_in_redis(1)).await;
    assert_eq!(call(&b, &capped).await.0, 200);
    eventually("B's spend in the window", spent_in_redis(2)).await;
    // A spent one call locally, below the cap; the fleet spent two.
    let (status, _) = call(&a, &capped).await;
    assert_eq!(status, 402);
    assert_eq!(call(&b, &capped).await.0, 402);
    assert_eq!(upstream.hits(), 2);
    let text = a.metrics().await;
    assert_eq!(
        metric_value(
            &text,
            "agent_budget_rejections_total",
            &[("scope", "window")]
        ),
        Some(1.0)
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_of_an_ended_run_does_not_touch_its_successor() {
    let Some(redis) = RedisServer::start("a_settle_of_an_ended_run_does_not_touch_its_successor")
    else {
        return;
    };
    let (upstream, held) = held_upstream().await;
    let proxy = Proxy::start(
        &redis_config(&redis, "fail_closed", 2_000, ""),
        &upstream.url(),
    )
    .await;
    let run = [("x-agent-run-id", "reused")];
    let first = tokio::spawn({
        let url = proxy.url(CHAT);
        async move {
            let response = post_json(url, &run, &chat_body()).await;
            body_bytes(response).await
        }
    });
    eventually("the first call is held upstream", || {
        held.lock().unwrap().len() == 1
    })
    .await;
    let first_gen = hget(&redis, &run_key("reused"), "gen").unwrap();
    // Ended while its call is in flight; the id then starts a new run.
    assert_eq!(finish(&proxy, "reused").await, 200);
    let second = tokio::spawn({
        let url = proxy.url(CHAT);
        async move {
            let response = post_json(url, &run, &chat_body()).await;
            body_bytes(response).await
        }
    });
    eventually("the second call is held upstream", || {
        held.lock().unwrap().len() == 2
    })
    .await;
    let second_gen = hget(&redis, &run_key("reused"), "gen").unwrap();
    assert_ne!(first_gen, second_gen);

    // Each body ends when its sender is dropped after the usage is sent.
    let mut senders: Vec<_> = held.lock().unwrap().drain(..).collect();
    let second_sender = senders.pop().unwrap();
    let first_sender = senders.pop().unwrap();
    first_sender.try_send(Ok(Bytes::from(USAGE_BODY))).unwrap();
    drop(first_sender);
    first.await.unwrap();
    second_sender.try_send(Ok(Bytes::from(USAGE_BODY))).unwrap();
    drop(second_sender);
    second.await.unwrap();
    let cost = call_cost().picos().to_string();
    eventually("the second call settles", || {
        hget(&redis, &run_key("reused"), "llm").as_deref() == Some(cost.as_str())
    })
    .await;
    assert_eq!(hget(&redis, &run_key("reused"), "reserved").unwrap(), "0");
    assert_eq!(hget(&redis, &run_key("reused"), "in_flight").unwrap(), "0");
    assert_eq!(hget(&redis, &run_key("reused"), "calls").unwrap(), "1");
    // The first run ended once, from Redis figures (its call was in flight).
    let text = proxy.metrics().await;
    assert_eq!(metric_value(&text, "agent_run_total", &[]), Some(1.0));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_run_is_claimed_by_one_sweeper() {
    let Some(redis) = RedisServer::start("an_idle_run_is_claimed_by_one_sweeper") else {
        return;
    };
    let upstream = MockUpstream::start(|_| MockReply::json(200, USAGE_BODY)).await;
    let config = redis_config(
        &redis,
        "fail_closed",
        2_000,
        "[runs]\nidle_timeout_secs = 60\n",
    );
    let a = Proxy::start(&config, &upstream.url()).await;
    let b = Proxy::start(&config, &upstream.url()).await;
    for run in ["idle-1", "idle-2", "idle-3"] {
        assert_eq!(call(&a, &[("x-agent-run-id", run)]).await.0, 200);
    }
    assert_eq!(call(&b, &[("x-agent-run-id", "idle-2")]).await.0, 200);
    eventually("settlements reach Redis", || {
        hget(&redis, &run_key("idle-2"), "calls").as_deref() == Some("2")
            && ["idle-1", "idle-2", "idle-3"]
                .iter()
                .all(|run| hget(&redis, &run_key(run), "in_flight").as_deref() == Some("0"))
    })
    .await;
    // Not idle yet: nobody claims.
    let (sa, sb) = (
        a.state.shared.clone().unwrap(),
        b.state.shared.clone().unwrap(),
    );
    assert_eq!(sa.sweep(60_000).await.unwrap(), 0);
    a.clock.advance(61_000);
    b.clock.advance(61_000);
    let (ca, cb) = tokio::join!(sa.sweep(60_000), sb.sweep(60_000));
    let claimed = ca.unwrap() + cb.unwrap();
    assert!(claimed <= 3);
    // The proxies' own sweepers may have claimed some meanwhile: wait for
    // all three ends, then check nothing is left to claim a second time.
    wait_for_run_ends(&[&a, &b], 3.0).await;
    let (ca, cb) = tokio::join!(sa.sweep(60_000), sb.sweep(60_000));
    assert_eq!((ca.unwrap(), cb.unwrap()), (0, 0));
    let texts = [a.metrics().await, b.metrics().await];
    assert_eq!(metric_sum(&texts, "agent_run_total", &[]), 3.0);
    assert_eq!(
        metric_sum(
            &texts,
            "agent_run_total",
            &[("stop_reason", "idle_timeout")]
        ),
        3.0
    );
    for run in ["idle-1", "idle-2", "idle-3"] {
        assert_eq!(hget(&redis, &run_key(run), "gen"), None);
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_meters_through_an_outage_and_reconciles() {
    let Some(mut redis) = RedisServer::start("fail_open_meters_through_an_outage_and_reconciles")
    else {
        return;
    };
    let upstream = MockUpstream::start(|_| MockReply::json(200, USAGE_BODY)).await;
    let proxy = Proxy::start(&redis_config(&redis, "fail_open", 200, ""), &upstream.url()).await;
    let run = [("x-agent-run-id", "through")];
    for _ in 0..2 {
        assert_eq!(call(&proxy, &run).await.0, 200);
    }
    eventually("the first calls settle in Redis", || {
        hget(&redis, &run_key("through"), "calls").as_deref() == Some("2")
            && hget(&redis, &run_key("through"), "in_flight").as_deref() == Some("0")
    })
    .await;

    redis.stop();
    for _ in 0..3 {
        assert_eq!(call(&proxy, &run).await.0, 200, "fail_open keeps serving");
    }
    let text = proxy.metrics().await;
    let errors = metric_value(
        &text,
        "agent_state_errors_total",
        &[("backend", "redis"), ("op", "reserve")],
    )
    .unwrap_or(0.0);
    assert!(errors >= 3.0, "{errors}");
    assert_eq!(upstream.hits(), 5);

    // Redis comes back empty (no persistence): the calls metered during the
    // outage are reconciled into a run of their own, without a restart.
    redis.restart();
    let outage_spend = (call_cost().picos() * 3).to_string();
    eventually("the outage's calls are reconciled", || {
        hget(&redis, &run_key("through"), "llm").as_deref() == Some(outage_spend.as_str())
    })
    .await;
    assert_eq!(hget(&redis, &run_key("through"), "calls").unwrap(), "3");
    assert_eq!(hget(&redis, &run_key("through"), "reserved").unwrap(), "0");
    assert_eq!(proxy.state.shared.as_ref().unwrap().reconcile_pending(), 0);

    // And the next call goes through Redis again.
    assert_eq!(call(&proxy, &run).await.0, 200);
    let spend = (call_cost().picos() * 4).to_string();
    eventually("a call after recovery settles in Redis", || {
        hget(&redis, &run_key("through"), "llm").as_deref() == Some(spend.as_str())
    })
    .await;
    let text = proxy.metrics().await;
    assert_eq!(
        metric_value(&text, "agent_state_reconcile_pending", &[]),
        Some(0.0)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_answers_503_in_the_provider_shape_until_redis_is_back() {
    let Some(mut redis) =
        RedisServer::start("fail_closed_answers_503_in_the_provider_shape_until_redis_is_back")
    else {
        return;
    };
    let upstream = MockUpstream::start(|_| MockReply::json(200, USAGE_BODY)).await;
    let proxy = Proxy::start(
        &redis_config(&redis, "fail_closed", 200, ""),
        &upstream.url(),
    )
    .await;
    let run = [("x-agent-run-id", "closed")];
    assert_eq!(call(&proxy, &run).await.0, 200);

    redis.stop();
    let response = post_json(proxy.url(CHAT), &run, &chat_body()).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["x-should-retry"], "true");
    let body: serde_json::Value = serde_json::from_slice(&body_bytes(response).await).unwrap();
    assert_eq!(body["error"]["type"], "api_error");
    assert_eq!(body["error"]["code"], "state_unavailable");

    let response = post_json(
        proxy.url("/anthropic/v1/messages"),
        &run,
        r#"{"model":"claude-3-opus-latest","max_tokens":10}"#,
    )
    .await;
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = serde_json::from_slice(&body_bytes(response).await).unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "api_error");
    assert_eq!(upstream.hits(), 1, "nothing reached the upstream");
    let local = proxy.state.budgets.run_snapshot("closed").unwrap();
    assert_eq!(local.calls, 1, "refused calls are not counted");
    assert_eq!(local.reserved, Money::ZERO);

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = call(&proxy, &run).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(Instant::now() < deadline, "Redis back, calls still refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = proxy.metrics().await;
    assert!(
        metric_value(
            &text,
            "agent_state_errors_total",
            &[("backend", "redis"), ("op", "reserve")]
        )
        .unwrap_or(0.0)
            >= 2.0
    );
    proxy.shutdown().await;
}

/// The scripts compare money exactly past 2^53 pico-dollars, where Lua's
/// doubles cannot tell neighbours apart.
#[test]
fn script_money_comparisons_are_exact_beyond_doubles() {
    let Some(redis) = RedisServer::start("script_money_comparisons_are_exact_beyond_doubles")
    else {
        return;
    };
    let common = include_str!("../../src/state_backend/common.lua");
    let eval = |body: &str| {
        let script = format!("{common}\n{body}");
        redis.command(&["EVAL", &script, "1", "scratch"])
    };
    let is = |reply: String, want: &str| assert!(reply.contains(want), "{reply} lacks {want}");
    is(
        eval("return dec_gt('9007199254740993', '9007199254740992') and 'yes' or 'no'"),
        "yes",
    );
    is(
        eval("return dec_gt('9007199254740992', '9007199254740993') and 'yes' or 'no'"),
        "no",
    );
    is(eval("return dec_gt('10', '9') and 'yes' or 'no'"), "yes");
    is(eval("return dec_gt('-1', '0') and 'yes' or 'no'"), "no");
    is(eval("return dec_gt('-1', '-2') and 'yes' or 'no'"), "yes");
    is(
        eval("return dec_sum(KEYS[1], {'9007199254740993', '1', '4000000000000000000'})"),
        "4009007199254740994",
    );
    // The scratch field is gone.
    assert!(redis.command(&["EXISTS", "scratch"]).starts_with(":0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_status_header_ends_the_fleet_run_once_with_its_last_call() {
    let Some(redis) =
        RedisServer::start("a_run_status_header_ends_the_fleet_run_once_with_its_last_call")
    else {
        return;
    };
    let upstream = MockUpstream::start(|_| MockReply::json(200, USAGE_BODY)).await;
    let config = redis_config(&redis, "fail_closed", 2_000, "");
    let a = Proxy::start(&config, &upstream.url()).await;
    let b = Proxy::start(&config, &upstream.url()).await;
    assert_eq!(call(&a, &[("x-agent-run-id", "hdr")]).await.0, 200);
    let last = [
        ("x-agent-run-id", "hdr"),
        ("x-agent-run-status", "completed"),
    ];
    assert_eq!(call(&b, &last).await.0, 200);
    wait_for_run_ends(&[&b], 1.0).await;
    assert_eq!(hget(&redis, &run_key("hdr"), "gen"), None);
    // A's copy goes idle; its sweep finds nothing left to end.
    a.clock.advance(3_600_000);
    a.state.budgets.sweep_idle();
    let shared = a.state.shared.as_ref().unwrap();
    assert_eq!(shared.sweep(300_000).await.unwrap(), 0);
    let texts = [a.metrics().await, b.metrics().await];
    assert_eq!(metric_sum(&texts, "agent_run_total", &[]), 1.0);
    // The end came after the settle of its own call: both calls' cost.
    let cost = metric_value(&texts[1], "agent_run_cost_usd_sum", &[]).unwrap();
    assert!(
        (cost - Money::from_picos(call_cost().picos() * 2).as_usd_f64()).abs() < 1e-12,
        "{cost}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[test]
fn check_config_names_the_state_keys_it_refuses() {
    let text = format!(
        "{}\n[state]\nbackend = \"redis\"\nurl = \"http://not-redis\"\nkey_prefix = \"\"\ntimeout_ms = 0\n",
        config_all_routes()
    );
    let error =
        tollgate::config::Config::from_toml(&text, "t.toml", env!("CARGO_MANIFEST_DIR").into())
            .unwrap_err()
            .to_string();
    for key in ["state.url", "state.key_prefix", "state.timeout_ms"] {
        assert!(error.contains(key), "{error} lacks {key}");
    }
    let text = format!("{}\n[state]\nbackend = \"etcd\"\n", config_all_routes());
    assert!(tollgate::config::Config::from_toml(
        &text,
        "t.toml",
        env!("CARGO_MANIFEST_DIR").into()
    )
    .is_err());
}
