//! The simulated provider and paid tools: one hyper server on 127.0.0.1:0.
//!
//! - `POST /v1/chat/completions`: OpenAI-shaped, JSON or SSE (`stream`), the
//!   `choices: []` usage chunk only when `stream_options.include_usage` is
//!   true, then `data: [DONE]`.
//! - `POST /v1/messages`: Anthropic-shaped, JSON or SSE (`message_start`,
//!   `content_block_delta`, `message_delta` with cumulative usage,
//!   `message_stop`).
//! - `POST /search` (`web_search`, priced per call by tollgate's route) and
//!   `POST /research` (`deep_research`, reports its own cost in
//!   `x-request-cost`).
//!
//! Token counts follow the request: the prompt is the body size over four
//! bytes, so it grows with the agent's history; prompt prefixes seen before
//! are reported as cache reads (OpenAI automatic caching, Anthropic
//! `cache_control`), the rest of an Anthropic `cache_control` prompt as a
//! cache write; reasoning models spend reasoning tokens by
//! `reasoning_effort`, Anthropic `thinking` spends part of its budget.
//! Latencies (time to first token, per chunk) are divided by the speed.
//!
//! A request header `x-demo-fail: <status>` makes that one request fail
//! with a provider-shaped error, so the fleet can show retries.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::rng::{hash_bytes, words, Rng};

type SimBody = UnsyncBoxBody<Bytes, Infallible>;

/// The request header that makes one call fail (`x-demo-fail: 500`).
pub const FAIL_HEADER: &str = "x-demo-fail";
/// The header `deep_research` reports its cost in.
pub const COST_HEADER: &str = "x-request-cost";

/// Largest request body the simulation reads.
const MAX_BODY: usize = 8 * 1024 * 1024;
/// Prefix hashes remembered for cache simulation before the set is reset.
const MAX_PREFIXES: usize = 200_000;
/// Smallest prompt prefix providers cache, in tokens.
const MIN_CACHEABLE_TOKENS: u64 = 1024;

/// A running simulation server.
pub struct SimProvider {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SimProvider {
    /// Binds 127.0.0.1:0 and serves until [`SimProvider::stop`].
    pub async fn start(speed: f64) -> std::io::Result<SimProvider> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sim = Arc::new(Sim {
            speed,
            prefixes: Mutex::new(HashSet::new()),
            ids: AtomicU64::new(1),
        });
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let graceful = GracefulShutdown::new();
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    },
                    _ = &mut stop_rx => break,
                };
                let _ = stream.set_nodelay(true);
                let sim = sim.clone();
                let service = service_fn(move |request| handle(sim.clone(), request));
                let connection = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), graceful.shutdown()).await;
        });
        Ok(SimProvider {
            addr,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting and lets open responses finish (bounded).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

struct Sim {
    speed: f64,
    /// Hashes of prompt prefixes already seen: the simulated prompt cache.
    prefixes: Mutex<HashSet<u64>>,
    ids: AtomicU64,
}

impl Sim {
    fn delay(&self, ms: f64) -> Duration {
        Duration::from_secs_f64((ms / 1000.0 / self.speed).max(0.0))
    }

    fn next_id(&self) -> String {
        format!("{:016x}", self.ids.fetch_add(1, Ordering::Relaxed))
    }

    /// Length in bytes of the longest prefix seen before, then remembers
    /// every prefix of this prompt (providers cache the whole prompt).
    fn cached_prefix(&self, prefixes: &[(u64, u64)]) -> u64 {
        let mut seen = self.prefixes.lock().unwrap_or_else(PoisonError::into_inner);
        let hit = prefixes
            .iter()
            .rev()
            .find(|(hash, _)| seen.contains(hash))
            .map_or(0, |(_, len)| *len);
        if seen.len() > MAX_PREFIXES {
            seen.clear();
        }
        seen.extend(prefixes.iter().map(|(hash, _)| *hash));
        hit
    }
}

async fn handle(
    sim: Arc<Sim>,
    request: Request<Incoming>,
) -> Result<Response<SimBody>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Ok(plain(
                StatusCode::BAD_REQUEST,
                json!({"error": "unreadable body"}),
            ))
        }
    };
    let fail = parts
        .headers
        .get(FAIL_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .filter(|status| status.is_client_error() || status.is_server_error());
    let path = parts.uri.path();
    let response = match (&parts.method, path) {
        (&Method::POST, "/v1/chat/completions") => match fail {
            Some(status) => failure(&sim, status, Dialect::OpenAi).await,
            None => openai(&sim, &body).await,
        },
        (&Method::POST, "/v1/messages") => match fail {
            Some(status) => failure(&sim, status, Dialect::Anthropic).await,
            None => anthropic(&sim, &body).await,
        },
        (_, "/search") => match fail {
            Some(status) => failure(&sim, status, Dialect::Tool).await,
            None => search(&sim, &body, parts.uri.query()).await,
        },
        (&Method::POST, "/research") => match fail {
            Some(status) => failure(&sim, status, Dialect::Tool).await,
            None => research(&sim, &body).await,
        },
        _ => plain(
            StatusCode::NOT_FOUND,
            json!({"error": {"message": format!("the simulated provider has no {} {path}", parts.method), "type": "invalid_request_error", "param": null, "code": "unknown_url"}}),
        ),
    };
    Ok(response)
}

#[derive(Clone, Copy)]
enum Dialect {
    OpenAi,
    Anthropic,
    Tool,
}

/// A provider-shaped error after a short delay, as a real overloaded
/// backend answers.
async fn failure(sim: &Sim, status: StatusCode, dialect: Dialect) -> Response<SimBody> {
    tokio::time::sleep(sim.delay(60.0)).await;
    let body = match dialect {
        Dialect::OpenAi => json!({"error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error", "param": null, "code": null}}),
        Dialect::Anthropic => json!({"type": "error",
            "error": {"type": "api_error", "message": "Internal server error"},
            "request_id": format!("req_demo{}", sim.next_id())}),
        Dialect::Tool => json!({"error": "backend unavailable, try again later"}),
    };
    let mut response = plain(status, body);
    response
        .headers_mut()
        .insert("x-should-retry", HeaderValue::from_static("true"));
    response
}

/// What one simulated completion produces.
struct Generation {
    model: String,
    prompt: u64,
    cached: u64,
    cache_write: u64,
    reasoning: u64,
    visible: u64,
    truncated: bool,
    /// Visible text in stream chunks.
    chunks: Vec<String>,
    thinking_text: String,
    ttft: Duration,
    chunk_delays: Vec<Duration>,
}

impl Generation {
    fn completion(&self) -> u64 {
        self.reasoning + self.visible
    }

    fn text(&self) -> String {
        self.chunks.concat()
    }

    fn total_delay(&self) -> Duration {
        self.ttft + self.chunk_delays.iter().sum::<Duration>()
    }
}

/// The dated name a provider reports for a model alias.
fn dated(model: &str) -> String {
    const DATED: &[(&str, &str)] = &[
        ("gpt-4.1", "gpt-4.1-2025-04-14"),
        ("gpt-4.1-mini", "gpt-4.1-mini-2025-04-14"),
        ("gpt-4.1-nano", "gpt-4.1-nano-2025-04-14"),
        ("gpt-4o", "gpt-4o-2024-08-06"),
        ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
        ("gpt-5", "gpt-5-2025-08-07"),
        ("gpt-5-mini", "gpt-5-mini-2025-08-07"),
        ("gpt-5-nano", "gpt-5-nano-2025-08-07"),
        ("o3", "o3-2025-04-16"),
        ("o3-mini", "o3-mini-2025-01-31"),
        ("o4-mini", "o4-mini-2025-04-16"),
        ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929"),
        ("claude-haiku-4-5", "claude-haiku-4-5-20251001"),
        ("claude-opus-4-1", "claude-opus-4-1-20250805"),
    ];
    DATED
        .iter()
        .find(|(alias, _)| *alias == model)
        .map_or_else(|| model.to_string(), |(_, name)| (*name).to_string())
}

fn is_reasoning_model(model: &str) -> bool {
    ["o1", "o3", "o4", "gpt-5"]
        .iter()
        .any(|prefix| model.starts_with(prefix))
}

/// Cumulative hashes of a prompt's prefixes: `(hash, bytes so far)` after
/// the seed part and after each message.
fn prefix_hashes(seed: &str, head: &Value, messages: &[Value]) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    let head = head.to_string();
    let mut hash = hash_bytes(hash_bytes(0, seed.as_bytes()), head.as_bytes());
    let mut len = head.len() as u64;
    out.push((hash, len));
    for message in messages {
        let text = message.to_string();
        hash = hash_bytes(hash, text.as_bytes());
        len += text.len() as u64;
        out.push((hash, len));
    }
    out
}

struct GenerationRequest<'a> {
    model: &'a str,
    body: &'a Bytes,
    max_tokens: Option<u64>,
    /// `reasoning_effort` for reasoning models.
    effort: Option<&'a str>,
    /// Anthropic `thinking.budget_tokens`.
    thinking_budget: Option<u64>,
    /// Bytes of the longest prompt prefix served from the cache.
    cached_bytes: u64,
}

fn generate(sim: &Sim, request: &GenerationRequest<'_>) -> Generation {
    let mut rng = Rng::new(hash_bytes(0, request.body));
    let model = dated(request.model);
    let prompt = (request.body.len() as u64).div_ceil(4) + 8;
    let cached_tokens = request.cached_bytes / 4;
    let cached = if cached_tokens >= MIN_CACHEABLE_TOKENS {
        cached_tokens.min(prompt.saturating_sub(1))
    } else {
        0
    };
    let mut reasoning = if is_reasoning_model(request.model) {
        match request.effort.unwrap_or("medium") {
            "minimal" => 0,
            "low" => rng.range(64, 400),
            "high" => rng.range(1_200, 4_000),
            _ => rng.range(300, 1_200),
        }
    } else {
        0
    };
    if let Some(budget) = request.thinking_budget {
        reasoning = rng.range(budget / 3, budget);
    }
    let mut visible = rng.range(50, 800);
    let mut truncated = false;
    if let Some(limit) = request.max_tokens {
        if reasoning + visible > limit {
            truncated = true;
            reasoning = reasoning.min(limit);
            visible = limit - reasoning;
        }
    }
    let mut chunks = Vec::new();
    let mut left = visible;
    while left > 0 {
        let n = rng.range(8, 16).min(left);
        let piece = words(&mut rng, n);
        chunks.push(if chunks.is_empty() {
            piece
        } else {
            format!(" {piece}")
        });
        left -= n;
    }
    let chunk_delays = (0..chunks.len())
        .map(|_| sim.delay(rng.range(10, 30) as f64))
        .collect();
    let thinking_text = if reasoning > 0 {
        words(&mut rng, reasoning.min(40))
    } else {
        String::new()
    };
    // Reasoning happens before the first visible token; charge it a little
    // latency so slower answers show in the time-to-first-byte histogram.
    let ttft = sim.delay(rng.range(100, 400) as f64 + reasoning as f64 * 0.08);
    Generation {
        model,
        prompt,
        cached,
        cache_write: 0,
        reasoning,
        visible,
        truncated,
        chunks,
        thinking_text,
        ttft,
        chunk_delays,
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    #[serde(default)]
    messages: Vec<Value>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<ChatStreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    reasoning_effort: Option<String>,
}

#[derive(Deserialize)]
struct ChatStreamOptions {
    include_usage: Option<bool>,
}

async fn openai(sim: &Sim, body: &Bytes) -> Response<SimBody> {
    let request: ChatRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return plain(
                StatusCode::BAD_REQUEST,
                json!({"error": {"message": format!("We could not parse the JSON body of your request: {e}"), "type": "invalid_request_error", "param": null, "code": null}}),
            )
        }
    };
    let model = dated(&request.model);
    let prefixes = prefix_hashes(&model, &Value::Null, &request.messages);
    let cached_bytes = sim.cached_prefix(&prefixes);
    let generation = generate(
        sim,
        &GenerationRequest {
            model: &request.model,
            body,
            max_tokens: request.max_completion_tokens.or(request.max_tokens),
            effort: request.reasoning_effort.as_deref(),
            thinking_budget: None,
            cached_bytes,
        },
    );
    let id = format!("chatcmpl-demo{}", sim.next_id());
    let created = unix_now();
    let usage = json!({
        "prompt_tokens": generation.prompt,
        "completion_tokens": generation.completion(),
        "total_tokens": generation.prompt + generation.completion(),
        "prompt_tokens_details": {"cached_tokens": generation.cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": generation.reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    });
    let finish_reason = if generation.truncated {
        "length"
    } else {
        "stop"
    };
    if !request.stream {
        tokio::time::sleep(generation.total_delay()).await;
        return plain(
            StatusCode::OK,
            json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": generation.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": generation.text(), "refusal": null, "annotations": []},
                    "logprobs": null,
                    "finish_reason": finish_reason
                }],
                "usage": usage,
                "service_tier": "default",
                "system_fingerprint": "fp_demo"
            }),
        );
    }
    let include_usage = request
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let chunk = |choices: Value, usage: Option<&Value>| {
        let mut value = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": generation.model,
            "service_tier": "default",
            "system_fingerprint": "fp_demo",
            "choices": choices,
        });
        if include_usage {
            value["usage"] = usage.cloned().unwrap_or(Value::Null);
        }
        Bytes::from(format!("data: {value}\n\n"))
    };
    let mut events = Vec::with_capacity(generation.chunks.len() + 4);
    events.push((
        generation.ttft,
        chunk(
            json!([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null}, "logprobs": null, "finish_reason": null}]),
            None,
        ),
    ));
    for (text, delay) in generation.chunks.iter().zip(&generation.chunk_delays) {
        events.push((
            *delay,
            chunk(
                json!([{"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null}]),
                None,
            ),
        ));
    }
    events.push((
        Duration::ZERO,
        chunk(
            json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason}]),
            None,
        ),
    ));
    if include_usage {
        events.push((Duration::ZERO, chunk(json!([]), Some(&usage))));
    }
    events.push((Duration::ZERO, Bytes::from_static(b"data: [DONE]\n\n")));
    event_stream(sim, events).await
}

#[derive(Deserialize)]
struct MessagesRequest {
    model: String,
    #[serde(default)]
    messages: Vec<Value>,
    #[serde(default)]
    system: Value,
    #[serde(default)]
    stream: bool,
    max_tokens: Option<u64>,
    thinking: Option<Thinking>,
}

#[derive(Deserialize)]
struct Thinking {
    #[serde(rename = "type")]
    kind: String,
    budget_tokens: Option<u64>,
}

async fn anthropic(sim: &Sim, body: &Bytes) -> Response<SimBody> {
    let request: MessagesRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return plain(
                StatusCode::BAD_REQUEST,
                json!({"type": "error", "error": {"type": "invalid_request_error", "message": format!("invalid JSON body: {e}")}}),
            )
        }
    };
    let model = dated(&request.model);
    // Anthropic caches only what a `cache_control` breakpoint marks.
    let uses_cache = memchr::memmem::find(body, b"\"cache_control\"").is_some();
    let cached_bytes = if uses_cache {
        let prefixes = prefix_hashes(&model, &request.system, &request.messages);
        sim.cached_prefix(&prefixes)
    } else {
        0
    };
    let thinking_budget = request
        .thinking
        .as_ref()
        .filter(|t| t.kind == "enabled")
        .and_then(|t| t.budget_tokens);
    let mut generation = generate(
        sim,
        &GenerationRequest {
            model: &request.model,
            body,
            max_tokens: request.max_tokens,
            effort: None,
            thinking_budget,
            cached_bytes,
        },
    );
    // With a breakpoint, everything after the cached prefix is written to
    // the cache; a handful of tokens after the breakpoint stay uncached.
    let mut input = generation.prompt - generation.cached;
    if uses_cache {
        let uncached = input.min(Rng::new(input).range(2, 12));
        generation.cache_write = input - uncached;
        input = uncached;
    }
    let id = format!("msg_demo{}", sim.next_id());
    let usage = json!({
        "input_tokens": input,
        "cache_creation_input_tokens": generation.cache_write,
        "cache_read_input_tokens": generation.cached,
        "cache_creation": {"ephemeral_5m_input_tokens": generation.cache_write, "ephemeral_1h_input_tokens": 0},
        "output_tokens": generation.completion(),
        "output_tokens_details": {"thinking_tokens": generation.reasoning},
        "service_tier": "standard"
    });
    let stop_reason = if generation.truncated {
        "max_tokens"
    } else {
        "end_turn"
    };
    let has_thinking = thinking_budget.is_some() && generation.reasoning > 0;
    if !request.stream {
        tokio::time::sleep(generation.total_delay()).await;
        let mut content = Vec::new();
        if has_thinking {
            content.push(json!({"type": "thinking", "thinking": generation.thinking_text, "signature": "EqQBCgIYAhIM-demo-signature"}));
        }
        content.push(json!({"type": "text", "text": generation.text()}));
        return plain(
            StatusCode::OK,
            json!({
                "id": id,
                "type": "message",
                "role": "assistant",
                "model": generation.model,
                "content": content,
                "stop_reason": stop_reason,
                "stop_sequence": null,
                "usage": usage
            }),
        );
    }
    let event = |name: &str, data: Value| Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
    let mut start_usage = usage.clone();
    start_usage["output_tokens"] = json!(1);
    let mut events = vec![(
        Duration::ZERO,
        event(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": generation.model,
                "content": [], "stop_reason": null, "stop_sequence": null, "usage": start_usage}}),
        ),
    )];
    let mut index = 0;
    let mut first_delay = generation.ttft;
    if has_thinking {
        events.push((
            first_delay,
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": index, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
            ),
        ));
        first_delay = Duration::ZERO;
        events.push((
            Duration::ZERO,
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "thinking_delta", "thinking": generation.thinking_text}}),
            ),
        ));
        events.push((
            Duration::ZERO,
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM-demo-signature"}}),
            ),
        ));
        events.push((
            Duration::ZERO,
            event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ),
        ));
        index += 1;
    }
    events.push((
        first_delay,
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
        ),
    ));
    events.push((Duration::ZERO, event("ping", json!({"type": "ping"}))));
    for (text, delay) in generation.chunks.iter().zip(&generation.chunk_delays) {
        events.push((
            *delay,
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}),
            ),
        ));
    }
    events.push((
        Duration::ZERO,
        event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ),
    ));
    events.push((
        Duration::ZERO,
        event(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null}, "usage": usage}),
        ),
    ));
    events.push((
        Duration::ZERO,
        event("message_stop", json!({"type": "message_stop"})),
    ));
    event_stream(sim, events).await
}

#[derive(Deserialize, Default)]
struct ToolRequest {
    #[serde(default)]
    query: String,
}

fn tool_query(body: &Bytes, query: Option<&str>) -> String {
    let from_body = serde_json::from_slice::<ToolRequest>(body)
        .map(|r| r.query)
        .unwrap_or_default();
    if !from_body.is_empty() {
        return from_body;
    }
    query
        .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("q=")))
        .unwrap_or("")
        .to_string()
}

async fn search(sim: &Sim, body: &Bytes, query: Option<&str>) -> Response<SimBody> {
    let query = tool_query(body, query);
    let mut rng = Rng::new(hash_bytes(1, query.as_bytes()));
    tokio::time::sleep(sim.delay(rng.range(80, 250) as f64)).await;
    let results: Vec<Value> = (0..5)
        .map(|i| {
            let words_n = rng.range(20, 45);
            json!({
                "title": words(&mut rng, 6),
                "url": format!("https://example.com/doc/{:x}/{i}", rng.next_u64() & 0xffff_ffff),
                "snippet": words(&mut rng, words_n),
            })
        })
        .collect();
    plain(StatusCode::OK, json!({"query": query, "results": results}))
}

async fn research(sim: &Sim, body: &Bytes) -> Response<SimBody> {
    let query = tool_query(body, None);
    let mut rng = Rng::new(hash_bytes(2, query.as_bytes()));
    tokio::time::sleep(sim.delay(rng.range(400, 1_200) as f64)).await;
    let report_words = rng.range(600, 1_800);
    // Priced like a metered research API: a base fee plus the report length.
    let cost = 0.01 + report_words as f64 * 0.000_02;
    let sources: Vec<String> = (0..rng.range(4, 9))
        .map(|i| {
            format!(
                "https://example.org/source/{:x}/{i}",
                rng.next_u64() & 0xffff
            )
        })
        .collect();
    let mut response = plain(
        StatusCode::OK,
        json!({"query": query, "report": words(&mut rng, report_words), "sources": sources}),
    );
    if let Ok(value) = HeaderValue::from_str(&format!("{cost:.6}")) {
        response.headers_mut().insert(COST_HEADER, value);
    }
    response
}

/// An SSE response whose events are sent after their delays.
async fn event_stream(sim: &Sim, events: Vec<(Duration, Bytes)>) -> Response<SimBody> {
    // Response headers come quickly; the first token is what takes time.
    tokio::time::sleep(sim.delay(30.0)).await;
    let stream = futures_util::stream::unfold(events.into_iter(), |mut events| async move {
        let (delay, bytes) = events.next()?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok::<_, Infallible>(Frame::data(bytes)), events))
    });
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    response
}

fn plain(status: StatusCode, value: Value) -> Response<SimBody> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_get_dated_names() {
        assert_eq!(dated("gpt-4.1-mini"), "gpt-4.1-mini-2025-04-14");
        assert_eq!(dated("claude-sonnet-4-5"), "claude-sonnet-4-5-20250929");
        assert_eq!(dated("gpt-4.1-mini-2025-04-14"), "gpt-4.1-mini-2025-04-14");
    }

    #[test]
    fn max_tokens_bounds_the_completion() {
        let sim = Sim {
            speed: 1000.0,
            prefixes: Mutex::new(HashSet::new()),
            ids: AtomicU64::new(1),
        };
        let body = Bytes::from_static(b"{\"model\":\"gpt-5\"}");
        let generation = generate(
            &sim,
            &GenerationRequest {
                model: "gpt-5",
                body: &body,
                max_tokens: Some(100),
                effort: Some("high"),
                thinking_budget: None,
                cached_bytes: 0,
            },
        );
        assert!(generation.completion() <= 100);
        assert!(generation.truncated);
    }

    #[test]
    fn a_seen_prefix_is_a_cache_hit() {
        let sim = Sim {
            speed: 1.0,
            prefixes: Mutex::new(HashSet::new()),
            ids: AtomicU64::new(1),
        };
        let first = vec![json!({"role": "user", "content": "a"})];
        let mut second = first.clone();
        second.push(json!({"role": "assistant", "content": "b"}));
        let head = json!("system prompt");
        assert_eq!(sim.cached_prefix(&prefix_hashes("m", &head, &first)), 0);
        let hit = sim.cached_prefix(&prefix_hashes("m", &head, &second));
        assert_eq!(hit, prefix_hashes("m", &head, &first)[1].1);
    }
}
