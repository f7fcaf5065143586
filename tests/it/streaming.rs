//! Streams: forwarded as they arrive, usage injected and stripped again,
//! and every way a stream can end is metered.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use crate::support::*;

const EVENT_1: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n";
const EVENT_2: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}]}\n\n";
const USAGE_EVENT: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n";
const DONE: &str = "data: [DONE]\n\n";

/// A mock whose SSE body the test feeds; returns the sender.
async fn channel_upstream() -> (
    MockUpstream,
    mpsc::Receiver<mpsc::Sender<Result<Bytes, std::io::Error>>>,
) {
    channel_upstream_of("text/event-stream").await
}

/// [`channel_upstream`] with the body announced as `content_type`.
async fn channel_upstream_of(
    content_type: &'static str,
) -> (
    MockUpstream,
    mpsc::Receiver<mpsc::Sender<Result<Bytes, std::io::Error>>>,
) {
    let (senders_tx, senders_rx) = mpsc::channel(4);
    let upstream = MockUpstream::start(move |_| {
        let (tx, rx) = mpsc::channel(16);
        senders_tx.try_send(tx).expect("test takes the sender");
        MockReply {
            status: http::StatusCode::OK,
            headers: vec![("content-type".into(), content_type.into())],
            body: MockBody::Channel(rx),
        }
    })
    .await;
    (upstream, senders_rx)
}

async fn next_data(body: &mut hyper::body::Incoming) -> Option<Result<Bytes, hyper::Error>> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("a frame arrives (a hang here means the stream was buffered)")?;
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    return Some(Ok(data));
                }
            }
            Err(e) => return Some(Err(e)),
        }
    }
}

/// Opens a stream through tollgate to the channel upstream, sends its first
/// event and checks the client receives it; returns the client body and the
/// upstream's sender.
async fn first_event(
    proxy: &Proxy,
    senders: &mut mpsc::Receiver<mpsc::Sender<Result<Bytes, std::io::Error>>>,
    headers: &[(&str, &str)],
    body: &str,
) -> (
    hyper::body::Incoming,
    mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let request = post_json(proxy.url("/openai/v1/chat/completions"), headers, body);
    let (response, tx) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(10), request),
        async {
            let tx = senders.recv().await.unwrap();
            tx.send(Ok(Bytes::from(EVENT_1))).await.unwrap();
            tx
        }
    );
    let response =
        response.expect("the response head arrives (a hang here means the reply was held whole)");
    let mut body = response.into_body();
    assert_eq!(next_data(&mut body).await.unwrap().unwrap(), EVENT_1);
    (body, tx)
}

#[tokio::test]
async fn each_event_reaches_the_client_before_the_next_is_sent() {
    let (upstream, mut senders) = channel_upstream().await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    // The mock sends one event and waits: the client must see it.
    let (mut body, tx) = first_event(
        &proxy,
        &mut senders,
        &[],
        r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true}}"#,
    )
    .await;
    tx.send(Ok(Bytes::from(EVENT_2))).await.unwrap();
    assert_eq!(next_data(&mut body).await.unwrap().unwrap(), EVENT_2);
    tx.send(Ok(Bytes::from(USAGE_EVENT))).await.unwrap();
    tx.send(Ok(Bytes::from(DONE))).await.unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, format!("{USAGE_EVENT}{DONE}"));
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_token_usage_total",
            &[("model", "gpt-4o-mini"), ("token_type", "completion")]
        ),
        Some(2.0)
    );
    proxy.shutdown().await;
}

/// The reply's media type alone tells a stream, whatever the request asked
/// and however the type is spelled: events announced as `Text/Event-Stream`
/// or records as `application/json-lines` are forwarded as they arrive,
/// not held for cost headers.
#[tokio::test]
async fn a_reply_announced_as_a_stream_is_forwarded_as_it_arrives() {
    for content_type in ["Text/Event-Stream", "application/json-lines"] {
        let (upstream, mut senders) = channel_upstream_of(content_type).await;
        let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
        // No `"stream": true`: only the reply says it streams.
        let (mut body, tx) =
            first_event(&proxy, &mut senders, &[], r#"{"model":"gpt-4o-mini"}"#).await;
        tx.send(Ok(Bytes::from(EVENT_2))).await.unwrap();
        assert_eq!(
            next_data(&mut body).await.unwrap().unwrap(),
            EVENT_2,
            "{content_type}"
        );
        drop(tx);
        assert!(body.collect().await.unwrap().to_bytes().is_empty());
        proxy.shutdown().await;
    }
}

#[tokio::test]
async fn usage_is_requested_and_the_extra_chunk_removed() {
    let stream = format!("{EVENT_1}{EVENT_2}{USAGE_EVENT}{DONE}");
    let upstream = MockUpstream::start(move |_| MockReply::sse(stream.clone())).await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    let response = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("accept-encoding", "gzip")],
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#,
    )
    .await;
    let body = body_bytes(response).await;
    assert_eq!(
        body,
        format!("{EVENT_1}{EVENT_2}{DONE}"),
        "the client gets exactly the stream it asked for"
    );
    let sent: serde_json::Value = serde_json::from_slice(&upstream.last().body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(upstream.last().headers["accept-encoding"], "identity");
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_token_usage_total",
            &[("model", "gpt-4o-mini"), ("token_type", "prompt")]
        ),
        Some(9.0)
    );
    assert_eq!(
        metric_value(&metrics, "agent_usage_estimated_total", &[]),
        None
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn upstream_reset_mid_stream_ends_the_client_stream_and_charges_an_estimate() {
    let (upstream, mut senders) = channel_upstream().await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    // The mock sends one event and waits: the client must see it.
    let (body, tx) = first_event(&proxy, &mut senders, &[("x-agent-release", "cut")], r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"a long question"}]}"#).await;
    tx.send(Err(std::io::Error::other("reset"))).await.unwrap();
    // The client sees the stream end abnormally, not a clean end.
    let end = body.collect().await;
    assert!(
        end.is_err(),
        "a cut upstream must not look like a complete stream"
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_usage_estimated_total",
            &[("provider", "openai")]
        ),
        Some(1.0)
    );
    let cost = metric_value(&metrics, "agent_llm_cost_usd_total", &[("release", "cut")]).unwrap();
    assert!(cost > 0.0, "an estimate, never a silent zero");
    proxy.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_cancels_upstream_and_meters_the_call() {
    let (upstream, mut senders) = channel_upstream().await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    // The mock sends one event and waits: the client must see it.
    let (body, tx) = first_event(
        &proxy,
        &mut senders,
        &[("x-agent-release", "gone")],
        r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true}}"#,
    )
    .await;
    drop(body);
    // tollgate drops its upstream body when the client leaves: the mock's
    // stream is dropped, which closes this channel.
    tokio::time::timeout(Duration::from_secs(10), tx.closed())
        .await
        .expect("upstream request cancelled");
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_calls_total",
            &[("route", "openai"), ("status", "200")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "agent_usage_estimated_total",
            &[("provider", "openai")]
        ),
        Some(1.0)
    );
    assert!(
        metric_value(&metrics, "agent_llm_cost_usd_total", &[("release", "gone")]).unwrap() > 0.0
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_stalled_stream_is_ended_by_the_idle_timeout() {
    let (upstream, mut senders) = channel_upstream().await;
    let config = format!(
        "{}\n[limits]\nstream_idle_timeout_ms = 300\n",
        config_all_routes()
    );
    let proxy = Proxy::start(&config, &upstream.url()).await;
    // The mock sends one event and waits: the client must see it.
    let (body, tx) = first_event(
        &proxy,
        &mut senders,
        &[],
        r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true}}"#,
    )
    .await;
    // The mock now stays silent with the stream open.
    assert!(body.collect().await.is_err());
    tokio::time::timeout(Duration::from_secs(10), tx.closed())
        .await
        .expect("upstream released");
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_usage_estimated_total",
            &[("provider", "openai")]
        ),
        Some(1.0)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn malformed_json_is_passed_through_and_estimated() {
    let upstream = MockUpstream::start(|_| {
        MockReply::json(200, "{\"id\": \"x\", \"usage\": {\"prompt_tokens\": oops")
    })
    .await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    let response = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("x-agent-release", "bad")],
        r#"{"model":"gpt-4o-mini"}"#,
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        body_bytes(response).await,
        "{\"id\": \"x\", \"usage\": {\"prompt_tokens\": oops"
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_usage_estimated_total",
            &[("provider", "openai")]
        ),
        Some(1.0)
    );
    assert!(
        metric_value(&metrics, "agent_llm_cost_usd_total", &[("release", "bad")]).unwrap() > 0.0
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn gzip_responses_reach_the_client_compressed_and_are_metered() {
    use std::io::Write;
    let plain = fixture("anthropic/messages.stream.basic.sse");
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&plain).unwrap();
    let compressed = Bytes::from(encoder.finish().unwrap());
    let reply = compressed.clone();
    let upstream = MockUpstream::start(move |_| {
        MockReply::sse(reply.clone()).with_header("content-encoding", "gzip")
    })
    .await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    let response = post_json(
        &proxy.url("/anthropic/v1/messages"),
        &[("accept-encoding", "gzip")],
        r#"{"model":"claude-3-opus-latest","stream":true,"max_tokens":100}"#,
    )
    .await;
    assert_eq!(response.headers()["content-encoding"], "gzip");
    assert_eq!(body_bytes(response).await, compressed);
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
