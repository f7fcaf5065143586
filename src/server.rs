//! Accept loop shared by the agent and admin listeners: hyper's HTTP/1.1
//! connection, or hyper-util's auto (HTTP/1.1 + h2c) connection builder
//! where a peek cannot tell and for TLS, limits on header size, count and
//! read time (read at each accept, so a reload applies to new connections),
//! one task per connection (for the agent listener, on the next of the
//! worker threads: `workers`), and graceful shutdown that stops
//! accepting and drains open connections up to a bound (`drain`). With a
//! TLS config (`[server.tls]`) each accepted stream is a TLS handshake
//! first (ALPN `h2` and `http/1.1`, within the header read time); a failed
//! handshake drops that connection only.
//!
//! Memory per connection: on plain TCP the protocol is told from a peek at
//! the first bytes, so hyper's first read gets the whole request head (after
//! hyper-util's own detection, which consumes at most 24 bytes, the next
//! read of the head doubled hyper's 8 KiB read buffer to 16 KiB), and the
//! handler's future is boxed, so its ~5 KiB are freed once the response
//! head is out instead of staying in hyper's per-connection slot for the
//! life of the connection. A connection the peek tells is HTTP/1.1 is
//! served by hyper's own HTTP/1.1 connection rather than hyper-util's
//! auto-detecting one, whose state is sized for HTTP/2 and for the
//! detection (a larger task for every connection, and a wrapper around
//! every read).
//!
//! Each connection is polled through `SelfWakes`: hyper wakes the
//! connection's own task when the handler reads the request body, and
//! tokio would otherwise take that for a yield and wake another worker on
//! every call (`self_wake`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::config::LimitsConfig;
use crate::proxy::{ConnInfo, ProxyBody};

mod drain;
mod self_wake;
pub mod workers;

use drain::Drain;
use self_wake::SelfWakes;
pub use workers::Workers;

/// Serves `listener` with `handler` until `shutdown` resolves, then drains.
/// `limits` is read at each accept and at shutdown, so a reloaded config
/// applies to the connections accepted after it (open ones keep theirs).
/// The connections run on the runtime this is polled on.
pub async fn serve<H, Fut, L>(
    listener: TcpListener,
    limits: L,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static,
    L: Fn() -> LimitsConfig,
{
    serve_tls(listener, None, None, limits, handler, shutdown).await
}

/// As [`serve`], terminating TLS with `tls` when given, and running each
/// connection on the next of `workers` when given.
pub async fn serve_tls<H, Fut, L>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    workers: Option<Arc<Workers>>,
    limits: L,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static,
    L: Fn() -> LimitsConfig,
{
    let acceptor = tls.map(TlsAcceptor::from);
    let mut builders = Builders::new(&limits());
    let drain = Drain::new();
    // Every connection task, so the ones still open when the drain time is
    // up can be ended (their calls then settle before the ledger closes).
    let mut connections = tokio::task::JoinSet::new();
    let local = listener.local_addr().ok();
    tokio::pin!(shutdown);
    loop {
        // Reap finished connection tasks so the set stays small.
        while connections.try_join_next().is_some() {}
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and the like: back off briefly
                    // instead of spinning, as hyper's and axum's loops do.
                    tracing::warn!(message = "accept failed", %error);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // A connection bound for a worker leaves this runtime's reactor
        // here and joins the worker's on its first poll there.
        let (stream, worker) = match &workers {
            Some(workers) => match stream.into_std() {
                Ok(stream) => (Accepted::Moving(stream), Some(workers.next())),
                Err(error) => {
                    tracing::debug!(message = "cannot hand the connection to a worker", %remote, %error);
                    continue;
                }
            },
            None => (Accepted::Here(stream), None),
        };
        let current = limits();
        if !builders.fit(&current) {
            builders = Builders::new(&current);
        }
        let handshake_timeout = current.header_read_timeout();
        let info = local.map(|local| ConnInfo { local, remote });
        let handler = handler.clone();
        let service = service_fn(move |mut request: Request<Incoming>| {
            // Only a target that names a host is checked against the local
            // address: an origin-form request (`POST /path`) goes without
            // the extension map it would otherwise allocate.
            if let (Some(info), Some(_)) = (info, request.uri().authority()) {
                request.extensions_mut().insert(info);
            }
            // Boxed: hyper keeps one slot per connection for the handler's
            // future, sized for it, for as long as the connection lives.
            Box::pin(handler(request)) as HandlerFuture
        });
        let Some(acceptor) = acceptor.clone() else {
            let mut watcher = drain.watcher();
            let sniffed = Arc::clone(&builders.sniffed);
            let task = async move {
                let Some(stream) = stream.settle() else {
                    return;
                };
                let protocol = tokio::select! {
                    protocol = tokio::time::timeout(handshake_timeout, sniff(&stream)) => match protocol {
                        Ok(protocol) => protocol,
                        // Silent past the header read time: close, as hyper
                        // does with a request head that does not come.
                        Err(_) => return,
                    },
                    // Shutdown before the first bytes: close, as the
                    // auto-detecting connection does when cancelled there.
                    _ = watcher.stopped() => return,
                };
                let builder = match protocol {
                    Some(Protocol::Http1) => {
                        // hyper's own HTTP/1.1 connection: no version
                        // detection state or read wrapper, and a smaller
                        // task (module notes).
                        let connection = sniffed.h1.serve_connection(TokioIo::new(stream), service);
                        drop(sniffed);
                        note_end(SelfWakes::new(watcher.watch(connection)).await);
                        return;
                    }
                    Some(Protocol::Http2) => &sniffed.h2,
                    None => &sniffed.auto,
                };
                let connection = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                drop(sniffed);
                // Boxed: held inline, the auto connection (~1.5 KiB) would
                // size the task of every HTTP/1.1 connection too.
                note_end(Box::pin(SelfWakes::new(watcher.watch(connection))).await);
            };
            spawn_on(&mut connections, worker, task);
            continue;
        };
        // The handshake runs on the connection's own task so a slow client
        // never holds up the accept loop; the watcher makes shutdown wait
        // for it like for any open connection.
        let watcher = drain.watcher();
        let sniffed = Arc::clone(&builders.sniffed);
        let task = async move {
            let Some(stream) = stream.settle() else {
                return;
            };
            let stream =
                match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!(message = "TLS handshake failed", %remote, %error);
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(message = "TLS handshake timed out", %remote);
                        return;
                    }
                };
            let connection = sniffed
                .auto
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            drop(sniffed);
            note_end(SelfWakes::new(watcher.watch(connection)).await);
        };
        spawn_on(&mut connections, worker, task);
    }
    drop(listener);
    if tokio::time::timeout(limits().shutdown_drain(), drain.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(message = "shutdown drain time passed; closing the remaining connections");
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// How a connection ended, for the debug log.
fn note_end(served: Result<(), impl std::fmt::Display>) {
    if let Err(error) = served {
        tracing::debug!(message = "connection ended with an error", %error);
    }
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

/// An accepted connection, registered with the runtime it runs on.
enum Accepted {
    Here(TcpStream),
    /// On its way to a worker: registered there by [`Accepted::settle`].
    Moving(std::net::TcpStream),
}

impl Accepted {
    /// The stream, registered with the runtime of the calling task; `None`
    /// (the connection closes) when that fails.
    fn settle(self) -> Option<TcpStream> {
        match self {
            Accepted::Here(stream) => Some(stream),
            Accepted::Moving(stream) => TcpStream::from_std(stream)
                .inspect_err(|error| {
                    tracing::debug!(message = "worker cannot take the connection", %error);
                })
                .ok(),
        }
    }
}

/// Spawns a connection's task on `worker`, or on this runtime.
fn spawn_on(
    connections: &mut tokio::task::JoinSet<()>,
    worker: Option<&tokio::runtime::Handle>,
    task: impl Future<Output = ()> + Send + 'static,
) {
    match worker {
        Some(worker) => connections.spawn_on(task, worker),
        None => connections.spawn(task),
    };
}

/// Connection builders for the limits they were made with: for the
/// connections whose protocol the peek told (their first read then gets the
/// request head whole), and the auto-detecting one for the rest (and TLS).
struct Sniffed {
    h1: hyper::server::conn::http1::Builder,
    h2: Builder<TokioExecutor>,
    auto: Builder<TokioExecutor>,
}

struct Builders {
    /// `header_read_timeout_ms`, `max_header_bytes`, `max_headers`.
    made_for: (u64, usize, usize),
    sniffed: Arc<Sniffed>,
}

impl Builders {
    fn new(limits: &LimitsConfig) -> Builders {
        // hyper's HTTP/1.1 builder and hyper-util's wrapper of it share
        // these methods but no trait: one list of settings for both.
        macro_rules! http1_limits {
            ($builder:expr) => {
                $builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout())
                    .max_buf_size(limits.max_header_bytes)
                    .max_headers(limits.max_headers)
            };
        }
        let mut h1 = hyper::server::conn::http1::Builder::new();
        http1_limits!(h1);
        let mut builder = Builder::new(TokioExecutor::new());
        http1_limits!(builder.http1());
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(limits.max_header_bytes as u32);
        Builders {
            made_for: Builders::key(limits),
            sniffed: Arc::new(Sniffed {
                h1,
                h2: builder.clone().http2_only(),
                auto: builder,
            }),
        }
    }

    /// These builders apply `limits` (else a reload changed them).
    fn fit(&self, limits: &LimitsConfig) -> bool {
        self.made_for == Builders::key(limits)
    }

    fn key(limits: &LimitsConfig) -> (u64, usize, usize) {
        (
            limits.header_read_timeout_ms,
            limits.max_header_bytes,
            limits.max_headers,
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// The HTTP/2 connection preface (prior knowledge, h2c).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol of a plain connection from a peek at its first bytes (as
/// hyper-util's detection decides it: HTTP/2 on the whole preface, HTTP/1.1
/// as soon as the bytes differ from it), or `None` when the peek cannot
/// tell (end of stream, an error, or only the start of the preface so far):
/// the auto-detecting builder then reads as before.
async fn sniff(stream: &TcpStream) -> Option<Protocol> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let n = stream.peek(&mut buf).await.ok()?;
    classify(&buf[..n])
}

fn classify(first: &[u8]) -> Option<Protocol> {
    if first.is_empty() {
        None
    } else if first != &H2_PREFACE[..first.len()] {
        Some(Protocol::Http1)
    } else if first.len() == H2_PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes_like_the_auto_builder() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"POST /v1 HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"G"), Some(Protocol::Http1));
        assert_eq!(classify(b"PRX"), Some(Protocol::Http1));
        assert_eq!(classify(b"PRI * HTTP/2.0"), None);
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
    }

    /// Each accepted connection is served on the next worker in turn, and
    /// all of its requests on that worker.
    #[tokio::test]
    async fn connections_are_served_on_the_workers_in_turn() {
        use http_body_util::{BodyExt, Empty};

        let workers = Arc::new(Workers::start(2).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_tls(
            listener,
            None,
            Some(Arc::clone(&workers)),
            LimitsConfig::default,
            |_request| async {
                let slot = workers::slot().to_string();
                Ok(Response::new(crate::proxy::full_body(slot.into())))
            },
            async {
                let _ = stopped.await;
            },
        ));
        let mut slots = Vec::new();
        for _ in 0..4 {
            let stream = TcpStream::connect(address).await.unwrap();
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(connection);
            let mut served = Vec::new();
            for _ in 0..2 {
                let request = Request::get("/")
                    .body(Empty::<bytes::Bytes>::new())
                    .unwrap();
                let response = sender.send_request(request).await.unwrap();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                served.push(String::from_utf8(body.to_vec()).unwrap());
            }
            assert_eq!(served[0], served[1], "one connection, one worker");
            slots.push(served.swap_remove(0));
        }
        assert_eq!(slots, ["0", "1", "0", "1"]);
        let _ = stop.send(());
        server.await.unwrap();
        let workers = Arc::into_inner(workers).expect("the server let go of the workers");
        tokio::task::spawn_blocking(move || workers.stop())
            .await
            .unwrap();
    }
}
