//! Every captured provider response goes through tollgate: the client gets
//! the body byte-identical and `/metrics` shows the sidecar's tokens and the
//! exact cost.

use crate::support::*;

/// (fixture, route path, request stream flag, content type)
const FIXTURES: &[(&str, &str, bool, &str)] = &[
    (
        "openai/chat-completions.nonstream.json",
        "/openai/v1/chat/completions",
        false,
        "application/json",
    ),
    (
        "openai/chat-completions.nonstream.cache-read.json",
        "/openai/v1/chat/completions",
        false,
        "application/json",
    ),
    (
        "openai/chat-completions.stream-include-usage.sse",
        "/openai/v1/chat/completions",
        true,
        "text/event-stream",
    ),
    (
        "openai/completions.nonstream.json",
        "/openai/v1/completions",
        false,
        "application/json",
    ),
    (
        "openai/completions.stream.sse",
        "/openai/v1/completions",
        true,
        "text/event-stream",
    ),
    (
        "openai/embeddings.json",
        "/openai/v1/embeddings",
        false,
        "application/json",
    ),
    (
        "openai/responses.nonstream.json",
        "/openai/v1/responses",
        false,
        "application/json",
    ),
    (
        "openai/responses.stream.sse",
        "/openai/v1/responses",
        true,
        "text/event-stream",
    ),
    (
        "azure/responses.stream.sse",
        "/openai/openai/v1/responses",
        true,
        "text/event-stream",
    ),
    (
        "deepseek/chat-completions.nonstream.json",
        "/openai/chat/completions",
        false,
        "application/json",
    ),
    (
        "groq/chat-completions.stream.sse",
        "/openai/openai/v1/chat/completions",
        true,
        "text/event-stream",
    ),
    (
        "mistral/chat-completions.stream.sse",
        "/openai/v1/chat/completions",
        true,
        "text/event-stream",
    ),
    (
        "openrouter/chat-completions.stream.sse",
        "/openai/api/v1/chat/completions",
        true,
        "text/event-stream",
    ),
    (
        "ollama/v1-chat-completions.nonstream.json",
        "/openai/v1/chat/completions",
        false,
        "application/json",
    ),
    (
        "ollama/api-chat.stream.ndjson",
        "/openai/api/chat",
        true,
        "application/x-ndjson",
    ),
    (
        "anthropic/messages.nonstream.json",
        "/anthropic/v1/messages",
        false,
        "application/json",
    ),
    (
        "anthropic/messages.nonstream.cache.json",
        "/anthropic/v1/messages",
        false,
        "application/json",
    ),
    (
        "anthropic/messages.stream.basic.sse",
        "/anthropic/v1/messages",
        true,
        "text/event-stream",
    ),
    (
        "anthropic/messages.stream.cache.sse",
        "/anthropic/v1/messages",
        true,
        "text/event-stream",
    ),
    (
        "anthropic/messages.stream.padded.sse",
        "/anthropic/v1/messages",
        true,
        "text/event-stream",
    ),
    (
        "anthropic/messages.stream.midstream-error.sse",
        "/anthropic/v1/messages",
        true,
        "text/event-stream",
    ),
    (
        "gemini/generateContent.json",
        "/gemini/v1beta/models/gemini-2.0-flash:generateContent",
        false,
        "application/json",
    ),
    (
        "gemini/generateContent.implicit-caching.json",
        "/gemini/v1beta/models/gemini-2.5-flash:generateContent",
        false,
        "application/json",
    ),
    (
        "gemini/streamGenerateContent.sse",
        "/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
        true,
        "text/event-stream",
    ),
    (
        "gemini/streamGenerateContent.thinking.sse",
        "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        true,
        "text/event-stream",
    ),
    (
        "openai/error.400-invalid-request.json",
        "/openai/v1/chat/completions",
        false,
        "application/json",
    ),
    (
        "openai/error.429-insufficient-quota.json",
        "/openai/v1/responses",
        false,
        "application/json",
    ),
    (
        "anthropic/error.400-invalid-request.json",
        "/anthropic/v1/messages",
        false,
        "application/json",
    ),
    (
        "gemini/error.429-resource-exhausted.json",
        "/gemini/v1beta/models/gemini-2.0-flash:generateContent",
        false,
        "application/json",
    ),
    (
        "openrouter/error.429.json",
        "/openai/api/v1/chat/completions",
        false,
        "application/json",
    ),
];

/// Per-million prices of a model from the test price table, as pico-dollars
/// per token: (input, output, cached_input, cache_write).
fn prices(model: &str) -> (u64, u64, u64, u64) {
    let text =
        std::fs::read_to_string(format!("{}/{TEST_PRICING}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let entry = table["models"][model]
        .as_table()
        .unwrap_or_else(|| panic!("no test price for {model}"));
    let per_token = |key: &str| -> Option<u64> {
        entry.get(key).map(|v| {
            let usd_per_m = v
                .as_float()
                .or_else(|| v.as_integer().map(|i| i as f64))
                .unwrap();
            // USD per million tokens = pico-dollars per token * 1e-6 / 1e-12.
            (usd_per_m * 1e6).round() as u64
        })
    };
    let input = per_token("input").unwrap();
    (
        input,
        per_token("output").unwrap(),
        per_token("cached_input").unwrap_or(input),
        per_token("cache_write").unwrap_or(input),
    )
}

fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn every_capture_passes_byte_identical_and_is_metered_exactly() {
    for (index, (fixture_path, path, stream, content_type)) in FIXTURES.iter().enumerate() {
        let body = fixture(fixture_path);
        let expected = sidecar(fixture_path);
        let status = expected["http_status"].as_u64().unwrap_or(200) as u16;
        let reply_body = body.clone();
        let content_type = content_type.to_string();
        let upstream = MockUpstream::start(move |_| MockReply {
            status: http::StatusCode::from_u16(status).unwrap(),
            headers: vec![("content-type".into(), content_type.clone())],
            body: MockBody::Full(reply_body.clone()),
        })
        .await;
        let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
        let model = expected["model"].as_str().unwrap_or("none");
        let request = if *stream && path.starts_with("/openai") && !path.contains("responses") {
            format!(
                r#"{{"model":"{model}","stream":true,"stream_options":{{"include_usage":true}}}}"#
            )
        } else {
            format!(r#"{{"model":"{model}","stream":{stream}}}"#)
        };
        let release = format!("fixture-{index}");
        let response =
            post_json(&proxy.url(path), &[("x-agent-release", &release)], &request).await;
        assert_eq!(
            response.status().as_u16(),
            status,
            "{fixture_path}: status passes through"
        );
        let got = body_bytes(response).await;
        assert_eq!(got, body, "{fixture_path}: body is byte-identical");
        assert_eq!(upstream.hits(), 1);

        let metrics = proxy.metrics().await;
        let labels = |token_type: &'static str| {
            [
                ("model", model),
                ("token_type", token_type),
                ("release", release.as_str()),
            ]
        };
        if expected["input_tokens"].is_null() {
            assert_eq!(
                metric_value(
                    &metrics,
                    "agent_token_usage_total",
                    &[("release", release.as_str())]
                ),
                None,
                "{fixture_path}: an error without usage charges no tokens"
            );
            assert_eq!(
                metric_value(
                    &metrics,
                    "agent_llm_cost_usd_total",
                    &[("release", release.as_str())]
                ),
                None
            );
            proxy.shutdown().await;
            continue;
        }
        let (input, output) = (
            num(&expected, "input_tokens"),
            num(&expected, "output_tokens"),
        );
        let (cached, written) = (
            num(&expected, "cached_input_tokens"),
            num(&expected, "cache_write_input_tokens"),
        );
        assert_eq!(
            metric_value(&metrics, "agent_token_usage_total", &labels("prompt")),
            Some(input as f64),
            "{fixture_path}: prompt tokens\n{metrics}"
        );
        if output > 0 {
            assert_eq!(
                metric_value(&metrics, "agent_token_usage_total", &labels("completion")),
                Some(output as f64),
                "{fixture_path}: completion tokens"
            );
        }
        if cached > 0 {
            assert_eq!(
                metric_value(
                    &metrics,
                    "agent_token_usage_total",
                    &labels("cached_prompt")
                ),
                Some(cached as f64)
            );
        }
        let (p_in, p_out, p_cached, p_write) = prices(model);
        let uncached = input - cached - written;
        let picos = uncached * p_in + cached * p_cached + written * p_write + output * p_out;
        let expected_usd = tollgate::money::Money::from_picos(picos).as_usd_f64();
        assert_eq!(
            metric_value(
                &metrics,
                "agent_llm_cost_usd_total",
                &[("model", model), ("release", release.as_str())]
            ),
            Some(expected_usd),
            "{fixture_path}: exact cost"
        );
        assert_eq!(
            metric_value(&metrics, "agent_usage_estimated_total", &[]),
            None,
            "{fixture_path}: reported usage is not an estimate"
        );
        proxy.shutdown().await;
    }
}

#[tokio::test]
async fn request_reaches_upstream_unchanged_less_attribution() {
    let upstream = MockUpstream::start(|_| {
        MockReply::json(200, fixture("openai/chat-completions.nonstream.json"))
    })
    .await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    let body = r#"{"model":"gpt-4.1-nano-2025-04-14","messages":[{"role":"user","content":"hi"}]}"#;
    let response = post_json(
        &proxy.url("/openai/v1/chat/completions?api-version=2024-10-21"),
        &[
            ("authorization", "Bearer sk-test-123"),
            ("x-api-key", "k-456"),
            ("x-agent-run-id", "run-1"),
            ("x-agent-release", "r1"),
            ("x-agent-request-type", "plan"),
            ("x-agent-budget-usd", "5"),
            ("x-agent-run-status", "completed"),
            ("x-agent-stop-reason", "completed"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "drop-me"),
            ("x-custom", "kept"),
        ],
        body,
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-agent-run-cost-usd"));
    assert!(response
        .headers()
        .contains_key("x-agent-budget-remaining-usd"));
    let got = upstream.last();
    assert_eq!(got.method, http::Method::POST);
    assert_eq!(got.uri.path(), "/v1/chat/completions");
    assert_eq!(got.uri.query(), Some("api-version=2024-10-21"));
    assert_eq!(got.body, body.as_bytes());
    assert_eq!(got.headers["authorization"], "Bearer sk-test-123");
    assert_eq!(got.headers["x-api-key"], "k-456");
    assert_eq!(got.headers["x-custom"], "kept");
    assert_eq!(got.headers["host"], upstream.addr.to_string());
    for gone in [
        "x-agent-run-id",
        "x-agent-release",
        "x-agent-request-type",
        "x-agent-budget-usd",
        "x-agent-run-status",
        "x-agent-stop-reason",
        "x-hop",
    ] {
        assert!(
            !got.headers.contains_key(gone),
            "{gone} must not go upstream"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn upstream_base_path_is_kept() {
    let upstream = MockUpstream::start(|_| MockReply::json(200, "{}")).await;
    let config = format!(
        r#"
[pricing]
files = ["{TEST_PRICING}"]
[[routes]]
name = "search"
prefix = "/tools/search"
upstream = "{{upstream}}/v2/search"
kind = "tool"
cost_per_call_usd = 0.005
"#
    );
    let proxy = Proxy::start(&config, &upstream.url()).await;
    let response = send(
        http::Request::get(proxy.url("/tools/search?q=x"))
            .body(bytes::Bytes::new())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last().uri.to_string(), "/v2/search?q=x");
    proxy.shutdown().await;
}

#[tokio::test]
async fn url_form_attribution_routes_and_attributes() {
    let upstream = MockUpstream::start(|_| {
        MockReply::json(200, fixture("openai/chat-completions.nonstream.json"))
    })
    .await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    let response = post_json(
        &proxy.url("/@run=url-run,release=url-rel,type=research/openai/v1/chat/completions"),
        &[],
        r#"{"model":"gpt-4.1-nano-2025-04-14"}"#,
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last().uri.path(), "/v1/chat/completions");
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_token_usage_total",
            &[("release", "url-rel"), ("token_type", "prompt")]
        ),
        Some(16.0)
    );
    assert!(metric_value(
        &metrics,
        "agent_segment_cost_usd_total",
        &[("release", "url-rel"), ("request_type", "research")]
    )
    .is_some());
    proxy.shutdown().await;
}
