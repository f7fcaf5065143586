//! Usage extraction: reads the token usage a provider reports out of a
//! response body, JSON or streamed, while the body is forwarded untouched.
//!
//! Flow, per response body (the proxy owns the body and calls in per frame):
//!
//! ```text
//! frame bytes ──► decode (Content-Encoding: gzip/deflate/br/zstd, push-style,
//!                 │       decoded-bytes budget per read)
//!                 ▼
//!          format (from Content-Type, confirmed by the first byte)
//!           ├─ Sse ───────► sse::SseDecoder ─► events ─┐
//!           ├─ Json/JsonArray/Ndjson ► json_scan ─► top-level members
//!           ▼                                          ▼
//!     extract::Extractor ◄── openai / anthropic / gemini rules per dialect
//!                 │
//!   finish() ─────► Observation { usage, model, outcome, errors, sizes }
//! ```
//!
//! Nothing here does I/O or holds a whole body: the tap keeps at most one
//! incomplete SSE event or one captured JSON value (both capped by
//! [`TapLimits`]) plus the decoder's window. It never panics on input; what
//! it cannot read it reports through `parse_error` and the proxy falls back to
//! [`estimate()`].
//!
//! [`UsageChunkFilter`] is the one piece that changes bytes: it removes the
//! usage-only chunk the proxy asked an OpenAI upstream for when the client did
//! not (SPEC §4, §9).

mod anthropic;
mod decode;
mod estimate;
mod extract;
mod gemini;
mod json_scan;
mod openai;
mod sse;
pub(crate) mod strict_json;
mod strip;
mod wire;
pub(crate) mod word_scan;

pub use decode::{DECODED_FLOOR_PER_FEED, MAX_DECODED_PER_INPUT_BYTE};
pub use estimate::{estimate, BYTES_PER_TOKEN};
pub use strip::UsageChunkFilter;

use decode::{Coding, Decoder};
use extract::Extractor;
use json_scan::JsonScanner;
use sse::SseDecoder;
use std::io;

/// Token counts of one call, normalised across providers (SPEC §4).
/// `None` means the provider did not report that quantity; never coerce
/// absent to zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// All prompt-side tokens, cache reads and cache writes included.
    pub input_tokens: Option<u64>,
    /// All generated tokens billed as output, reasoning included.
    pub output_tokens: Option<u64>,
    /// Cache reads (subset of `input_tokens`).
    pub cached_input_tokens: Option<u64>,
    /// Cache writes (subset of `input_tokens`), all TTLs.
    pub cache_write_input_tokens: Option<u64>,
    /// The part of `cache_write_input_tokens` written with a 1-hour TTL
    /// (Anthropic `cache_creation.ephemeral_1h_input_tokens`), priced higher.
    pub cache_write_1h_input_tokens: Option<u64>,
    /// Reasoning/thinking tokens (subset of `output_tokens`).
    pub reasoning_tokens: Option<u64>,
}

/// Which provider family's response shapes a route speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI and every OpenAI-compatible server (Azure, vLLM, Ollama,
    /// OpenRouter, DeepSeek, Groq, Mistral, xAI…), chat completions,
    /// completions, responses and embeddings.
    OpenAi,
    Anthropic,
    Gemini,
}

/// How a response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// A single JSON document (non-streaming responses, error bodies).
    Json,
    /// `text/event-stream`.
    Sse,
    /// Newline-delimited JSON (Ollama native `/api/chat`, `/api/generate`).
    Ndjson,
    /// A JSON body whose top-level value is an array, streamed element by
    /// element (Gemini `streamGenerateContent` without `alt=sse`).
    JsonArray,
}

impl BodyFormat {
    /// The format a `Content-Type` announces, if it is one the tap reads:
    /// the one place a response's media type is classified (the proxy
    /// streams [`BodyFormat::is_stream`] replies as they arrive and holds
    /// the others for their cost headers). `application/json` gives
    /// [`BodyFormat::Json`]; the tap itself turns it into
    /// [`BodyFormat::JsonArray`] when the body starts with `[`. NDJSON is
    /// any type ending `ndjson`, `jsonl`, `jsonlines` or `json-lines`
    /// (`application/x-ndjson`, `application/jsonl`, a vendor's
    /// `…+ndjson`). Media types compare ASCII case-insensitively, in place
    /// (no lowercased copy: this runs on every call).
    pub fn from_content_type(content_type: Option<&str>) -> Option<BodyFormat> {
        const NDJSON_ENDINGS: [&str; 4] = ["ndjson", "jsonl", "jsonlines", "json-lines"];
        let mime = content_type?.split(';').next()?.trim().as_bytes();
        let is = |name: &str| mime.eq_ignore_ascii_case(name.as_bytes());
        // A type shorter than the ending compares unequal as a whole.
        let ends_with = |ending: &str| {
            mime.get(mime.len().saturating_sub(ending.len())..)
                .is_some_and(|end| end.eq_ignore_ascii_case(ending.as_bytes()))
        };
        if is("application/json") || is("text/json") {
            Some(BodyFormat::Json)
        } else if is("text/event-stream") {
            Some(BodyFormat::Sse)
        } else if NDJSON_ENDINGS.iter().any(|ending| ends_with(ending)) {
            Some(BodyFormat::Ndjson)
        } else if ends_with("+json") {
            Some(BodyFormat::Json)
        } else {
            None
        }
    }

    /// A format of events or records, forwarded as they arrive.
    pub fn is_stream(self) -> bool {
        matches!(self, BodyFormat::Sse | BodyFormat::Ndjson)
    }
}

/// How the body ended, as far as the body itself tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The stream's terminal marker arrived (`data: [DONE]`, `message_stop`,
    /// `response.completed`/`response.incomplete`, Ollama `done: true`), the
    /// JSON body was complete, or a Gemini stream ended cleanly after its
    /// final chunk (`finishReason`).
    Completed,
    /// The body ended (or was abandoned) without its terminal marker.
    Incomplete,
    /// An in-band error: an `error` event or chunk, `response.failed`, an
    /// error body, Gemini's raw error object after the events.
    Failed,
}

/// Memory bounds of one tap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapLimits {
    /// Largest SSE event (the bytes of its lines, line terminators aside)
    /// that is decoded; larger events are skipped with `parse_error` and
    /// counted whole in `output_text_bytes`. Also bounds the usage-chunk
    /// filter.
    pub max_event_bytes: usize,
    /// Largest captured JSON member value (a `usage` object, a model name)
    /// in plain JSON / NDJSON / JSON-array bodies.
    pub max_json_value_bytes: usize,
}

impl Default for TapLimits {
    /// 1 MiB each: far above any real usage event (a few hundred bytes) or
    /// content chunk, small enough that thousands of concurrent streams stay
    /// cheap.
    fn default() -> Self {
        TapLimits {
            max_event_bytes: 1 << 20,
            max_json_value_bytes: 1 << 20,
        }
    }
}

/// What the tap learned from one body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// `None` when the body carried no usage at all.
    pub usage: Option<Usage>,
    /// The model as reported by the body (first non-empty `model`,
    /// `message_start.message.model`, `response.model`, `modelVersion`).
    pub model: Option<String>,
    pub outcome: Outcome,
    /// Something could not be decoded: bad JSON in an event that mattered, an
    /// event or value over its cap, a broken or unsupported compression, a
    /// decompression bomb. Usage that was read stays valid.
    pub parse_error: bool,
    /// Type or code of an in-band error (`"overloaded_error"`,
    /// `"insufficient_quota"`, `"RESOURCE_EXHAUSTED"`, `"429"`), if any.
    pub provider_error: Option<String>,
    /// Bytes of generated text seen (content/reasoning/tool-argument deltas,
    /// text parts), as written in the JSON (escapes included). For estimates.
    pub output_text_bytes: u64,
    /// Decoded body bytes seen; for a body whose decoding stopped before
    /// its end (corrupt, over the decoded-bytes budget, unknown coding), the
    /// raw bytes received instead.
    pub body_bytes: u64,
}

/// The decoded side of the tap: format detection, framing and extraction.
/// It is the `Write` sink of the content decoder.
struct Body {
    declared: Option<BodyFormat>,
    format: Option<BodyFormat>,
    parser: Parser,
    ex: Extractor,
    limits: TapLimits,
    /// Decoded bytes the decoder may still deliver in this read.
    budget: u64,
    decoded_bytes: u64,
}

enum Parser {
    /// Waiting for the first non-whitespace byte.
    Undecided,
    Sse(SseDecoder),
    Json(JsonScanner),
}

impl Default for Body {
    // Only used as a placeholder while the deflate decoder swaps its sink.
    fn default() -> Self {
        Body::new(Dialect::OpenAi, None, TapLimits::default())
    }
}

impl Body {
    fn new(dialect: Dialect, declared: Option<BodyFormat>, limits: TapLimits) -> Self {
        Body {
            declared,
            format: None,
            parser: Parser::Undecided,
            ex: Extractor::new(dialect, limits.max_event_bytes),
            limits,
            budget: 0,
            decoded_bytes: 0,
        }
    }

    fn consume(&mut self, buf: &[u8]) {
        self.decoded_bytes = self.decoded_bytes.saturating_add(buf.len() as u64);
        let mut buf = buf;
        if let Parser::Undecided = self.parser {
            // Whitespace before the first byte never reaches the parser, so
            // the parser sees the same bytes whether or not that whitespace
            // came in a read of its own.
            let Some(start) = buf.iter().position(|b| !b.is_ascii_whitespace()) else {
                return;
            };
            buf = buf.get(start..).unwrap_or_default();
            if let Some(&first) = buf.first() {
                self.decide(first);
            }
        }
        match &mut self.parser {
            Parser::Undecided => {}
            Parser::Sse(d) => d.feed(buf, &mut self.ex),
            Parser::Json(s) => s.feed(buf, &mut self.ex),
        }
    }

    /// Picks the framing from the declared content type and the first
    /// non-whitespace byte. The byte wins where the two disagree in a way
    /// that only one reading can make sense of: an event stream cannot start
    /// with `{` (that is a JSON error body sent with the stream's content
    /// type), and a "JSON" body that starts with `data:`/`event:`/`:` is an
    /// event stream with a wrong label.
    fn decide(&mut self, first: u8) {
        let json_start = first == b'{' || first == b'[';
        let sse_start = matches!(first, b'd' | b'e' | b':' | b'i' | b'r');
        let format = match self.declared {
            Some(BodyFormat::Ndjson) => BodyFormat::Ndjson,
            Some(BodyFormat::Sse) if !json_start => BodyFormat::Sse,
            Some(BodyFormat::Json) | Some(BodyFormat::JsonArray) if sse_start => BodyFormat::Sse,
            None if !json_start => BodyFormat::Sse,
            _ if first == b'[' => BodyFormat::JsonArray,
            _ => BodyFormat::Json,
        };
        self.format = Some(format);
        self.parser = match format {
            BodyFormat::Sse => Parser::Sse(SseDecoder::new(self.limits.max_event_bytes)),
            BodyFormat::Ndjson => {
                Parser::Json(JsonScanner::new(true, self.limits.max_json_value_bytes))
            }
            BodyFormat::Json | BodyFormat::JsonArray => {
                Parser::Json(JsonScanner::new(false, self.limits.max_json_value_bytes))
            }
        };
    }

    /// The observation; `raw_bytes` replaces the decoded size for a body that
    /// could not be decoded.
    fn observe(&mut self, raw_bytes: Option<u64>) -> Observation {
        let clean = match &mut self.parser {
            Parser::Undecided => true,
            Parser::Sse(d) => d.finish(&mut self.ex),
            Parser::Json(s) => s.at_rest(),
        };
        gemini::finish_stray(&mut self.ex);
        self.ex.settle();
        // Runs once (`UsageTap::finish` uses the tap up), so the strings
        // move out rather than being copied.
        let model = self.ex.model.take();
        let provider_error = self.ex.provider_error.take();
        let ex = &self.ex;
        let completed = match self.format {
            Some(BodyFormat::Sse) => {
                ex.terminal || (ex.dialect == Dialect::Gemini && clean && ex.gemini_finished)
            }
            Some(BodyFormat::Ndjson) => ex.terminal,
            Some(BodyFormat::Json) | Some(BodyFormat::JsonArray) => ex.json_values > 0,
            None => false,
        };
        let outcome = if ex.failed {
            Outcome::Failed
        } else if completed {
            Outcome::Completed
        } else {
            Outcome::Incomplete
        };
        Observation {
            usage: ex.usage.clone(),
            model,
            outcome,
            parse_error: ex.parse_error,
            provider_error,
            output_text_bytes: ex.text_bytes,
            body_bytes: raw_bytes.unwrap_or(self.decoded_bytes),
        }
    }
}

impl io::Write for Body {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len() as u64;
        if n > self.budget {
            self.budget = 0;
            return Err(io::Error::other("decoded bytes over the per-read budget"));
        }
        self.budget -= n;
        self.consume(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads usage out of one response body while the proxy forwards it.
///
/// Feed every body frame, in order, as it is forwarded; call
/// [`UsageTap::finish`] at the end of the body or when it is abandoned.
pub struct UsageTap {
    decoder: Decoder<Body>,
    /// Bytes fed to the tap, as received (compressed or not).
    raw_bytes: u64,
    /// Decoding stopped before the end of the body: a corrupt compressed
    /// stream, the decoded-bytes budget, or a coding the tap cannot decode.
    /// The body's size is then its raw size: how much of the failing read a
    /// decoder emits before it reports the error depends on how the body was
    /// split into reads, the raw size does not.
    undecodable: bool,
}

impl std::fmt::Debug for UsageTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageTap")
            .field("raw_bytes", &self.raw_bytes)
            .finish_non_exhaustive()
    }
}

impl UsageTap {
    /// A tap for a body whose headers (as sent by the upstream) declare
    /// `declared` ([`BodyFormat::from_content_type`]) and
    /// `content_encoding`.
    pub fn new(
        dialect: Dialect,
        declared: Option<BodyFormat>,
        content_encoding: Option<&str>,
        limits: TapLimits,
    ) -> UsageTap {
        let body = Body::new(dialect, declared, limits);
        let (mut decoder, supported) = Decoder::new(Coding::parse(content_encoding), body);
        if !supported {
            decoder.sink().ex.parse_error = true;
        }
        UsageTap {
            decoder,
            raw_bytes: 0,
            undecodable: !supported,
        }
    }

    /// The body format, once the first non-whitespace byte has been decoded.
    pub fn format(&mut self) -> Option<BodyFormat> {
        self.decoder.sink().format
    }

    /// Takes the next piece of the body, split anywhere. Never panics; memory
    /// stays within the [`TapLimits`] plus the decoder's window.
    pub fn feed(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        self.raw_bytes = self.raw_bytes.saturating_add(chunk.len() as u64);
        if self.decoder.is_dead() {
            return;
        }
        self.decoder.sink().budget = decode::budget_for(chunk.len());
        let result = self.decoder.write(chunk);
        // Outside a write nothing may reach the parser (codecs flush on drop).
        self.decoder.sink().budget = 0;
        if result.is_err() {
            self.decoder.kill();
            self.decoder.sink().ex.parse_error = true;
            self.undecodable = true;
        }
    }

    /// What the body has shown so far, without finishing it: the usage
    /// reported up to now and the bytes of generated text seen. For a
    /// running cost while a stream is still open.
    pub fn progress(&mut self) -> (Option<Usage>, u64) {
        let ex = &self.decoder.sink().ex;
        (ex.usage.clone(), ex.text_bytes)
    }

    /// The observation of the whole body, at its end or on abort. The tap is
    /// used up: its model and error strings move into the observation.
    pub fn finish(mut self) -> Observation {
        if !self.decoder.is_dead() {
            self.decoder.sink().budget = DECODED_FLOOR_PER_FEED;
            let result = self.decoder.finish();
            self.decoder.sink().budget = 0;
            if result.is_err() {
                // Truncated or corrupt compressed stream. Everything fed was
                // decoded as far as it went (the decoder flushes its output
                // first), so the decoded size stands.
                self.decoder.kill();
                self.decoder.sink().ex.parse_error = true;
            }
        }
        let raw = self.undecodable.then_some(self.raw_bytes);
        self.decoder.sink().observe(raw)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
