//! End to end with the official `openai` and `anthropic` Python SDKs: base
//! URL pointed at tollgate, streamed and not, budget refusals, SDK retries.
//!
//! The SDKs come from PyPI. `.ci/run` installs them and sets
//! `TOLLGATE_PYTHON`; elsewhere the test looks for them in `python3` and, if
//! they are missing, says it skipped (in CI, where `CI` is set, a missing SDK
//! is a failure).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::support::*;

fn python() -> Option<String> {
    let candidate = std::env::var("TOLLGATE_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&candidate)
        .args(["-c", "import openai, anthropic"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(candidate);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must have the openai and anthropic Python SDKs (set TOLLGATE_PYTHON)"
    );
    eprintln!("SKIPPED: the openai/anthropic Python SDKs are not installed (pip install openai anthropic, or set TOLLGATE_PYTHON)");
    None
}

async fn run_client(python: &str, scenario: &str, base: &str) -> serde_json::Value {
    let script = format!("{}/tests/sdk/sdk_client.py", env!("CARGO_MANIFEST_DIR"));
    let output = tokio::process::Command::new(python)
        .args([script.as_str(), scenario, base])
        .output()
        .await
        .expect("python runs");
    assert!(
        output.status.success(),
        "{scenario} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the script prints JSON")
}

/// A mock serving recorded OpenAI and Anthropic responses by path and stream flag.
async fn provider_mock() -> MockUpstream {
    MockUpstream::start(|request| {
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let stream = body["stream"].as_bool().unwrap_or(false);
        match (request.uri.path(), stream) {
            ("/v1/chat/completions", false) => {
                MockReply::json(200, fixture("openai/chat-completions.nonstream.json"))
            }
            ("/v1/chat/completions", true) => {
                MockReply::sse(fixture("openai/chat-completions.stream-include-usage.sse"))
            }
            ("/v1/messages", false) => {
                MockReply::json(200, fixture("anthropic/messages.nonstream.json"))
            }
            ("/v1/messages", true) => {
                MockReply::sse(fixture("anthropic/messages.stream.basic.sse"))
            }
            _ => MockReply::json(
                404,
                r#"{"error":{"message":"unknown path","type":"invalid_request_error"}}"#,
            ),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_streams_and_non_streams() {
    let Some(python) = python() else { return };
    let upstream = provider_mock().await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    let seen = run_client(&python, "openai_chat", &proxy.url("")).await;
    assert_eq!(seen["prompt_tokens"], 16);
    assert_eq!(
        seen["stream_empty_choice_chunks"], 0,
        "the usage chunk tollgate asked for is removed again: {seen}"
    );
    assert!(!seen["stream_text"].as_str().unwrap().is_empty());
    let sent: serde_json::Value = serde_json::from_slice(&upstream.last().body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_token_usage_total",
            &[("model", "gpt-4o-2024-08-06"), ("token_type", "completion")]
        ),
        Some(30.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "agent_token_usage_total",
            &[
                ("model", "gpt-4.1-nano-2025-04-14"),
                ("token_type", "prompt")
            ]
        ),
        Some(16.0)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_sdk_streams_and_non_streams() {
    let Some(python) = python() else { return };
    let upstream = provider_mock().await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    let seen = run_client(&python, "anthropic_messages", &proxy.url("")).await;
    assert_eq!(seen["input_tokens"], 12);
    assert_eq!(seen["stream_output_tokens"], 6);
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_token_usage_total",
            &[
                ("model", "claude-3-opus-latest"),
                ("token_type", "completion")
            ]
        ),
        Some(6.0)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdks_raise_on_402_and_do_not_retry() {
    let Some(python) = python() else { return };
    let upstream = provider_mock().await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    let seen = run_client(&python, "budget_refusal", &proxy.url("")).await;
    assert_eq!(seen["openai"]["status"], 402, "{seen}");
    assert_eq!(seen["anthropic"]["status"], 402, "{seen}");
    assert_eq!(
        upstream.hits(),
        0,
        "a refused call never reaches the upstream, and no SDK retried"
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_budget_rejections_total",
            &[("scope", "run")]
        ),
        Some(2.0)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_retries_are_recognised() {
    let Some(python) = python() else { return };
    let calls = Arc::new(AtomicUsize::new(0));
    let upstream = MockUpstream::start(move |_| {
        if calls.fetch_add(1, Ordering::SeqCst) == 0 {
            MockReply::json(500, r#"{"error":{"message":"try again","type":"server_error","param":null,"code":null}}"#)
        } else {
            MockReply::json(200, fixture("openai/chat-completions.nonstream.json"))
        }
    })
    .await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    let seen = run_client(&python, "retry", &proxy.url("")).await;
    assert_eq!(seen["prompt_tokens"], 16);
    assert_eq!(upstream.hits(), 2);
    assert_eq!(
        upstream.received.lock().unwrap()[1].headers["x-stainless-retry-count"],
        "1"
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_retries_total",
            &[("release", "sdk-retry"), ("kind", "sdk_retry")]
        ),
        Some(1.0)
    );
    proxy.shutdown().await;
}
