//! Removal of the usage-only chunk from an OpenAI-style SSE stream.
//!
//! When a client streams chat completions without
//! `stream_options.include_usage`, the proxy asks for usage upstream anyway
//! and must then hand the client exactly the stream it asked for: the extra
//! chunk (`"choices": []` with a non-null `usage`, just before
//! `data: [DONE]`) has to go, because clients that index `choices[0]` break on
//! it. Only that chunk is removed: Azure's leading content-filter chunk
//! (`choices: []`, no usage) and the usage that Groq, Mistral, DeepSeek or
//! OpenRouter put on an ordinary chunk stay (SPEC §9).
//!
//! Flow: bytes pass through as soon as the event they belong to is complete
//! (blank line). Only the current incomplete event is held back, which costs a
//! client nothing: SSE clients cannot act on an event before its blank line
//! either. Complete events are checked cheaply (`"usage"` must occur with a
//! non-null value before anything is parsed) and forwarded byte-identical,
//! zero-copy when no earlier bytes were held back. An event that grows past
//! `max_event_bytes` is flushed unchanged and the rest of it is passed through
//! without inspection, so memory stays bounded.

use super::wire::{finders, has_non_null};
use bytes::{Bytes, BytesMut};
use serde::de::IgnoredAny;
use serde::Deserialize;

/// Strips the injected usage-only chunk from an OpenAI-style SSE stream; see
/// the module documentation.
#[derive(Debug)]
pub struct UsageChunkFilter {
    max_event_bytes: usize,
    /// Bytes of the current incomplete event.
    pending: BytesMut,
    /// The current line has at least one byte.
    line_has_bytes: bool,
    /// The last byte seen was a CR ending a line: a following LF completes it.
    after_cr: bool,
    /// The current event went over the cap: forward it unchanged to its end.
    passthrough: bool,
    /// A removed event ended with CR at the end of a read: drop the LF that
    /// may complete its CRLF at the start of the next read.
    drop_lf: bool,
    scratch: Vec<u8>,
}

/// What one `push` returns: nothing, one zero-copy range of the input, or
/// copied bytes.
enum Output {
    Nothing,
    Range(usize, usize),
    Owned(BytesMut),
}

impl Output {
    fn push_range(&mut self, chunk: &Bytes, a: usize, b: usize) {
        if a >= b {
            return;
        }
        match self {
            Output::Nothing => *self = Output::Range(a, b),
            Output::Range(_, y) if *y == a => *y = b,
            Output::Range(x, y) => {
                let mut m = BytesMut::with_capacity(*y - *x + b - a);
                m.extend_from_slice(chunk.get(*x..*y).unwrap_or_default());
                m.extend_from_slice(chunk.get(a..b).unwrap_or_default());
                *self = Output::Owned(m);
            }
            Output::Owned(m) => m.extend_from_slice(chunk.get(a..b).unwrap_or_default()),
        }
    }

    fn push_owned(&mut self, chunk: &Bytes, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match self {
            Output::Nothing => *self = Output::Owned(BytesMut::from(bytes)),
            Output::Range(x, y) => {
                let mut m = BytesMut::with_capacity(*y - *x + bytes.len());
                m.extend_from_slice(chunk.get(*x..*y).unwrap_or_default());
                m.extend_from_slice(bytes);
                *self = Output::Owned(m);
            }
            Output::Owned(m) => m.extend_from_slice(bytes),
        }
    }

    fn into_bytes(self, chunk: &Bytes) -> Bytes {
        match self {
            Output::Nothing => Bytes::new(),
            Output::Range(a, b) => chunk.slice(a..b),
            Output::Owned(m) => m.freeze(),
        }
    }
}

#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    choices: Option<Vec<IgnoredAny>>,
    #[serde(default)]
    usage: Option<IgnoredAny>,
}

impl UsageChunkFilter {
    pub fn new(max_event_bytes: usize) -> Self {
        UsageChunkFilter {
            max_event_bytes: max_event_bytes.max(1),
            pending: BytesMut::new(),
            line_has_bytes: false,
            after_cr: false,
            passthrough: false,
            drop_lf: false,
            scratch: Vec::new(),
        }
    }

    /// Takes the next read of the upstream body and returns the bytes that can
    /// go to the client now.
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        let len = chunk.len();
        let mut out = Output::Nothing;
        let mut i = 0;
        let mut seg = 0;
        if self.drop_lf && !chunk.is_empty() {
            self.drop_lf = false;
            if chunk.first() == Some(&b'\n') {
                i = 1;
                seg = 1;
                self.after_cr = false;
            }
        }
        while i < len {
            let rest = chunk.get(i..).unwrap_or_default();
            let Some(off) = memchr::memchr2(b'\r', b'\n', rest) else {
                self.line_has_bytes = true;
                self.after_cr = false;
                break;
            };
            let p = i + off;
            let b = rest.get(off).copied().unwrap_or(b'\n');
            if off > 0 {
                self.line_has_bytes = true;
                self.after_cr = false;
            }
            if b == b'\n' && self.after_cr && off == 0 {
                // Second half of a CRLF. If the CR ended the previous event
                // in the last read, this LF still belongs to that event.
                self.after_cr = false;
                if seg == p && self.pending.is_empty() && !self.passthrough {
                    out.push_range(&chunk, p, p + 1);
                    seg = p + 1;
                }
                i = p + 1;
                continue;
            }
            let blank = !self.line_has_bytes;
            self.line_has_bytes = false;
            self.after_cr = b == b'\r';
            i = p + 1;
            if blank {
                let mut end = i;
                if b == b'\r' && chunk.get(end) == Some(&b'\n') {
                    end += 1;
                    self.after_cr = false;
                    i = end;
                }
                let cr_at_end = b == b'\r' && end == len;
                self.end_event(&chunk, seg, end, cr_at_end, &mut out);
                seg = end;
            }
        }
        // The tail belongs to an event that is not complete yet.
        if seg < len {
            let tail = chunk.get(seg..len).unwrap_or_default();
            if self.passthrough {
                out.push_range(&chunk, seg, len);
            } else if self.pending.len() + tail.len() > self.max_event_bytes {
                let held = std::mem::take(&mut self.pending);
                out.push_owned(&chunk, &held);
                out.push_range(&chunk, seg, len);
                self.passthrough = true;
            } else {
                self.pending.extend_from_slice(tail);
            }
        }
        out.into_bytes(&chunk)
    }

    /// End of the upstream body: whatever is held back (an unterminated last
    /// event) goes out unchanged.
    pub fn finish(&mut self) -> Bytes {
        self.passthrough = false;
        self.line_has_bytes = false;
        self.after_cr = false;
        self.drop_lf = false;
        std::mem::take(&mut self.pending).freeze()
    }

    /// An event ends at `chunk[end]`; its bytes are the held-back part plus
    /// `chunk[seg..end]`.
    fn end_event(
        &mut self,
        chunk: &Bytes,
        seg: usize,
        end: usize,
        cr_at_end: bool,
        out: &mut Output,
    ) {
        if self.passthrough {
            self.passthrough = false;
            out.push_range(chunk, seg, end);
            return;
        }
        let part = chunk.get(seg..end).unwrap_or_default();
        if self.pending.len() + part.len() > self.max_event_bytes {
            let held = std::mem::take(&mut self.pending);
            out.push_owned(chunk, &held);
            out.push_range(chunk, seg, end);
            return;
        }
        let remove = if self.pending.is_empty() {
            self.is_usage_chunk(part)
        } else {
            let mut held = std::mem::take(&mut self.pending);
            held.extend_from_slice(part);
            let remove = self.is_usage_chunk(&held);
            if !remove {
                out.push_owned(chunk, &held);
            }
            held.clear();
            self.pending = held;
            if remove && cr_at_end {
                self.drop_lf = true;
            }
            return;
        };
        if remove {
            if cr_at_end {
                self.drop_lf = true;
            }
        } else {
            out.push_range(chunk, seg, end);
        }
    }

    /// Is this complete event the usage-only chunk?
    fn is_usage_chunk(&mut self, event: &[u8]) -> bool {
        let f = finders();
        if f.usage.find(event).is_none() {
            return false;
        }
        self.scratch.clear();
        let mut first = true;
        for line in event.split(|&b| b == b'\n' || b == b'\r') {
            let Some(v) = line.strip_prefix(b"data:") else {
                continue;
            };
            if !first {
                self.scratch.push(b'\n');
            }
            first = false;
            self.scratch
                .extend_from_slice(v.strip_prefix(b" ").unwrap_or(v));
        }
        if !has_non_null(&self.scratch, &f.usage) {
            return false;
        }
        match serde_json::from_slice::<Probe>(&self.scratch) {
            Ok(p) => p.usage.is_some() && p.choices.is_some_and(|c| c.is_empty()),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn run(input: &[u8], splits: &[usize], cap: usize) -> Vec<u8> {
        let mut f = UsageChunkFilter::new(cap);
        let mut out = Vec::new();
        let mut prev = 0;
        for &s in splits.iter().chain(std::iter::once(&input.len())) {
            let s = s.clamp(prev, input.len());
            out.extend_from_slice(&f.push(Bytes::copy_from_slice(&input[prev..s])));
            prev = s;
        }
        out.extend_from_slice(&f.finish());
        out
    }

    const USAGE: &str = r#"data: {"id":"x","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;

    fn check(input: &str, expected: &str) {
        let input = input.as_bytes();
        for i in 0..=input.len() {
            for j in i..=input.len().min(i + 7) {
                assert_eq!(
                    String::from_utf8_lossy(&run(input, &[i, j], 1 << 20)),
                    expected,
                    "splits {i} {j}"
                );
            }
        }
        let every: Vec<usize> = (0..input.len()).collect();
        assert_eq!(
            String::from_utf8_lossy(&run(input, &every, 1 << 20)),
            expected
        );
    }

    #[test]
    fn removes_only_the_usage_chunk_lf() {
        let a = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
        let azure = "data: {\"choices\":[],\"prompt_filter_results\":[]}\n\n";
        let input = format!("{azure}{a}{USAGE}\n\ndata: [DONE]\n\n");
        check(&input, &format!("{azure}{a}data: [DONE]\n\n"));
    }

    #[test]
    fn removes_usage_chunk_crlf_and_cr() {
        let input =
            format!("data: {{\"choices\":[{{}}]}}\r\n\r\n{USAGE}\r\n\r\ndata: [DONE]\r\n\r\n");
        check(
            &input,
            "data: {\"choices\":[{}]}\r\n\r\ndata: [DONE]\r\n\r\n",
        );
        let input = format!("data: {{\"choices\":[{{}}]}}\r\r{USAGE}\r\rdata: [DONE]\r\r");
        check(&input, "data: {\"choices\":[{}]}\r\rdata: [DONE]\r\r");
    }

    #[test]
    fn keeps_usage_on_ordinary_chunks_and_error_chunks() {
        let input = "data: {\"choices\":[{\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":1}}\n\n\
                     data: {\"error\":{\"code\":400},\"usage\":{\"prompt_tokens\":1}}\n\ndata: [DONE]\n\n";
        check(input, input);
    }

    #[test]
    fn oversized_event_flushed_unchanged() {
        let big = format!(
            "data: {{\"choices\":[],\"usage\":{{\"pad\":\"{}\"}}}}\n\n",
            "x".repeat(200)
        );
        let input = format!("{big}{USAGE}\n\ndata: [DONE]\n\n");
        let out = run(input.as_bytes(), &[10, 50, 150], 150);
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("{big}data: [DONE]\n\n")
        );
    }

    #[test]
    fn zero_copy_when_nothing_held() {
        let mut f = UsageChunkFilter::new(1024);
        let chunk = Bytes::from_static(b"data: {\"choices\":[{}]}\n\ndata: [DONE]\n\n");
        let out = f.push(chunk.clone());
        assert_eq!(out, chunk);
        assert_eq!(out.as_ptr(), chunk.as_ptr());
    }

    #[test]
    fn unterminated_tail_is_returned_by_finish() {
        let mut f = UsageChunkFilter::new(1024);
        assert_eq!(f.push(Bytes::from_static(b"data: [DONE]")), Bytes::new());
        assert_eq!(f.finish(), Bytes::from_static(b"data: [DONE]"));
    }
}
