use super::*;

const SHIPPED: &str = include_str!("../../config/pricing.toml");
const SUBSET: &str = include_str!("../../tests/fixtures/pricing/litellm_subset.json");

fn usage(input: u64, cached: u64, write: u64, write_1h: u64, output: u64) -> Usage {
    Usage {
        input_tokens: Some(input),
        output_tokens: Some(output),
        cached_input_tokens: Some(cached),
        cache_write_input_tokens: Some(write),
        cache_write_1h_input_tokens: Some(write_1h),
        reasoning_tokens: None,
    }
}

fn usd(text: &str) -> Money {
    Money::parse_usd(text).expect("test amount")
}

fn table(text: &str) -> PriceTable {
    PriceTable::from_toml_str(text, "test.toml").expect("test table")
}

fn shipped() -> PriceTable {
    PriceTable::from_toml_str(SHIPPED, "config/pricing.toml").expect("shipped pricing.toml loads")
}

fn subset() -> PriceTable {
    PriceTable::from_litellm_json_str(SUBSET, "litellm_subset.json").expect("subset loads")
}

// ---- formula -------------------------------------------------------------

#[test]
fn openai_cached_tokens_are_not_double_counted() {
    let t = shipped();
    // gpt-4.1: 4020 prompt tokens of which 4012 cached, 25 output.
    // 8 x 2.00/M + 4012 x 0.50/M + 25 x 8.00/M = 0.000016 + 0.002006 + 0.0002
    let priced = t.cost("gpt-4.1", &usage(4020, 4012, 0, 0, 25));
    assert_eq!(priced.cost, usd("0.002222"));
    assert_eq!(priced.entry.as_deref(), Some("gpt-4.1"));
}

#[test]
fn anthropic_cache_reads_and_writes_are_split() {
    let t = shipped();
    // claude-sonnet-4-5: 3 uncached + 418 written + 1111 read (input_tokens
    // counts all three), 120 output.
    // 3 x 3 + 418 x 3.75 + 1111 x 0.30 + 120 x 15 (per M)
    // = 9 + 1567.5 + 333.3 + 1800 = 3709.8 / 1e6
    let priced = t.cost("claude-sonnet-4-5", &usage(1532, 1111, 418, 0, 120));
    assert_eq!(priced.cost, usd("0.0037098"));
}

#[test]
fn one_hour_cache_writes_use_their_own_rate() {
    let t = shipped();
    // claude-haiku-4-5: 1000 written of which 400 with the 1h TTL.
    // 600 x 1.25 + 400 x 2.00 = 750 + 800 = 1550 / 1e6
    let priced = t.cost("claude-haiku-4-5", &usage(1000, 0, 1000, 400, 0));
    assert_eq!(priced.cost, usd("0.00155"));
    // A 1h count larger than the write count is clamped to it.
    let priced = t.cost("claude-haiku-4-5", &usage(1000, 0, 1000, 5000, 0));
    assert_eq!(priced.cost, usd("0.002"));
}

#[test]
fn absent_counts_are_zero_and_inconsistent_counts_saturate() {
    let t = shipped();
    let only_output = Usage {
        output_tokens: Some(1_000_000),
        ..Usage::default()
    };
    assert_eq!(t.cost("gpt-4.1", &only_output).cost, usd("8"));
    assert_eq!(t.cost("gpt-4.1", &Usage::default()).cost, Money::ZERO);
    // cached > input: uncached saturates at 0, the cached tokens are charged.
    let priced = t.cost("gpt-4.1", &usage(10, 20, 0, 0, 0));
    assert_eq!(priced.cost, usd("0.00001"));
}

#[test]
fn rounding_is_half_up_to_the_pico_dollar_once_per_call() {
    // 0.0000005 USD per million = 500 femto-dollars per token.
    let t = table("[models.m]\ninput = 0.0000005\noutput = 0.0000015\n");
    let one = |input, output| {
        let u = Usage {
            input_tokens: Some(input),
            output_tokens: Some(output),
            ..Usage::default()
        };
        t.cost("m", &u).cost.picos()
    };
    assert_eq!(one(1, 0), 1); // 500 femto -> 0.5 pico -> 1
    assert_eq!(one(0, 0), 0);
    assert_eq!(one(3, 0), 2); // 1500 femto -> 1.5 -> 2
                              // Summed before rounding: 500 + 1500 = 2000 femto = 2 pico, not 1 + 2.
    assert_eq!(one(1, 1), 2);
    let t = table("[models.m]\ninput = 0.000000499\noutput = 0\n");
    assert_eq!(t.cost("m", &usage(1, 0, 0, 0, 0)).cost.picos(), 0);
}

#[test]
fn large_calls_do_not_overflow() {
    let t = table("[models.m]\ninput = 1000000\noutput = 1000000\n");
    let priced = t.cost("m", &usage(u64::MAX, 0, 0, 0, u64::MAX));
    assert_eq!(priced.cost, Money::MAX);
}

#[test]
fn fallbacks_use_the_input_price() {
    let t = table("[models.m]\ninput = 1\noutput = 2\n");
    // cached, writes and 1h writes all at the input price.
    let priced = t.cost("m", &usage(1_000_000, 250_000, 250_000, 100_000, 0));
    assert_eq!(priced.cost, usd("1"));
    let t = table("[models.m]\ninput = 1\noutput = 2\ncache_write = 4\n");
    // 1h falls back to cache_write.
    let priced = t.cost("m", &usage(1_000_000, 0, 1_000_000, 1_000_000, 0));
    assert_eq!(priced.cost, usd("4"));
    let rates = t.entry("m").map(|p| p.rates(0));
    assert_eq!(
        rates,
        Some(Rates {
            input: 1_000_000_000,
            output: 2_000_000_000,
            cached_input: 1_000_000_000,
            cache_write: 4_000_000_000,
            cache_write_1h: 4_000_000_000,
        })
    );
}

#[test]
fn long_context_tier_applies_to_the_whole_call_above_the_threshold() {
    let t = shipped();
    // gemini-2.5-pro: base 1.25 / 10 / cached 0.125; above 200k: 2.50 / 15 / 0.25.
    let at = t.cost("gemini-2.5-pro", &usage(200_000, 0, 0, 0, 1_000));
    assert_eq!(at.cost, usd("0.26")); // 0.25 + 0.01
    let above = t.cost("gemini-2.5-pro", &usage(200_001, 100_000, 0, 0, 1_000));
    // 100001 x 2.50 + 100000 x 0.25 + 1000 x 15 (per M)
    assert_eq!(above.cost, usd("0.2900025"));
    // A tier that does not name a price keeps the base one.
    let t = table(
        "[models.m]\ninput = 1\noutput = 2\ncached_input = 0.5\n\
         [models.m.long_context]\nabove_input_tokens = 10\ninput = 3\n",
    );
    let priced = t.cost("m", &usage(1_000_000, 1_000_000, 0, 0, 1_000_000));
    assert_eq!(priced.cost, usd("2.5")); // 0.5 cached + 2 output
    let priced = t.cost("m", &usage(10, 0, 0, 0, 0));
    assert_eq!(priced.cost.picos(), 10 * 1_000_000); // 10 x 1/M at base
}

#[test]
fn price_cost_is_the_formula_alone() {
    let price = ModelPrice {
        input: 1_000,
        output: 2_000,
        ..ModelPrice::default()
    };
    assert_eq!(
        PriceTable::price_cost(&price, &usage(1_000, 0, 0, 0, 1_000)),
        Money::from_picos(3_000)
    );
}

#[test]
fn unknown_models_cost_zero_and_have_no_entry() {
    let priced = shipped().cost("my-local-llama", &usage(100, 0, 0, 0, 100));
    assert_eq!(
        priced,
        Priced {
            cost: Money::ZERO,
            entry: None
        }
    );
    assert!(PriceTable::empty().is_empty());
    assert_eq!(
        PriceTable::empty()
            .cost("gpt-4.1", &usage(1, 0, 0, 0, 1))
            .entry,
        None
    );
}

// ---- matching ------------------------------------------------------------

fn entry_of(t: &PriceTable, model: &str) -> Option<String> {
    t.lookup(model).map(|m| m.entry.to_string())
}

#[test]
fn version_suffixes_are_removed() {
    let t = shipped();
    let cases = [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"), // own price: exact wins
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("claude-3-5-haiku@20241022", "claude-3-5-haiku"),
        ("gemini-2.0-flash-001", "gemini-2.0-flash"),
        ("claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5"),
        ("gpt-4.1-0613", "gpt-4.1"),
    ];
    for (model, entry) in cases {
        assert_eq!(entry_of(&t, model).as_deref(), Some(entry), "{model}");
    }
    // Only the date of a preview goes: preview prices are not GA prices.
    assert_eq!(entry_of(&t, "gemini-2.5-flash-preview-09-2025"), None);
    let preview = table("[models.\"gemini-x-preview\"]\ninput = 1\noutput = 1\n");
    assert_eq!(
        entry_of(&preview, "gemini-x-preview-09-2025").as_deref(),
        Some("gemini-x-preview")
    );
    assert_eq!(
        entry_of(&preview, "gemini-x-preview-05-20").as_deref(),
        Some("gemini-x-preview")
    );
}

#[test]
fn suffix_patterns_reject_non_dates() {
    use matching::strip_version_suffix as strip;
    assert_eq!(strip("gpt-4o-2024-13-06"), None);
    assert_eq!(strip("claude-x-20251399"), None);
    assert_eq!(strip("gpt-4.1"), None);
    assert_eq!(strip("o3"), None);
    assert_eq!(strip("-latest"), None);
    assert_eq!(strip("@2024"), None);
    assert_eq!(strip("model-1999"), None); // not MMDD
    assert_eq!(strip("gemini-2.0-flash-001"), Some("gemini-2.0-flash"));
    assert_eq!(strip("gemini-1.5-pro@002"), Some("gemini-1.5-pro"));
    assert_eq!(strip("x-v2:1"), Some("x"));
    assert_eq!(strip("x-v2:1:0"), None);
    assert_eq!(strip("x-v2-v3:0"), Some("x-v2"));
    assert_eq!(strip("x-v:0"), None);
    assert_eq!(strip("x-v2:"), None);
    assert_eq!(strip("-v2:0"), None);
    assert_eq!(strip("é-001"), Some("é"));
}

#[test]
fn provider_prefixes_are_removed_last() {
    let t = shipped();
    let cases = [
        ("openai/gpt-4.1-mini", "gpt-4.1-mini"),
        ("models/gemini-2.5-flash", "gemini-2.5-flash"),
        ("openrouter/anthropic/claude-opus-4-5", "claude-opus-4-5"),
        ("anthropic/claude-sonnet-4.5", "claude-sonnet-4-5"),
        (
            "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "claude-sonnet-4-5",
        ),
        ("google/gemini-2.5-pro", "gemini-2.5-pro"),
    ];
    for (model, entry) in cases {
        assert_eq!(entry_of(&t, model).as_deref(), Some(entry), "{model}");
    }
    // An entry that carries the prefix itself is an exact hit.
    let s = subset();
    assert_eq!(
        entry_of(&s, "gemini/gemini-2.5-pro").as_deref(),
        Some("gemini/gemini-2.5-pro")
    );
}

#[test]
fn matching_is_case_sensitive() {
    let t = shipped();
    assert_eq!(entry_of(&t, "GPT-4.1"), None);
    assert_eq!(entry_of(&t, "gpt-4.1").as_deref(), Some("gpt-4.1"));
}

#[test]
fn exact_hits_borrow_the_table_key() {
    let t = shipped();
    let m = t.lookup("gpt-4.1");
    assert!(m.is_some_and(|m| m.entry == "gpt-4.1" && m.price.input == 2_000_000_000));
}

fn with_aliases(aliases: &[(&str, &str)]) -> Result<PriceTable, PricingError> {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("p.toml"), SHIPPED).expect("write");
    let config = PricingConfig {
        files: vec![PathBuf::from("p.toml")],
        unknown_model: UnknownModel::Reject,
        aliases: aliases
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    PriceTable::load(&config, dir.path())
}

#[test]
fn aliases_resolve_with_the_same_rules() {
    let t = with_aliases(&[
        ("my-deployment", "gpt-4.1"),
        ("prod-chat", "openai/gpt-4o-2024-08-06"),
        ("gpt-4.1", "gpt-4o"),
    ])
    .expect("aliases load");
    assert_eq!(t.unknown_model(), UnknownModel::Reject);
    assert_eq!(entry_of(&t, "my-deployment").as_deref(), Some("gpt-4.1"));
    assert_eq!(entry_of(&t, "prod-chat").as_deref(), Some("gpt-4o"));
    // The alias key also matches with a version suffix and a provider prefix.
    assert_eq!(
        entry_of(&t, "my-deployment-2025-01-01").as_deref(),
        Some("gpt-4.1")
    );
    assert_eq!(
        entry_of(&t, "azure/my-deployment").as_deref(),
        Some("gpt-4.1")
    );
    // An exact entry beats an alias of the same name, and says so at load.
    assert_eq!(entry_of(&t, "gpt-4.1").as_deref(), Some("gpt-4.1"));
    assert!(t
        .warnings()
        .iter()
        .any(|w| w.contains("`gpt-4.1` is itself a price entry")));
}

#[test]
fn an_alias_to_nothing_is_refused_at_load() {
    let err = with_aliases(&[("mine", "gpt-9")]).expect_err("bad alias");
    assert_eq!(
        err.to_string(),
        "[pricing] aliases: `mine` = `gpt-9`: no price entry matches `gpt-9`"
    );
}

// ---- loading and versions ------------------------------------------------

#[test]
fn later_files_override_earlier_entries_and_json_is_litellm() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("base.toml"),
        "[models.a]\ninput = 1\noutput = 1\n[models.b]\ninput = 1\noutput = 1\n",
    )
    .expect("write");
    std::fs::write(
        dir.path().join("override.json"),
        r#"{"b": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05, "mode": "chat"}}"#,
    )
    .expect("write");
    let config = PricingConfig {
        files: vec![PathBuf::from("base.toml"), dir.path().join("override.json")],
        ..PricingConfig::default()
    };
    let t = PriceTable::load(&config, dir.path()).expect("load");
    assert_eq!(t.len(), 2);
    assert_eq!(t.entry("a").map(|p| p.input), Some(1_000_000_000));
    assert_eq!(
        t.entry("b").map(|p| (p.input, p.output)),
        Some((3_000_000_000, 15_000_000_000))
    );
}

#[test]
fn a_missing_file_names_its_path() {
    let config = PricingConfig {
        files: vec![PathBuf::from("nope/prices.toml")],
        ..PricingConfig::default()
    };
    let err = PriceTable::load(&config, Path::new("/nonexistent-base")).expect_err("missing");
    let text = err.to_string();
    assert!(
        text.starts_with("pricing file /nonexistent-base/nope/prices.toml: cannot read"),
        "{text}"
    );
}

#[test]
fn config_defaults_and_keys() {
    let c: PricingConfig = toml::from_str("").expect("empty");
    assert_eq!(c, PricingConfig::default());
    assert_eq!(c.files, vec![PathBuf::from("config/pricing.toml")]);
    assert_eq!(c.unknown_model, UnknownModel::Zero);
    let c: PricingConfig =
        toml::from_str("unknown_model = \"reject\"\n[aliases]\nmine = \"gpt-4.1\"\n")
            .expect("full");
    assert_eq!(c.unknown_model, UnknownModel::Reject);
    assert_eq!(c.aliases.get("mine").map(String::as_str), Some("gpt-4.1"));
    assert!(toml::from_str::<PricingConfig>("unknown_models = \"zero\"").is_err());
    assert!(toml::from_str::<PricingConfig>("unknown_model = \"ignore\"").is_err());
}

#[test]
fn version_is_a_stable_content_hash() {
    let a = table("[models.m]\ninput = 1\noutput = 2\n");
    let b = table("# comment\n[models.m]\noutput = 2.0\ninput = 1.00\n");
    let c = table("[models.m]\ninput = 1\noutput = 3\n");
    assert_eq!(a.version().len(), 12);
    assert!(a.version().bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(a.version(), b.version());
    assert_ne!(a.version(), c.version());
    assert_ne!(PriceTable::empty().version(), a.version());
    assert_eq!(shipped().version(), shipped().version());
    let x = with_aliases(&[("x", "gpt-4.1")]).expect("x");
    let y = with_aliases(&[("y", "gpt-4.1")]).expect("y");
    assert_ne!(x.version(), y.version());
}

// ---- TOML errors ---------------------------------------------------------

fn toml_err(text: &str) -> String {
    PriceTable::from_toml_str(text, "prices.toml")
        .expect_err("should fail")
        .to_string()
}

#[test]
fn toml_errors_name_file_model_field_and_line() {
    assert_eq!(
        toml_err("[models.\"gpt-x\"]\ninput = -1.5\noutput = 2\n"),
        "pricing file prices.toml:2: model `gpt-x`, field `input`: `-1.5` is negative; prices are >= 0"
    );
    assert_eq!(
        toml_err("[models.m]\ninput = 1\noutput = 2\ncached_input = 0.0000000001\n"),
        "pricing file prices.toml:4: model `m`, field `cached_input`: `0.0000000001` has more precision \
         than 1e-15 USD per token (USD per million tokens)"
    );
    assert_eq!(
        toml_err("[models.m]\ninput = 1\n"),
        "pricing file prices.toml:1: model `m`: missing field `output` (only entries with mode = \"embedding\" may omit it)"
    );
    assert_eq!(
        toml_err("[models.m]\noutput = 1\n"),
        "pricing file prices.toml:1: model `m`: missing field `input`"
    );
    assert_eq!(
        toml_err("[models.m]\ninput = 1\noutput = 1\nmax_output_tokens = -5\n"),
        "pricing file prices.toml:4: model `m`, field `max_output_tokens`: `-5` is negative; a token count is >= 0"
    );
    assert_eq!(
        toml_err(
            "[models.m]\ninput = 1\noutput = 1\n[models.m.long_context]\nabove_input_tokens = 5\n"
        ),
        "pricing file prices.toml:4: model `m`: `long_context` names no price"
    );
    assert_eq!(
        toml_err("[models.m]\ninput = \"1,5\"\noutput = 1\n"),
        "pricing file prices.toml:2: model `m`, field `input`: `1,5` is not a decimal number"
    );
}

#[test]
fn unknown_fields_and_bad_syntax_are_errors() {
    let text = toml_err(
        "[models.a]\ninput = 1\noutput = 1\n\n[models.\"b\"]\ninput = 1\noutput = 1\ninptu = 2\n",
    );
    assert!(
        text.starts_with("pricing file prices.toml:8: model `b`: unknown field `inptu`"),
        "{text}"
    );
    let text = toml_err(
        "[models.a]\ninput = 1\noutput = 1\n[models.a.long_context]\ninput = 2\nouptut = 1\n",
    );
    assert!(
        text.starts_with("pricing file prices.toml:6: model `a`: unknown field `ouptut`"),
        "{text}"
    );
    let text = toml_err("[model.a]\ninput = 1\n");
    assert!(
        text.starts_with("pricing file prices.toml:1: unknown field `model`"),
        "{text}"
    );
    let text = toml_err("[models.a]\ninput = 1\noutput = = 2\n");
    assert!(text.starts_with("pricing file prices.toml:3: "), "{text}");
    let text = toml_err("[models.a]\nmode = \"image\"\ninput = 1\n");
    assert!(
        text.starts_with("pricing file prices.toml:2: model `a`: unknown variant `image`"),
        "{text}"
    );
}

#[test]
fn toml_numbers_are_exact_in_every_spelling() {
    let t = table(
        "[models.m]\ninput = 0.1\noutput = \"0.075\"\ncached_input = 3\ncache_write = 1.25e-1\n",
    );
    let p = t.entry("m").cloned().unwrap_or_default();
    assert_eq!(p.input, 100_000_000);
    assert_eq!(p.output, 75_000_000);
    assert_eq!(p.cached_input, Some(3_000_000_000));
    assert_eq!(p.cache_write, Some(125_000_000));
    let e = table("[models.e]\nmode = \"embedding\"\ninput = 0.02\n");
    assert_eq!(e.entry("e").map(|p| p.output), Some(0));
}

// ---- LiteLLM format ------------------------------------------------------

#[test]
fn litellm_subset_imports_and_skips_what_has_no_token_price() {
    let t = subset();
    // Skipped: sample_spec, audio per-second, image per-image, output-only.
    for skipped in [
        "sample_spec",
        "whisper-1",
        "tts-1",
        "assemblyai/best",
        "1024-x-1024/50-steps/bedrock/amazon.nova-canvas-v1:0",
        "twelvelabs.pegasus-1-2-v1:0",
    ] {
        assert!(t.entry(skipped).is_none(), "{skipped}");
    }
    assert!(
        t.warnings().iter().any(|w| w.contains("skipped 5 entries")),
        "{:?}",
        t.warnings()
    );
    // Embeddings and image models with an input price only: output 0.
    assert_eq!(
        t.entry("mistral/mistral-embed-2312")
            .map(|p| (p.input, p.output)),
        Some((100_000_000, 0))
    );
    assert_eq!(
        t.entry("gpt-image-1").map(|p| (p.input, p.output)),
        Some((5_000_000_000, 0))
    );
    assert_eq!(t.entry("amazon.rerank-v1:0").map(|p| p.input), Some(0));
    assert_eq!(
        t.entry("gemini-flash-experimental").map(|p| p.input),
        Some(0)
    );
    // Cache fields, the 1h rate, the tier with its 1h rate, max output.
    let p = t
        .entry("anthropic.claude-sonnet-4-5-20250929-v1:0")
        .cloned()
        .unwrap_or_default();
    assert_eq!(p.input, 3_000_000_000);
    assert_eq!(p.output, 15_000_000_000);
    assert_eq!(p.cached_input, Some(300_000_000));
    assert_eq!(p.cache_write, Some(3_750_000_000));
    assert_eq!(p.cache_write_1h, Some(6_000_000_000));
    assert_eq!(p.max_output_tokens, Some(64_000));
    assert_eq!(
        p.long_context,
        Some(LongContextPrice {
            above_input_tokens: 200_000,
            input: Some(6_000_000_000),
            output: Some(22_500_000_000),
            cached_input: Some(600_000_000),
            cache_write: Some(7_500_000_000),
            cache_write_1h: Some(12_000_000_000),
        })
    );
    let p = t.entry("gpt-5.4").and_then(|p| p.long_context.clone());
    assert_eq!(p.map(|t| t.above_input_tokens), Some(272_000));
}

#[test]
fn litellm_float_artefacts_are_rounded_and_reported() {
    let t = subset();
    let p = t
        .entry("novita/deepseek/deepseek_v3")
        .cloned()
        .unwrap_or_default();
    assert_eq!(p.input, 890_000_000); // 8.900000000000001e-07
    let p = t
        .entry("databricks/databricks-claude-sonnet-4-5")
        .cloned()
        .unwrap_or_default();
    assert_eq!(p.input, 2_999_990_000); // 2.9999900000000002e-06
    assert!(t
        .warnings()
        .iter()
        .any(|w| w.contains("model `novita/deepseek/deepseek_v3`, field `input_cost_per_token`")));
}

fn json_err(text: &str) -> String {
    PriceTable::from_litellm_json_str(text, "prices.json")
        .expect_err("should fail")
        .to_string()
}

#[test]
fn litellm_errors_name_file_model_and_field() {
    assert_eq!(
        json_err(r#"{"m": {"input_cost_per_token": 1e-16, "output_cost_per_token": 0}}"#),
        "pricing file prices.json: model `m`, field `input_cost_per_token`: `1e-16` has more precision \
         than 1e-15 USD per token (USD per token)"
    );
    assert_eq!(
        json_err(r#"{"m": {"input_cost_per_token": 1e-6, "output_cost_per_token": -2e-6}}"#),
        "pricing file prices.json: model `m`, field `output_cost_per_token`: `-2e-6` is negative; prices are >= 0"
    );
    assert_eq!(
        json_err(r#"{"m": {"input_cost_per_token": "cheap"}}"#),
        "pricing file prices.json: model `m`, field `input_cost_per_token`: `\"cheap\"` is not a number"
    );
    assert_eq!(
        json_err(r#"{"m": {"input_cost_per_token": 1e-6, "mode": "chat"}}"#),
        "pricing file prices.json: model `m`: has `input_cost_per_token` but no `output_cost_per_token` (mode `chat`)"
    );
    assert_eq!(
        json_err(r#"{"m": {"input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6, "max_output_tokens": "lots"}}"#),
        "pricing file prices.json: model `m`, field `max_output_tokens`: `\"lots\"` is not a non-negative integer"
    );
    assert!(json_err("{\n\"m\": {,}\n}").starts_with("pricing file prices.json:2: "));
    assert!(json_err("[1, 2]").starts_with("pricing file prices.json:1: "));
}

// ---- the shipped price list ----------------------------------------------

/// `(entry name, LiteLLM key)` for each `[models."…"]` of the shipped file,
/// honouring the `# litellm: <key>` comment on the line above a header.
fn shipped_sources() -> Vec<(String, String)> {
    let lines: Vec<&str> = SHIPPED.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line
            .strip_prefix("[models.\"")
            .and_then(|rest| rest.strip_suffix("\"]"))
        else {
            continue;
        };
        let source = i
            .checked_sub(1)
            .and_then(|p| lines[p].strip_prefix("# litellm: "))
            .unwrap_or(name);
        out.push((name.to_string(), source.trim().to_string()));
    }
    out
}

#[test]
fn shipped_entries_equal_their_litellm_entries() {
    let shipped = shipped();
    let litellm = subset();
    let sources = shipped_sources();
    assert_eq!(
        sources.len(),
        shipped.len(),
        "every entry has a [models.\"…\"] header"
    );
    for (name, source) in &sources {
        let ours = shipped.entry(name);
        let theirs = litellm.entry(source);
        assert!(theirs.is_some(), "{source} missing from the LiteLLM subset");
        assert_eq!(ours, theirs, "{name} differs from LiteLLM {source}");
    }
}

#[test]
fn shipped_list_covers_the_main_models() {
    let t = shipped();
    for model in [
        "gpt-5",
        "gpt-5-mini",
        "gpt-5-nano",
        "gpt-4.1",
        "gpt-4.1-mini",
        "gpt-4.1-nano",
        "gpt-4o",
        "gpt-4o-mini",
        "o1",
        "o3",
        "o4-mini",
        "text-embedding-3-small",
        "text-embedding-3-large",
        "claude-opus-4-1",
        "claude-opus-4-5",
        "claude-sonnet-4-5",
        "claude-sonnet-4",
        "claude-haiku-4-5",
        "claude-3-5-haiku",
        "gemini-2.5-pro",
        "gemini-2.5-flash",
        "gemini-2.5-flash-lite",
        "gemini-2.0-flash",
    ] {
        assert!(t.entry(model).is_some(), "{model}");
    }
    assert!(t.warnings().is_empty());
    let header = SHIPPED.lines().take(12).collect::<Vec<_>>().join("\n");
    assert!(header.contains("litellm 1.108.7") && header.contains("2026-11-28"));
}
