//! A small HTTP/1.1 load generator for chat-completion calls.
//!
//! `--connections` workers each hold one keep-alive connection (reconnecting
//! after an error) and send POST requests with a ~`--body-bytes` chat
//! request, back to back or, with `--rate`, on a fixed schedule (latency is
//! then measured from the scheduled send time, so a stalled server is not
//! hidden by the generator waiting for it). The run is bounded by
//! `--duration-secs` and optionally `--requests`; requests still in flight
//! when the time is up get `--grace-secs` and are then abandoned.
//!
//! Prints one JSON line: requests/s, latency percentiles (send to last body
//! byte) and, with `--stream`, time-to-first-body-byte percentiles and the
//! percentiles of the gaps between consecutive body frames of a reply
//! (`gap_ms`; with an upstream that paces its chunks, comparing the gaps
//! seen direct and through a proxy shows how long the proxy held chunks).
//! When the upstream stamps its events with `: sent_us=<µs since the Unix
//! epoch>` comment lines (`examples/mock_upstream.rs` does for paced
//! streams), `chunk_delay_ms` gives the percentiles of each stamped chunk's
//! travel time from the upstream's write to its arrival here.
//!
//! ```text
//! cargo run --release --example loadgen -- --url http://127.0.0.1:8080/v1/chat/completions \
//!     --connections 32 --duration-secs 10 --stream
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Parser, Clone)]
#[command(about = "Load generator for chat-completion endpoints")]
struct Args {
    /// Target URL (http only).
    #[arg(long)]
    url: Uri,
    /// Concurrent keep-alive connections, one request in flight on each.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Measurement length in seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    /// Warm-up in seconds; its requests are not counted.
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Stop after this many measured requests (0: only the duration bounds).
    #[arg(long, default_value_t = 0)]
    requests: u64,
    /// Fixed total request rate per second (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Ask for a streamed reply (`"stream": true`).
    #[arg(long)]
    stream: bool,
    /// With --stream, also send `stream_options.include_usage = true`.
    #[arg(long)]
    include_usage: bool,
    /// Approximate request body size in bytes.
    #[arg(long, default_value_t = 4096)]
    body_bytes: usize,
    /// Model named in the request.
    #[arg(long, default_value = "gpt-4o-2024-08-06")]
    model: String,
    /// Extra header `name: value` (repeatable). `{conn}` in a value is
    /// replaced by the worker's index (e.g. one run id per connection),
    /// `{seq}` by the number of the request on its connection (a new run id
    /// per request: `run-{conn}-{seq}`).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout_secs: f64,
    /// Time allowed to requests in flight when the duration is up.
    #[arg(long, default_value_t = 5.0)]
    grace_secs: f64,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Label copied into the output line.
    #[arg(long, default_value = "")]
    label: String,
}

/// What one worker measured.
#[derive(Default)]
struct Samples {
    latency_us: Vec<u64>,
    ttfb_us: Vec<u64>,
    gap_us: Vec<u64>,
    chunk_delay_us: Vec<u64>,
    errors: u64,
    non_2xx: u64,
    bytes: u64,
    /// Scheduled sends (with --rate) that left more than TIMER_SLACK late.
    late_sends: u64,
    /// Completed during the warm-up (not in the figures).
    warmup_requests: u64,
}

const TIMER_SLACK: Duration = Duration::from_millis(2);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.url.scheme_str() == Some("http"),
        "only http:// URLs are supported"
    );
    anyhow::ensure!(args.connections > 0, "--connections must be positive");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let line = runtime.block_on(run(args))?;
    println!("{line}");
    Ok(())
}

/// A chat request of about `size` bytes: a system prompt and a few turns.
fn request_body(args: &Args) -> Bytes {
    let filler = "The agent looked up the order history, compared the totals and wrote a \
                  short summary of the differences for the user. ";
    let turn = |role: &str, n: usize| json!({ "role": role, "content": filler.repeat(n.max(1)) });
    let per_turn = filler.len();
    let turns = (args.body_bytes / per_turn / 4).max(1);
    let mut body = json!({
        "model": args.model,
        "messages": [
            { "role": "system", "content": "You are a careful assistant. Answer briefly." },
            turn("user", turns),
            turn("assistant", turns),
            turn("user", turns),
            turn("assistant", turns),
        ],
        "temperature": 0.2,
        "max_tokens": 512,
    });
    if args.stream {
        body["stream"] = json!(true);
        if args.include_usage {
            body["stream_options"] = json!({ "include_usage": true });
        }
    }
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

async fn run(args: Args) -> anyhow::Result<String> {
    let authority = args
        .url
        .authority()
        .ok_or_else(|| anyhow::anyhow!("the URL has no host"))?
        .clone();
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let path = args
        .url
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let body = request_body(&args);
    let headers: Vec<(String, String)> = args
        .headers
        .iter()
        .map(|h| {
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("--header `{h}` is not `name: value`"))?;
            Ok((name.trim().to_string(), value.trim().to_string()))
        })
        .collect::<anyhow::Result<_>>()?;

    let started = Instant::now();
    let measure_from = started + Duration::from_secs_f64(args.warmup_secs);
    let measure_until = measure_from + Duration::from_secs_f64(args.duration_secs);
    let hard_stop = measure_until + Duration::from_secs_f64(args.grace_secs);
    let budget = Arc::new(AtomicU64::new(if args.requests == 0 {
        u64::MAX
    } else {
        args.requests
    }));
    // With a fixed rate each worker sends every `interval`, the workers
    // staggered evenly across one interval.
    let interval =
        (args.rate > 0.0).then(|| Duration::from_secs_f64(args.connections as f64 / args.rate));

    let mut tasks = Vec::with_capacity(args.connections);
    for conn in 0..args.connections {
        let worker = Worker {
            addr: addr.clone(),
            authority: authority.to_string(),
            path: path.clone(),
            body: body.clone(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.clone(), v.replace("{conn}", &conn.to_string())))
                .collect(),
            timeout: Duration::from_secs_f64(args.timeout_secs),
            measure_from,
            measure_until,
            budget: budget.clone(),
            schedule: interval.map(|every| {
                let offset = every.mul_f64(conn as f64 / args.connections as f64);
                (started + offset, every)
            }),
        };
        tasks.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            let _ = tokio::time::timeout_at(hard_stop, worker.run(&mut samples)).await;
            samples
        }));
    }
    let mut all = Samples::default();
    for task in tasks {
        if let Ok(s) = task.await {
            all.latency_us.extend(s.latency_us);
            all.ttfb_us.extend(s.ttfb_us);
            all.gap_us.extend(s.gap_us);
            all.chunk_delay_us.extend(s.chunk_delay_us);
            all.errors += s.errors;
            all.non_2xx += s.non_2xx;
            all.bytes += s.bytes;
            all.late_sends += s.late_sends;
            all.warmup_requests += s.warmup_requests;
        }
    }
    let measured = Instant::now()
        .min(measure_until)
        .saturating_duration_since(measure_from)
        .as_secs_f64()
        .max(1e-9);
    let requests = all.latency_us.len() as u64;
    let mut out = json!({
        "label": args.label,
        "url": args.url.to_string(),
        "mode": if args.stream { "stream" } else { "json" },
        "connections": args.connections,
        "rate": if args.rate > 0.0 { json!(args.rate) } else { json!(null) },
        "body_bytes": body.len(),
        "seconds": round3(measured),
        "requests": requests,
        "warmup_requests": all.warmup_requests,
        "errors": all.errors,
        "non_2xx": all.non_2xx,
        "late_sends": all.late_sends,
        "rps": round3(requests as f64 / measured),
        "mb_per_s": round3(all.bytes as f64 / measured / 1e6),
        "latency_ms": percentiles(&mut all.latency_us),
    });
    if args.stream {
        out["ttfb_ms"] = percentiles(&mut all.ttfb_us);
        out["gap_ms"] = percentiles(&mut all.gap_us);
        out["gaps"] = json!(all.gap_us.len());
        if !all.chunk_delay_us.is_empty() {
            out["chunk_delay_ms"] = percentiles(&mut all.chunk_delay_us);
        }
    }
    Ok(out.to_string())
}

struct Worker {
    addr: String,
    authority: String,
    path: String,
    body: Bytes,
    headers: Vec<(String, String)>,
    timeout: Duration,
    measure_from: Instant,
    measure_until: Instant,
    budget: Arc<AtomicU64>,
    schedule: Option<(Instant, Duration)>,
}

type Sender = http1::SendRequest<Full<Bytes>>;

impl Worker {
    async fn run(self, samples: &mut Samples) {
        let mut sender: Option<Sender> = None;
        let mut next_send = self.schedule.map(|(first, _)| first);
        let mut seq = 0u64;
        loop {
            let intended = match (next_send, self.schedule) {
                (Some(at), Some((_, every))) => {
                    tokio::time::sleep_until(at).await;
                    next_send = Some(at + every);
                    // The timer wakes up to ~1 ms late by design: within
                    // TIMER_SLACK, count from the actual send; beyond it the
                    // generator is behind schedule and the wait counts.
                    let now = Instant::now();
                    if now.saturating_duration_since(at) <= TIMER_SLACK {
                        now
                    } else {
                        if at >= self.measure_from {
                            samples.late_sends += 1;
                        }
                        at
                    }
                }
                _ => Instant::now(),
            };
            if intended >= self.measure_until {
                return;
            }
            let counted = intended >= self.measure_from;
            if counted && !take_one(&self.budget) {
                return;
            }
            let s = match sender.take() {
                Some(s) if !s.is_closed() => s,
                _ => match self.connect().await {
                    Ok(s) => s,
                    Err(_) => {
                        if counted {
                            samples.errors += 1;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            seq += 1;
            let outcome = tokio::time::timeout(self.timeout, self.call(s, intended, seq)).await;
            match outcome {
                Ok(Ok((s, call))) => {
                    sender = Some(s);
                    if !counted {
                        samples.warmup_requests += 1;
                    } else {
                        if !call.ok {
                            samples.non_2xx += 1;
                        }
                        samples.latency_us.push(call.latency_us);
                        if let Some(ttfb) = call.ttfb_us {
                            samples.ttfb_us.push(ttfb);
                        }
                        samples.gap_us.extend(call.gap_us);
                        samples.chunk_delay_us.extend(call.chunk_delay_us);
                        samples.bytes += call.bytes;
                    }
                }
                _ => {
                    if counted {
                        samples.errors += 1;
                    }
                }
            }
        }
    }

    async fn connect(&self) -> anyhow::Result<Sender> {
        let stream = TcpStream::connect(&self.addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    async fn call(
        &self,
        mut sender: Sender,
        intended: Instant,
        seq: u64,
    ) -> anyhow::Result<(Sender, Call)> {
        sender.ready().await?;
        let mut request = Request::post(self.path.as_str())
            .header(http::header::HOST, self.authority.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "*/*");
        for (name, value) in &self.headers {
            if value.contains("{seq}") {
                request = request.header(name.as_str(), value.replace("{seq}", &seq.to_string()));
            } else {
                request = request.header(name.as_str(), value.as_str());
            }
        }
        let request = request.body(Full::new(self.body.clone()))?;
        let response = sender.send_request(request).await?;
        let ok = response.status().is_success();
        let mut body = response.into_body();
        let mut ttfb_us = None;
        let mut gap_us = Vec::new();
        let mut chunk_delay_us = Vec::new();
        let mut last_frame: Option<Instant> = None;
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                if data.is_empty() {
                    continue;
                }
                if ttfb_us.is_none() {
                    ttfb_us = Some(micros(intended));
                }
                let now = Instant::now();
                let wall_us = unix_micros();
                chunk_delay_us.extend(sent_stamps(&data).map(|sent| wall_us.saturating_sub(sent)));
                if let Some(last) = last_frame {
                    gap_us.push(micros_between(last, now));
                }
                last_frame = Some(now);
                bytes += data.len() as u64;
            }
        }
        let call = Call {
            ok,
            latency_us: micros(intended),
            ttfb_us,
            gap_us,
            chunk_delay_us,
            bytes,
        };
        Ok((sender, call))
    }
}

struct Call {
    ok: bool,
    latency_us: u64,
    ttfb_us: Option<u64>,
    /// Time between consecutive non-empty body frames.
    gap_us: Vec<u64>,
    /// Arrival time minus the upstream's send stamp, per stamped event.
    chunk_delay_us: Vec<u64>,
    bytes: u64,
}

const SENT_STAMP: &[u8] = b": sent_us=";

/// The `: sent_us=N` stamps at the start of lines in `data`.
fn sent_stamps(data: &[u8]) -> impl Iterator<Item = u64> + '_ {
    data.split(|b| *b == b'\n').filter_map(|line| {
        let digits = line.strip_prefix(SENT_STAMP)?;
        std::str::from_utf8(digits).ok()?.trim().parse().ok()
    })
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn take_one(budget: &AtomicU64) -> bool {
    budget
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
            left.checked_sub(1)
        })
        .is_ok()
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn micros_between(from: Instant, to: Instant) -> u64 {
    u64::try_from(to.saturating_duration_since(from).as_micros()).unwrap_or(u64::MAX)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn percentiles(samples: &mut [u64]) -> serde_json::Value {
    if samples.is_empty() {
        return json!(null);
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        round3(samples[rank - 1] as f64 / 1000.0)
    };
    let mean = samples.iter().sum::<u64>() as f64 / samples.len() as f64 / 1000.0;
    json!({
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": at(1.0),
        "mean": round3(mean),
    })
}
