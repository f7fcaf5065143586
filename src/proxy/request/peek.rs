//! The request peek without serde: one forward walk over the body that
//! reads the few top-level members metering needs and skips the rest.
//!
//! serde_json over the [`BodyPeek`] struct validates the whole document and
//! parses every top-level key into a `&str`; most of a request is message
//! text that it then skips byte by byte. This walk checks the same grammar
//! (strings without raw control bytes and with valid escapes, numbers,
//! literals, brackets, commas, nothing after the value) but skips string
//! contents with a vectorised search.
//!
//! Contract: when [`read`] returns `Some(peek)`, `serde_json::from_slice`
//! would have returned `Ok(peek)`. Anything this walk does not settle
//! exactly returns `None` and the caller asks serde_json, so a surprise costs
//! time, never a different result: invalid JSON, a top-level value other
//! than an object, a duplicate known member (an error to serde), a key with
//! an escape or a non-ASCII byte, a known member of another shape than
//! `null`, a plain string (no escape), `true`/`false`, a non-negative
//! integer of at most 19 digits, or an object for the nested ones, and
//! nesting deeper than 64.

use super::{BodyPeek, GenerationConfig, StreamOptions};
use crate::usage::strict_json::{Seen, Walk};

/// Reads `body` as serde_json would read it into a [`BodyPeek`], or `None`
/// when only serde_json can tell (see the module notes).
pub(super) fn read(body: &[u8]) -> Option<BodyPeek> {
    Walk::document(body, body_peek)
}

fn body_peek(w: &mut Walk) -> Option<BodyPeek> {
    let mut peek = BodyPeek::default();
    let mut seen = Seen::default();
    w.object(|w, key| {
        match key {
            b"model" => peek.model = seen.field(0, w, Walk::nullable_string)?,
            b"stream" => peek.stream = seen.field(1, w, |w| w.nullable(Walk::boolean))?,
            b"stream_options" => {
                peek.stream_options = seen.field(2, w, |w| w.nullable(stream_options))?
            }
            b"max_tokens" => peek.max_tokens = seen.field(3, w, |w| w.nullable(Walk::count))?,
            b"max_completion_tokens" => {
                peek.max_completion_tokens = seen.field(4, w, |w| w.nullable(Walk::count))?
            }
            b"max_output_tokens" => {
                peek.max_output_tokens = seen.field(5, w, |w| w.nullable(Walk::count))?
            }
            b"generationConfig" => {
                peek.generation_config = seen.field(6, w, |w| w.nullable(generation_config))?
            }
            _ => w.value()?,
        }
        Some(())
    })?;
    Some(peek)
}

fn stream_options(w: &mut Walk) -> Option<StreamOptions> {
    let include_usage = w.only_member(b"include_usage", |w| w.nullable(Walk::boolean))?;
    Some(StreamOptions {
        include_usage: include_usage.flatten(),
    })
}

fn generation_config(w: &mut Walk) -> Option<GenerationConfig> {
    let max_output_tokens = w.only_member(b"maxOutputTokens", |w| w.nullable(Walk::count))?;
    Some(GenerationConfig {
        max_output_tokens: max_output_tokens.flatten(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The contract: a peek read here is serde_json's, and serde_json
    /// accepts the body. Returns whether the walk read it.
    fn agrees(body: &[u8]) -> bool {
        let show = String::from_utf8_lossy(body);
        match read(body) {
            Some(peek) => {
                let serde = serde_json::from_slice::<BodyPeek>(body);
                assert_eq!(serde.ok(), Some(peek), "{show:?}");
                true
            }
            None => false,
        }
    }

    #[test]
    fn reads_the_requests_it_is_for() {
        let cases: &[&str] = &[
            r#"{"model":"gpt-4.1","messages":[{"role":"user","content":"Say \"hi\"\n\u00e9\ud83d\ude00"}],"max_tokens":512,"temperature":0.2,"stream":true}"#,
            r#"{"max_tokens":1024,"messages":[{"content":[{"type":"text","text":"été"}],"role":"user"}],"model":"claude-sonnet-4-5","stream":false,"system":[{"type":"text","text":"x","cache_control":{"type":"ephemeral"}}]}"#,
            r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}],"generationConfig":{"temperature":1e-3,"maxOutputTokens":300,"stopSequences":[]}}"#,
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"x":[1,-2.5E+3,null]},"max_completion_tokens":0}"#,
            r#"{"model":"o3","input":"hi","max_output_tokens":18446744073,"reasoning":{"effort":"high"},"tools":[]}"#,
            "\n\t{ \"model\" : null , \"stream\" : null , \"stream_options\" : null , \"max_tokens\" : null ,\r\n \"generationConfig\" : {} }  \n",
            "{}",
            r#"{"model":""}"#,
        ];
        for case in cases {
            assert!(agrees(case.as_bytes()), "walk declined {case:?}");
        }
    }

    #[test]
    fn declines_what_serde_alone_settles() {
        let cases: &[&[u8]] = &[
            // Not an object, or not JSON at all.
            b"",
            b"   ",
            br#"["m",true,null,1,2,3,null]"#,
            b"garbage",
            br#""model""#,
            // Duplicate known members (an error to serde).
            br#"{"model":"a","model":"b"}"#,
            br#"{"stream_options":{"include_usage":true,"include_usage":false}}"#,
            // Escaped or non-ASCII keys, escaped model.
            br#"{"mod\u0065l":"a"}"#,
            "{\"mod\u{e8}l\":\"a\"}".as_bytes(),
            br#"{"model":"a\"b"}"#,
            b"{\"model\":\"\xff\"}",
            // Known members of other shapes.
            br#"{"model":5}"#,
            br#"{"stream":"true"}"#,
            br#"{"stream":1}"#,
            br#"{"max_tokens":-0}"#,
            br#"{"max_tokens":-1}"#,
            br#"{"max_tokens":1.0}"#,
            br#"{"max_tokens":1e3}"#,
            br#"{"max_tokens":012}"#,
            br#"{"max_tokens":18446744073709551616}"#,
            br#"{"max_tokens":99999999999999999999}"#,
            br#"{"max_tokens":"5"}"#,
            br#"{"stream_options":[true]}"#,
            br#"{"stream_options":true}"#,
            br#"{"generationConfig":{"maxOutputTokens":1.5}}"#,
            // Invalid JSON anywhere.
            br#"{"model":"m",}"#,
            br#"{"model":"m"} x"#,
            br#"{"model":"m""stream":true}"#,
            br#"{"model":"m","a":[1,]}"#,
            br#"{"model":"m","a":{"b":1,}}"#,
            br#"{"model":"m","a":{1:2}}"#,
            br#"{"model":"m","a":tru}"#,
            br#"{"model":"m","a":truex}"#,
            br#"{"model":"m","a":nul}"#,
            br#"{"model":"m","a":-}"#,
            br#"{"model":"m","a":1.}"#,
            br#"{"model":"m","a":1e}"#,
            br#"{"model":"m","a":01}"#,
            br#"{"model":"m","a":+1}"#,
            br#"{"model":"m","a":"\x"}"#,
            br#"{"model":"m","a":"\u12g4"}"#,
            br#"{"model":"m","a":"\u12"}"#,
            // After an escape: a raw control byte, a bad escape, a quote
            // left escaped by an odd run of backslashes.
            b"{\"model\":\"m\",\"a\":\"one\\ntwo\tthree\"}",
            br#"{"model":"m","a":"ok\n ok\" ok\\ then \x"}"#,
            br#"{"model":"m","a":"ok\n then \u00e"}"#,
            br#"{"model":"m","a":"x\\\"}"#,
            b"{\"model\":\"m\",\"a\":\"tab\there\"}",
            b"{\"model\":\"m\",\"a\":\"a long string with a raw newline\n in its tail\"}",
            b"{\"model\":\"m\",\"a\":[1,2]\x0c}",
            br#"{"model":"m","a":[1,2}"#,
            br#"{"model":"m","a":{"b":[}]}"#,
            br#"{"model":"m""#,
            br#"{"model":"m","a":"#,
            // Deeper than the walk's stack (serde_json has no limit here).
            &[
                br#"{"model":"m","a":"#.as_slice(),
                &[b'['; 70],
                &[b']'; 70],
                b"}",
            ]
            .concat(),
        ];
        for case in cases {
            assert!(
                !agrees(case),
                "walk read {:?}",
                String::from_utf8_lossy(case)
            );
        }
    }

    #[test]
    fn reads_the_load_test_request() {
        let filler = "The agent looked up the order history, compared the totals and wrote a short summary of the differences for the user. ";
        let body = serde_json::json!({
            "model": "gpt-4.1-nano",
            "messages": [
                {"role": "system", "content": "You are a careful assistant. Answer briefly."},
                {"role": "user", "content": filler.repeat(8)},
                {"role": "assistant", "content": filler.repeat(8)},
            ],
            "temperature": 0.2,
            "max_tokens": 512,
        });
        let body = serde_json::to_vec(&body).unwrap_or_default();
        assert!(agrees(&body));
    }

    #[test]
    fn reads_strings_full_of_escapes() {
        let output = "line \"one\"\n\tline two \\ path\\to\\file \u{e9}\u{2014}\r\n".repeat(40);
        let body = serde_json::json!({
            "model": "gpt-4.1",
            "messages": [{"role": "tool", "content": output}, {"role": "user", "content": "\\"}],
        });
        let body = serde_json::to_vec(&body).unwrap_or_default();
        assert!(agrees(&body));
        let escaped = serde_json::json!({"model": "m", "x": "\u{1}\u{1f}\u{7f}"});
        assert!(agrees(&serde_json::to_vec(&escaped).unwrap_or_default()));
    }

    /// Keys the generator uses: the known ones, their nested ones and others.
    const KEYS: &[&str] = &[
        "model",
        "stream",
        "stream_options",
        "include_usage",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "generationConfig",
        "maxOutputTokens",
        "messages",
        "content",
        "mod\\u0065l",
        "x",
    ];
    /// Scalars, valid and not, of every kind a member may hold.
    const SCALARS: &[&str] = &[
        "null",
        "true",
        "false",
        "0",
        "7",
        "512",
        "-0",
        "-3",
        "1.5",
        "2e3",
        "1E-2",
        "01",
        "1.",
        "18446744073709551615",
        "18446744073709551616",
        "\"\"",
        "\"gpt\"",
        "\"a\\\"b\"",
        "\"\\u00e9\"",
        "\"\\ud83d\"",
        "\"\\q\"",
        "\"\u{e9}\"",
        // Escapes past the short words of the search, and runs of
        // backslashes before a quote.
        "\"a line of tool output\\n\\\"quoted\\\" \\\\ and a tail past the words\"",
        "\"\\\\\"",
        "\"x\\\\\\\"y\"",
        "tru",
        "nul",
        "+1",
        "-",
    ];
    const WS: &[&str] = &["", "", "", " ", "\n", "\t", "\r\n "];

    fn ws() -> impl Strategy<Value = String> {
        prop::sample::select(WS).prop_map(str::to_owned)
    }

    fn value() -> impl Strategy<Value = String> {
        let leaf = prop::sample::select(SCALARS).prop_map(str::to_owned);
        leaf.prop_recursive(3, 24, 4, |inner| {
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

    fn members(value: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
        prop::collection::vec((prop::sample::select(KEYS), ws(), value, ws()), 0..6).prop_map(|v| {
            let items: Vec<String> = v
                .into_iter()
                .map(|(k, a, x, b)| format!("{a}\"{k}\"{b}:{a}{x}{b}"))
                .collect();
            items.join(",")
        })
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        (ws(), members(value()), ws()).prop_map(|(a, m, b)| format!("{a}{{{m}}}{b}").into_bytes())
    }

    /// The bytes that steer the reader, for the damage the property test does.
    const STEERING_BYTES: &[u8] = b"\"\\{}[],:\n \x01t1-.e";

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn the_walk_agrees_with_serde(
            body in body(),
            damages in prop::collection::vec((any::<usize>(), any::<u8>()), 0..3),
        ) {
            let mut body = body;
            for (at, how) in damages {
                body = crate::usage::strict_json::damage(body, at, how, STEERING_BYTES);
            }
            agrees(&body);
        }
    }

    /// The generator must reach the walk's reading, or the property checks
    /// little.
    #[test]
    fn generated_bodies_are_often_read_by_the_walk() {
        use proptest::strategy::ValueTree;
        use proptest::test_runner::TestRunner;
        let mut runner = TestRunner::deterministic();
        let strategy = body();
        let read = (0..400)
            .filter(|_| agrees(&strategy.new_tree(&mut runner).unwrap().current()))
            .count();
        assert!(
            read > 100,
            "{read} of 400 generated bodies read by the walk"
        );
    }
}
