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

use super::strict_json::Walk;
use super::word_scan::{quote, skip_ws, string_end, structure};

/// A token count as reported on the wire. `Count(None)` means absent, null or
/// not interpretable as a count; absent is never turned into zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Count(pub(crate) Option<u64>);

impl Count {
    pub(crate) fn get(self) -> Option<u64> {
        self.0
    }
}

/// A count that is `null` or a plain non-negative integer, read by a
/// strict walk as serde_json reads it into [`Count`]; `None` leaves the
/// value to serde_json (the shapes `Count` reads leniently, invalid JSON).
pub(crate) fn plain_count(w: &mut Walk) -> Option<Count> {
    w.nullable(Walk::count).map(Count)
}

/// An object of which only the member `name` is read, a count as
/// [`plain_count`] reads it (`Count(None)` when absent); `None` as there,
/// or when `name` comes twice (an error to serde_json).
pub(crate) fn one_plain_count(w: &mut Walk, name: &[u8]) -> Option<Count> {
    Some(w.only_member(name, plain_count)?.unwrap_or_default())
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

/// Precompiled substring searchers. Built once per process: building a
/// `Finder` costs more than searching a short event.
pub(crate) struct Finders {
    pub(crate) usage: Finder<'static>,
    pub(crate) error: Finder<'static>,
}

pub(crate) fn finders() -> &'static Finders {
    static F: OnceLock<Finders> = OnceLock::new();
    F.get_or_init(|| Finders {
        usage: Finder::new(b"\"usage\""),
        error: Finder::new(b"\"error\""),
    })
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

/// End (exclusive) of the JSON value starting at `start`, by bracket and
/// string matching; `None` if it does not end inside `buf`.
pub(crate) fn value_end(buf: &[u8], start: usize) -> Option<usize> {
    let first = *buf.get(start)?;
    match first {
        b'"' => string_end(buf, start + 1).map(|e| e + 1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            loop {
                match *buf.get(i)? {
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
                // Only quotes and brackets matter in between.
                i = structure(buf, i + 1, false)?;
            }
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

/// Walks the `"key": value` pairs of a JSON document in one pass, without
/// parsing it: a string followed by `:` (whitespace aside) is a key. `f` gets the key (raw, escapes as written) and the index of the
/// value's first byte, and returns where to resume (past a value it consumed,
/// so nothing inside that value is visited) or `None` to go on after the
/// colon. Keys at every depth are reported; callers match on the few names
/// they care about.
///
/// This is the pre-filter of the SSE extractors: one pass per event instead
/// of one substring search per key of interest, and no deserialization for
/// the events that turn out not to matter. It never reads outside `buf`; an
/// unterminated string simply ends the walk.
///
/// `#[inline]`: left to itself, the compiler inlines it into some
/// extractors and not others depending on how the crate is split, and a
/// call costs the event walk a few percent (`scripts/callgrind-usage.sh`).
#[inline]
pub(crate) fn for_each_member<F>(buf: &[u8], mut f: F)
where
    F: FnMut(&[u8], usize) -> Option<usize>,
{
    for_each_member_from(buf, 0, |_, k, v| f(k, v));
}

/// [`for_each_member`] from index `start` on, with the index of each key's
/// opening quote passed to `f` first.
///
/// What the walk does before it reaches the key whose quote is at `open`
/// depends on the bytes up to `open` and on nothing else (the byte at
/// `open` included: it tells whether the string before is a key). So a walk
/// of a document that opens with the same bytes as another one, through
/// such a quote, reaches that key exactly as the walk of the other one did,
/// and may start there if the callbacks before it had no effect
/// ([`SharedOpening`]).
#[inline]
fn for_each_member_from<F>(buf: &[u8], start: usize, mut f: F)
where
    F: FnMut(usize, &[u8], usize) -> Option<usize>,
{
    // Outside strings every `"` opens one, so the walk jumps from string to
    // string: the next quote is usually a few bytes away (`": [{"`), found a
    // word at a time, and a string's end is found past its escapes.
    let mut i = start;
    loop {
        let Some(open) = quote(buf, i) else {
            return;
        };
        let Some(close) = string_end(buf, open + 1) else {
            return;
        };
        i = close + 1;
        let colon = skip_ws(buf, i);
        if buf.get(colon) != Some(&b':') {
            continue;
        }
        let key = buf.get(open + 1..close).unwrap_or_default();
        let value = skip_ws(buf, colon + 1);
        i = colon + 1;
        if let Some(resume) = f(open, key, value) {
            i = i.max(resume);
        }
    }
}

/// The opening bytes of the last document a [`SharedOpening::walk`] went
/// through, up to and including the quote of the first key it acted on.
///
/// The events of one stream often open alike. OpenAI chat chunks repeat
/// `id`, `object`, `created`, `model`, `system_fingerprint` and the opening
/// of `choices`: about 200 of a chunk's 250 bytes, and most of the strings
/// a walk steps through. Anthropic text deltas repeat
/// `{"type":"content_block_delta","index":0,"delta":{"type":"text_delta",`.
/// A walk of an event that starts with the kept bytes would step through
/// them to the same key with nothing acted on (see
/// [`for_each_member_from`]), so it starts at that key, after one
/// comparison of the bytes.
#[derive(Debug, Default)]
pub(crate) struct SharedOpening(Vec<u8>);

impl SharedOpening {
    /// Longest opening kept, so a stream's metering state stays bounded.
    const MAX: usize = 512;

    /// [`for_each_member`] over `buf`, calling `f` only for the keys `acts`
    /// holds for and passing over the others. One `SharedOpening` must
    /// always be walked with the same `acts`: what it keeps is where that
    /// predicate first held.
    #[inline]
    pub(crate) fn walk<F>(&mut self, buf: &[u8], acts: fn(&[u8]) -> bool, mut f: F)
    where
        F: FnMut(&[u8], usize) -> Option<usize>,
    {
        let start = self.start(buf);
        let mut first = None;
        for_each_member_from(buf, start, |open, k, v| {
            if !acts(k) {
                return None;
            }
            first.get_or_insert(open);
            f(k, v)
        });
        // A walk that started at the kept quote and acted there first
        // would keep the same bytes again.
        if let Some(open) = first.filter(|&open| open != start || start == 0) {
            if open < Self::MAX {
                self.0.clear();
                self.0
                    .extend_from_slice(buf.get(..=open).unwrap_or_default());
            }
        }
    }

    /// Where a walk of `buf` may start: at the kept quote if `buf` opens
    /// with the kept bytes.
    pub(super) fn start(&self, buf: &[u8]) -> usize {
        match self.0.len() {
            n if n > 0 && buf.starts_with(&self.0) => n - 1,
            _ => 0,
        }
    }
}

/// For [`for_each_member`] callbacks: the value at `v` is present and not
/// `null`.
pub(crate) fn non_null_at(buf: &[u8], v: usize) -> bool {
    match buf.get(v..) {
        Some(r) => !r.is_empty() && !r.starts_with(b"null"),
        None => false,
    }
}

/// For [`for_each_member`] callbacks: if the value at `v` is a string, its
/// raw length and the index just past it.
pub(crate) fn string_at(buf: &[u8], v: usize) -> Option<(u64, usize)> {
    if buf.get(v) != Some(&b'"') {
        return None;
    }
    let end = string_end(buf, v + 1)?;
    Some(((end - v - 1) as u64, end + 1))
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
    fn value_end_matches_brackets_and_strings() {
        let doc = br#"{"p": [1,{"q":"]}"}], "m": "g-2", "n": 12}"#;
        assert_eq!(value_end(doc, 0), Some(doc.len()));
        assert_eq!(value_end(doc, 6), Some(20));
        assert_eq!(value_end(br#""a\"b" x"#, 0), Some(6));
        assert_eq!(value_end(b"12}", 0), Some(2));
        assert_eq!(value_end(br#"{"p": [1"#, 0), None);
    }

    #[test]
    fn member_walk() {
        let doc = br#"{"id":"a:b","usage" : null,"choices":[{"delta":{"content":"x: \"y\": z"}}],"error":{"t":1}}"#;
        let mut seen = Vec::new();
        for_each_member(doc, |k, v| {
            seen.push(String::from_utf8_lossy(k).into_owned());
            if k == b"content" {
                let (n, next) = string_at(doc, v)?;
                assert_eq!(n, 11);
                return Some(next);
            }
            if k == b"usage" {
                assert!(!non_null_at(doc, v));
            }
            if k == b"error" {
                assert!(non_null_at(doc, v));
            }
            None
        });
        assert_eq!(
            seen,
            ["id", "usage", "choices", "delta", "content", "error", "t"]
        );
    }

    #[test]
    fn member_walk_ignores_escaped_quotes() {
        let doc = br#"{"s":"say \"k\": 1 \\","k2":{"k3":"\\"}}"#;
        let mut seen = Vec::new();
        for_each_member(doc, |k, _| {
            seen.push(String::from_utf8_lossy(k).into_owned());
            None
        });
        assert_eq!(seen, ["s", "k2", "k3"]);
    }

    #[test]
    fn shared_opening_starts_only_where_the_whole_walk_would_arrive() {
        fn acts(k: &[u8]) -> bool {
            k == b"k"
        }
        let keys = |shared: &mut SharedOpening, doc: &[u8]| {
            let mut seen = Vec::new();
            shared.walk(doc, acts, |_, v| {
                seen.push(v);
                None
            });
            seen
        };
        let mut shared = SharedOpening::default();
        assert_eq!(keys(&mut shared, br#"{"id":"a","k":1}"#), [14]);
        assert_eq!(shared.start(br#"{"id":"a","k":2}"#), 10);
        assert_eq!(keys(&mut shared, br#"{"id":"a","k":2}"#), [14]);
        assert_eq!(shared.start(br#"{"id":"b","k":2}"#), 0);
        // The kept quote is part of the comparison: here the byte after the
        // first `"k"` makes it a key, which a walk from that byte would miss.
        assert_eq!(keys(&mut shared, br#"["k""k":1]"#), [8]);
        assert_eq!(shared.start(br#"["k":1]"#), 0);
        assert_eq!(keys(&mut shared, br#"["k":1]"#), [5]);
    }

    /// The walk as first written: a `memchr` iterator over every quote,
    /// a close quote being one not preceded by an odd run of backslashes.
    fn walk_by_quote_iterator(buf: &[u8], skip: fn(&[u8]) -> bool) -> Vec<(Vec<u8>, usize)> {
        let escaped = |q: usize| {
            let before = buf.get(..q).unwrap_or_default();
            before.iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 1
        };
        let mut seen = Vec::new();
        let mut quotes = memchr::memchr_iter(b'"', buf);
        let mut resume_at = 0usize;
        while let Some(open) = quotes.next() {
            if open < resume_at {
                continue;
            }
            let Some(close) = quotes.by_ref().find(|&q| !escaped(q)) else {
                break;
            };
            let colon = skip_ws(buf, close + 1);
            if buf.get(colon) != Some(&b':') {
                continue;
            }
            let key = buf.get(open + 1..close).unwrap_or_default();
            let value = skip_ws(buf, colon + 1);
            seen.push((key.to_vec(), value));
            if skip(key) {
                if let Some(end) = value_end(buf, value) {
                    resume_at = end;
                }
            }
        }
        seen
    }

    fn skips(key: &[u8]) -> bool {
        key.first() == Some(&b'a')
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

        /// Keys, value positions and skipped values (those of keys starting
        /// with `a`) as the quote-iterator walk saw them, on any bytes.
        #[test]
        fn member_walk_agrees_with_the_quote_iterator_walk(
            raw in proptest::collection::vec(
                proptest::sample::select(b"\"\\{}[],: ak".to_vec()),
                0..120,
            ),
        ) {
            let mut seen = Vec::new();
            for_each_member(&raw, |k, v| {
                seen.push((k.to_vec(), v));
                if skips(k) { value_end(&raw, v) } else { None }
            });
            proptest::prop_assert_eq!(seen, walk_by_quote_iterator(&raw, skips));
        }

        /// A [`SharedOpening`] walk sees the keys, value positions and
        /// skips a whole walk sees, over documents that open with the
        /// same bytes (or with one of a few, in any order), on any bytes.
        #[test]
        fn shared_opening_walks_agree_with_whole_walks(
            openings in proptest::collection::vec(
                proptest::collection::vec(proptest::sample::select(b"\"\\{}[],: ak".to_vec()), 0..60),
                1..4,
            ),
            docs in proptest::collection::vec(
                (
                    proptest::prelude::any::<proptest::sample::Index>(),
                    proptest::collection::vec(proptest::sample::select(b"\"\\{}[],: ak".to_vec()), 0..30),
                ),
                1..8,
            ),
        ) {
            fn acts(k: &[u8]) -> bool {
                k.contains(&b'k')
            }
            let mut shared = SharedOpening::default();
            for (which, tail) in docs {
                let doc = [openings[which.index(openings.len())].as_slice(), &tail].concat();
                let mut whole = Vec::new();
                for_each_member(&doc, |k, v| {
                    if !acts(k) {
                        return None;
                    }
                    whole.push((k.to_vec(), v));
                    if skips(k) { value_end(&doc, v) } else { None }
                });
                let mut walked = Vec::new();
                shared.walk(&doc, acts, |k, v| {
                    walked.push((k.to_vec(), v));
                    if skips(k) { value_end(&doc, v) } else { None }
                });
                proptest::prop_assert_eq!(walked, whole);
            }
        }
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
