//! Settlement: what one call cost, decided once when its response ends (or
//! is cut, or its client leaves). Usage read from the body wins; a 2xx whose
//! usage cannot be read is charged an estimate, flagged and counted, never a
//! silent zero; a provider error without usage costs nothing (SPEC §9).
//! The cost then goes to the budget (settling the reservation), the metrics
//! and one structured log line.

use std::sync::Arc;
use std::time::Duration;

use compact_str::CompactString;
use http::StatusCode;
use tokio::time::Instant;

use crate::budget::{Admission, CallFlags, CostKind};
use crate::config::{RouteKind, ToolCost};
use crate::ledger::CallRecord;
use crate::metrics::{
    LabelValue, ModelLabel, ProviderLabel, ReleaseLabel, RouteSeries, ToolRelease, ToolStatus,
};
use crate::money::Money;
use crate::pricing::PriceTable;
use crate::proxy::attribution::Attribution;
use crate::proxy::request::RequestInfo;
use crate::state::AppState;
use crate::usage::{self, Observation, Outcome, Usage};

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The upstream finished the body.
    Complete,
    /// The upstream connection failed mid-body.
    UpstreamError,
    /// The client went away before the end.
    ClientGone,
    /// The upstream was silent longer than the stream idle timeout.
    IdleTimeout,
    /// tollgate ended the stream: its running cost passed the run's budget.
    BudgetStop,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Complete => "complete",
            End::UpstreamError => "upstream_error",
            End::ClientGone => "client_gone",
            End::IdleTimeout => "idle_timeout",
            End::BudgetStop => "budget_stop",
        }
    }
}

/// What settlement decided, for the non-streaming response headers.
#[derive(Debug, Clone, Copy)]
pub struct Settled {
    pub cost: Money,
    pub run_cost_after: Money,
    pub remaining_after: Option<Money>,
}

/// Everything settlement needs to know about one call, gathered on the way
/// in and on the response head.
pub struct CallMeter {
    pub state: Arc<AppState>,
    pub pricing: Arc<PriceTable>,
    pub route: String,
    /// The route's metric series and the release's label value, looked up
    /// once per call when it came in.
    pub route_series: Arc<RouteSeries>,
    pub release_label: LabelValue,
    pub kind: RouteKind,
    pub tool: Option<String>,
    pub tool_cost: Option<ToolCost>,
    pub charge_failed_calls: bool,
    pub attribution: Attribution,
    pub request: RequestInfo,
    pub request_bytes: u64,
    pub started: Instant,
    pub status: StatusCode,
    pub upstream_latency: Duration,
    pub first_byte: Option<Duration>,
    pub admission: Option<Admission>,
    /// Tool cost read from the response header, if the route uses one.
    pub tool_header_cost: Option<Result<Money, String>>,
    /// Wall-clock start of the call, unix milliseconds (the ledger's time).
    pub started_ms: u64,
    pub flags: CallFlags,
}

impl CallMeter {
    /// Settles the call. `observation` is the usage reader's result (LLM
    /// routes); `tool_body` the captured body (JSON-pointer tool routes).
    pub fn settle(
        mut self,
        observation: Option<Observation>,
        tool_body: Option<&[u8]>,
        end: End,
    ) -> Settled {
        let duration = self.started.elapsed();
        let metrics = self.state.metrics.clone();
        let status = self.status.as_u16();
        self.route_series.count_call(status);
        self.route_series
            .call_duration
            .observe(duration.as_secs_f64());
        if let Some(ttfb) = self.first_byte {
            self.route_series
                .time_to_first_byte
                .observe(ttfb.as_secs_f64());
        }
        if end == End::BudgetStop {
            metrics
                .budget_stream_stops
                .get_or_create(&ReleaseLabel {
                    release: self.release_label.clone(),
                })
                .inc();
        }
        let failed = !self.status.is_success()
            || observation
                .as_ref()
                .is_some_and(|o| o.outcome == Outcome::Failed)
            || end != End::Complete;

        let (cost, kind, record) = match self.kind {
            RouteKind::Tool => self.tool_cost(tool_body, end),
            _ => self.llm_cost(observation, end),
        };
        metrics.add_segment_cost(&self.release_label, &self.attribution.request_type, cost);

        let (run_cost_after, remaining_after) = match &self.admission {
            Some(admission) => {
                let before = admission.run_spent();
                // `remaining` already leaves out this call's own reservation.
                let remaining = admission.remaining().map(|r| r.saturating_sub(cost));
                (before.saturating_add(cost), remaining)
            }
            None => (cost, None),
        };
        let run_ceiling = self.admission.as_ref().and_then(Admission::ceiling);
        if let Some(admission) = self.admission.take() {
            admission.settle(cost, kind, failed, self.attribution.end_run.clone());
        }

        tracing::info!(
            target: "tollgate::call",
            run_id = self.attribution.run_id.as_deref().unwrap_or(""),
            release = self.attribution.release.as_str(),
            request_type = self.attribution.request_type.as_str(),
            route = self.route.as_str(),
            model = record.model.as_deref().unwrap_or(""),
            tool = self.tool.as_deref().unwrap_or(""),
            status,
            end = end.as_str(),
            streamed = self.request.stream,
            prompt_tokens = record.usage.as_ref().and_then(|u| u.input_tokens),
            completion_tokens = record.usage.as_ref().and_then(|u| u.output_tokens),
            cached_tokens = record.usage.as_ref().and_then(|u| u.cached_input_tokens),
            cost_usd = cost.decimal_digits().as_str(),
            estimated = record.estimated,
            latency_ms = duration.as_millis() as u64,
            upstream_ms = self.upstream_latency.as_millis() as u64,
            "call"
        );
        if let Some(ledger) = &self.state.ledger {
            // The meter ends here: its strings move into the record.
            let usage = record.usage.unwrap_or_default();
            ledger.record_call(CallRecord {
                ts_ms: self.started_ms,
                run_id: self.attribution.run_id.map(CompactString::from),
                release: self.attribution.release.into(),
                request_type: self.attribution.request_type.into(),
                route: self.route.into(),
                provider: self.kind.as_str(),
                model: record.model.map(CompactString::from),
                price_entry: record.price_entry.map(CompactString::from),
                tool: self.tool.map(CompactString::from),
                status,
                outcome: end.as_str(),
                prompt_tokens: usage.input_tokens,
                cached_tokens: usage.cached_input_tokens,
                cache_write_tokens: usage.cache_write_input_tokens,
                completion_tokens: usage.output_tokens,
                reasoning_tokens: usage.reasoning_tokens,
                cost,
                latency_ms: duration.as_millis() as u64,
                ttfb_ms: self.first_byte.map(|d| d.as_millis() as u64),
                streamed: self.request.stream,
                estimated: record.estimated,
                sdk_retry: self.flags.sdk_retry,
                repeat_after_failure: self.flags.repeat_after_failure,
                duplicate_body: self.flags.duplicate_body,
                run_ceiling,
                price_version: self.pricing.version().into(),
            });
        }
        Settled {
            cost,
            run_cost_after,
            remaining_after,
        }
    }

    fn llm_cost(&self, observation: Option<Observation>, end: End) -> (Money, CostKind, Record) {
        let metrics = &self.state.metrics;
        let provider = self.kind.as_str();
        let mut observation = observation.unwrap_or_else(empty_observation);
        if observation.parse_error {
            metrics
                .usage_parse_errors
                .get_or_create(&ProviderLabel {
                    provider: provider.into(),
                })
                .inc();
        }
        let (usage, estimated) = resolve_usage(&observation, self.status, end, self.request_bytes);
        let model = observation
            .model
            .take()
            .filter(|m| !m.is_empty())
            .or_else(|| self.request.model.clone());
        if estimated {
            metrics
                .usage_estimated
                .get_or_create(&ProviderLabel {
                    provider: provider.into(),
                })
                .inc();
        }
        let Some(usage) = usage else {
            return (
                Money::ZERO,
                CostKind::Llm,
                Record {
                    model,
                    usage: None,
                    estimated,
                    price_entry: None,
                },
            );
        };
        let model_name = model.as_deref().unwrap_or("unknown");
        let mut priced = self.pricing.cost(model_name, &usage);
        if priced.entry.is_none() {
            if let Some(requested) = self.request.model.as_deref().filter(|r| *r != model_name) {
                priced = self.pricing.cost(requested, &usage);
            }
        }
        let series = metrics.model_series(model_name, &self.release_label);
        if priced.entry.is_none() {
            metrics
                .unpriced_calls
                .get_or_create(&ModelLabel {
                    model: series.labels.model.clone(),
                })
                .inc();
            self.state.note_unpriced(model_name);
        }
        series.record(&usage, priced.cost);
        (
            priced.cost,
            CostKind::Llm,
            Record {
                model,
                usage: Some(usage),
                estimated,
                price_entry: priced.entry,
            },
        )
    }

    fn tool_cost(&self, body: Option<&[u8]>, end: End) -> (Money, CostKind, Record) {
        let metrics = &self.state.metrics;
        let tool = self.tool.clone().unwrap_or_else(|| self.route.clone());
        let tool_label = metrics.tool(&tool);
        metrics
            .tool_calls
            .get_or_create(&ToolStatus {
                tool: tool_label.clone(),
                status: self.status.as_u16(),
            })
            .inc();
        let chargeable = self.status.is_success() || self.charge_failed_calls;
        let mut estimated = false;
        let cost = if !chargeable {
            Money::ZERO
        } else {
            let reported = match &self.tool_cost {
                Some(ToolCost::Fixed(price)) => Ok(*price),
                Some(ToolCost::Header(_)) => self
                    .tool_header_cost
                    .clone()
                    .unwrap_or_else(|| Err("the cost header is missing".into())),
                Some(ToolCost::JsonPointer(pointer)) => cost_at_pointer(body, pointer, end),
                None => Err("no cost source configured".into()),
            };
            match reported {
                Ok(cost) => cost,
                Err(reason) => {
                    // A paid call whose price is unknown is charged what was
                    // reserved for it, flagged, counted: never a silent $0.
                    estimated = true;
                    metrics
                        .usage_estimated
                        .get_or_create(&ProviderLabel {
                            provider: "tool".into(),
                        })
                        .inc();
                    tracing::warn!(message = "tool cost unreadable; charging the reservation", tool = %tool, reason = %reason);
                    self.admission
                        .as_ref()
                        .map(Admission::reservation)
                        .unwrap_or_else(|| self.state.budgets.policy().fallback_reservation)
                }
            }
        };
        metrics
            .tool_cost
            .get_or_create(&ToolRelease {
                tool: tool_label,
                release: self.release_label.clone(),
            })
            .add(cost);
        (
            cost,
            CostKind::Tool,
            Record {
                model: None,
                usage: None,
                estimated,
                price_entry: None,
            },
        )
    }
}

/// What the log line reports about usage.
struct Record {
    model: Option<String>,
    usage: Option<Usage>,
    estimated: bool,
    price_entry: Option<String>,
}

fn empty_observation() -> Observation {
    Observation {
        usage: None,
        model: None,
        outcome: Outcome::Incomplete,
        parse_error: false,
        provider_error: None,
        output_text_bytes: 0,
        body_bytes: 0,
    }
}

/// The usage to charge and whether it is an estimate.
pub fn resolve_usage(
    observation: &Observation,
    status: StatusCode,
    end: End,
    request_bytes: u64,
) -> (Option<Usage>, bool) {
    let cut = end != End::Complete || observation.outcome == Outcome::Incomplete;
    match &observation.usage {
        Some(reported) if !cut || observation.outcome == Outcome::Failed => {
            (Some(reported.clone()), false)
        }
        Some(reported) => {
            // Cut short: the provider bills what it generated before the cut,
            // which the partial usage may not show yet: compare with an
            // estimate from the sizes alone.
            let sizes_only = Observation {
                usage: None,
                ..observation.clone()
            };
            let estimate = usage::estimate(request_bytes, &sizes_only);
            (Some(max_usage(reported, &estimate)), true)
        }
        None if status.is_success() => (Some(usage::estimate(request_bytes, observation)), true),
        None => (None, false),
    }
}

fn max_usage(a: &Usage, b: &Usage) -> Usage {
    let max = |x: Option<u64>, y: Option<u64>| match (x, y) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
    Usage {
        input_tokens: max(a.input_tokens, b.input_tokens),
        output_tokens: max(a.output_tokens, b.output_tokens),
        cached_input_tokens: a.cached_input_tokens,
        cache_write_input_tokens: a.cache_write_input_tokens,
        cache_write_1h_input_tokens: a.cache_write_1h_input_tokens,
        reasoning_tokens: a.reasoning_tokens,
    }
}

/// Reads a USD amount (number or decimal string) at a JSON pointer.
fn cost_at_pointer(body: Option<&[u8]>, pointer: &str, end: End) -> Result<Money, String> {
    if end != End::Complete {
        return Err("the body did not complete".into());
    }
    let body = body.ok_or("the body was too large to read the cost from")?;
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let found = value
        .pointer(pointer)
        .ok_or_else(|| format!("nothing at `{pointer}`"))?;
    let text = match found {
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => return Err(format!("`{pointer}` holds {other}, not a number")),
    };
    Money::parse_usd(&text).map_err(|e| e.to_string())
}

/// Parses a tool's cost header: decimal USD.
pub fn parse_cost_header(value: Option<&http::HeaderValue>) -> Result<Money, String> {
    let value = value.ok_or("the cost header is missing")?;
    let text = value.to_str().map_err(|_| "the cost header is not ASCII")?;
    Money::parse_usd(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observation(usage: Option<Usage>, outcome: Outcome) -> Observation {
        Observation {
            usage,
            outcome,
            ..empty_observation()
        }
    }

    #[test]
    fn reported_usage_wins_when_complete() {
        let u = Usage {
            input_tokens: Some(10),
            output_tokens: Some(5),
            ..Usage::default()
        };
        let (got, estimated) = resolve_usage(
            &observation(Some(u.clone()), Outcome::Completed),
            StatusCode::OK,
            End::Complete,
            100,
        );
        assert_eq!(got, Some(u));
        assert!(!estimated);
    }

    #[test]
    fn success_without_usage_is_estimated_never_zero() {
        let (got, estimated) = resolve_usage(
            &observation(None, Outcome::Completed),
            StatusCode::OK,
            End::Complete,
            4000,
        );
        assert!(estimated);
        assert!(got.unwrap().input_tokens.unwrap() > 0);
    }

    #[test]
    fn provider_error_without_usage_costs_nothing() {
        let (got, estimated) = resolve_usage(
            &observation(None, Outcome::Completed),
            StatusCode::TOO_MANY_REQUESTS,
            End::Complete,
            4000,
        );
        assert_eq!(got, None);
        assert!(!estimated);
    }

    #[test]
    fn cut_streams_charge_at_least_what_was_reported() {
        let u = Usage {
            input_tokens: Some(10),
            output_tokens: Some(1),
            ..Usage::default()
        };
        let mut obs = observation(Some(u), Outcome::Incomplete);
        obs.output_text_bytes = 4000;
        let (got, estimated) = resolve_usage(&obs, StatusCode::OK, End::ClientGone, 40);
        let got = got.unwrap();
        assert!(estimated);
        assert!(got.output_tokens.unwrap() > 1);
        assert_eq!(got.input_tokens, Some(10));
    }

    #[test]
    fn cost_pointer_and_header() {
        let body = br#"{"meta":{"cost_usd":0.0125},"s":"0.5"}"#;
        assert_eq!(
            cost_at_pointer(Some(body), "/meta/cost_usd", End::Complete),
            Ok(Money::parse_usd("0.0125").unwrap())
        );
        assert_eq!(
            cost_at_pointer(Some(body), "/s", End::Complete),
            Ok(Money::parse_usd("0.5").unwrap())
        );
        assert!(cost_at_pointer(Some(body), "/nope", End::Complete).is_err());
        assert!(cost_at_pointer(Some(b"not json"), "/a", End::Complete).is_err());
        let v = http::HeaderValue::from_static("0.003");
        assert_eq!(
            parse_cost_header(Some(&v)),
            Ok(Money::parse_usd("0.003").unwrap())
        );
        assert!(parse_cost_header(None).is_err());
    }
}
