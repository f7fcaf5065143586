//! The egress proxy: upstream HTTPS connections opened through an HTTP
//! forward proxy with `CONNECT` (`[egress] proxy`), as curl and httpx do
//! with `HTTPS_PROXY`, except for the hosts `[egress] no_proxy` lists.
//! TLS to the upstream runs inside the tunnel, so the proxy sees only the
//! host and port. Plain `http://` upstreams are always reached directly.
//!
//! hyper-util provides the pieces (`Matcher` reads the proxy URL, its
//! credentials and the no-proxy list the way curl does; `Tunnel` makes the
//! `CONNECT`); this connector only chooses between the tunnel and the
//! direct connection for each new upstream connection.
//!
//! Its connections report no extras to the pooled client. hyper-util's TCP
//! stream reports its addresses (`HttpInfo`), which the client then copies
//! into every response's extensions: three allocations a call for
//! something tollgate never reads.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connects to upstreams directly or, for HTTPS destinations the matcher
/// intercepts, through the egress proxy's tunnel.
#[derive(Clone)]
pub struct EgressConnector {
    direct: HttpConnector,
    proxy: Option<Arc<Matcher>>,
    /// Bounds the whole tunnel set-up (TCP to the proxy and its answer to
    /// `CONNECT`), as it bounds a direct TCP connect: a proxy that accepts
    /// and never answers is a connect failure, not a wait for the response
    /// timeout.
    connect_timeout: Duration,
}

impl EgressConnector {
    pub fn new(
        direct: HttpConnector,
        proxy: Option<Arc<Matcher>>,
        connect_timeout: Duration,
    ) -> Self {
        EgressConnector {
            direct,
            proxy,
            connect_timeout,
        }
    }
}

impl Service<Uri> for EgressConnector {
    type Response = UpstreamStream;
    type Error = BoxError;
    // A connection is opened once per pooled connection, not per call: one
    // box there is not worth a hand-written future.
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let intercept = match &self.proxy {
            Some(matcher) if dst.scheme() == Some(&http::uri::Scheme::HTTPS) => {
                matcher.intercept(&dst)
            }
            _ => None,
        };
        match intercept {
            Some(intercept) => {
                let mut tunnel = Tunnel::new(intercept.uri().clone(), self.direct.clone());
                if let Some(auth) = intercept.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                let timeout = self.connect_timeout;
                Box::pin(async move {
                    let proxy = || proxy_address(&intercept.uri().to_string());
                    std::future::poll_fn(|cx| tunnel.poll_ready(cx)).await?;
                    match tokio::time::timeout(timeout, tunnel.call(dst)).await {
                        Ok(tunnelled) => tunnelled
                            .map(UpstreamStream)
                            .map_err(|e| format!("egress proxy {}: {e}", proxy()).into()),
                        Err(_) => Err(format!(
                            "egress proxy {}: no tunnel within {} ms",
                            proxy(),
                            timeout.as_millis()
                        )
                        .into()),
                    }
                })
            }
            None => {
                let connecting = self.direct.call(dst);
                Box::pin(async move { connecting.await.map(UpstreamStream).map_err(Into::into) })
            }
        }
    }
}

/// An upstream TCP connection (direct or tunnelled) that reports no
/// extras to the pooled client.
pub struct UpstreamStream(TokioIo<TcpStream>);

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl Read for UpstreamStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl Write for UpstreamStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

/// `host:port` of a proxy URL, without the credentials it may carry: what
/// logs and error messages name.
pub fn proxy_address(proxy: &str) -> String {
    match proxy.parse::<Uri>() {
        Ok(uri) => format!(
            "{}:{}",
            uri.host().unwrap_or_default(),
            uri.port_u16().unwrap_or(80)
        ),
        Err(_) => "(invalid proxy URL)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_is_named_without_its_credentials() {
        assert_eq!(
            proxy_address("http://agent:s3cret@proxy.internal:3128"),
            "proxy.internal:3128"
        );
        assert_eq!(proxy_address("http://proxy.internal"), "proxy.internal:80");
        assert_eq!(proxy_address("http://[::1]:8080/"), "[::1]:8080");
    }
}
