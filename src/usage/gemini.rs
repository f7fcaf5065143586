//! Gemini / Vertex `generateContent` and `streamGenerateContent`.
//!
//! Flow per SSE event (`data: {...}\r\n\r\n`, no names, no terminator): every
//! chunk repeats the running `usageMetadata`, so the last one wins. Gemini
//! chunks are mostly text, so instead of deserializing each chunk we walk its
//! members once (`wire::for_each_member`), skipping over text, keep the raw
//! bytes of the latest `usageMetadata` and decode only that one at the end.
//! A chunk with a non-null `error` is parsed in full.
//!
//! Terminal: Gemini streams simply end. Since the tap's `finish` also runs
//! when a client aborts, an end of stream counts as Completed only if it came
//! between events and a candidate reported `finishReason` (or the prompt was
//! blocked: `blockReason`), which the last chunk always carries.
//!
//! Mid-stream failures arrive as a raw, un-prefixed (often multi-line) JSON
//! error object after the events; SSE decoders ignore such lines, so the SSE
//! layer hands them to [`stray_line`], which re-assembles the object (bounded
//! by the event size cap) and reads its `error`.
//!
//! Normalisation: input = `promptTokenCount + toolUsePromptTokenCount`,
//! output = `candidatesTokenCount + thoughtsTokenCount`, cached =
//! `cachedContentTokenCount`, reasoning = `thoughtsTokenCount`.

use super::extract::{trim, Extractor};
use super::openai;
use super::strict_json::{Seen, Walk};
use super::wire::{
    add_opt, error_label, finders, for_each_member, non_null_at, plain_count, string_at, value_end,
    Count,
};
use super::Usage;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct GemUsage {
    prompt_token_count: Count,
    candidates_token_count: Count,
    thoughts_token_count: Count,
    tool_use_prompt_token_count: Count,
    cached_content_token_count: Count,
}

impl GemUsage {
    /// serde_json's reading of a `usageMetadata` value (`null` or an object)
    /// when its counts are plain integers or `null`, as they nearly always
    /// are; `None` leaves the value to serde_json (other shapes, duplicate
    /// members, invalid JSON). The per-modality details are skipped.
    pub(crate) fn read_plain(raw: &[u8]) -> Option<Option<GemUsage>> {
        Walk::document(raw, |w| w.nullable(GemUsage::walk))
    }

    fn walk(w: &mut Walk) -> Option<GemUsage> {
        let mut u = GemUsage::default();
        let mut seen = Seen::default();
        w.object(|w, key| {
            let (bit, count) = match key {
                b"promptTokenCount" => (0, &mut u.prompt_token_count),
                b"candidatesTokenCount" => (1, &mut u.candidates_token_count),
                b"thoughtsTokenCount" => (2, &mut u.thoughts_token_count),
                b"toolUsePromptTokenCount" => (3, &mut u.tool_use_prompt_token_count),
                b"cachedContentTokenCount" => (4, &mut u.cached_content_token_count),
                _ => return w.value(),
            };
            *count = seen.field(bit, w, plain_count)?;
            Some(())
        })?;
        Some(u)
    }

    pub(crate) fn to_usage(&self) -> Option<Usage> {
        let input = add_opt(
            self.prompt_token_count.get(),
            self.tool_use_prompt_token_count.get(),
        );
        let output = add_opt(
            self.candidates_token_count.get(),
            self.thoughts_token_count.get(),
        );
        if input.is_none() && output.is_none() {
            return None;
        }
        Some(Usage {
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: self.cached_content_token_count.get(),
            cache_write_input_tokens: None,
            cache_write_1h_input_tokens: None,
            reasoning_tokens: self.thoughts_token_count.get(),
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ErrorEnvelope {
    error: Option<Value>,
}

pub(crate) fn sse_event(ex: &mut Extractor, name: &[u8], data: &[u8], at_eof: bool) {
    let body = trim(data);
    // Gemini's OpenAI-compatible endpoint speaks OpenAI's stream format.
    if body.starts_with(b"[DONE]") {
        ex.terminal = true;
        return;
    }
    let want_model = ex.model.is_none();
    let mut text = 0u64;
    let mut meta = None;
    let mut model = None;
    let mut finished = false;
    let mut error = false;
    let mut usage = false;
    for_each_member(body, |k, v| {
        match k {
            b"text" => {
                let (n, next) = string_at(body, v)?;
                text = text.saturating_add(n);
                return Some(next);
            }
            b"usageMetadata" => {
                let end = value_end(body, v)?;
                meta = Some((v, end));
                return Some(end);
            }
            b"modelVersion" => {
                let end = value_end(body, v)?;
                if want_model {
                    model = Some((v, end));
                }
                return Some(end);
            }
            b"finishReason" | b"blockReason" => finished = true,
            b"error" => error |= non_null_at(body, v),
            b"usage" => usage |= non_null_at(body, v),
            _ => {}
        }
        None
    });
    if meta.is_none() && usage {
        openai::sse_event(ex, name, data, at_eof);
        return;
    }
    ex.add_text(text);
    if finished {
        ex.gemini_finished = true;
    }
    if let Some(raw) = meta.and_then(|(a, b)| body.get(a..b)) {
        // Running totals: only the last one matters, so it is kept raw and
        // decoded once at the end (`Extractor::settle`).
        ex.keep_gemini_usage(raw);
    }
    if let Some(raw) = model.and_then(|(a, b)| body.get(a..b)) {
        if let Some(m) = ex.parse::<Option<String>>(raw, at_eof) {
            ex.set_model(m.as_deref());
        }
    }
    if name == b"error" || error {
        read_error(ex, body, at_eof);
    }
}

/// A whole payload that carries (or may carry) `{"error": ...}`, alone or as
/// the element of an array.
fn read_error(ex: &mut Extractor, body: &[u8], at_eof: bool) {
    let label = match body.first() {
        Some(b'[') => ex
            .parse::<Vec<ErrorEnvelope>>(body, at_eof)
            .and_then(|v| v.into_iter().find_map(|e| e.error)),
        _ => ex
            .parse::<ErrorEnvelope>(body, at_eof)
            .and_then(|e| e.error),
    }
    .as_ref()
    .and_then(error_label);
    if let Some(label) = label {
        ex.fail(Some(label));
    }
}

/// Reassembly buffer for a raw JSON object written between SSE events.
#[derive(Debug)]
pub(crate) struct Stray {
    max: usize,
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escape: bool,
    over: bool,
}

impl Stray {
    pub(crate) fn new(max: usize) -> Self {
        Stray {
            max,
            buf: Vec::new(),
            depth: 0,
            in_string: false,
            escape: false,
            over: false,
        }
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
        self.over = false;
    }

    /// Tracks bracket depth over one more line; true when the object closed.
    fn scan(&mut self, line: &[u8]) -> bool {
        let mut closed = false;
        for &b in line {
            if self.in_string {
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        closed = true;
                    }
                }
                _ => {}
            }
        }
        closed
    }
}

/// A non-SSE line in an event stream (see the module comment).
pub(crate) fn stray_line(ex: &mut Extractor, line: &[u8]) {
    let st = &mut ex.stray;
    if st.buf.is_empty() && st.depth == 0 {
        match trim(line).first() {
            Some(b'{') | Some(b'[') => {}
            _ => return, // not the start of a JSON object: plain noise
        }
    }
    if st.over || st.buf.len() + line.len() + 1 > st.max {
        st.over = true;
        st.buf.clear();
    } else {
        st.buf.extend_from_slice(line);
        st.buf.push(b'\n');
    }
    if !st.scan(line) {
        return;
    }
    let over = st.over;
    let buf = std::mem::take(&mut st.buf);
    st.reset();
    if over {
        // An error object too large to keep: still an error.
        ex.fail(None);
        ex.parse_error = true;
        return;
    }
    let body = trim(&buf);
    if finders().error.find(body).is_some() {
        read_error(ex, body, false);
        if !ex.failed {
            ex.fail(None);
        }
    }
}

/// End of stream with a stray object still open: it was an error being
/// written when the connection closed.
pub(crate) fn finish_stray(ex: &mut Extractor) {
    let open = !ex.stray.buf.is_empty() || ex.stray.over;
    let mentions_error = finders().error.find(&ex.stray.buf).is_some();
    ex.stray.reset();
    if open && mentions_error {
        ex.fail(None);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn plain_agrees(raw: &[u8]) -> bool {
        crate::usage::strict_json::plain::agrees(GemUsage::read_plain, raw)
    }

    #[test]
    fn plain_usage_read_without_serde() {
        let fixture = include_str!("../../tests/fixtures/providers/gemini/generateContent.json");
        let start = fixture.find("\"usageMetadata\": ").unwrap() + 17;
        let end = fixture.find(",\n  \"modelVersion\"").unwrap();
        let usage = &fixture[start..end];
        let cases: &[&str] = &[
            "null",
            "{}",
            usage,
            r#"{"promptTokenCount":15,"candidatesTokenCount":102,"toolUsePromptTokenCount":424,
                "thoughtsTokenCount":142,"totalTokenCount":683,"cachedContentTokenCount":5,
                "cacheTokensDetails":[{"modality":"TEXT","tokenCount":5}],"trafficType":"ON_DEMAND"}"#,
            r#"{"promptTokenCount":null,"candidatesTokenCount":9999999999999999999}"#,
        ];
        for case in cases {
            assert!(plain_agrees(case.as_bytes()), "declined {case:?}");
        }
        let read = GemUsage::read_plain(usage.as_bytes()).unwrap().unwrap();
        assert_eq!(read.candidates_token_count.get(), Some(22));
    }

    #[test]
    fn duplicate_fields_go_to_serde() {
        crate::usage::strict_json::plain::declines_duplicates(
            GemUsage::read_plain,
            &[
                "promptTokenCount",
                "candidatesTokenCount",
                "thoughtsTokenCount",
                "toolUsePromptTokenCount",
                "cachedContentTokenCount",
            ],
        );
    }

    #[test]
    fn other_usage_shapes_go_to_serde() {
        let cases: &[&str] = &[
            r#"{"promptTokenCount":12.0}"#,
            r#"{"candidatesTokenCount":"12"}"#,
            r#"{"thoughtsTokenCount":-1}"#,
            r#"{"promptTokenCount":1,"promptTokenCount":2}"#,
            r#"{"cachedContentTokenCount":1,"cachedContentTokenCount":null}"#,
            r#"{"prompt\u0054okenCount":1}"#,
            "[]",
            r#"{"promptTokenCount":1,}"#,
        ];
        for case in cases {
            assert!(!plain_agrees(case.as_bytes()), "read {case:?}");
        }
    }

    mod generated {
        use super::*;
        use crate::usage::strict_json::plain::read_plain_tests;

        const KEYS: &[&str] = &[
            "promptTokenCount",
            "candidatesTokenCount",
            "thoughtsTokenCount",
            "toolUsePromptTokenCount",
            "cachedContentTokenCount",
            "totalTokenCount",
            "promptTokensDetails",
            "modality",
        ];

        read_plain_tests!(
            plain_read_agrees_with_serde,
            generated_usage_is_often_read_plain,
            GemUsage::read_plain,
            KEYS,
            80
        );
    }

    #[test]
    fn usage_mapping() {
        let u: GemUsage = serde_json::from_str(
            r#"{"promptTokenCount":15,"candidatesTokenCount":102,"toolUsePromptTokenCount":424,
                "thoughtsTokenCount":142,"totalTokenCount":683,"cachedContentTokenCount":5}"#,
        )
        .unwrap();
        let u = u.to_usage().unwrap();
        assert_eq!(u.input_tokens, Some(439));
        assert_eq!(u.output_tokens, Some(244));
        assert_eq!(u.reasoning_tokens, Some(142));
        assert_eq!(u.cached_input_tokens, Some(5));
        // Early chunk: candidates absent.
        let u: GemUsage =
            serde_json::from_str(r#"{"promptTokenCount":7,"totalTokenCount":7}"#).unwrap();
        assert_eq!(u.to_usage().unwrap().output_tokens, None);
    }
}
