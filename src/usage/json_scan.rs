//! Incremental, push-style scanner that pulls a few top-level members out of
//! a JSON body without buffering it.
//!
//! Why hand-written: serde_json (and simd-json, json-event-parser…) want the
//! whole document or a blocking `Read`; none offers "here are the next 16 KiB,
//! tell me when the value of top-level key `usage` is complete" without holding
//! the body. Embeddings responses run to tens of MB, and Gemini's
//! `streamGenerateContent` without `alt=sse` is a JSON array that arrives over
//! minutes, so the tap must work on arbitrary reads in O(1) memory.
//!
//! Flow: `feed` walks the bytes once, tracking nesting depth, whether it is
//! inside a string (and after a backslash), and which containers are objects.
//! At the *member depth* (1 for a top-level object; 2 for the objects inside a
//! top-level array, one per streamed Gemini response) it reads each key; the
//! value of a key of interest ([`Key`]) is copied, up to `max_value_bytes`,
//! and handed to the [`JsonSink`] when it ends, where the dialect extractor
//! deserializes it into a small typed struct. Values of "text-bearing" keys
//! (`choices`, `candidates`, `content`, `message`, `output`, `response`) are
//! not copied; the byte length of the string values inside them is reported
//! as generated text. Everything else is skipped: strings with `memchr`,
//! deep structure (embedding vectors) with a byte-class table.
//!
//! Several top-level values in a row (whitespace separated) are accepted; in
//! `lines` mode (NDJSON) a newline outside a string also ends a record, and a
//! record broken at a newline is reported as malformed and scanning resumes
//! with the next line.
//!
//! The scanner is deliberately lenient: it validates structure (brackets,
//! strings) but not literals or numbers; the captured values are validated by
//! serde when they are decoded.

use memchr::{memchr2, memchr3};

/// Top-level members whose values are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Key {
    Usage,
    Model,
    ModelVersion,
    UsageMetadata,
    Error,
    Type,
    Done,
    PromptEvalCount,
    EvalCount,
}

/// What a member key means to the scanner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Capture(Key),
    Text,
    Other,
}

fn classify(key: &[u8]) -> KeyKind {
    match key {
        b"usage" => KeyKind::Capture(Key::Usage),
        b"model" => KeyKind::Capture(Key::Model),
        b"modelVersion" => KeyKind::Capture(Key::ModelVersion),
        b"usageMetadata" => KeyKind::Capture(Key::UsageMetadata),
        b"error" => KeyKind::Capture(Key::Error),
        b"type" => KeyKind::Capture(Key::Type),
        b"done" => KeyKind::Capture(Key::Done),
        b"prompt_eval_count" => KeyKind::Capture(Key::PromptEvalCount),
        b"eval_count" => KeyKind::Capture(Key::EvalCount),
        b"choices" | b"candidates" | b"content" | b"message" | b"output" | b"response"
        | b"thinking" => KeyKind::Text,
        _ => KeyKind::Other,
    }
}

/// Keys, inside a text-bearing member, whose string values are generated
/// text (as opposed to roles, types, finish reasons, ids).
fn is_text_leaf(key: &[u8]) -> bool {
    matches!(
        key,
        b"content"
            | b"text"
            | b"thinking"
            | b"reasoning"
            | b"reasoning_content"
            | b"arguments"
            | b"refusal"
    )
}

/// Longest key read; longer keys are none of ours.
const MAX_KEY: usize = 32;

/// Receiver of scanner results.
pub(crate) trait JsonSink {
    /// The complete raw value of a captured member.
    fn value(&mut self, key: Key, raw: &[u8]);
    /// A top-level value (the body, or one NDJSON record) ended.
    fn value_end(&mut self);
    /// Bytes of string values inside a text-bearing member.
    fn text_bytes(&mut self, n: u64);
    /// Something is structurally wrong (stray bracket, broken record,
    /// captured value over the cap).
    fn malformed(&mut self);
    /// Whether a captured key is still of interest (a model already known
    /// need not be copied out of every NDJSON record again).
    fn wants(&self, _key: Key) -> bool {
        true
    }
}

/// Bytes that matter when skipping deep, uninteresting structure.
static DEEP_STOP: [bool; 256] = {
    let mut t = [false; 256];
    t[b'"' as usize] = true;
    t[b'{' as usize] = true;
    t[b'}' as usize] = true;
    t[b'[' as usize] = true;
    t[b']' as usize] = true;
    t[b'\n' as usize] = true;
    t
};

/// Bytes that end or escape a string.
static STRING_STOP: [bool; 256] = {
    let mut t = [false; 256];
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// In NDJSON, a raw newline inside a string too (the record is broken).
static STRING_STOP_LINES: [bool; 256] = {
    let mut t = STRING_STOP;
    t[b'\n' as usize] = true;
    t
};

/// Bytes that matter inside a container when no scalar is being captured.
static MEMBER_STOP: [bool; 256] = {
    let mut t = DEEP_STOP;
    t[b',' as usize] = true;
    t[b':' as usize] = true;
    t
};

#[derive(Debug)]
pub(crate) struct JsonScanner {
    lines: bool,
    max_value_bytes: usize,
    depth: usize,
    /// Depth at which member keys are read: 1 for a top-level object, 2 when
    /// the top-level value is an array of objects.
    member_depth: usize,
    /// Bit `d` set: the container at depth `d + 1` is an object. Containers
    /// nested deeper than 128 are treated as arrays (keys unknown there).
    objects: u128,
    expect_key: bool,
    in_string: bool,
    escape: bool,
    /// The current string is a member key being read.
    reading_key: bool,
    key: Vec<u8>,
    key_too_long: bool,
    /// A member key has been read; its value has not started yet.
    pending: Option<KeyKind>,
    /// A captured value is in progress.
    capture: Option<Key>,
    captured: Vec<u8>,
    capture_over: bool,
    /// The captured value is a scalar (number/literal) that ends at the next
    /// delimiter.
    capture_scalar: bool,
    /// Inside the value of a text-bearing member.
    text: bool,
    /// The current string is a value (not a key) inside a text member.
    text_string: bool,
    /// Current string is a key (at any depth), for text accounting.
    string_is_key: bool,
    /// Inside a text member: the last key read names generated text.
    text_key: bool,
}

impl JsonScanner {
    pub(crate) fn new(lines: bool, max_value_bytes: usize) -> Self {
        JsonScanner {
            lines,
            max_value_bytes: max_value_bytes.max(16),
            depth: 0,
            member_depth: 1,
            objects: 0,
            expect_key: false,
            in_string: false,
            escape: false,
            reading_key: false,
            key: Vec::with_capacity(MAX_KEY),
            key_too_long: false,
            pending: None,
            capture: None,
            captured: Vec::new(),
            capture_over: false,
            capture_scalar: false,
            text: false,
            text_string: false,
            string_is_key: false,
            text_key: false,
        }
    }

    /// Bytes held in the scanner's own buffers (for memory-bound tests).
    #[cfg(test)]
    pub(crate) fn buffered_capacity(&self) -> usize {
        self.key.capacity() + self.captured.capacity()
    }

    /// True when the scanner sits between top-level values (a clean end).
    pub(crate) fn at_rest(&self) -> bool {
        self.depth == 0 && !self.in_string
    }

    fn in_object(&self) -> bool {
        match self.depth {
            0 => false,
            d if d <= 128 => self.objects & (1u128 << (d - 1)) != 0,
            _ => false,
        }
    }

    pub(crate) fn feed<S: JsonSink>(&mut self, buf: &[u8], sink: &mut S) {
        let mut i = 0;
        // Start of the part of `buf` that belongs to the current capture.
        let mut cap_from: Option<usize> = self.capture.map(|_| 0);
        while i < buf.len() {
            if self.in_string {
                if self.escape {
                    self.escape = false;
                    self.string_piece(buf.get(i..i + 1).unwrap_or_default(), sink);
                    i += 1;
                    continue;
                }
                let rest = buf.get(i..).unwrap_or_default();
                let found = self.string_stop(rest);
                let Some(p) = found else {
                    self.string_piece(rest, sink);
                    break;
                };
                self.string_piece(rest.get(..p).unwrap_or_default(), sink);
                let b = rest.get(p).copied().unwrap_or(b'"');
                i += p + 1;
                match b {
                    b'\\' => {
                        self.string_piece(b"\\", sink);
                        self.escape = true;
                    }
                    b'"' => {
                        self.in_string = false;
                        self.end_string(buf, i, &mut cap_from, sink);
                    }
                    _ => {
                        // Raw newline inside a string: the NDJSON record is
                        // broken.
                        self.broken_record(sink);
                        cap_from = None;
                    }
                }
                continue;
            }

            // Skip bytes that cannot change anything: deep inside a value
            // nobody wants, everything but brackets and quotes; elsewhere
            // inside a container, uncaptured numbers and literals too.
            if self.depth > 0 && !self.capture_scalar && self.pending.is_none() {
                let table = if self.depth > self.member_depth && !self.text {
                    &DEEP_STOP
                } else {
                    &MEMBER_STOP
                };
                let rest = buf.get(i..).unwrap_or_default();
                let skip = rest
                    .iter()
                    .position(|&b| table[b as usize])
                    .unwrap_or(rest.len());
                i += skip;
                if i >= buf.len() {
                    break;
                }
            }

            let Some(&b) = buf.get(i) else { break };
            match b {
                b' ' | b'\t' | b'\r' => {
                    self.end_scalar(buf, i, &mut cap_from, sink);
                }
                b'\n' => {
                    if self.lines && self.depth > 0 {
                        self.broken_record(sink);
                        cap_from = None;
                    } else {
                        self.end_scalar(buf, i, &mut cap_from, sink);
                    }
                }
                b'"' => {
                    self.start_value(i, &mut cap_from, sink);
                    self.in_string = true;
                    self.string_is_key = self.expect_key && self.in_object();
                    self.reading_key =
                        self.string_is_key && (self.depth == self.member_depth || self.text);
                    // A text member's own string value (`"response": "..."`),
                    // or a string under a text leaf key inside it.
                    self.text_string = self.text
                        && !self.string_is_key
                        && (self.depth == self.member_depth || self.text_key);
                    if self.reading_key {
                        self.key.clear();
                        self.key_too_long = false;
                    }
                }
                b'{' | b'[' => {
                    self.start_value(i, &mut cap_from, sink);
                    if self.depth == 0 {
                        self.member_depth = if b == b'[' { 2 } else { 1 };
                    }
                    self.depth += 1;
                    if self.depth <= 128 {
                        let bit = 1u128 << (self.depth - 1);
                        if b == b'{' {
                            self.objects |= bit;
                        } else {
                            self.objects &= !bit;
                        }
                    }
                    self.expect_key = b == b'{';
                }
                b'}' | b']' => {
                    self.end_scalar(buf, i, &mut cap_from, sink);
                    if self.depth == 0 {
                        sink.malformed();
                    } else {
                        if self.depth <= 128 && self.in_object() != (b == b'}') {
                            sink.malformed();
                        }
                        self.depth -= 1;
                        self.expect_key = false;
                        if self.depth == self.member_depth {
                            // A container value of a member ended.
                            self.finish_member(buf, i + 1, &mut cap_from, sink);
                        }
                        if self.depth < self.member_depth {
                            self.pending = None;
                        }
                        if self.depth == 0 {
                            sink.value_end();
                        }
                    }
                }
                b',' => {
                    self.end_scalar(buf, i, &mut cap_from, sink);
                    self.expect_key = self.in_object();
                }
                b':' => {
                    self.expect_key = false;
                }
                _ => {
                    if self.depth == 0 {
                        if !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.')) {
                            sink.malformed();
                        }
                    } else if self.depth == self.member_depth && self.pending.is_some() {
                        // A scalar member value starts.
                        self.start_value(i, &mut cap_from, sink);
                        if self.capture.is_some() {
                            self.capture_scalar = true;
                        }
                    }
                }
            }
            i += 1;
        }
        // Keep the part of an unfinished capture that lies in this read.
        if let (Some(from), Some(_)) = (cap_from, self.capture) {
            let piece = buf.get(from..).unwrap_or_default();
            self.append_capture(piece, sink);
        }
    }

    /// Bytes inside a string (between quotes, escapes as written).
    fn string_piece<S: JsonSink>(&mut self, piece: &[u8], sink: &mut S) {
        if piece.is_empty() {
            return;
        }
        if self.reading_key {
            if self.key.len() + piece.len() <= MAX_KEY {
                self.key.extend_from_slice(piece);
            } else {
                self.key_too_long = true;
            }
        } else if self.text_string {
            sink.text_bytes(piece.len() as u64);
        }
    }

    /// The string that just closed (its quote was at `i - 1`).
    fn end_string<S: JsonSink>(
        &mut self,
        buf: &[u8],
        i: usize,
        cap_from: &mut Option<usize>,
        sink: &mut S,
    ) {
        if self.reading_key {
            self.reading_key = false;
            if self.depth == self.member_depth {
                self.pending = Some(if self.key_too_long {
                    KeyKind::Other
                } else {
                    classify(&self.key)
                });
            } else {
                self.text_key = !self.key_too_long && is_text_leaf(&self.key);
            }
            return;
        }
        self.text_string = false;
        if self.depth == self.member_depth && !self.string_is_key {
            // A string member value ended.
            self.finish_member(buf, i, cap_from, sink);
        }
    }

    /// A value begins at `buf[i]`: if it is the value of a member just read,
    /// start capturing or text accounting.
    fn start_value<S: JsonSink>(&mut self, i: usize, cap_from: &mut Option<usize>, sink: &S) {
        if self.depth != self.member_depth {
            return;
        }
        match self.pending.take() {
            Some(KeyKind::Capture(k)) if sink.wants(k) => {
                self.capture = Some(k);
                self.captured.clear();
                self.capture_over = false;
                self.capture_scalar = false;
                *cap_from = Some(i);
            }
            Some(KeyKind::Text) => {
                self.text = true;
                self.text_key = false;
            }
            Some(KeyKind::Capture(_)) | Some(KeyKind::Other) | None => {}
        }
    }

    /// Next byte that ends or escapes a string (or a raw newline in NDJSON).
    /// Most strings in provider JSON are short keys and ids, for which a
    /// plain loop beats setting up a vectorised search.
    fn string_stop(&self, rest: &[u8]) -> Option<usize> {
        let table = if self.lines {
            &STRING_STOP_LINES
        } else {
            &STRING_STOP
        };
        let head = rest.get(..rest.len().min(24)).unwrap_or_default();
        if let Some(p) = head.iter().position(|&b| table[b as usize]) {
            return Some(p);
        }
        let tail = rest.get(head.len()..)?;
        let p = if self.lines {
            memchr3(b'"', b'\\', b'\n', tail)
        } else {
            memchr2(b'"', b'\\', tail)
        }?;
        Some(head.len() + p)
    }

    /// A scalar member value ends before `buf[i]` (delimiter or whitespace).
    fn end_scalar<S: JsonSink>(
        &mut self,
        buf: &[u8],
        i: usize,
        cap_from: &mut Option<usize>,
        sink: &mut S,
    ) {
        if self.capture_scalar && self.depth == self.member_depth {
            self.capture_scalar = false;
            self.finish_member(buf, i, cap_from, sink);
        }
    }

    /// The current member value ends right before `buf[end]`.
    fn finish_member<S: JsonSink>(
        &mut self,
        buf: &[u8],
        end: usize,
        cap_from: &mut Option<usize>,
        sink: &mut S,
    ) {
        self.text = false;
        self.capture_scalar = false;
        if let Some(key) = self.capture.take() {
            let from = cap_from.take().unwrap_or(0);
            let piece = buf.get(from..end).unwrap_or_default();
            self.capture = Some(key);
            self.append_capture(piece, sink);
            self.capture = None;
            if !self.capture_over {
                sink.value(key, &self.captured);
            }
            self.captured.clear();
            if self.captured.capacity() > 64 * 1024 {
                self.captured.shrink_to(64 * 1024);
            }
        }
    }

    fn append_capture<S: JsonSink>(&mut self, piece: &[u8], sink: &mut S) {
        if self.capture_over || self.capture.is_none() {
            return;
        }
        if self.captured.len() + piece.len() > self.max_value_bytes {
            self.capture_over = true;
            self.captured.clear();
            sink.malformed();
            return;
        }
        self.captured.extend_from_slice(piece);
    }

    /// NDJSON: a newline arrived inside a record. Report it and start over
    /// with the next line.
    fn broken_record<S: JsonSink>(&mut self, sink: &mut S) {
        sink.malformed();
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
        self.reading_key = false;
        self.expect_key = false;
        self.pending = None;
        self.capture = None;
        self.captured.clear();
        self.capture_over = false;
        self.capture_scalar = false;
        self.text = false;
        self.text_string = false;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Default, Debug, PartialEq)]
    struct Rec {
        values: Vec<(Key, String)>,
        ends: usize,
        text: u64,
        malformed: usize,
    }

    impl JsonSink for Rec {
        fn value(&mut self, key: Key, raw: &[u8]) {
            self.values
                .push((key, String::from_utf8_lossy(raw).into_owned()));
        }
        fn value_end(&mut self) {
            self.ends += 1;
        }
        fn text_bytes(&mut self, n: u64) {
            self.text += n;
        }
        fn malformed(&mut self) {
            self.malformed += 1;
        }
    }

    fn scan(chunks: &[&[u8]], lines: bool, cap: usize) -> Rec {
        let mut s = JsonScanner::new(lines, cap);
        let mut r = Rec::default();
        for c in chunks {
            s.feed(c, &mut r);
        }
        r
    }

    fn all_splits(input: &[u8], lines: bool, cap: usize) -> Rec {
        let whole = scan(&[input], lines, cap);
        for i in 0..=input.len() {
            let (a, b) = input.split_at(i);
            assert_eq!(scan(&[a, b], lines, cap), whole, "split at {i}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(scan(&bytes, lines, cap), whole, "byte by byte");
        whole
    }

    #[test]
    fn captures_top_level_members_only() {
        let input = br#"{"id":"x","model" : "gpt-4o","data":[{"usage":{"no":1},"model":"inner"}],
            "choices":[{"message":{"content":"hi \"there\""}}],
            "usage": {"prompt_tokens": 12, "nested": {"a": [1, 2]}}, "done":true, "eval_count":282}"#;
        let r = all_splits(input, false, 1024);
        assert_eq!(
            r.values,
            vec![
                (Key::Model, "\"gpt-4o\"".to_owned()),
                (
                    Key::Usage,
                    r#"{"prompt_tokens": 12, "nested": {"a": [1, 2]}}"#.to_owned()
                ),
                (Key::Done, "true".to_owned()),
                (Key::EvalCount, "282".to_owned()),
            ]
        );
        assert_eq!(r.ends, 1);
        assert_eq!(r.malformed, 0);
        // `hi \"there\"` is 12 bytes as written; keys inside are not text.
        assert_eq!(r.text, 12);
    }

    #[test]
    fn top_level_array_reads_members_of_each_element() {
        let input = br#"[{"usageMetadata":{"promptTokenCount":7},"modelVersion":"g"}
,{"usageMetadata":{"promptTokenCount":7,"candidatesTokenCount":10}}]"#;
        let r = all_splits(input, false, 1024);
        assert_eq!(
            r.values,
            vec![
                (Key::UsageMetadata, r#"{"promptTokenCount":7}"#.to_owned()),
                (Key::ModelVersion, "\"g\"".to_owned()),
                (
                    Key::UsageMetadata,
                    r#"{"promptTokenCount":7,"candidatesTokenCount":10}"#.to_owned()
                ),
            ]
        );
        assert_eq!(r.ends, 1);
    }

    #[test]
    fn ndjson_records_and_broken_line_recovery() {
        let input = b"{\"done\":false,\"message\":{\"content\":\"ab\"}}\n{\"done\":tr\n{\"done\":true,\"eval_count\":5}\n";
        let r = all_splits(input, true, 1024);
        assert_eq!(
            r.values,
            vec![
                (Key::Done, "false".to_owned()),
                (Key::Done, "true".to_owned()),
                (Key::EvalCount, "5".to_owned()),
            ]
        );
        assert_eq!(r.ends, 2);
        assert_eq!(r.malformed, 1);
        assert_eq!(r.text, 2);
    }

    #[test]
    fn value_over_cap_is_dropped_and_reported() {
        let input = br#"{"usage":{"a":"0123456789012345678901234567890123456789"},"model":"m"}"#;
        let r = all_splits(input, false, 20);
        assert_eq!(r.values, vec![(Key::Model, "\"m\"".to_owned())]);
        assert_eq!(r.malformed, 1);
    }

    #[test]
    fn stray_bytes_are_malformed() {
        let r = scan(&[b"<html>}"], false, 64);
        assert!(r.malformed >= 1);
        assert_eq!(r.ends, 0);
    }
}
