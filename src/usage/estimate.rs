//! Token estimate for calls whose usage could not be read (SPEC §4: such a
//! call is charged an estimate, marked `estimated`, never silently zero).
//!
//! Ratios:
//! - Text: about 4 bytes per token. That is the usual figure for English
//!   with the BPE vocabularies of OpenAI, Anthropic and Gemini models (OpenAI
//!   documents "~4 characters per token"); code and most European languages
//!   sit close to it, CJK text is denser in tokens per byte but also takes 3
//!   bytes per character in UTF-8, which brings it back near the same order.
//! - Prompt: the request body is JSON, so its bytes include keys, quotes,
//!   role names and escapes that are not prompt text. Counting them at the
//!   text ratio overestimates somewhat; that bias is deliberate, because an
//!   estimate that errs low lets a runaway run through its budget, while one
//!   that errs high is visible (the call is flagged `estimated`) and bounded.
//! - Output: the bytes of generated text the tap saw (`output_text_bytes`,
//!   content deltas and text parts), at the text ratio. If no text could be
//!   seen at all (undecodable body, unknown format), the decoded body size is
//!   used instead, again as a deliberate upper bound: framing cannot be told
//!   apart from text there.
//!
//! Every count the provider did report is kept; only missing input/output
//! counts are filled in.

use super::{Observation, Usage};

/// Bytes per token assumed for text.
pub const BYTES_PER_TOKEN: u64 = 4;

fn tokens(bytes: u64) -> u64 {
    bytes.div_ceil(BYTES_PER_TOKEN)
}

/// Estimated usage for a call: reported fields are kept, missing input and
/// output counts are estimated from sizes (see the module documentation).
pub fn estimate(request_body_bytes: u64, observation: &Observation) -> Usage {
    let mut u = observation.usage.clone().unwrap_or_default();
    if u.input_tokens.is_none() {
        u.input_tokens = Some(tokens(request_body_bytes));
    }
    if u.output_tokens.is_none() {
        let bytes = if observation.output_text_bytes > 0 {
            observation.output_text_bytes
        } else {
            observation.body_bytes
        };
        u.output_tokens = Some(tokens(bytes));
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::Outcome;

    fn obs(usage: Option<Usage>, text: u64, body: u64) -> Observation {
        Observation {
            usage,
            model: None,
            outcome: Outcome::Incomplete,
            parse_error: false,
            provider_error: None,
            output_text_bytes: text,
            body_bytes: body,
        }
    }

    #[test]
    fn estimates_from_sizes() {
        let u = estimate(4001, &obs(None, 400, 90_000));
        assert_eq!(u.input_tokens, Some(1001));
        assert_eq!(u.output_tokens, Some(100));
        assert_eq!(u.cached_input_tokens, None);
    }

    #[test]
    fn falls_back_to_body_bytes_and_keeps_reported_fields() {
        let u = estimate(0, &obs(None, 0, 10));
        assert_eq!(u.input_tokens, Some(0));
        assert_eq!(u.output_tokens, Some(3));
        let reported = Usage {
            input_tokens: Some(25),
            cached_input_tokens: Some(5),
            ..Usage::default()
        };
        let u = estimate(1000, &obs(Some(reported), 40, 500));
        assert_eq!(u.input_tokens, Some(25));
        assert_eq!(u.cached_input_tokens, Some(5));
        assert_eq!(u.output_tokens, Some(10));
    }
}
