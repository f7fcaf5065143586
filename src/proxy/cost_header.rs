//! The value of the `x-agent-*-usd` response headers: decimal USD with
//! exactly 9 fraction digits, rounded half up (as
//! [`Money::to_header_value`]), written into a stack buffer: two of them go
//! out on every call, and `format!` with a padded field costs several times
//! the digits themselves.

use http::HeaderValue;

use crate::money::Money;

/// Nano-dollars per dollar.
const NANOS_PER_USD: u64 = 1_000_000_000;

/// `amount` as a header value, e.g. `0.000123457`.
pub fn usd(amount: Money) -> HeaderValue {
    let picos = amount.picos();
    // (picos + 500) / 1000, without overflowing at the top of the range.
    let nanos = picos / 1_000 + u64::from(picos % 1_000 >= 500);
    let mut whole = itoa::Buffer::new();
    let whole = whole.format(nanos / NANOS_PER_USD).as_bytes();
    // At most 20 digits, the dot and 9 fraction digits.
    let mut text = [b'0'; 30];
    text[..whole.len()].copy_from_slice(whole);
    text[whole.len()] = b'.';
    let end = whole.len() + 10;
    let mut fraction = nanos % NANOS_PER_USD;
    for digit in text[whole.len() + 1..end].iter_mut().rev() {
        *digit = b'0' + (fraction % 10) as u8;
        fraction /= 10;
    }
    match HeaderValue::from_bytes(&text[..end]) {
        Ok(value) => value,
        // Digits and a dot are always a valid header value.
        Err(_) => HeaderValue::from_static("0.000000000"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_money_header_form() {
        let picos = [
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
        ];
        for p in picos {
            let money = Money::from_picos(p);
            assert_eq!(usd(money), money.to_header_value().as_str(), "{p} pUSD");
        }
        assert_eq!(usd(Money::from_picos(1_500)), "0.000000002");
        assert_eq!(usd(Money::parse_usd("1.5").unwrap()), "1.500000000");
    }

    #[test]
    fn the_top_of_the_range_rounds_without_overflow() {
        assert_eq!(usd(Money::MAX), "18446744.073709552");
    }
}
