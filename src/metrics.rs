//! Prometheus metrics (SPEC §7).
//!
//! One [`Metrics`] per proxy instance owns its registry, so tests run many
//! instances in one process without sharing counters. Cost counters hold exact
//! pico-dollars and become floating-point USD only when scraped
//! ([`MoneyCounter`]). Every label value passes through a [`LabelCap`]: after
//! `max_label_values` distinct values a label reports `other`.
//!
//! prometheus-client appends `_total` to counter names, so counters are
//! registered without it (`agent_run` is exposed as `agent_run_total`).

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::money::Money;
use crate::usage::Usage;

/// Buckets of `agent_run_cost_usd`, fixed by the contract.
pub const RUN_COST_BUCKETS: [f64; 8] = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0];
/// Latency buckets in seconds, from 1 ms to 5 min.
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A counter of exact money, exported as fractional USD.
#[derive(Debug, Default)]
pub struct MoneyCounter(AtomicU64);

impl MoneyCounter {
    pub fn add(&self, amount: Money) {
        // Saturating add: a counter that would pass u64 pico-dollars (about
        // 18 million USD) stays at its maximum instead of wrapping.
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_add(amount.picos()))
            });
    }

    pub fn get(&self) -> Money {
        Money::from_picos(self.0.load(Ordering::Relaxed))
    }
}

impl TypedMetric for MoneyCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for MoneyCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(
            &self.get().as_usd_f64(),
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// A label value: a fixed word of tollgate's own, or a value a [`LabelCap`]
/// admitted, shared with every series that carries it. A clone is a copy or
/// a reference-count increment, never a new string; equality and hashing go
/// by the text, so the two forms of one word are the same label.
#[derive(Clone, Debug)]
pub enum LabelValue {
    Fixed(&'static str),
    Interned(Arc<str>),
}

impl LabelValue {
    pub fn as_str(&self) -> &str {
        match self {
            LabelValue::Fixed(v) => v,
            LabelValue::Interned(v) => v,
        }
    }
}

impl From<&'static str> for LabelValue {
    fn from(value: &'static str) -> Self {
        LabelValue::Fixed(value)
    }
}

impl PartialEq for LabelValue {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for LabelValue {}

impl Hash for LabelValue {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialEq<&str> for LabelValue {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl EncodeLabelValue for LabelValue {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Caps the distinct values of one label.
#[derive(Debug)]
pub struct LabelCap {
    max: usize,
    /// foldhash: looked up several times per call; at most `max` values
    /// are ever inserted, so chosen collisions cannot grow it.
    seen: Mutex<HashSet<Arc<str>, foldhash::fast::RandomState>>,
}

pub const OVERFLOW_LABEL: &str = "other";

impl LabelCap {
    pub fn new(max: usize) -> Self {
        LabelCap {
            max,
            seen: Mutex::new(HashSet::default()),
        }
    }

    /// `value` if it is one of the first `max` distinct values, else `other`.
    pub fn get(&self, value: &str) -> LabelValue {
        let mut seen = locked(&self.seen);
        if let Some(known) = seen.get(value) {
            return LabelValue::Interned(known.clone());
        }
        if seen.len() < self.max {
            let admitted: Arc<str> = Arc::from(value);
            seen.insert(admitted.clone());
            return LabelValue::Interned(admitted);
        }
        LabelValue::Fixed(OVERFLOW_LABEL)
    }
}

/// The lock of a label or series cache. Each update is a single insert or
/// push, which a panic cannot leave half done, so a poisoned lock is used
/// as it is.
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelRelease {
    pub model: LabelValue,
    pub release: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub model: LabelValue,
    pub token_type: LabelValue,
    pub release: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolRelease {
    pub tool: LabelValue,
    pub release: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub status: LabelValue,
    pub stop_reason: LabelValue,
    pub release: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReleaseLabel {
    pub release: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub route: LabelValue,
    /// The HTTP status code, written as its number.
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    pub provider: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    pub release: LabelValue,
    pub scope: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub release: LabelValue,
    pub kind: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolStatus {
    pub tool: LabelValue,
    /// The HTTP status code, written as its number.
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SegmentLabels {
    pub release: LabelValue,
    pub request_type: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateErrorLabels {
    pub backend: LabelValue,
    pub op: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateOpLabel {
    pub op: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: LabelValue,
}

type LatencyFamily = Family<RouteLabel, Histogram, fn() -> Histogram>;

/// The series of one route that every call on it updates, held so that a
/// call does not look each up in its family (a SipHash of the labels and a
/// read lock apiece). The handles share their values with the families'
/// series: the scrape reads the same numbers.
pub struct RouteSeries {
    /// The route's label value (`other` past the label cap).
    pub label: LabelValue,
    pub upstream_latency: Histogram,
    pub time_to_first_byte: Histogram,
    pub call_duration: Histogram,
    /// `agent_calls_total` by status, added as statuses are first seen.
    calls: Mutex<Vec<(u16, Counter)>>,
    calls_family: Family<CallLabels, Counter>,
}

impl RouteSeries {
    /// Counts one call that ended with `status` in `agent_calls_total`.
    pub fn count_call(&self, status: u16) {
        let mut calls = locked(&self.calls);
        if let Some((_, counter)) = calls.iter().find(|(s, _)| *s == status) {
            counter.inc();
            return;
        }
        let counter = self
            .calls_family
            .get_or_create(&CallLabels {
                route: self.label.clone(),
                status,
            })
            .clone();
        counter.inc();
        calls.push((status, counter));
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

fn run_cost_histogram() -> Histogram {
    Histogram::new(RUN_COST_BUCKETS)
}

/// `agent_token_usage_total`'s token types, in [`ModelSeries`]'s order:
/// `prompt` (all input), `cached_prompt`, `cache_write`, `completion`
/// (all output), `reasoning` (SPEC §4).
const TOKEN_TYPES: [&str; 5] = [
    "prompt",
    "cached_prompt",
    "cache_write",
    "completion",
    "reasoning",
];

/// The series a priced LLM call updates for one model and release: its
/// cost and its tokens by type, held as handles as [`RouteSeries`] are.
pub struct ModelSeries {
    /// The model and release label values.
    pub labels: ModelRelease,
    llm_cost: SharedMoneyCounter,
    /// By `TOKEN_TYPES` index, created on a type's first non-zero count.
    tokens: [OnceLock<Counter>; TOKEN_TYPES.len()],
    token_family: Family<TokenLabels, Counter>,
}

impl ModelSeries {
    /// Adds one call's tokens (the types it used) and its cost.
    pub fn record(&self, usage: &Usage, cost: Money) {
        let counts = [
            usage.input_tokens,
            usage.cached_input_tokens,
            usage.cache_write_input_tokens,
            usage.output_tokens,
            usage.reasoning_tokens,
        ];
        for ((slot, token_type), count) in self.tokens.iter().zip(TOKEN_TYPES).zip(counts) {
            if let Some(count) = count.filter(|c| *c > 0) {
                slot.get_or_init(|| {
                    self.token_family
                        .get_or_create(&TokenLabels {
                            model: self.labels.model.clone(),
                            token_type: LabelValue::Fixed(token_type),
                            release: self.labels.release.clone(),
                        })
                        .clone()
                })
                .inc_by(count);
            }
        }
        self.llm_cost.add(cost);
    }
}

/// Every metric tollgate exports.
pub struct Metrics {
    registry: Registry,
    caps: Caps,
    /// Each route's per-call series (see [`RouteSeries`]), for the routes
    /// the route label cap admitted.
    route_series: Mutex<HashMap<Arc<str>, Arc<RouteSeries>, foldhash::fast::RandomState>>,
    /// Each (model, release) label pair's series (see [`ModelSeries`]).
    /// Both labels are capped, so the map is bounded as the families are.
    model_series: Mutex<HashMap<ModelRelease, Arc<ModelSeries>, foldhash::fast::RandomState>>,
    /// `agent_segment_cost_usd` handles by (release, request type) labels.
    segment_series: Mutex<HashMap<SegmentLabels, SharedMoneyCounter, foldhash::fast::RandomState>>,
    pub token_usage: Family<TokenLabels, Counter>,
    pub llm_cost: Family<ModelRelease, SharedMoneyCounter>,
    pub tool_cost: Family<ToolRelease, MoneyCounter>,
    pub segment_cost: Family<SegmentLabels, SharedMoneyCounter>,
    pub run_total: Family<RunLabels, Counter>,
    pub run_cost: Family<ReleaseLabel, Histogram, fn() -> Histogram>,
    pub budget_breach: Family<ReleaseLabel, Counter>,
    pub budget_stream_stops: Family<ReleaseLabel, Counter>,
    pub budget_rejections: Family<RejectionLabels, Counter>,
    pub calls: Family<CallLabels, Counter>,
    pub tool_calls: Family<ToolStatus, Counter>,
    pub usage_estimated: Family<ProviderLabel, Counter>,
    pub usage_parse_errors: Family<ProviderLabel, Counter>,
    pub unpriced_calls: Family<ModelLabel, Counter>,
    pub retries: Family<RetryLabels, Counter>,
    pub repeated_calls: Family<ReleaseLabel, Counter>,
    pub upstream_latency: LatencyFamily,
    pub time_to_first_byte: LatencyFamily,
    pub call_duration: LatencyFamily,
    pub budget_reserved: Gauge<f64, AtomicU64>,
    pub budget_settled: SharedMoneyCounter,
    pub active_runs: Gauge,
    pub runs_evicted: Counter,
    pub config_reloads: Family<ResultLabel, Counter>,
    /// Ledger figures the writer keeps, copied in at scrape time.
    pub ledger_written: Gauge,
    pub ledger_queue: Gauge,
    pub ledger_write_errors: Gauge,
    pub ledger_backpressure: Gauge,
    pub ledger_buffered: Gauge,
    pub ledger_dropped: Counter,
    /// Shared state backend (`[state]`): failed or timed-out operations.
    pub state_errors: Family<StateErrorLabels, Counter>,
    pub state_reconcile_pending: Gauge,
    pub state_reconcile_dropped: Counter,
    pub state_round_trips: Family<StateOpLabel, Counter>,
}

/// One [`LabelCap`] per label name.
struct Caps {
    model: LabelCap,
    release: LabelCap,
    tool: LabelCap,
    route: LabelCap,
    request_type: LabelCap,
    stop_reason: LabelCap,
}

impl Metrics {
    pub fn new(max_label_values: usize) -> Arc<Metrics> {
        let mut registry = Registry::default();
        let m = Metrics {
            caps: Caps {
                model: LabelCap::new(max_label_values),
                release: LabelCap::new(max_label_values),
                tool: LabelCap::new(max_label_values),
                route: LabelCap::new(max_label_values),
                request_type: LabelCap::new(max_label_values),
                stop_reason: LabelCap::new(max_label_values),
            },
            route_series: Mutex::new(HashMap::default()),
            model_series: Mutex::new(HashMap::default()),
            segment_series: Mutex::new(HashMap::default()),
            token_usage: Family::default(),
            llm_cost: Family::default(),
            tool_cost: Family::default(),
            segment_cost: Family::default(),
            run_total: Family::default(),
            run_cost: Family::new_with_constructor(run_cost_histogram),
            budget_breach: Family::default(),
            budget_stream_stops: Family::default(),
            budget_rejections: Family::default(),
            calls: Family::default(),
            tool_calls: Family::default(),
            usage_estimated: Family::default(),
            usage_parse_errors: Family::default(),
            unpriced_calls: Family::default(),
            retries: Family::default(),
            repeated_calls: Family::default(),
            upstream_latency: Family::new_with_constructor(latency_histogram),
            time_to_first_byte: Family::new_with_constructor(latency_histogram),
            call_duration: Family::new_with_constructor(latency_histogram),
            budget_reserved: Gauge::default(),
            budget_settled: SharedMoneyCounter::default(),
            active_runs: Gauge::default(),
            runs_evicted: Counter::default(),
            config_reloads: Family::default(),
            ledger_written: Gauge::default(),
            ledger_queue: Gauge::default(),
            ledger_write_errors: Gauge::default(),
            ledger_backpressure: Gauge::default(),
            ledger_buffered: Gauge::default(),
            ledger_dropped: Counter::default(),
            state_errors: Family::default(),
            state_reconcile_pending: Gauge::default(),
            state_reconcile_dropped: Counter::default(),
            state_round_trips: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "agent_token_usage",
            "Tokens used, by model, token type and release",
            m.token_usage.clone(),
        );
        r.register(
            "agent_llm_cost_usd",
            "LLM spend in USD, by model and release",
            m.llm_cost.clone(),
        );
        r.register(
            "agent_tool_cost_usd",
            "Paid tool spend in USD, by tool and release",
            m.tool_cost.clone(),
        );
        r.register(
            "agent_segment_cost_usd",
            "All spend (LLM and tool) in USD, by release and request type",
            m.segment_cost.clone(),
        );
        r.register(
            "agent_run",
            "Runs ended, by status, stop reason and release",
            m.run_total.clone(),
        );
        r.register(
            "agent_run_cost_usd",
            "Total cost of each ended run in USD",
            m.run_cost.clone(),
        );
        r.register(
            "agent_budget_breach",
            "Runs that ended with a cost above their ceiling",
            m.budget_breach.clone(),
        );
        r.register(
            "agent_budget_stream_stops",
            "Streams tollgate ended because their running cost passed the run's budget",
            m.budget_stream_stops.clone(),
        );
        r.register(
            "agent_budget_rejections",
            "Calls refused for budget, by release and scope (run, window)",
            m.budget_rejections.clone(),
        );
        r.register(
            "agent_calls",
            "Calls proxied, by route and response status",
            m.calls.clone(),
        );
        r.register(
            "agent_tool_calls",
            "Tool calls, by tool and response status",
            m.tool_calls.clone(),
        );
        r.register(
            "agent_usage_estimated",
            "Calls charged an estimate because usage could not be read",
            m.usage_estimated.clone(),
        );
        r.register(
            "agent_usage_parse_errors",
            "Response bodies whose usage could not be decoded",
            m.usage_parse_errors.clone(),
        );
        r.register(
            "agent_unpriced_calls",
            "Calls of a model the price table does not know (charged zero)",
            m.unpriced_calls.clone(),
        );
        r.register(
            "agent_retries",
            "Calls recognised as retries, by kind",
            m.retries.clone(),
        );
        r.register(
            "agent_repeated_calls",
            "Calls whose request body repeats an earlier call of the same run",
            m.repeated_calls.clone(),
        );
        r.register(
            "agent_upstream_latency_seconds",
            "Time from forwarding a call to the upstream's response headers",
            m.upstream_latency.clone(),
        );
        r.register(
            "agent_time_to_first_byte_seconds",
            "Time from receiving a call to the first response body byte",
            m.time_to_first_byte.clone(),
        );
        r.register(
            "agent_call_duration_seconds",
            "Time from receiving a call to the end of its response body",
            m.call_duration.clone(),
        );
        r.register(
            "agent_budget_reserved_usd",
            "Reservations currently held by calls in flight, in USD",
            m.budget_reserved.clone(),
        );
        r.register(
            "agent_budget_settled_usd",
            "Spend settled against budgets, in USD",
            m.budget_settled.clone(),
        );
        r.register(
            "agent_active_runs",
            "Runs currently tracked",
            m.active_runs.clone(),
        );
        r.register(
            "agent_runs_evicted",
            "Runs ended early because the run table was full",
            m.runs_evicted.clone(),
        );
        r.register(
            "agent_config_reloads",
            "Config reloads, by result",
            m.config_reloads.clone(),
        );
        r.register(
            "agent_ledger_records_written",
            "Ledger records committed since start (a running total)",
            m.ledger_written.clone(),
        );
        r.register(
            "agent_ledger_queue_depth",
            "Ledger records waiting for the writer",
            m.ledger_queue.clone(),
        );
        r.register(
            "agent_ledger_write_errors",
            "Ledger writes that failed since start (retried; a running total)",
            m.ledger_write_errors.clone(),
        );
        r.register(
            "agent_ledger_backpressure_waits",
            "Times a call waited for room in the ledger queue since start (a running total)",
            m.ledger_backpressure.clone(),
        );
        r.register(
            "agent_ledger_buffered_records",
            "Ledger records accepted and not yet committed (PostgreSQL: held through an outage)",
            m.ledger_buffered.clone(),
        );
        r.register(
            "agent_ledger_dropped",
            "Ledger records dropped because the PostgreSQL outage buffer was full (ledger.max_buffered_records)",
            m.ledger_dropped.clone(),
        );
        r.register(
            "agent_state_errors",
            "Shared state operations that failed or timed out, by backend and operation",
            m.state_errors.clone(),
        );
        r.register(
            "agent_state_reconcile_pending",
            "Settlements and run ends waiting for the shared state to answer again",
            m.state_reconcile_pending.clone(),
        );
        r.register(
            "agent_state_reconcile_dropped",
            "Settlements dropped because the reconcile queue was full",
            m.state_reconcile_dropped.clone(),
        );
        r.register(
            "agent_state_round_trips",
            "Round trips to the shared state backend, by operation",
            m.state_round_trips.clone(),
        );
        let mut m = m;
        m.registry = registry;
        Arc::new(m)
    }

    /// The registry in the Prometheus/OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn model(&self, v: &str) -> LabelValue {
        self.caps.model.get(v)
    }
    pub fn release(&self, v: &str) -> LabelValue {
        self.caps.release.get(v)
    }
    pub fn tool(&self, v: &str) -> LabelValue {
        self.caps.tool.get(v)
    }
    pub fn route(&self, v: &str) -> LabelValue {
        self.caps.route.get(v)
    }

    /// The series every call on route `name` updates.
    pub fn route_series(&self, name: &str) -> Arc<RouteSeries> {
        let mut known = locked(&self.route_series);
        if let Some(series) = known.get(name) {
            return series.clone();
        }
        let label = self.route(name);
        let histogram = |family: &LatencyFamily| {
            family
                .get_or_create(&RouteLabel {
                    route: label.clone(),
                })
                .clone()
        };
        let series = Arc::new(RouteSeries {
            upstream_latency: histogram(&self.upstream_latency),
            time_to_first_byte: histogram(&self.time_to_first_byte),
            call_duration: histogram(&self.call_duration),
            calls: Mutex::new(Vec::new()),
            calls_family: self.calls.clone(),
            label,
        });
        // Kept when the route has a label of its own: one past the cap is
        // counted under `other` and looked up again each time, so the map
        // holds at most the admitted routes.
        if series.label.as_str() == name {
            known.insert(Arc::from(name), series.clone());
        }
        series
    }

    pub fn request_type(&self, v: &str) -> LabelValue {
        self.caps.request_type.get(v)
    }
    pub fn stop_reason(&self, v: &str) -> LabelValue {
        self.caps.stop_reason.get(v)
    }

    /// The series a priced LLM call of `model` (its name; the label cap
    /// applies) under release label `release` updates.
    pub fn model_series(&self, model: &str, release: &LabelValue) -> Arc<ModelSeries> {
        let labels = ModelRelease {
            model: self.model(model),
            release: release.clone(),
        };
        let mut known = locked(&self.model_series);
        if let Some(series) = known.get(&labels) {
            return series.clone();
        }
        let series = Arc::new(ModelSeries {
            llm_cost: self.llm_cost.get_or_create(&labels).clone(),
            tokens: Default::default(),
            token_family: self.token_usage.clone(),
            labels: labels.clone(),
        });
        known.insert(labels, series.clone());
        series
    }

    /// Adds `cost` to `agent_segment_cost_usd` for the release and request
    /// type labels.
    pub fn add_segment_cost(&self, release: &LabelValue, request_type: &str, cost: Money) {
        let labels = SegmentLabels {
            release: release.clone(),
            request_type: self.request_type(request_type),
        };
        let mut known = locked(&self.segment_series);
        if let Some(counter) = known.get(&labels) {
            counter.add(cost);
            return;
        }
        let counter = self.segment_cost.get_or_create(&labels).clone();
        counter.add(cost);
        known.insert(labels, counter);
    }
}

/// A money counter shared between the registry and its owner: a total that
/// another component keeps and the scrape copies in, or a series a call
/// adds to through a held handle.
#[derive(Debug, Default, Clone)]
pub struct SharedMoneyCounter(Arc<MoneyCounter>);

impl SharedMoneyCounter {
    pub fn add(&self, amount: Money) {
        self.0.add(amount);
    }

    /// Sets the exported total; used for totals kept elsewhere (budgets).
    pub fn set(&self, amount: Money) {
        self.0 .0.store(amount.picos(), Ordering::Relaxed);
    }

    pub fn get(&self) -> Money {
        self.0.get()
    }
}

impl TypedMetric for SharedMoneyCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for SharedMoneyCounter {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_overflow_to_other() {
        let cap = LabelCap::new(2);
        assert_eq!(cap.get("a"), "a");
        assert_eq!(cap.get("b"), "b");
        assert_eq!(cap.get("c"), "other");
        assert_eq!(cap.get("a"), "a");
    }

    #[test]
    fn route_series_update_the_exported_series_and_respect_the_label_cap() {
        let m = Metrics::new(2);
        let openai = m.route_series("openai");
        assert!(Arc::ptr_eq(&openai, &m.route_series("openai")));
        openai.count_call(200);
        openai.count_call(200);
        openai.count_call(429);
        openai.call_duration.observe(0.5);
        openai.time_to_first_byte.observe(0.1);
        openai.upstream_latency.observe(0.2);
        // The family's own handle for the same labels is the same series.
        m.calls
            .get_or_create(&CallLabels {
                route: m.route("openai"),
                status: 200,
            })
            .inc();
        m.route_series("tools").count_call(200);
        // Past the cap of 2: counted under `other`, not cached by name.
        let third = m.route_series("third");
        assert_eq!(third.label, OVERFLOW_LABEL);
        third.count_call(502);
        m.route_series("fourth").count_call(502);
        assert_eq!(
            m.route_series.lock().unwrap().len(),
            2,
            "only admitted routes are kept"
        );
        let text = m.render();
        for line in [
            "agent_calls_total{route=\"openai\",status=\"200\"} 3",
            "agent_calls_total{route=\"openai\",status=\"429\"} 1",
            "agent_calls_total{route=\"tools\",status=\"200\"} 1",
            "agent_calls_total{route=\"other\",status=\"502\"} 2",
            "agent_call_duration_seconds_count{route=\"openai\"} 1",
            "agent_time_to_first_byte_seconds_count{route=\"openai\"} 1",
            "agent_upstream_latency_seconds_count{route=\"openai\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn contract_metrics_have_their_names_types_and_buckets() {
        let m = Metrics::new(200);
        m.model_series("gpt-4.1", &"r1".into()).record(
            &Usage {
                input_tokens: Some(10),
                output_tokens: Some(3),
                ..Usage::default()
            },
            Money::parse_usd("0.000123").unwrap(),
        );
        m.tool_cost
            .get_or_create(&ToolRelease {
                tool: "search".into(),
                release: "r1".into(),
            })
            .add(Money::parse_usd("0.005").unwrap());
        m.run_total
            .get_or_create(&RunLabels {
                status: "ok".into(),
                stop_reason: "completed".into(),
                release: "r1".into(),
            })
            .inc();
        m.run_cost
            .get_or_create(&ReleaseLabel {
                release: "r1".into(),
            })
            .observe(0.02);
        m.budget_breach
            .get_or_create(&ReleaseLabel {
                release: "r1".into(),
            })
            .inc();
        let text = m.render();
        for line in [
            "# TYPE agent_run counter",
            "agent_run_total{status=\"ok\",stop_reason=\"completed\",release=\"r1\"} 1",
            "# TYPE agent_llm_cost_usd counter",
            "agent_llm_cost_usd_total{model=\"gpt-4.1\",release=\"r1\"} 0.000123",
            "# TYPE agent_tool_cost_usd counter",
            "agent_tool_cost_usd_total{tool=\"search\",release=\"r1\"} 0.005",
            "# TYPE agent_token_usage counter",
            "agent_token_usage_total{model=\"gpt-4.1\",token_type=\"prompt\",release=\"r1\"} 10",
            "agent_token_usage_total{model=\"gpt-4.1\",token_type=\"completion\",release=\"r1\"} 3",
            "# TYPE agent_run_cost_usd histogram",
            "agent_run_cost_usd_bucket{le=\"0.001\",release=\"r1\"} 0",
            "agent_run_cost_usd_bucket{le=\"0.03\",release=\"r1\"} 1",
            "agent_run_cost_usd_bucket{le=\"3.0\",release=\"r1\"} 1",
            "# TYPE agent_budget_breach counter",
            "agent_budget_breach_total{release=\"r1\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        let buckets = text
            .lines()
            .filter(|l| l.starts_with("agent_run_cost_usd_bucket"))
            .count();
        assert_eq!(
            buckets,
            RUN_COST_BUCKETS.len() + 1,
            "the contract's 8 buckets and +Inf"
        );
    }

    /// The exported series of a fixed set of updates, line for line (sorted:
    /// the order of series within a family is not fixed).
    /// Label values, the status code, the overflow to `other` and every
    /// per-call family must keep this exact encoding.
    #[test]
    fn exported_text_is_unchanged() {
        let m = Metrics::new(2);
        let release = m.release("r1");
        let _ = m.model("gpt-4.1");
        let _ = m.model("gpt-4o");
        let route = m.route("openai");
        let usage = Usage {
            input_tokens: Some(1200),
            output_tokens: Some(30),
            cached_input_tokens: Some(800),
            cache_write_input_tokens: Some(5),
            reasoning_tokens: Some(7),
            ..Usage::default()
        };
        m.model_series("gpt-4.1", &release)
            .record(&usage, Money::ZERO);
        // Past the cap of 2 models: the `other` series, twice.
        for model in ["claude-3", "claude-4"] {
            m.model_series(model, &release)
                .record(&usage, Money::from_picos(500));
        }
        m.add_segment_cost(&release, "default", Money::parse_usd("1.5").unwrap());
        m.calls
            .get_or_create(&CallLabels {
                route: route.clone(),
                status: 200,
            })
            .inc();
        m.calls
            .get_or_create(&CallLabels {
                route: route.clone(),
                status: 503,
            })
            .inc();
        m.tool_calls
            .get_or_create(&ToolStatus {
                tool: m.tool("search"),
                status: 402,
            })
            .inc();
        m.retries
            .get_or_create(&RetryLabels {
                release: release.clone(),
                kind: "sdk_retry".into(),
            })
            .inc();
        m.usage_estimated
            .get_or_create(&ProviderLabel {
                provider: "tool".into(),
            })
            .inc();
        m.run_total
            .get_or_create(&RunLabels {
                status: "error".into(),
                stop_reason: m.stop_reason("budget_exceeded"),
                release: release.clone(),
            })
            .inc();
        m.call_duration
            .get_or_create(&RouteLabel { route })
            .observe(0.02);
        let sorted = |text: &str| {
            let mut lines: Vec<String> = text
                .lines()
                .filter(|l| l.contains('{') && (!l.contains("_bucket{") || l.contains("+Inf")))
                .map(str::to_string)
                .collect();
            lines.sort();
            lines
        };
        let expected = "\
agent_call_duration_seconds_bucket{le=\"+Inf\",route=\"openai\"} 1
agent_call_duration_seconds_count{route=\"openai\"} 1
agent_call_duration_seconds_sum{route=\"openai\"} 0.02
agent_calls_total{route=\"openai\",status=\"200\"} 1
agent_calls_total{route=\"openai\",status=\"503\"} 1
agent_llm_cost_usd_total{model=\"gpt-4.1\",release=\"r1\"} 0.0
agent_llm_cost_usd_total{model=\"other\",release=\"r1\"} 1e-9
agent_retries_total{release=\"r1\",kind=\"sdk_retry\"} 1
agent_run_total{status=\"error\",stop_reason=\"budget_exceeded\",release=\"r1\"} 1
agent_segment_cost_usd_total{release=\"r1\",request_type=\"default\"} 1.5
agent_token_usage_total{model=\"gpt-4.1\",token_type=\"cache_write\",release=\"r1\"} 5
agent_token_usage_total{model=\"gpt-4.1\",token_type=\"cached_prompt\",release=\"r1\"} 800
agent_token_usage_total{model=\"gpt-4.1\",token_type=\"completion\",release=\"r1\"} 30
agent_token_usage_total{model=\"gpt-4.1\",token_type=\"prompt\",release=\"r1\"} 1200
agent_token_usage_total{model=\"gpt-4.1\",token_type=\"reasoning\",release=\"r1\"} 7
agent_token_usage_total{model=\"other\",token_type=\"cache_write\",release=\"r1\"} 10
agent_token_usage_total{model=\"other\",token_type=\"cached_prompt\",release=\"r1\"} 1600
agent_token_usage_total{model=\"other\",token_type=\"completion\",release=\"r1\"} 60
agent_token_usage_total{model=\"other\",token_type=\"prompt\",release=\"r1\"} 2400
agent_token_usage_total{model=\"other\",token_type=\"reasoning\",release=\"r1\"} 14
agent_tool_calls_total{tool=\"search\",status=\"402\"} 1
agent_usage_estimated_total{provider=\"tool\"} 1
";
        assert_eq!(sorted(&m.render()), sorted(expected), "{}", m.render());
    }
}
