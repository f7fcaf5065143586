//! Config and price reloads: a good file takes effect without a restart, a
//! bad one is refused and the running config stays.

use bytes::Bytes;
use tollgate::config::Config;
use tollgate::{Listeners, Tollgate};

use crate::support::*;

fn config_text(upstream: &str, prices: &str) -> String {
    let ledger = std::path::Path::new(prices).with_file_name("ledger.db");
    format!(
        r#"
[ledger]
path = "{}"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[pricing]
files = ["{prices}"]
[[routes]]
name = "openai"
prefix = "/openai"
upstream = "{upstream}"
kind = "openai"
"#,
        ledger.display()
    )
}

/// A tollgate started from the config file at `path` (so it can reload).
struct FromFile {
    state: std::sync::Arc<tollgate::state::AppState>,
    agent: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl FromFile {
    async fn start(path: &std::path::Path) -> FromFile {
        let config = Config::load(path).unwrap();
        let tollgate = Tollgate::new(config, Some(path.to_path_buf())).unwrap();
        let state = tollgate.state().clone();
        let agent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (agent_addr, admin_addr) = (agent.local_addr().unwrap(), admin.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tollgate.run(Listeners { agent, admin }, async {
            let _ = stopped.await;
        }));
        FromFile {
            state,
            agent: agent_addr,
            admin: admin_addr,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

#[tokio::test]
async fn reload_swaps_prices_and_keeps_the_old_config_when_the_new_one_is_bad() {
    let upstream = MockUpstream::start(|_| {
        MockReply::json(200, fixture("openai/chat-completions.nonstream.json"))
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.toml");
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(
        &prices,
        "[models.\"gpt-4.1-nano-2025-04-14\"]\ninput = 1\noutput = 1\n",
    )
    .unwrap();
    std::fs::write(
        &config_path,
        config_text(&upstream.url(), prices.to_str().unwrap()),
    )
    .unwrap();

    let tollgate = FromFile::start(&config_path).await;
    let (state, agent_addr, admin_addr) = (tollgate.state.clone(), tollgate.agent, tollgate.admin);
    let call = || {
        post_json(
            format!("http://{agent_addr}/openai/v1/chat/completions"),
            &[("x-agent-release", "reload")],
            r#"{"model":"gpt-4.1-nano"}"#,
        )
    };
    let cost = || async {
        let text = String::from_utf8(
            body_bytes(
                send(
                    http::Request::get(format!("http://{admin_addr}/metrics"))
                        .body(Bytes::new())
                        .unwrap(),
                )
                .await,
            )
            .await
            .to_vec(),
        )
        .unwrap();
        metric_value(&text, "agent_llm_cost_usd_total", &[("release", "reload")]).unwrap()
    };

    // 16 prompt + 363 completion tokens at $1/M each.
    let _ = body_bytes(call().await).await;
    assert_eq!(cost().await, 0.000379);

    // A broken price file: the reload is refused and the old prices stay.
    std::fs::write(
        &prices,
        "[models.\"gpt-4.1-nano-2025-04-14\"]\ninput = -1\n",
    )
    .unwrap();
    let response = send(
        http::Request::post(format!("http://{admin_addr}/api/reload"))
            .body(Bytes::new())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), 422);
    let body: serde_json::Value = serde_json::from_slice(&body_bytes(response).await).unwrap();
    assert!(body["error"].as_str().unwrap().contains("input"), "{body}");
    let _ = body_bytes(call().await).await;
    assert_eq!(cost().await, 0.000758);

    // A broken config file: refused too.
    std::fs::write(&config_path, "[server]\nlisten = 5\n").unwrap();
    assert!(state.reload().is_err());

    // Good files again, with new prices: applied without a restart.
    std::fs::write(
        &prices,
        "[models.\"gpt-4.1-nano-2025-04-14\"]\ninput = 2\noutput = 2\n",
    )
    .unwrap();
    std::fs::write(
        &config_path,
        config_text(&upstream.url(), prices.to_str().unwrap()),
    )
    .unwrap();
    assert!(state.reload().is_ok());
    let _ = body_bytes(call().await).await;
    assert_eq!(cost().await, 0.000758 + 0.000758);
    tollgate.stop().await;
}

#[tokio::test]
async fn unknown_models_are_refused_when_configured() {
    let upstream = MockUpstream::start(|_| MockReply::json(200, "{}")).await;
    let config =
        config_all_routes().replace("[pricing]\n", "[pricing]\nunknown_model = \"reject\"\n");
    let proxy = Proxy::start(&config, &upstream.url()).await;
    let response = post_json(
        proxy.url("/openai/v1/chat/completions"),
        &[],
        r#"{"model":"mystery-model-9"}"#,
    )
    .await;
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = serde_json::from_slice(&body_bytes(response).await).unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("mystery-model-9"));
    assert_eq!(upstream.hits(), 0);
    // A priced model still goes through.
    let response = post_json(
        proxy.url("/openai/v1/chat/completions"),
        &[],
        r#"{"model":"gpt-4o-mini"}"#,
    )
    .await;
    assert_eq!(response.status(), 200);
    proxy.shutdown().await;
}

#[tokio::test]
async fn unknown_models_are_charged_zero_and_counted_by_default() {
    let upstream = MockUpstream::start(|_| {
        MockReply::json(200, r#"{"model":"mystery-model-9","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#)
    })
    .await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    let response = post_json(
        proxy.url("/openai/v1/chat/completions"),
        &[],
        r#"{"model":"mystery-model-9"}"#,
    )
    .await;
    assert_eq!(response.status(), 200);
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_unpriced_calls_total",
            &[("model", "mystery-model-9")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "agent_token_usage_total",
            &[("model", "mystery-model-9"), ("token_type", "completion")]
        ),
        Some(7.0),
        "tokens still count"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "agent_llm_cost_usd_total",
            &[("model", "mystery-model-9")]
        ),
        Some(0.0)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn http2_clients_are_served() {
    let upstream = MockUpstream::start(|_| {
        MockReply::json(200, fixture("openai/chat-completions.nonstream.json"))
    })
    .await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<Bytes>>();
    let request = http::Request::post(proxy.url("/openai/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(
            r#"{"model":"gpt-4.1-nano"}"#,
        )))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(
        body_bytes(response).await,
        fixture("openai/chat-completions.nonstream.json")
    );
    proxy.shutdown().await;
}

/// Sends a request with 20 extra headers on a new connection; its status.
async fn status_with_twenty_headers(agent: std::net::SocketAddr) -> u16 {
    let mut head = String::from(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 2\r\n",
    );
    for i in 0..20 {
        head.push_str(&format!("x-h{i}: {i}\r\n"));
    }
    head.push_str("\r\n{}");
    raw::status_of(&raw::exchange(agent, head.as_bytes()).await)
}

#[tokio::test]
async fn reloaded_connection_limits_apply_to_new_connections() {
    let upstream = MockUpstream::start(|_| {
        MockReply::json(200, fixture("openai/chat-completions.nonstream.json"))
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.toml");
    std::fs::write(&prices, "").unwrap();
    let config_path = dir.path().join("tollgate.toml");
    let base = config_text(&upstream.url(), prices.to_str().unwrap());
    std::fs::write(
        &config_path,
        format!("{base}\n[limits]\nmax_headers = 100\n"),
    )
    .unwrap();

    let tollgate = FromFile::start(&config_path).await;

    assert_eq!(status_with_twenty_headers(tollgate.agent).await, 200);
    // The header count is a connection builder's setting: a reload that
    // lowers it applies to the next connection.
    std::fs::write(
        &config_path,
        format!("{base}\n[limits]\nmax_headers = 10\n"),
    )
    .unwrap();
    assert!(tollgate.state.reload().is_ok());
    assert_eq!(status_with_twenty_headers(tollgate.agent).await, 431);
    assert_eq!(upstream.hits(), 1);
    tollgate.stop().await;
}

#[tokio::test]
async fn a_reload_applies_runs_and_names_what_needs_a_restart() {
    let upstream = MockUpstream::start(|_| MockReply::json(200, "{}")).await;
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.toml");
    std::fs::write(&prices, "").unwrap();
    let config_path = dir.path().join("tollgate.toml");
    let base = config_text(&upstream.url(), prices.to_str().unwrap());
    std::fs::write(&config_path, &base).unwrap();
    let tollgate = FromFile::start(&config_path).await;
    let reload = || async {
        let response = send(
            http::Request::post(format!("http://{}/api/reload", tollgate.admin))
                .body(Bytes::new())
                .unwrap(),
        )
        .await;
        assert_eq!(response.status(), 200);
        serde_json::from_slice::<serde_json::Value>(&body_bytes(response).await).unwrap()
    };

    // Nothing changed: nothing to restart for.
    assert_eq!(
        reload().await,
        serde_json::json!({"reloaded": true, "needs_restart": []})
    );
    assert_eq!(tollgate.state.budgets.runs_config().idle_timeout_secs, 300);

    // `[runs]` applies at once; the worker threads, the ledger, the label
    // cap and the upstream connectors (egress proxy) are built at start,
    // and the answer says so.
    let ledger_section = base.find("[ledger]").unwrap();
    let changed = format!(
        "{}retention_days = 7\n{}\n[runs]\nidle_timeout_secs = 60\nmax_body_hashes_per_run = 0\n[metrics]\nmax_label_values = 50\n[egress]\nproxy = \"http://127.0.0.1:9\"\n",
        &base[..ledger_section + "[ledger]\n".len()],
        &base[ledger_section + "[ledger]\n".len()..],
    )
    .replace(
        "[admin]",
        &format!("workers = {}\n[admin]", tollgate.state.workers() + 1),
    );
    std::fs::write(&config_path, changed).unwrap();
    assert_eq!(
        reload().await,
        serde_json::json!({"reloaded": true, "needs_restart": ["server.workers", "ledger", "metrics.max_label_values", "egress"]})
    );
    let runs = tollgate.state.budgets.runs_config();
    assert_eq!(
        (runs.idle_timeout_secs, runs.max_body_hashes_per_run),
        (60, 0)
    );
    // Compared with what runs, not with the last reload: still named.
    assert_eq!(
        reload().await["needs_restart"],
        serde_json::json!([
            "server.workers",
            "ledger",
            "metrics.max_label_values",
            "egress"
        ])
    );
    // The file as started again: nothing left to restart for.
    std::fs::write(&config_path, &base).unwrap();
    assert_eq!(reload().await["needs_restart"], serde_json::json!([]));
    tollgate.stop().await;
}
