//! Fast path for a whole top-level object in one slice: an NDJSON record
//! line, or a JSON body (or one of several top-level values) that arrived
//! in a single read. One pass over a slice that holds all of it.
//!
//! The general scanner ([`super::JsonScanner::feed`]) is byte-at-a-time
//! state machine work, because a value may be cut anywhere by the reads it
//! arrives in. Most values arrive whole inside one read (an Ollama
//! `/api/chat` content record is ~140 bytes, a non-streamed chat completion
//! a few KB), and for those a single forward walk does the same job at a
//! fraction of the cost: keys are compared in place, captured values are
//! sub-slices of the input (no copy), and strings are skipped with a
//! quote/backslash search.
//!
//! Contract: for a line `L` (without its `\n`) that [`read_line`] accepts,
//! the general scanner, started at depth 0 with no member, capture or text
//! state pending, would make for `L\n` exactly the sink calls that
//! `JsonScanner::fast_line` makes from the [`Record`] (the same captured
//! values in the same order, the same text byte total, the same `value_end`)
//! and would end in the same state. Likewise for an object `O` at the start
//! of a slice that [`read_object`] accepts (returning its length): the
//! general scanner, in either mode, makes for `O` the calls
//! `JsonScanner::fast_object` makes. Input outside the simple grammar below
//! is declined (`None`) before any sink call, and the caller runs the general
//! scanner over it instead, so a surprise costs time, never a different
//! result:
//!
//! - one object: `{`, members, `}`, with spaces, tabs, carriage returns (and
//!   outside a line, newlines) around tokens; a line may also be blank;
//! - a member is `"key" : value`; a value is a string, an object or array
//!   (nesting up to 64 deep, brackets must match), or a scalar made of
//!   `[A-Za-z0-9+-.]` followed by whitespace, `,` or `}`;
//! - the value of a text-bearing key is a string or a container (after a
//!   scalar there the general scanner stays in text mode and counts later
//!   string values as text, a quirk not worth copying);
//! - at most [`MAX_CAPTURES`] captured members.
//!
//! Inside containers the walk applies the general scanner's own rules (which
//! strings are keys, which keys name generated text), so the leniency of the
//! general scanner there (it does not validate commas or literals) is kept.
//! A raw newline is whitespace to the general scanner outside NDJSON and
//! inside strings; a line holds none.

use super::{classify, is_text_leaf, Key, KeyKind};
use crate::usage::word_scan::{skip_ws, string_end, structure};

/// Captured members per record: an Ollama final record has four
/// (`model`, `done`, `prompt_eval_count`, `eval_count`).
const MAX_CAPTURES: usize = 8;

/// Nesting deeper than this goes to the general scanner.
const MAX_DEPTH: u32 = 64;

/// What one record line or object holds for the sink.
#[derive(Debug)]
pub(super) struct Record {
    /// Bytes of generated text (string contents as written).
    text: u64,
    /// Captured members: key and the value's byte range in the input.
    caps: [(Key, usize, usize); MAX_CAPTURES],
    n: usize,
    /// An object was read (a blank line holds none).
    object: bool,
}

impl Default for Record {
    fn default() -> Self {
        Record {
            text: 0,
            caps: [(Key::Usage, 0, 0); MAX_CAPTURES],
            n: 0,
            object: false,
        }
    }
}

impl Record {
    fn push(&mut self, key: Key, from: usize, to: usize) -> bool {
        match self.caps.get_mut(self.n) {
            Some(slot) => {
                *slot = (key, from, to);
                self.n += 1;
                true
            }
            None => false,
        }
    }

    /// Whether an object was read (a top-level value ended).
    pub(super) fn object(&self) -> bool {
        self.object
    }

    /// Generated text bytes.
    pub(super) fn text(&self) -> u64 {
        self.text
    }

    /// Captured members in input order, as sub-slices of `input`.
    pub(super) fn captures<'a>(&'a self, input: &'a [u8]) -> impl Iterator<Item = (Key, &'a [u8])> {
        self.caps
            .iter()
            .take(self.n)
            .map(move |&(k, from, to)| (k, input.get(from..to).unwrap_or_default()))
    }
}

/// Bytes the general scanner takes as a scalar member value.
#[inline]
fn is_scalar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.')
}

/// Index of the next byte at or after `i` that matters inside a container:
/// a quote or bracket, and with `separators` a `,` or `:` too. The general
/// scanner also stops at a newline there, which changes nothing in it (and
/// a line holds none).
#[inline]
fn next_stop(buf: &[u8], i: usize, separators: bool) -> Option<usize> {
    // Most often the stop is the very next byte (`":`, `",`, `}}`).
    match *buf.get(i)? {
        b'"' | b'{' | b'}' | b'[' | b']' => Some(i),
        b',' | b':' if separators => Some(i),
        _ => structure(buf, i + 1, separators),
    }
}

/// Bit stack of open containers (1 = object), innermost in bit 0.
#[derive(Default)]
struct Stack {
    bits: u64,
    depth: u32,
}

impl Stack {
    #[inline]
    fn push(&mut self, open: u8) -> Option<()> {
        if self.depth >= MAX_DEPTH {
            return None;
        }
        self.bits = (self.bits << 1) | u64::from(open == b'{');
        self.depth += 1;
        Some(())
    }

    /// Pops a container; `None` when `close` does not match it.
    #[inline]
    fn pop(&mut self, close: u8) -> Option<()> {
        if self.depth == 0 || (self.bits & 1 == 1) != (close == b'}') {
            return None;
        }
        self.bits >>= 1;
        self.depth -= 1;
        Some(())
    }

    #[inline]
    fn in_object(&self) -> bool {
        self.depth > 0 && self.bits & 1 == 1
    }
}

/// Skips the container opening at `buf[i]` whose member is not text; the
/// index after its closing bracket. Only strings and brackets matter there.
fn skip_container(buf: &[u8], mut i: usize) -> Option<usize> {
    let mut stack = Stack::default();
    loop {
        match *buf.get(i)? {
            b'"' => i = string_end(buf, i + 1)?,
            b @ (b'{' | b'[') => stack.push(b)?,
            b @ (b'}' | b']') => {
                stack.pop(b)?;
                if stack.depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
        i = next_stop(buf, i + 1, false)?;
    }
}

/// Walks the container value of a text-bearing member opening at `buf[i]`,
/// adding the bytes of strings under text leaf keys to `text`; the index
/// after its closing bracket. Mirrors the general scanner inside a text
/// member: a string is a key when a key is expected in an object, every key
/// decides whether the strings after it are text.
fn text_container(buf: &[u8], mut i: usize, text: &mut u64) -> Option<usize> {
    let mut stack = Stack::default();
    let mut expect_key = false;
    let mut text_key = false;
    loop {
        match *buf.get(i)? {
            b'"' => {
                let end = string_end(buf, i + 1)?;
                let s = buf.get(i + 1..end)?;
                if expect_key && stack.in_object() {
                    text_key = is_text_leaf(s);
                } else if text_key {
                    *text += s.len() as u64;
                }
                i = end;
            }
            b @ (b'{' | b'[') => {
                stack.push(b)?;
                expect_key = b == b'{';
            }
            b @ (b'}' | b']') => {
                stack.pop(b)?;
                expect_key = false;
                if stack.depth == 0 {
                    return Some(i + 1);
                }
            }
            b',' => expect_key = stack.in_object(),
            b':' => expect_key = false,
            _ => {}
        }
        i = next_stop(buf, i + 1, true)?;
    }
}

/// Reads one record line (without its `\n`) into `rec` (a fresh one,
/// filled in place: a returned record would be copied twice). `None`: the
/// line is not one the fast path reads exactly (see the module notes);
/// nothing has been reported and the general scanner must read it.
pub(super) fn read_line(line: &[u8], rec: &mut Record) -> Option<()> {
    let start = skip_ws(line, 0);
    if start == line.len() {
        return Some(());
    }
    let end = read_members(line, start, rec)?;
    if skip_ws(line, end) != line.len() {
        return None;
    }
    Some(())
}

/// Reads the object that opens at `buf[0]` into `rec` (a fresh one), if it
/// ends inside `buf`; the object's length. `None`: the object does not end
/// in `buf`, or is not one the fast path reads exactly; nothing has been
/// reported.
pub(super) fn read_object(buf: &[u8], rec: &mut Record) -> Option<usize> {
    read_members(buf, 0, rec)
}

/// The object opening at `buf[i]`: its members into `rec`, the index after
/// its closing brace.
fn read_members(buf: &[u8], mut i: usize, rec: &mut Record) -> Option<usize> {
    if buf.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(buf, i + 1);
    if buf.get(i) == Some(&b'}') {
        rec.object = true;
        return Some(i + 1);
    }
    loop {
        if buf.get(i) != Some(&b'"') {
            return None;
        }
        let end = string_end(buf, i + 1)?;
        let kind = classify(buf.get(i + 1..end)?);
        i = skip_ws(buf, end + 1);
        if buf.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(buf, i + 1);
        let start = i;
        match *buf.get(i)? {
            b'"' => {
                let end = string_end(buf, i + 1)?;
                if kind == KeyKind::Text {
                    rec.text += (end - i - 1) as u64;
                }
                i = end + 1;
            }
            b'{' | b'[' => {
                i = if kind == KeyKind::Text {
                    text_container(buf, i, &mut rec.text)?
                } else {
                    skip_container(buf, i)?
                };
            }
            b if is_scalar(b) && kind != KeyKind::Text => {
                i += 1;
                while buf.get(i).is_some_and(|&b| is_scalar(b)) {
                    i += 1;
                }
            }
            _ => return None,
        }
        if let KeyKind::Capture(key) = kind {
            if !rec.push(key, start, i) {
                return None;
            }
        }
        i = skip_ws(buf, i);
        match buf.get(i) {
            Some(b',') => i = skip_ws(buf, i + 1),
            Some(b'}') => {
                rec.object = true;
                return Some(i + 1);
            }
            _ => return None,
        }
    }
}
