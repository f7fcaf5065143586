//! Model-name matching (SPEC §2). Rules, in order, for a reported name:
//!
//! 1. The name itself, then the name with version suffixes removed one at a
//!    time (each shorter form is tried; see [`strip_version_suffix`]):
//!    `@20240620`/`@001`/`@latest` (Vertex), `-v1:0` (Bedrock),
//!    `-2024-08-06`, `-20250929`, `-latest`, `-preview-09-2025` and
//!    `-preview-05-20` (the date goes, `-preview` stays: preview prices
//!    differ from GA ones), `-001` (three digits, Gemini), `-0613` (OpenAI's
//!    old MMDD).
//! 2. The configured aliases, keyed by the name or any of its shorter forms
//!    from rule 1; the alias target is matched with rules 1, 3 and 4 (not
//!    with aliases again, so aliases cannot loop).
//! 3. Claude versions written with dots, as OpenRouter does
//!    (`claude-sonnet-4.5` -> `claude-sonnet-4-5`), rule 1 on the result.
//! 4. A provider prefix removed and everything retried on the rest:
//!    `openai/gpt-4.1-mini` (OpenRouter), `models/gemini-2.5-flash` (Gemini
//!    API), `us.anthropic.claude-…` (Bedrock: lowercase dotted segments).
//!
//! Matching is case-sensitive: provider model ids are, and an exact,
//! predictable rule beats a guess that prices a different model. Only rule
//! 3 allocates, and only when rules 1 and 2 missed.

use super::{ModelPrice, NameMap, PricingError};

type Hit<'t> = (&'t str, &'t ModelPrice);

/// Resolves `name` against the entries with all rules.
pub(crate) fn find<'t>(
    entries: &'t NameMap<ModelPrice>,
    aliases: &NameMap<String>,
    name: &str,
) -> Option<Hit<'t>> {
    let mut current = name;
    loop {
        if let Some(hit) = find_versioned(entries, current) {
            return Some(hit);
        }
        let mut form = Some(current);
        while let Some(f) = form {
            if let Some(target) = aliases.get(f) {
                if let Some(hit) = find_without_aliases(entries, target) {
                    return Some(hit);
                }
            }
            form = strip_version_suffix(f);
        }
        if let Some(hit) = find_dotted_claude(entries, current) {
            return Some(hit);
        }
        current = strip_provider_prefix(current)?;
    }
}

/// Rules 1, 3 and 4 (for alias targets).
fn find_without_aliases<'t>(entries: &'t NameMap<ModelPrice>, name: &str) -> Option<Hit<'t>> {
    let mut current = name;
    loop {
        if let Some(hit) = find_versioned(entries, current) {
            return Some(hit);
        }
        if let Some(hit) = find_dotted_claude(entries, current) {
            return Some(hit);
        }
        current = strip_provider_prefix(current)?;
    }
}

/// Rule 1: the name, then each shorter form.
fn find_versioned<'t>(entries: &'t NameMap<ModelPrice>, name: &str) -> Option<Hit<'t>> {
    let mut form = Some(name);
    while let Some(f) = form {
        if let Some((key, price)) = entries.get_key_value(f) {
            return Some((key.as_str(), price));
        }
        form = strip_version_suffix(f);
    }
    None
}

/// Rule 3: `claude-sonnet-4.5` -> `claude-sonnet-4-5`.
fn find_dotted_claude<'t>(entries: &'t NameMap<ModelPrice>, name: &str) -> Option<Hit<'t>> {
    if !name.starts_with("claude-") || !name.contains('.') {
        return None;
    }
    find_versioned(entries, &name.replace('.', "-"))
}

/// Checks at load that every alias target matches an entry, and notes
/// aliases that can never apply because their name is itself an entry.
pub(crate) fn check_aliases(
    entries: &NameMap<ModelPrice>,
    aliases: &NameMap<String>,
    warnings: &mut Vec<String>,
) -> Result<(), PricingError> {
    let mut sorted: Vec<(&String, &String)> = aliases.iter().collect();
    sorted.sort_unstable();
    for (alias, target) in sorted {
        if find_without_aliases(entries, target).is_none() {
            return Err(PricingError::Alias {
                alias: alias.clone(),
                target: target.clone(),
            });
        }
        if entries.contains_key(alias) {
            warnings.push(format!(
                "[pricing] aliases: `{alias}` is itself a price entry; the entry wins and the alias is unused"
            ));
        }
    }
    Ok(())
}

/// Removes one version suffix from the end of `name`, if it has one.
pub(crate) fn strip_version_suffix(name: &str) -> Option<&str> {
    // Vertex AI: `claude-3-5-sonnet@20240620`, `gemini-1.5-pro@002`, `…@latest`.
    if let Some((base, version)) = rsplit_once_byte(name, b'@') {
        if !base.is_empty()
            && !version.is_empty()
            && version.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Some(base);
        }
    }
    let bytes = name.as_bytes();
    // Bedrock: `…-v1:0`. The colon first: a one-byte search, where a
    // search for `-v` would set up a substring searcher for every name.
    if let Some((head, minor)) = rsplit_once_byte(name, b':') {
        if let Some((base, major)) = head.rsplit_once("-v") {
            if all_digits(major) && all_digits(minor) && !base.is_empty() {
                return Some(base);
            }
        }
    }
    // `-latest`
    if let Some(base) = name.strip_suffix("-latest") {
        if !base.is_empty() {
            return Some(base);
        }
    }
    // `-YYYY-MM-DD`
    if let Some(base) = tail(name, 11) {
        let t = &bytes[bytes.len() - 11..];
        if t[0] == b'-'
            && t[5] == b'-'
            && t[8] == b'-'
            && is_year(&t[1..5])
            && is_month(&t[6..8])
            && is_day(&t[9..11])
        {
            return Some(base);
        }
    }
    // `-preview-MM-YYYY` -> `-preview`
    if let Some(base) = tail(name, 8) {
        let t = &bytes[bytes.len() - 8..];
        if base.ends_with("-preview")
            && t[0] == b'-'
            && is_month(&t[1..3])
            && t[3] == b'-'
            && is_year(&t[4..8])
        {
            return Some(base);
        }
    }
    // `-preview-MM-DD` -> `-preview`
    if let Some(base) = tail(name, 6) {
        let t = &bytes[bytes.len() - 6..];
        if base.ends_with("-preview")
            && t[0] == b'-'
            && is_month(&t[1..3])
            && t[3] == b'-'
            && is_day(&t[4..6])
        {
            return Some(base);
        }
    }
    // `-YYYYMMDD`
    if let Some(base) = tail(name, 9) {
        let t = &bytes[bytes.len() - 9..];
        if t[0] == b'-' && is_year(&t[1..5]) && is_month(&t[5..7]) && is_day(&t[7..9]) {
            return Some(base);
        }
    }
    // `-MMDD` (OpenAI: `gpt-4-0613`, `gpt-3.5-turbo-0125`)
    if let Some(base) = tail(name, 5) {
        let t = &bytes[bytes.len() - 5..];
        if t[0] == b'-' && is_month(&t[1..3]) && is_day(&t[3..5]) {
            return Some(base);
        }
    }
    // `-NNN` (Gemini: `gemini-2.0-flash-001`)
    if let Some(base) = tail(name, 4) {
        let t = &bytes[bytes.len() - 4..];
        if t[0] == b'-' && t[1..].iter().all(u8::is_ascii_digit) {
            return Some(base);
        }
    }
    None
}

/// Removes one provider prefix: a `/`-separated first segment
/// (`openai/gpt-4.1`, `models/gemini-2.5-flash`), or a lowercase dotted
/// segment (Bedrock `us.anthropic.claude-…`).
pub(crate) fn strip_provider_prefix(name: &str) -> Option<&str> {
    if let Some((prefix, rest)) = name.split_once('/') {
        if !prefix.is_empty() && !rest.is_empty() {
            return Some(rest);
        }
    }
    if let Some((prefix, rest)) = name.split_once('.') {
        if prefix.len() >= 2 && prefix.bytes().all(|b| b.is_ascii_lowercase()) && !rest.is_empty() {
            return Some(rest);
        }
    }
    None
}

/// `name.rsplit_once(char::from(sep))` for an ASCII `sep`, as a byte loop:
/// the char searcher costs more than the loop over a model name, and this
/// runs on every price look-up.
fn rsplit_once_byte(name: &str, sep: u8) -> Option<(&str, &str)> {
    let at = name.bytes().rposition(|b| b == sep)?;
    // An ASCII byte is a char boundary on both sides.
    Some((name.get(..at)?, name.get(at + 1..)?))
}

/// `name` without its last `n` bytes, when that leaves something and cuts on
/// a char boundary.
fn tail(name: &str, n: usize) -> Option<&str> {
    if name.len() <= n {
        return None;
    }
    name.get(..name.len() - n).filter(|base| !base.is_empty())
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn two_digits(t: &[u8]) -> Option<u8> {
    match t {
        [a, b] if a.is_ascii_digit() && b.is_ascii_digit() => Some((a - b'0') * 10 + (b - b'0')),
        _ => None,
    }
}

fn is_year(t: &[u8]) -> bool {
    t.len() == 4 && t.starts_with(b"20") && t.iter().all(u8::is_ascii_digit)
}

fn is_month(t: &[u8]) -> bool {
    two_digits(t).is_some_and(|m| (1..=12).contains(&m))
}

fn is_day(t: &[u8]) -> bool {
    two_digits(t).is_some_and(|d| (1..=31).contains(&d))
}

#[cfg(test)]
mod tests {
    use super::rsplit_once_byte;

    #[test]
    fn byte_split_agrees_with_str_rsplit_once() {
        for name in [
            "",
            "@",
            "a@",
            "@b",
            "a@b@c",
            "claude@2024",
            "é@ü",
            "ü:",
            ":ü",
            "x-v1:0",
            "no-sep",
        ] {
            for sep in [b'@', b':'] {
                assert_eq!(
                    rsplit_once_byte(name, sep),
                    name.rsplit_once(char::from(sep)),
                    "{name:?} on {:?}",
                    char::from(sep)
                );
            }
        }
    }
}
