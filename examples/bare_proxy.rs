//! The floor for the load test: a hyper reverse proxy that forwards every
//! request to one upstream and does nothing else (no metering, no logging).
//! `cargo run --release --example bare_proxy -- <upstream host:port>`; prints
//! its bound address on the first stdout line. `BARE_RUNTIME=current` runs
//! one single-threaded runtime per core instead of tokio's multi-thread one.

use std::convert::Infallible;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type Body = http_body_util::combinators::BoxBody<bytes::Bytes, hyper::Error>;

async fn forward(
    client: Client<HttpConnector, Incoming>,
    upstream: &'static str,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (mut parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let path = path.strip_prefix("/openai").unwrap_or(path);
    parts.uri = format!("http://{upstream}{path}").parse().unwrap();
    parts.headers.remove(http::header::HOST);
    match client.request(Request::from_parts(parts, body)).await {
        Ok(response) => Ok(response.map(|b| b.boxed())),
        Err(_) => Ok(Response::builder()
            .status(502)
            .body(http_body_util::Empty::new().map_err(|n| match n {}).boxed())
            .unwrap()),
    }
}

async fn serve(listener: TcpListener, upstream: &'static str) {
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req| forward(client.clone(), upstream, req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn main() {
    let upstream: &'static str = Box::leak(
        std::env::args()
            .nth(1)
            .expect("upstream host:port")
            .into_boxed_str(),
    );
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    println!("{}", std_listener.local_addr().unwrap());
    if std::env::var("BARE_RUNTIME").as_deref() == Ok("current") {
        let threads: Vec<_> = (0..std::thread::available_parallelism().map_or(2, |n| n.get()))
            .map(|_| {
                let listener = std_listener.try_clone().unwrap();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async move {
                        serve(TcpListener::from_std(listener).unwrap(), upstream).await
                    });
                })
            })
            .collect();
        for t in threads {
            let _ = t.join();
        }
    } else {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(
            async move { serve(TcpListener::from_std(std_listener).unwrap(), upstream).await },
        );
    }
}
