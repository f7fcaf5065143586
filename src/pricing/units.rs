//! Price units: every price is held as an integer number of femto-dollars
//! (10^-15 USD) per token, which represents every published per-token price
//! exactly (the smallest real ones are around 10^-9 USD per token).

use crate::money::{parse_decimal_scaled, DecimalError};

/// Decimal places of a femto-dollar amount, per token.
pub(crate) const FEMTO_SCALE_PER_TOKEN: u32 = 15;
/// Decimal places of a femto-dollar per-token price written as USD per
/// million tokens (10^15 / 10^6).
pub(crate) const FEMTO_SCALE_PER_MILLION: u32 = 9;

/// Why a price text is not a price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PriceProblem {
    Negative,
    NotANumber,
    TooPrecise,
    TooLarge,
}

impl PriceProblem {
    pub(crate) fn describe(&self, text: &str, unit: &str) -> String {
        match self {
            PriceProblem::Negative => format!("`{text}` is negative; prices are >= 0"),
            PriceProblem::NotANumber => format!("`{text}` is not a decimal number"),
            PriceProblem::TooPrecise => {
                format!("`{text}` has more precision than 1e-15 USD per token ({unit})")
            }
            PriceProblem::TooLarge => format!("`{text}` is too large"),
        }
    }
}

impl From<DecimalError> for PriceProblem {
    fn from(e: DecimalError) -> Self {
        match e {
            DecimalError::NotDecimal => PriceProblem::NotANumber,
            DecimalError::TooPrecise => PriceProblem::TooPrecise,
            DecimalError::TooLarge => PriceProblem::TooLarge,
        }
    }
}

/// Exact decimal text -> femto-dollars per token. `scale` is the number of
/// fraction digits of the text's unit that a femto-dollar per token still
/// holds: 15 for USD per token, 9 for USD per million tokens.
pub(crate) fn parse_exact(text: &str, scale: u32) -> Result<u64, PriceProblem> {
    if text.trim_start().starts_with('-') {
        return Err(PriceProblem::Negative);
    }
    Ok(parse_decimal_scaled(text, scale)?)
}

/// A JSON float -> femto-dollars per token, read through its shortest
/// decimal representation (`format!("{}")`), so `1.25e-7` is exactly
/// 125_000_000 femto-dollars.
///
/// Returns `(value, rounded)`. A value whose shortest representation has 16
/// or more significant digits (`8.900000000000001e-7`) is a binary-float
/// artefact of whoever computed it, not a price someone set; it is rounded
/// half up to the femto-dollar when that moves it by at most a billionth of
/// its value, and `rounded` is true. Any other value finer than a femto-dollar is
/// `TooPrecise`.
pub(crate) fn parse_float_per_token(value: f64) -> Result<(u64, bool), PriceProblem> {
    if value.is_nan() || value.is_infinite() {
        return Err(PriceProblem::NotANumber);
    }
    if value < 0.0 {
        return Err(PriceProblem::Negative);
    }
    let text = format!("{value}");
    match parse_decimal_scaled(&text, FEMTO_SCALE_PER_TOKEN) {
        Ok(v) => Ok((v, false)),
        Err(DecimalError::TooPrecise) => round_artefact(&text, FEMTO_SCALE_PER_TOKEN)
            .map(|v| (v, true))
            .ok_or(PriceProblem::TooPrecise),
        Err(e) => Err(e.into()),
    }
}

/// Rounds a plain decimal (`0.0000008900000000000001`, as `f64` Display
/// writes it: no exponent) half up to `scale` fraction digits when it looks
/// like a float artefact (see [`parse_float_per_token`]).
fn round_artefact(text: &str, scale: u32) -> Option<u64> {
    let (int_part, frac_part) = text.split_once('.').unwrap_or((text, ""));
    if !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let all: String = format!("{int_part}{frac_part}");
    // Position of the scale boundary inside `all`.
    let cut = int_part.len() + scale as usize;
    if cut >= all.len() {
        return None; // not finer than the scale: parse_exact would have accepted it
    }
    let first_sig = all.bytes().position(|b| b != b'0')?;
    let last_sig = all.bytes().rposition(|b| b != b'0')?;
    let (kept, dropped) = all.split_at(cut);
    let round_up = dropped.as_bytes().first().is_some_and(|&b| b >= b'5');
    // The rounding moves the value by less than 10^-z femto-dollars, where
    // z counts the dropped digits that are all 0 (rounding down) or all 9
    // (rounding up). Accept a move of at most 1e-9 of the value, which is
    // at least 10^(kept_significant - 1) femto-dollars.
    let noise = if round_up { b'9' } else { b'0' };
    let z = dropped.bytes().take_while(|&b| b == noise).count();
    let kept_significant = cut.saturating_sub(first_sig);
    if last_sig + 1 - first_sig < 16 || z + kept_significant < 10 {
        return None;
    }
    let mut value: u64 = 0;
    for b in kept.bytes() {
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    if round_up {
        value = value.checked_add(1)?;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_read_through_shortest_representation() {
        assert_eq!(parse_float_per_token(1.25e-7), Ok((125_000_000, false)));
        assert_eq!(parse_float_per_token(3.75e-8), Ok((37_500_000, false)));
        assert_eq!(parse_float_per_token(0.0), Ok((0, false)));
        assert_eq!(parse_float_per_token(1e-15), Ok((1, false)));
        assert_eq!(parse_float_per_token(-1e-6), Err(PriceProblem::Negative));
        assert_eq!(
            parse_float_per_token(f64::NAN),
            Err(PriceProblem::NotANumber)
        );
    }

    #[test]
    fn float_artefacts_round_to_the_intended_price() {
        assert_eq!(
            parse_float_per_token(8.900000000000001e-07),
            Ok((890_000_000, true))
        );
        assert_eq!(
            parse_float_per_token(1.5000020000000002e-05),
            Ok((15_000_020_000, true))
        );
        assert_eq!(
            parse_float_per_token(9.499999999999999e-07),
            Ok((950_000_000, true))
        );
        assert_eq!(
            parse_float_per_token(3.0001999999999996e-07),
            Ok((300_020_000, true))
        );
    }

    #[test]
    fn real_sub_femto_prices_are_errors() {
        assert_eq!(parse_float_per_token(1e-16), Err(PriceProblem::TooPrecise));
        assert_eq!(
            parse_float_per_token(1.5e-16),
            Err(PriceProblem::TooPrecise)
        );
        // 16 significant digits but fewer than 10 above the femto place.
        assert_eq!(
            parse_float_per_token(1.234567890123456e-10),
            Err(PriceProblem::TooPrecise)
        );
    }

    #[test]
    fn per_million_text_is_exact() {
        assert_eq!(
            parse_exact("2.00", FEMTO_SCALE_PER_MILLION),
            Ok(2_000_000_000)
        );
        assert_eq!(
            parse_exact("0.075", FEMTO_SCALE_PER_MILLION),
            Ok(75_000_000)
        );
        assert_eq!(parse_exact("1e-9", FEMTO_SCALE_PER_MILLION), Ok(1));
        assert_eq!(
            parse_exact("1e-10", FEMTO_SCALE_PER_MILLION),
            Err(PriceProblem::TooPrecise)
        );
        assert_eq!(
            parse_exact("-1", FEMTO_SCALE_PER_MILLION),
            Err(PriceProblem::Negative)
        );
        assert_eq!(
            parse_exact("abc", FEMTO_SCALE_PER_MILLION),
            Err(PriceProblem::NotANumber)
        );
    }
}
