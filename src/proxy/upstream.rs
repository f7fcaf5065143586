//! The upstream side: a connection pool per origin ([`super::pool`]) over
//! rustls (webpki roots, ALPN for HTTP/2), and the rewrite of a client
//! request into the upstream one. Connect failures (a certificate that
//! does not verify included) map to 502, a missing response head past the
//! configured time to 504 (pingora's source-based mapping). The origins of
//! routes with `tls_insecure_skip_verify` connect with a verifier that
//! accepts any certificate; those of routes with their own CA
//! (`tls_ca_path`) verify against it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::config::{AttributionHeaders, Route};
use crate::proxy::egress::EgressConnector;
use crate::proxy::error::ProxyError;
use crate::proxy::pool::{Connector, OriginPool, PoolError, UpstreamBody};

type EgressMatcher = Option<Arc<hyper_util::client::proxy::matcher::Matcher>>;

/// The upstream connections: a pool per origin of the route table, each
/// opening its connections with the certificate verification its routes
/// ask for (the webpki roots, their own CA, or none).
pub struct UpstreamClient {
    verified: Connector,
    insecure: Connector,
    pools: ArcSwap<Pools>,
    connect_timeout: Duration,
    egress: EgressMatcher,
    /// Worker threads, each with its own idle list in every pool.
    workers: usize,
}

/// The pools of the route table's origins, by authority, then scheme.
#[derive(Default)]
struct Pools(HashMap<Box<str>, Vec<OriginEntry>, foldhash::fast::FixedState>);

struct OriginEntry {
    scheme: Scheme,
    verify: VerifyKind,
    pool: Arc<OriginPool>,
}

/// What a reload compares of an origin's verification (routes sharing an
/// origin agree: the config is validated so).
#[derive(Clone, Copy, PartialEq, Eq)]
enum VerifyKind {
    WebpkiRoots,
    OwnCa,
    AcceptAny,
}

impl Pools {
    fn get(&self, scheme: &Scheme, authority: &Authority) -> Option<&OriginEntry> {
        self.0
            .get(authority.as_str())?
            .iter()
            .find(|entry| entry.scheme == *scheme)
    }
}

/// How a connector verifies upstream certificates.
pub(super) enum Verify<'a> {
    WebpkiRoots,
    Roots(&'a rustls::RootCertStore),
    AcceptAny,
}

impl<'a> Verify<'a> {
    fn of(route: &'a Route) -> Verify<'a> {
        match &route.tls_ca {
            _ if route.tls_insecure_skip_verify => Verify::AcceptAny,
            Some(ca) => Verify::Roots(&ca.roots),
            None => Verify::WebpkiRoots,
        }
    }

    fn kind(&self) -> VerifyKind {
        match self {
            Verify::WebpkiRoots => VerifyKind::WebpkiRoots,
            Verify::Roots(_) => VerifyKind::OwnCa,
            Verify::AcceptAny => VerifyKind::AcceptAny,
        }
    }
}

impl UpstreamClient {
    /// Takes the origins of a (re)loaded route table, warning for each
    /// route that opted out of verification. An origin whose verification
    /// is unchanged keeps its pool and open connections; one with its own
    /// CA gets a new pool, so a reload reads a rotated CA file.
    pub fn set_routes(&self, routes: &[Route]) {
        let current = self.pools.load();
        let mut pools = Pools::default();
        for route in routes {
            if route.tls_insecure_skip_verify {
                tracing::warn!(
                    message = "upstream certificate verification is OFF for this route (tls_insecure_skip_verify)",
                    route = %route.name,
                    upstream = %format_args!("{}://{}", route.upstream_origin, route.upstream_authority),
                );
            }
            if pools
                .get(&route.upstream_origin, &route.upstream_authority)
                .is_some()
            {
                continue;
            }
            let verify = Verify::of(route).kind();
            let pool = match current.get(&route.upstream_origin, &route.upstream_authority) {
                Some(kept) if kept.verify == verify && verify != VerifyKind::OwnCa => {
                    Arc::clone(&kept.pool)
                }
                _ => Arc::new(self.new_pool(route)),
            };
            pools
                .0
                .entry(route.upstream_authority.as_str().into())
                .or_default()
                .push(OriginEntry {
                    scheme: route.upstream_origin.clone(),
                    verify,
                    pool,
                });
        }
        self.pools.store(Arc::new(pools));
    }

    /// The pool of `route`'s origin. A route the table does not hold (its
    /// call began before a reload removed or changed it) gets a pool of
    /// its own for this call.
    fn pool_for(&self, route: &Route) -> Arc<OriginPool> {
        match self
            .pools
            .load()
            .get(&route.upstream_origin, &route.upstream_authority)
        {
            Some(entry) => Arc::clone(&entry.pool),
            None => Arc::new(self.new_pool(route)),
        }
    }

    fn new_pool(&self, route: &Route) -> OriginPool {
        let connector = match Verify::of(route) {
            Verify::AcceptAny => self.insecure.clone(),
            Verify::WebpkiRoots => self.verified.clone(),
            own_ca => connector(self.connect_timeout, own_ca, self.egress.clone()),
        };
        let origin = Uri::builder()
            .scheme(route.upstream_origin.clone())
            .authority(route.upstream_authority.clone())
            .path_and_query("/")
            .build()
            .unwrap_or_default();
        OriginPool::new(origin, connector, self.workers)
    }
}

/// Builds the upstream client for `routes`, connecting through the egress
/// proxy where `egress` says so, for calls on `workers` worker threads.
pub fn build_client(
    connect_timeout: Duration,
    routes: &[Route],
    egress: EgressMatcher,
    workers: usize,
) -> UpstreamClient {
    let client = UpstreamClient {
        verified: connector(connect_timeout, Verify::WebpkiRoots, egress.clone()),
        insecure: connector(connect_timeout, Verify::AcceptAny, egress.clone()),
        pools: ArcSwap::from_pointee(Pools::default()),
        connect_timeout,
        egress,
        workers,
    };
    client.set_routes(routes);
    client
}

pub(super) fn connector(
    connect_timeout: Duration,
    verify: Verify<'_>,
    egress: EgressMatcher,
) -> Connector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let http = EgressConnector::new(http, egress, connect_timeout);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map(|b| match verify {
            Verify::AcceptAny => b
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
                .with_no_client_auth(),
            Verify::WebpkiRoots => b
                .with_root_certificates(rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                })
                .with_no_client_auth(),
            Verify::Roots(roots) => b
                .with_root_certificates(roots.clone())
                .with_no_client_auth(),
        });
    match tls {
        Ok(tls) => hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http),
        // The ring provider always supports the default protocol versions;
        // fall back to the crate's own defaults rather than fail.
        Err(_) => hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http),
    }
}

/// The verifier of `tls_insecure_skip_verify` routes: any certificate is
/// accepted; handshake signatures are still checked so the TLS session
/// itself is sound.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Headers that describe one hop and never cross the proxy (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 9] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Many messages carry none: looking is cheaper than nine removals.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The upstream URI: the route's origin and base path, the path after the
/// route prefix, and the query unchanged.
pub fn upstream_uri(route: &Route, rest: &str, query: Option<&str>) -> Result<Uri, ProxyError> {
    let mut path_and_query = String::with_capacity(
        route.upstream_path.len() + rest.len() + 1 + query.map_or(0, str::len),
    );
    path_and_query.push_str(&route.upstream_path);
    path_and_query.push_str(rest);
    if path_and_query.is_empty() {
        path_and_query.push('/');
    }
    if let Some(query) = query {
        path_and_query.push('?');
        path_and_query.push_str(query);
    }
    Uri::builder()
        .scheme(route.upstream_origin.clone())
        .authority(route.upstream_authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| ProxyError::BadRequest(format!("cannot build the upstream URI: {e}")))
}

/// Builds the upstream request: method, the client's headers (moved, less
/// hop-by-hop, attribution and Expect; Host replaced by the route's), and
/// the (possibly rewritten) body.
pub fn upstream_request(
    method: http::Method,
    mut headers: HeaderMap,
    uri: Uri,
    route: &Route,
    attribution: &AttributionHeaders,
    body: Bytes,
    identity_encoding: bool,
) -> Request<Full<Bytes>> {
    strip_hop_by_hop(&mut headers);
    // Removing a name hashes it, present or not: only those present.
    let present =
        super::attribution::find(&headers, attribution).map(|(name, f)| (name, f.value.is_some()));
    for (name, present) in present {
        if present {
            headers.remove(name);
        }
    }
    headers.remove(http::header::EXPECT);
    headers.remove(http::header::CONTENT_LENGTH);
    if identity_encoding {
        // The response is edited (usage chunk removed), so it must arrive
        // uncompressed; the client accepts identity whatever it asked for.
        headers.insert(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    // Replaces the client's Host, if any; a clone shares the route's bytes.
    headers.insert(http::header::HOST, route.upstream_host.clone());
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    request
}

/// Sends the request on a connection of `route`'s origin, waiting at most
/// `timeout` for the response head (connecting included).
pub async fn send(
    client: &UpstreamClient,
    route: &Route,
    request: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<http::Response<UpstreamBody>, ProxyError> {
    let pool = client.pool_for(route);
    // Boxed: hyper keeps room for the call's future, this one included, in
    // every client connection for as long as it is open (~1 KB a
    // connection unboxed, measured with 1,000 open streams).
    let sending = Box::pin(pool.send(request));
    match tokio::time::timeout(timeout, sending).await {
        Err(_) => Err(ProxyError::UpstreamTimeout(timeout.as_millis() as u64)),
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e @ (PoolError::Connect(_) | PoolError::Handshake(_)))) => {
            Err(ProxyError::UpstreamConnect(e.to_string()))
        }
        Ok(Err(e @ PoolError::Send(_))) => Err(ProxyError::Upstream(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(skip_verify: bool) -> Vec<Route> {
        let text = format!(
            r#"
[[routes]]
name = "a"
prefix = "/a"
upstream = "https://llm.example.com"
kind = "openai"
tls_insecure_skip_verify = {skip_verify}

[[routes]]
name = "b"
prefix = "/b"
upstream = "https://llm.example.com/v2"
kind = "openai"
tls_insecure_skip_verify = {skip_verify}

[[routes]]
name = "c"
prefix = "/c"
upstream = "http://llm.example.com"
kind = "openai"
"#
        );
        crate::config::Config::from_toml(&text, "test.toml", ".".into())
            .unwrap()
            .routes
    }

    #[test]
    fn routes_of_one_origin_share_a_pool_that_a_reload_keeps_unless_verification_changes() {
        let client = build_client(Duration::from_secs(1), &routes(false), None, 1);
        let [a, b, c] = &routes(false)[..] else {
            panic!("three routes")
        };
        let pool = client.pool_for(a);
        assert!(Arc::ptr_eq(&pool, &client.pool_for(b)), "same origin");
        assert!(!Arc::ptr_eq(&pool, &client.pool_for(c)), "another scheme");

        client.set_routes(&routes(false));
        assert!(Arc::ptr_eq(&pool, &client.pool_for(a)), "kept by a reload");

        client.set_routes(&routes(true));
        assert!(
            !Arc::ptr_eq(&pool, &client.pool_for(a)),
            "verification changed"
        );
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", "keep-alive, x-secret-hop".parse().unwrap());
        headers.insert("x-secret-hop", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("transfer-encoding", "chunked".parse().unwrap());
        headers.insert("authorization", "Bearer k".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("authorization"));
    }
}
