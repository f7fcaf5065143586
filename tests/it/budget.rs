//! Budgets through the proxy: ceilings under concurrency, refusals in each
//! provider's shape, run ends counted once, window caps, tool costs, and the
//! output-limit guard.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;

use tollgate::money::Money;
use tollgate::proxy::request::RequestInfo;

use crate::support::*;

const CHAT: &str = "/openai/v1/chat/completions";
/// A chat request whose reservation is known: 25 prompt tokens (100 bytes)
/// and a 100-token output limit.
pub(crate) fn chat_body() -> String {
    let body = r#"{"model":"gpt-4o-mini","max_tokens":100,"messages":[{"role":"user","content":"hello"}],"pad":""}"#;
    let pad = "x".repeat(100 - body.len());
    body.replace(r#""pad":"""#, &format!(r#""pad":"{pad}""#))
}

pub(crate) fn reservation(proxy: &Proxy) -> Money {
    let info = RequestInfo {
        model: Some("gpt-4o-mini".into()),
        stream: false,
        max_output_tokens: Some(100),
        usage_injected: false,
    };
    proxy
        .state
        .reservation_for(&proxy.state.pricing.load(), &info, 100)
}

/// The upstream answers each call with a usage of 25 prompt and 50
/// completion tokens, but holds the body open until the test releases it,
/// so every admitted call stays in flight.
/// Senders of the bodies the upstream holds open.
pub(crate) type Held = Arc<Mutex<Vec<mpsc::Sender<Result<Bytes, std::io::Error>>>>>;

pub(crate) async fn held_upstream() -> (MockUpstream, Held) {
    let held = Arc::new(Mutex::new(Vec::new()));
    let senders = held.clone();
    let upstream = MockUpstream::start(move |_| {
        let (tx, rx) = mpsc::channel(2);
        senders.lock().unwrap().push(tx);
        MockReply {
            status: http::StatusCode::OK,
            headers: vec![("content-type".into(), "application/json".into())],
            body: MockBody::Channel(rx),
        }
    })
    .await;
    (upstream, held)
}

pub(crate) const USAGE_BODY: &str = r#"{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":25,"completion_tokens":50,"total_tokens":75}}"#;

fn call_cost() -> Money {
    // gpt-4o-mini in the test table: $2/M input, $6/M output.
    Money::from_picos(25 * 2_000_000 + 50 * 6_000_000)
}

async fn concurrent_calls(
    proxy: &Proxy,
    held: &Held,
    ceiling: Money,
    calls: usize,
) -> (usize, usize) {
    let ceiling_header = ceiling.to_string();
    let mut tasks = Vec::new();
    for _ in 0..calls {
        let url = proxy.url(CHAT);
        let header = ceiling_header.clone();
        tasks.push(tokio::spawn(async move {
            let response = post_json(
                url,
                &[("x-agent-run-id", "crowd"), ("x-agent-budget-usd", &header)],
                &chat_body(),
            )
            .await;
            let status = response.status().as_u16();
            let _ = body_bytes(response).await;
            status
        }));
    }
    // Wait until every call was either refused or is held upstream.
    loop {
        let refused = proxy.state.budgets.totals().run_refusals as usize;
        // Count held senders, not upstream hits: the mock registers a
        // sender just after it counts the hit.
        if refused + held.lock().unwrap().len() == calls {
            break;
        }
        tokio::task::yield_now().await;
    }
    for tx in held.lock().unwrap().drain(..) {
        let _ = tx.try_send(Ok(Bytes::from(USAGE_BODY)));
    }
    let mut ok = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            200 => ok += 1,
            402 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    (ok, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_mode_holds_the_ceiling_under_50_concurrent_calls() {
    let (upstream, held) = held_upstream().await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    let reserve = reservation(&proxy);
    // A ceiling worth 5.5 reservations.
    let ceiling = Money::from_picos(reserve.picos() * 11 / 2);
    let (ok, refused) = concurrent_calls(&proxy, &held, ceiling, 50).await;
    assert_eq!(ok, 5, "exactly ceiling-worth of calls reach the upstream");
    assert_eq!(refused, 45);
    assert_eq!(upstream.hits(), 5);
    let run = proxy.state.budgets.run_snapshot("crowd").unwrap();
    assert_eq!(run.spent, Money::from_picos(call_cost().picos() * 5));
    assert!(
        run.spent <= ceiling,
        "final spend {} within ceiling {}",
        run.spent,
        ceiling
    );
    assert_eq!(run.reserved, Money::ZERO);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_mode_overshoot_is_bounded_by_the_calls_in_flight() {
    let (upstream, held) = held_upstream().await;
    let config = format!("{}\n[budget]\nmode = \"soft\"\n", config_all_routes());
    let proxy = Proxy::start(&config, &upstream.url()).await;
    let ceiling = Money::from_picos(call_cost().picos() * 5);
    let (ok, _) = concurrent_calls(&proxy, &held, ceiling, 50).await;
    // Soft mode checks spend only: all 50 were in flight before any settled.
    assert_eq!(ok, 50);
    let run = proxy.state.budgets.run_snapshot("crowd").unwrap();
    assert_eq!(run.spent, Money::from_picos(call_cost().picos() * 50));
    // Once spent passed the ceiling, the next call is refused.
    let response = post_json(
        proxy.url(CHAT),
        &[
            ("x-agent-run-id", "crowd"),
            ("x-agent-budget-usd", &ceiling.to_string()),
        ],
        &chat_body(),
    )
    .await;
    assert_eq!(response.status(), 402);
    proxy.shutdown().await;
}

#[tokio::test]
async fn refusals_are_402_in_each_provider_shape_and_never_reach_upstream() {
    let upstream = MockUpstream::start(|_| MockReply::json(200, USAGE_BODY)).await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    let tiny = [
        ("x-agent-run-id", "poor"),
        ("x-agent-budget-usd", "0.000001"),
        ("x-agent-release", "r9"),
    ];

    let response = post_json(proxy.url(CHAT), &tiny, &chat_body()).await;
    assert_eq!(response.status(), 402);
    assert_eq!(response.headers()["x-should-retry"], "false");
    assert_eq!(response.headers()["x-agent-run-cost-usd"], "0.000000000");
    let body: serde_json::Value = serde_json::from_slice(&body_bytes(response).await).unwrap();
    assert_eq!(body["error"]["type"], "budget_exceeded");
    assert_eq!(body["error"]["code"], "run_budget_exceeded");
    assert!(body["error"]["param"].is_null());
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("poor") && message.contains("0.000001"),
        "{message}"
    );

    let response = post_json(
        proxy.url("/anthropic/v1/messages"),
        &tiny,
        r#"{"model":"claude-3-opus-latest","max_tokens":1000}"#,
    )
    .await;
    assert_eq!(response.status(), 402);
    let body: serde_json::Value = serde_json::from_slice(&body_bytes(response).await).unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "budget_exceeded");

    let response = post_json(
        proxy.url("/gemini/v1beta/models/gemini-2.0-flash:generateContent"),
        &tiny,
        "{}",
    )
    .await;
    assert_eq!(response.status(), 402);
    let body: serde_json::Value = serde_json::from_slice(&body_bytes(response).await).unwrap();
    assert_eq!(body["error"]["code"], 402);
    assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED");

    assert_eq!(upstream.hits(), 0);
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_budget_rejections_total",
            &[("release", "r9"), ("scope", "run")]
        ),
        Some(3.0)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn cost_headers_report_the_run_spend() {
    let upstream = MockUpstream::start(|_| MockReply::json(200, USAGE_BODY)).await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    let headers = [
        ("x-agent-run-id", "spender"),
        ("x-agent-budget-usd", "0.01"),
    ];
    let first = post_json(proxy.url(CHAT), &headers, &chat_body()).await;
    // Non-streaming: the spend after this call's own cost.
    assert_eq!(
        first.headers()["x-agent-run-cost-usd"],
        call_cost().to_header_value()
    );
    let remaining = Money::parse_usd("0.01")
        .unwrap()
        .saturating_sub(call_cost());
    assert_eq!(
        first.headers()["x-agent-budget-remaining-usd"],
        remaining.to_header_value()
    );
    let second = post_json(proxy.url(CHAT), &headers, &chat_body()).await;
    assert_eq!(
        second.headers()["x-agent-run-cost-usd"],
        call_cost().saturating_add(call_cost()).to_header_value()
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn run_end_by_header_counts_once_with_its_cost_and_breach() {
    let upstream = MockUpstream::start(|_| MockReply::json(200, USAGE_BODY)).await;
    let config = format!("{}\n[budget]\nmode = \"soft\"\n", config_all_routes());
    let proxy = Proxy::start(&config, &upstream.url()).await;
    // Ceiling below one call's cost: the run breaches its ceiling.
    let ceiling = Money::from_picos(call_cost().picos() / 2).to_string();
    let base = [
        ("x-agent-run-id", "r-1"),
        ("x-agent-release", "rel-a"),
        ("x-agent-budget-usd", ceiling.as_str()),
    ];
    assert_eq!(
        post_json(proxy.url(CHAT), &base, &chat_body())
            .await
            .status(),
        200
    );
    let mut last = base.to_vec();
    last.push(("x-agent-run-status", "completed"));
    // Soft mode: spent already passed the ceiling, so this is refused; a
    // refused call does not end the run.
    assert_eq!(
        post_json(proxy.url(CHAT), &last, &chat_body())
            .await
            .status(),
        402
    );
    assert!(proxy.state.budgets.run_snapshot("r-1").is_some());
    // Finishing through the API ends it, once.
    let finish = |status: &'static str| {
        let url = format!("http://{}/api/runs/r-1/finish", proxy.admin);
        async move {
            post_json(url, &[], &format!(r#"{{"status":"{status}"}}"#))
                .await
                .status()
                .as_u16()
        }
    };
    assert_eq!(finish("ok").await, 200);
    assert_eq!(
        finish("ok").await,
        404,
        "a finished run cannot finish twice"
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_run_total",
            &[
                ("status", "ok"),
                ("stop_reason", "budget_exceeded"),
                ("release", "rel-a")
            ]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "agent_budget_breach_total",
            &[("release", "rel-a")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "agent_run_cost_usd_count",
            &[("release", "rel-a")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, "agent_run_cost_usd_sum", &[("release", "rel-a")]),
        Some(call_cost().as_usd_f64())
    );

    // A run ended by its last call's header, after that call settles.
    let end = [
        ("x-agent-run-id", "r-2"),
        ("x-agent-release", "rel-b"),
        ("x-agent-run-status", "error"),
        ("x-agent-stop-reason", "tool_error"),
    ];
    assert_eq!(
        post_json(proxy.url(CHAT), &end, &chat_body())
            .await
            .status(),
        200
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_run_total",
            &[
                ("status", "error"),
                ("stop_reason", "tool_error"),
                ("release", "rel-b")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, "agent_run_cost_usd_sum", &[("release", "rel-b")]),
        Some(call_cost().as_usd_f64())
    );
    assert_eq!(
        metric_value(
            &metrics,
            "agent_budget_breach_total",
            &[("release", "rel-b")]
        ),
        None
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn idle_runs_end_once_after_the_timeout() {
    let upstream = MockUpstream::start(|_| MockReply::json(200, USAGE_BODY)).await;
    let config = format!("{}\n[runs]\nidle_timeout_secs = 60\n", config_all_routes());
    let proxy = Proxy::start(&config, &upstream.url()).await;
    assert_eq!(
        post_json(
            proxy.url(CHAT),
            &[("x-agent-run-id", "idle-1"), ("x-agent-release", "rel-i")],
            &chat_body()
        )
        .await
        .status(),
        200
    );
    proxy.clock.advance(59_000);
    assert_eq!(proxy.state.budgets.sweep_idle(), 0);
    assert_eq!(proxy.state.budgets.totals().runs_ended, 0);
    proxy.clock.advance(2_000);
    // The proxy's own sweeper (every 15 s of real time) may get there
    // first on a slow machine; either way the run ends exactly once.
    assert!(proxy.state.budgets.sweep_idle() <= 1);
    assert_eq!(proxy.state.budgets.sweep_idle(), 0);
    assert_eq!(proxy.state.budgets.totals().runs_ended, 1);
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_run_total",
            &[
                ("status", "ok"),
                ("stop_reason", "idle_timeout"),
                ("release", "rel-i")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "agent_run_cost_usd_count",
            &[("release", "rel-i")]
        ),
        Some(1.0)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn window_caps_refuse_then_allow_after_the_period_rolls_over() {
    let upstream = MockUpstream::start(|_| MockReply::json(200, USAGE_BODY)).await;
    let limit = Money::from_picos(call_cost().picos() * 2).to_string();
    let config = format!(
        "{}\n[[budget.windows]]\nrelease = \"capped\"\nperiod = \"day\"\nlimit_usd = {limit}\n",
        config_all_routes()
    );
    let proxy = Proxy::start(&config, &upstream.url()).await;
    let headers = [("x-agent-release", "capped")];
    assert_eq!(
        post_json(proxy.url(CHAT), &headers, &chat_body())
            .await
            .status(),
        200
    );
    assert_eq!(
        post_json(proxy.url(CHAT), &headers, &chat_body())
            .await
            .status(),
        200
    );
    let refused = post_json(proxy.url(CHAT), &headers, &chat_body()).await;
    assert_eq!(refused.status(), 402);
    let body: serde_json::Value = serde_json::from_slice(&body_bytes(refused).await).unwrap();
    assert_eq!(body["error"]["code"], "window_budget_exceeded");
    // Another release is not capped.
    assert_eq!(
        post_json(
            proxy.url(CHAT),
            &[("x-agent-release", "free")],
            &chat_body()
        )
        .await
        .status(),
        200
    );
    // Next UTC day.
    proxy.clock.advance(24 * 3600 * 1000);
    assert_eq!(
        post_json(proxy.url(CHAT), &headers, &chat_body())
            .await
            .status(),
        200
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_budget_rejections_total",
            &[("release", "capped"), ("scope", "window")]
        ),
        Some(1.0)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn tool_costs_land_exactly_in_the_tool_counter_and_the_run() {
    let upstream = MockUpstream::start(|request| match request.uri.path() {
        "/fixed" => MockReply::json(200, r#"{"results":[]}"#),
        "/header" => {
            MockReply::json(200, r#"{"results":[]}"#).with_header("x-request-cost", "0.0123")
        }
        "/pointer" => MockReply::json(200, r#"{"meta":{"cost_usd":0.0042},"results":[]}"#),
        _ => MockReply::json(500, r#"{"error":"down"}"#),
    })
    .await;
    let config = format!(
        r#"{}
[[routes]]
name = "search"
prefix = "/tools/search"
upstream = "{{upstream}}/fixed"
kind = "tool"
tool = "web_search"
cost_per_call_usd = 0.005

[[routes]]
name = "research"
prefix = "/tools/research"
upstream = "{{upstream}}/header"
kind = "tool"
tool = "deep_research"
cost_header = "x-request-cost"

[[routes]]
name = "scrape"
prefix = "/tools/scrape"
upstream = "{{upstream}}/pointer"
kind = "tool"
tool = "scraper"
cost_json_pointer = "/meta/cost_usd"

[[routes]]
name = "broken"
prefix = "/tools/broken"
upstream = "{{upstream}}/down"
kind = "tool"
tool = "broken"
cost_per_call_usd = 0.1
"#,
        config_all_routes()
    );
    let proxy = Proxy::start(&config, &upstream.url()).await;
    let headers = [("x-agent-run-id", "tooling"), ("x-agent-release", "t1")];
    for path in [
        "/tools/search",
        "/tools/search",
        "/tools/research",
        "/tools/scrape",
        "/tools/broken",
    ] {
        let _ = body_bytes(post_json(proxy.url(path), &headers, "{}").await).await;
    }
    let metrics = proxy.metrics().await;
    let tool = |name: &str| {
        metric_value(
            &metrics,
            "agent_tool_cost_usd_total",
            &[("tool", name), ("release", "t1")],
        )
    };
    assert_eq!(tool("web_search"), Some(0.01));
    assert_eq!(tool("deep_research"), Some(0.0123));
    assert_eq!(tool("scraper"), Some(0.0042));
    assert_eq!(
        tool("broken"),
        Some(0.0),
        "a failed tool call is not charged unless configured"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "agent_tool_calls_total",
            &[("tool", "broken"), ("status", "500")]
        ),
        Some(1.0)
    );
    let run = proxy.state.budgets.run_snapshot("tooling").unwrap();
    assert_eq!(run.tool_cost, Money::parse_usd("0.0265").unwrap());
    assert_eq!(run.spent, Money::parse_usd("0.0265").unwrap());
    proxy.shutdown().await;
}

#[tokio::test]
async fn clamp_guard_lowers_the_output_limit_instead_of_refusing() {
    let upstream = MockUpstream::start(|_| MockReply::json(200, USAGE_BODY)).await;
    let config = format!(
        "{}\n[budget]\nclamp_max_tokens = true\n",
        config_all_routes()
    );
    let proxy = Proxy::start(&config, &upstream.url()).await;
    // $2/M input, $6/M output: 25 prompt tokens cost $0.00005; a $0.00035
    // ceiling leaves $0.0003, which pays for 50 output tokens, not 100.
    let headers = [
        ("x-agent-run-id", "tight"),
        ("x-agent-budget-usd", "0.00035"),
    ];
    let response = post_json(proxy.url(CHAT), &headers, &chat_body()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-agent-max-tokens-clamped"], "50");
    let sent: serde_json::Value = serde_json::from_slice(&upstream.last().body).unwrap();
    assert_eq!(sent["max_tokens"], 50);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_guard_ends_an_over_budget_stream_cleanly() {
    let (senders_tx, mut senders_rx) = mpsc::unbounded_channel();
    let upstream = MockUpstream::start(move |_| {
        let (tx, rx) = mpsc::channel(4);
        senders_tx.send(tx).unwrap();
        MockReply {
            status: http::StatusCode::OK,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            body: MockBody::Channel(rx),
        }
    })
    .await;
    let config = format!(
        "{}\n[budget]\nstop_streams_over_budget = true\n",
        config_all_routes()
    );
    let proxy = Proxy::start(&config, &upstream.url()).await;
    let request = post_json(
        proxy.url(CHAT),
        &[
            ("x-agent-run-id", "chatty"),
            ("x-agent-budget-usd", "0.001"),
        ],
        r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":10,"stream_options":{"include_usage":true}}"#,
    );
    let feeder = tokio::spawn(async move {
        let tx: mpsc::Sender<Result<Bytes, std::io::Error>> = senders_rx.recv().await.unwrap();
        // 200 events of 40 characters (~10 tokens, $0.00006 at $6/M each):
        // far more than $0.001 pays for.
        let event = format!(
            "data: {{\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "x".repeat(40)
        );
        for _ in 0..200 {
            if tx.send(Ok(Bytes::from(event.clone()))).await.is_err() {
                break;
            }
        }
        // The mock keeps its stream open: only tollgate dropping the call
        // upstream closes it.
        tokio::time::timeout(std::time::Duration::from_secs(10), tx.closed())
            .await
            .is_ok()
    });
    let response = request.await;
    assert_eq!(response.status(), 200);
    let body = body_bytes(response).await;
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "a well-formed end of stream"
    );
    let events = text.matches("chat.completion.chunk").count();
    assert!(
        events < 200,
        "the stream was stopped early ({events} events)"
    );
    assert!(feeder.await.unwrap(), "the upstream call was cancelled");
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(&metrics, "agent_budget_stream_stops_total", &[]),
        Some(1.0)
    );
    let run = proxy.state.budgets.run_snapshot("chatty").unwrap();
    assert!(
        run.spent >= Money::parse_usd("0.001").unwrap(),
        "charged what streamed: {}",
        run.spent
    );
    eprintln!(
        "stream guard: {events} of 200 events forwarded, run charged ${}",
        run.spent
    );
    proxy.shutdown().await;
}
