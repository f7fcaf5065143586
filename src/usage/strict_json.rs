//! A strict JSON walk for the few places that read a small fixed shape out
//! of a document faster than serde_json would, and must agree with it.
//!
//! The walk checks the grammar serde_json checks (strings without raw
//! control bytes and with valid escapes, numbers, literals, brackets,
//! commas) while skipping what the caller does not read, string contents
//! with a vectorised search. Every method returns `None` both for invalid
//! JSON and for anything the caller chose not to settle itself; callers
//! then ask serde_json, so `None` never means "absent".

use super::word_scan::{skip_ws, strict_string_end};

/// Containers nested deeper than this are left to serde_json.
const MAX_DEPTH: u32 = 64;

/// Known members already read (serde refuses a duplicate).
#[derive(Default)]
pub(crate) struct Seen(u32);

impl Seen {
    fn once(&mut self, bit: u32) -> Option<()> {
        if self.0 & (1 << bit) != 0 {
            return None;
        }
        self.0 |= 1 << bit;
        Some(())
    }

    /// The value of the known member `bit`, read by `read`; `None` for
    /// its second appearance, as for anything `read` declines.
    pub(crate) fn field<'a, T>(
        &mut self,
        bit: u32,
        w: &mut Walk<'a>,
        read: impl FnOnce(&mut Walk<'a>) -> Option<T>,
    ) -> Option<T> {
        self.once(bit)?;
        read(w)
    }
}

/// A cursor over one JSON document.
pub(crate) struct Walk<'a> {
    buf: &'a [u8],
    i: usize,
}

impl<'a> Walk<'a> {
    /// The whole of `buf` as one JSON value read by `read`, whitespace
    /// around it allowed (as serde_json's `from_slice` reads a document);
    /// `None` when `read` declines it or more than whitespace follows.
    pub(crate) fn document<T>(
        buf: &'a [u8],
        read: impl FnOnce(&mut Self) -> Option<T>,
    ) -> Option<T> {
        let mut w = Walk { buf, i: 0 };
        w.ws();
        let value = read(&mut w)?;
        w.ws();
        (w.i == w.buf.len()).then_some(value)
    }

    fn peek(&self) -> Option<u8> {
        self.buf.get(self.i).copied()
    }

    /// Skips whitespace; indentation eight spaces at a time (pretty-printed
    /// replies indent every member of their `usage`).
    pub(crate) fn ws(&mut self) {
        self.i = skip_ws(self.buf, self.i);
    }

    /// Consumes `lit` if the input continues with it.
    fn eat(&mut self, lit: &[u8]) -> Option<()> {
        let end = self.i + lit.len();
        if self.buf.get(self.i..end)? != lit {
            return None;
        }
        self.i = end;
        Some(())
    }

    /// An object of which only the member `name` is read, by `read`:
    /// `Some(None)` when it is absent, `None` when `read` declines it or
    /// it comes twice (an error to serde_json). Other members are checked
    /// and skipped.
    pub(crate) fn only_member<T>(
        &mut self,
        name: &[u8],
        read: impl FnOnce(&mut Self) -> Option<T>,
    ) -> Option<Option<T>> {
        let mut read = Some(read);
        let mut value = None;
        self.object(|w, key| {
            if key != name {
                return w.value();
            }
            // A second `name` finds `read` taken: declined.
            value = Some(read.take()?(w)?);
            Some(())
        })?;
        Some(value)
    }

    /// An object's members, `f` called at each key (the walk then at the
    /// value, whitespace skipped); `f` reads the value. The walk starts at
    /// `{` and ends past `}`.
    pub(crate) fn object(
        &mut self,
        mut f: impl FnMut(&mut Self, &'a [u8]) -> Option<()>,
    ) -> Option<()> {
        self.eat(b"{")?;
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            let (key, escaped) = self.string()?;
            if escaped || !key.is_ascii() {
                return None;
            }
            self.ws();
            self.eat(b":")?;
            self.ws();
            f(self, key)?;
            self.ws();
            match self.peek()? {
                b',' => {
                    self.i += 1;
                    self.ws();
                }
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// `null` (then `None`) or what `f` reads.
    pub(crate) fn nullable<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Option<T>,
    ) -> Option<Option<T>> {
        if self.peek()? == b'n' {
            self.eat(b"null")?;
            return Some(None);
        }
        f(self).map(Some)
    }

    /// A string; its raw contents and whether it holds an escape. Refuses
    /// raw control bytes and invalid escapes, as serde_json does.
    pub(crate) fn string(&mut self) -> Option<(&'a [u8], bool)> {
        self.eat(b"\"")?;
        let start = self.i;
        let (end, escaped) = strict_string_end(self.buf, start)?;
        self.i = end + 1;
        Some((self.buf.get(start..end)?, escaped))
    }

    /// A string without escapes, as `&str` (serde_json decodes escapes
    /// and checks surrogates; those strings go to it).
    pub(crate) fn plain_string(&mut self) -> Option<&'a str> {
        let (s, escaped) = self.string()?;
        if escaped {
            return None;
        }
        std::str::from_utf8(s).ok()
    }

    /// `null` or a string without escapes, owned: serde_json's reading
    /// into `Option<String>` of the values it takes.
    pub(crate) fn nullable_string(&mut self) -> Option<Option<String>> {
        self.nullable(|w| w.plain_string().map(str::to_owned))
    }

    /// `null` only: a field the caller leaves to serde_json when it holds
    /// anything else (its reading is `None` then).
    pub(crate) fn null<T>(&mut self) -> Option<Option<T>> {
        self.nullable(|_| None)
    }

    pub(crate) fn boolean(&mut self) -> Option<bool> {
        match self.peek()? {
            b't' => self.eat(b"true").map(|()| true),
            b'f' => self.eat(b"false").map(|()| false),
            _ => None,
        }
    }

    /// A non-negative integer of 1 to 19 digits without a leading zero (so
    /// within `u64`), not followed by a fraction or an exponent.
    pub(crate) fn count(&mut self) -> Option<u64> {
        let rest = self.buf.get(self.i..)?;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 19 || (digits > 1 && rest.first() == Some(&b'0')) {
            return None;
        }
        if matches!(rest.get(digits), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        let n = rest
            .get(..digits)?
            .iter()
            .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        self.i += digits;
        Some(n)
    }

    /// Any JSON value, checked and skipped (serde_json's `ignore_value`).
    /// Containers are tracked on a bit stack (1 = object).
    pub(crate) fn value(&mut self) -> Option<()> {
        let mut stack = 0u64;
        let mut depth = 0u32;
        loop {
            // A value.
            match self.peek()? {
                b'"' => {
                    self.string()?;
                }
                b'{' | b'[' => {
                    if depth >= MAX_DEPTH {
                        return None;
                    }
                    let object = self.peek()? == b'{';
                    self.i += 1;
                    self.ws();
                    let close = if object { b'}' } else { b']' };
                    if self.peek()? == close {
                        self.i += 1;
                    } else {
                        stack = (stack << 1) | u64::from(object);
                        depth += 1;
                        if object {
                            self.member_key()?;
                        }
                        continue;
                    }
                }
                b't' => self.eat(b"true")?,
                b'f' => self.eat(b"false")?,
                b'n' => self.eat(b"null")?,
                b'-' | b'0'..=b'9' => self.number()?,
                _ => return None,
            }
            // After a value: a comma and the next one, or closing brackets.
            loop {
                if depth == 0 {
                    return Some(());
                }
                let object = stack & 1 == 1;
                self.ws();
                match self.peek()? {
                    b',' => {
                        self.i += 1;
                        self.ws();
                        if object {
                            self.member_key()?;
                        }
                        break;
                    }
                    b'}' if object => {}
                    b']' if !object => {}
                    _ => return None,
                }
                self.i += 1;
                stack >>= 1;
                depth -= 1;
            }
        }
    }

    /// `"key" :` inside a skipped object; the walk then at the value.
    fn member_key(&mut self) -> Option<()> {
        self.string()?;
        self.ws();
        self.eat(b":")?;
        self.ws();
        Some(())
    }

    /// A JSON number: `-`? (`0` | [1-9][0-9]*) (`.` [0-9]+)? ([eE] [+-]? [0-9]+)?
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !self.peek()?.is_ascii_digit() {
                return None;
            }
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if !self.peek()?.is_ascii_digit() {
                return None;
            }
            self.digits();
        }
        Some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.i += 1;
        }
    }
}

/// For property tests of JSON readers: `body` with one byte changed,
/// inserted or removed at `at`, the byte taken from `bytes` (the bytes that
/// steer the reader under test).
#[cfg(test)]
pub(crate) fn damage(mut body: Vec<u8>, at: usize, how: u8, bytes: &[u8]) -> Vec<u8> {
    let at = at % (body.len() + 1);
    let b = bytes[usize::from(how) % bytes.len()];
    match how % 3 {
        0 if at < body.len() => body[at] = b,
        1 => body.insert(at, b),
        _ if at < body.len() => {
            body.remove(at);
        }
        _ => {}
    }
    body
}

/// Test support for the readers that take a usage value from serde_json
/// when they decline it (`read_plain`): their contract, and generated
/// usage objects to check it on.
#[cfg(test)]
pub(crate) mod plain {
    use proptest::prelude::*;
    use serde::de::DeserializeOwned;
    use std::fmt::Debug;

    /// The contract of a `read_plain`: what it reads is serde_json's
    /// reading, and serde_json accepts the value. Returns whether it read it.
    pub(crate) fn agrees<T: DeserializeOwned + PartialEq + Debug>(
        read_plain: fn(&[u8]) -> Option<Option<T>>,
        raw: &[u8],
    ) -> bool {
        match read_plain(raw) {
            Some(u) => {
                let serde = serde_json::from_slice::<Option<T>>(raw);
                assert_eq!(serde.ok(), Some(u), "{:?}", String::from_utf8_lossy(raw));
                true
            }
            None => false,
        }
    }

    /// Checks that `read_plain` leaves to serde_json (which refuses them)
    /// objects that name one of `fields` twice, both times `null`.
    pub(crate) fn declines_duplicates<T: DeserializeOwned + PartialEq + Debug>(
        read_plain: fn(&[u8]) -> Option<Option<T>>,
        fields: &[&str],
    ) {
        for field in fields {
            let raw = format!(r#"{{"{field}":null,"x":1,"{field}":null}}"#);
            assert!(!agrees(read_plain, raw.as_bytes()), "read {raw}");
        }
    }

    /// [`agrees`] on `raw` with `damages` done to it (see [`super::damage`]).
    pub(crate) fn agrees_damaged<T: DeserializeOwned + PartialEq + Debug>(
        read_plain: fn(&[u8]) -> Option<Option<T>>,
        raw: String,
        damages: Vec<(usize, u8)>,
    ) {
        let mut raw = raw.into_bytes();
        for (at, how) in damages {
            raw = super::damage(raw, at, how, STEERING_BYTES);
        }
        agrees(read_plain, &raw);
    }

    /// How many of 400 generated usage objects with `keys` `read_plain`
    /// reads (checking each against serde_json): the property test is
    /// only as good as this share.
    pub(crate) fn read_of_400<T: DeserializeOwned + PartialEq + Debug>(
        read_plain: fn(&[u8]) -> Option<Option<T>>,
        keys: &'static [&'static str],
    ) -> usize {
        use proptest::strategy::ValueTree;
        use proptest::test_runner::TestRunner;
        let mut runner = TestRunner::deterministic();
        let strategy = object(keys, value(keys));
        (0..400)
            .filter(|_| match strategy.new_tree(&mut runner) {
                Ok(tree) => agrees(read_plain, tree.current().as_bytes()),
                Err(e) => panic!("{e}"),
            })
            .count()
    }

    /// The tests of one `read_plain` over objects made from `keys`: a
    /// property test (`$agrees`: generated objects, a byte or two
    /// damaged, checked with [`agrees`]) and the check that the reader
    /// takes more than `$min` of [`read_of_400`] (`$often`).
    macro_rules! read_plain_tests {
        ($agrees:ident, $often:ident, $read_plain:expr, $keys:expr, $min:expr) => {
            proptest::proptest! {
                #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

                #[test]
                fn $agrees(
                    raw in $crate::usage::strict_json::plain::object(
                        $keys,
                        $crate::usage::strict_json::plain::value($keys),
                    ),
                    damages in proptest::collection::vec(
                        (proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()),
                        0..2,
                    ),
                ) {
                    $crate::usage::strict_json::plain::agrees_damaged($read_plain, raw, damages);
                }
            }

            #[test]
            fn $often() {
                let read = $crate::usage::strict_json::plain::read_of_400($read_plain, $keys);
                assert!(read > $min, "{read} of 400 generated objects read plain");
            }
        };
    }
    pub(crate) use read_plain_tests;

    /// What usage members nearly always hold.
    const COUNTS: &[&str] = &["null", "0", "16", "363"];
    /// Scalars a usage member can hold: counts, and the shapes serde reads
    /// leniently or refuses.
    const SCALARS: &[&str] = &[
        "null",
        "0",
        "16",
        "363",
        "-1",
        "1.0",
        "2e1",
        "\"7\"",
        "true",
        "01",
        "18446744073709551615",
        "99999999999999999999",
        "\"a\\\"b\"",
        "\"\\u00e9\"",
    ];
    const WS: &[&str] = &["", "", " ", "\n  ", "\t"];

    /// The bytes that steer a strict reader, for the damage property tests do.
    pub(crate) const STEERING_BYTES: &[u8] = b"\"\\{}[],:\n 1-.e";

    fn ws() -> impl Strategy<Value = String> {
        prop::sample::select(WS).prop_map(str::to_owned)
    }

    /// A JSON value: a scalar (most often a plain count, so that most
    /// values are ones a `read_plain` reads), or arrays and objects (with
    /// `keys`) of them.
    pub(crate) fn value(keys: &'static [&'static str]) -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            3 => prop::sample::select(COUNTS),
            1 => prop::sample::select(SCALARS),
        ]
        .prop_map(str::to_owned);
        leaf.prop_recursive(2, 16, 5, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                object(keys, inner),
            ]
        })
    }

    /// An object of up to five members named from `keys` (duplicates
    /// included), with values from `value`.
    pub(crate) fn object(
        keys: &'static [&'static str],
        value: impl Strategy<Value = String>,
    ) -> impl Strategy<Value = String> {
        prop::collection::vec((prop::sample::select(keys), ws(), value), 0..6).prop_map(|v| {
            let items: Vec<String> = v
                .into_iter()
                .map(|(k, a, x)| format!("{a}\"{k}\"{a}:{a}{x}{a}"))
                .collect();
            format!("{{{}}}", items.join(","))
        })
    }
}
