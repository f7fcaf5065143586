//! The egress proxy: upstream HTTPS connections through an HTTP `CONNECT`
//! proxy with its credentials, the hosts of `no_proxy` and plain-HTTP
//! upstreams reached directly, a refusing proxy as a 502, config errors.

use std::sync::{Arc, Mutex};

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;
use crate::tls::{https_upstream, own_ca_route, private_ca, CHAT_REPLY};
use tollgate::config::Config;

/// What a `CONNECT` asked for: the target and its `Proxy-Authorization`.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A forward proxy that tunnels `CONNECT` requests, answering 407 to those
/// without `auth` as their `Proxy-Authorization` when `auth` is set.
async fn connect_proxy(auth: Option<&'static str>) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let target = head.split(' ').nth(1).unwrap_or_default().to_string();
                let given = head.lines().find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("proxy-authorization")
                        .then(|| value.trim().to_string())
                });
                record.lock().unwrap().push((target.clone(), given.clone()));
                if auth.is_some() && given.as_deref() != auth {
                    let _ = client
                        .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nproxy-authenticate: Basic\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let Ok(mut upstream) = TcpStream::connect(&target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, seen)
}

/// A route to an HTTPS upstream whose certificate `ca_path` issued, with
/// `[egress]` as given.
fn config(ca_path: &str, egress: &str) -> String {
    format!("{}\n[egress]\n{egress}\n", own_ca_route(ca_path))
}

/// An HTTPS upstream with a certificate of a private CA: the directory
/// holding the CA's PEM file, its path, the upstream's URL and task.
async fn private_upstream() -> (
    tempfile::TempDir,
    String,
    String,
    tokio::task::JoinHandle<()>,
) {
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, server_cert) = private_ca();
    let ca_path = dir.path().join("ca.pem").display().to_string();
    std::fs::write(&ca_path, ca_pem).unwrap();
    let (url, upstream) = https_upstream(&server_cert).await;
    (dir, ca_path, url, upstream)
}

const BODY: &str = r#"{"model":"gpt-4o-mini","messages":[]}"#;

#[tokio::test]
async fn https_upstreams_go_through_the_egress_proxy_with_its_credentials() {
    let (_dir, ca_path, url, upstream) = private_upstream().await;
    // base64("agent:s3cret")
    let (proxy, seen) = connect_proxy(Some("Basic YWdlbnQ6czNjcmV0")).await;

    let egress = format!("proxy = \"http://agent:s3cret@{proxy}\"");
    let tollgate = Proxy::start(&config(&ca_path, &egress), &url).await;
    let response = post_json(&tollgate.url("/openai/v1/chat/completions"), &[], BODY).await;
    assert_eq!(response.status(), 200);
    assert_eq!(body_bytes(response).await, CHAT_REPLY);
    let target = url.trim_start_matches("https://").to_string();
    assert_eq!(
        *seen.lock().unwrap(),
        [(target, Some("Basic YWdlbnQ6czNjcmV0".to_string()))]
    );
    tollgate.shutdown().await;

    // Credentials the proxy refuses: a 502 that says so, in the
    // provider's error shape.
    let egress = format!("proxy = \"http://agent:wrong@{proxy}\"");
    let tollgate = Proxy::start(&config(&ca_path, &egress), &url).await;
    let response = post_json(&tollgate.url("/openai/v1/chat/completions"), &[], BODY).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let text = String::from_utf8(body_bytes(response).await.to_vec()).unwrap();
    assert!(
        text.contains(&format!(
            "egress proxy {proxy}: tunnel error: proxy authorization required"
        )),
        "{text}"
    );
    assert!(text.contains("\"error\""), "{text}");
    assert_eq!(seen.lock().unwrap().len(), 2);
    tollgate.shutdown().await;
    upstream.abort();
}

#[tokio::test]
async fn no_proxy_hosts_and_plain_http_upstreams_are_reached_directly() {
    let (_dir, ca_path, url, upstream) = private_upstream().await;
    let (proxy, seen) = connect_proxy(None).await;

    let egress = format!("proxy = \"http://{proxy}\"\nno_proxy = \"example.com, 127.0.0.0/8\"");
    let tollgate = Proxy::start(&config(&ca_path, &egress), &url).await;
    let response = post_json(&tollgate.url("/openai/v1/chat/completions"), &[], BODY).await;
    assert_eq!(response.status(), 200);
    tollgate.shutdown().await;

    let mock = MockUpstream::start(|_| MockReply::json(200, CHAT_REPLY)).await;
    let plain = format!(
        "[egress]\nproxy = \"http://{proxy}\"\n{}",
        config_all_routes()
    );
    let tollgate = Proxy::start(&plain, &mock.url()).await;
    let response = post_json(&tollgate.url("/openai/v1/chat/completions"), &[], BODY).await;
    assert_eq!(response.status(), 200);
    assert_eq!(mock.hits(), 1);
    tollgate.shutdown().await;

    assert!(
        seen.lock().unwrap().is_empty(),
        "{:?}",
        seen.lock().unwrap()
    );
    upstream.abort();
}

#[test]
fn egress_proxy_errors_name_the_key() {
    for proxy in [
        "https://proxy.internal:3128",
        "proxy.internal:3128",
        "http://",
        "http://proxy.internal:3128/path",
    ] {
        let err = Config::from_toml(
            &format!("[egress]\nproxy = \"{proxy}\"\n"),
            "test.toml",
            ".".into(),
        )
        .unwrap_err();
        assert_eq!(err.issues.len(), 1, "{proxy}: {err}");
        assert_eq!(err.issues[0].key, "egress.proxy", "{proxy}");
        assert_eq!(err.issues[0].line, Some(2), "{proxy}");
    }
    let config = Config::from_toml(
        "[egress]\nproxy = \"http://user:pw@proxy.internal:3128\"\nno_proxy = \"localhost\"\n",
        "test.toml",
        ".".into(),
    )
    .unwrap();
    assert!(config.egress.is_some());
}

#[tokio::test]
async fn a_proxy_that_never_answers_connect_is_a_502_within_the_connect_timeout() {
    let (_dir, ca_path, url, upstream) = private_upstream().await;
    // Accepts, reads the CONNECT and never answers it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            held.push(socket);
        }
    });

    let egress = format!("proxy = \"http://{proxy}\"\n[limits]\nupstream_connect_timeout_ms = 200");
    let tollgate = Proxy::start(&config(&ca_path, &egress), &url).await;
    let response = post_json(&tollgate.url("/openai/v1/chat/completions"), &[], BODY).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let text = String::from_utf8(body_bytes(response).await.to_vec()).unwrap();
    assert!(
        text.contains(&format!("egress proxy {proxy}: no tunnel within 200 ms")),
        "{text}"
    );
    tollgate.shutdown().await;
    silent.abort();
    upstream.abort();
}
