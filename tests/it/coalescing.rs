//! Upstream chunks that reach tollgate together leave it together, and the
//! bytes are unchanged.

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use crate::support::*;

/// SSE events, each with its blank line.
fn events(stream: &[u8]) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut rest = stream;
    while let Some(i) = rest.windows(2).position(|w| w == b"\n\n") {
        out.push(Bytes::copy_from_slice(&rest[..i + 2]));
        rest = &rest[i + 2..];
    }
    if !rest.is_empty() {
        out.push(Bytes::copy_from_slice(rest));
    }
    out
}

/// All 38 events of a captured stream are queued at the upstream before its
/// response starts, so they reach tollgate in a burst: the client gets every
/// byte, in far fewer body frames than events (forwarding each event alone
/// would make one frame, and one socket write, per event).
#[tokio::test]
async fn events_that_arrive_together_are_forwarded_together() {
    let stream = fixture("openai/chat-completions.stream-include-usage.sse");
    let queued = events(&stream);
    let event_count = queued.len();
    assert!(event_count >= 30, "the capture has {event_count} events");
    let upstream = MockUpstream::start(move |_| {
        let (tx, rx) = mpsc::channel(queued.len());
        for event in &queued {
            tx.try_send(Ok(event.clone()))
                .expect("room for every event");
        }
        MockReply {
            status: http::StatusCode::OK,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            body: MockBody::Channel(rx),
        }
    })
    .await;
    let proxy = Proxy::start(&config_all_routes(), &upstream.url()).await;
    let response = post_json(
        proxy.url("/openai/v1/chat/completions"),
        &[("x-agent-run-id", "burst")],
        r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
    )
    .await;
    let mut body = response.into_body();
    let mut received = Vec::new();
    let mut frames = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("the stream ends cleanly").into_data() {
            if !data.is_empty() {
                frames += 1;
                received.extend_from_slice(&data);
            }
        }
    }
    assert_eq!(received, stream, "the client gets the stream unchanged");
    assert!(
        frames * 4 <= event_count,
        "{frames} body frames for {event_count} events that arrived together"
    );
    proxy.shutdown().await;
}
