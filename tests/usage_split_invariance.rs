//! The usage tap must observe the same thing however the body is split into
//! reads: a proxy does not choose where TCP, TLS or the upstream cut a stream.
//!
//! The property is checked on generated event streams whose events sit on
//! both sides of `max_event_bytes` (content deltas, long comment lines, event
//! names, multi-line data, the usage chunk and the terminator, with `\n`,
//! `\r\n` and `\r` line endings), each fed whole, byte by byte and at random
//! split points. An event over the cap is dropped and counted in
//! `output_text_bytes` with all its bytes (see `usage::sse`); before that rule
//! the count depended on whether a line over the cap arrived in one read.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use tollgate::usage::{BodyFormat, Dialect, Observation, TapLimits, UsageTap};

fn limits(max_event_bytes: usize) -> TapLimits {
    TapLimits {
        max_event_bytes,
        ..TapLimits::default()
    }
}

/// Feeds `body` cut at `cuts` (sorted offsets; out-of-range ones clamp).
fn observe(dialect: Dialect, limits: TapLimits, body: &[u8], cuts: &[usize]) -> Observation {
    let mut tap = UsageTap::new(dialect, Some(BodyFormat::Sse), None, limits);
    let mut prev = 0;
    for &c in cuts.iter().chain(std::iter::once(&body.len())) {
        let c = c.clamp(prev, body.len());
        tap.feed(&body[prev..c]);
        prev = c;
    }
    tap.finish()
}

fn byte_by_byte(dialect: Dialect, limits: TapLimits, body: &[u8]) -> Observation {
    let mut tap = UsageTap::new(dialect, Some(BodyFormat::Sse), None, limits);
    for b in body.chunks(1) {
        tap.feed(b);
    }
    tap.finish()
}

fn openai_delta(text_len: usize) -> Vec<u8> {
    let mut event = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"".to_vec();
    event.extend(std::iter::repeat_n(b'x', text_len));
    event.extend_from_slice(b"\"}}]}\n\n");
    event
}

const OPENAI_END: &[u8] = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5}}\n\ndata: [DONE]\n\n";

/// The proptest finding, at the default 1 MiB cap: a data line whose value
/// fits the cap but whose whole line (`data: ` included) does not was decoded
/// when it arrived in one read and dropped when it arrived in pieces, so its
/// text counted or not depending on the split.
#[test]
fn a_line_just_over_the_default_cap_counts_the_same_for_every_split() {
    let cap = TapLimits::default().max_event_bytes;
    // The line without its text, and without "\n\n".
    let overhead = openai_delta(0).len() - 2;
    // Lines of cap - 1 to cap + 6 bytes: the ones from cap + 1 to cap + 5
    // were decoded whole but dropped in pieces.
    for text_len in (cap - overhead - 1)..=(cap - overhead + 6) {
        let mut body = openai_delta(text_len);
        body.extend_from_slice(OPENAI_END);
        let whole = observe(Dialect::OpenAi, TapLimits::default(), &body, &[]);
        let halves = observe(
            Dialect::OpenAi,
            TapLimits::default(),
            &body,
            &[body.len() / 2],
        );
        let bytes = byte_by_byte(Dialect::OpenAi, TapLimits::default(), &body);
        assert_eq!(whole, halves, "text of {text_len} bytes, two reads");
        assert_eq!(whole, bytes, "text of {text_len} bytes, 1-byte reads");
        assert_eq!(whole.usage.unwrap().output_tokens, Some(5));
    }
}

/// Over the cap, the event is dropped and every byte of it counts as output
/// text: the tap cannot tell framing from text there, and the estimate errs
/// high rather than low (see `usage::estimate`).
#[test]
fn an_event_over_the_cap_counts_all_its_bytes_as_text() {
    let cap = 256;
    let small = openai_delta(10);
    let big = openai_delta(1000);
    let mut body = small.clone();
    body.extend_from_slice(&big);
    body.extend_from_slice(b"data: {\"choices\":[{\"delta\":{}}]}\n\n");
    let whole = observe(Dialect::OpenAi, limits(cap), &body, &[]);
    assert_eq!(whole, byte_by_byte(Dialect::OpenAi, limits(cap), &body));
    assert!(whole.parse_error);
    assert_eq!(whole.output_text_bytes, 10 + (big.len() as u64 - 2));
}

/// Comment lines count towards the cap whether they arrive whole or not.
#[test]
fn a_long_comment_inside_an_event_counts_the_same_for_every_split() {
    let cap = 128;
    let mut body = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n: ".to_vec();
    body.extend(std::iter::repeat_n(b'.', 100));
    body.extend_from_slice(b"\n\n");
    body.extend_from_slice(OPENAI_END);
    let whole = observe(Dialect::OpenAi, limits(cap), &body, &[]);
    for cut in 0..=body.len() {
        assert_eq!(
            observe(Dialect::OpenAi, limits(cap), &body, &[cut]),
            whole,
            "split at {cut}"
        );
    }
}

/// Fuzz finding (`usage_tap`): a body announced as gzip that is not. Fed
/// whole, the failing read was all of it; fed with a 6-byte first read, the
/// gzip header parser swallowed those bytes without error and without
/// output, the next read failed, and `body_bytes` (the estimate's fallback
/// when no text was seen) came out 6 bytes short. A body that cannot be
/// decoded now counts its raw size.
#[test]
fn body_bytes_of_an_undecodable_body_does_not_depend_on_the_split() {
    let body =
        b"50236cbd\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"He\"}}]}\n\n".repeat(6);
    let observe = |cuts: &[usize]| {
        let mut tap = UsageTap::new(
            Dialect::OpenAi,
            Some(BodyFormat::Sse),
            Some("gzip"),
            limits(1024),
        );
        let mut prev = 0;
        for &c in cuts.iter().chain(std::iter::once(&body.len())) {
            tap.feed(&body[prev..c]);
            prev = c;
        }
        tap.finish()
    };
    let whole = observe(&[]);
    assert!(whole.parse_error);
    assert_eq!(whole.body_bytes, body.len() as u64);
    for first in 1..=12 {
        assert_eq!(observe(&[first]), whole, "first read of {first} bytes");
    }
}

/// Smoke-test finding (`tests/fuzz_smoke.rs`): whitespace before the first
/// byte of a body reached the parser only when it arrived in the same read as
/// that byte, so it counted in an over-cap event, or not, by the split.
#[test]
fn leading_whitespace_counts_the_same_for_every_split() {
    let mut body = b" \t\n".to_vec();
    body.extend_from_slice(b"data: ");
    body.extend(std::iter::repeat_n(b'x', 40));
    body.extend_from_slice(b"\n\n");
    let whole = observe(Dialect::OpenAi, limits(32), &body, &[]);
    assert_eq!(whole.output_text_bytes, 46);
    for cut in 1..=4 {
        assert_eq!(
            observe(Dialect::OpenAi, limits(32), &body, &[cut]),
            whole,
            "split at {cut}"
        );
    }
}

/// One event of a generated stream.
#[derive(Debug, Clone)]
enum Piece {
    /// A text delta of this many bytes.
    Delta(usize),
    /// A comment line of this many bytes inside the next event.
    Comment(usize),
    /// A delta split over two `data:` lines, with an `event:` name line.
    Named(usize, usize),
    /// An `id:` line.
    Id,
    /// The usage chunk.
    Usage,
}

fn piece(cap: usize) -> impl Strategy<Value = Piece> {
    // Sizes cluster around the cap, where the decoder's size checks sit.
    let near = move || cap.saturating_sub(80)..cap + 16;
    prop_oneof![
        3 => (0..cap / 2).prop_map(Piece::Delta),
        3 => near().prop_map(Piece::Delta),
        2 => near().prop_map(Piece::Comment),
        2 => (near(), 0..32usize).prop_map(|(a, b)| Piece::Named(a, b)),
        1 => Just(Piece::Id),
        1 => Just(Piece::Usage),
    ]
}

fn text(n: usize) -> String {
    "abcdefghij".chars().cycle().take(n).collect()
}

/// Renders the pieces in `dialect`'s shape with line ending `eol`.
fn render(dialect: Dialect, pieces: &[Piece], eol: &str, terminate: bool) -> Vec<u8> {
    let mut s = String::new();
    let delta = |t: &str| {
        match dialect {
        Dialect::Anthropic => format!(
            "{{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{t}\"}}}}"
        ),
        _ => format!("{{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{t}\"}}}}]}}"),
    }
    };
    let name = match dialect {
        Dialect::Anthropic => "content_block_delta",
        _ => "message",
    };
    if dialect == Dialect::Anthropic {
        s += &format!("event: message_start{eol}data: {{\"type\":\"message_start\",\"message\":{{\"model\":\"m\",\"usage\":{{\"input_tokens\":7,\"output_tokens\":1}}}}}}{eol}{eol}");
    }
    for p in pieces {
        match p {
            Piece::Delta(n) => {
                if dialect == Dialect::Anthropic {
                    s += &format!("event: {name}{eol}");
                }
                s += &format!("data: {}{eol}{eol}", delta(&text(*n)));
            }
            Piece::Comment(n) => s += &format!(": {}{eol}", text(*n)),
            Piece::Named(a, b) => {
                // The JSON is cut between the two data lines; joined with
                // "\n" it is still one valid document.
                let d = delta(&text(*a));
                let (head, tail) = d.split_at(d.len() - (*b).min(d.len()));
                s += &format!("event: {name}{eol}data: {head}{eol}data: {tail}{eol}{eol}");
            }
            Piece::Id => s += &format!("id: 42{eol}"),
            Piece::Usage => match dialect {
                Dialect::Anthropic => s += &format!("event: message_delta{eol}data: {{\"type\":\"message_delta\",\"delta\":{{}},\"usage\":{{\"output_tokens\":9}}}}{eol}{eol}"),
                _ => s += &format!("data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":7,\"completion_tokens\":9}}}}{eol}{eol}"),
            },
        }
    }
    if terminate {
        match dialect {
            Dialect::Anthropic => {
                s += &format!(
                    "event: message_stop{eol}data: {{\"type\":\"message_stop\"}}{eol}{eol}"
                )
            }
            _ => s += &format!("data: [DONE]{eol}{eol}"),
        }
    }
    s.into_bytes()
}

/// A body that shows as text when a case fails.
#[derive(Clone)]
struct Body(Vec<u8>);

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

fn stream() -> impl Strategy<Value = (Dialect, usize, Body)> {
    (
        prop_oneof![Just(Dialect::OpenAi), Just(Dialect::Anthropic)],
        prop_oneof![Just(96usize), Just(160), Just(300), 64..512usize],
        prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
        any::<bool>(),
    )
        .prop_flat_map(|(dialect, cap, eol, terminate)| {
            proptest::collection::vec(piece(cap), 1..8).prop_map(move |pieces| {
                (dialect, cap, Body(render(dialect, &pieces, eol, terminate)))
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn observation_does_not_depend_on_the_split(
        (dialect, cap, body) in stream(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..24),
    ) {
        let body = body.0;
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(body.len() + 1)).collect();
        cuts.sort_unstable();
        let whole = observe(dialect, limits(cap), &body, &[]);
        prop_assert_eq!(&observe(dialect, limits(cap), &body, &cuts), &whole, "cuts {:?}", cuts);
        prop_assert_eq!(&byte_by_byte(dialect, limits(cap), &body), &whole, "1-byte reads");
    }
}
