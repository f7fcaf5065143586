//! Small wire-level helpers shared by the dialect extractors.
//!
//! Flow: an extractor first asks the cheap questions here (does this event
//! mention a non-null `"usage"`? where is the value of `"usageMetadata"`? how
//! many bytes of generated text does it carry?) using precompiled `memmem`
//! finders, and only then deserializes the few bytes that matter into the
//! typed structs of its dialect. Token counts go through [`Count`], which never
//! fails on an odd shape: a count that is not a non-negative integer is simply
//! "not reported".

use memchr::memmem::Finder;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::sync::OnceLock;

/// A token count as reported on the wire. `Count(None)` means absent, null or
/// not interpretable as a count; absent is never turned into zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Count(pub(crate) Option<u64>);

impl Count {
    pub(crate) fn get(self) -> Option<u64> {
        self.0
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CountVisitor)
    }
}

struct CountVisitor;

impl<'de> Visitor<'de> for CountVisitor {
    type Value = Count;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a token count")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
        Ok(Count(Some(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
        Ok(Count(u64::try_from(v).ok()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count, E> {
        // Some OpenAI-compatible servers serialise counts as `12.0`.
        if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 9.0e15 {
            Ok(Count(Some(v as u64)))
        } else {
            Ok(Count(None))
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Count, E> {
        Ok(Count(v.trim().parse::<u64>().ok()))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Count, E> {
        Ok(Count(None))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Count, E> {
        Ok(Count(None))
    }

    fn visit_none<E: de::Error>(self) -> Result<Count, E> {
        Ok(Count(None))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Count, D::Error> {
        d.deserialize_any(CountVisitor)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Count(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Count(None))
    }
}

/// `a + b` over optional counts: `None` only when both are absent.
pub(crate) fn add_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
    }
}

/// Longest provider error label kept; labels end up in logs and ledgers.
const MAX_LABEL: usize = 64;

/// The type/code of an in-band error value, or `None` when the value does not
/// denote an error (`null`, `false`, empty object from a lenient server).
///
/// Preference: `type` (OpenAI, Anthropic) → `status` (Google) → `code`
/// (string or integer: vLLM, OpenRouter) → the generic `"error"`.
pub(crate) fn error_label(v: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match v {
        Value::Null | Value::Bool(false) => None,
        Value::Object(map) if map.is_empty() => None,
        Value::Object(map) => {
            let label = ["type", "status", "code"]
                .iter()
                .filter_map(|k| map.get(*k))
                .find_map(|v| match v {
                    Value::String(s) if !s.is_empty() => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .unwrap_or_else(|| "error".to_owned());
            Some(truncate_label(label))
        }
        // A bare string (`{"error":"model not found"}`, Ollama) carries a
        // message, not a type; keep the label stable.
        _ => Some("error".to_owned()),
    }
}

fn truncate_label(mut s: String) -> String {
    if s.len() > MAX_LABEL {
        let mut cut = MAX_LABEL;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Precompiled substring searchers used by the event pre-filters. Built once
/// per process: building a `Finder` costs more than searching a short event.
pub(crate) struct Finders {
    pub(crate) usage: Finder<'static>,
    pub(crate) error: Finder<'static>,
    pub(crate) usage_metadata: Finder<'static>,
    pub(crate) model_version: Finder<'static>,
    pub(crate) finish_reason: Finder<'static>,
    pub(crate) block_reason: Finder<'static>,
    pub(crate) response_terminal: [Finder<'static>; 3],
    pub(crate) text_keys_openai: [Finder<'static>; 6],
    pub(crate) text_keys_anthropic: [Finder<'static>; 3],
    pub(crate) text_key_text: Finder<'static>,
    pub(crate) delta_key: Finder<'static>,
}

pub(crate) fn finders() -> &'static Finders {
    static F: OnceLock<Finders> = OnceLock::new();
    F.get_or_init(|| Finders {
        usage: Finder::new(b"\"usage\""),
        error: Finder::new(b"\"error\""),
        usage_metadata: Finder::new(b"\"usageMetadata\""),
        model_version: Finder::new(b"\"modelVersion\""),
        finish_reason: Finder::new(b"\"finishReason\""),
        block_reason: Finder::new(b"\"blockReason\""),
        response_terminal: [
            Finder::new(b"\"response.completed\""),
            Finder::new(b"\"response.incomplete\""),
            Finder::new(b"\"response.failed\""),
        ],
        text_keys_openai: [
            Finder::new(b"\"content\""),
            Finder::new(b"\"text\""),
            Finder::new(b"\"reasoning\""),
            Finder::new(b"\"reasoning_content\""),
            Finder::new(b"\"arguments\""),
            Finder::new(b"\"refusal\""),
        ],
        text_keys_anthropic: [
            Finder::new(b"\"text\""),
            Finder::new(b"\"thinking\""),
            Finder::new(b"\"partial_json\""),
        ],
        text_key_text: Finder::new(b"\"text\""),
        delta_key: Finder::new(b"\"delta\""),
    })
}

fn skip_ws(buf: &[u8], mut i: usize) -> usize {
    while let Some(b) = buf.get(i) {
        if !matches!(b, b' ' | b'\t' | b'\r' | b'\n') {
            break;
        }
        i += 1;
    }
    i
}

/// Position right after `"key"` + optional whitespace + `:` + whitespace, if
/// the occurrence ending at `after_key` is followed by a colon (i.e. it is a
/// key, not a string value that happens to read the same).
fn value_start(buf: &[u8], after_key: usize) -> Option<usize> {
    let i = skip_ws(buf, after_key);
    if buf.get(i) != Some(&b':') {
        return None;
    }
    Some(skip_ws(buf, i + 1))
}

/// Does `buf` contain `"key": <something other than null>`? Used to skip the
/// `"usage":null` / `"error":null` that OpenAI-style chunks repeat.
pub(crate) fn has_non_null(buf: &[u8], key: &Finder<'_>) -> bool {
    let klen = key.needle().len();
    key.find_iter(buf)
        .any(|at| match value_start(buf, at + klen) {
            Some(v) => !buf.get(v..).is_some_and(|r| r.starts_with(b"null")),
            None => false,
        })
}

/// The raw bytes of the first value of `"key"` in `buf` (object, array,
/// string or scalar), found without parsing the rest of the document. Only
/// used for keys that occur at one place in a provider's schema (Gemini's
/// top-level `usageMetadata` / `modelVersion`).
pub(crate) fn value_of<'b>(buf: &'b [u8], key: &Finder<'_>) -> Option<&'b [u8]> {
    let klen = key.needle().len();
    key.find_iter(buf).find_map(|at| {
        let start = value_start(buf, at + klen)?;
        let end = value_end(buf, start)?;
        buf.get(start..end)
    })
}

/// End (exclusive) of the JSON value starting at `start`, by bracket and
/// string matching; `None` if it does not end inside `buf`.
fn value_end(buf: &[u8], start: usize) -> Option<usize> {
    let first = *buf.get(start)?;
    match first {
        b'"' => string_end(buf, start + 1).map(|e| e + 1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            while let Some(&b) = buf.get(i) {
                match b {
                    b'"' => {
                        i = string_end(buf, i + 1)?;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.saturating_sub(1);
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let len = buf
                .get(start..)?
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n'))
                .unwrap_or(buf.len() - start);
            Some(start + len)
        }
    }
}

/// Index of the closing quote of a JSON string whose content starts at `i`.
fn string_end(buf: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let rest = buf.get(i..)?;
        let p = memchr::memchr2(b'"', b'\\', rest)?;
        match rest.get(p) {
            Some(b'"') => return Some(i + p),
            _ => i += p + 2,
        }
    }
}

/// Bytes of the string values of `"key"` in `buf` (raw, escapes included).
/// This is the cheap text measure behind `output_text_bytes`: it counts
/// escape sequences as written (`\n` is two bytes, `\u00e9` six), which
/// overestimates non-ASCII and code text a little; non-string values
/// (`"content":null`, `"delta":{...}`) count nothing.
pub(crate) fn string_value_bytes(buf: &[u8], key: &Finder<'_>) -> u64 {
    let klen = key.needle().len();
    let mut total = 0u64;
    for at in key.find_iter(buf) {
        let Some(v) = value_start(buf, at + klen) else {
            continue;
        };
        if buf.get(v) != Some(&b'"') {
            continue;
        }
        if let Some(end) = string_end(buf, v + 1) {
            total = total.saturating_add((end - v - 1) as u64);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_is_lenient() {
        let c: Count = serde_json::from_str("12").unwrap_or_default();
        assert_eq!(c.get(), Some(12));
        let c: Count = serde_json::from_str("12.0").unwrap_or_default();
        assert_eq!(c.get(), Some(12));
        let c: Count = serde_json::from_str("null").unwrap_or_default();
        assert_eq!(c.get(), None);
        let c: Count = serde_json::from_str("-3").unwrap_or_default();
        assert_eq!(c.get(), None);
        let c: Count = serde_json::from_str("{\"a\":[1,2]}").unwrap_or_default();
        assert_eq!(c.get(), None);
        let c: Count = serde_json::from_str("1.5").unwrap_or_default();
        assert_eq!(c.get(), None);
    }

    #[test]
    fn non_null_detection() {
        let f = finders();
        assert!(!has_non_null(br#"{"usage":null}"#, &f.usage));
        assert!(!has_non_null(br#"{"usage" : null}"#, &f.usage));
        assert!(has_non_null(br#"{"usage":{"a":1}}"#, &f.usage));
        assert!(!has_non_null(br#"{"x":"\"usage\""}"#, &f.usage));
    }

    #[test]
    fn value_extraction() {
        let f = finders();
        let doc = br#"{"a":"}","usageMetadata": {"p": [1,{"q":"]}"}]}, "modelVersion": "g-2"}"#;
        assert_eq!(
            value_of(doc, &f.usage_metadata),
            Some(&br#"{"p": [1,{"q":"]}"}]}"#[..])
        );
        assert_eq!(value_of(doc, &f.model_version), Some(&br#""g-2""#[..]));
        assert_eq!(
            value_of(br#"{"usageMetadata": {"p":1"#, &f.usage_metadata),
            None
        );
    }

    #[test]
    fn text_bytes() {
        let f = finders();
        let doc = br#"{"text": "ab\"c", "x": {"text":"de"}, "text":null}"#;
        assert_eq!(string_value_bytes(doc, &f.text_key_text), 5 + 2);
    }

    #[test]
    fn labels() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"code":429,"message":"m","status":"RESOURCE_EXHAUSTED"}"#)
                .unwrap_or_default();
        assert_eq!(error_label(&v).as_deref(), Some("RESOURCE_EXHAUSTED"));
        let v: serde_json::Value = serde_json::from_str(r#"{"code":429}"#).unwrap_or_default();
        assert_eq!(error_label(&v).as_deref(), Some("429"));
        assert_eq!(error_label(&serde_json::Value::Null), None);
    }
}
