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

use memchr::{memchr, memchr2, memchr3};

mod whole;

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
    /// Values that are whole in one read (NDJSON record lines, top-level
    /// objects) go through the fast path (`whole`). Off only in tests that
    /// compare the two paths.
    fast: bool,
    /// Records and objects read by the fast path (tests check it is taken).
    #[cfg(test)]
    fast_records: usize,
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
            fast: true,
            #[cfg(test)]
            fast_records: 0,
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

    /// Nothing of a member, capture or text value is pending: at depth 0
    /// the next byte starts afresh (see `whole`).
    fn clean(&self) -> bool {
        self.depth == 0
            && !self.in_string
            && !self.text
            && self.capture.is_none()
            && self.pending.is_none()
            && !self.capture_scalar
    }

    /// NDJSON: reads the record line starting at `buf[i]` with the fast path
    /// if the whole line is in `buf` and the fast path can read it exactly;
    /// the index after its newline. Otherwise `Err` with the index up to
    /// which the general scanner must go before trying again (the end of
    /// that line, or of `buf`).
    fn fast_line<S: JsonSink>(
        &mut self,
        buf: &[u8],
        i: usize,
        sink: &mut S,
    ) -> Result<usize, usize> {
        let rest = buf.get(i..).unwrap_or_default();
        let Some(p) = memchr(b'\n', rest) else {
            return Err(buf.len());
        };
        let line = rest.get(..p).unwrap_or_default();
        let mut rec = whole::Record::default();
        if whole::read_line(line, &mut rec).is_none() {
            return Err(i + p + 1);
        }
        self.report(&rec, line, sink);
        Ok(i + p + 1)
    }

    /// Plain JSON: reads the top-level object opening at the first
    /// non-whitespace byte from `buf[i]` with the fast path if it ends in
    /// `buf` and the fast path can read it exactly; the index after it.
    /// Otherwise `Err` with the index up to which the general scanner must
    /// go before trying again: past a byte that opens no object, or the end
    /// of `buf`.
    fn fast_object<S: JsonSink>(
        &mut self,
        buf: &[u8],
        i: usize,
        sink: &mut S,
    ) -> Result<usize, usize> {
        let rest = buf.get(i..).unwrap_or_default();
        let Some(p) = rest
            .iter()
            .position(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        else {
            // Whitespace between top-level values changes nothing.
            return Ok(buf.len());
        };
        let at = i + p;
        if rest.get(p) != Some(&b'{') {
            return Err(at + 1);
        }
        let object = rest.get(p..).unwrap_or_default();
        let mut rec = whole::Record::default();
        let Some(len) = whole::read_object(object, &mut rec) else {
            return Err(buf.len());
        };
        self.report(&rec, object, sink);
        Ok(at + len)
    }

    /// Makes the sink calls of a record the fast path read from `input`.
    fn report<S: JsonSink>(&mut self, rec: &whole::Record, input: &[u8], sink: &mut S) {
        for (key, raw) in rec.captures(input) {
            // As `start_value` and `append_capture` would have done.
            if sink.wants(key) {
                if raw.len() > self.max_value_bytes {
                    sink.malformed();
                } else {
                    sink.value(key, raw);
                }
            }
        }
        if rec.text() > 0 {
            sink.text_bytes(rec.text());
        }
        if rec.object() {
            // The state the general scanner leaves after a top-level object.
            self.member_depth = 1;
            self.objects |= 1;
            self.expect_key = false;
            sink.value_end();
            #[cfg(test)]
            {
                self.fast_records += 1;
            }
        }
    }

    pub(crate) fn feed<S: JsonSink>(&mut self, buf: &[u8], sink: &mut S) {
        let mut i = 0;
        // Start of the part of `buf` that belongs to the current capture.
        let mut cap_from: Option<usize> = self.capture.map(|_| 0);
        // Before this index the general scanner reads (a value the fast
        // path declined, or one not whole in this read).
        let mut general_until = 0;
        while i < buf.len() {
            if self.fast && i >= general_until && self.clean() {
                let fast = if self.lines {
                    self.fast_line(buf, i, sink)
                } else {
                    self.fast_object(buf, i, sink)
                };
                match fast {
                    Ok(next) => {
                        i = next;
                        continue;
                    }
                    Err(until) => general_until = until,
                }
            }
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

    /// Scans `chunks` in lines mode (NDJSON) or not, with the fast path on
    /// or off; returns what the sink saw and how many records the fast path
    /// read.
    fn scan_mode(lines: bool, chunks: &[&[u8]], fast: bool, cap: usize) -> (Rec, usize) {
        let mut s = JsonScanner::new(lines, cap);
        s.fast = fast;
        let mut r = Rec::default();
        for c in chunks {
            s.feed(c, &mut r);
        }
        // A probe after the input: a state the fast path left different
        // from the general scanner's (text mode, member depth) shows here.
        s.feed(
            b"{\"id\":\"probe\",\"model\":\"p\",\"message\":{\"content\":\"12345\"}}\n[{\"done\":true}]\n",
            &mut r,
        );
        (r, s.fast_records)
    }

    /// The fast path must see exactly what the general scanner sees, for
    /// the body whole, split anywhere in two, and byte by byte. Returns the
    /// result and the fast path's record count on the whole body.
    fn same_in_mode(lines: bool, input: &[u8], cap: usize) -> (Rec, usize) {
        let (general, none) = scan_mode(lines, &[input], false, cap);
        assert_eq!(none, 0);
        let (fast, hits) = scan_mode(lines, &[input], true, cap);
        let show = String::from_utf8_lossy(input);
        assert_eq!(fast, general, "fast path vs general scanner on {show:?}");
        for i in 0..=input.len() {
            let (a, b) = input.split_at(i);
            assert_eq!(
                scan_mode(lines, &[a, b], true, cap).0,
                general,
                "split at {i} of {show:?}"
            );
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(
            scan_mode(lines, &bytes, true, cap).0,
            general,
            "byte by byte: {show:?}"
        );
        (fast, hits)
    }

    fn same_both_ways(input: &[u8], cap: usize) -> (Rec, usize) {
        same_in_mode(true, input, cap)
    }

    fn same_both_ways_json(input: &[u8], cap: usize) -> (Rec, usize) {
        same_in_mode(false, input, cap)
    }

    /// Every captured provider JSON body (non-streamed replies, errors).
    fn provider_json_fixtures() -> Vec<(String, Vec<u8>)> {
        let root =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/providers");
        let mut out = Vec::new();
        for dir in std::fs::read_dir(root).unwrap() {
            let dir = dir.unwrap().path();
            if !dir.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&dir).unwrap() {
                let f = f.unwrap().path();
                let name = f.to_string_lossy().into_owned();
                if name.ends_with(".json") && !name.ends_with(".expected.json") {
                    out.push((name, std::fs::read(&f).unwrap()));
                }
            }
        }
        assert!(out.len() >= 10, "fixtures found: {}", out.len());
        out
    }

    #[test]
    fn fast_path_reads_every_provider_json_body_whole() {
        for (name, body) in provider_json_fixtures() {
            let (r, hits) = same_both_ways_json(&body, 1 << 16);
            assert_eq!(hits, 2, "body and probe by the fast path: {name}");
            assert_eq!(r.malformed, 0, "{name}");
            assert_eq!(r.ends, 1 + 2, "body, probe object and array: {name}");
        }
    }

    #[test]
    fn fast_path_keeps_what_json_bodies_carry() {
        let cases: &[&[u8]] = &[
            // Pretty-printed, usage and model, text under choices.
            b"{\n  \"model\": \"gpt\",\n  \"choices\": [\n    {\"message\": {\"content\": \"a\\nb\"}}\n  ],\n  \"usage\": {\n    \"prompt_tokens\": 3\n  }\n}\n",
            // A raw newline inside a string is content outside NDJSON.
            b"{\"choices\":[{\"text\":\"a\nb\"}],\"usage\":{\"total_tokens\":1}}",
            // Several top-level values, whitespace between.
            b" \r\n{\"model\":\"a\"}\n\t{\"usage\":{\"prompt_tokens\":1}} {}{\"done\":true}",
            // An object, then an array (the general scanner takes the array).
            b"{\"model\":\"a\"}[{\"usageMetadata\":{\"promptTokenCount\":2}}]",
            // Error bodies.
            b"{\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"busy\"}}",
            b"{\"error\":{\"code\":429,\"message\":\"m\",\"status\":\"RESOURCE_EXHAUSTED\"}}",
            // Key text inside strings, escapes at string ends.
            b"{\"id\":\"\\\"usage\\\":{}\",\"output\":[{\"content\":[{\"text\":\"x\\\\\"}]}],\"usage\":null}",
            // Scalars of every kind at member level.
            b"{\"done\" : true ,\"eval_count\":282\n,\"prompt_eval_count\":-1.5e3,\"x\":null}",
        ];
        for case in cases {
            let (r, hits) = same_both_ways_json(case, 1024);
            assert!(
                hits >= 2,
                "fast path taken on {:?}",
                String::from_utf8_lossy(case)
            );
            assert_eq!(r.malformed, 0, "{:?}", String::from_utf8_lossy(case));
        }
        let (r, _) = same_both_ways_json(cases[1], 1024);
        assert_eq!(r.text, 3 + 5);
        let (r, hits) = same_both_ways_json(cases[2], 1024);
        assert_eq!((hits, r.ends), (4 + 1, 4 + 2));
    }

    #[test]
    fn fast_path_declines_json_it_does_not_read_exactly() {
        let cases: &[&[u8]] = &[
            // Cut short, stray and mismatched brackets.
            b"{\"usage\":{\"prompt_tokens\":3}",
            b"{\"a\":1}}{\"a\":[}{\"model\":\"m\"}",
            // A scalar text member (the general scanner stays in text mode).
            b"{\"content\":1,\"id\":\"abc\"}{\"id\":\"def\"}",
            // Top-level scalars and junk, form feed as whitespace.
            b"12 true \"s\" <html> \x0c{\"model\":\"m\"}\x0c",
            // Trailing comma, missing value, odd scalars.
            b"{\"a\":1,}{\"a\":}{\"done\":tr\"ue\"}{\"done\":true]",
            // Deep nesting.
            &[b"{\"a\":".as_slice(), &[b'['; 100], &[b']'; 100], b"}"].concat(),
            // More captures than the fast path holds.
            b"{\"done\":1,\"done\":2,\"done\":3,\"done\":4,\"done\":5,\"done\":6,\"done\":7,\"done\":8,\"done\":9}",
        ];
        for case in cases {
            same_both_ways_json(case, 1024);
        }
    }

    /// Strings, whitespace runs and skipped containers long enough for the
    /// word-at-a-time searches (past their first words too), with escapes,
    /// brackets and separators at every offset of a word; every split point
    /// puts `\"` and long runs across a read boundary.
    #[test]
    fn fast_path_word_searches_agree_with_the_general_scanner() {
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for pad in 0..9 {
            let fill = "x".repeat(pad);
            let long = "y".repeat(40 + pad);
            let indent = " ".repeat(3 + 4 * pad);
            cases.push(
                format!(
                    "{{\n{indent}\"model\" :\t\"{fill}\\\"{long}\\\\\",\r\n{indent}\"choices\": [{indent}{{\"message\": {{\"content\": \"{fill}}}]\\\"{{[,:\",\n{indent}\"role\": \"{long}\"}}}}],\n\t\t\"id{fill}\": {{\"a{fill}\": [\"]}}{long}\", {{\"b\": [[[\"\\\\\"]]]}}], \"c\":\"{{\"}},{indent}\"usage\"{indent}:{indent}{{ \"prompt_tokens\" : {pad} ,\"k{long}\":\"{fill}\\\"}}\"}}\n{indent}}}{indent}\n"
                )
                .into_bytes(),
            );
        }
        // Deep nesting inside a skipped and inside a text member.
        let deep = format!("{}1{}", "[{\"a\":".repeat(30), "}]".repeat(30));
        cases.push(format!("{{\"x\":{deep},\"choices\":{deep},\"done\":true}}").into_bytes());
        // Truncated: the fast path declines and the general scanner waits.
        let whole = cases.first().cloned().unwrap_or_default();
        for cut in [1, 9, 30, 60, 100, whole.len() - 2] {
            cases.push(whole.get(..cut).unwrap_or_default().to_vec());
        }
        for (n, case) in cases.iter().enumerate() {
            let (r, hits) = same_both_ways_json(case, 1024);
            if n < 10 {
                assert!(
                    hits >= 2,
                    "fast path taken on {:?}",
                    String::from_utf8_lossy(case)
                );
                assert_eq!(r.malformed, 0, "{:?}", String::from_utf8_lossy(case));
            }
            if n < 9 {
                assert!(r
                    .values
                    .iter()
                    .any(|(k, v)| *k == Key::Usage && v.contains("prompt_tokens")));
            }
        }
        // The same records as NDJSON lines (no raw newline inside).
        for case in cases.iter().take(9) {
            let line: Vec<u8> = case
                .iter()
                .map(|&b| if b == b'\n' { b' ' } else { b })
                .collect();
            let body = [line.as_slice(), b"\n", line.as_slice(), b"\n"].concat();
            let (r, hits) = same_both_ways(&body, 1024);
            assert_eq!(hits, 2 + 1, "{:?}", String::from_utf8_lossy(&body));
            assert_eq!(r.malformed, 0);
        }
    }

    #[test]
    fn fast_path_json_value_over_cap_is_malformed_only_when_wanted() {
        let input = b"{\"model\":\"0123456789012345678901234567890123456789\",\"done\":true}{\"model\":\"m\"}";
        let (r, hits) = same_both_ways_json(input, 20);
        assert!(hits >= 2);
        assert_eq!(r.malformed, 1);
        assert!(r.values.contains(&(Key::Model, "\"m\"".to_owned())));
    }

    const OLLAMA_CONTENT: &[u8] = b"{\"model\":\"llama3.2\",\"created_at\":\"2023-08-04T08:52:19.385406455-07:00\",\"message\":{\"role\":\"assistant\",\"content\":\"The\",\"images\":null},\"done\":false}";
    const OLLAMA_FINAL: &[u8] = b"{\"model\":\"llama3.2\",\"created_at\":\"2023-08-04T19:22:45.499127Z\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true,\"total_duration\":4883583458,\"load_duration\":1334875,\"prompt_eval_count\":26,\"prompt_eval_duration\":342546000,\"eval_count\":282,\"eval_duration\":4535599000}";

    #[test]
    fn fast_path_reads_ollama_records_whole() {
        let mut body = Vec::new();
        for _ in 0..3 {
            body.extend_from_slice(OLLAMA_CONTENT);
            body.push(b'\n');
        }
        body.extend_from_slice(OLLAMA_FINAL);
        body.push(b'\n');
        let (r, hits) = same_both_ways(&body, 1024);
        assert_eq!(
            hits,
            4 + 1,
            "every record (and the probe's object line) by the fast path"
        );
        let usage: Vec<_> = r
            .values
            .iter()
            .filter(|(k, _)| matches!(k, Key::PromptEvalCount | Key::EvalCount | Key::Done))
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        assert_eq!(
            usage,
            vec![
                (Key::Done, "false"),
                (Key::Done, "false"),
                (Key::Done, "false"),
                (Key::Done, "true"),
                (Key::PromptEvalCount, "26"),
                (Key::EvalCount, "282"),
                (Key::Done, "true"),
            ]
        );
        assert_eq!(
            r.values.first(),
            Some(&(Key::Model, "\"llama3.2\"".to_owned()))
        );
        // "The" three times, plus the probe's 5.
        assert_eq!(r.text, 9 + 5);
        assert_eq!(r.ends, 4 + 2);
        assert_eq!(r.malformed, 0);
    }

    #[test]
    fn fast_path_keeps_what_records_carry() {
        let cases: &[&[u8]] = &[
            // Usage on a record that also has content.
            b"{\"message\":{\"content\":\"hi\"},\"done\":true,\"prompt_eval_count\":1,\"eval_count\":2}\n",
            // Error records, string and object.
            b"{\"error\":\"model 'x' not found\"}\n",
            b"{\"error\":{\"type\":\"overloaded\",\"message\":\"busy\"}}\n",
            // Key text inside string values is not a key.
            b"{\"message\":{\"content\":\"\\\"eval_count\\\":99, \\\"done\\\":true\"},\"done\":false}\n",
            b"{\"response\":\"{\\\"usage\\\":{}}\",\"id\":\"\\\"model\\\"\"}\n",
            // Escaped quotes and backslashes at string ends.
            b"{\"message\":{\"content\":\"a\\\\\"},\"done\":false}\n",
            b"{\"message\":{\"content\":\"\\\\\\\"\"},\"x\":\"\\\\\"}\n",
            // Text under leaf keys at depth, arrays, tool calls.
            b"{\"message\":{\"role\":\"assistant\",\"content\":\"\",\"thinking\":\"hmm\",\"tool_calls\":[{\"function\":{\"name\":\"f\",\"arguments\":{\"city\":\"Paris\"}}}]}}\n",
            b"{\"message\":{\"content\":[\"a\",{\"text\":\"bc\",\"k\":\"no\"}],\"role\":\"r\"}}\n",
            // /api/generate shape, CRLF, blank lines, whitespace.
            b"{ \"model\" : \"m\" , \"response\" : \"Hello\" , \"done\" : false }\r\n\r\n  \n{\"response\":\"!\",\"done\":true ,\"eval_count\": 3}\r\n",
            // The last record without its newline.
            b"{\"response\":\"a\"}\n{\"done\":true,\"eval_count\":7}",
            // A top-level array record, then an object record.
            b"[{\"done\":true}]\n{\"eval_count\":1}\n",
            // Nested usage and error in the general-scanner sense.
            b"{\"usage\":{\"prompt_tokens\":3,\"nested\":{\"a\":[1,2]}},\"type\":\"error\"}\n",
            // Key-looking bytes as a long key, and an escaped key.
            b"{\"eval_count_of_something_very_long_indeed\":1,\"con\\u0074ent\":\"x\",\"eval_count\":2}\n",
        ];
        for case in cases {
            let (r, hits) = same_both_ways(case, 1024);
            assert!(
                hits >= 2,
                "fast path taken on {:?}",
                String::from_utf8_lossy(case)
            );
            assert_eq!(r.malformed, 0, "{:?}", String::from_utf8_lossy(case));
        }
        let (r, _) = same_both_ways(cases[0], 1024);
        assert!(r.values.contains(&(Key::EvalCount, "2".to_owned())));
        let (r, _) = same_both_ways(cases[1], 1024);
        assert_eq!(r.values.first().map(|v| v.0), Some(Key::Error));
        let (r, _) = same_both_ways(cases[3], 1024);
        assert!(!r.values.iter().any(|(k, _)| *k == Key::EvalCount));
        let content = br#"\"eval_count\":99, \"done\":true"#;
        assert_eq!(r.text, content.len() as u64 + 5);
    }

    #[test]
    fn fast_path_declines_what_it_does_not_read_exactly() {
        let cases: &[&[u8]] = &[
            // Broken records, a newline inside a string.
            b"{\"done\":tr\n{\"done\":true}\n",
            b"{\"message\":{\"content\":\"a\nb\"}}\n",
            // Stray and mismatched brackets.
            b"{\"a\":1}}\n{\"a\":[}\n",
            // A scalar text member (the general scanner stays in text mode).
            b"{\"content\":1,\"id\":\"abc\"}\n{\"id\":\"def\"}\n",
            // Two values on a line, top-level scalars, junk.
            b"{\"a\":1}{\"eval_count\":2}\n12 true\n\"s\"\n<html>\n",
            // Trailing comma, missing value, odd scalars.
            b"{\"a\":1,}\n{\"a\":}\n{\"done\":tr\"ue\"}\n{\"done\":true]\n",
            // Deep nesting.
            &[b"{\"a\":".as_slice(), &[b'['; 100], &[b']'; 100], b"}\n"].concat(),
            // More captures than the fast path holds.
            b"{\"done\":1,\"done\":2,\"done\":3,\"done\":4,\"done\":5,\"done\":6,\"done\":7,\"done\":8,\"done\":9}\n",
        ];
        for case in cases {
            same_both_ways(case, 1024);
        }
    }

    #[test]
    fn fast_path_value_over_cap_is_malformed_only_when_wanted() {
        let input = b"{\"model\":\"0123456789012345678901234567890123456789\",\"done\":true}\n{\"model\":\"m\"}\n";
        let (r, hits) = same_both_ways(input, 20);
        assert!(hits >= 2);
        assert_eq!(r.malformed, 1);
        assert!(r.values.contains(&(Key::Model, "\"m\"".to_owned())));
    }

    mod generated {
        //! Generated NDJSON bodies: records built from the keys and string
        //! shapes that matter (captured keys, text keys and leaves, key
        //! text inside strings, escapes), with odd whitespace, CRLF, blank
        //! lines, a last record without newline, and byte-level damage.
        //! The fast path must agree with the general scanner on each.

        use super::*;
        use proptest::prelude::*;

        const KEYS: &[&str] = &[
            "usage",
            "model",
            "modelVersion",
            "usageMetadata",
            "error",
            "type",
            "done",
            "prompt_eval_count",
            "eval_count",
            "choices",
            "candidates",
            "content",
            "message",
            "output",
            "response",
            "thinking",
            "text",
            "reasoning",
            "arguments",
            "role",
            "id",
            "images",
            "con\\u0074ent",
            "a_key_that_is_longer_than_thirty_two_bytes",
        ];
        const STRINGS: &[&str] = &[
            "",
            "abc",
            "a\\\"b",
            "\\\\",
            "\\\"eval_count\\\":1",
            "\\\"done\\\":true",
            "eval_count",
            "x\\ny",
            "\\u00e9t\\u00e9",
            "\u{e9}t\u{e9}",
            "true",
            "{[",
            "]}",
            ",:",
        ];
        const SCALARS: &[&str] = &["true", "false", "null", "0", "282", "-1.5e3"];
        const WS: &[&str] = &["", "", "", " ", "\t", "\r", "  "];

        fn ws() -> impl Strategy<Value = String> {
            prop::sample::select(WS).prop_map(str::to_owned)
        }

        fn string() -> impl Strategy<Value = String> {
            prop::sample::select(STRINGS).prop_map(|s| format!("\"{s}\""))
        }

        fn value() -> impl Strategy<Value = String> + Clone {
            let leaf = prop_oneof![
                string(),
                prop::sample::select(SCALARS).prop_map(str::to_owned),
            ];
            leaf.prop_recursive(4, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec((ws(), inner.clone(), ws()), 0..4).prop_map(|v| {
                        let items: Vec<String> = v
                            .into_iter()
                            .map(|(a, x, b)| format!("{a}{x}{b}"))
                            .collect();
                        format!("[{}]", items.join(","))
                    }),
                    members(inner).prop_map(|m| format!("{{{m}}}")),
                ]
            })
        }

        fn members(value: impl Strategy<Value = String> + Clone) -> impl Strategy<Value = String> {
            prop::collection::vec((prop::sample::select(KEYS), ws(), value, ws()), 0..6).prop_map(
                |v| {
                    let items: Vec<String> = v
                        .into_iter()
                        .map(|(k, a, x, b)| format!("\"{k}\"{a}:{b}{x}{a}"))
                        .collect();
                    items.join(",")
                },
            )
        }

        fn record() -> impl Strategy<Value = Vec<u8>> {
            (
                ws(),
                members(value()),
                ws(),
                prop::sample::select(&["\n", "\r\n", "\n\n"][..]),
            )
                .prop_map(|(a, m, b, end)| format!("{a}{{{m}}}{b}{end}").into_bytes())
        }

        /// The bytes that steer the reader, for the damage the property test does.
        const STEERING_BYTES: &[u8] = b"\"\\{}[],:\n \rt1";

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn fast_path_agrees_with_the_general_scanner(
                lines in any::<bool>(),
                pretty in any::<bool>(),
                records in prop::collection::vec(record(), 1..5),
                cut_last_newline in any::<bool>(),
                damages in prop::collection::vec((any::<usize>(), any::<u8>()), 0..3),
                cap in prop::sample::select(&[16usize, 40, 1024][..]),
                cuts in prop::collection::vec(any::<usize>(), 0..4),
            ) {
                let mut body = records.concat();
                if cut_last_newline && body.last() == Some(&b'\n') {
                    body.pop();
                }
                if pretty && !lines {
                    // Outside NDJSON a newline is whitespace like any other
                    // (the generated strings hold no spaces).
                    for b in &mut body {
                        if *b == b' ' {
                            *b = b'\n';
                        }
                    }
                }
                for (at, how) in damages {
                    body = crate::usage::strict_json::damage(body, at, how, STEERING_BYTES);
                }
                let (general, _) = scan_mode(lines, &[&body], false, cap);
                let (fast, _) = scan_mode(lines, &[&body], true, cap);
                prop_assert_eq!(&fast, &general);
                let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (body.len() + 1)).collect();
                cuts.sort_unstable();
                let mut chunks = Vec::new();
                let mut prev = 0;
                for c in cuts.into_iter().chain(std::iter::once(body.len())) {
                    chunks.push(&body[prev..c]);
                    prev = c;
                }
                // Against the general scanner fed the same reads: its count
                // of `malformed` calls on damaged input can depend on where
                // a read ends (the tap only keeps whether there was one).
                prop_assert_eq!(
                    &scan_mode(lines, &chunks, true, cap).0,
                    &scan_mode(lines, &chunks, false, cap).0
                );
            }
        }

        /// The generator above must reach the fast path, or the property
        /// checks nothing.
        #[test]
        fn generated_records_mostly_take_the_fast_path() {
            use proptest::strategy::ValueTree;
            use proptest::test_runner::TestRunner;
            let mut runner = TestRunner::deterministic();
            let strategy = record();
            for lines in [true, false] {
                let (mut fast, mut total) = (0, 0);
                for _ in 0..200 {
                    let rec = strategy.new_tree(&mut runner).unwrap().current();
                    let mut s = JsonScanner::new(lines, 1024);
                    let mut r = Rec::default();
                    s.feed(&rec, &mut r);
                    fast += s.fast_records;
                    total += 1;
                }
                assert!(
                    fast * 2 > total,
                    "{fast} of {total} records by the fast path (lines: {lines})"
                );
            }
        }
    }
}
