//! Graceful shutdown in-process: once shutdown starts no new connection is
//! accepted, an in-flight stream still completes and is in the ledger after
//! shutdown returns, and a stream still open past `shutdown_drain_ms` is cut
//! so shutdown returns regardless.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use crate::support::*;

const EVENT: &str = "data: {\"id\":\"d1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n";
const USAGE_EVENT: &str = "data: {\"id\":\"d1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n";
const DONE: &str = "data: [DONE]\n\n";
const STREAM_REQUEST: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true}}"#;

type Sender = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// A mock whose SSE bodies the test feeds; each request hands over a sender.
async fn held_stream_upstream() -> (MockUpstream, mpsc::Receiver<Sender>) {
    let (senders_tx, senders_rx) = mpsc::channel(4);
    let upstream = MockUpstream::start(move |_| {
        let (tx, rx) = mpsc::channel(16);
        senders_tx.try_send(tx).expect("test takes the sender");
        MockReply {
            status: http::StatusCode::OK,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            body: MockBody::Channel(rx),
        }
    })
    .await;
    (upstream, senders_rx)
}

/// Config with a ledger in `dir` (outlives the proxy) and the drain bound.
fn config(dir: &std::path::Path, drain_ms: u64) -> String {
    format!(
        "{}\n[limits]\nshutdown_drain_ms = {drain_ms}\n\n[ledger]\npath = \"{}\"\nflush_interval_ms = 20\n",
        config_all_routes(),
        dir.join("ledger.db").display()
    )
}

/// Waits (bounded) until connecting to `addr` is refused.
async fn refused(addr: std::net::SocketAddr) {
    for _ in 0..1000 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{addr} still accepts connections after shutdown began");
}

async fn next_data(body: &mut hyper::body::Incoming) -> Bytes {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("a frame arrives")
            .expect("the stream is open")
            .expect("no error");
        if let Ok(data) = frame.into_data() {
            return data;
        }
    }
}

fn ledger_rows(dir: &std::path::Path, release: &str) -> Vec<(String, i64)> {
    let conn = rusqlite::Connection::open(dir.join("ledger.db")).unwrap();
    let mut statement = conn
        .prepare("SELECT run_id, completion_tokens FROM calls WHERE release = ?1")
        .unwrap();
    let rows = statement
        .query_map([release], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_stream_completes_and_is_recorded_while_new_connections_are_refused() {
    let (upstream, mut senders) = held_stream_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&config(dir.path(), 30_000), &upstream.url()).await;
    let agent = proxy.agent;

    let request = post_json(
        proxy.url("/openai/v1/chat/completions"),
        &[("x-agent-run-id", "drain-1"), ("x-agent-release", "drain")],
        STREAM_REQUEST,
    );
    let (response, tx) = tokio::join!(request, async { senders.recv().await.unwrap() });
    assert_eq!(response.status(), 200);
    tx.send(Ok(Bytes::from(EVENT))).await.unwrap();
    let mut body = response.into_body();
    assert_eq!(next_data(&mut body).await, EVENT);

    // Shutdown begins while the stream is open.
    let shutdown = tokio::spawn(proxy.shutdown());
    refused(agent).await;
    assert!(
        !shutdown.is_finished(),
        "shutdown waits for the open stream"
    );

    // The upstream finishes: the client gets the rest, shutdown returns.
    tx.send(Ok(Bytes::from(USAGE_EVENT))).await.unwrap();
    tx.send(Ok(Bytes::from(DONE))).await.unwrap();
    drop(tx);
    let rest = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("the stream completes")
        .expect("without error")
        .to_bytes();
    assert_eq!(rest, format!("{USAGE_EVENT}{DONE}"));
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown returns once the stream is done")
        .unwrap();

    // Shutdown flushed the ledger: the drained call is there, with its usage.
    assert_eq!(
        ledger_rows(dir.path(), "drain"),
        vec![("drain-1".to_string(), 2)]
    );
}

/// Opens a held stream through `agent` to the mock; returns the body and
/// the mock's sender (the mock never ends the stream unless told).
async fn open_held_stream(
    url: String,
    senders: &mut mpsc::Receiver<Sender>,
    release: &str,
) -> (hyper::body::Incoming, Sender) {
    let headers = [("x-agent-run-id", "drain-2"), ("x-agent-release", release)];
    let request = post_json(url, &headers, STREAM_REQUEST);
    let (response, tx) = tokio::join!(request, async { senders.recv().await.unwrap() });
    assert_eq!(response.status(), 200);
    tx.send(Ok(Bytes::from(EVENT))).await.unwrap();
    let mut body = response.into_body();
    assert_eq!(next_data(&mut body).await, EVENT);
    (body, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_after_the_drain_bound_with_a_stream_still_open() {
    let (upstream, mut senders) = held_stream_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&config(dir.path(), 200), &upstream.url()).await;
    let (_body, _tx) = open_held_stream(
        proxy.url("/openai/v1/chat/completions"),
        &mut senders,
        "cut",
    )
    .await;
    // The upstream never finishes; shutdown still returns after the drain
    // bound (200 ms), well before this test's own limit.
    tokio::time::timeout(Duration::from_secs(10), proxy.shutdown())
        .await
        .expect("shutdown returns after shutdown_drain_ms");
}

/// The real binary: SIGTERM with a stream held open past the drain bound
/// exits 0 and the client's stream is cut, not left hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_a_stream_open_past_the_drain_bound_and_exits_0() {
    let (upstream, mut senders) = held_stream_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(dir.path(), &upstream.url(), 20);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[limits]\nshutdown_drain_ms = 200\n");
    std::fs::write(&config, text).unwrap();
    let mut process = start_binary(&config);
    let (body, _tx) = open_held_stream(
        format!("http://{}/openai/v1/chat/completions", process.agent),
        &mut senders,
        "cut-binary",
    )
    .await;
    let pid = process.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let rest = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("the held stream is cut once the drain time has passed");
    if let Ok(rest) = rest {
        assert!(
            !rest.to_bytes().ends_with(DONE.as_bytes()),
            "a cut stream cannot have completed"
        );
    }
    let status = tokio::task::spawn_blocking(move || process.child.wait().unwrap())
        .await
        .unwrap();
    assert!(
        status.success(),
        "tollgate exits 0 after the drain: {status}"
    );
}

/// In-process, the connections still open when the drain bound is up are
/// ended before `Tollgate::run` returns, and their calls settle into the
/// ledger before it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_a_stream_open_past_the_drain_bound_is_cut() {
    let (upstream, mut senders) = held_stream_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&config(dir.path(), 200), &upstream.url()).await;
    let (body, _tx) = open_held_stream(
        proxy.url("/openai/v1/chat/completions"),
        &mut senders,
        "cut",
    )
    .await;
    tokio::time::timeout(Duration::from_secs(10), proxy.shutdown())
        .await
        .expect("shutdown returns after shutdown_drain_ms");
    tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("the held stream is cut when Tollgate::run returns")
        .expect_err("a cut stream ends with an error");
    let conn = rusqlite::Connection::open(dir.path().join("ledger.db")).unwrap();
    let outcome: String = conn
        .query_row("SELECT outcome FROM calls WHERE release = 'cut'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(outcome, "client_gone", "the cut call is in the ledger");
}

/// A keep-alive connection with no call in flight is told to close when
/// shutdown begins: shutdown returns long before the drain bound (30 s),
/// and the client sees the connection end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_an_idle_keep_alive_connection_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let upstream = MockUpstream::start(|_| {
        MockReply::json(
            200,
            r#"{"id":"c1","object":"chat.completion","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#,
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&config(dir.path(), 30_000), &upstream.url()).await;
    let mut socket = tokio::net::TcpStream::connect(proxy.agent).await.unwrap();
    let body = r#"{"model":"gpt-4o-mini"}"#;
    let request = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: tollgate\r\ncontent-type: application/json\r\nx-agent-run-id: idle-1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    // Read the one response (head and content-length body); the connection
    // stays open for the next request.
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = socket.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection closed before its response");
        received.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&received).to_lowercase();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let length: usize = text[..head_end]
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .and_then(|value| value.trim().parse().ok())
                .expect("a content-length");
            if received.len() >= head_end + 4 + length {
                break;
            }
        }
    }
    assert_eq!(raw::status_of(&String::from_utf8_lossy(&received)), 200);

    tokio::time::timeout(Duration::from_secs(10), proxy.shutdown())
        .await
        .expect("shutdown closes the idle connection instead of waiting out the drain bound");
    assert_eq!(raw::read_to_close(&mut socket).await, "");
}

/// A connection that has sent nothing yet (tollgate still waiting for its
/// first bytes, to tell its protocol) is closed when shutdown begins, not
/// when the header read time (60 s here) or the drain bound (30 s) runs
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_a_connection_that_sent_nothing_yet() {
    let upstream = MockUpstream::start(|_| MockReply::json(200, "{}")).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 30_000)
        .replace("[limits]\n", "[limits]\nheader_read_timeout_ms = 60000\n");
    let proxy = Proxy::start(&config, &upstream.url()).await;
    let mut socket = tokio::net::TcpStream::connect(proxy.agent).await.unwrap();
    // The connection's task is running once the listener has accepted it;
    // a call on another connection is answered after that accept.
    let answered = post_json(
        proxy.url("/openai/v1/chat/completions"),
        &[("x-agent-run-id", "silent-1")],
        r#"{"model":"gpt-4o-mini"}"#,
    )
    .await;
    assert_eq!(answered.status(), 200);
    drop(answered);

    tokio::time::timeout(Duration::from_secs(10), proxy.shutdown())
        .await
        .expect("shutdown closes the silent connection instead of waiting for its bytes");
    assert_eq!(raw::read_to_close(&mut socket).await, "");
}
