//! TLS: termination on the agent listener (HTTP/1.1 and HTTP/2 by ALPN),
//! config errors naming the key, and upstream certificate verification with
//! its per-route opt-out and per-route CA.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

use crate::support::*;
use tollgate::config::Config;

const GUARD: Duration = Duration::from_secs(10);

pub(crate) const CHAT_REPLY: &str = r#"{"id":"c1","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12}}"#;

/// A self-signed certificate for 127.0.0.1 and localhost.
pub(crate) struct TestCert {
    der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    key_der: Vec<u8>,
}

fn self_signed() -> TestCert {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    TestCert {
        der: certified.cert.der().clone(),
        cert_pem: certified.cert.pem(),
        key_pem: certified.signing_key.serialize_pem(),
        key_der: certified.signing_key.serialize_der(),
    }
}

/// A private CA (its certificate as PEM) and a certificate for 127.0.0.1 and
/// localhost that it signed.
pub(crate) fn private_ca() -> (String, TestCert) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tollgate test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
    let server = TestCert {
        der: cert.der().clone(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        key_der: key.serialize_der(),
    };
    (ca.pem(), server)
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client that trusts only `cert`, speaking HTTP/1.1 or (ALPN) HTTP/2.
fn https_client(
    cert: &TestCert,
    http2: bool,
) -> Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only();
    let connector = if http2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build(connector)
}

/// Writes the certificate and key as PEM files into `dir`.
fn write_pem(dir: &std::path::Path, cert: &TestCert) -> (String, String) {
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, &cert.cert_pem).unwrap();
    std::fs::write(&key_path, &cert.key_pem).unwrap();
    (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    )
}

fn tls_config(cert_path: &str, key_path: &str) -> String {
    format!(
        "[server.tls]\ncert_path = \"{cert_path}\"\nkey_path = \"{key_path}\"\n{}",
        config_all_routes()
    )
}

#[tokio::test]
async fn agent_listener_terminates_tls_for_http1_and_http2() {
    let upstream = MockUpstream::start(|_| MockReply::json(200, CHAT_REPLY)).await;
    let cert = self_signed();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = write_pem(dir.path(), &cert);
    let proxy = Proxy::start(&tls_config(&cert_path, &key_path), &upstream.url()).await;
    let url = format!(
        "https://127.0.0.1:{}/openai/v1/chat/completions",
        proxy.agent.port()
    );

    for (http2, version) in [(false, Version::HTTP_11), (true, Version::HTTP_2)] {
        let request = Request::post(&url)
            .header("content-type", "application/json")
            .header("x-agent-run-id", "tls-run")
            .body(Full::new(Bytes::from_static(
                br#"{"model":"gpt-4o-mini","messages":[]}"#,
            )))
            .unwrap();
        let response = tokio::time::timeout(GUARD, https_client(&cert, http2).request(request))
            .await
            .expect("bounded")
            .expect("the HTTPS call succeeds");
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), version);
        assert_eq!(body_bytes(response).await, CHAT_REPLY);
    }
    assert_eq!(upstream.hits(), 2);
    // Plain HTTP and the upstream both saw nothing of TLS: the upstream got
    // an ordinary request without attribution headers.
    assert!(upstream.last().headers.get("x-agent-run-id").is_none());

    // Plain HTTP to the TLS port is not served.
    let plain = tokio::time::timeout(
        GUARD,
        client().request(
            Request::get(format!("http://{}/openai/v1/models", proxy.agent))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .expect("bounded");
    match plain {
        Err(_) => {}
        Ok(response) => panic!("plain HTTP was answered: {}", response.status()),
    }
    assert_eq!(upstream.hits(), 2);

    // The listener still serves TLS after the failed handshake.
    let response = tokio::time::timeout(
        GUARD,
        https_client(&cert, false).request(
            Request::get(format!(
                "https://127.0.0.1:{}/openai/v1/models",
                proxy.agent.port()
            ))
            .body(Full::new(Bytes::new()))
            .unwrap(),
        ),
    )
    .await
    .expect("bounded")
    .expect("TLS still works");
    assert_eq!(response.status(), 200);
    proxy.shutdown().await;
}

#[test]
fn tls_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem").display().to_string();
    let load = |text: &str| Config::from_toml(text, "test.toml", dir.path().into());

    let err = load(&format!(
        "[server.tls]\ncert_path = \"{missing}\"\nkey_path = \"{missing}\"\n"
    ))
    .unwrap_err();
    assert_eq!(err.issues[0].key, "server.tls.cert_path");
    assert!(
        err.to_string()
            .contains("server.tls.cert_path (line 2): cannot read"),
        "{err}"
    );

    let cert = self_signed();
    let (cert_path, key_path) = write_pem(dir.path(), &cert);
    let err = load(&format!(
        "[server.tls]\ncert_path = \"{key_path}\"\nkey_path = \"{key_path}\"\n"
    ))
    .unwrap_err();
    assert_eq!(err.issues[0].key, "server.tls.cert_path", "{err}");
    let err = load(&format!(
        "[server.tls]\ncert_path = \"{cert_path}\"\nkey_path = \"{cert_path}\"\n"
    ))
    .unwrap_err();
    assert_eq!(err.issues[0].key, "server.tls.key_path", "{err}");

    // A key that is not the certificate's.
    let other = self_signed();
    let other_key = dir.path().join("other.pem");
    std::fs::write(&other_key, &other.key_pem).unwrap();
    let err = load(&format!(
        "[server.tls]\ncert_path = \"{cert_path}\"\nkey_path = \"{}\"\n",
        other_key.display()
    ))
    .unwrap_err();
    assert_eq!(err.issues[0].key, "server.tls.key_path", "{err}");

    let config = load(&format!(
        "[server.tls]\ncert_path = \"{cert_path}\"\nkey_path = \"{key_path}\"\n"
    ))
    .unwrap();
    let tls = config.server_tls.expect("TLS configured");
    assert_eq!(tls.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
}

/// An HTTPS upstream with a self-signed certificate that offers HTTP/2 and
/// HTTP/1.1 (ALPN) and answers every request with `CHAT_REPLY`, naming the
/// HTTP version the request came in (`x-upstream-version`).
pub(crate) async fn https_upstream(cert: &TestCert) -> (String, tokio::task::JoinHandle<()>) {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.clone()));
    let mut config = rustls::ServerConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der.clone()], key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = service_fn(|request: Request<Incoming>| async move {
                    let mut response =
                        Response::new(Full::new(Bytes::from_static(CHAT_REPLY.as_bytes())));
                    let headers = response.headers_mut();
                    headers.insert("content-type", "application/json".parse().unwrap());
                    let version = format!("{:?}", request.version());
                    headers.insert("x-upstream-version", version.parse().unwrap());
                    Ok::<_, std::convert::Infallible>(response)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, task)
}

fn upstream_route(skip_verify: bool) -> String {
    format!(
        r#"
[pricing]
files = ["{TEST_PRICING}"]

[[routes]]
name = "local-llm"
prefix = "/openai"
upstream = "{{upstream}}"
kind = "openai"
tls_insecure_skip_verify = {skip_verify}
"#
    )
}

#[tokio::test]
async fn upstream_certificates_are_verified_unless_the_route_opts_out() {
    let cert = self_signed();
    let (url, task) = https_upstream(&cert).await;
    let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;

    let proxy = Proxy::start(&upstream_route(false), &url).await;
    let response = post_json(&proxy.url("/openai/v1/chat/completions"), &[], body).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let text = String::from_utf8(body_bytes(response).await.to_vec()).unwrap();
    assert!(text.contains("certificate"), "{text}");
    proxy.shutdown().await;

    let proxy = Proxy::start(&upstream_route(true), &url).await;
    let response = post_json(&proxy.url("/openai/v1/chat/completions"), &[], body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(body_bytes(response).await, CHAT_REPLY);
    proxy.shutdown().await;
    task.abort();
}

/// An HTTPS upstream whose TLS handshake chooses HTTP/2 is spoken to in
/// HTTP/2, call after call: the pool reads the ALPN result through the
/// connection's stream.
#[tokio::test]
async fn an_upstream_that_chooses_http2_in_the_tls_handshake_gets_http2() {
    let cert = self_signed();
    let (url, task) = https_upstream(&cert).await;
    let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    let proxy = Proxy::start(&upstream_route(true), &url).await;
    for _ in 0..2 {
        let response = post_json(&proxy.url("/openai/v1/chat/completions"), &[], body).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-upstream-version"], "HTTP/2.0");
        assert_eq!(body_bytes(response).await, CHAT_REPLY);
    }
    proxy.shutdown().await;
    task.abort();
}

#[test]
fn routes_sharing_an_upstream_must_agree_on_verification() {
    let err = Config::from_toml(
        r#"
[[routes]]
name = "a"
prefix = "/a"
upstream = "https://127.0.0.1:8443"
kind = "openai"
tls_insecure_skip_verify = true

[[routes]]
name = "b"
prefix = "/b"
upstream = "https://127.0.0.1:8443/v2"
kind = "openai"
"#,
        "test.toml",
        ".".into(),
    )
    .unwrap_err();
    assert_eq!(err.issues[0].key, "routes[1].tls_insecure_skip_verify");
}

pub(crate) fn own_ca_route(ca_path: &str) -> String {
    format!(
        r#"
[pricing]
files = ["{TEST_PRICING}"]

[[routes]]
name = "private-llm"
prefix = "/openai"
upstream = "{{upstream}}"
kind = "openai"
tls_ca_path = "{ca_path}"
"#
    )
}

#[tokio::test]
async fn a_route_verifies_its_upstream_against_its_own_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, server_cert) = private_ca();
    let (other_ca_pem, _) = private_ca();
    let ca_path = dir.path().join("ca.pem");
    let other_ca_path = dir.path().join("other-ca.pem");
    std::fs::write(&ca_path, ca_pem).unwrap();
    std::fs::write(&other_ca_path, other_ca_pem).unwrap();
    let (url, task) = https_upstream(&server_cert).await;
    let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    let call = |proxy: &Proxy| {
        let url = proxy.url("/openai/v1/chat/completions");
        async move { post_json(&url, &[], body).await }
    };

    // The webpki roots do not know the private CA.
    let proxy = Proxy::start(&upstream_route(false), &url).await;
    assert_eq!(call(&proxy).await.status(), StatusCode::BAD_GATEWAY);
    proxy.shutdown().await;

    let proxy = Proxy::start(&own_ca_route(&ca_path.display().to_string()), &url).await;
    let response = call(&proxy).await;
    assert_eq!(response.status(), 200);
    assert_eq!(body_bytes(response).await, CHAT_REPLY);
    proxy.shutdown().await;

    // Another CA does not verify it: the route's CA is used, not "any".
    let proxy = Proxy::start(&own_ca_route(&other_ca_path.display().to_string()), &url).await;
    let response = call(&proxy).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let text = String::from_utf8(body_bytes(response).await.to_vec()).unwrap();
    assert!(text.contains("certificate"), "{text}");
    proxy.shutdown().await;
    task.abort();
}

#[test]
fn tls_ca_path_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, server_cert) = private_ca();
    std::fs::write(dir.path().join("ca.pem"), ca_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), &server_cert.key_pem).unwrap();
    let load = |route: &str| {
        let text =
            format!("[[routes]]\nname = \"a\"\nprefix = \"/a\"\nkind = \"openai\"\n{route}\n");
        Config::from_toml(&text, "test.toml", dir.path().into())
    };
    let issue = |route: &str| {
        let err = load(route).unwrap_err();
        assert_eq!(err.issues.len(), 1, "{err}");
        (err.issues[0].key.clone(), err.issues[0].message.clone())
    };

    // A relative path resolves against the base directory.
    let config = load("upstream = \"https://127.0.0.1:8443\"\ntls_ca_path = \"ca.pem\"").unwrap();
    let ca = config.routes[0].tls_ca.as_ref().expect("the route's CA");
    assert_eq!(ca.roots.len(), 1);

    let (key, message) =
        issue("upstream = \"https://127.0.0.1:8443\"\ntls_ca_path = \"missing.pem\"");
    assert_eq!(key, "routes[0].tls_ca_path");
    assert!(
        message.starts_with("cannot read `missing.pem`"),
        "{message}"
    );

    let (key, message) = issue("upstream = \"https://127.0.0.1:8443\"\ntls_ca_path = \"key.pem\"");
    assert_eq!(key, "routes[0].tls_ca_path");
    assert_eq!(message, "`key.pem` holds no PEM certificate");

    let (key, message) = issue(
        "upstream = \"https://127.0.0.1:8443\"\ntls_ca_path = \"ca.pem\"\ntls_insecure_skip_verify = true",
    );
    assert_eq!(key, "routes[0].tls_ca_path");
    assert!(message.contains("tls_insecure_skip_verify"), "{message}");

    let (key, message) = issue("upstream = \"http://127.0.0.1:8080\"\ntls_ca_path = \"ca.pem\"");
    assert_eq!(key, "routes[0].tls_ca_path");
    assert!(message.contains("https://"), "{message}");

    // Routes sharing an upstream share its connection pool, so its CA.
    let err = load(
        "upstream = \"https://127.0.0.1:8443\"\ntls_ca_path = \"ca.pem\"\n\
         [[routes]]\nname = \"b\"\nprefix = \"/b\"\nkind = \"openai\"\nupstream = \"https://127.0.0.1:8443/v2\"",
    )
    .unwrap_err();
    assert_eq!(err.issues[0].key, "routes[1].tls_ca_path", "{err}");
}
