//! LiteLLM's `model_prices_and_context_window.json`: one object per model
//! name, USD per token as JSON numbers.
//!
//! Read: `input_cost_per_token`, `output_cost_per_token`,
//! `cache_read_input_token_cost`, `cache_creation_input_token_cost`,
//! `cache_creation_input_token_cost_above_1hr`, the same five with an
//! `_above_<N>k_tokens` suffix (the long-context tier, threshold N×1000
//! input tokens), and `max_output_tokens`. Everything else (batch, flex and
//! priority prices, audio, images, per-second prices) is ignored.
//!
//! Skipped without failing: `sample_spec`, values that are not objects, and
//! entries without `input_cost_per_token` (images, audio, per-second or
//! per-request priced models). An entry with an input price but no output
//! price is an error in the text-generating modes (`chat`, `completion`,
//! `responses`, `realtime`, no mode) and has output price 0 otherwise
//! (embeddings, moderation, rerank…).

use serde_json::{Map, Value};

use super::units::{parse_float_per_token, PriceProblem};
use super::{LongContextPrice, ModelPrice, Parsed, PricingError};

const SKIPPED_KEYS: &[&str] = &["sample_spec"];
const TEXT_MODES: &[&str] = &["chat", "completion", "responses", "realtime"];

const INPUT: &str = "input_cost_per_token";
const OUTPUT: &str = "output_cost_per_token";
const CACHE_READ: &str = "cache_read_input_token_cost";
const CACHE_WRITE: &str = "cache_creation_input_token_cost";
const CACHE_WRITE_1H: &str = "cache_creation_input_token_cost_above_1hr";

pub(crate) fn parse(text: &str, origin: &str) -> Result<Parsed, PricingError> {
    let map: Map<String, Value> = serde_json::from_str(text).map_err(|e| PricingError::Syntax {
        file: origin.to_string(),
        line: Some(e.line()),
        message: e.to_string(),
    })?;
    let mut entries = Vec::with_capacity(map.len());
    let mut warnings = Vec::new();
    let mut skipped = 0usize;
    for (name, value) in &map {
        if SKIPPED_KEYS.contains(&name.as_str()) {
            continue;
        }
        let Some(object) = value.as_object() else {
            skipped += 1;
            continue;
        };
        let ctx = Ctx {
            origin,
            model: name,
            object,
        };
        match ctx.convert(&mut warnings)? {
            Some(price) => entries.push((name.clone(), price)),
            None => skipped += 1,
        }
    }
    if skipped > 0 {
        warnings.push(format!(
            "pricing file {origin}: skipped {skipped} entries without a per-token input price"
        ));
    }
    Ok(Parsed { entries, warnings })
}

struct Ctx<'a> {
    origin: &'a str,
    model: &'a str,
    object: &'a Map<String, Value>,
}

impl Ctx<'_> {
    fn field_error(&self, field: &str, message: String) -> PricingError {
        PricingError::Field {
            file: self.origin.to_string(),
            line: None,
            model: self.model.to_string(),
            field: field.to_string(),
            message,
        }
    }

    /// A per-token price field, exact (see `units::parse_float_per_token`).
    fn price(&self, field: &str, warnings: &mut Vec<String>) -> Result<Option<u64>, PricingError> {
        let value = match self.object.get(field) {
            None | Some(Value::Null) => return Ok(None),
            Some(v) => v,
        };
        let Value::Number(number) = value else {
            return Err(self.field_error(field, format!("`{value}` is not a number")));
        };
        if let Some(whole) = number.as_u64() {
            return whole
                .checked_mul(1_000_000_000_000_000)
                .map(Some)
                .ok_or_else(|| {
                    self.field_error(
                        field,
                        PriceProblem::TooLarge.describe(&number.to_string(), "USD per token"),
                    )
                });
        }
        if number.is_i64() {
            return Err(self.field_error(
                field,
                PriceProblem::Negative.describe(&number.to_string(), "USD per token"),
            ));
        }
        let float = number.as_f64().unwrap_or(f64::NAN);
        match parse_float_per_token(float) {
            Ok((femtos, rounded)) => {
                if rounded {
                    warnings.push(format!(
                        "pricing file {}: model `{}`, field `{field}`: {float:e} rounded to {femtos}e-15 USD per token",
                        self.origin, self.model
                    ));
                }
                Ok(Some(femtos))
            }
            Err(problem) => Err(self.field_error(
                field,
                problem.describe(&format!("{float:e}"), "USD per token"),
            )),
        }
    }

    fn convert(&self, warnings: &mut Vec<String>) -> Result<Option<ModelPrice>, PricingError> {
        let Some(input) = self.price(INPUT, warnings)? else {
            return Ok(None);
        };
        let output = match self.price(OUTPUT, warnings)? {
            Some(output) => output,
            None => {
                let mode = self.object.get("mode").and_then(Value::as_str);
                if mode.is_none_or(|m| TEXT_MODES.contains(&m)) {
                    return Err(PricingError::Entry {
                        file: self.origin.to_string(),
                        line: None,
                        model: self.model.to_string(),
                        message: format!(
                            "has `{INPUT}` but no `{OUTPUT}` (mode `{}`)",
                            mode.unwrap_or("none")
                        ),
                    });
                }
                0
            }
        };
        let max_output_tokens = match self.object.get("max_output_tokens") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                self.field_error(
                    "max_output_tokens",
                    format!("`{v}` is not a non-negative integer"),
                )
            })?),
        };
        Ok(Some(ModelPrice {
            input,
            output,
            cached_input: self.price(CACHE_READ, warnings)?,
            cache_write: self.price(CACHE_WRITE, warnings)?,
            cache_write_1h: self.price(CACHE_WRITE_1H, warnings)?,
            long_context: self.tier(warnings)?,
            max_output_tokens,
        }))
    }

    /// The `_above_<N>k_tokens` prices. With several thresholds (none in
    /// LiteLLM's data today) the lowest is used and a warning noted.
    fn tier(&self, warnings: &mut Vec<String>) -> Result<Option<LongContextPrice>, PricingError> {
        let mut thresholds: Vec<u64> = self
            .object
            .keys()
            .filter_map(|key| tier_threshold(key))
            .collect();
        thresholds.sort_unstable();
        thresholds.dedup();
        let Some(&kilo) = thresholds.first() else {
            return Ok(None);
        };
        if thresholds.len() > 1 {
            warnings.push(format!(
                "pricing file {}: model `{}`: several long-context thresholds {thresholds:?}k; using {kilo}k",
                self.origin, self.model
            ));
        }
        let suffix = format!("_above_{kilo}k_tokens");
        let field = |base: &str| format!("{base}{suffix}");
        Ok(Some(LongContextPrice {
            above_input_tokens: kilo.saturating_mul(1_000),
            input: self.price(&field(INPUT), warnings)?,
            output: self.price(&field(OUTPUT), warnings)?,
            cached_input: self.price(&field(CACHE_READ), warnings)?,
            cache_write: self.price(&field(CACHE_WRITE), warnings)?,
            cache_write_1h: self.price(&field(CACHE_WRITE_1H), warnings)?,
        }))
    }
}

/// `input_cost_per_token_above_200k_tokens` -> `Some(200)` for the five
/// token-price fields; `None` for anything else (audio, batches, priority…).
fn tier_threshold(key: &str) -> Option<u64> {
    let rest = [CACHE_WRITE_1H, INPUT, OUTPUT, CACHE_READ, CACHE_WRITE]
        .iter()
        .find_map(|base| key.strip_prefix(base)?.strip_prefix("_above_"))?;
    let kilo = rest.strip_suffix("k_tokens")?;
    if kilo.is_empty() || !kilo.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    kilo.parse().ok()
}
