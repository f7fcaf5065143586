//! The fault matrix on the agent listener, over raw sockets where a client
//! library would normalise the request: oversized and too many headers,
//! a slowloris head, HTTP/1.0, `Expect: 100-continue`, chunked and sized
//! bodies reaching the upstream byte for byte, CRLF and quote injection in
//! attribution values, absolute-form targets and `CONNECT`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::raw::{exchange, read_to_close, status_of};
use crate::support::*;

/// Upper bound for any single wait in these tests (a guard, not a sync).
const GUARD: Duration = Duration::from_secs(10);

const CHAT_REPLY: &str = r#"{"id":"c1","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12}}"#;

/// Reads one response head (through the blank line).
async fn read_head(socket: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(GUARD, async {
        while !out.ends_with(b"\r\n\r\n") {
            let n = socket.read(&mut byte).await.unwrap();
            assert!(n > 0, "connection closed mid-head: {out:?}");
            out.push(byte[0]);
        }
    })
    .await
    .expect("a response head in bounded time");
    String::from_utf8(out).unwrap()
}

async fn proxy_with(limits: &str) -> (MockUpstream, Proxy) {
    let upstream = MockUpstream::start(|_| MockReply::json(200, CHAT_REPLY)).await;
    let config = format!("{}\n[limits]\n{limits}\n", config_all_routes());
    let proxy = Proxy::start(&config, &upstream.url()).await;
    (upstream, proxy)
}

#[tokio::test]
async fn a_head_over_max_header_bytes_is_431() {
    let (upstream, proxy) = proxy_with("max_header_bytes = 16384").await;
    // Exactly the limit, still without its end: the server reads all of it
    // (so closing sends no reset) and can never complete the head.
    let mut head = b"GET /openai/v1/models HTTP/1.1\r\nHost: t\r\nx-big: ".to_vec();
    head.resize(16384, b'a');
    let response = exchange(proxy.agent, &head).await;
    assert_eq!(status_of(&response), 431, "{response}");
    assert_eq!(upstream.hits(), 0);
    proxy.shutdown().await;
}

/// A whole head written at once, `size` bytes long (padded in one header).
fn complete_head(size: usize) -> Vec<u8> {
    let start = b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\nx-big: ";
    let end = b"\r\n\r\n";
    let mut head = start.to_vec();
    head.resize(size - end.len(), b'a');
    head.extend_from_slice(end);
    head
}

#[tokio::test]
async fn a_complete_head_over_max_header_bytes_is_431_however_it_is_read() {
    // Written in one piece, a head over the (default, 64 KiB) limit reaches
    // the server in reads larger than what hyper's buffer limit checks
    // between them: it is the proxy's own count that refuses it.
    let (upstream, proxy) = proxy_with("max_header_bytes = 65536").await;
    let mut over = complete_head(70_000);
    over.extend_from_slice(b"{}");
    let response = exchange(proxy.agent, &over).await;
    assert_eq!(status_of(&response), 431, "{response}");
    assert_eq!(upstream.hits(), 0);

    let mut at_limit = complete_head(65_536);
    at_limit.extend_from_slice(b"{}");
    let response = exchange(proxy.agent, &at_limit).await;
    assert_eq!(status_of(&response), 200, "{response}");
    assert_eq!(upstream.hits(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn more_headers_than_max_headers_is_431() {
    let (upstream, proxy) = proxy_with("max_headers = 10").await;
    let mut head = String::from("GET /openai/v1/models HTTP/1.1\r\nHost: t\r\n");
    for i in 0..20 {
        head.push_str(&format!("x-h{i}: {i}\r\n"));
    }
    head.push_str("\r\n");
    let response = exchange(proxy.agent, head.as_bytes()).await;
    assert_eq!(status_of(&response), 431, "{response}");
    assert_eq!(upstream.hits(), 0);
    proxy.shutdown().await;
}

/// Sends `first_bytes` (maybe none) and nothing more to a proxy with a
/// 300 ms header read time; returns what came back before the server
/// closed, once it checked the close came with the timeout, not before.
async fn silent_after(first_bytes: &[u8]) -> String {
    let (upstream, proxy) = proxy_with("header_read_timeout_ms = 300").await;
    let mut socket = TcpStream::connect(proxy.agent).await.unwrap();
    let started = Instant::now();
    socket.write_all(first_bytes).await.unwrap();
    // Nothing more is sent: the server must end the connection itself.
    let response = read_to_close(&mut socket).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "closed before the timeout: {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "took {waited:?}");
    assert_eq!(upstream.hits(), 0);
    proxy.shutdown().await;
    response
}

#[tokio::test]
async fn a_slowloris_head_is_cut_after_header_read_timeout() {
    let response =
        silent_after(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: t\r\nx-agent-run").await;
    assert!(
        response.is_empty() || status_of(&response) == 408,
        "{response}"
    );
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_header_read_timeout() {
    let response = silent_after(b"").await;
    assert!(response.is_empty(), "{response}");
}

#[tokio::test]
async fn http_1_0_requests_are_served() {
    let (upstream, proxy) = proxy_with("").await;
    let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    let request = format!(
        "POST /openai/v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let response = exchange(proxy.agent, request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1."), "{response}");
    assert_eq!(status_of(&response), 200, "{response}");
    assert!(response.ends_with(CHAT_REPLY), "{response}");
    assert_eq!(upstream.last().body, body);
    proxy.shutdown().await;
}

#[tokio::test]
async fn expect_100_continue_gets_the_100_then_the_response() {
    let (upstream, proxy) = proxy_with("").await;
    let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    let mut socket = TcpStream::connect(proxy.agent).await.unwrap();
    let head = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let interim = read_head(&mut socket).await;
    assert_eq!(status_of(&interim), 100, "{interim}");
    assert_eq!(upstream.hits(), 0, "no upstream call before the body");
    socket.write_all(body.as_bytes()).await.unwrap();
    let response = read_to_close(&mut socket).await;
    assert_eq!(status_of(&response), 200, "{response}");
    assert!(response.ends_with(CHAT_REPLY), "{response}");
    let received = upstream.last();
    assert_eq!(received.body, body);
    assert!(received.headers.get("expect").is_none());
    proxy.shutdown().await;
}

#[tokio::test]
async fn chunked_and_sized_bodies_reach_the_upstream_byte_identical() {
    let (upstream, proxy) = proxy_with("").await;
    // Odd spacing, escapes and UTF-8 that any re-serialisation would change.
    let body = "{ \"model\" : \"gpt-4o-mini\",\n  \"messages\":[{\"role\":\"user\",\"content\":\"h\u{e9}llo \\u00e9 \\\"q\\\"\"}] ,\"temperature\":1.50 }";

    let mut chunked = String::from(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    );
    let bytes = body.as_bytes();
    for piece in [&bytes[..7], &bytes[7..40], &bytes[40..]] {
        chunked.push_str(&format!("{:x}\r\n", piece.len()));
        chunked.push_str(std::str::from_utf8(piece).unwrap());
        chunked.push_str("\r\n");
    }
    chunked.push_str("0\r\n\r\n");
    let response = exchange(proxy.agent, chunked.as_bytes()).await;
    assert_eq!(status_of(&response), 200, "{response}");
    let received = upstream.last();
    assert_eq!(received.body, Bytes::from(body.to_string()));
    assert!(received.headers.get("transfer-encoding").is_none());

    let sized = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let response = exchange(proxy.agent, sized.as_bytes()).await;
    assert_eq!(status_of(&response), 200, "{response}");
    assert_eq!(upstream.last().body, Bytes::from(body.to_string()));
    assert_eq!(upstream.hits(), 2);
    proxy.shutdown().await;
}

#[tokio::test]
async fn injection_in_attribution_values_is_400() {
    let (upstream, proxy) = proxy_with("").await;
    let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    // CRLF in the URL form of attribution.
    for path in [
        "/@release=a%0d%0ax-evil:1/openai/v1/chat/completions",
        "/@run=r1%0D%0AX-Evil:%201/openai/v1/chat/completions",
        "/@release=a%0ax-evil/openai/v1/chat/completions",
    ] {
        let response = post_json(&proxy.url(path), &[], body).await;
        assert_eq!(response.status(), 400, "{path}");
    }
    // Values a header can carry but the attribution charset refuses.
    for (header, value) in [
        ("x-agent-release", "a b"),
        ("x-agent-release", "a\"b"),
        ("x-agent-run-id", "\"r1\""),
        ("x-agent-request-type", "t; x-evil=1"),
    ] {
        let response = post_json(
            &proxy.url("/openai/v1/chat/completions"),
            &[(header, value)],
            body,
        )
        .await;
        assert_eq!(response.status(), 400, "{header}: {value}");
    }
    // A raw CRLF inside a header value splits it into two header lines;
    // the injected line is never an attribution value upstream.
    let raw = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: t\r\nx-agent-release: a\r\nx-agent-run-id: r 1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let response = exchange(proxy.agent, raw.as_bytes()).await;
    assert_eq!(status_of(&response), 400, "{response}");
    assert_eq!(upstream.hits(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn absolute_form_to_another_host_is_400_and_reaches_no_upstream() {
    let (upstream, proxy) = proxy_with("").await;
    let response = exchange(
        proxy.agent,
        b"GET http://evil.example.com/openai/v1/models HTTP/1.1\r\nHost: evil.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&response), 400, "{response}");
    // The same form naming tollgate itself is an ordinary request.
    let own = format!(
        "GET http://{}/openai/v1/models HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        proxy.agent, proxy.agent
    );
    assert_eq!(upstream.hits(), 0);
    let response = exchange(proxy.agent, own.as_bytes()).await;
    assert_eq!(status_of(&response), 200, "{response}");
    assert_eq!(upstream.hits(), 1);
    assert_eq!(upstream.last().uri.path(), "/v1/models");
    proxy.shutdown().await;
}

#[tokio::test]
async fn connect_is_405() {
    let (upstream, proxy) = proxy_with("").await;
    let mut socket = TcpStream::connect(proxy.agent).await.unwrap();
    socket
        .write_all(b"CONNECT evil.example.com:443 HTTP/1.1\r\nHost: evil.example.com:443\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut socket).await;
    assert_eq!(status_of(&head), 405, "{head}");
    assert_eq!(upstream.hits(), 0);
    proxy.shutdown().await;
}
