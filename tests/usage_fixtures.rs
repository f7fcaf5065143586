//! Usage extraction against the captured provider responses in
//! `tests/fixtures/providers/` (see its README for the sidecar format).
//!
//! Every body fixture is fed whole, byte by byte and at random split points
//! (proptest), plain and compressed, and must yield the sidecar's numbers,
//! model and outcome. The usage-chunk filter is checked against the OpenAI
//! include_usage capture for arbitrary splits, and the tap is fed random bytes
//! under every format and encoding to show it never panics.
//!
//! Bedrock is skipped: Converse / ConverseStream (binary eventstream) are not
//! a dialect of the usage tap (SPEC §4 names OpenAI, Anthropic, Gemini and
//! OpenAI-compatible servers).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use tollgate::usage::{
    BodyFormat, Dialect, Observation, Outcome, TapLimits, UsageChunkFilter, UsageTap,
};

struct Fixture {
    name: String,
    body: Vec<u8>,
    expected: Value,
    dialect: Dialect,
    content_type: &'static str,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/providers")
}

fn dialect_for(provider: &str) -> Option<Dialect> {
    match provider {
        "openai" | "azure" | "openrouter" | "ollama" | "deepseek" | "groq" | "mistral" => {
            Some(Dialect::OpenAi)
        }
        "anthropic" => Some(Dialect::Anthropic),
        "gemini" => Some(Dialect::Gemini),
        // Not in scope for the tap: see the file comment.
        "bedrock" => None,
        other => panic!("fixture provider {other} has no dialect mapping"),
    }
}

fn fixtures() -> Vec<Fixture> {
    let mut out = Vec::new();
    let mut providers: Vec<_> = std::fs::read_dir(root())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    providers.sort();
    for dir in providers {
        let provider = dir.file_name().unwrap().to_string_lossy().into_owned();
        let Some(dialect) = dialect_for(&provider) else {
            continue;
        };
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for path in files {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            if file.ends_with(".expected.json") {
                continue;
            }
            let (stem, content_type) = if let Some(s) = file.strip_suffix(".sse") {
                (s, "text/event-stream")
            } else if let Some(s) = file.strip_suffix(".ndjson") {
                (s, "application/x-ndjson")
            } else if let Some(s) = file.strip_suffix(".json") {
                (s, "application/json")
            } else {
                continue;
            };
            let sidecar = dir.join(format!("{stem}.expected.json"));
            let expected: Value =
                serde_json::from_slice(&std::fs::read(&sidecar).unwrap()).unwrap();
            out.push(Fixture {
                name: format!("{provider}/{file}"),
                body: std::fs::read(&path).unwrap(),
                expected,
                dialect,
                content_type,
            });
        }
    }
    assert!(out.len() >= 30, "only {} fixtures found", out.len());
    out
}

fn tap(f: &Fixture, encoding: Option<&str>) -> UsageTap {
    UsageTap::new(
        f.dialect,
        BodyFormat::from_content_type(Some(f.content_type)),
        encoding,
        TapLimits::default(),
    )
}

fn run_pieces(f: &Fixture, encoding: Option<&str>, body: &[u8], cuts: &[usize]) -> Observation {
    let mut t = tap(f, encoding);
    let mut prev = 0;
    for &c in cuts.iter().chain(std::iter::once(&body.len())) {
        let c = c.clamp(prev, body.len());
        t.feed(&body[prev..c]);
        prev = c;
    }
    t.finish()
}

fn count(v: &Value, key: &str) -> Option<u64> {
    match v.get(key) {
        Some(Value::Null) | None => None,
        Some(n) => Some(
            n.as_u64()
                .unwrap_or_else(|| panic!("{key} is not a count: {n}")),
        ),
    }
}

/// Checks an observation against the fixture's sidecar.
fn check(f: &Fixture, o: &Observation, how: &str) {
    let e = &f.expected;
    let ctx = format!("{} ({how})", f.name);
    let u = o.usage.clone().unwrap_or_default();
    assert_eq!(
        u.input_tokens,
        count(e, "input_tokens"),
        "{ctx}: input_tokens"
    );
    assert_eq!(
        u.output_tokens,
        count(e, "output_tokens"),
        "{ctx}: output_tokens"
    );
    assert_eq!(
        u.cached_input_tokens,
        count(e, "cached_input_tokens"),
        "{ctx}: cached_input_tokens"
    );
    assert_eq!(
        u.cache_write_input_tokens,
        count(e, "cache_write_input_tokens"),
        "{ctx}: cache_write_input_tokens"
    );
    assert_eq!(
        u.reasoning_tokens,
        count(e, "reasoning_tokens"),
        "{ctx}: reasoning_tokens"
    );
    assert_eq!(
        o.model.as_deref(),
        e.get("model").and_then(Value::as_str),
        "{ctx}: model"
    );
    let no_numbers = ["input_tokens", "output_tokens"]
        .iter()
        .all(|k| count(e, k).is_none());
    if no_numbers {
        assert_eq!(o.usage, None, "{ctx}: absent usage must stay None");
    }

    let error = e.get("error").filter(|v| !v.is_null());
    let expected_outcome = match e.get("stream_outcome").and_then(Value::as_str) {
        Some("completed") | Some("completed_no_usage") => Outcome::Completed,
        Some("failed") | Some("error") => Outcome::Failed,
        Some(other) => panic!("{ctx}: unknown stream_outcome {other}"),
        // Plain JSON bodies: complete, or an error envelope.
        None if error.is_some() => Outcome::Failed,
        None => Outcome::Completed,
    };
    assert_eq!(o.outcome, expected_outcome, "{ctx}: outcome");
    if let Some(err) = error {
        let want = err
            .get("type")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| err.get("code").map(|c| c.to_string()));
        assert_eq!(o.provider_error, want, "{ctx}: provider_error");
    } else {
        assert_eq!(o.provider_error, None, "{ctx}: provider_error");
    }
    assert!(!o.parse_error, "{ctx}: parse_error");
    assert_eq!(
        o.body_bytes,
        f.body.len() as u64,
        "{ctx}: body_bytes counts the decoded body"
    );
}

#[test]
fn every_fixture_whole_and_byte_by_byte() {
    for f in fixtures() {
        let whole = run_pieces(&f, None, &f.body, &[]);
        check(&f, &whole, "whole");
        let every: Vec<usize> = (1..f.body.len()).collect();
        let bytes = run_pieces(&f, None, &f.body, &every);
        check(&f, &bytes, "byte by byte");
        assert_eq!(bytes, whole, "{}: byte by byte differs from whole", f.name);
    }
}

#[test]
fn streams_report_generated_text() {
    for f in fixtures() {
        if f.content_type == "application/json" {
            continue;
        }
        let o = run_pieces(&f, None, &f.body, &[]);
        assert!(o.output_text_bytes > 0, "{}: no text seen", f.name);
        assert!(
            o.output_text_bytes < f.body.len() as u64 / 2,
            "{}: text {} of body {}",
            f.name,
            o.output_text_bytes,
            f.body.len()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, .. ProptestConfig::default() })]

    #[test]
    fn every_fixture_at_random_splits(cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..24)) {
        for f in fixtures() {
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(f.body.len() + 1)).collect();
            cuts.sort_unstable();
            let o = run_pieces(&f, None, &f.body, &cuts);
            check(&f, &o, &format!("cuts {cuts:?}"));
        }
    }
}

fn compress(encoding: &str, data: &[u8]) -> Vec<u8> {
    match encoding {
        "gzip" | "x-gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        "deflate-raw" => {
            let mut e =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        "br" => {
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, 9, 22);
                w.write_all(data).unwrap();
            }
            out
        }
        "zstd" => zstd::encode_all(data, 3).unwrap(),
        other => panic!("no encoder for {other}"),
    }
}

const COMPRESSED: &[&str] = &[
    "anthropic/messages.stream.cache.sse",
    "openai/chat-completions.stream-include-usage.sse",
    "openai/responses.stream.sse",
    "gemini/streamGenerateContent.thinking.sse",
    "openrouter/chat-completions.stream.sse",
    "ollama/api-chat.stream.ndjson",
    "openai/embeddings.json",
];

#[test]
fn compressed_streams_give_the_same_usage() {
    let all = fixtures();
    for name in COMPRESSED {
        let f = all.iter().find(|f| f.name == *name).unwrap();
        let plain = run_pieces(f, None, &f.body, &[]);
        for (encoding, header) in [
            ("gzip", "gzip"),
            ("x-gzip", "x-gzip"),
            ("deflate", "deflate"),
            ("deflate-raw", "deflate"),
            ("br", "br"),
            ("zstd", "zstd"),
        ] {
            let packed = compress(encoding, &f.body);
            let how = encoding.to_string();
            let whole = run_pieces(f, Some(header), &packed, &[]);
            check(f, &whole, &how);
            assert_eq!(whole, plain, "{name} {encoding}");
            // Small reads, as a slow upstream would deliver them.
            let cuts: Vec<usize> = (1..packed.len()).step_by(13).collect();
            let small = run_pieces(f, Some(header), &packed, &cuts);
            assert_eq!(small, plain, "{name} {encoding} in 13-byte reads");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn compressed_at_random_splits(
        which in 0..COMPRESSED.len(),
        enc in prop::sample::select(vec!["gzip", "deflate", "deflate-raw", "br", "zstd"]),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..16),
    ) {
        let all = fixtures();
        let f = all.iter().find(|f| f.name == COMPRESSED[which]).unwrap();
        let packed = compress(enc, &f.body);
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(packed.len() + 1)).collect();
        cuts.sort_unstable();
        let header = if enc == "deflate-raw" { "deflate" } else { enc };
        let o = run_pieces(f, Some(header), &packed, &cuts);
        check(f, &o, &format!("{enc} cuts {cuts:?}"));
    }
}

/// The include_usage capture without its usage-only chunk.
fn without_usage_chunk(body: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(body).unwrap();
    let events: Vec<&str> = text.split_inclusive("\n\n").collect();
    let kept: Vec<&str> = events
        .iter()
        .copied()
        .filter(|e| !(e.contains("\"choices\":[]") && e.contains("\"usage\":{")))
        .collect();
    assert_eq!(events.len(), kept.len() + 1, "exactly one usage chunk");
    kept.concat().into_bytes()
}

fn filter_pieces(body: &[u8], cuts: &[usize], cap: usize) -> Vec<u8> {
    let mut filter = UsageChunkFilter::new(cap);
    let mut out = Vec::new();
    let mut prev = 0;
    for &c in cuts.iter().chain(std::iter::once(&body.len())) {
        let c = c.clamp(prev, body.len());
        out.extend_from_slice(&filter.push(Bytes::copy_from_slice(&body[prev..c])));
        prev = c;
    }
    out.extend_from_slice(&filter.finish());
    out
}

#[test]
fn usage_chunk_filter_on_capture_whole_and_byte_by_byte() {
    let body =
        std::fs::read(root().join("openai/chat-completions.stream-include-usage.sse")).unwrap();
    let expected = without_usage_chunk(&body);
    assert_eq!(filter_pieces(&body, &[], 1 << 20), expected);
    let every: Vec<usize> = (1..body.len()).collect();
    assert_eq!(filter_pieces(&body, &every, 1 << 20), expected);
    // The filtered stream still meters as a completed stream without usage.
    let mut t = UsageTap::new(
        Dialect::OpenAi,
        Some(BodyFormat::Sse),
        None,
        TapLimits::default(),
    );
    t.feed(&expected);
    let o = t.finish();
    assert_eq!(o.usage, None);
    assert_eq!(o.outcome, Outcome::Completed);
}

#[test]
fn usage_chunk_filter_leaves_other_streams_identical() {
    // Usage on ordinary chunks (Groq, Mistral, OpenRouter, completions with
    // choices: [] … only the completions capture has a usage-only chunk).
    for name in [
        "groq/chat-completions.stream.sse",
        "mistral/chat-completions.stream.sse",
        "openrouter/chat-completions.stream.sse",
        "openai/chat-completions.stream-no-usage.sse",
        "gemini/streamGenerateContent.sse",
    ] {
        let body = std::fs::read(root().join(name)).unwrap();
        let every: Vec<usize> = (1..body.len()).step_by(3).collect();
        assert_eq!(filter_pieces(&body, &every, 1 << 20), body, "{name}");
    }
    let body = std::fs::read(root().join("openai/completions.stream.sse")).unwrap();
    assert_eq!(
        filter_pieces(&body, &[100, 2000], 1 << 20),
        without_usage_chunk(&body)
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn usage_chunk_filter_any_split(cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..40)) {
        let body = std::fs::read(root().join("openai/chat-completions.stream-include-usage.sse")).unwrap();
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(body.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(filter_pieces(&body, &cuts, 1 << 20), without_usage_chunk(&body));
    }

    #[test]
    fn never_panics_on_random_bytes(
        data in proptest::collection::vec(any::<u8>(), 0..2048),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        dialect in prop::sample::select(vec![Dialect::OpenAi, Dialect::Anthropic, Dialect::Gemini]),
        ct in prop::sample::select(vec![None, Some(BodyFormat::Sse), Some(BodyFormat::Json), Some(BodyFormat::Ndjson)]),
        enc in prop::sample::select(vec![None, Some("gzip"), Some("deflate"), Some("br"), Some("zstd"), Some("bogus")]),
    ) {
        let limits = TapLimits { max_event_bytes: 64, max_json_value_bytes: 32 };
        let mut t = UsageTap::new(dialect, ct, enc, limits);
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
        cuts.sort_unstable();
        let mut prev = 0;
        for c in cuts.into_iter().chain(std::iter::once(data.len())) {
            t.feed(&data[prev..c]);
            prev = c;
        }
        let o = t.finish();
        prop_assert!(o.body_bytes <= 16 << 20);
        let mut filter = UsageChunkFilter::new(64);
        let mut out = filter.push(Bytes::copy_from_slice(&data)).to_vec();
        out.extend_from_slice(&filter.finish());
        prop_assert!(out.len() <= data.len());
    }

    #[test]
    fn never_panics_on_mutated_fixtures(
        which in 0..40usize,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
        cut in any::<prop::sample::Index>(),
    ) {
        let all = fixtures();
        let f = &all[which % all.len()];
        let mut body = f.body.clone();
        for (at, byte) in &flips {
            let i = at.index(body.len());
            body[i] = *byte;
        }
        let c = cut.index(body.len() + 1);
        let o = run_pieces(f, None, &body, &[c]);
        prop_assert_eq!(o.body_bytes, body.len() as u64);
    }
}

/// Regression (found by the `usage_tap` fuzz target): after a content
/// decoding failure the bytes of the failing read were not counted, so
/// `body_bytes` (the estimate's fallback) depended on the split.
#[test]
fn body_bytes_after_a_decoding_failure_does_not_depend_on_the_split() {
    let body: Vec<u8> = (0..5477u32).map(|i| (i * 7 % 251) as u8).collect();
    let feed = |pieces: &[&[u8]]| {
        let mut tap = UsageTap::new(
            Dialect::OpenAi,
            Some(BodyFormat::Json),
            Some(" GZIP "),
            TapLimits::default(),
        );
        for piece in pieces {
            tap.feed(piece);
        }
        tap.finish()
    };
    let whole = feed(&[&body]);
    let split = feed(&[&body[..10], &body[10..3000], &body[3000..]]);
    assert!(whole.parse_error && split.parse_error);
    assert_eq!(whole.body_bytes, 5477);
    assert_eq!(split.body_bytes, whole.body_bytes);
}
