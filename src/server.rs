//! Accept loop shared by the agent and admin listeners: hyper-util's
//! auto (HTTP/1.1 + h2c) connection builder, limits on header size, count and
//! read time, one task per connection, and graceful shutdown that stops
//! accepting and drains open connections up to a bound. With a TLS config
//! (`[server.tls]`) each accepted stream is a TLS handshake first (ALPN `h2`
//! and `http/1.1`, within the header read time); a failed handshake drops
//! that connection only.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::LimitsConfig;
use crate::proxy::{ConnInfo, ProxyBody};

/// Serves `listener` with `handler` until `shutdown` resolves, then drains.
pub async fn serve<H, Fut>(
    listener: TcpListener,
    limits: LimitsConfig,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static,
{
    serve_tls(listener, None, limits, handler, shutdown).await
}

/// As [`serve`], terminating TLS with `tls` when given.
pub async fn serve_tls<H, Fut>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: LimitsConfig,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static,
{
    let acceptor = tls.map(TlsAcceptor::from);
    let handshake_timeout = limits.header_read_timeout();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout())
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32);
    let graceful = GracefulShutdown::new();
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
        let info = local.map(|local| ConnInfo { local, remote });
        let handler = handler.clone();
        let service = service_fn(move |mut request: Request<Incoming>| {
            if let Some(info) = info {
                request.extensions_mut().insert(info);
            }
            handler(request)
        });
        let Some(acceptor) = acceptor.clone() else {
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let connection = graceful.watch(connection);
            connections.spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(message = "connection ended with an error", %error);
                }
            });
            continue;
        };
        // The handshake runs on the connection's own task so a slow client
        // never holds up the accept loop; the watcher makes shutdown wait
        // for it like for any open connection.
        let watcher = graceful.watcher();
        let builder = builder.clone();
        connections.spawn(async move {
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
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(message = "connection ended with an error", %error);
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_drain(), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(message = "shutdown drain time passed; closing the remaining connections");
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}
