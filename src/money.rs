//! Exact money.
//!
//! Every amount inside tollgate is an integer number of pico-dollars
//! (1 USD = 10^12 pUSD) held in a `u64`, which covers up to about 18 million
//! USD per counter. Floating point appears only at the edges: when a
//! Prometheus counter is exported and when a config value is read. Config
//! values are read through their shortest decimal representation, so `0.1`
//! becomes exactly 100_000_000_000 pUSD, never 99_999_999_999.

use std::fmt;

/// Pico-dollars per dollar.
pub const PICOS_PER_USD: u64 = 1_000_000_000_000;

/// An amount of US dollars, exact to the pico-dollar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(u64);

/// Why a decimal string is not an amount of money.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("`{0}` is not a non-negative decimal number")]
    NotDecimal(String),
    #[error("`{0}` has more than 12 fraction digits")]
    TooPrecise(String),
    #[error("`{0}` is too large")]
    TooLarge(String),
}

impl Money {
    pub const ZERO: Money = Money(0);
    pub const MAX: Money = Money(u64::MAX);

    pub const fn from_picos(picos: u64) -> Money {
        Money(picos)
    }

    pub const fn picos(self) -> u64 {
        self.0
    }

    /// Whole nano-dollars, rounded down (for storage that wants a coarser unit).
    pub const fn nanos(self) -> u64 {
        self.0 / 1_000
    }

    pub fn saturating_add(self, other: Money) -> Money {
        Money(self.0.saturating_add(other.0))
    }

    pub fn saturating_sub(self, other: Money) -> Money {
        Money(self.0.saturating_sub(other.0))
    }

    /// The amount as floating-point USD, for exporters only.
    pub fn as_usd_f64(self) -> f64 {
        // Split so that amounts below 2^53 pUSD (~9000 USD) convert exactly
        // up to the last representable digit and larger ones lose nothing
        // significant.
        (self.0 / PICOS_PER_USD) as f64 + (self.0 % PICOS_PER_USD) as f64 / PICOS_PER_USD as f64
    }

    /// Parses a decimal USD string such as `"0.25"`, `"5"` or `"1e-3"`.
    pub fn parse_usd(text: &str) -> Result<Money, MoneyError> {
        parse_decimal_scaled(text, 12)
            .map(Money)
            .map_err(|kind| kind.with_text(text))
    }

    /// Converts a config float (TOML or JSON number) exactly, through its
    /// shortest round-trip decimal representation.
    pub fn from_usd_f64(value: f64) -> Result<Money, MoneyError> {
        if !value.is_finite() || value < 0.0 {
            return Err(MoneyError::NotDecimal(value.to_string()));
        }
        Money::parse_usd(&format!("{value}"))
    }

    /// Decimal USD with exactly 9 fraction digits, rounded half up
    /// (the form of the `x-agent-*-usd` response headers).
    pub fn to_header_value(self) -> String {
        self.header_digits().as_str().to_owned()
    }

    /// [`Money::to_header_value`] on the stack: two such headers go out on
    /// every call, and `format!` with a padded field costs several times
    /// the digits themselves.
    pub fn header_digits(self) -> Digits {
        // (picos + 500) / 1000, without overflowing at the top of the range.
        let nanos = self.0 / 1_000 + u64::from(self.0 % 1_000 >= 500);
        Digits::decimal(nanos / NANOS_PER_USD, nanos % NANOS_PER_USD, 9)
    }

    /// Full precision with trailing zeros trimmed (`0.000123`, `5`), on
    /// the stack: the form of [`fmt::Display`], which the per-call log line
    /// writes without going through `fmt`.
    pub fn decimal_digits(self) -> Digits {
        let mut fraction = self.0 % PICOS_PER_USD;
        let mut places = 12;
        while places > 0 && fraction.is_multiple_of(10) {
            fraction /= 10;
            places -= 1;
        }
        Digits::decimal(self.0 / PICOS_PER_USD, fraction, places)
    }
}

/// Nano-dollars per dollar (the precision of the cost headers).
const NANOS_PER_USD: u64 = 1_000_000_000;

/// At most 20 whole digits, the dot and 12 fraction digits.
const DIGITS_MAX: usize = 33;

/// An amount written out in decimal on the stack (see
/// [`Money::header_digits`] and [`Money::decimal_digits`]).
pub struct Digits {
    bytes: [u8; DIGITS_MAX],
    len: usize,
}

impl Digits {
    /// `whole`, then (unless `places` is 0) a dot and `fraction` zero-padded
    /// on the left to `places` digits; `places` is at most 12 and
    /// `fraction` below 10^`places`.
    fn decimal(whole: u64, mut fraction: u64, places: usize) -> Digits {
        let mut whole_digits = itoa::Buffer::new();
        let whole = whole_digits.format(whole).as_bytes();
        let mut digits = Digits {
            bytes: [b'0'; DIGITS_MAX],
            len: whole.len(),
        };
        digits.bytes[..whole.len()].copy_from_slice(whole);
        if places > 0 {
            digits.bytes[whole.len()] = b'.';
            digits.len = whole.len() + 1 + places;
            for digit in digits.bytes[whole.len() + 1..digits.len].iter_mut().rev() {
                *digit = b'0' + (fraction % 10) as u8;
                fraction /= 10;
            }
        }
        digits
    }

    pub fn as_str(&self) -> &str {
        // ASCII digits and a dot, written above.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("0")
    }
}

impl fmt::Display for Money {
    /// Full precision, trailing zeros trimmed: `0.000123`, `5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.decimal_digits().as_str())
    }
}

impl std::iter::Sum for Money {
    fn sum<I: Iterator<Item = Money>>(iter: I) -> Money {
        iter.fold(Money::ZERO, Money::saturating_add)
    }
}

/// The failure of [`parse_decimal_scaled`], before the text is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecimalError {
    NotDecimal,
    TooPrecise,
    TooLarge,
}

impl DecimalError {
    fn with_text(self, text: &str) -> MoneyError {
        match self {
            DecimalError::NotDecimal => MoneyError::NotDecimal(text.to_string()),
            DecimalError::TooPrecise => MoneyError::TooPrecise(text.to_string()),
            DecimalError::TooLarge => MoneyError::TooLarge(text.to_string()),
        }
    }
}

/// Parses a non-negative decimal (`12`, `0.5`, `7.5e-8`, `1E+2`) into an
/// integer scaled by `10^scale`, exactly. Digits beyond the scale must be
/// zeros, else `TooPrecise`.
pub fn parse_decimal_scaled(text: &str, scale: u32) -> Result<u64, DecimalError> {
    let text = text.trim();
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => {
            let exp: i32 = text[i + 1..]
                .parse()
                .map_err(|_| DecimalError::NotDecimal)?;
            (&text[..i], exp)
        }
        None => (text, 0),
    };
    let mantissa = mantissa.strip_prefix('+').unwrap_or(mantissa);
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((i, f)) => (i, f),
        None => (mantissa, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(DecimalError::NotDecimal);
    }
    if !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(DecimalError::NotDecimal);
    }
    // value = digits * 10^(exponent - frac_len); scaled = digits * 10^(exponent - frac_len + scale)
    let digits = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    let shift = exponent as i64 - frac_part.len() as i64 + scale as i64;
    if digits.is_empty() {
        return Ok(0);
    }
    let (kept, dropped) = if shift >= 0 {
        (digits, "")
    } else {
        let cut = digits.len() as i64 + shift;
        if cut <= 0 {
            ("", digits)
        } else {
            digits.split_at(cut as usize)
        }
    };
    if dropped.bytes().any(|b| b != b'0') {
        return Err(DecimalError::TooPrecise);
    }
    let mut value: u64 = 0;
    for b in kept.bytes() {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or(DecimalError::TooLarge)?;
    }
    if shift > 0 {
        let factor = 10u64
            .checked_pow(shift as u32)
            .ok_or(DecimalError::TooLarge)?;
        value = value.checked_mul(factor).ok_or(DecimalError::TooLarge)?;
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_digits_round_half_up_to_nine_places() {
        // The reference: the same rounding in 128 bits, where the top of
        // the range cannot overflow.
        let reference = |picos: u64| {
            let nanos = (u128::from(picos) + 500) / 1_000;
            format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000)
        };
        for picos in [
            0,
            1,
            499,
            500,
            999,
            1_000,
            1_499,
            1_500,
            123_456_789,
            999_999_999_499,
            999_999_999_500,
            1_000_000_000_000,
            12_345_678_901_234,
            100_000 * 1_000_000_000_000,
            u64::MAX / 2,
            u64::MAX - 500,
            u64::MAX,
        ] {
            let money = Money::from_picos(picos);
            assert_eq!(
                money.header_digits().as_str(),
                reference(picos),
                "{picos} pUSD"
            );
            assert_eq!(money.to_header_value(), reference(picos), "{picos} pUSD");
        }
        assert_eq!(Money::from_picos(1_500).to_header_value(), "0.000000002");
        assert_eq!(
            Money::parse_usd("1.5").unwrap().to_header_value(),
            "1.500000000"
        );
        assert_eq!(Money::MAX.to_header_value(), "18446744.073709552");
    }

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(Money::parse_usd("0.1").unwrap().picos(), 100_000_000_000);
        assert_eq!(Money::parse_usd("5").unwrap().picos(), 5 * PICOS_PER_USD);
        assert_eq!(Money::parse_usd("7.5e-8").unwrap().picos(), 75_000);
        assert_eq!(Money::parse_usd("0.000000000001").unwrap().picos(), 1);
        assert_eq!(Money::from_usd_f64(0.1).unwrap().picos(), 100_000_000_000);
        assert_eq!(Money::from_usd_f64(2.5e-7).unwrap().picos(), 250_000);
    }

    #[test]
    fn rejects_bad_text() {
        assert!(matches!(
            Money::parse_usd("-1"),
            Err(MoneyError::NotDecimal(_))
        ));
        assert!(matches!(
            Money::parse_usd("abc"),
            Err(MoneyError::NotDecimal(_))
        ));
        assert!(matches!(
            Money::parse_usd("."),
            Err(MoneyError::NotDecimal(_))
        ));
        assert!(matches!(
            Money::parse_usd("1e-13"),
            Err(MoneyError::TooPrecise(_))
        ));
        assert!(matches!(
            Money::parse_usd("1e30"),
            Err(MoneyError::TooLarge(_))
        ));
        assert!(Money::from_usd_f64(f64::NAN).is_err());
    }

    #[test]
    fn formats_for_headers_and_display() {
        let m = Money::parse_usd("0.0001234565").unwrap();
        assert_eq!(m.to_header_value(), "0.000123457");
        assert_eq!(m.to_string(), "0.0001234565");
        assert_eq!(Money::parse_usd("3").unwrap().to_string(), "3");
        for text in [
            "0",
            "10",
            "12345.5",
            "0.000000000001",
            "1.000000000001",
            "100.000001",
            "0.1",
            "7.25",
        ] {
            assert_eq!(Money::parse_usd(text).unwrap().to_string(), text);
        }
        assert_eq!(Money::MAX.to_string(), "18446744.073709551615");
        assert_eq!(Money::ZERO.to_header_value(), "0.000000000");
    }

    #[test]
    fn scaled_parse_handles_exponents() {
        assert_eq!(parse_decimal_scaled("1.25e-07", 15), Ok(125_000_000));
        assert_eq!(parse_decimal_scaled("2.00", 6), Ok(2_000_000));
        assert_eq!(parse_decimal_scaled("0", 6), Ok(0));
    }
}
