//! Test support: an in-process tollgate on port 0, a scripted mock upstream,
//! a client, and a `/metrics` reader.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use tollgate::budget::{Clock, ManualClock};
use tollgate::config::Config;
use tollgate::{AppState, Listeners, Tollgate};

pub use crate::metrics_text::metric_sum;
use crate::metrics_text::series_values;
use crate::services::PostgresServer;

pub type TestBody = BoxBody<Bytes, std::io::Error>;

/// A request as the mock upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What the mock answers.
pub struct MockReply {
    pub status: StatusCode,
    pub headers: Vec<(String, String)>,
    pub body: MockBody,
}

pub enum MockBody {
    Full(Bytes),
    /// Chunks sent as the test pushes them; an `Err` aborts the connection.
    Channel(mpsc::Receiver<Result<Bytes, std::io::Error>>),
}

impl MockReply {
    pub fn json(status: u16, body: impl Into<Bytes>) -> MockReply {
        MockReply {
            status: StatusCode::from_u16(status).unwrap(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: MockBody::Full(body.into()),
        }
    }

    pub fn sse(body: impl Into<Bytes>) -> MockReply {
        MockReply {
            status: StatusCode::OK,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            body: MockBody::Full(body.into()),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> MockReply {
        self.headers.push((name.into(), value.into()));
        self
    }
}

type Handler = Arc<dyn Fn(Received) -> MockReply + Send + Sync>;

/// A scripted upstream on 127.0.0.1:0.
pub struct MockUpstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub received: Arc<Mutex<Vec<Received>>>,
    _stop: oneshot::Sender<()>,
}

impl MockUpstream {
    pub async fn start(
        handler: impl Fn(Received) -> MockReply + Send + Sync + 'static,
    ) -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let (hits2, received2) = (hits.clone(), received.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    _ = &mut stop_rx => break,
                };
                let (handler, hits, received) = (handler.clone(), hits2.clone(), received2.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (handler, hits, received) =
                            (handler.clone(), hits.clone(), received.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let got = Received {
                                method: parts.method,
                                uri: parts.uri,
                                headers: parts.headers,
                                body,
                            };
                            hits.fetch_add(1, Ordering::SeqCst);
                            received.lock().unwrap().push(got.clone());
                            let reply = handler(got);
                            Ok::<_, Infallible>(into_response(reply))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        MockUpstream {
            addr,
            hits,
            received,
            _stop: stop_tx,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn last(&self) -> Received {
        self.received
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream received a request")
    }
}

fn into_response(reply: MockReply) -> Response<TestBody> {
    let body: TestBody = match reply.body {
        MockBody::Full(bytes) => Full::new(bytes).map_err(|never| match never {}).boxed(),
        MockBody::Channel(rx) => {
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item.map(Frame::data), rx))
            });
            StreamBody::new(stream).boxed()
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = reply.status;
    for (k, v) in reply.headers {
        response.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    response
}

/// A running tollgate.
pub struct Proxy {
    pub agent: SocketAddr,
    pub admin: SocketAddr,
    pub state: Arc<AppState>,
    pub clock: Arc<ManualClock>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Holds the ledger file for the proxy's lifetime.
    pub ledger_dir: tempfile::TempDir,
}

/// Prices used by the integration tests, per million tokens.
pub const TEST_PRICING: &str = "tests/fixtures/it_pricing.toml";

impl Proxy {
    /// Starts tollgate with `config` (TOML); `{upstream}` in it is replaced
    /// by the mock's URL.
    pub async fn start(config: &str, upstream: &str) -> Proxy {
        let ledger_dir = tempfile::tempdir().unwrap();
        let mut text = config.replace("{upstream}", upstream);
        if !text.contains("[ledger]") {
            text.push_str(&format!(
                "\n[ledger]\npath = \"{}\"\nflush_interval_ms = 20\n",
                ledger_dir.path().join("ledger.db").display()
            ));
        }
        let config = Config::from_toml(&text, "test.toml", env!("CARGO_MANIFEST_DIR").into())
            .expect("valid test config");
        // One hour into today (UTC): recent enough for the ledger's
        // retention, far from a day boundary for the window tests.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let clock = Arc::new(ManualClock::new(now_ms - now_ms % 86_400_000 + 3_600_000));
        let tollgate = Tollgate::with_clock(config, None, clock.clone() as Arc<dyn Clock>)
            .expect("tollgate starts");
        let agent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (agent_addr, admin_addr) = (agent.local_addr().unwrap(), admin.local_addr().unwrap());
        let state = tollgate.state().clone();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(tollgate.run(Listeners { agent, admin }, async move {
            let _ = stop_rx.await;
        }));
        Proxy {
            agent: agent_addr,
            admin: admin_addr,
            state,
            clock,
            stop: Some(stop_tx),
            task: Some(task),
            ledger_dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.agent, path)
    }

    pub async fn metrics(&self) -> String {
        let response = send(
            Request::get(format!("http://{}/metrics", self.admin))
                .body(Bytes::new())
                .unwrap(),
        )
        .await;
        String::from_utf8(body_bytes(response).await.to_vec()).unwrap()
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

/// Where a test's ledger lives: the embedded file, or a private PostgreSQL.
/// The same traffic must give the same figures on both.
#[derive(Clone, Copy)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The `[ledger]` section for a PostgreSQL ledger at `url`.
pub fn postgres_ledger(url: &str) -> String {
    format!("[ledger]\nbackend = \"postgres\"\nurl = \"{url}\"\nflush_interval_ms = 20\n")
}

/// The proxy on `backend` (and its PostgreSQL, kept for the test's
/// lifetime); `None` when PostgreSQL is not installed (the test is skipped).
pub async fn start_on(
    backend: Backend,
    test: &str,
    config: &str,
    upstream: &MockUpstream,
) -> Option<(Proxy, Option<PostgresServer>)> {
    match backend {
        Backend::Sqlite => Some((Proxy::start(config, &upstream.url()).await, None)),
        Backend::Postgres => {
            let pg = PostgresServer::start(test)?;
            let config = format!("{config}\n{}", postgres_ledger(&pg.url()));
            Some((Proxy::start(&config, &upstream.url()).await, Some(pg)))
        }
    }
}

/// The standard test config: one route per provider kind to the mock.
pub fn config_all_routes() -> String {
    format!(
        r#"
[pricing]
files = ["{TEST_PRICING}"]

[[routes]]
name = "openai"
prefix = "/openai"
upstream = "{{upstream}}"
kind = "openai"

[[routes]]
name = "anthropic"
prefix = "/anthropic"
upstream = "{{upstream}}"
kind = "anthropic"

[[routes]]
name = "gemini"
prefix = "/gemini"
upstream = "{{upstream}}"
kind = "gemini"
"#
    )
}

pub fn client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

pub async fn send(request: Request<Bytes>) -> Response<Incoming> {
    let (parts, body) = request.into_parts();
    client()
        .request(Request::from_parts(parts, Full::new(body)))
        .await
        .expect("request reaches tollgate")
}

pub async fn post_json(
    url: impl AsRef<str>,
    headers: &[(&str, &str)],
    body: &str,
) -> Response<Incoming> {
    let mut builder = Request::post(url.as_ref()).header("content-type", "application/json");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    send(builder.body(Bytes::from(body.to_string())).unwrap()).await
}

pub async fn body_bytes(response: Response<Incoming>) -> Bytes {
    response
        .into_body()
        .collect()
        .await
        .expect("body completes")
        .to_bytes()
}

/// The value of one series in a metrics text (the first whose labels
/// include `labels`), e.g.
/// `metric_value(text, "agent_llm_cost_usd_total", &[("model","gpt-4.1")])`.
/// [`metric_sum`] adds up every such series instead.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    series_values(text, name, labels).next()
}

pub fn fixture(path: &str) -> Bytes {
    Bytes::from(
        std::fs::read(format!(
            "{}/tests/fixtures/providers/{path}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    )
}

pub fn sidecar(path: &str) -> serde_json::Value {
    let base = path.rsplit_once('.').map(|(b, _)| b).unwrap_or(path);
    let text = std::fs::read_to_string(format!(
        "{}/tests/fixtures/providers/{base}.expected.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The real binary on port 0, its addresses read from its log line; every
/// stdout line is kept in `logs`.
pub struct Process {
    pub child: std::process::Child,
    pub agent: String,
    pub admin: String,
    pub logs: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Process {
    /// Waits for the process to exit and for its last stdout line to reach
    /// `logs` (the reader thread ends at the pipe's end of file).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let status = self.child.wait().unwrap();
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        status
    }
}

pub fn start_binary(config_path: &std::path::Path) -> Process {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["--config", config_path.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (agent, admin) = loop {
        let line = lines.next().expect("tollgate logs its listeners").unwrap();
        logs.lock().unwrap().push(line.clone());
        if line.contains("tollgate listening") {
            let value: serde_json::Value = serde_json::from_str(&line).unwrap();
            break (
                value["agent"].as_str().unwrap().to_string(),
                value["admin"].as_str().unwrap().to_string(),
            );
        }
    };
    // Keep draining stdout so the process never blocks on a full pipe.
    let sink = logs.clone();
    let reader = std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    Process {
        child,
        agent,
        admin,
        logs,
        reader: Some(reader),
    }
}

/// A config file for the binary: port 0 listeners, a ledger in `dir`, the
/// standard routes to `upstream`.
pub fn binary_config(dir: &std::path::Path, upstream: &str, flush_ms: u64) -> std::path::PathBuf {
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[ledger]\npath = \"{}\"\nflush_interval_ms = {flush_ms}\n{}",
        dir.join("ledger.db").display(),
        config_all_routes().replace(TEST_PRICING, &format!("{}/{TEST_PRICING}", env!("CARGO_MANIFEST_DIR")))
    )
    .replace("{upstream}", upstream);
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Raw-socket helpers, for requests a client library would normalise.
pub mod raw {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Sends `bytes` and reads until the server closes the connection.
    pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        socket.write_all(bytes).await.unwrap();
        read_to_close(&mut socket).await
    }

    pub async fn read_to_close(socket: &mut TcpStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut out))
            .await
            .expect("the server closes the connection in bounded time")
            .expect("read succeeds");
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The status code of a raw HTTP/1.1 response.
    pub fn status_of(response: &str) -> u16 {
        response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {response:?}"))
    }
}
