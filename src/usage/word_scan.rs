//! Byte searches of the JSON walks (and of the JSON log line's escaping)
//! done eight bytes at a time: a `u64`
//! loaded from the input is tested against every byte of interest at once
//! with a few integer operations, instead of one compare-and-branch (or
//! table lookup) per byte. For short distances (keys, ids, indentation)
//! this is cheaper than both a byte loop and setting up `memchr`'s vector
//! search, which takes over for long runs.
//!
//! Each test marks a byte equal to a needle by setting its high bit. The
//! lowest marked byte is always a real match (a false mark can only appear
//! above a real one, through the subtraction's borrow), which is all a
//! search for the first match needs.
//!
//! The strict walk through a string ([`strict_string_end`]) stops at every
//! escape, and escapes can come every few bytes; it marks sixteen bytes at
//! a time with vector compares instead (the `wide` crate), exactly, so that
//! all the stops of a block are taken from one test.

use memchr::{memchr, memchr2};
use wide::u8x16;

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;
/// `b | 0x20` turns `[` into `{` and `]` into `}`, and no other byte into
/// either.
const CASE: u64 = 0x2020_2020_2020_2020;

/// Words searched before a long string is left to `memchr2`.
const SHORT_WORDS: usize = 4;

/// The eight bytes at `buf[i..]`, first byte lowest.
#[inline]
fn word(buf: &[u8], i: usize) -> Option<u64> {
    let bytes: [u8; 8] = buf.get(i..i.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// Before masking with `HIGHS`: high bit of each byte of `w` equal to `b`.
#[inline]
fn eq(w: u64, b: u8) -> u64 {
    let t = w ^ (ONES * u64::from(b));
    t.wrapping_sub(ONES) & !t
}

/// Before masking with `HIGHS`: high bit of each byte of `w` below 0x20
/// (exact for the lowest such byte, as in [`eq`]).
#[inline]
fn below_space(w: u64) -> u64 {
    w.wrapping_sub(ONES * 0x20) & !w
}

/// Index of the first marked byte of a word read at `i`.
#[inline]
fn first(i: usize, marks: u64) -> usize {
    i + (marks.trailing_zeros() / 8) as usize
}

/// The first `SHORT_WORDS` words of a search from `i`, eight bytes at a
/// time: `Ok` with the first byte `marks` marks (with less than a word
/// left, the first byte `is_stop` accepts), `Err` with where the long search
/// takes over, `None` when nothing matches before the end of `buf`.
#[inline]
fn short_search(
    buf: &[u8],
    mut i: usize,
    marks: impl Fn(u64) -> u64,
    is_stop: impl Fn(u8) -> bool,
) -> Option<Result<usize, usize>> {
    for _ in 0..SHORT_WORDS {
        let Some(w) = word(buf, i) else {
            let p = buf.get(i..)?.iter().position(|&b| is_stop(b))?;
            return Some(Ok(i + p));
        };
        let m = marks(w);
        if m != 0 {
            return Some(Ok(first(i, m)));
        }
        i += 8;
    }
    Some(Err(i))
}

/// Index of the first `"` or `\` at or after `i`.
#[inline]
pub(crate) fn quote_or_backslash(buf: &[u8], i: usize) -> Option<usize> {
    let marks = |w| (eq(w, b'"') | eq(w, b'\\')) & HIGHS;
    match short_search(buf, i, marks, |b| b == b'"' || b == b'\\')? {
        Ok(at) => Some(at),
        Err(i) => memchr2(b'"', b'\\', buf.get(i..)?).map(|p| i + p),
    }
}

/// Index of the first `"` at or after `i`: the next string of a member walk,
/// usually a few bytes away (`": [{"`), where setting up `memchr` costs
/// more than the search.
#[inline]
pub(crate) fn quote(buf: &[u8], i: usize) -> Option<usize> {
    match short_search(buf, i, |w| eq(w, b'"') & HIGHS, |b| b == b'"')? {
        Ok(at) => Some(at),
        Err(i) => memchr(b'"', buf.get(i..)?).map(|p| i + p),
    }
}

/// A byte that a JSON string cannot hold as is: `"`, `\` or a control
/// character (below 0x20).
#[inline]
fn is_string_stop(b: u8) -> bool {
    b == b'"' || b == b'\\' || b < 0x20
}

/// High bit of each byte of `w` for which [`is_string_stop`] holds.
#[inline]
fn string_stops(w: u64) -> u64 {
    (eq(w, b'"') | eq(w, b'\\') | below_space(w)) & HIGHS
}

/// Index of the first byte at or after `i` that a JSON string must escape
/// ([`is_string_stop`]).
#[inline]
pub(crate) fn json_escape(buf: &[u8], mut i: usize) -> Option<usize> {
    while let Some(w) = word(buf, i) {
        let marks = string_stops(w);
        if marks != 0 {
            return Some(first(i, marks));
        }
        i += 8;
    }
    let p = buf.get(i..)?.iter().position(|&b| is_string_stop(b))?;
    Some(i + p)
}

/// The same search as [`json_escape`], for a strict walk through string
/// contents, which may be long (prompts): the first words eight bytes at a
/// time, then `memchr2` for the quote or backslash and one vector check of
/// the run before it for control bytes.
#[inline]
pub(crate) fn string_stop(buf: &[u8], i: usize) -> Option<usize> {
    let i = match short_search(buf, i, string_stops, is_string_stop)? {
        Ok(at) => return Some(at),
        Err(i) => i,
    };
    let tail = buf.get(i..)?;
    let run = memchr2(b'"', b'\\', tail).unwrap_or(tail.len());
    let plain = tail.get(..run)?;
    if has_control(plain) {
        return plain.iter().position(|&b| b < 0x20).map(|p| i + p);
    }
    (run < tail.len()).then_some(i + run)
}

/// The bytes of a 16-byte block that stop a JSON string ([`is_string_stop`]),
/// one bit each, lowest byte lowest, exactly (unlike the word marks above,
/// no false marks): the stops of a block can be taken in turn. Vector
/// compares (`wide`, SSE2 on x86_64, NEON on aarch64).
#[inline]
fn block_stops(block: [u8; 16]) -> u32 {
    let v = u8x16::from(block);
    let quote = v.simd_eq(u8x16::splat(b'"'));
    let backslash = v.simd_eq(u8x16::splat(b'\\'));
    let control = v.min(u8x16::splat(0x1f)).simd_eq(v);
    (quote | backslash | control).to_bitmask()
}

/// Length of the escape at the backslash `buf[i]` if serde_json accepts
/// it: `\"`, `\\`, `\/`, `\b`, `\f`, `\n`, `\r`, `\t`, or `\u` and four hex
/// digits. Always inlined: it runs at every escape, and left as a call
/// it was a third of the strict walk's instructions on escaped text.
#[inline(always)]
fn escape_len(buf: &[u8], i: usize) -> Option<usize> {
    match ESCAPE_LEN[usize::from(*buf.get(i + 1)?)] {
        2 => Some(2),
        6 => {
            let hex = buf.get(i + 2..i + 6)?;
            hex.iter().all(u8::is_ascii_hexdigit).then_some(6)
        }
        _ => None,
    }
}

/// [`escape_len`] by the byte after the backslash: 2 for a one-letter
/// escape, 6 for `u` (four hex digits to check), 0 for none.
const ESCAPE_LEN: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut k = 0;
    let singles = b"\"\\/bfnrt";
    while k < singles.len() {
        table[singles[k] as usize] = 2;
        k += 1;
    }
    table[b'u' as usize] = 6;
    table
};

/// Walks a JSON string's contents from `i` (just past its opening quote)
/// as serde_json checks them: the index of the closing quote and whether
/// the string holds an escape; `None` for a raw control byte, an escape
/// serde_json refuses, or no closing quote in `buf`.
///
/// Sixteen bytes at a time: each block's stops are marked exactly and
/// taken in turn, an escape taking its stop and the bytes it covers. Tool
/// output in an agent's request has an escape every few bytes (`\"` around
/// every key of quoted JSON, `\n` on every line); a search restarted after
/// each one cost about 70 instructions an escape.
pub(crate) fn strict_string_end(buf: &[u8], mut i: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    loop {
        let Some(block) = buf
            .get(i..i + 16)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
        else {
            return strict_string_tail(buf, i, escaped);
        };
        let mut stops = block_stops(block);
        if stops == 0 {
            // A plain block, likely the start of a plain run (prose): on
            // to the next stop by the word and vector searches.
            i = string_stop(buf, i + 16)?;
            continue;
        }
        let base = i;
        loop {
            let at = base + stops.trailing_zeros() as usize;
            match *buf.get(at)? {
                b'"' => return Some((at, escaped)),
                b'\\' => {
                    escaped = true;
                    i = at + escape_len(buf, at)?;
                }
                _ => return None,
            }
            // Drop the stops the escape covered.
            let taken = i - base;
            if taken >= 16 {
                break;
            }
            stops &= u32::MAX << taken;
            if stops == 0 {
                i = base + 16;
                break;
            }
        }
    }
}

/// [`strict_string_end`] over the last bytes of `buf`, fewer than a
/// block: one byte at a time.
fn strict_string_tail(buf: &[u8], mut i: usize, mut escaped: bool) -> Option<(usize, bool)> {
    loop {
        match *buf.get(i)? {
            b'"' => return Some((i, escaped)),
            b'\\' => {
                escaped = true;
                i += escape_len(buf, i)?;
            }
            b if b < 0x20 => return None,
            _ => i += 1,
        }
    }
}

/// Whether `s` holds a byte below 0x20: the lowest byte of each of 32
/// lanes, kept over 32-byte blocks, then the rest a word at a time. The
/// lane-wise minimum of fixed arrays compiles to vector `pminub` (four
/// blocks a loop turn on x86_64); a byte fold left to the loop vectoriser
/// was once compiled to a byte loop by a profile-guided build, ~11k
/// instructions more on a 4 KB request.
fn has_control(s: &[u8]) -> bool {
    let mut blocks = s.chunks_exact(32);
    let mut low = [u8::MAX; 32];
    for block in blocks.by_ref() {
        for (l, &b) in low.iter_mut().zip(block) {
            *l = (*l).min(b);
        }
    }
    let mut words = blocks.remainder().chunks_exact(8);
    let mut marks = 0;
    for w in words.by_ref() {
        marks |= below_space(u64::from_le_bytes(w.try_into().unwrap_or_default()));
    }
    low.iter().any(|&b| b < 0x20)
        || marks & HIGHS != 0
        || words.remainder().iter().any(|&b| b < 0x20)
}

/// Words of a string that [`string_end`] tests inline.
const INLINE_WORDS: usize = 2;

/// Index of the quote that closes the JSON string whose content starts at
/// `i` (escapes skipped).
///
/// Most strings of a walk (keys, ids, model names, short values) close
/// within their first sixteen bytes: those words are tested here, inlined
/// where the walk calls it, and only a longer string or one with an escape
/// pays for the call to the full search.
#[inline]
pub(crate) fn string_end(buf: &[u8], i: usize) -> Option<usize> {
    let mut at = i;
    for _ in 0..INLINE_WORDS {
        let Some(w) = word(buf, at) else {
            break;
        };
        let marks = (eq(w, b'"') | eq(w, b'\\')) & HIGHS;
        if marks != 0 {
            let stop = first(at, marks);
            if *buf.get(stop)? == b'"' {
                return Some(stop);
            }
            // A backslash: the full search steps over the escape.
            return long_string_end(buf, stop);
        }
        at += 8;
    }
    long_string_end(buf, at)
}

/// [`string_end`] past its inline words, or from an escape (with no
/// backslash between the string's start and `from`).
#[inline(never)]
fn long_string_end(buf: &[u8], from: usize) -> Option<usize> {
    let first = quote_or_backslash(buf, from)?;
    if *buf.get(first)? == b'"' {
        return Some(first);
    }
    closing_quote(buf, first)
}

/// Index of the quote that closes a string, searched from `from`, a byte
/// of the string with no backslash between the string's start and it.
///
/// Searches for quotes only. A search for quotes and backslashes restarts
/// at every escape, and generated text holds many that are not quotes
/// (`\n` after every paragraph, `\u2014`); an escaped quote is one stop
/// either way. A backslash escapes the next byte, whatever it is, so a
/// quote is escaped exactly when an odd run of backslashes comes before it:
/// walking from a byte that is not a backslash, each pair of the run
/// escapes itself and a lone last one escapes the quote.
fn closing_quote(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    loop {
        let at = quote(buf, i)?;
        let mut run_start = at;
        while run_start > from && buf.get(run_start - 1) == Some(&b'\\') {
            run_start -= 1;
        }
        if (at - run_start) % 2 == 0 {
            return Some(at);
        }
        i = at + 1;
    }
}

/// Index of the first string quote or bracket (`"`, `{`, `}`, `[`, `]`)
/// at or after `i`, and with `separators` of the first `,` or `:` too.
#[inline]
pub(crate) fn structure(buf: &[u8], mut i: usize, separators: bool) -> Option<usize> {
    while let Some(w) = word(buf, i) {
        let folded = w | CASE;
        let mut marks = eq(w, b'"') | eq(folded, b'{') | eq(folded, b'}');
        if separators {
            marks |= eq(w, b',') | eq(w, b':');
        }
        let marks = marks & HIGHS;
        if marks != 0 {
            return Some(first(i, marks));
        }
        i += 8;
    }
    let p = buf.get(i..)?.iter().position(|&b| {
        matches!(b, b'"' | b'{' | b'}' | b'[' | b']') || (separators && matches!(b, b',' | b':'))
    })?;
    Some(i + p)
}

/// Index of the first byte at or after `i` that is not JSON whitespace
/// (space, tab, carriage return, newline), or `buf.len()`. Indentation is
/// skipped eight spaces at a time.
#[inline]
pub(crate) fn skip_ws(buf: &[u8], mut i: usize) -> usize {
    loop {
        match buf.get(i) {
            Some(b' ' | b'\t' | b'\r' | b'\n') => i += 1,
            _ => return i,
        }
        while let Some(w) = word(buf, i) {
            let other = w ^ (ONES * u64::from(b' '));
            if other != 0 {
                i = first(i, other);
                break;
            }
            i += 8;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn has_control_agrees_with_a_byte_loop() {
        // Past one and two 32-byte blocks, with words and bytes after them.
        for len in 0..112 {
            for filler in [b'a', 0x20, 0x21, 0x7f, 0x80, 0xa0, 0xff] {
                let plain = vec![filler; len];
                assert!(!has_control(&plain), "{len} × {filler:#x}");
                for at in 0..len {
                    for control in [0x00, 0x01, 0x1f] {
                        let mut v = plain.clone();
                        v[at] = control;
                        assert!(has_control(&v), "{len} × {filler:#x}, {control:#x} at {at}");
                    }
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

        /// On strings dense with the bytes that steer the walk (escapes,
        /// quotes, hex digits, control and non-ASCII bytes), from every
        /// start, against the byte loop of its tail as the definition.
        #[test]
        fn strict_string_end_agrees_with_a_byte_loop(
            bytes in proptest::collection::vec(
                proptest::sample::select(b"aa  \"\"\\\\\\\\nu0fF/btrxg#]\x01\x1f\x20\x7f\xc3\xa9".to_vec()),
                0..90,
            ),
        ) {
            for i in 0..=bytes.len() + 1 {
                proptest::prop_assert_eq!(
                    strict_string_end(&bytes, i),
                    strict_string_tail(&bytes, i, false),
                    "from {} in {:?}", i, String::from_utf8_lossy(&bytes)
                );
            }
        }
    }

    /// The escapes taken are serde_json's: every byte after a backslash,
    /// and `\u` with each byte in each hex position.
    #[test]
    fn escapes_are_the_ones_serde_json_accepts() {
        let serde_accepts = |s: &[u8]| serde_json::from_slice::<String>(s).is_ok();
        for b in 0..=u8::MAX {
            let s = [b'"', b'\\', b, b'0', b'0', b'0', b'0', b'"'];
            let ours = strict_string_end(&s, 1).is_some();
            assert_eq!(ours, serde_accepts(&s), "escape {:?}", b as char);
            for at in 3..7 {
                let mut s = *b"\"\\u00e9\"";
                s[at] = b;
                let ours = strict_string_end(&s, 1).is_some();
                assert_eq!(ours, serde_accepts(&s), "{:?}", String::from_utf8_lossy(&s));
            }
        }
    }

    #[test]
    fn block_stops_mark_every_stop_and_nothing_else() {
        for filler in [
            b'a', b'"', b'\\', 0x00, 0x1f, 0x20, 0x21, 0x7f, 0x80, 0x9f, 0xff,
        ] {
            for at in [0, 7, 8, 15] {
                for b in 0..=u8::MAX {
                    let mut block = [filler; 16];
                    block[at] = b;
                    let expected = block
                        .iter()
                        .enumerate()
                        .filter(|(_, &b)| is_string_stop(b))
                        .fold(0u32, |m, (k, _)| m | 1 << k);
                    assert_eq!(block_stops(block), expected, "{block:?}");
                }
            }
        }
    }

    #[test]
    fn strict_string_end_reads_long_escaped_text() {
        let text = "line \"one\"\n\tline two \\ path\\to\\file \u{e9}\u{2014}\r\n".repeat(40);
        let json = serde_json::to_vec(&serde_json::Value::String(text)).unwrap();
        let end = json.len() - 1;
        assert_eq!(strict_string_end(&json, 1), Some((end, true)));
        assert_eq!(strict_string_tail(&json, 1, false), Some((end, true)));
        // A control byte or a bad escape anywhere in it is refused: put
        // before a word of the text (not inside an escape), and last.
        let words: Vec<usize> = (1..end)
            .filter(|&k| json[k..].starts_with(b"line"))
            .collect();
        assert_eq!(words.len(), 80);
        for bad in [&b"\x01"[..], b"\\q", b"\\u12x4"] {
            for at in [words[0], words[1], words[41], words[79], end] {
                let mut damaged = json.clone();
                damaged.splice(at..at, bad.iter().copied());
                assert_eq!(strict_string_end(&damaged, 1), None, "{bad:?} at {at}");
            }
        }
    }

    /// Every search against its byte-loop definition, at every start and
    /// for the needles at every offset of a word.
    #[test]
    fn searches_agree_with_byte_loops() {
        let mut inputs: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            br#"{"a": [1, {"b": "c\"d"}], "e":"f\\"}"#.to_vec(),
            b"  \t\r\n   \n        x".to_vec(),
            b"{[]} YyZz_\x7f\xfb\xdb[ab".to_vec(),
            b"no stop at all here, only a comma".to_vec(),
        ];
        // Past the short words: a control byte before or after the quote.
        let mut long = vec![b'a'; 90];
        long[60] = b'"';
        long[70] = 0x01;
        inputs.push(long.clone());
        long[50] = b'\n';
        inputs.push(long);
        // Each byte of interest, and its neighbours in the code table, at
        // each position of a long run of filler (past the short words too).
        for needle in [
            b'"',
            b'\\',
            b'{',
            b'}',
            b'[',
            b']',
            b',',
            b':',
            b' ',
            b'\t',
            b'\n',
            b'\r',
            b'Z',
            b'\\' ^ 0x20,
            b'"' ^ 0x01,
            b'{' ^ 0x80,
            0x00,
            0x1f,
            0x20,
            0x7f,
            0xff,
        ] {
            for at in 0..70 {
                let mut v = vec![b'a'; 72];
                v[at] = needle;
                inputs.push(v.clone());
                let mut spaces = vec![b' '; 72];
                spaces[at] = needle;
                inputs.push(spaces);
                // A borrow from a real match must not hide an earlier one.
                v[at + 1] = needle.wrapping_add(1);
                inputs.push(v);
            }
        }
        // Runs of backslashes before a quote, odd (the quote is escaped)
        // and even, inside and past the short words.
        for run in 1..6 {
            for at in [3, 20, 45, 80] {
                let mut v = vec![b'a'; 100];
                v[at..at + run].fill(b'\\');
                v[at + run] = b'"';
                v[at + run + 7] = b'"';
                inputs.push(v);
            }
        }
        // Escaped quotes either side of the inline words' ends.
        for at in 0..28 {
            let mut v = vec![b'a'; 40];
            v[at] = b'\\';
            v[at + 1] = b'"';
            v[at + 5] = b'"';
            inputs.push(v.clone());
            v[at + 1] = b'\\';
            inputs.push(v);
        }
        for input in &inputs {
            for i in 0..=input.len() + 1 {
                let rest = input.get(i..).unwrap_or_default();
                let find = |f: &dyn Fn(u8) -> bool| {
                    input
                        .get(i..)
                        .and_then(|r| r.iter().position(|&b| f(b)).map(|p| i + p))
                };
                assert_eq!(
                    quote(input, i),
                    find(&|b| b == b'"'),
                    "quote at {i} in {input:?}"
                );
                assert_eq!(
                    quote_or_backslash(input, i),
                    find(&|b| b == b'"' || b == b'\\'),
                    "quote or backslash at {i} in {input:?}"
                );
                let mut j = i;
                let close = loop {
                    match input.get(j) {
                        Some(b'"') => break Some(j),
                        Some(b'\\') => j += 2,
                        Some(_) => j += 1,
                        None => break None,
                    }
                };
                assert_eq!(
                    string_end(input, i),
                    close,
                    "string end at {i} in {input:?}"
                );
                let escape = find(&|b| b == b'"' || b == b'\\' || b < 0x20);
                assert_eq!(json_escape(input, i), escape, "escape at {i} in {input:?}");
                assert_eq!(string_stop(input, i), escape, "stop at {i} in {input:?}");
                assert_eq!(
                    structure(input, i, false),
                    find(&|b| matches!(b, b'"' | b'{' | b'}' | b'[' | b']')),
                    "structure at {i} in {input:?}"
                );
                assert_eq!(
                    structure(input, i, true),
                    find(&|b| matches!(b, b'"' | b'{' | b'}' | b'[' | b']' | b',' | b':')),
                    "separators at {i} in {input:?}"
                );
                if i <= input.len() {
                    let ws = rest
                        .iter()
                        .position(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
                        .map_or(input.len(), |p| i + p);
                    assert_eq!(skip_ws(input, i), ws, "whitespace at {i} in {input:?}");
                }
            }
        }
    }
}
