//! OpenAI and OpenAI-compatible streams: chat completions, completions, the
//! Responses API, and the servers that copy them (Azure, vLLM, Ollama `/v1`,
//! OpenRouter, DeepSeek, Groq, Mistral, xAI).
//!
//! Flow per SSE event:
//! 1. `data: [DONE]` is the terminator of chat/completions streams.
//! 2. Generated text is measured cheaply (string values of `content`,
//!    `text`, `reasoning`… in chat chunks; `delta` of Responses `*.delta`
//!    events) without parsing. A chat chunk's walk starts past the opening
//!    bytes it shares with the chunk before (`wire::SharedOpening`).
//! 3. The event is deserialized only if it can matter: it has a non-null
//!    `usage` or `error`, it is a Responses terminal or `error` event, or no
//!    model has been seen yet. Content deltas — nearly every event — stop at
//!    step 2. A strict walk (`Event::read_plain`) reads the plain events;
//!    serde_json the ones it declines (errors, escaped strings, other
//!    shapes), and decides what is malformed.
//! 4. Usage: the last non-null `usage` wins (never a sum: vLLM's continuous
//!    usage stats repeat running totals), falling back to Groq's duplicate
//!    `x_groq.usage`. Responses API usage comes only from
//!    `response.completed` / `.incomplete` / `.failed`.
//! 5. Errors: a chunk with a non-null `error` (OpenAI, OpenRouter — which may
//!    also carry usage, kept), Groq's `event: error`, the Responses `error`
//!    event (flat or nested) and `response.failed` make the outcome Failed.

use super::extract::{trim, Extractor};
use super::strict_json::{Seen, Walk};
use super::wire::{
    error_label, for_each_member, non_null_at, plain_count, string_at, Count, SharedOpening,
};
use super::Usage;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct Details {
    cached_tokens: Count,
    cache_write_tokens: Count,
    reasoning_tokens: Count,
}

/// Every usage shape of the OpenAI family (chat/completions/embeddings use
/// `prompt_tokens`…, the Responses API `input_tokens`…).
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct OaUsage {
    prompt_tokens: Count,
    completion_tokens: Count,
    total_tokens: Count,
    prompt_tokens_details: Option<Details>,
    completion_tokens_details: Option<Details>,
    /// DeepSeek's own name for cache reads.
    prompt_cache_hit_tokens: Count,
    input_tokens: Count,
    output_tokens: Count,
    input_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
}

impl Details {
    fn walk(w: &mut Walk) -> Option<Details> {
        let mut d = Details::default();
        let mut seen = Seen::default();
        w.object(|w, key| {
            match key {
                b"cached_tokens" => d.cached_tokens = seen.field(0, w, plain_count)?,
                b"cache_write_tokens" => d.cache_write_tokens = seen.field(1, w, plain_count)?,
                b"reasoning_tokens" => d.reasoning_tokens = seen.field(2, w, plain_count)?,
                _ => w.value()?,
            }
            Some(())
        })?;
        Some(d)
    }
}

impl OaUsage {
    /// serde_json's reading of a captured `usage` value (`null` or an
    /// object) when its counts are plain integers or `null`, as they nearly
    /// always are; `None` leaves the value to serde_json (other shapes,
    /// duplicate members, invalid JSON).
    pub(crate) fn read_plain(raw: &[u8]) -> Option<Option<OaUsage>> {
        Walk::document(raw, |w| w.nullable(OaUsage::walk))
    }

    fn walk(w: &mut Walk) -> Option<OaUsage> {
        let mut u = OaUsage::default();
        let mut seen = Seen::default();
        w.object(|w, key| {
            match key {
                b"prompt_tokens" => u.prompt_tokens = seen.field(0, w, plain_count)?,
                b"completion_tokens" => u.completion_tokens = seen.field(1, w, plain_count)?,
                b"total_tokens" => u.total_tokens = seen.field(2, w, plain_count)?,
                b"prompt_tokens_details" => {
                    u.prompt_tokens_details = seen.field(3, w, |w| w.nullable(Details::walk))?
                }
                b"completion_tokens_details" => {
                    u.completion_tokens_details = seen.field(4, w, |w| w.nullable(Details::walk))?
                }
                b"prompt_cache_hit_tokens" => {
                    u.prompt_cache_hit_tokens = seen.field(5, w, plain_count)?
                }
                b"input_tokens" => u.input_tokens = seen.field(6, w, plain_count)?,
                b"output_tokens" => u.output_tokens = seen.field(7, w, plain_count)?,
                b"input_tokens_details" => {
                    u.input_tokens_details = seen.field(8, w, |w| w.nullable(Details::walk))?
                }
                b"output_tokens_details" => {
                    u.output_tokens_details = seen.field(9, w, |w| w.nullable(Details::walk))?
                }
                _ => w.value()?,
            }
            Some(())
        })?;
        Some(u)
    }

    pub(crate) fn to_usage(&self) -> Option<Usage> {
        let none = Details::default();
        if self.prompt_tokens.get().is_some() || self.completion_tokens.get().is_some() {
            let pd = self.prompt_tokens_details.as_ref().unwrap_or(&none);
            let cd = self.completion_tokens_details.as_ref().unwrap_or(&none);
            let prompt = self.prompt_tokens.get();
            let completion = self.completion_tokens.get();
            let reasoning = cd.reasoning_tokens.get();
            Some(Usage {
                input_tokens: prompt,
                output_tokens: xai_output(prompt, completion, reasoning, self.total_tokens.get()),
                cached_input_tokens: pd
                    .cached_tokens
                    .get()
                    .or(self.prompt_cache_hit_tokens.get()),
                cache_write_input_tokens: pd.cache_write_tokens.get(),
                cache_write_1h_input_tokens: None,
                reasoning_tokens: reasoning,
            })
        } else if self.input_tokens.get().is_some() || self.output_tokens.get().is_some() {
            let id = self.input_tokens_details.as_ref().unwrap_or(&none);
            let od = self.output_tokens_details.as_ref().unwrap_or(&none);
            Some(Usage {
                input_tokens: self.input_tokens.get(),
                output_tokens: self.output_tokens.get(),
                cached_input_tokens: id.cached_tokens.get(),
                cache_write_input_tokens: id.cache_write_tokens.get(),
                cache_write_1h_input_tokens: None,
                reasoning_tokens: od.reasoning_tokens.get(),
            })
        } else {
            None
        }
    }
}

/// Output tokens, reasoning included. xAI reports reasoning *outside*
/// `completion_tokens` (but inside `total_tokens`); everyone else inside.
/// xAI is recognised by its arithmetic rather than by name, because the route
/// may be any OpenAI-compatible upstream: when `prompt + completion +
/// reasoning == total` with reasoning > 0, reasoning was not part of
/// completion (for the others `prompt + completion == total`, and both cannot
/// hold at once when reasoning > 0).
fn xai_output(
    prompt: Option<u64>,
    completion: Option<u64>,
    reasoning: Option<u64>,
    total: Option<u64>,
) -> Option<u64> {
    if let (Some(p), Some(c), Some(r), Some(t)) = (prompt, completion, reasoning, total) {
        if r > 0 && p.checked_add(c).and_then(|s| s.checked_add(r)) == Some(t) {
            return Some(c.saturating_add(r));
        }
    }
    completion
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
struct XGroq {
    usage: Option<OaUsage>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
struct ResponseObject {
    model: Option<String>,
    usage: Option<OaUsage>,
    error: Option<Value>,
}

/// One chat/completions chunk or one Responses API event.
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
struct Event {
    model: Option<String>,
    usage: Option<OaUsage>,
    x_groq: Option<XGroq>,
    error: Option<Value>,
    #[serde(rename = "type")]
    kind: Option<String>,
    /// Flat Responses `error` event: `{"type":"error","code",...}`.
    code: Option<Value>,
    response: Option<ResponseObject>,
}

impl Event {
    /// serde_json's reading of an event's data when its strings hold no
    /// escape, its counts are plain and it has no `error` or `code` (as
    /// the events read here nearly always are); `None` leaves it to
    /// serde_json.
    fn read_plain(data: &[u8]) -> Option<Event> {
        Walk::document(data, Event::walk)
    }

    fn walk(w: &mut Walk) -> Option<Event> {
        let mut ev = Event::default();
        let mut seen = Seen::default();
        w.object(|w, key| {
            match key {
                b"model" => ev.model = seen.field(0, w, Walk::nullable_string)?,
                b"usage" => ev.usage = seen.field(1, w, |w| w.nullable(OaUsage::walk))?,
                b"x_groq" => ev.x_groq = seen.field(2, w, |w| w.nullable(XGroq::walk))?,
                b"error" => ev.error = seen.field(3, w, Walk::null)?,
                b"type" => ev.kind = seen.field(4, w, Walk::nullable_string)?,
                b"code" => ev.code = seen.field(5, w, Walk::null)?,
                b"response" => {
                    ev.response = seen.field(6, w, |w| w.nullable(ResponseObject::walk))?
                }
                _ => w.value()?,
            }
            Some(())
        })?;
        Some(ev)
    }
}

impl XGroq {
    fn walk(w: &mut Walk) -> Option<XGroq> {
        let usage = w.only_member(b"usage", |w| w.nullable(OaUsage::walk))?;
        Some(XGroq {
            usage: usage.flatten(),
        })
    }
}

impl ResponseObject {
    fn walk(w: &mut Walk) -> Option<ResponseObject> {
        let mut r = ResponseObject::default();
        let mut seen = Seen::default();
        w.object(|w, key| {
            match key {
                b"model" => r.model = seen.field(0, w, Walk::nullable_string)?,
                b"usage" => r.usage = seen.field(1, w, |w| w.nullable(OaUsage::walk))?,
                b"error" => r.error = seen.field(2, w, Walk::null)?,
                _ => w.value()?,
            }
            Some(())
        })?;
        Some(r)
    }
}

/// Keys whose string values are generated text in chat/completions chunks.
fn chat_text_key(k: &[u8]) -> bool {
    matches!(
        k,
        b"content" | b"text" | b"reasoning" | b"reasoning_content" | b"arguments" | b"refusal"
    )
}

/// What one pass over an event's members found.
#[derive(Debug, Default, PartialEq)]
struct Scan {
    text: u64,
    usage: bool,
    error: bool,
    /// A `"type"` naming a Responses terminal or error event.
    terminal_type: bool,
}

fn scan(data: &[u8], text_key: fn(&[u8]) -> bool) -> Scan {
    let mut s = Scan::default();
    for_each_member(data, |k, v| member(&mut s, data, text_key, k, v));
    s
}

/// [`scan`] of a chat chunk, started past the opening it shares with the
/// chunk before.
fn scan_chat(opening: &mut SharedOpening, data: &[u8]) -> Scan {
    let mut s = Scan::default();
    opening.walk(data, chat_member, |k, v| {
        member(&mut s, data, chat_text_key, k, v)
    });
    s
}

/// The keys [`member`] acts on in a chat chunk (a chat chunk's walk passes
/// over every other key without calling it).
fn chat_member(k: &[u8]) -> bool {
    role(k, chat_text_key) != Role::Other
}

/// What [`member`] does with a key.
#[derive(PartialEq)]
enum Role {
    Usage,
    Error,
    Type,
    Text,
    Other,
}

#[inline(always)]
fn role(k: &[u8], text_key: fn(&[u8]) -> bool) -> Role {
    match k {
        b"usage" => Role::Usage,
        b"error" => Role::Error,
        b"type" => Role::Type,
        k if text_key(k) => Role::Text,
        _ => Role::Other,
    }
}

/// One member of a [`scan`]: `k` is the key, `v` where its value starts.
///
/// `#[inline(always)]`: with two walks calling it, the compiler left it out
/// of line, a call per key that cost the Responses event walk 10 %
/// (`scripts/callgrind-usage.sh`).
#[inline(always)]
fn member(
    s: &mut Scan,
    data: &[u8],
    text_key: fn(&[u8]) -> bool,
    k: &[u8],
    v: usize,
) -> Option<usize> {
    match role(k, text_key) {
        Role::Usage => s.usage |= non_null_at(data, v),
        Role::Error => s.error |= non_null_at(data, v),
        Role::Type => {
            let end = string_at(data, v)?.1;
            let value = data.get(v + 1..end - 1)?;
            s.terminal_type |= matches!(
                value,
                b"response.completed" | b"response.incomplete" | b"response.failed" | b"error"
            );
            return Some(end);
        }
        Role::Text => {
            let (n, next) = string_at(data, v)?;
            s.text = s.text.saturating_add(n);
            return Some(next);
        }
        Role::Other => {}
    }
    None
}

pub(crate) fn sse_event(ex: &mut Extractor, name: &[u8], data: &[u8], at_eof: bool) {
    let body = trim(data);
    if body.starts_with(b"[DONE]") {
        ex.terminal = true;
        return;
    }
    let chat = name.is_empty() || name == b"message";
    let text_key: fn(&[u8]) -> bool = if name.starts_with(b"response.") {
        // Only deltas count: the `.done` events and `response.completed`
        // repeat the whole text. Audio deltas are base64, not text.
        if name.ends_with(b".delta") && !contains(name, b"audio") {
            |k| k == b"delta"
        } else {
            |_| false
        }
    } else if chat {
        chat_text_key
    } else {
        |_| false
    };
    let s = if chat {
        scan_chat(&mut ex.opening, body)
    } else {
        scan(body, text_key)
    };
    ex.add_text(s.text);

    let error_event = name == b"error";
    let terminal_event = matches!(
        name,
        b"response.completed" | b"response.incomplete" | b"response.failed"
    );
    let wanted = error_event
        || terminal_event
        || ex.model.is_none()
        || s.usage
        || s.error
        || (name.is_empty() && s.terminal_type);
    if !wanted {
        return;
    }
    if body.is_empty() {
        if error_event {
            ex.fail(None);
        }
        return;
    }
    let Some(ev) = Event::read_plain(body).or_else(|| ex.parse::<Event>(body, at_eof)) else {
        if error_event && !at_eof {
            ex.fail(None);
        }
        return;
    };
    apply(ex, name, ev);
}

fn apply(ex: &mut Extractor, name: &[u8], ev: Event) {
    // The JSON `type` names Responses events even when a proxy dropped the
    // `event:` line; chat chunks have no `type`.
    let kind = ev
        .kind
        .as_deref()
        .unwrap_or_else(|| std::str::from_utf8(name).unwrap_or(""));
    ex.set_model(ev.model.as_deref());
    if let Some(r) = &ev.response {
        ex.set_model(r.model.as_deref());
    }
    match kind {
        "response.completed" | "response.incomplete" => {
            if let Some(u) = ev.response.as_ref().and_then(|r| r.usage.as_ref()) {
                ex.set_usage(u.to_usage());
            }
            ex.terminal = true;
        }
        "response.failed" => {
            let mut label = None;
            if let Some(r) = &ev.response {
                if let Some(u) = &r.usage {
                    ex.set_usage(u.to_usage());
                }
                label = r.error.as_ref().and_then(error_code_label);
            }
            ex.fail(label.or_else(|| Some("response.failed".to_owned())));
        }
        "error" if ev.error.is_none() => {
            // Flat Responses `error` event.
            ex.fail(Some(
                ev.code
                    .as_ref()
                    .and_then(scalar_label)
                    .unwrap_or_else(|| "error".to_owned()),
            ));
        }
        _ => {
            let usage = ev
                .usage
                .as_ref()
                .or_else(|| ev.x_groq.as_ref().and_then(|x| x.usage.as_ref()));
            if let Some(u) = usage {
                ex.set_usage(u.to_usage());
            }
            if let Some(e) = &ev.error {
                if let Some(label) = error_label(e) {
                    ex.fail(Some(label));
                }
            } else if name == b"error" {
                ex.fail(Some("error".to_owned()));
            }
        }
    }
}

/// `response.error` is `{code, message}`: prefer the code.
fn error_code_label(v: &Value) -> Option<String> {
    v.get("code")
        .and_then(scalar_label)
        .or_else(|| error_label(v))
}

fn scalar_label(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.chars().take(64).collect()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn usage(json: &str) -> Option<Usage> {
        serde_json::from_str::<OaUsage>(json).unwrap().to_usage()
    }

    #[test]
    fn chat_usage_mapping() {
        let u = usage(
            r#"{"prompt_tokens":4020,"completion_tokens":4,"total_tokens":4024,
            "prompt_tokens_details":{"cached_tokens":4012,"cache_write_tokens":0},
            "completion_tokens_details":{"reasoning_tokens":0}}"#,
        )
        .unwrap();
        assert_eq!(u.input_tokens, Some(4020));
        assert_eq!(u.output_tokens, Some(4));
        assert_eq!(u.cached_input_tokens, Some(4012));
        assert_eq!(u.cache_write_input_tokens, Some(0));
        assert_eq!(u.reasoning_tokens, Some(0));
    }

    #[test]
    fn xai_reasoning_outside_completion() {
        // docs.x.ai example: prompt 12 + completion 2 + reasoning 340 = 354.
        let u = usage(
            r#"{"prompt_tokens":12,"completion_tokens":2,"total_tokens":354,
            "completion_tokens_details":{"reasoning_tokens":340}}"#,
        )
        .unwrap();
        assert_eq!(u.output_tokens, Some(342));
        assert_eq!(u.reasoning_tokens, Some(340));
        // Groq: reasoning inside completion, total = prompt + completion.
        let u = usage(
            r#"{"prompt_tokens":304,"completion_tokens":49,"total_tokens":353,
            "completion_tokens_details":{"reasoning_tokens":23}}"#,
        )
        .unwrap();
        assert_eq!(u.output_tokens, Some(49));
    }

    #[test]
    fn deepseek_cache_hit_and_embeddings() {
        let u =
            usage(r#"{"prompt_tokens":563,"completion_tokens":116,"prompt_cache_hit_tokens":512}"#)
                .unwrap();
        assert_eq!(u.cached_input_tokens, Some(512));
        let u = usage(r#"{"prompt_tokens":12,"total_tokens":12}"#).unwrap();
        assert_eq!(u.input_tokens, Some(12));
        assert_eq!(u.output_tokens, None);
        assert_eq!(usage(r#"{"total_tokens":12}"#), None);
    }

    #[test]
    fn responses_usage_mapping() {
        let u = usage(
            r#"{"input_tokens":14,"input_tokens_details":{"cached_tokens":3,"cache_write_tokens":1},
            "output_tokens":50,"output_tokens_details":{"reasoning_tokens":7},"total_tokens":64}"#,
        )
        .unwrap();
        assert_eq!(
            u,
            Usage {
                input_tokens: Some(14),
                output_tokens: Some(50),
                cached_input_tokens: Some(3),
                cache_write_input_tokens: Some(1),
                cache_write_1h_input_tokens: None,
                reasoning_tokens: Some(7),
            }
        );
    }

    fn plain_agrees(raw: &[u8]) -> bool {
        crate::usage::strict_json::plain::agrees(OaUsage::read_plain, raw)
    }

    #[test]
    fn plain_usage_read_without_serde() {
        let cases: &[&str] = &[
            "null",
            "{}",
            " {\n  \"prompt_tokens\": 16,\n  \"completion_tokens\": 363,\n  \"total_tokens\": 379,\n  \"prompt_tokens_details\": {\n    \"cached_tokens\": 0,\n    \"audio_tokens\": 0\n  },\n  \"completion_tokens_details\": {\"reasoning_tokens\": 0, \"accepted_prediction_tokens\": 0}\n} ",
            r#"{"input_tokens":14,"input_tokens_details":{"cached_tokens":3,"cache_write_tokens":1},"output_tokens":50,"output_tokens_details":{"reasoning_tokens":7},"total_tokens":64}"#,
            r#"{"prompt_tokens":563,"completion_tokens":null,"prompt_cache_hit_tokens":512,"prompt_tokens_details":null,"cost":1.5e-3,"x":{"y":["z",true]}}"#,
            r#"{"prompt_tokens":9999999999999999999}"#,
        ];
        for case in cases {
            assert!(plain_agrees(case.as_bytes()), "declined {case:?}");
        }
    }

    fn read_event(data: &[u8]) -> Option<Option<Event>> {
        Event::read_plain(data).map(Some)
    }

    #[test]
    fn captured_events_read_without_serde() {
        let streams = [
            include_str!(
                "../../tests/fixtures/providers/openai/chat-completions.stream-include-usage.sse"
            ),
            include_str!(
                "../../tests/fixtures/providers/openai/chat-completions.stream-no-usage.sse"
            ),
            include_str!("../../tests/fixtures/providers/openai/completions.stream.sse"),
            include_str!("../../tests/fixtures/providers/openai/responses.stream.sse"),
            include_str!("../../tests/fixtures/providers/azure/responses.stream.sse"),
            include_str!("../../tests/fixtures/providers/groq/chat-completions.stream.sse"),
            include_str!("../../tests/fixtures/providers/mistral/chat-completions.stream.sse"),
            include_str!("../../tests/fixtures/providers/openrouter/chat-completions.stream.sse"),
        ];
        let mut events = 0;
        for data in streams
            .iter()
            .flat_map(|s| s.lines())
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
        {
            let read = crate::usage::strict_json::plain::agrees(read_event, data.as_bytes());
            assert!(read, "declined {data}");
            events += 1;
        }
        assert!(events > 100, "{events}");
    }

    #[test]
    fn other_events_go_to_serde() {
        let cases: &[&str] = &[
            r#"{"error":{"message":"upstream failed","code":502},"usage":null}"#,
            r#"{"type":"error","code":"server_error","message":"m"}"#,
            r#"{"type":"response.failed","response":{"error":{"code":"server_error"}}}"#,
            r#"{"model":"gpt\u002d4o","choices":[]}"#,
            r#"{"model":4,"choices":[]}"#,
            r#"{"x_groq":{"usage":{"prompt_tokens":1},"usage":null}}"#,
            r#"{"usage":{"prompt_tokens":1.5}}"#,
            r#"{"choices":[],}"#,
        ];
        for case in cases {
            assert!(
                !crate::usage::strict_json::plain::agrees(read_event, case.as_bytes()),
                "read {case:?}"
            );
        }
        crate::usage::strict_json::plain::declines_duplicates(
            read_event,
            &[
                "model", "usage", "x_groq", "error", "type", "code", "response",
            ],
        );
        for field in ["model", "usage", "error"] {
            let raw = format!(r#"{{"response":{{"{field}":null,"{field}":null}}}}"#);
            assert!(Event::read_plain(raw.as_bytes()).is_none(), "{raw}");
        }
    }

    #[test]
    fn duplicate_fields_go_to_serde() {
        use crate::usage::strict_json::plain::declines_duplicates;
        declines_duplicates(
            OaUsage::read_plain,
            &[
                "prompt_tokens",
                "completion_tokens",
                "total_tokens",
                "prompt_tokens_details",
                "completion_tokens_details",
                "prompt_cache_hit_tokens",
                "input_tokens",
                "output_tokens",
                "input_tokens_details",
                "output_tokens_details",
            ],
        );
        for field in ["cached_tokens", "cache_write_tokens", "reasoning_tokens"] {
            let raw = format!(r#"{{"prompt_tokens_details":{{"{field}":null,"{field}":null}}}}"#);
            assert!(OaUsage::read_plain(raw.as_bytes()).is_none(), "{raw}");
        }
    }

    #[test]
    fn other_usage_shapes_go_to_serde() {
        let cases: &[&str] = &[
            // Shapes `Count` reads leniently: serde_json decides.
            r#"{"prompt_tokens":12.0}"#,
            r#"{"prompt_tokens":-3}"#,
            r#"{"prompt_tokens":"12"}"#,
            r#"{"prompt_tokens":true}"#,
            r#"{"prompt_tokens":[1]}"#,
            r#"{"prompt_tokens":18446744073709551616}"#,
            r#"{"prompt_tokens_details":[]}"#,
            // Duplicates (an error to serde), escaped keys.
            r#"{"prompt_tokens":1,"prompt_tokens":2}"#,
            r#"{"prompt_tokens_details":{"cached_tokens":1,"cached_tokens":2}}"#,
            r#"{"prompt\u005ftokens":1}"#,
            // Not an object, invalid JSON.
            "[]",
            "12",
            r#"{"prompt_tokens":1,}"#,
            r#"{"prompt_tokens":1} x"#,
            r#"{"prompt_tokens":01}"#,
            r#"{"x":"\q"}"#,
        ];
        for case in cases {
            assert!(!plain_agrees(case.as_bytes()), "read {case:?}");
        }
    }

    #[test]
    fn chunks_of_a_stream_start_their_walk_at_the_content() {
        let stream = include_str!(
            "../../tests/fixtures/providers/openai/chat-completions.stream-include-usage.sse"
        );
        let chunks: Vec<&[u8]> = stream
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::as_bytes)
            .collect();
        let mut opening = SharedOpening::default();
        // The first chunk opens with a `role` the others do not have.
        assert_eq!(opening.start(chunks[1]), 0);
        scan_chat(&mut opening, chunks[0]);
        assert_eq!(opening.start(chunks[1]), 0);
        scan_chat(&mut opening, chunks[1]);
        let third = chunks[2];
        let content = memchr::memmem::find(third, b"\"content\"").unwrap();
        assert!(content > 150, "{content}");
        assert_eq!(opening.start(third), content);
        assert_eq!(scan_chat(&mut opening, third).text, " unable".len() as u64);
    }

    mod generated {
        use super::*;
        use crate::usage::strict_json::plain::{read_plain_tests, STEERING_BYTES};
        use proptest::prelude::*;

        const KEYS: &[&str] = &[
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "prompt_tokens_details",
            "completion_tokens_details",
            "prompt_cache_hit_tokens",
            "input_tokens",
            "output_tokens",
            "input_tokens_details",
            "output_tokens_details",
            "cached_tokens",
            "cache_write_tokens",
            "reasoning_tokens",
            "audio_tokens",
        ];

        const EVENT_KEYS: &[&str] = &[
            "model",
            "usage",
            "x_groq",
            "error",
            "type",
            "code",
            "response",
            "prompt_tokens",
            "choices",
        ];

        read_plain_tests!(
            plain_event_read_agrees_with_serde,
            generated_events_are_often_read_plain,
            read_event,
            EVENT_KEYS,
            60
        );

        read_plain_tests!(
            plain_read_agrees_with_serde,
            generated_usage_is_often_read_plain,
            OaUsage::read_plain,
            KEYS,
            80
        );

        /// Chat chunks as a stream sends them: a few openings, shared or
        /// not, and the endings that matter to the scan.
        const OPENINGS: &[&str] = &[
            r#"{"id":"c-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"#,
            r#"{"id":"c-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","#,
            r#"{"id":"c-2","choices":[{"delta":{"#,
            r#"{"#,
        ];
        const ENDINGS: &[&str] = &[
            r#""content":"Hi"},"finish_reason":null}]}"#,
            r#""content":"a \"b\": c","refusal":null},"logprobs":null}]}"#,
            r#""reasoning":"x","text":"yz"}}]}"#,
            r#"},"finish_reason":"stop"}]}"#,
            r#"}}],"usage":{"prompt_tokens":1}}"#,
            r#"}}],"usage":null,"error":{"message":"m"}}"#,
            r#""type":"error"}}]}"#,
            r#"""#,
        ];

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            /// Skipping the opening a chunk shares with the last one finds
            /// what a walk of the whole chunk finds, on damaged chunks too.
            #[test]
            fn skipping_the_shared_opening_changes_no_scan(
                chunks in prop::collection::vec(
                    (
                        0..OPENINGS.len(),
                        0..ENDINGS.len(),
                        prop::collection::vec((any::<usize>(), any::<u8>()), 0..2),
                    ),
                    1..8,
                ),
            ) {
                let mut shared = SharedOpening::default();
                for (start, end, damages) in chunks {
                    let mut chunk = format!("{}{}", OPENINGS[start], ENDINGS[end]).into_bytes();
                    for (at, how) in damages {
                        chunk = crate::usage::strict_json::damage(chunk, at, how, STEERING_BYTES);
                    }
                    let whole = scan(&chunk, chat_text_key);
                    prop_assert_eq!(scan_chat(&mut shared, &chunk), whole);
                }
            }
        }
    }
}
