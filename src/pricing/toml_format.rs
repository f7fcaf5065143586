//! tollgate's own price file: USD per million tokens, written as exact
//! decimals (the format is documented in the header of
//! `config/pricing.toml`).
//!
//! ```toml
//! [models."gemini-2.5-pro"]
//! input = 1.25
//! output = 10.00
//! cached_input = 0.125
//! max_output_tokens = 65535
//!
//! [models."gemini-2.5-pro".long_context]   # prompts above 200k tokens
//! above_input_tokens = 200000              # optional, default 200000
//! input = 2.50
//! output = 15.00
//! ```
//!
//! Numbers may be TOML integers, floats (read through their shortest
//! decimal representation, so `0.1` is exactly 0.1) or strings (`"0.075"`).

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use super::units::{parse_exact, PriceProblem, FEMTO_SCALE_PER_MILLION};
use super::{LongContextPrice, ModelPrice, Parsed, PricingError, DEFAULT_LONG_CONTEXT_THRESHOLD};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    models: BTreeMap<String, Spanned<RawModel>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Chat,
    Embedding,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    mode: Option<Spanned<Mode>>,
    input: Option<Spanned<RawNumber>>,
    output: Option<Spanned<RawNumber>>,
    cached_input: Option<Spanned<RawNumber>>,
    cache_write: Option<Spanned<RawNumber>>,
    cache_write_1h: Option<Spanned<RawNumber>>,
    max_output_tokens: Option<Spanned<i64>>,
    long_context: Option<Spanned<RawTier>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    above_input_tokens: Option<Spanned<i64>>,
    input: Option<Spanned<RawNumber>>,
    output: Option<Spanned<RawNumber>>,
    cached_input: Option<Spanned<RawNumber>>,
    cache_write: Option<Spanned<RawNumber>>,
    cache_write_1h: Option<Spanned<RawNumber>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawNumber {
    Int(i64),
    Float(f64),
    Text(String),
}

/// Only the model tables' positions, to name the model an error is in.
#[derive(Deserialize)]
struct ModelSpans {
    #[serde(default)]
    models: BTreeMap<String, Spanned<toml::Value>>,
}

pub(crate) fn parse(text: &str, origin: &str) -> Result<Parsed, PricingError> {
    let raw: RawFile = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => return Err(syntax_error(text, origin, &e)),
    };
    let mut entries = Vec::with_capacity(raw.models.len());
    for (name, model) in raw.models {
        let span = model.span();
        let ctx = Ctx {
            text,
            origin,
            model: &name,
        };
        let price = convert(&ctx, span, model.into_inner())?;
        entries.push((name, price));
    }
    Ok(Parsed {
        entries,
        warnings: Vec::new(),
    })
}

/// Turns a deserialization error into one line naming the file, the line
/// and, when the error lies inside a model table, the model.
fn syntax_error(text: &str, origin: &str, e: &toml::de::Error) -> PricingError {
    let line = e.span().map(|s| line_of(text, s.start));
    let message = e.message().trim().to_string();
    let model = e.span().and_then(|err| {
        let spans: ModelSpans = toml::from_str(text).ok()?;
        spans
            .models
            .iter()
            .filter(|(_, v)| v.span().start <= err.start && err.start < v.span().end)
            .min_by_key(|(_, v)| v.span().len())
            .map(|(name, _)| name.clone())
            .or_else(|| model_by_header(text, err.start))
    });
    match model {
        Some(model) => PricingError::Entry {
            file: origin.to_string(),
            line,
            model,
            message,
        },
        None => PricingError::Syntax {
            file: origin.to_string(),
            line,
            message,
        },
    }
}

/// The model of the nearest `[models."…"]` header above `offset` (the span
/// of a header table does not always cover its keys).
fn model_by_header(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    before.lines().rev().find_map(|line| {
        let line = line.trim();
        let inner = line.strip_prefix('[')?.strip_suffix(']')?;
        let inner = inner.trim().strip_prefix("models.")?;
        let name = match inner.strip_prefix('"') {
            Some(quoted) => quoted.split('"').next()?,
            None => inner.split('.').next()?,
        };
        Some(name.to_string())
    })
}

pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

struct Ctx<'a> {
    text: &'a str,
    origin: &'a str,
    model: &'a str,
}

impl Ctx<'_> {
    fn entry_error(&self, span: Range<usize>, message: String) -> PricingError {
        PricingError::Entry {
            file: self.origin.to_string(),
            line: Some(line_of(self.text, span.start)),
            model: self.model.to_string(),
            message,
        }
    }

    fn field_error(&self, span: Range<usize>, field: &str, message: String) -> PricingError {
        PricingError::Field {
            file: self.origin.to_string(),
            line: Some(line_of(self.text, span.start)),
            model: self.model.to_string(),
            field: field.to_string(),
            message,
        }
    }

    fn price(
        &self,
        field: &str,
        value: Option<Spanned<RawNumber>>,
    ) -> Result<Option<u64>, PricingError> {
        let Some(value) = value else {
            return Ok(None);
        };
        let span = value.span();
        let text = match value.into_inner() {
            RawNumber::Int(i) => i.to_string(),
            RawNumber::Float(f) => format!("{f}"),
            RawNumber::Text(s) => s,
        };
        parse_exact(&text, FEMTO_SCALE_PER_MILLION)
            .map(Some)
            .map_err(|p: PriceProblem| {
                self.field_error(span, field, p.describe(&text, "USD per million tokens"))
            })
    }

    fn count(&self, field: &str, value: Option<Spanned<i64>>) -> Result<Option<u64>, PricingError> {
        let Some(value) = value else {
            return Ok(None);
        };
        let span = value.span();
        let n = *value.get_ref();
        u64::try_from(n).map(Some).map_err(|_| {
            self.field_error(
                span,
                field,
                format!("`{n}` is negative; a token count is >= 0"),
            )
        })
    }
}

fn convert(ctx: &Ctx<'_>, span: Range<usize>, raw: RawModel) -> Result<ModelPrice, PricingError> {
    let mode = raw.mode.map_or(Mode::Chat, |m| *m.get_ref());
    let input = ctx
        .price("input", raw.input)?
        .ok_or_else(|| ctx.entry_error(span.clone(), "missing field `input`".to_string()))?;
    let output = match ctx.price("output", raw.output)? {
        Some(output) => output,
        None if mode == Mode::Embedding => 0,
        None => {
            return Err(ctx.entry_error(
                span,
                "missing field `output` (only entries with mode = \"embedding\" may omit it)"
                    .to_string(),
            ))
        }
    };
    let long_context = match raw.long_context {
        Some(tier) => {
            let tier_span = tier.span();
            let tier = tier.into_inner();
            let converted = LongContextPrice {
                above_input_tokens: ctx
                    .count("long_context.above_input_tokens", tier.above_input_tokens)?
                    .unwrap_or(DEFAULT_LONG_CONTEXT_THRESHOLD),
                input: ctx.price("long_context.input", tier.input)?,
                output: ctx.price("long_context.output", tier.output)?,
                cached_input: ctx.price("long_context.cached_input", tier.cached_input)?,
                cache_write: ctx.price("long_context.cache_write", tier.cache_write)?,
                cache_write_1h: ctx.price("long_context.cache_write_1h", tier.cache_write_1h)?,
            };
            let names_a_price = [
                converted.input,
                converted.output,
                converted.cached_input,
                converted.cache_write,
                converted.cache_write_1h,
            ]
            .iter()
            .any(Option::is_some);
            if !names_a_price {
                return Err(ctx.entry_error(tier_span, "`long_context` names no price".to_string()));
            }
            Some(converted)
        }
        None => None,
    };
    Ok(ModelPrice {
        input,
        output,
        cached_input: ctx.price("cached_input", raw.cached_input)?,
        cache_write: ctx.price("cache_write", raw.cache_write)?,
        cache_write_1h: ctx.price("cache_write_1h", raw.cache_write_1h)?,
        long_context,
        max_output_tokens: ctx.count("max_output_tokens", raw.max_output_tokens)?,
    })
}
