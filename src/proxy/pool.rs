//! The upstream connection pool: the open connections to one origin
//! (scheme and authority), kept between calls.
//!
//! - HTTP/1.1 connections carry one call at a time. A call takes the most
//!   recently returned connection that is ready for a request, or opens
//!   one; the response body hands its connection back once the upstream
//!   has sent all of it ([`UpstreamBody`]). A body dropped before its end
//!   closes its connection: what is left of the response would otherwise
//!   arrive as the next call's reply.
//! - An HTTPS connection whose TLS handshake chose HTTP/2 (ALPN) is shared:
//!   every call opens a stream on it while it is open. Calls that find no
//!   connection open one each; with HTTP/2 the last one opened is kept
//!   and shared, the others close after their call.
//! - A request the upstream never received, because an idle connection
//!   closed just as it was taken, is sent again on another connection
//!   (a fresh connection's failure is final), as hyper-util's client does.
//! - Connections unused for 75 to 90 s are closed by a sweep that runs every
//!   15 s while the pool exists (hyper-util's client: 90 s); at most
//!   `MAX_IDLE` idle connections are kept per origin and worker, the oldest
//!   closed first.
//! - An HTTP/1.1 connection has no task of its own: the call using it
//!   polls it ([`Http1Connection::drive`]), first while waiting for the
//!   response head and then from the response body, before reading the
//!   body's channel. hyper's client otherwise runs each connection as a
//!   spawned task, and every chunk of a reply crossed from that task to the
//!   call's through a wake-up and a second poll of the agent's connection
//!   (BENCHMARKS.md, "Results, thirty-sixth round"). An idle connection is
//!   polled once when a call takes it, so that a close the upstream sent
//!   while it sat idle is read before a request is written to it, and at
//!   each sweep.
//! - Each worker thread (`server::workers`) has idle lists of its own, and
//!   its own shared HTTP/2 connection: a connection runs on the worker that
//!   opened it, and only that worker's calls use it, as each of Envoy's
//!   workers has its own connection pools.
//!
//! hyper-util's pooled client (`client::legacy`) does this for any URI, at
//! about 7,000 instructions more per proxied JSON call (BENCHMARKS.md,
//! "Twenty-fourth round"): it finds the pool by hashing the origin byte by
//! byte with SipHash at checkout and again at return, races the checkout
//! against a connect in a `select`, spawns a task per call to return the
//! connection once it is idle, and moves its futures many times. Here the
//! route table names the origins, so each call finds its pool with one
//! short string hash ([`super::upstream::UpstreamClient`]), and the
//! response body, which sees the end of the reply anyway, returns the
//! connection itself.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_service::Service;

use crate::proxy::egress::EgressConnector;
use crate::proxy::upstream_io::UpstreamIo;

/// Opens upstream connections: TCP (directly or through the egress proxy's
/// tunnel), then TLS for `https` origins.
pub type Connector = HttpsConnector<EgressConnector>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Http1Sender = http1::SendRequest<Full<Bytes>>;
type Http2Sender = http2::SendRequest<Full<Bytes>>;
type Http1Driver = http1::Connection<UpstreamIo, Full<Bytes>>;

/// Idle HTTP/1.1 connections kept per origin.
const MAX_IDLE: usize = 256;
/// How often the idle connections are looked at.
const SWEEP_EVERY: Duration = Duration::from_secs(15);
/// Sweeps a connection may stay unused through before it is closed.
const IDLE_SWEEPS: u32 = 6;

/// Why a call got no response head.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection: TCP, the egress tunnel or TLS failed.
    #[error("{}", chain(.0.as_ref()))]
    Connect(BoxError),
    /// The connection opened but the HTTP handshake failed.
    #[error("{}", chain(.0))]
    Handshake(hyper::Error),
    /// The request was sent (or could not be) and no response head came.
    #[error("{}", chain(.0))]
    Send(hyper::Error),
}

/// The connections of one origin.
pub struct OriginPool {
    /// `scheme://authority`: what the connector is asked to open.
    origin: Uri,
    connector: Connector,
    /// One list per worker thread (`server::workers`): a call takes the
    /// connections whose tasks run on its own thread.
    idle: Box<[Mutex<Idle>]>,
    /// Sweeps done: the clock that idle connections are aged by (a counter
    /// read with one load, where a timestamp would be a clock read per call).
    sweeps: AtomicU32,
    sweeping: AtomicBool,
}

#[derive(Default)]
struct Idle {
    http1: VecDeque<IdleConnection>,
    /// The shared HTTP/2 connection and the sweep count at its last use.
    http2: Option<(Http2Sender, u32)>,
}

struct IdleConnection {
    connection: Http1Connection,
    /// The sweep count when it was returned.
    since: u32,
}

/// A connection taken for one call.
enum Sender {
    Http1(Http1Connection),
    Http2(Http2Sender),
}

/// An HTTP/1.1 connection: the handle requests are sent on, and hyper's
/// state machine for the socket, which the call using the connection polls
/// (module docs).
pub struct Http1Connection {
    sender: Http1Sender,
    /// `None` once it has returned: the connection is closed, and hyper's
    /// state with it, which hands back (or fails) the requests still
    /// waiting for it.
    // Boxed: moved with the call's future and the response body, which
    // would otherwise carry hyper's whole connection state.
    driver: Option<Box<Http1Driver>>,
}

impl Http1Connection {
    /// Lets hyper do what the socket allows: write the request, read the
    /// reply into the response head's callback and the body's channel, or
    /// read a close. It registers `cx` for the socket and the channels.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(driver) = &mut self.driver {
            if let Poll::Ready(ended) = driver.poll_unpin(cx) {
                self.driver = None;
                log_end(ended, "upstream connection ended");
            }
        }
    }

    /// Reads what arrived while the connection sat idle (a close, most
    /// likely), with no task to wake: whoever takes the connection drives
    /// it again with its own. Whether a request can be sent on it now.
    fn ready_after_idle(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop()));
        self.driver.is_some() && self.sender.is_ready()
    }
}

impl OriginPool {
    /// An empty pool for `origin` (`scheme://authority`), with an idle
    /// list for each of `workers` threads.
    pub fn new(origin: Uri, connector: Connector, workers: usize) -> OriginPool {
        OriginPool {
            origin,
            connector,
            idle: (0..workers.max(1))
                .map(|_| Mutex::new(Idle::default()))
                .collect(),
            sweeps: AtomicU32::new(0),
            sweeping: AtomicBool::new(false),
        }
    }

    /// Sends `request` (absolute URI) on an idle connection or a new one
    /// and returns the response head; the body returns the connection.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<Full<Bytes>>,
    ) -> Result<Response<UpstreamBody>, PoolError> {
        loop {
            let (connection, reused) = match self.take_idle() {
                Some(connection) => (connection, true),
                // Boxed: the handshakes' futures are large, and every
                // call's future would carry (and move) their space.
                None => (Box::pin(self.connect()).await?, false),
            };
            let (unsent, error) = match connection {
                Sender::Http2(mut sender) => match sender.try_send_request(request).await {
                    Ok(response) => return Ok(response.map(UpstreamBody::unpooled)),
                    Err(mut failed) => (failed.take_message(), failed.into_error()),
                },
                Sender::Http1(mut connection) => {
                    // HTTP/1.1 names only the path on the request line.
                    let path = origin_form(request.uri());
                    let absolute = std::mem::replace(request.uri_mut(), path);
                    let mut sending = std::pin::pin!(connection.sender.try_send_request(request));
                    // The connection writes the request and reads the head
                    // only when polled: it is polled before the head's wait.
                    let sent = std::future::poll_fn(|cx| {
                        connection.drive(cx);
                        sending.as_mut().poll(cx)
                    })
                    .await;
                    match sent {
                        Ok(response) => {
                            let pool = Arc::clone(self);
                            return Ok(
                                response.map(|body| UpstreamBody::pooled(body, pool, connection))
                            );
                        }
                        Err(mut failed) => {
                            let unsent = failed.take_message().map(|mut unsent| {
                                *unsent.uri_mut() = absolute;
                                unsent
                            });
                            (unsent, failed.into_error())
                        }
                    }
                }
            };
            // hyper hands back a request it never began to write: one given
            // to an idle connection the upstream had just closed goes out
            // again on another.
            match unsent {
                Some(unsent) if reused => request = unsent,
                _ => return Err(PoolError::Send(error)),
            }
        }
    }

    /// The most recently returned connection that can take a request now,
    /// dropping those that closed.
    fn take_idle(&self) -> Option<Sender> {
        let mut idle = self.lock();
        if let Some((sender, last_use)) = &mut idle.http2 {
            if sender.is_ready() {
                *last_use = self.sweeps.load(Ordering::Relaxed);
                return Some(Sender::Http2(sender.clone()));
            }
            if sender.is_closed() {
                idle.http2 = None;
            }
        }
        // The most recent first. Those the upstream closed while they sat
        // idle are dropped on the way, and so is one that is open but not
        // ready for a request once driven, which hyper would refuse.
        while let Some(mut found) = idle.http1.pop_back() {
            if found.connection.ready_after_idle() {
                return Some(Sender::Http1(found.connection));
            }
        }
        None
    }

    /// Returns an HTTP/1.1 connection whose response has been read whole.
    fn put_back(&self, connection: Http1Connection) {
        if connection.driver.is_none() {
            return;
        }
        let since = self.sweeps.load(Ordering::Relaxed);
        let mut idle = self.lock();
        if idle.http1.len() >= MAX_IDLE {
            idle.http1.pop_front();
        }
        idle.http1.push_back(IdleConnection { connection, since });
    }

    async fn connect(self: &Arc<Self>) -> Result<Sender, PoolError> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(PoolError::Connect)?;
        let io = UpstreamIo::from(
            connector
                .call(self.origin.clone())
                .await
                .map_err(PoolError::Connect)?,
        );
        self.start_sweeping();
        if io.connected().is_negotiated_h2() {
            let (mut sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(PoolError::Handshake)?;
            tokio::spawn(
                connection.map(|ended| log_end(ended, "upstream HTTP/2 connection ended")),
            );
            sender.ready().await.map_err(PoolError::Handshake)?;
            let since = self.sweeps.load(Ordering::Relaxed);
            self.lock().http2 = Some((sender.clone(), since));
            Ok(Sender::Http2(sender))
        } else {
            let (sender, driver) = http1::handshake(io).await.map_err(PoolError::Handshake)?;
            Ok(Sender::Http1(Http1Connection {
                sender,
                driver: Some(Box::new(driver)),
            }))
        }
    }

    /// Starts the idle sweep with the pool's first connection; it ends
    /// with the pool.
    fn start_sweeping(self: &Arc<Self>) {
        if self.sweeping.load(Ordering::Relaxed) || self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(sweep_while_alive(pool));
    }

    /// One sweep: closes the connections unused for `IDLE_SWEEPS` sweeps
    /// and forgets those the upstream closed.
    fn sweep(&self) {
        let now = self.sweeps.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let fresh = |since: u32| now.wrapping_sub(since) < IDLE_SWEEPS;
        for idle in self.idle.iter() {
            let mut idle = idle.lock().unwrap_or_else(PoisonError::into_inner);
            // Driven once each: a connection the upstream closed ends.
            idle.http1
                .retain_mut(|c| fresh(c.since) && c.connection.ready_after_idle());
            if idle
                .http2
                .as_ref()
                .is_some_and(|(sender, since)| !fresh(*since) || sender.is_closed())
            {
                idle.http2 = None;
            }
        }
    }

    /// Idle HTTP/1.1 connections held now.
    #[cfg(test)]
    fn idle_http1(&self) -> usize {
        self.lock().http1.len()
    }

    /// The idle list of the calling thread's worker; off the workers, the
    /// first. (Pools have a list per worker; the modulo only keeps a
    /// mismatched slot from panicking.)
    fn lock(&self) -> MutexGuard<'_, Idle> {
        let list = &self.idle[crate::server::workers::slot() % self.idle.len()];
        // The lists stay consistent whatever a panicking holder did.
        list.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

async fn sweep_while_alive(pool: Weak<OriginPool>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        match pool.upgrade() {
            Some(pool) => pool.sweep(),
            None => return,
        }
    }
}

/// Logs how a connection ended. The HTTP/2 task is spawned as a `map` of
/// the connection rather than in an `async` block, which would hold the
/// connection twice (as captured, and as awaited): 3.6 KB a connection
/// instead of 1.8 (heaptrack, 1,000 open streams).
fn log_end(ended: hyper::Result<()>, message: &'static str) {
    if let Err(e) = ended {
        tracing::debug!(message, error = %e);
    }
}

/// `/path?query` of an absolute URI.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(path) if path.as_str() != "/" => {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = Some(path.clone());
            Uri::from_parts(parts).unwrap_or_default()
        }
        _ => Uri::default(),
    }
}

/// The error and its causes on one line (hyper's top-level message alone,
/// such as "error trying to connect", does not say what happened).
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// An upstream response body. Over HTTP/1.1 it drives its connection
/// (the body's frames come from hyper's reading of it), and returns the
/// connection to the pool once the upstream has sent all of it.
pub struct UpstreamBody {
    inner: Incoming,
    connection: Option<(Arc<OriginPool>, Http1Connection)>,
    /// The body has been polled before.
    polled: bool,
}

impl UpstreamBody {
    fn pooled(inner: Incoming, pool: Arc<OriginPool>, connection: Http1Connection) -> UpstreamBody {
        UpstreamBody {
            inner,
            connection: Some((pool, connection)),
            polled: false,
        }
    }

    fn unpooled(inner: Incoming) -> UpstreamBody {
        UpstreamBody {
            inner,
            connection: None,
            polled: false,
        }
    }

    /// Hands the connection back once the reply is read whole. hyper ends
    /// the reply's message, and the connection turns ready for the next
    /// request, when next driven: by the call that takes it.
    fn put_back(&mut self) {
        if let Some((pool, connection)) = self.connection.take() {
            pool.put_back(connection);
        }
    }

    /// Its frames are read by driving its connection from `poll_frame`
    /// (HTTP/1.1), not delivered by a task of the connection's (HTTP/2).
    pub fn drives_connection(&self) -> bool {
        self.connection.is_some()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        // hyper reads the body into its channel, a frame at a time, when
        // the connection is driven. The first frame usually came with the
        // head, and is read before driving; after it, the channel was
        // emptied by the last poll, and the connection is driven first.
        let polled = match &mut this.connection {
            Some((_, connection)) if this.polled => {
                connection.drive(cx);
                Pin::new(&mut this.inner).poll_frame(cx)
            }
            Some((_, connection)) => {
                this.polled = true;
                match Pin::new(&mut this.inner).poll_frame(cx) {
                    Poll::Pending => {
                        connection.drive(cx);
                        Pin::new(&mut this.inner).poll_frame(cx)
                    }
                    ready => ready,
                }
            }
            None => Pin::new(&mut this.inner).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(None) => this.put_back(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.put_back(),
            // A connection that failed mid-body is not reused.
            Poll::Ready(Some(Err(_))) => this.connection = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body with nothing left to read (no body at all, or one whose
        // last frame came without its end being polled) leaves a
        // connection ready for the next request.
        if self.connection.is_some() && self.inner.is_end_stream() {
            self.put_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use futures_util::StreamExt;
    use http_body_util::combinators::BoxBody;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;
    use crate::proxy::upstream::{connector, Verify};

    /// What the test upstream saw: connections accepted, and each closed
    /// connection reported on `closed`.
    struct Upstream {
        origin: Uri,
        accepted: Arc<AtomicUsize>,
        closed: mpsc::UnboundedReceiver<()>,
    }

    /// An HTTP/1.1 upstream answering each request by its path: `/close`
    /// with `connection: close`, `/unfinished` with a chunk and then
    /// nothing (the body never ends), anything else with its own path.
    async fn upstream() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin: Uri = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (closed_tx, closed) = mpsc::unbounded_channel();
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    let service = service_fn(|request: Request<Incoming>| async move {
                        let path = request.uri().path().to_string();
                        let mut response = if path == "/unfinished" {
                            let frames = futures_util::stream::iter([Ok::<_, Infallible>(
                                Frame::data(Bytes::from_static(b"partial")),
                            )])
                            .chain(futures_util::stream::pending());
                            Response::new(BoxBody::new(StreamBody::new(frames)))
                        } else {
                            Response::new(BoxBody::new(
                                Full::new(Bytes::from(path.clone())).map_err(|n| match n {}),
                            ))
                        };
                        if path == "/close" {
                            response
                                .headers_mut()
                                .insert("connection", "close".parse().unwrap());
                        }
                        Ok::<_, Infallible>(response)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    let _ = closed_tx.send(());
                });
            }
        });
        Upstream {
            origin,
            accepted,
            closed,
        }
    }

    fn pool_for(upstream: &Upstream) -> Arc<OriginPool> {
        let connector = connector(Duration::from_secs(5), Verify::WebpkiRoots, None);
        Arc::new(OriginPool::new(upstream.origin.clone(), connector, 1))
    }

    fn request(upstream: &Upstream, path: &str) -> Request<Full<Bytes>> {
        let authority = upstream.origin.authority().unwrap().as_str();
        Request::builder()
            .uri(format!("http://{authority}{path}"))
            .header("host", authority)
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    async fn call(pool: &Arc<OriginPool>, upstream: &Upstream, path: &str) -> Bytes {
        let response = pool
            .send(request(upstream, path))
            .await
            .expect("a response");
        response.into_body().collect().await.unwrap().to_bytes()
    }

    /// A call takes only connections opened on its own worker thread,
    /// whose tasks run there.
    #[tokio::test]
    async fn each_worker_keeps_its_own_connections() {
        let upstream = upstream().await;
        let connector = connector(Duration::from_secs(5), Verify::WebpkiRoots, None);
        let pool = Arc::new(OriginPool::new(upstream.origin.clone(), connector, 2));
        let workers = crate::server::Workers::start(2).unwrap();
        let mut opened = Vec::new();
        for n in 0..6 {
            let (pool, request) = (Arc::clone(&pool), request(&upstream, &format!("/{n}")));
            let body = workers
                .next()
                .spawn(async move {
                    let response = pool.send(request).await.expect("a response");
                    response.into_body().collect().await.unwrap().to_bytes()
                })
                .await
                .unwrap();
            assert_eq!(body, format!("/{n}"));
            opened.push(upstream.accepted.load(Ordering::SeqCst));
        }
        // Workers 0, 1, 0, 1, 0, 1: each opens one connection, then reuses it.
        assert_eq!(opened, [1, 2, 2, 2, 2, 2]);
        tokio::task::spawn_blocking(move || workers.stop())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn calls_one_after_another_share_one_connection() {
        let upstream = upstream().await;
        let pool = pool_for(&upstream);
        for n in 0..5 {
            let path = format!("/call-{n}");
            assert_eq!(call(&pool, &upstream, &path).await, path);
        }
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_http1(), 1);
    }

    #[tokio::test]
    async fn calls_in_flight_together_each_get_a_connection_kept_for_later() {
        let upstream = upstream().await;
        let pool = pool_for(&upstream);
        // Four response heads held at once: their bodies are not read yet.
        let mut bodies = Vec::new();
        for n in 0..4 {
            let response = pool
                .send(request(&upstream, &format!("/{n}")))
                .await
                .unwrap();
            bodies.push(response.into_body());
        }
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 4);
        for body in bodies {
            body.collect().await.unwrap();
        }
        assert_eq!(pool.idle_http1(), 4);
        for n in 0..8 {
            let path = format!("/again-{n}");
            assert_eq!(call(&pool, &upstream, &path).await, path);
        }
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let mut upstream = upstream().await;
        let pool = pool_for(&upstream);
        let response = pool.send(request(&upstream, "/unfinished")).await.unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "partial");
        drop(body);
        assert_eq!(pool.idle_http1(), 0, "an unfinished connection is not kept");
        upstream
            .closed
            .recv()
            .await
            .expect("the upstream sees it closed");
        // The next call gets its own reply on a new connection, not the
        // rest of the unfinished one.
        assert_eq!(call(&pool, &upstream, "/next").await, "/next");
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_upstream_that_says_connection_close_gets_a_new_connection_each_call() {
        let upstream = upstream().await;
        let pool = pool_for(&upstream);
        for _ in 0..3 {
            assert_eq!(call(&pool, &upstream, "/close").await, "/close");
        }
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn idle_connections_close_after_their_sweeps() {
        let mut upstream = upstream().await;
        let pool = pool_for(&upstream);
        call(&pool, &upstream, "/first").await;
        for _ in 1..IDLE_SWEEPS {
            pool.sweep();
        }
        assert_eq!(pool.idle_http1(), 1, "still fresh");
        // Used again: its age starts over.
        call(&pool, &upstream, "/second").await;
        for _ in 1..IDLE_SWEEPS {
            pool.sweep();
        }
        assert_eq!(pool.idle_http1(), 1, "fresh since its last use");
        pool.sweep();
        assert_eq!(pool.idle_http1(), 0);
        upstream
            .closed
            .recv()
            .await
            .expect("the upstream sees it closed");
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let origin: Uri = format!("http://{address}/").parse().unwrap();
        let connector = connector(Duration::from_secs(5), Verify::WebpkiRoots, None);
        let pool = Arc::new(OriginPool::new(origin, connector, 1));
        let request = Request::builder()
            .uri(format!("http://{address}/v1/chat/completions"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let error = pool.send(request).await.err().expect("no upstream");
        assert!(matches!(error, PoolError::Connect(_)), "{error:?}");
        assert!(error.to_string().contains("refused"), "{error}");
    }

    /// An upstream that closes an idle connection without saying so, just
    /// before a call takes it: the upstream runs on a thread of its own and
    /// the test blocks its runtime until the close is sent, so hyper has not
    /// read the close when the call sends. hyper then writes the request
    /// and reads the close: that call fails (the upstream may have read
    /// the request, and a POST is not sent twice), or, when hyper read the
    /// close first and handed the request back unsent, it goes out on a new
    /// connection. Either way the next call gets its reply.
    #[tokio::test]
    async fn a_connection_closed_while_idle_costs_at_most_the_call_that_races_it() {
        let (upstream, close_tx, closed) = upstream_closing_on_demand();
        let pool = pool_for(&upstream);
        let reply = call(&pool, &upstream, "/v1/chat/completions").await;
        assert_eq!(reply, "ok");
        for _ in 0..5 {
            close_tx.send(()).unwrap();
            // Blocks the runtime: hyper cannot see the close before the
            // next call takes the connection.
            closed
                .recv_timeout(Duration::from_secs(10))
                .expect("the upstream closed it");
            assert_eq!(pool.idle_http1(), 1, "the closed connection looks idle");
            match pool.send(request(&upstream, "/v1/chat/completions")).await {
                Ok(response) => {
                    let reply = response.into_body().collect().await.unwrap().to_bytes();
                    assert_eq!(reply, "ok");
                }
                Err(PoolError::Send(e)) => {
                    assert!(e.is_incomplete_message(), "{e:?}");
                    let reply = call(&pool, &upstream, "/v1/chat/completions").await;
                    assert_eq!(reply, "ok");
                }
                Err(e) => panic!("{e:?}"),
            }
        }
    }

    /// An HTTP/1.1 upstream on a thread of its own: it answers each
    /// connection's first request with `ok`, then closes that connection
    /// when told on the channel it returns, and says so on the second.
    fn upstream_closing_on_demand() -> (
        Upstream,
        std::sync::mpsc::Sender<()>,
        std::sync::mpsc::Receiver<()>,
    ) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let origin: Uri = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let (close_tx, close) = std::sync::mpsc::channel::<()>();
        let (closed_tx, closed) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                counter.fetch_add(1, Ordering::SeqCst);
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                if close.recv().is_err() {
                    return;
                }
                drop(stream);
                if closed_tx.send(()).is_err() {
                    return;
                }
            }
        });
        let upstream = Upstream {
            origin,
            accepted,
            closed: mpsc::unbounded_channel().1,
        };
        (upstream, close_tx, closed)
    }

    /// An idle connection has no task reading it. The upstream closed it
    /// while it sat idle: the next call reads the close before writing its
    /// request (a POST written to it would fail, and is not sent twice),
    /// and gets its reply on a new connection, without waiting.
    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_used() {
        let (upstream, close_tx, closed) = upstream_closing_on_demand();
        let pool = pool_for(&upstream);
        assert_eq!(call(&pool, &upstream, "/v1/chat/completions").await, "ok");
        close_tx.send(()).unwrap();
        closed
            .recv_timeout(Duration::from_secs(10))
            .expect("the upstream closed it");
        // One turn of the runtime: its reactor takes in the close, as it
        // does between calls.
        tokio::task::yield_now().await;
        let sending = pool.send(request(&upstream, "/v1/chat/completions"));
        let response = tokio::time::timeout(Duration::from_secs(10), sending)
            .await
            .expect("an answer, not a wait on the closed connection")
            .expect("sent on a new connection");
        let reply = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(reply, "ok");
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn origin_form_keeps_path_and_query() {
        let uri: Uri = "https://api.example.com/v1/models?limit=2".parse().unwrap();
        assert_eq!(origin_form(&uri), "/v1/models?limit=2");
        let root: Uri = "https://api.example.com".parse().unwrap();
        assert_eq!(origin_form(&root), "/");
    }
}
