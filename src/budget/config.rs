//! `[budget]` and `[runs]` config sections, and their validated form.

use serde::Deserialize;

use crate::money::{Money, MoneyError};

/// How a run's ceiling is enforced (SPEC §5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetMode {
    /// Each call in flight holds a reservation of its expected cost; a call
    /// is refused when spent + reserved + its own reservation would pass the
    /// ceiling.
    #[default]
    Reserve,
    /// A call is refused once the settled spend has reached the ceiling.
    Soft,
}

/// Calendar period of a window cap, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowPeriod {
    Hour,
    Day,
    Month,
}

impl WindowPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            WindowPeriod::Hour => "hour",
            WindowPeriod::Day => "day",
            WindowPeriod::Month => "month",
        }
    }
}

/// `[budget]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// Per-run ceiling when neither header nor rule gives one.
    pub default_run_usd: f64,
    /// Cap on a ceiling asked for by `x-agent-budget-usd`.
    pub max_run_usd: f64,
    pub mode: BudgetMode,
    /// Reservation of a call to a model without a price.
    pub fallback_reservation_usd: f64,
    /// Output tokens a reservation assumes when the request sets no limit.
    pub expected_output_tokens: u64,
    /// `[[budget.rules]]`, first match wins.
    pub rules: Vec<BudgetRule>,
    /// `[[budget.windows]]`.
    pub windows: Vec<WindowCap>,
    /// Lower a call's max output tokens to what the run can still pay for
    /// instead of refusing it.
    pub clamp_max_tokens: bool,
    /// End a stream whose running cost passes the run's ceiling.
    pub stop_streams_over_budget: bool,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            default_run_usd: 0.25,
            max_run_usd: 5.0,
            mode: BudgetMode::Reserve,
            fallback_reservation_usd: 0.05,
            expected_output_tokens: 1024,
            rules: Vec::new(),
            windows: Vec::new(),
            clamp_max_tokens: false,
            stop_streams_over_budget: false,
        }
    }
}

/// `[[budget.rules]]`: every key given must match the call that starts the run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetRule {
    #[serde(default)]
    pub release: Option<String>,
    #[serde(default)]
    pub request_type: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    pub run_usd: f64,
}

/// `[[budget.windows]]`: a spend cap per segment and calendar period.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowCap {
    #[serde(default)]
    pub release: Option<String>,
    #[serde(default)]
    pub request_type: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub tool: Option<String>,
    pub period: WindowPeriod,
    pub limit_usd: f64,
}

/// `[runs]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunsConfig {
    /// A run with no call for this long (and none in flight) is finished.
    pub idle_timeout_secs: u64,
    /// Upper bound of runs held in memory; the least recently active idle
    /// runs are ended early when it is reached.
    pub max_tracked_runs: usize,
    /// How many recent request-body hashes a run remembers for identical-call
    /// detection (0 turns it off).
    pub max_body_hashes_per_run: usize,
}

impl Default for RunsConfig {
    fn default() -> Self {
        RunsConfig {
            idle_timeout_secs: 300,
            max_tracked_runs: 200_000,
            max_body_hashes_per_run: 64,
        }
    }
}

/// Largest accepted `runs.max_body_hashes_per_run` (4 bytes each per run).
pub const MAX_BODY_HASHES_PER_RUN: usize = 1024;

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Converts a USD config value; `positive` rejects zero.
fn usd(value: f64, positive: bool, key: &str, errors: &mut Vec<String>) -> Money {
    let what = if positive {
        "must be a positive number"
    } else {
        "must be a non-negative number"
    };
    if !value.is_finite() || value < 0.0 || (positive && value == 0.0) {
        errors.push(format!("{key}: {what} (got {value})"));
        return Money::ZERO;
    }
    match Money::from_usd_f64(value) {
        Ok(m) => m,
        Err(MoneyError::TooPrecise(_)) => {
            errors.push(format!(
                "{key}: {what} with at most 12 fraction digits (got {value})"
            ));
            Money::ZERO
        }
        Err(MoneyError::TooLarge(_)) => {
            errors.push(format!("{key}: {what} below 18 million (got {value})"));
            Money::ZERO
        }
        Err(MoneyError::NotDecimal(_)) => {
            errors.push(format!("{key}: {what} (got {value})"));
            Money::ZERO
        }
    }
}

fn match_key(value: &Option<String>, key: &str, errors: &mut Vec<String>) -> Option<String> {
    match value {
        Some(v) if v.is_empty() => {
            errors.push(format!(
                "{key}: must not be empty (leave the key out to match every value)"
            ));
            None
        }
        other => other.clone(),
    }
}

impl BudgetConfig {
    /// Every problem of this section, each naming its key path under
    /// `key_prefix` (normally `"budget"`).
    pub fn validate(&self, key_prefix: &str) -> Vec<String> {
        match BudgetPolicy::build(self, key_prefix) {
            Ok(_) => Vec::new(),
            Err(errors) => errors,
        }
    }
}

impl RunsConfig {
    /// Every problem of this section, each naming its key path under
    /// `key_prefix` (normally `"runs"`).
    pub fn validate(&self, key_prefix: &str) -> Vec<String> {
        let mut errors = Vec::new();
        if self.idle_timeout_secs == 0 {
            errors.push(format!(
                "{}: must be a positive number of seconds",
                join(key_prefix, "idle_timeout_secs")
            ));
        }
        if self.idle_timeout_secs > 366 * 86_400 {
            errors.push(format!(
                "{}: must be at most one year (31622400 seconds)",
                join(key_prefix, "idle_timeout_secs")
            ));
        }
        if self.max_tracked_runs == 0 {
            errors.push(format!(
                "{}: must be a positive number",
                join(key_prefix, "max_tracked_runs")
            ));
        }
        if self.max_body_hashes_per_run > MAX_BODY_HASHES_PER_RUN {
            errors.push(format!(
                "{}: must be at most {MAX_BODY_HASHES_PER_RUN}",
                join(key_prefix, "max_body_hashes_per_run")
            ));
        }
        errors
    }
}

/// A `[[budget.rules]]` entry in validated form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulePolicy {
    pub release: Option<String>,
    pub request_type: Option<String>,
    pub model: Option<String>,
    pub run: Money,
}

impl RulePolicy {
    fn matches(&self, release: &str, request_type: &str, model: Option<&str>) -> bool {
        key_matches(&self.release, Some(release))
            && key_matches(&self.request_type, Some(request_type))
            && key_matches(&self.model, model)
    }
}

/// A `[[budget.windows]]` entry in validated form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowPolicy {
    pub release: Option<String>,
    pub request_type: Option<String>,
    pub model: Option<String>,
    pub tool: Option<String>,
    pub period: WindowPeriod,
    pub limit: Money,
    /// Readable identity, e.g. `day:release=2026-03-21,model=gpt-4.1` or
    /// `month:all`. Two caps with the same name share one spend counter, so
    /// the name also carries a cap's spend across a reload.
    pub name: String,
}

impl WindowPolicy {
    pub fn matches(
        &self,
        release: &str,
        request_type: &str,
        model: Option<&str>,
        tool: Option<&str>,
    ) -> bool {
        key_matches(&self.release, Some(release))
            && key_matches(&self.request_type, Some(request_type))
            && key_matches(&self.model, model)
            && key_matches(&self.tool, tool)
    }

    fn make_name(
        period: WindowPeriod,
        release: &Option<String>,
        request_type: &Option<String>,
        model: &Option<String>,
        tool: &Option<String>,
    ) -> String {
        let keys: Vec<String> = [
            ("release", release),
            ("request_type", request_type),
            ("model", model),
            ("tool", tool),
        ]
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect();
        if keys.is_empty() {
            format!("{}:all", period.as_str())
        } else {
            format!("{}:{}", period.as_str(), keys.join(","))
        }
    }
}

fn key_matches(want: &Option<String>, have: Option<&str>) -> bool {
    match want {
        None => true,
        Some(w) => have == Some(w.as_str()),
    }
}

/// `[budget]` with every amount converted to exact [`Money`] and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetPolicy {
    pub default_run: Money,
    pub max_run: Money,
    pub mode: BudgetMode,
    pub fallback_reservation: Money,
    pub expected_output_tokens: u64,
    pub rules: Vec<RulePolicy>,
    pub windows: Vec<WindowPolicy>,
    pub clamp_max_tokens: bool,
    pub stop_streams_over_budget: bool,
}

impl Default for BudgetPolicy {
    /// The policy of the default `[budget]` section (0.25 USD per run,
    /// header ceilings capped at 5 USD, reserve mode, no rules or windows).
    fn default() -> Self {
        BudgetPolicy {
            default_run: Money::from_picos(250_000_000_000),
            max_run: Money::from_picos(5_000_000_000_000),
            mode: BudgetMode::Reserve,
            fallback_reservation: Money::from_picos(50_000_000_000),
            expected_output_tokens: 1024,
            rules: Vec::new(),
            windows: Vec::new(),
            clamp_max_tokens: false,
            stop_streams_over_budget: false,
        }
    }
}

impl BudgetPolicy {
    /// Validates `[budget]` and converts it; errors name keys under `budget.`.
    pub fn from_config(config: &BudgetConfig) -> Result<BudgetPolicy, Vec<String>> {
        BudgetPolicy::build(config, "budget")
    }

    fn build(config: &BudgetConfig, prefix: &str) -> Result<BudgetPolicy, Vec<String>> {
        let mut errors = Vec::new();
        let default_run = usd(
            config.default_run_usd,
            true,
            &join(prefix, "default_run_usd"),
            &mut errors,
        );
        let max_run = usd(
            config.max_run_usd,
            true,
            &join(prefix, "max_run_usd"),
            &mut errors,
        );
        let fallback_reservation = usd(
            config.fallback_reservation_usd,
            false,
            &join(prefix, "fallback_reservation_usd"),
            &mut errors,
        );
        if config.expected_output_tokens == 0 {
            errors.push(format!(
                "{}: must be a positive number of tokens",
                join(prefix, "expected_output_tokens")
            ));
        }
        let mut rules = Vec::with_capacity(config.rules.len());
        for (i, rule) in config.rules.iter().enumerate() {
            let key = join(prefix, &format!("rules[{i}]"));
            rules.push(RulePolicy {
                release: match_key(&rule.release, &format!("{key}.release"), &mut errors),
                request_type: match_key(
                    &rule.request_type,
                    &format!("{key}.request_type"),
                    &mut errors,
                ),
                model: match_key(&rule.model, &format!("{key}.model"), &mut errors),
                run: usd(rule.run_usd, true, &format!("{key}.run_usd"), &mut errors),
            });
        }
        let mut windows: Vec<WindowPolicy> = Vec::with_capacity(config.windows.len());
        for (i, cap) in config.windows.iter().enumerate() {
            let key = join(prefix, &format!("windows[{i}]"));
            let release = match_key(&cap.release, &format!("{key}.release"), &mut errors);
            let request_type = match_key(
                &cap.request_type,
                &format!("{key}.request_type"),
                &mut errors,
            );
            let model = match_key(&cap.model, &format!("{key}.model"), &mut errors);
            let tool = match_key(&cap.tool, &format!("{key}.tool"), &mut errors);
            let limit = usd(
                cap.limit_usd,
                true,
                &format!("{key}.limit_usd"),
                &mut errors,
            );
            let name = WindowPolicy::make_name(cap.period, &release, &request_type, &model, &tool);
            if let Some(j) = windows.iter().position(|w| w.name == name) {
                errors.push(format!(
                    "{key}: same match keys and period as {} ({name})",
                    join(prefix, &format!("windows[{j}]"))
                ));
            }
            windows.push(WindowPolicy {
                release,
                request_type,
                model,
                tool,
                period: cap.period,
                limit,
                name,
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(BudgetPolicy {
            default_run,
            max_run,
            mode: config.mode,
            fallback_reservation,
            expected_output_tokens: config.expected_output_tokens,
            rules,
            windows,
            clamp_max_tokens: config.clamp_max_tokens,
            stop_streams_over_budget: config.stop_streams_over_budget,
        })
    }

    /// The ceiling of a run that starts with this call: the header clamped to
    /// `max_run`, else the first matching rule, else `default_run`.
    pub fn resolve_ceiling(
        &self,
        release: &str,
        request_type: &str,
        model: Option<&str>,
        header: Option<Money>,
    ) -> Money {
        if let Some(asked) = header {
            return asked.min(self.max_run);
        }
        self.rules
            .iter()
            .find(|r| r.matches(release, request_type, model))
            .map_or(self.default_run, |r| r.run)
    }
}
