//! A fast mock of an OpenAI-compatible upstream for load tests.
//!
//! Every request gets the captured chat completion
//! `tests/fixtures/providers/openai/chat-completions.nonstream.json`, except
//! a request whose JSON body has `"stream": true`, which gets the captured
//! stream `chat-completions.stream-include-usage.sse`, one SSE event per
//! body frame (optionally `--chunk-delay-us` apart; a request header
//! `x-mock-chunk-delay-us` sets the pause for that request only, so one mock
//! serves paced and unpaced streams in the same run). Events of a stream
//! paced by that header start with an SSE comment line `: sent_us=<µs since
//! the Unix epoch>` written just before the event is handed to hyper, so a
//! client on the same machine can tell how long each chunk took to reach it.
//!
//! Faults, for soak runs: a request header `x-mock-fault` makes the reply
//! fail in one way. `status-500` answers 500 with an OpenAI-shaped error body;
//! `reset-after=N` streams N events of the captured stream, then aborts the
//! connection mid-body; `headers-after-ms=N` waits N ms before the response
//! headers (then replies as usual), to run past a proxy's timeout.
//!
//! `--fixtures`, `--json-file` and `--sse-file` serve another provider's
//! captured replies instead (`scripts/pgo.sh` trains on Anthropic's and
//! Gemini's this way).
//!
//! The first stdout line is the bound address (`127.0.0.1:PORT`), so a
//! script can start it on port 0 and read where it listens. It runs until
//! killed, or for `--max-secs` when given.
//!
//! ```text
//! cargo run --release --example mock_upstream -- --listen 127.0.0.1:0
//! ```

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(about = "Mock OpenAI chat-completions upstream for load tests")]
struct Args {
    /// Address to listen on (port 0: any free port; the bound address is
    /// printed on the first stdout line).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Pause between SSE events of a streamed reply, in microseconds.
    #[arg(long, default_value_t = 0)]
    chunk_delay_us: u64,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Exit after this many seconds (0: run until killed).
    #[arg(long, default_value_t = 0)]
    max_secs: u64,
    /// Directory holding the provider fixtures.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/providers/openai"))]
    fixtures: PathBuf,
    /// The JSON reply, a file in `--fixtures` (another provider's shape:
    /// e.g. `messages.nonstream.json` from the Anthropic fixtures).
    #[arg(long, default_value = "chat-completions.nonstream.json")]
    json_file: String,
    /// The streamed reply, a file in `--fixtures`.
    #[arg(long, default_value = "chat-completions.stream-include-usage.sse")]
    sse_file: String,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type MockBody = BoxBody<Bytes, BoxError>;

/// Request header overriding `--chunk-delay-us` for one streamed reply.
const CHUNK_DELAY_HEADER: &str = "x-mock-chunk-delay-us";
/// Request header asking for a fault (see the module comment).
const FAULT_HEADER: &str = "x-mock-fault";

/// A fault asked for by [`FAULT_HEADER`].
#[derive(Clone, Copy)]
enum Fault {
    Status500,
    ResetAfter(usize),
    HeadersAfter(Duration),
}

impl Fault {
    fn parse(value: &str) -> Option<Fault> {
        if value == "status-500" {
            return Some(Fault::Status500);
        }
        if let Some(n) = value.strip_prefix("reset-after=") {
            return n.parse().ok().map(Fault::ResetAfter);
        }
        let ms = value.strip_prefix("headers-after-ms=")?.parse().ok()?;
        Some(Fault::HeadersAfter(Duration::from_millis(ms)))
    }
}

struct Replies {
    json: Bytes,
    events: Vec<Bytes>,
    chunk_delay: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let json = std::fs::read(args.fixtures.join(&args.json_file))?;
    let sse = std::fs::read(args.fixtures.join(&args.sse_file))?;
    let replies = Arc::new(Replies {
        json: Bytes::from(json),
        events: split_events(&sse),
        chunk_delay: Duration::from_micros(args.chunk_delay_us),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(args.listen).await?;
        let addr = listener.local_addr()?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{addr}")?;
            out.flush()?;
        }
        let serve = accept_loop(listener, replies);
        if args.max_secs > 0 {
            let _ = tokio::time::timeout(Duration::from_secs(args.max_secs), serve).await;
        } else {
            serve.await;
        }
        Ok(())
    })
}

async fn accept_loop(listener: TcpListener, replies: Arc<Replies>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let replies = replies.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| respond(replies.clone(), request));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(
    replies: Arc<Replies>,
    request: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let paced_by_header: Option<u64> = request
        .headers()
        .get(CHUNK_DELAY_HEADER)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let delay = paced_by_header.map_or(replies.chunk_delay, Duration::from_micros);
    let stamp = paced_by_header.is_some();
    let fault = request
        .headers()
        .get(FAULT_HEADER)
        .and_then(|v| Fault::parse(v.to_str().ok()?));
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    match fault {
        Some(Fault::Status500) => {
            let error = r#"{"error":{"message":"mock fault","type":"server_error","param":null,"code":null}}"#;
            let response = Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .header("content-type", "application/json")
                .body(
                    Full::new(Bytes::from_static(error.as_bytes()))
                        .map_err(Into::into)
                        .boxed(),
                );
            return Ok(response.unwrap_or_else(|_| empty()));
        }
        Some(Fault::ResetAfter(n)) => {
            let events: Vec<Result<Frame<Bytes>, BoxError>> = replies
                .events
                .iter()
                .take(n)
                .map(|e| Ok(Frame::data(e.clone())))
                .collect();
            // The pause lets hyper flush the head and the events first; an
            // error right away would drop them with the connection.
            let reset = futures_util::stream::once(async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Err::<Frame<Bytes>, BoxError>("mock fault: connection reset".into())
            });
            let stream = futures_util::StreamExt::chain(futures_util::stream::iter(events), reset);
            let response = Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "text/event-stream")
                .body(StreamBody::new(stream).boxed());
            return Ok(response.unwrap_or_else(|_| empty()));
        }
        Some(Fault::HeadersAfter(wait)) => tokio::time::sleep(wait).await,
        None => {}
    }
    let response = if asks_for_stream(&body) {
        let events = replies.events.clone();
        let stream = futures_util::stream::unfold(
            (events.into_iter(), true),
            move |(mut events, first)| async move {
                let event = events.next()?;
                if !first && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let event = if stamp { stamped(&event) } else { event };
                Some((Ok::<_, BoxError>(Frame::data(event)), (events, false)))
            },
        );
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .body(StreamBody::new(stream).boxed())
    } else {
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(Full::new(replies.json.clone()).map_err(Into::into).boxed())
    };
    Ok(response.unwrap_or_else(|_| empty()))
}

fn empty() -> Response<MockBody> {
    Response::new(Full::new(Bytes::new()).map_err(Into::into).boxed())
}

/// `event` behind a comment line carrying the current wall-clock time.
fn stamped(event: &Bytes) -> Bytes {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let mut out = format!(": sent_us={now}\n").into_bytes();
    out.extend_from_slice(event);
    Bytes::from(out)
}

/// SSE events, each with its terminating blank line.
fn split_events(body: &[u8]) -> Vec<Bytes> {
    let mut events = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        match rest.windows(2).position(|w| w == b"\n\n") {
            Some(i) => {
                events.push(Bytes::copy_from_slice(&rest[..i + 2]));
                rest = &rest[i + 2..];
            }
            None => {
                events.push(Bytes::copy_from_slice(rest));
                rest = &[];
            }
        }
    }
    events
}

/// `"stream"` followed by `:` and `true` at the top level of a JSON body,
/// found without parsing (the mock must stay cheap next to the proxy).
fn asks_for_stream(body: &[u8]) -> bool {
    let key = b"\"stream\"";
    let mut from = 0;
    while let Some(i) = body[from..].windows(key.len()).position(|w| w == key) {
        let after = &body[from + i + key.len()..];
        let after = trim_start(after);
        if let Some(after) = after.strip_prefix(b":") {
            if trim_start(after).starts_with(b"true") {
                return true;
            }
        }
        from += i + key.len();
    }
    false
}

fn trim_start(bytes: &[u8]) -> &[u8] {
    let skip = bytes.iter().take_while(|b| b.is_ascii_whitespace()).count();
    &bytes[skip..]
}
