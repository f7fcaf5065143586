//! tollgate's own answers: bad input is a clear 4xx, a broken upstream a
//! 502/504 in the provider's error shape, upstream errors pass through.

use bytes::Bytes;

use crate::support::*;

#[tokio::test]
async fn unmatched_path_is_404_and_reaches_no_upstream() {
    let upstream = MockUpstream::start(|_| MockReply::json(200, "{}")).await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    let response = post_json(&proxy.url("/elsewhere/v1/chat/completions"), &[], "{}").await;
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["x-tollgate-error"], "no_route");
    let body: serde_json::Value = serde_json::from_slice(&body_bytes(response).await).unwrap();
    assert_eq!(body["error"]["type"], "not_found_error");
    assert_eq!(upstream.hits(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn bad_attribution_is_400_naming_the_header() {
    let upstream = MockUpstream::start(|_| MockReply::json(200, "{}")).await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    for (header, value) in [
        ("x-agent-run-id", "bad id"),
        ("x-agent-release", "x".repeat(65).as_str()),
        ("x-agent-budget-usd", "free"),
        ("x-agent-run-status", "finished"),
    ] {
        let response = post_json(
            &proxy.url("/anthropic/v1/messages"),
            &[(header, value)],
            "{}",
        )
        .await;
        assert_eq!(response.status(), 400, "{header}");
        assert_eq!(response.headers()["x-tollgate-error"], "bad_header");
        let body: serde_json::Value = serde_json::from_slice(&body_bytes(response).await).unwrap();
        assert_eq!(body["type"], "error", "anthropic shape");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(header),
            "{body}"
        );
    }
    assert_eq!(upstream.hits(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn oversized_body_is_413_before_any_upstream_byte() {
    let upstream = MockUpstream::start(|_| MockReply::json(200, "{}")).await;
    let config = format!(
        "{}\n[limits]\nmax_request_body_bytes = 1000\n",
        config_all_routes()
    );
    let proxy = Proxy::start(&config, &upstream.url()).await;
    let response = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[],
        &"x".repeat(5000),
    )
    .await;
    assert_eq!(response.status(), 413);
    assert_eq!(upstream.hits(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn traversal_and_tricks_never_reach_an_upstream() {
    let upstream = MockUpstream::start(|_| MockReply::json(200, "{}")).await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    for path in [
        "/openai/../anthropic/v1/messages",
        "/openai/%2e%2e/x",
        "/openai//v1",
        "/openai/a%2fb",
    ] {
        let response = send(
            http::Request::get(proxy.url(path))
                .body(Bytes::new())
                .unwrap(),
        )
        .await;
        assert_eq!(response.status(), 400, "{path}");
    }
    assert_eq!(upstream.hits(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn upstream_errors_pass_through_untouched() {
    let upstream = MockUpstream::start(|_| {
        MockReply::json(500, r#"{"error":{"message":"boom","type":"server_error"}}"#)
    })
    .await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    let response = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[],
        r#"{"model":"gpt-4o-mini"}"#,
    )
    .await;
    assert_eq!(response.status(), 500);
    assert_eq!(
        body_bytes(response).await,
        r#"{"error":{"message":"boom","type":"server_error"}}"#
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_calls_total",
            &[("route", "openai"), ("status", "500")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, "agent_usage_estimated_total", &[]),
        None,
        "an error without usage costs nothing"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn unreachable_upstream_is_502_in_each_provider_shape() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let proxy = Proxy::start(&config_all_routes(), &dead).await;

    let response = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[],
        r#"{"model":"gpt-4o-mini"}"#,
    )
    .await;
    assert_eq!(response.status(), 502);
    let body: serde_json::Value = serde_json::from_slice(&body_bytes(response).await).unwrap();
    assert!(
        body["error"]["message"].is_string() && body["error"]["type"].is_string(),
        "{body}"
    );

    let response = post_json(&proxy.url("/anthropic/v1/messages"), &[], "{}").await;
    assert_eq!(response.status(), 502);
    let body: serde_json::Value = serde_json::from_slice(&body_bytes(response).await).unwrap();
    assert_eq!(body["type"], "error");

    let response = post_json(
        &proxy.url("/gemini/v1beta/models/gemini-2.0-flash:generateContent"),
        &[],
        "{}",
    )
    .await;
    assert_eq!(response.status(), 502);
    let body: serde_json::Value = serde_json::from_slice(&body_bytes(response).await).unwrap();
    assert_eq!(body["error"]["status"], "UNAVAILABLE");
    proxy.shutdown().await;
}

#[tokio::test]
async fn slow_upstream_headers_are_504() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let config = format!(
        "{}\n[limits]\nupstream_response_timeout_ms = 200\n",
        config_all_routes()
    );
    let proxy = Proxy::start(&config, &url).await;
    let response = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[],
        r#"{"model":"gpt-4o-mini"}"#,
    )
    .await;
    assert_eq!(response.status(), 504);
    proxy.shutdown().await;
    hold.abort();
}
