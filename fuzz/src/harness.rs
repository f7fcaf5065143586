//! The bodies of the fuzz targets, shared by the libFuzzer binaries of this
//! crate (`cargo +nightly fuzz run <target>`) and by the main crate's
//! stable smoke test (`tests/fuzz_smoke.rs`, which includes this file), so CI
//! without a nightly toolchain runs the same checks over the corpus and a
//! bounded number of mutated inputs. Every function must return normally for
//! any input: a panic or a failed assertion is a finding.
//!
//! Only safe code and the main crate's public API here; the counting
//! allocator that measures the tap's heap stays in `lib.rs`.

use std::io::Write;
use std::path::PathBuf;

use bytes::Bytes;
use tollgate::usage::{BodyFormat, Dialect, TapLimits, UsageChunkFilter, UsageTap};

/// A tiny deterministic generator for split points.
struct Splits(u32);

impl Splits {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }
    /// A chunk length: mostly 1..=16, sometimes up to 4 KiB.
    fn len(&mut self, rest: usize) -> usize {
        let r = self.next();
        let n = if r & 3 == 0 {
            1 + (r >> 8) as usize % 4096
        } else {
            1 + (r >> 8) as usize % 16
        };
        n.min(rest)
    }
}

const CONTENT_TYPES: [Option<&str>; 10] = [
    None,
    Some("text/event-stream"),
    Some("text/event-stream; charset=utf-8"),
    Some("application/json"),
    Some("application/x-ndjson"),
    Some("application/jsonl"),
    Some("application/problem+json"),
    Some("text/plain"),
    Some("TEXT/EVENT-STREAM"),
    Some(""),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Codec {
    None,
    Gzip,
    Zlib,
    RawDeflate,
    Brotli,
    Zstd,
}

/// (Content-Encoding header, how to produce a valid body for it).
const ENCODINGS: [(Option<&str>, Codec); 12] = [
    (None, Codec::None),
    (Some("identity"), Codec::None),
    (Some("gzip"), Codec::Gzip),
    (Some("x-gzip"), Codec::Gzip),
    (Some("deflate"), Codec::Zlib),
    (Some("deflate"), Codec::RawDeflate),
    (Some("br"), Codec::Brotli),
    (Some("zstd"), Codec::Zstd),
    (Some("gzip, br"), Codec::Gzip),
    (Some("compress"), Codec::None),
    (Some(" GZIP "), Codec::Gzip),
    (Some(""), Codec::None),
];

/// Heap the decoder of `codec` may hold on top of the parser: its window
/// plus state (module docs of `usage::decode`: 32 KiB for gzip/deflate,
/// 16 MiB for brotli, 8 MiB for zstd).
fn decoder_allowance(codec: Codec) -> usize {
    match codec {
        Codec::None => 0,
        Codec::Gzip | Codec::Zlib | Codec::RawDeflate => 256 << 10,
        Codec::Brotli => 17 << 20,
        Codec::Zstd => 9 << 20,
    }
}

fn compress(codec: Codec, plain: &[u8]) -> Vec<u8> {
    let level = flate2::Compression::fast();
    match codec {
        Codec::None => plain.to_vec(),
        Codec::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), level);
            e.write_all(plain).unwrap();
            e.finish().unwrap()
        }
        Codec::Zlib => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), level);
            e.write_all(plain).unwrap();
            e.finish().unwrap()
        }
        Codec::RawDeflate => {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), level);
            e.write_all(plain).unwrap();
            e.finish().unwrap()
        }
        Codec::Brotli => {
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, 1, 16);
                w.write_all(plain).unwrap();
            }
            out
        }
        Codec::Zstd => zstd::bulk::compress(plain, 1).unwrap(),
    }
}

/// The usage reader: `data` = 8 header bytes (dialect, content type,
/// encoding, mode, limits, repeat, split seed ×2) then the body. In mode bit
/// 0 the body is compressed with the announced coding first (so decoders see
/// valid streams); bit 1 truncates it; otherwise raw bytes reach the decoder.
///
/// Checks: no panic; live heap within limits + decoder window after every
/// read (when `live_bytes` measures the heap); the result does not depend
/// on where the body was split.
pub fn usage_tap(data: &[u8], live_bytes: Option<fn() -> usize>) {
    if data.len() < 8 {
        return;
    }
    let (head, payload) = data.split_at(8);
    let dialect = [Dialect::OpenAi, Dialect::Anthropic, Dialect::Gemini][head[0] as usize % 3];
    let content_type = CONTENT_TYPES[head[1] as usize % CONTENT_TYPES.len()];
    let (encoding, codec) = ENCODINGS[head[2] as usize % ENCODINGS.len()];
    let mode = head[3];
    let limits = TapLimits {
        max_event_bytes: 16 << (head[4] & 7),
        max_json_value_bytes: 16 << ((head[4] >> 3) & 7),
    };
    let repeat = 1 + (head[5] % 8) as usize;
    let seed = u32::from(u16::from_le_bytes([head[6], head[7]])) | 0x1_0000;

    let mut body = payload.repeat(repeat);
    if mode & 1 == 1 {
        body = compress(codec, &body);
    }
    if mode & 2 == 2 && body.len() > 1 {
        body.truncate(seed as usize % body.len());
    }

    let whole = {
        let mut tap = UsageTap::new(
            dialect,
            BodyFormat::from_content_type(content_type),
            encoding,
            limits,
        );
        tap.feed(&body);
        tap.finish()
    };

    let bound = decoder_allowance(codec)
        + 4 * (limits.max_event_bytes + limits.max_json_value_bytes)
        + (256 << 10);
    let heap = || live_bytes.map_or(0, |f| f());
    let before = heap();
    let mut tap = UsageTap::new(
        dialect,
        BodyFormat::from_content_type(content_type),
        encoding,
        limits,
    );
    let mut splits = Splits(seed);
    let mut rest = &body[..];
    while !rest.is_empty() {
        let n = splits.len(rest.len());
        tap.feed(&rest[..n]);
        rest = &rest[n..];
        if splits.next() & 7 == 0 {
            let _ = tap.progress();
            let _ = tap.format();
        }
        let held = heap().saturating_sub(before);
        assert!(
            held <= bound,
            "tap holds {held} bytes, over the bound {bound} (limits {limits:?})"
        );
    }
    let split = tap.finish();
    if mode & 1 == 0 && codec != Codec::None {
        // Raw bytes under a real coding: a corrupt compressed stream. How
        // much a decoder emits from the read in which it notices the
        // corruption depends on the reads (flate2, brotli and zstd hold that
        // output back), so what was parsed from it may differ; the size
        // reported (the raw size once decoding failed) and the error flag
        // may not.
        assert_eq!(
            (whole.body_bytes, whole.parse_error),
            (split.body_bytes, split.parse_error),
            "size or error flag of a corrupt body depends on the split"
        );
    } else {
        assert_eq!(
            whole, split,
            "observation depends on where the body was split"
        );
    }
}

/// The usage-chunk filter: `data` = 3 header bytes (cap, split seed ×2) then
/// the stream. Checks: no panic; output never longer than input; a stream
/// without `usage` passes byte-identical; when no event can reach the cap the
/// output does not depend on the split points.
pub fn chunk_filter(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let (head, stream) = data.split_at(3);
    let cap = if head[0] & 0x80 == 0 {
        1 + (head[0] as usize & 0x7f) * 8
    } else {
        usize::MAX / 2
    };
    let seed = u32::from(u16::from_le_bytes([head[1], head[2]])) | 0x1_0000;

    let run = |split: bool| -> Vec<u8> {
        let mut filter = UsageChunkFilter::new(cap);
        let mut out = Vec::new();
        let mut splits = Splits(seed);
        let mut rest = stream;
        while !rest.is_empty() {
            let n = if split {
                splits.len(rest.len())
            } else {
                rest.len()
            };
            out.extend_from_slice(&filter.push(Bytes::copy_from_slice(&rest[..n])));
            rest = &rest[n..];
        }
        out.extend_from_slice(&filter.finish());
        out
    };
    let whole = run(false);
    let split = run(true);
    assert!(split.len() <= stream.len(), "the filter adds bytes");
    assert!(whole.len() <= stream.len(), "the filter adds bytes");
    if !stream.windows(5).any(|w| w == b"usage") {
        assert_eq!(split, stream, "a stream without usage must pass unchanged");
    }
    if cap > stream.len() {
        assert_eq!(whole, split, "output depends on where the stream was split");
    }
}

/// The config loader on arbitrary text (never reads files the text does not
/// name; the base directory does not exist).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let base = PathBuf::from("/nonexistent/tollgate-fuzz");
    if let Err(e) = tollgate::config::Config::from_toml(text, "fuzz.toml", base) {
        let _ = e.to_string();
    }
}

/// Both pricing loaders: byte 0 picks TOML or LiteLLM JSON.
pub fn pricing(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    use tollgate::pricing::PriceTable;
    let result = if which & 1 == 0 {
        PriceTable::from_toml_str(text, "fuzz.toml")
    } else {
        PriceTable::from_litellm_json_str(text, "fuzz.json")
    };
    match result {
        Ok(table) => {
            let _ = format!("{table:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// Attribution: `data` split at 0xFF into the URL segment and the six
/// header values (a value may be given twice; invalid header bytes are
/// skipped as `http` would refuse them before tollgate sees them).
pub fn attribution(data: &[u8]) {
    use tollgate::proxy::attribution::{extract, UrlAttribution};
    let mut parts = data.split(|&b| b == 0xff);
    let segment = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let url = UrlAttribution::parse(&segment).ok();
    let names = default_headers();
    let mut headers = http::HeaderMap::new();
    for (i, name) in names.all().into_iter().enumerate() {
        let Some(value) = parts.next() else { break };
        if value.first() == Some(&0xfe) {
            continue;
        }
        if let Ok(v) = http::HeaderValue::from_bytes(value) {
            headers.append(name.clone(), v.clone());
            if i % 2 == 1 && value.len() % 7 == 3 {
                headers.append(name.clone(), v);
            }
        }
    }
    match extract(&headers, &names, url.as_ref()) {
        Ok(a) => {
            if let Some(run) = &a.run_id {
                assert!(!run.is_empty() && run.len() <= 128);
            }
            assert!(!a.release.is_empty() && a.release.len() <= 64);
            assert!(!a.request_type.is_empty() && a.request_type.len() <= 64);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fn default_headers() -> tollgate::config::AttributionHeaders {
    thread_local! {
        static NAMES: tollgate::config::AttributionHeaders =
            tollgate::config::Config::from_toml("", "defaults", PathBuf::from("."))
                .expect("the empty config is valid")
                .attribution;
    }
    NAMES.with(Clone::clone)
}

/// Target checks and the URL form: byte 0 picks method, version and local
/// address; the rest is the request target. A target that passes must have
/// no `.`/`..`/empty inner segment and no encoded `/`, `\` or NUL.
pub fn route(data: &[u8]) {
    use tollgate::proxy::route::{check_target, split_url_attribution};
    let Some((&sel, target)) = data.split_first() else {
        return;
    };
    let Ok(uri) = http::Uri::try_from(target) else {
        return;
    };
    let method = [
        http::Method::GET,
        http::Method::POST,
        http::Method::CONNECT,
        http::Method::OPTIONS,
    ][sel as usize & 3]
        .clone();
    let version = [
        http::Version::HTTP_11,
        http::Version::HTTP_2,
        http::Version::HTTP_10,
        http::Version::HTTP_3,
    ][(sel as usize >> 2) & 3];
    let local: Option<std::net::SocketAddr> = match (sel >> 4) & 3 {
        0 => None,
        1 => Some(([127, 0, 0, 1], 8787).into()),
        2 => Some((std::net::Ipv6Addr::LOCALHOST, 8787).into()),
        _ => Some(([10, 0, 0, 1], 80).into()),
    };
    let Ok(req) = http::Request::builder()
        .method(method)
        .version(version)
        .uri(uri)
        .body(())
    else {
        return;
    };
    let (parts, ()) = req.into_parts();
    if check_target(&parts, local).is_err() {
        return;
    }
    let path = parts.uri.path();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    for (i, seg) in segments.iter().enumerate() {
        let decoded = percent_decode(seg);
        assert!(
            decoded != b"." && decoded != b"..",
            "dot segment passed: {path}"
        );
        assert!(
            !decoded.iter().any(|b| matches!(b, b'/' | b'\\' | 0)),
            "encoded separator passed: {path}"
        );
        assert!(
            !seg.is_empty() || i + 1 == segments.len(),
            "empty segment passed: {path}"
        );
    }
    if let Ok((_, rest)) = split_url_attribution(path) {
        assert!(rest.starts_with('/'), "remainder must be a path: {rest}");
    }
}

/// Independent percent-decoder (the oracle must not share code with the
/// checked function).
fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}
