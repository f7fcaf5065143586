//! Opt-in budget guards (`budget.clamp_max_tokens`,
//! `budget.stop_streams_over_budget`).
//!
//! Clamping lowers a call's output limit to what the run's remaining budget
//! can pay for, instead of refusing the call: an agent close to its ceiling
//! gets a shorter answer rather than an error. The output-limit field is the
//! one the request already uses, else the provider's own name for it.

use bytes::Bytes;

use crate::config::RouteKind;
use crate::money::Money;
use crate::pricing::{PriceTable, Rates};

/// Fewest output tokens worth sending a call for; below this the call is
/// refused as it would be without the guard.
pub const MIN_CLAMPED_OUTPUT_TOKENS: u64 = 16;

/// Output tokens that `headroom` pays for after the prompt, for `model`.
pub fn affordable_output_tokens(
    pricing: &PriceTable,
    model: &str,
    prompt_tokens: u64,
    headroom: Money,
) -> Option<u64> {
    let found = pricing.lookup(model)?;
    let rates: Rates = found.price.rates(prompt_tokens);
    // Rates are femto-dollars per token; headroom is pico-dollars.
    let headroom_femto = u128::from(headroom.picos()) * 1_000;
    let prompt_femto = u128::from(prompt_tokens) * u128::from(rates.input);
    let left = headroom_femto.checked_sub(prompt_femto)?;
    if rates.output == 0 {
        return None;
    }
    let tokens = left / u128::from(rates.output);
    u64::try_from(tokens).ok()
}

/// The request body with its output limit set to `limit`; `None` when the
/// body is not a JSON object.
pub fn with_output_limit(kind: RouteKind, path: &str, body: &[u8], limit: u64) -> Option<Bytes> {
    let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let object = value.as_object_mut()?;
    let number = serde_json::Value::from(limit);
    match kind {
        RouteKind::Gemini => {
            let config = object
                .entry("generationConfig")
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
            config
                .as_object_mut()?
                .insert("maxOutputTokens".into(), number);
        }
        RouteKind::Anthropic => {
            object.insert("max_tokens".into(), number);
        }
        RouteKind::Openai | RouteKind::Tool => {
            let present: Vec<&str> = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
                .into_iter()
                .filter(|k| object.contains_key(*k))
                .collect();
            if present.is_empty() {
                let field = if path.ends_with("/responses") {
                    "max_output_tokens"
                } else if path.ends_with("/chat/completions") {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                };
                object.insert(field.into(), number);
            } else {
                for field in present {
                    object.insert(field.into(), number.clone());
                }
            }
        }
    }
    serde_json::to_vec(&value).ok().map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_the_field_in_use_or_the_providers_own() {
        let out = with_output_limit(
            RouteKind::Openai,
            "/v1/chat/completions",
            br#"{"max_tokens":4000}"#,
            50,
        )
        .unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out).unwrap()["max_tokens"],
            50
        );
        let out = with_output_limit(
            RouteKind::Openai,
            "/v1/chat/completions",
            br#"{"model":"o3"}"#,
            50,
        )
        .unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out).unwrap()["max_completion_tokens"],
            50
        );
        let out = with_output_limit(RouteKind::Openai, "/v1/responses", br#"{}"#, 50).unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out).unwrap()["max_output_tokens"],
            50
        );
        let out = with_output_limit(
            RouteKind::Gemini,
            "/v1beta/models/g:generateContent",
            br#"{}"#,
            50,
        )
        .unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out).unwrap()["generationConfig"]
                ["maxOutputTokens"],
            50
        );
        let out = with_output_limit(
            RouteKind::Anthropic,
            "/v1/messages",
            br#"{"max_tokens":1024}"#,
            50,
        )
        .unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out).unwrap()["max_tokens"],
            50
        );
        assert!(with_output_limit(RouteKind::Openai, "/v1/chat/completions", b"[1]", 50).is_none());
    }

    #[test]
    fn affordable_tokens_after_the_prompt() {
        let table = PriceTable::from_toml_str("[models.m]\ninput = 1\noutput = 10\n", "t").unwrap();
        // $1/M input, $10/M output: 1000 prompt tokens cost $0.001; $0.002 left pays 200 output tokens.
        let headroom = Money::parse_usd("0.003").unwrap();
        assert_eq!(
            affordable_output_tokens(&table, "m", 1000, headroom),
            Some(200)
        );
        assert_eq!(
            affordable_output_tokens(&table, "m", 10_000, headroom),
            None
        );
        assert_eq!(
            affordable_output_tokens(&table, "unknown", 10, headroom),
            None
        );
    }
}
