//! Incremental server-sent-events decoder (WHATWG HTML, "Interpreting an event
//! stream"), working on bytes.
//!
//! Flow: `feed` splits whatever bytes arrive into lines on `\r`, `\n` or
//! `\r\n` (a `\r` ending one read and a `\n` starting the next are one line
//! ending), keeps only the unfinished tail line between reads, accumulates the
//! fields of the current event, and hands each finished event (at a blank
//! line) to an [`SseSink`]. An event made of one `data:` line that arrives
//! with its blank line in one read (nearly every event of a provider stream)
//! is handed over straight from the read, not copied into the event buffer
//! first. Nothing is decoded as UTF-8 here, so a multi-byte
//! character cut across reads is simply carried in the tail line; U+2028 and
//! friends are ordinary bytes.
//!
//! Size cap: an event is *over the cap* when the bytes of its lines (field
//! names, values, comments; line terminators not counted) add up to more
//! than `max_event_bytes`. The measure is a running count over the bytes of
//! the event in stream order, so the point where an event goes over is the
//! same whatever the reads are; deciding it from the buffers instead (the
//! decoded `data` of a line that arrived whole, the raw tail of one that
//! arrived in pieces) made the same event kept or dropped depending on the
//! split. The tail line plus the current event's `data` and `event` buffers
//! never hold more than that count, so memory stays within the cap. An
//! event over the cap is dropped (its later lines are skipped until its blank
//! line), the sink is told its full size through [`SseSink::oversized`], and
//! decoding resumes with the next event.
//!
//! End of stream: the spec (and the OpenAI and Anthropic SDKs) discard an
//! event that is not terminated by a blank line. A metering tap should not:
//! when a provider closes the connection right after its last event (the
//! anthropic-sdk fixture ends `data: {"type":"message_stop"}` without a
//! newline) that event is still the provider's word. [`SseDecoder::finish`]
//! therefore dispatches such an event with `at_eof = true`; sinks use it only
//! if its payload is complete (valid JSON or a terminator) and ignore it
//! silently otherwise, since a truncated payload is the normal shape of a cut
//! stream rather than a decoding error.

use memchr::{memchr, memchr2};

/// Receiver of decoded events.
pub(crate) trait SseSink {
    /// A dispatched event. `name` is empty when the event had no `event:`
    /// field (the spec's default type "message"). `data` is the `data:` lines
    /// joined with `\n`.
    fn event(&mut self, name: &[u8], data: &[u8], at_eof: bool);

    /// A line whose field name is not `data`, `event`, `id` or `retry`, and
    /// which is not a comment. Spec decoders ignore these; Gemini writes a raw,
    /// un-prefixed JSON error object after its events, which only shows up
    /// here.
    fn stray_line(&mut self, _line: &[u8]) {}

    /// An event went over `max_event_bytes` and was dropped; `event_bytes` is
    /// its whole size, counted as for the cap.
    fn oversized(&mut self, _event_bytes: u64) {}
}

/// Streaming SSE decoder; see the module comment.
#[derive(Debug)]
pub(crate) struct SseDecoder {
    max_event_bytes: usize,
    /// Unfinished last line of the previous read.
    line: Vec<u8>,
    /// The previous read ended with `\r`: a leading `\n` completes that line
    /// ending instead of starting a new (blank) line.
    after_cr: bool,
    /// Part of the current line arrived in an earlier read (it is held in
    /// `line` unless the event is being dropped): the line is not blank,
    /// whatever its terminator is preceded by.
    line_started: bool,
    /// Bytes of the current event's lines so far, the measure of the cap.
    event_bytes: u64,
    /// The current event went over the cap: ignore its lines until the blank
    /// line that ends it.
    dropping: bool,
    data: Vec<u8>,
    has_data: bool,
    name: Vec<u8>,
    /// At least one line (of any kind) has been seen since the last dispatch:
    /// used to tell a clean end of stream from one cut inside an event.
    in_event: bool,
}

impl SseDecoder {
    pub(crate) fn new(max_event_bytes: usize) -> Self {
        SseDecoder {
            max_event_bytes: max_event_bytes.max(1),
            line: Vec::new(),
            after_cr: false,
            line_started: false,
            event_bytes: 0,
            dropping: false,
            data: Vec::new(),
            has_data: false,
            name: Vec::new(),
            in_event: false,
        }
    }

    /// Decodes `chunk`, calling `sink` for every event it completes.
    pub(crate) fn feed<S: SseSink>(&mut self, chunk: &[u8], sink: &mut S) {
        let mut rest = chunk;
        if self.after_cr {
            self.after_cr = false;
            if let Some(tail) = rest.strip_prefix(b"\n") {
                rest = tail;
            }
        }
        while !rest.is_empty() {
            let Some(i) = memchr2(b'\n', b'\r', rest) else {
                self.carry(rest);
                return;
            };
            let (body, tail) = rest.split_at(i);
            // `tail` starts with the terminator itself.
            let is_cr = tail.first() == Some(&b'\r');
            rest = tail.get(1..).unwrap_or_default();
            if is_cr {
                match rest.first() {
                    Some(b'\n') => rest = rest.get(1..).unwrap_or_default(),
                    None => self.after_cr = true,
                    Some(_) => {}
                }
            }
            if let Some(after) = self.whole_event(body, rest, sink) {
                rest = after;
                continue;
            }
            self.end_line(body, sink);
        }
    }

    /// The common event: one `data:` line, whole in this read, and the
    /// blank line that ends it right after. It is dispatched from the read
    /// instead of being copied into `data` first, with what the line by
    /// line path would do (the same count, the same dispatch, the same
    /// state after); returns the input after the blank line. `None`, and
    /// nothing done, for any other line.
    fn whole_event<'a, S: SseSink>(
        &mut self,
        line: &[u8],
        rest: &'a [u8],
        sink: &mut S,
    ) -> Option<&'a [u8]> {
        if self.line_started || self.has_data || self.dropping {
            return None;
        }
        let value = line.strip_prefix(b"data:")?;
        let (blank, after_cr) = match rest {
            [b'\n', ..] => (1, false),
            [b'\r', b'\n', ..] => (2, false),
            [b'\r'] => (1, true),
            [b'\r', ..] => (1, false),
            _ => return None,
        };
        if self.event_bytes.saturating_add(line.len() as u64) > self.max_event_bytes as u64 {
            return None;
        }
        let value = value.strip_prefix(b" ").unwrap_or(value);
        sink.event(&self.name, value, false);
        self.reset_event();
        self.after_cr = after_cr;
        rest.get(blank..)
    }

    /// End of body: processes a final unterminated line and dispatches a final
    /// unterminated event with `at_eof = true`. Returns `true` when the stream
    /// ended cleanly between events.
    pub(crate) fn finish<S: SseSink>(&mut self, sink: &mut S) -> bool {
        if std::mem::replace(&mut self.line_started, false) {
            let line = std::mem::take(&mut self.line);
            if !self.dropping {
                self.field_line(&line, sink);
            }
        }
        let clean = !self.in_event;
        if self.dropping {
            sink.oversized(self.event_bytes);
        } else if self.has_data || !self.name.is_empty() {
            sink.event(&self.name, &self.data, true);
        }
        self.reset_event();
        self.after_cr = false;
        clean
    }

    /// Adds `n` bytes of the current event's lines to the count; past the cap
    /// the event is dropped.
    fn count(&mut self, n: usize) {
        self.event_bytes = self.event_bytes.saturating_add(n as u64);
        if !self.dropping && self.event_bytes > self.max_event_bytes as u64 {
            self.dropping = true;
            self.data.clear();
            self.name.clear();
            self.has_data = false;
        }
    }

    /// Keeps an unfinished line for the next read.
    fn carry(&mut self, part: &[u8]) {
        self.in_event = true;
        self.line_started = true;
        self.count(part.len());
        if self.dropping {
            self.line.clear();
        } else {
            self.line.extend_from_slice(part);
        }
    }

    /// A line terminator was found; `body` is the part of the line in the
    /// current read.
    fn end_line<S: SseSink>(&mut self, body: &[u8], sink: &mut S) {
        let started = std::mem::replace(&mut self.line_started, false);
        if !started && body.is_empty() {
            self.dispatch(sink);
            return;
        }
        self.in_event = true;
        self.count(body.len());
        if self.dropping {
            self.line.clear();
        } else if started {
            let mut line = std::mem::take(&mut self.line);
            line.extend_from_slice(body);
            self.field_line(&line, sink);
            line.clear();
            self.line = line;
        } else {
            self.field_line(body, sink);
        }
    }

    fn field_line<S: SseSink>(&mut self, line: &[u8], sink: &mut S) {
        if line.first() == Some(&b':') {
            return; // comment (OpenRouter keep-alives)
        }
        let (field, value) = match memchr(b':', line) {
            Some(i) => {
                let (f, v) = line.split_at(i);
                let v = v.get(1..).unwrap_or_default();
                (f, v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        match field {
            // Neither buffer can outgrow the count: a value is shorter than
            // its line.
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => {
                self.name.clear();
                self.name.extend_from_slice(value);
            }
            b"id" | b"retry" => {}
            _ => sink.stray_line(line),
        }
    }

    fn dispatch<S: SseSink>(&mut self, sink: &mut S) {
        if self.dropping {
            sink.oversized(self.event_bytes);
        } else if self.has_data || !self.name.is_empty() {
            sink.event(&self.name, &self.data, false);
        }
        self.reset_event();
    }

    fn reset_event(&mut self) {
        self.dropping = false;
        self.event_bytes = 0;
        self.has_data = false;
        self.in_event = false;
        self.data.clear();
        self.name.clear();
        // A single huge event must not pin its buffer for the rest of a long
        // stream.
        if self.data.capacity() > 64 * 1024 {
            self.data.shrink_to(64 * 1024);
        }
        if self.line.capacity() > 64 * 1024 {
            self.line.shrink_to(64 * 1024);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Default, Debug, PartialEq)]
    struct Rec {
        events: Vec<(String, Vec<u8>, bool)>,
        stray: Vec<Vec<u8>>,
        /// Sizes of the dropped events.
        oversized: Vec<u64>,
    }

    impl SseSink for Rec {
        fn event(&mut self, name: &[u8], data: &[u8], at_eof: bool) {
            self.events.push((
                String::from_utf8_lossy(name).into_owned(),
                data.to_vec(),
                at_eof,
            ));
        }
        fn stray_line(&mut self, line: &[u8]) {
            self.stray.push(line.to_vec());
        }
        fn oversized(&mut self, event_bytes: u64) {
            self.oversized.push(event_bytes);
        }
    }

    fn run(chunks: &[&[u8]], cap: usize) -> (Rec, bool) {
        let mut d = SseDecoder::new(cap);
        let mut r = Rec::default();
        for c in chunks {
            d.feed(c, &mut r);
        }
        let clean = d.finish(&mut r);
        (r, clean)
    }

    /// Every split of `input` into two and into single bytes gives the same
    /// result as feeding it whole.
    fn all_splits(input: &[u8], cap: usize) -> (Rec, bool) {
        let whole = run(&[input], cap);
        for i in 0..=input.len() {
            let (a, b) = input.split_at(i);
            assert_eq!(run(&[a, b], cap), whole, "split at {i}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&bytes, cap), whole, "byte by byte");
        whole
    }

    fn data(r: &Rec) -> Vec<&[u8]> {
        r.events.iter().map(|e| e.1.as_slice()).collect()
    }

    #[test]
    fn line_endings_lf_crlf_cr_mixed() {
        for input in [
            &b"data: a\n\ndata: b\n\n"[..],
            b"data: a\r\n\r\ndata: b\r\n\r\n",
            b"data: a\r\rdata: b\r\r",
            b"data: a\r\n\ndata: b\n\r\n",
        ] {
            let (r, clean) = all_splits(input, 1024);
            assert_eq!(data(&r), vec![&b"a"[..], b"b"], "{input:?}");
            assert!(clean);
        }
    }

    #[test]
    fn cr_then_lf_across_reads_is_one_line_ending() {
        // openai-python test_every_chunk_boundary: `data:ok\r\n\r\n`.
        let (r, _) = all_splits(b"data:ok\r\n\r\n", 1024);
        assert_eq!(data(&r), vec![&b"ok"[..]]);
        // A CR at the end of one read and LF at the start of the next must not
        // produce an extra blank line that would dispatch early.
        let (r, _) = run(&[b"data: a\r", b"\ndata: b\r\n\r\n"], 1024);
        assert_eq!(data(&r), vec![&b"a\nb"[..]]);
    }

    #[test]
    fn comments_fields_and_names() {
        let input = b": OPENROUTER PROCESSING\n\n: ping\nid: 7\nretry: 10\nevent: message_delta\ndata:{\"a\":1}\n\n";
        let (r, _) = all_splits(input, 1024);
        assert_eq!(
            r.events,
            vec![("message_delta".to_owned(), b"{\"a\":1}".to_vec(), false)]
        );
        assert!(r.stray.is_empty());
    }

    #[test]
    fn multi_line_data_joined_and_one_space_stripped() {
        let (r, _) = all_splits(b"data: a\ndata:b\ndata:  c\ndata\n\n", 1024);
        assert_eq!(data(&r), vec![&b"a\nb\n c\n"[..]]);
    }

    #[test]
    fn utf8_split_across_reads_and_line_separator_kept() {
        let input = "data: {\"t\":\"h\u{e9}llo \u{2028} \u{1F600}\"}\n\n".as_bytes();
        let (r, _) = all_splits(input, 1024);
        assert_eq!(
            data(&r),
            vec!["{\"t\":\"h\u{e9}llo \u{2028} \u{1F600}\"}".as_bytes()]
        );
    }

    #[test]
    fn event_without_data_is_dispatched_with_empty_data() {
        let (r, _) = all_splits(b"event: error\n\n", 1024);
        assert_eq!(r.events, vec![("error".to_owned(), Vec::new(), false)]);
    }

    #[test]
    fn last_event_without_blank_line_is_dispatched_at_eof() {
        let (r, clean) = all_splits(b"data: a\n\nevent: message_stop\ndata: {\"x\":1}", 1024);
        assert_eq!(
            r.events,
            vec![
                (String::new(), b"a".to_vec(), false),
                ("message_stop".to_owned(), b"{\"x\":1}".to_vec(), true)
            ]
        );
        assert!(!clean);
        let (r, clean) = all_splits(b"data: a\n", 1024);
        assert_eq!(r.events, vec![(String::new(), b"a".to_vec(), true)]);
        assert!(!clean);
    }

    #[test]
    fn oversized_event_dropped_and_decoding_resumes() {
        let mut input = b"data: small\n\ndata: ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 300));
        input.extend_from_slice(b"\ndata: more\n\ndata: after\n\n");
        let (r, _) = all_splits(&input, 64);
        assert_eq!(data(&r), vec![&b"small"[..], b"after"]);
        assert_eq!(r.oversized, vec![6 + 300 + 10]);
        // Many short data lines summing over the cap are dropped too.
        let mut input = Vec::new();
        for _ in 0..40 {
            input.extend_from_slice(b"data: 0123456789\n");
        }
        input.extend_from_slice(b"\ndata: ok\n\n");
        let (r, _) = all_splits(&input, 64);
        assert_eq!(data(&r), vec![&b"ok"[..]]);
        assert_eq!(r.oversized, vec![40 * 16]);
    }

    #[test]
    fn oversized_memory_stays_bounded() {
        let mut d = SseDecoder::new(1024);
        let mut r = Rec::default();
        d.feed(b"data: ", &mut r);
        let junk = vec![b'y'; 64 * 1024];
        for _ in 0..256 {
            d.feed(&junk, &mut r);
            assert!(d.line.len() + d.data.len() <= 1024);
        }
        d.feed(b"\n\ndata: z\n\n", &mut r);
        assert_eq!(data(&r), vec![&b"z"[..]]);
        assert_eq!(r.oversized, vec![6 + 256 * 64 * 1024]);
    }

    /// The cap counts every byte of the event's lines, field names and
    /// comments included, so a line over it is dropped whether it arrives in
    /// one read or in pieces (it used to be kept whole when its value alone
    /// fit), and an event of exactly the cap is kept.
    #[test]
    fn the_cap_is_the_same_for_every_split() {
        let cap = 32;
        for len in cap - 3..=cap + 8 {
            let line = format!("data: {}", "x".repeat(len - 6));
            let input = format!("{line}\n\ndata: next\n\n");
            let (r, _) = all_splits(input.as_bytes(), cap);
            if len <= cap {
                assert_eq!(data(&r), vec![&line.as_bytes()[6..], b"next"], "{len}");
                assert!(r.oversized.is_empty());
            } else {
                assert_eq!(data(&r), vec![&b"next"[..]], "{len}");
                assert_eq!(r.oversized, vec![len as u64]);
            }
        }
        // Comments, names and ids count, in any order, across lines.
        let input = b": 0123456789\nid: 1\nevent: e\ndata: 01234\n\n";
        let (r, _) = all_splits(input, 12 + 5 + 8 + 11);
        assert_eq!(r.events, vec![("e".to_owned(), b"01234".to_vec(), false)]);
        let (r, _) = all_splits(input, 12 + 5 + 8 + 10);
        assert!(r.events.is_empty());
        assert_eq!(r.oversized, vec![36]);
        // An over-cap event cut by the end of the stream is reported too.
        let (r, clean) = all_splits(b"data: 0123456789", 8);
        assert_eq!(r.oversized, vec![16]);
        assert!(!clean);
    }

    #[test]
    fn an_event_whole_in_a_read_is_dispatched_from_it() {
        let mut d = SseDecoder::new(1024);
        let mut r = Rec::default();
        d.feed(b"event: e\ndata: {\"a\":1}\n\ndata: b\r\n\r\n", &mut r);
        assert_eq!(
            r.events,
            vec![
                ("e".to_owned(), b"{\"a\":1}".to_vec(), false),
                (String::new(), b"b".to_vec(), false)
            ]
        );
        // Neither event went through the event buffer.
        assert_eq!(d.data.capacity(), 0);
        // A data line whose blank line comes in the next read is kept.
        d.feed(b"data: c\r", &mut r);
        assert_eq!(d.data, b"c");
        d.feed(b"\r\n", &mut r);
        assert_eq!(data(&r), vec![&b"{\"a\":1}"[..], b"b", b"c"]);
    }

    mod generated {
        use super::*;
        use proptest::prelude::*;

        const LINES: &[&str] = &[
            "data: {\"a\":1}",
            "data:x",
            "data:  two spaces",
            "data",
            "data: 0123456789abcdef",
            "event: e",
            ": comment",
            "id: 7",
            "retry: 5",
            "stray",
            "",
        ];
        const ENDINGS: &[&str] = &["\n", "\r\n", "\r"];

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Whatever the lines, their endings and the cap, feeding the
            /// stream whole, split in two anywhere, or byte by byte gives
            /// the same events (`all_splits`): whole events are taken from
            /// the read in the first, never in the last.
            #[test]
            fn every_split_gives_the_same_events(
                lines in prop::collection::vec((0..LINES.len(), 0..ENDINGS.len()), 0..12),
                cap in prop::sample::select(vec![8usize, 20, 1024]),
            ) {
                let input: String = lines
                    .iter()
                    .map(|&(l, e)| format!("{}{}", LINES[l], ENDINGS[e]))
                    .collect();
                all_splits(input.as_bytes(), cap);
            }
        }
    }

    #[test]
    fn stray_lines_reported() {
        let input = b"data: a\r\n\r\n{\n  \"error\": {\n    \"code\": 499\n  }\n}\n";
        let (r, _) = all_splits(input, 1024);
        assert_eq!(data(&r), vec![&b"a"[..]]);
        assert_eq!(
            r.stray,
            vec![
                b"{".to_vec(),
                b"  \"error\": {".to_vec(),
                b"    \"code\": 499".to_vec(),
                b"  }".to_vec(),
                b"}".to_vec()
            ]
        );
    }
}
