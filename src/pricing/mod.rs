//! Pricing: turns a model name and its token usage into an exact cost.
//!
//! Flow:
//! 1. `PriceTable::load` reads each file of `[pricing] files` in order
//!    (relative paths against a base directory). A `.json` file is read as
//!    LiteLLM's `model_prices_and_context_window.json` (`litellm.rs`), any
//!    other as tollgate's TOML (`toml_format.rs`). Both produce
//!    `(name, ModelPrice)` pairs in femto-dollars per token; a later file
//!    replaces an earlier file's entry of the same name.
//! 2. The `[pricing] aliases` are checked against the merged entries, and the
//!    table gets a short content hash (`version`) that the ledger records.
//! 3. The proxy holds the table behind an `ArcSwap` and replaces it whole on
//!    reload; a `PriceTable` is never mutated after `load`.
//! 4. Per call: `lookup` resolves the reported model name (`matching.rs`:
//!    exact, version suffix removed, aliases, provider prefix removed) and
//!    `price_cost` applies the SPEC §4 formula in `u128` femto-dollars,
//!    rounding once to pico-dollar `Money`.

mod litellm;
mod matching;
mod toml_format;
mod units;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::money::Money;
use crate::usage::Usage;

/// Model name → value maps of a price table. Filled once at load and read
/// on every call with the provider's model name: foldhash (hashbrown's own
/// default) instead of SipHash, whose resistance to chosen collisions buys
/// nothing for a table that client input never grows.
pub(crate) type NameMap<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// Input-token count above which a long-context tier applies when the entry
/// does not name its own threshold (Anthropic and Gemini bill >200k prompts
/// at higher rates).
pub const DEFAULT_LONG_CONTEXT_THRESHOLD: u64 = 200_000;

/// The `[pricing]` table of tollgate.toml.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricingConfig {
    /// Price files, applied in order (later entries replace earlier ones).
    /// Relative paths are resolved against the `base_dir` given to
    /// [`PriceTable::load`].
    pub files: Vec<PathBuf>,
    /// What to do with a call whose model matches no entry.
    pub unknown_model: UnknownModel,
    /// `"my-deployment" = "gpt-4.1"`: a model name reported as the key is
    /// priced as the target (which is matched with the usual rules).
    pub aliases: BTreeMap<String, String>,
}

impl Default for PricingConfig {
    fn default() -> Self {
        PricingConfig {
            files: vec![PathBuf::from("config/pricing.toml")],
            unknown_model: UnknownModel::default(),
            aliases: BTreeMap::new(),
        }
    }
}

/// Policy for models without a price entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownModel {
    /// Forward the call, count its tokens, charge nothing, flag the model.
    #[default]
    Zero,
    /// Refuse calls to models without a price.
    Reject,
}

/// Prices of one model entry, in femto-dollars (10^-15 USD) per token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelPrice {
    /// Uncached prompt tokens.
    pub input: u64,
    /// Completion tokens, reasoning included (0 for embedding entries).
    pub output: u64,
    /// Prompt tokens read from the cache; falls back to `input`.
    pub cached_input: Option<u64>,
    /// Prompt tokens written to the cache (Anthropic's 5-minute TTL);
    /// falls back to `input`.
    pub cache_write: Option<u64>,
    /// Cache writes with a 1-hour TTL; falls back to `cache_write`, then
    /// `input`.
    pub cache_write_1h: Option<u64>,
    /// Higher rates for long prompts (the "above 200k" tier).
    pub long_context: Option<LongContextPrice>,
    /// The model's output-token limit, where known (for reservations).
    pub max_output_tokens: Option<u64>,
}

/// A long-context tier: when a call's prompt (`input_tokens`, cache reads and
/// writes included) is larger than `above_input_tokens`, the prices this tier
/// names replace the base prices for the whole call. A price it does not
/// name keeps the base value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LongContextPrice {
    pub above_input_tokens: u64,
    pub input: Option<u64>,
    pub output: Option<u64>,
    pub cached_input: Option<u64>,
    pub cache_write: Option<u64>,
    pub cache_write_1h: Option<u64>,
}

/// The per-token rates (femto-dollars) that apply to one call, fallbacks
/// resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub cache_write_1h: u64,
}

impl ModelPrice {
    /// The rates for a call with `input_tokens` prompt tokens (the tier
    /// applies when the prompt is larger than its threshold).
    pub fn rates(&self, input_tokens: u64) -> Rates {
        let tier = self
            .long_context
            .as_ref()
            .filter(|t| input_tokens > t.above_input_tokens);
        let input = tier.and_then(|t| t.input).unwrap_or(self.input);
        let output = tier.and_then(|t| t.output).unwrap_or(self.output);
        let cached_input = tier
            .and_then(|t| t.cached_input)
            .or(self.cached_input)
            .unwrap_or(input);
        let cache_write_named = tier.and_then(|t| t.cache_write).or(self.cache_write);
        let cache_write = cache_write_named.unwrap_or(input);
        let cache_write_1h = tier
            .and_then(|t| t.cache_write_1h)
            .or(self.cache_write_1h)
            .or(cache_write_named)
            .unwrap_or(input);
        Rates {
            input,
            output,
            cached_input,
            cache_write,
            cache_write_1h,
        }
    }
}

/// A successful lookup: the entry name that matched and its prices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriceMatch<'a> {
    pub entry: &'a str,
    pub price: &'a ModelPrice,
}

/// The cost of one call and the entry that priced it (`None`: the model has
/// no price; the cost is then zero).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    pub cost: Money,
    pub entry: Option<String>,
}

/// Why price files or aliases cannot be loaded. Every message names the file
/// (or the `[pricing]` config table), and where it applies the model entry,
/// the field and the line.
#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    #[error("pricing file {file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pricing file {file}{}: {message}", Line(*.line))]
    Syntax {
        file: String,
        line: Option<usize>,
        message: String,
    },
    #[error("pricing file {file}{}: model `{model}`: {message}", Line(*.line))]
    Entry {
        file: String,
        line: Option<usize>,
        model: String,
        message: String,
    },
    #[error("pricing file {file}{}: model `{model}`, field `{field}`: {message}", Line(*.line))]
    Field {
        file: String,
        line: Option<usize>,
        model: String,
        field: String,
        message: String,
    },
    #[error("[pricing] aliases: `{alias}` = `{target}`: no price entry matches `{target}`")]
    Alias { alias: String, target: String },
}

/// `:LINE` or nothing.
struct Line(Option<usize>);

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(line) => write!(f, ":{line}"),
            None => Ok(()),
        }
    }
}

/// An immutable snapshot of all loaded prices.
#[derive(Debug, Clone)]
pub struct PriceTable {
    entries: NameMap<ModelPrice>,
    aliases: NameMap<String>,
    unknown_model: UnknownModel,
    version: String,
    warnings: Vec<String>,
}

/// What a file parser returns: entries in file order, plus notes worth
/// logging (rounded float artefacts, skipped entries).
pub(crate) struct Parsed {
    pub entries: Vec<(String, ModelPrice)>,
    pub warnings: Vec<String>,
}

impl PriceTable {
    /// A table with no entries: every model is unpriced.
    pub fn empty() -> PriceTable {
        PriceTable::build(
            NameMap::default(),
            NameMap::default(),
            UnknownModel::Zero,
            Vec::new(),
        )
    }

    /// Loads `config.files` in order, resolving relative paths against
    /// `base_dir`; later files replace earlier entries of the same name.
    pub fn load(config: &PricingConfig, base_dir: &Path) -> Result<PriceTable, PricingError> {
        let mut entries = NameMap::default();
        let mut warnings = Vec::new();
        for file in &config.files {
            let path = if file.is_absolute() {
                file.clone()
            } else {
                base_dir.join(file)
            };
            let origin = path.display().to_string();
            let text = std::fs::read_to_string(&path).map_err(|source| PricingError::Read {
                file: origin.clone(),
                source,
            })?;
            let parsed = parse_file(&path, &text, &origin)?;
            warnings.extend(parsed.warnings);
            entries.extend(parsed.entries);
        }
        let aliases: NameMap<String> = config
            .aliases
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        matching::check_aliases(&entries, &aliases, &mut warnings)?;
        Ok(PriceTable::build(
            entries,
            aliases,
            config.unknown_model,
            warnings,
        ))
    }

    /// Parses one tollgate-format TOML text (tests, embedded defaults).
    /// `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<PriceTable, PricingError> {
        let parsed = toml_format::parse(text, origin)?;
        Ok(PriceTable::build(
            parsed.entries.into_iter().collect(),
            NameMap::default(),
            UnknownModel::Zero,
            parsed.warnings,
        ))
    }

    /// Parses one LiteLLM-format JSON text. `origin` names it in errors.
    pub fn from_litellm_json_str(text: &str, origin: &str) -> Result<PriceTable, PricingError> {
        let parsed = litellm::parse(text, origin)?;
        Ok(PriceTable::build(
            parsed.entries.into_iter().collect(),
            NameMap::default(),
            UnknownModel::Zero,
            parsed.warnings,
        ))
    }

    fn build(
        entries: NameMap<ModelPrice>,
        aliases: NameMap<String>,
        unknown_model: UnknownModel,
        warnings: Vec<String>,
    ) -> PriceTable {
        let version = content_hash(&entries, &aliases);
        PriceTable {
            entries,
            aliases,
            unknown_model,
            version,
            warnings,
        }
    }

    /// Short stable hash (12 hex digits, FNV-1a 64) of the table's content:
    /// every entry's prices and the aliases. Comments, formatting and entry
    /// order of the files do not change it.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The configured policy for models without a price.
    pub fn unknown_model(&self) -> UnknownModel {
        self.unknown_model
    }

    /// Things worth a log line at load: prices rounded from binary-float
    /// artefacts, entries skipped, aliases that can never apply.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Finds the entry that prices `model` (see `matching.rs` for the rules).
    /// Does not allocate when the name matches an entry exactly.
    pub fn lookup(&self, model: &str) -> Option<PriceMatch<'_>> {
        matching::find(&self.entries, &self.aliases, model)
            .map(|(entry, price)| PriceMatch { entry, price })
    }

    /// Looks `model` up and prices `usage`; an unknown model costs zero and
    /// has no entry.
    pub fn cost(&self, model: &str, usage: &Usage) -> Priced {
        match self.lookup(model) {
            Some(m) => Priced {
                cost: PriceTable::price_cost(m.price, usage),
                entry: Some(m.entry.to_string()),
            },
            None => Priced {
                cost: Money::ZERO,
                entry: None,
            },
        }
    }

    /// The SPEC §4 formula, tokens × per-token rates:
    ///
    /// ```text
    /// uncached × input + cached × cached_input
    ///   + (cache_write − cache_write_1h) × cache_write
    ///   + cache_write_1h × cache_write_1h + output × output
    /// ```
    ///
    /// where `uncached = input − cached − cache_write` (saturating), the 1h
    /// count is capped at the write count, and absent counts are 0. Summed in `u128` femto-dollars, rounded half up to
    /// pico-dollars once.
    pub fn price_cost(price: &ModelPrice, usage: &Usage) -> Money {
        let input = usage.input_tokens.unwrap_or(0);
        let cached = usage.cached_input_tokens.unwrap_or(0);
        let cache_write = usage.cache_write_input_tokens.unwrap_or(0);
        let cache_write_1h = usage
            .cache_write_1h_input_tokens
            .unwrap_or(0)
            .min(cache_write);
        let output = usage.output_tokens.unwrap_or(0);
        let rates = price.rates(input);
        let uncached = input.saturating_sub(cached).saturating_sub(cache_write);
        let femtos = [
            (uncached, rates.input),
            (cached, rates.cached_input),
            (cache_write - cache_write_1h, rates.cache_write),
            (cache_write_1h, rates.cache_write_1h),
            (output, rates.output),
        ]
        .into_iter()
        .fold(0u128, |sum, (tokens, rate)| {
            sum.saturating_add(u128::from(tokens) * u128::from(rate))
        });
        femtos_to_money(femtos)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry named exactly `name`, without matching rules.
    pub fn entry(&self, name: &str) -> Option<&ModelPrice> {
        self.entries.get(name)
    }
}

impl Default for PriceTable {
    fn default() -> Self {
        PriceTable::empty()
    }
}

fn parse_file(path: &Path, text: &str, origin: &str) -> Result<Parsed, PricingError> {
    let is_json = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if is_json {
        litellm::parse(text, origin)
    } else {
        toml_format::parse(text, origin)
    }
}

/// Femto-dollars -> pico-dollars, half up, saturating.
fn femtos_to_money(femtos: u128) -> Money {
    let picos = femtos.saturating_add(500) / 1_000;
    Money::from_picos(u64::try_from(picos).unwrap_or(u64::MAX))
}

/// FNV-1a 64 over a canonical rendering of the entries (sorted) and aliases.
fn content_hash(entries: &NameMap<ModelPrice>, aliases: &NameMap<String>) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(PRIME);
        }
    };
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    let mut names: Vec<&String> = entries.keys().collect();
    names.sort_unstable();
    for name in names {
        let p = &entries[name];
        feed(b"E\0");
        feed(name.as_bytes());
        let mut line = format!(
            "\0{}\0{}\0{}\0{}\0{}\0{}",
            p.input,
            p.output,
            opt(p.cached_input),
            opt(p.cache_write),
            opt(p.cache_write_1h),
            opt(p.max_output_tokens)
        );
        if let Some(t) = &p.long_context {
            line.push_str(&format!(
                "\0T{}\0{}\0{}\0{}\0{}\0{}",
                t.above_input_tokens,
                opt(t.input),
                opt(t.output),
                opt(t.cached_input),
                opt(t.cache_write),
                opt(t.cache_write_1h)
            ));
        }
        feed(line.as_bytes());
        feed(b"\n");
    }
    let mut alias_names: Vec<(&String, &String)> = aliases.iter().collect();
    alias_names.sort_unstable();
    for (alias, target) in alias_names {
        feed(b"A\0");
        feed(alias.as_bytes());
        feed(b"\0");
        feed(target.as_bytes());
        feed(b"\n");
    }
    format!("{:012x}", hash >> 16)
}
