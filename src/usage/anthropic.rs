//! Anthropic Messages: JSON bodies and `event:`-named SSE streams.
//!
//! Flow per SSE event, dispatched on the event name (which equals the JSON
//! `type`; the JSON is read only when the name is missing). The events read
//! are read by a strict walk (`Event::read_plain`), or by serde_json when
//! it declines them (errors, escaped strings, other shapes):
//! - `message_start`: model and the starting usage (`message.usage`).
//! - `message_delta`: cumulative usage; each field present replaces the
//!   start value (current streams repeat the input side and it can *grow*
//!   when server tools run). A present-but-zero input-side field does not
//!   wipe a non-zero start value: some Anthropic-compatible servers send
//!   `input_tokens: 0` there (envoyproxy/ai-gateway#1631).
//! - `content_block_delta`: generated text (`text`, `thinking`,
//!   `partial_json`), measured without parsing.
//! - `message_stop`: terminator. `error`: Failed, usage so far kept.
//!
//! Normalisation: input = `input_tokens + cache_creation_input_tokens +
//! cache_read_input_tokens`; when `usage.iterations` is present (compaction)
//! the bill is the sum over iterations, because the top-level numbers leave
//! the compaction iterations out.

use super::extract::{trim, Extractor};
use super::strict_json::{Seen, Walk};
use super::wire::{add_opt, error_label, one_plain_count, plain_count, string_at, Count};
use super::Usage;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct CacheCreation {
    ephemeral_1h_input_tokens: Count,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct OutputDetails {
    thinking_tokens: Count,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct Iteration {
    input_tokens: Count,
    cache_creation_input_tokens: Count,
    cache_read_input_tokens: Count,
    output_tokens: Count,
    cache_creation: Option<CacheCreation>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct AnthUsage {
    input_tokens: Count,
    cache_creation_input_tokens: Count,
    cache_read_input_tokens: Count,
    output_tokens: Count,
    cache_creation: Option<CacheCreation>,
    output_tokens_details: Option<OutputDetails>,
    iterations: Option<Vec<Iteration>>,
}

impl CacheCreation {
    fn walk(w: &mut Walk) -> Option<CacheCreation> {
        Some(CacheCreation {
            ephemeral_1h_input_tokens: one_plain_count(w, b"ephemeral_1h_input_tokens")?,
        })
    }
}

impl OutputDetails {
    fn walk(w: &mut Walk) -> Option<OutputDetails> {
        Some(OutputDetails {
            thinking_tokens: one_plain_count(w, b"thinking_tokens")?,
        })
    }
}

impl AnthUsage {
    /// serde_json's reading of a captured `usage` value (`null` or an
    /// object) when its counts are plain integers or `null`, as they nearly
    /// always are; `None` leaves the value to serde_json (other shapes,
    /// duplicate members, `iterations` that are not `null`, invalid JSON).
    pub(crate) fn read_plain(raw: &[u8]) -> Option<Option<AnthUsage>> {
        Walk::document(raw, |w| w.nullable(AnthUsage::walk))
    }

    fn walk(w: &mut Walk) -> Option<AnthUsage> {
        let mut u = AnthUsage::default();
        let mut seen = Seen::default();
        w.object(|w, key| {
            match key {
                b"input_tokens" => u.input_tokens = seen.field(0, w, plain_count)?,
                b"cache_creation_input_tokens" => {
                    u.cache_creation_input_tokens = seen.field(1, w, plain_count)?
                }
                b"cache_read_input_tokens" => {
                    u.cache_read_input_tokens = seen.field(2, w, plain_count)?
                }
                b"output_tokens" => u.output_tokens = seen.field(3, w, plain_count)?,
                b"cache_creation" => {
                    u.cache_creation = seen.field(4, w, |w| w.nullable(CacheCreation::walk))?
                }
                b"output_tokens_details" => {
                    u.output_tokens_details =
                        seen.field(5, w, |w| w.nullable(OutputDetails::walk))?
                }
                // Compaction's per-iteration usage is rare: serde_json
                // reads it.
                b"iterations" => u.iterations = seen.field(6, w, Walk::null)?,
                _ => w.value()?,
            }
            Some(())
        })?;
        Some(u)
    }
}

/// Summed usage of `usage.iterations`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct IterationTotals {
    input: Option<u64>,
    cache_creation: Option<u64>,
    cache_read: Option<u64>,
    output: Option<u64>,
    cache_1h: Option<u64>,
}

/// The merged usage fields of one message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Fields {
    input: Option<u64>,
    cache_creation: Option<u64>,
    cache_read: Option<u64>,
    output: Option<u64>,
    cache_1h: Option<u64>,
    thinking: Option<u64>,
    iterations: Option<IterationTotals>,
}

fn one_hour(c: &Option<CacheCreation>) -> Option<u64> {
    c.as_ref().and_then(|c| c.ephemeral_1h_input_tokens.get())
}

fn totals(iters: &[Iteration]) -> IterationTotals {
    let mut t = IterationTotals::default();
    for it in iters {
        t.input = add_opt(t.input, it.input_tokens.get());
        t.cache_creation = add_opt(t.cache_creation, it.cache_creation_input_tokens.get());
        t.cache_read = add_opt(t.cache_read, it.cache_read_input_tokens.get());
        t.output = add_opt(t.output, it.output_tokens.get());
        t.cache_1h = add_opt(t.cache_1h, one_hour(&it.cache_creation));
    }
    t
}

/// Input-side replacement rule: a present zero does not erase a known
/// non-zero value.
fn replace_input(current: &mut Option<u64>, new: Option<u64>) {
    match (new, *current) {
        (Some(0), Some(c)) if c > 0 => {}
        (Some(n), _) => *current = Some(n),
        (None, _) => {}
    }
}

fn replace(current: &mut Option<u64>, new: Option<u64>) {
    if new.is_some() {
        *current = new;
    }
}

impl Fields {
    /// A complete usage object (`message_start`, or a JSON body).
    pub(crate) fn set(&mut self, u: &AnthUsage) {
        *self = Fields::default();
        self.merge(u);
    }

    /// `message_delta`: each field present replaces the current value.
    pub(crate) fn merge(&mut self, u: &AnthUsage) {
        replace_input(&mut self.input, u.input_tokens.get());
        replace_input(
            &mut self.cache_creation,
            u.cache_creation_input_tokens.get(),
        );
        replace_input(&mut self.cache_read, u.cache_read_input_tokens.get());
        replace_input(&mut self.cache_1h, one_hour(&u.cache_creation));
        replace(&mut self.output, u.output_tokens.get());
        replace(
            &mut self.thinking,
            u.output_tokens_details
                .as_ref()
                .and_then(|d| d.thinking_tokens.get()),
        );
        if let Some(iters) = &u.iterations {
            if !iters.is_empty() {
                self.iterations = Some(totals(iters));
            }
        }
    }

    pub(crate) fn to_usage(&self) -> Option<Usage> {
        let (input, cache_creation, cache_read, output, cache_1h) = match &self.iterations {
            Some(t) => (
                t.input,
                t.cache_creation,
                t.cache_read,
                t.output,
                t.cache_1h.or(self.cache_1h),
            ),
            None => (
                self.input,
                self.cache_creation,
                self.cache_read,
                self.output,
                self.cache_1h,
            ),
        };
        let prompt = add_opt(add_opt(input, cache_creation), cache_read);
        if prompt.is_none() && output.is_none() {
            return None;
        }
        Some(Usage {
            input_tokens: prompt,
            output_tokens: output,
            cached_input_tokens: cache_read,
            cache_write_input_tokens: cache_creation,
            cache_write_1h_input_tokens: cache_1h,
            reasoning_tokens: self.thinking,
        })
    }
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
struct Message {
    model: Option<String>,
    usage: Option<AnthUsage>,
}

impl Message {
    fn walk(w: &mut Walk) -> Option<Message> {
        let mut m = Message::default();
        let mut seen = Seen::default();
        w.object(|w, key| {
            match key {
                b"model" => m.model = seen.field(0, w, Walk::nullable_string)?,
                b"usage" => m.usage = seen.field(1, w, |w| w.nullable(AnthUsage::walk))?,
                _ => w.value()?,
            }
            Some(())
        })?;
        Some(m)
    }
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
struct Event {
    #[serde(rename = "type")]
    kind: Option<String>,
    message: Option<Message>,
    usage: Option<AnthUsage>,
    error: Option<Value>,
}

impl Event {
    /// serde_json's reading of an event's data when its strings hold no
    /// escape, its counts are plain and it has no `error` (as the events
    /// read here nearly always are); `None` leaves it to serde_json.
    fn read_plain(data: &[u8]) -> Option<Event> {
        Walk::document(data, Event::walk)
    }

    fn walk(w: &mut Walk) -> Option<Event> {
        let mut ev = Event::default();
        let mut seen = Seen::default();
        w.object(|w, key| {
            match key {
                b"type" => ev.kind = seen.field(0, w, Walk::nullable_string)?,
                b"message" => ev.message = seen.field(1, w, |w| w.nullable(Message::walk))?,
                b"usage" => ev.usage = seen.field(2, w, |w| w.nullable(AnthUsage::walk))?,
                b"error" => ev.error = seen.field(3, w, Walk::null)?,
                _ => w.value()?,
            }
            Some(())
        })?;
        Some(ev)
    }
}

pub(crate) fn sse_event(ex: &mut Extractor, name: &[u8], data: &[u8], at_eof: bool) {
    match name {
        b"content_block_delta" => {
            count_text(ex, data);
            return;
        }
        b"message_stop" => {
            ex.terminal = true;
            return;
        }
        b"ping" | b"content_block_start" | b"content_block_stop" => return,
        _ => {}
    }
    let body = trim(data);
    if body.is_empty() {
        if name == b"error" {
            ex.fail(Some("error".to_owned()));
        }
        return;
    }
    let Some(ev) = Event::read_plain(body).or_else(|| ex.parse::<Event>(body, at_eof)) else {
        if name == b"error" && !at_eof {
            ex.fail(Some("error".to_owned()));
        }
        return;
    };
    let kind = if name.is_empty() || name == b"message" {
        ev.kind.clone().unwrap_or_default()
    } else {
        String::from_utf8_lossy(name).into_owned()
    };
    match kind.as_str() {
        "message_start" => {
            if let Some(m) = &ev.message {
                ex.set_model(m.model.as_deref());
                if let Some(u) = &m.usage {
                    ex.anthropic.set(u);
                    let usage = ex.anthropic.to_usage();
                    ex.set_usage(usage);
                }
            }
        }
        "message_delta" => {
            if let Some(u) = &ev.usage {
                ex.anthropic.merge(u);
                let usage = ex.anthropic.to_usage();
                ex.set_usage(usage);
            }
        }
        "message_stop" => ex.terminal = true,
        "content_block_delta" => count_text(ex, data),
        "error" => {
            let label = ev
                .error
                .as_ref()
                .and_then(error_label)
                .unwrap_or_else(|| "error".to_owned());
            ex.fail(Some(label));
        }
        _ => {}
    }
}

/// Generated text in a content delta, its walk started past the opening it
/// shares with the delta before.
fn count_text(ex: &mut Extractor, data: &[u8]) {
    let mut n = 0u64;
    ex.opening.walk(data, text_key, |_, v| {
        let (len, next) = string_at(data, v)?;
        n = n.saturating_add(len);
        Some(next)
    });
    ex.add_text(n);
}

/// Keys whose string values are generated text in content deltas.
fn text_key(k: &[u8]) -> bool {
    matches!(k, b"text" | b"thinking" | b"partial_json")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn au(json: &str) -> AnthUsage {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn delta_replaces_start_but_zero_input_does_not_wipe() {
        let mut f = Fields::default();
        f.set(&au(
            r#"{"input_tokens":25,"cache_read_input_tokens":100,"output_tokens":1}"#,
        ));
        f.merge(&au(
            r#"{"input_tokens":0,"cache_read_input_tokens":0,"output_tokens":30}"#,
        ));
        let u = f.to_usage().unwrap();
        assert_eq!(u.input_tokens, Some(125));
        assert_eq!(u.cached_input_tokens, Some(100));
        assert_eq!(u.output_tokens, Some(30));
        // Growth from server tools replaces.
        f.merge(&au(r#"{"input_tokens":40}"#));
        assert_eq!(f.to_usage().unwrap().input_tokens, Some(140));
    }

    #[test]
    fn cache_ttl_and_thinking() {
        let mut f = Fields::default();
        f.set(&au(
            r#"{"input_tokens":3,"cache_creation_input_tokens":418,"cache_read_input_tokens":1111,
            "cache_creation":{"ephemeral_5m_input_tokens":18,"ephemeral_1h_input_tokens":400},
            "output_tokens":33,"output_tokens_details":{"thinking_tokens":12}}"#,
        ));
        let u = f.to_usage().unwrap();
        assert_eq!(u.input_tokens, Some(1532));
        assert_eq!(u.cache_write_input_tokens, Some(418));
        assert_eq!(u.cache_write_1h_input_tokens, Some(400));
        assert_eq!(u.reasoning_tokens, Some(12));
    }

    fn plain_agrees(raw: &[u8]) -> bool {
        crate::usage::strict_json::plain::agrees(AnthUsage::read_plain, raw)
    }

    #[test]
    fn plain_usage_read_without_serde() {
        let fixture =
            include_str!("../../tests/fixtures/providers/anthropic/messages.nonstream.cache.json");
        let usage = &fixture[fixture.find("\"usage\": ").unwrap() + 9..fixture.rfind('}').unwrap()];
        let cases: &[&str] = &[
            "null",
            "{}",
            usage,
            r#"{"input_tokens":3,"cache_creation_input_tokens":418,"cache_read_input_tokens":1111,
            "cache_creation":{"ephemeral_5m_input_tokens":18,"ephemeral_1h_input_tokens":400},
            "output_tokens":33,"output_tokens_details":{"thinking_tokens":12}}"#,
            r#"{"input_tokens":null,"cache_creation":null,"output_tokens_details":null,"iterations":null,
            "server_tool_use":{"web_search_requests":1},"service_tier":"standard"}"#,
            r#"{"output_tokens":9999999999999999999}"#,
        ];
        for case in cases {
            assert!(plain_agrees(case.as_bytes()), "declined {case:?}");
        }
        assert!(
            AnthUsage::read_plain(usage.as_bytes())
                .unwrap()
                .unwrap()
                .cache_read_input_tokens
                .get()
                == Some(1111)
        );
    }

    #[test]
    fn other_usage_shapes_go_to_serde() {
        let cases: &[&str] = &[
            // Shapes `Count` reads leniently: serde_json decides.
            r#"{"input_tokens":12.0}"#,
            r#"{"input_tokens":-3}"#,
            r#"{"output_tokens":"12"}"#,
            r#"{"cache_creation":{"ephemeral_1h_input_tokens":true}}"#,
            r#"{"output_tokens_details":{"thinking_tokens":[1]}}"#,
            // Iterations, duplicates, escaped keys.
            r#"{"iterations":[{"input_tokens":1}]}"#,
            r#"{"input_tokens":1,"input_tokens":2}"#,
            r#"{"cache_creation":{"ephemeral_1h_input_tokens":1,"ephemeral_1h_input_tokens":2}}"#,
            r#"{"cache_creation":null,"cache_creation":{}}"#,
            r#"{"output_tokens_details":{},"output_tokens_details":null}"#,
            r#"{"iterations":null,"iterations":null}"#,
            r#"{"input\u005ftokens":1}"#,
            // Not an object, invalid JSON.
            "[]",
            r#"{"input_tokens":1,}"#,
            r#"{"input_tokens":01}"#,
        ];
        for case in cases {
            assert!(!plain_agrees(case.as_bytes()), "read {case:?}");
        }
    }

    fn read_event(data: &[u8]) -> Option<Option<Event>> {
        Event::read_plain(data).map(Some)
    }

    /// `(event name, data)` of every event of a captured stream.
    fn events(sse: &str) -> Vec<(&str, &str)> {
        let mut name = "";
        let mut out = Vec::new();
        for line in sse.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = n;
            } else if let Some(data) = line.strip_prefix("data: ") {
                out.push((name, data));
            }
        }
        out
    }

    #[test]
    fn captured_events_read_without_serde() {
        let streams = [
            include_str!("../../tests/fixtures/providers/anthropic/messages.stream.basic.sse"),
            include_str!("../../tests/fixtures/providers/anthropic/messages.stream.cache.sse"),
            include_str!("../../tests/fixtures/providers/anthropic/messages.stream.padded.sse"),
            include_str!(
                "../../tests/fixtures/providers/anthropic/messages.stream.midstream-error.sse"
            ),
        ];
        let mut starts_and_deltas = 0;
        for (name, data) in streams.iter().flat_map(|s| events(s)) {
            let read = crate::usage::strict_json::plain::agrees(read_event, data.as_bytes());
            if matches!(name, "message_start" | "message_delta") {
                assert!(read, "declined {data}");
                starts_and_deltas += 1;
            }
        }
        assert!(starts_and_deltas >= 7, "{starts_and_deltas}");
    }

    #[test]
    fn duplicate_fields_go_to_serde() {
        use crate::usage::strict_json::plain::declines_duplicates;
        let usage = [
            "input_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "output_tokens",
            "cache_creation",
            "output_tokens_details",
            "iterations",
        ];
        declines_duplicates(AnthUsage::read_plain, &usage);
        declines_duplicates(read_event, &["type", "message", "usage", "error"]);
        for field in usage {
            let raw = format!(r#"{{"message":{{"usage":{{"{field}":null,"{field}":null}}}}}}"#);
            assert!(Event::read_plain(raw.as_bytes()).is_none(), "{raw}");
        }
        let raw = r#"{"message":{"model":null,"model":null}}"#;
        assert!(Event::read_plain(raw.as_bytes()).is_none());
    }

    #[test]
    fn other_events_go_to_serde() {
        let cases: &[&str] = &[
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            r#"{"type":"message_start","message":{"model":"claude\u002d3","usage":{}}}"#,
            r#"{"type":"message_start","message":{"model":"m"},"message":{"model":"m"}}"#,
            r#"{"type":"message_delta","usage":{"output_tokens":"9"}}"#,
            r#"{"type":"message_delta","usage":{"output_tokens":9}"#,
            r#"{"type":7}"#,
            r#"["message_start"]"#,
        ];
        for case in cases {
            assert!(
                !crate::usage::strict_json::plain::agrees(read_event, case.as_bytes()),
                "read {case:?}"
            );
        }
    }

    mod generated {
        use super::*;
        use crate::usage::strict_json::plain::read_plain_tests;

        const EVENT_KEYS: &[&str] = &[
            "type",
            "message",
            "usage",
            "error",
            "model",
            "input_tokens",
            "output_tokens",
            "cache_creation",
            "ephemeral_1h_input_tokens",
            "content",
        ];

        read_plain_tests!(
            plain_event_read_agrees_with_serde,
            generated_events_are_often_read_plain,
            read_event,
            EVENT_KEYS,
            80
        );

        const KEYS: &[&str] = &[
            "input_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "output_tokens",
            "cache_creation",
            "ephemeral_1h_input_tokens",
            "ephemeral_5m_input_tokens",
            "output_tokens_details",
            "thinking_tokens",
            "iterations",
            "service_tier",
        ];

        read_plain_tests!(
            plain_read_agrees_with_serde,
            generated_usage_is_often_read_plain,
            AnthUsage::read_plain,
            KEYS,
            80
        );
    }

    #[test]
    fn iterations_are_summed() {
        // pydantic-ai test_anthropic_compaction_usage_with_cache_streaming.
        let mut f = Fields::default();
        f.set(&au(r#"{"input_tokens":181,"cache_read_input_tokens":0,"output_tokens":8,
            "iterations":[{"type":"compaction","input_tokens":100,"cache_read_input_tokens":55096,"output_tokens":83},
                          {"type":"message","input_tokens":181,"output_tokens":8}]}"#));
        let u = f.to_usage().unwrap();
        assert_eq!(u.input_tokens, Some(100 + 55096 + 181));
        assert_eq!(u.output_tokens, Some(91));
        assert_eq!(u.cached_input_tokens, Some(55096));
    }
}
