//! The agent-facing proxy. One call's path, in pingora's phase names:
//!
//! 1. `request_filter`: target safety ([`route::check_target`]), URL-form
//!    attribution, route match (unmatched: 404, no upstream is contacted),
//!    the head's size (431), attribution headers (bad value: 400 naming the
//!    header), body read up to the limit (413), peek at model/stream/output
//!    limit, usage injection.
//! 2. `admission`: estimate the call's cost, reserve it against the run's
//!    ceiling and the window caps (refused: 402 in the provider's shape, the
//!    upstream is never contacted); with a shared state backend, then
//!    against the fleet's figures in one round trip
//!    ([`crate::state_backend`]).
//! 3. `upstream_request`: rewrite and send on the pooled client (502/504).
//! 4. `response_filter`: wrap the body in [`body::MeteredBody`], which
//!    forwards each frame as it arrives and settles the call exactly once.
//!    Non-streaming JSON bodies are read first (bounded) so their cost
//!    headers can include the call's own cost.

pub mod attribution;
pub mod body;
pub mod egress;
pub mod error;
pub mod guards;
pub mod pool;
pub mod request;
pub mod route;
pub mod settle;
pub mod upstream;
pub mod upstream_io;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use compact_str::CompactString;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::budget::{CallFlags, CallRequest, CostKind, Refusal, RefusalScope};
use crate::config::{OnStateError, RouteKind, ToolCost};
use crate::ledger::CallRecord;
use crate::metrics::{RejectionLabels, ReleaseLabel, RetryLabels};
use crate::money::Money;
use crate::proxy::body::{BoxError, MeteredBody};
use crate::proxy::error::ProxyError;
use crate::proxy::settle::{CallMeter, Settled};
use crate::state::AppState;
use crate::state_backend::SharedAdmit;
use crate::usage::{BodyFormat, TapLimits, UsageChunkFilter, UsageTap};

/// Response body type of every tollgate response.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Largest non-streaming response body held back to put its own cost in the
/// response headers; larger bodies stream with the pre-call spend.
const MAX_BUFFERED_RESPONSE: usize = 4 * 1024 * 1024;

pub const RUN_COST_HEADER: &str = "x-agent-run-cost-usd";
pub const BUDGET_REMAINING_HEADER: &str = "x-agent-budget-remaining-usd";
/// Set when `budget.clamp_max_tokens` lowered the call's output limit.
pub const MAX_TOKENS_CLAMPED_HEADER: &str = "x-agent-max-tokens-clamped";

pub fn full_body(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// Connection facts the server attaches to each request whose target names
/// an authority (absolute-form, HTTP/2), for [`route::check_target`].
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// Serves one agent request. Never fails: errors become responses.
pub async fn handle(
    state: Arc<AppState>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let started_ms = state.clock.now_ms();
    let config = state.config.load_full();
    let (mut parts, body) = request.into_parts();
    let local = parts.extensions.get::<ConnInfo>().map(|c| c.local);

    // request_filter: target and route.
    if let Err(e) = route::check_target(&parts, local) {
        return Ok(e.into_response(None));
    }
    let (url_attribution, path) = match route::split_url_attribution(parts.uri.path()) {
        Ok(split) => split,
        Err(e) => return Ok(e.into_response(None)),
    };
    let Some((route, rest)) = config.route_for(path) else {
        return Ok(ProxyError::NoRoute(path.to_string()).into_response(None));
    };
    let kind = route.kind;
    if let Err(e) = request::check_head_size(&parts, config.raw.limits.max_header_bytes) {
        return Ok(e.into_response(Some(kind)));
    }
    let attribution = match attribution::extract(
        &parts.headers,
        &config.attribution,
        url_attribution.as_ref(),
    ) {
        Ok(a) => a,
        Err(e) => return Ok(e.into_response(Some(kind))),
    };
    let body = match request::read_body(
        body,
        &parts.headers,
        config.raw.limits.max_request_body_bytes,
    )
    .await
    {
        Ok(b) => b,
        Err(e) => return Ok(e.into_response(Some(kind))),
    };
    let (info, rewritten) = request::inspect(kind, rest, parts.uri.query(), &body);
    let pricing = state.pricing.load_full();

    if kind != RouteKind::Tool && state.reject_unknown_models() {
        if let Some(model) = info.model.as_deref() {
            if pricing.lookup(model).is_none() {
                state.note_unpriced(model);
                return Ok(ProxyError::UnpricedModel(model.to_string()).into_response(Some(kind)));
            }
        }
    }

    // admission: reserve the call's expected cost.
    let policy = state.budgets.policy();
    let reservation = match (kind, &route.tool_cost) {
        (RouteKind::Tool, Some(ToolCost::Fixed(price))) => *price,
        (RouteKind::Tool, _) => policy.fallback_reservation,
        _ => state.reservation_for(&pricing, &info, body.len() as u64),
    };
    let retry_count = parts
        .headers
        .get(const { HeaderName::from_static("x-stainless-retry-count") })
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok());
    let body_hash = attribution
        .run_id
        .as_ref()
        .map(|_| hash_body(&route.name, &body));
    let request_bytes = body.len() as u64;
    let mut info = info;
    let mut upstream_body = rewritten.unwrap_or(body);
    let mut reservation = reservation;
    let mut clamped_to = None;
    let model = info.model.clone();
    let call = |reservation| CallRequest {
        run_id: attribution.run_id.as_deref(),
        release: &attribution.release,
        request_type: &attribution.request_type,
        model: model.as_deref(),
        tool: route.tool.as_deref(),
        route: &route.name,
        budget_header: attribution.budget,
        reservation,
        sdk_retry_count: retry_count,
        body_hash,
    };
    if policy.clamp_max_tokens && kind != RouteKind::Tool {
        // Lower the output limit to what the run can still pay for, rather
        // than refuse the call (an opt-in guard).
        if let (Some(headroom), Some(model)) =
            (state.budgets.headroom(&call(reservation)), model.clone())
        {
            if reservation > headroom {
                let prompt_tokens = request_bytes.div_ceil(4);
                let affordable =
                    guards::affordable_output_tokens(&pricing, &model, prompt_tokens, headroom)
                        .filter(|t| *t >= guards::MIN_CLAMPED_OUTPUT_TOKENS);
                if let Some(limit) = affordable {
                    if let Some(clamped) =
                        guards::with_output_limit(kind, rest, &upstream_body, limit)
                    {
                        upstream_body = clamped;
                        info.max_output_tokens = Some(limit);
                        reservation = state.reservation_for(&pricing, &info, request_bytes);
                        clamped_to = Some(limit);
                    }
                }
            }
        }
    }
    let unmetered = |status: u16, outcome: &'static str, run_ceiling: Option<Money>| Unmetered {
        started_ms,
        started,
        attribution: &attribution,
        route: &route.name,
        kind,
        model: info.model.clone(),
        tool: route.tool.clone(),
        status,
        outcome,
        flags: CallFlags::default(),
        run_ceiling,
    };
    let refuse = |refusal: Refusal| {
        let run_ceiling = Some(refusal.ceiling).filter(|_| refusal.scope == RefusalScope::Run);
        refusal_response(
            &state,
            refusal,
            reservation,
            unmetered(402, "refused", run_ceiling),
        )
    };
    let mut admission = match state.budgets.admit(&call(reservation)) {
        Ok(admission) => admission,
        Err(refusal) => return Ok(refuse(refusal)),
    };
    if let Some(shared) = state.shared.clone() {
        // The fleet's figures: one round trip to the shared state.
        let idle_ms = state
            .budgets
            .runs_config()
            .idle_timeout_secs
            .saturating_mul(1000);
        // Boxed: the round trip's future (~3.9 KB) held inline would size
        // every call's future, allocated and copied per call, for the
        // deployments with shared state alone.
        match Box::pin(shared.reserve(&call(reservation), &policy, admission.flags(), idle_ms))
            .await
        {
            Ok(SharedAdmit::Admitted(ticket)) => admission.attach_shared(ticket),
            Ok(SharedAdmit::Refused(refusal)) => {
                admission.withdraw(Some(refusal.scope));
                return Ok(refuse(refusal));
            }
            Err(_) => match shared.on_error() {
                OnStateError::FailOpen => admission.attach_shared(shared.unconfirmed_ticket(
                    &call(reservation),
                    &policy,
                    idle_ms,
                )),
                OnStateError::FailClosed => {
                    let ceiling = admission.ceiling();
                    admission.withdraw(None);
                    let error = ProxyError::StateUnavailable;
                    state
                        .metrics
                        .route_series(&route.name)
                        .count_call(error.status().as_u16());
                    record_unmetered(&state, unmetered(503, error.kind(), ceiling));
                    return Ok(error.into_response(Some(kind)));
                }
            },
        }
    }
    let flags = admission.flags();
    let release_label = state.metrics.release(&attribution.release);
    // A call counts once as a retry: an SDK retry is the more specific kind.
    let retry_kind = if flags.sdk_retry {
        Some("sdk_retry")
    } else if flags.repeat_after_failure {
        Some("repeat_after_failure")
    } else {
        None
    };
    if let Some(kind_label) = retry_kind {
        state
            .metrics
            .retries
            .get_or_create(&RetryLabels {
                release: release_label.clone(),
                kind: kind_label.into(),
            })
            .inc();
    }
    if flags.duplicate_body {
        state
            .metrics
            .repeated_calls
            .get_or_create(&ReleaseLabel {
                release: release_label.clone(),
            })
            .inc();
    }

    // upstream_request
    let uri = match upstream::upstream_uri(route, rest, parts.uri.query()) {
        Ok(uri) => uri,
        Err(e) => return Ok(refuse_after_admission(e, kind, admission)),
    };
    // The client's headers move into the upstream request: nothing reads
    // them after this point.
    let upstream_request = upstream::upstream_request(
        parts.method.clone(),
        std::mem::take(&mut parts.headers),
        uri,
        route,
        &config.attribution,
        upstream_body,
        info.usage_injected,
    );
    let sent = Instant::now();
    let limits = &config.raw.limits;
    let response = match upstream::send(
        &state.client,
        route,
        upstream_request,
        limits.upstream_response_timeout(),
    )
    .await
    {
        Ok(response) => response,
        Err(e) => {
            tracing::warn!(message = "upstream request failed", route = %route.name, error = %e);
            state
                .metrics
                .route_series(&route.name)
                .count_call(e.status().as_u16());
            record_unmetered(
                &state,
                Unmetered {
                    started_ms,
                    started,
                    attribution: &attribution,
                    route: &route.name,
                    kind,
                    model: info.model.clone(),
                    tool: route.tool.clone(),
                    status: e.status().as_u16(),
                    outcome: e.kind(),
                    flags,
                    run_ceiling: admission.ceiling(),
                },
            );
            return Ok(refuse_after_admission(e, kind, admission));
        }
    };
    let upstream_latency = sent.elapsed();
    let route_series = state.metrics.route_series(&route.name);
    route_series
        .upstream_latency
        .observe(upstream_latency.as_secs_f64());

    // response_filter
    let (mut head, incoming) = response.into_parts();
    upstream::strip_hop_by_hop(&mut head.headers);
    let content_type = header_str(&head.headers, http::header::CONTENT_TYPE);
    let content_encoding = header_str(&head.headers, http::header::CONTENT_ENCODING);
    let declared = BodyFormat::from_content_type(content_type);
    let is_event_stream = declared.is_some_and(BodyFormat::is_stream);
    let spent_before = admission.run_spent();
    let remaining_before = admission.remaining();
    let tool_header_cost = match &route.tool_cost {
        Some(ToolCost::Header(name)) => Some(settle::parse_cost_header(head.headers.get(name))),
        _ => None,
    };
    let tap = kind.dialect().map(|dialect| {
        UsageTap::new(
            dialect,
            declared,
            content_encoding,
            TapLimits {
                max_event_bytes: limits.max_event_bytes,
                max_json_value_bytes: limits.max_event_bytes,
            },
        )
    });
    let filter = (info.usage_injected && head.status.is_success())
        .then(|| UsageChunkFilter::new(limits.max_event_bytes));
    if filter.is_some() {
        head.headers.remove(http::header::CONTENT_LENGTH);
    }
    let capture_tool_body = matches!(route.tool_cost, Some(ToolCost::JsonPointer(_)));
    let buffer_first = !info.stream && !is_event_stream;
    let meter = CallMeter {
        state: state.clone(),
        pricing,
        route: route.name.clone(),
        route_series,
        release_label,
        kind,
        tool: route.tool.clone(),
        tool_cost: route.tool_cost.clone(),
        charge_failed_calls: route.charge_failed_calls,
        attribution,
        request: info,
        request_bytes,
        started,
        status: head.status,
        upstream_latency,
        first_byte: None,
        admission: Some(admission),
        tool_header_cost,
        started_ms,
        flags,
    };
    let mut metered = MeteredBody::new(
        incoming,
        meter,
        tap,
        filter,
        capture_tool_body,
        limits.stream_idle_timeout(),
    );

    if policy.stop_streams_over_budget
        && is_event_stream
        && head.status.is_success()
        && kind != RouteKind::Tool
    {
        let price = model.as_deref().and_then(|m| {
            state
                .pricing
                .load()
                .lookup(m)
                .map(|found| found.price.clone())
        });
        if let Some(price) = price {
            metered.set_cutoff(body::StreamCutoff {
                price,
                prompt_tokens: request_bytes.div_ceil(4),
                terminator: body::stream_terminator(kind, rest),
            });
        }
    }
    if buffer_first {
        // Usually one frame: held as it came, copied only to join several.
        let mut buffered = body::Held::default();
        let mut trailers = None;
        loop {
            match metered.frame().await {
                None => break,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        buffered.push(data);
                        if buffered.len() > MAX_BUFFERED_RESPONSE {
                            break;
                        }
                    }
                    Err(frame) => trailers = frame.into_trailers().ok(),
                },
                Some(Err(e)) => {
                    // The head was not sent yet: answer in the provider's shape.
                    let error = ProxyError::Upstream(format!("response body failed: {e}"));
                    return Ok(error.into_response(Some(kind)));
                }
            }
        }
        if let Some(settled) = metered.settled() {
            let _ = trailers;
            head.headers.remove(http::header::CONTENT_LENGTH);
            let mut response = Response::from_parts(head, full_body(buffered.take()));
            apply_settled(&mut response, settled);
            note_clamp(&mut response, clamped_to);
            return Ok(response);
        }
        metered.set_prefix(buffered.take());
    }
    let mut response = Response::from_parts(head, metered.boxed());
    set_cost_headers(&mut response, spent_before, remaining_before);
    note_clamp(&mut response, clamped_to);
    Ok(response)
}

/// The answer to a refused call (a local or a fleet-wide refusal alike):
/// 402 in the provider's shape, counted, logged and recorded in the ledger.
fn refusal_response(
    state: &AppState,
    refusal: Refusal,
    reservation: Money,
    call: Unmetered<'_>,
) -> Response<ProxyBody> {
    let metrics = &state.metrics;
    let scope = refusal.scope.as_label();
    let kind = call.kind;
    let release = &call.attribution.release;
    metrics
        .budget_rejections
        .get_or_create(&RejectionLabels {
            release: metrics.release(release),
            scope: scope.into(),
        })
        .inc();
    let (message, code) = match refusal.scope {
        RefusalScope::Run => (
            format!(
                "run `{}` has spent ${} of its ${} budget; this call (reserving ${}) would pass the ceiling",
                refusal.run_id.as_deref().unwrap_or(""),
                refusal.spent,
                refusal.ceiling,
                reservation
            ),
            "run_budget_exceeded",
        ),
        RefusalScope::Window => (
            format!(
                "spend cap {} reached: ${} spent of ${}{}",
                refusal.window.as_deref().unwrap_or("window"),
                refusal.spent,
                refusal.ceiling,
                refusal
                    .run_id
                    .as_deref()
                    .map(|r| format!(" (run `{r}`)"))
                    .unwrap_or_default()
            ),
            "window_budget_exceeded",
        ),
    };
    tracing::info!(target: "tollgate::call", run_id = refusal.run_id.as_deref().unwrap_or(""), release = %release, route = %call.route, status = 402, scope, "refused");
    record_unmetered(state, call);
    let mut response = ProxyError::Budget { message, code }.into_response(Some(kind));
    set_cost_headers(
        &mut response,
        refusal.spent,
        Some(refusal.ceiling.saturating_sub(refusal.spent)),
    );
    response
}

/// A failure after admission: release the reservation without charging
/// (nothing reached a provider that bills), then answer.
fn refuse_after_admission(
    error: ProxyError,
    kind: RouteKind,
    admission: crate::budget::Admission,
) -> Response<ProxyBody> {
    let cost_kind = if kind == RouteKind::Tool {
        CostKind::Tool
    } else {
        CostKind::Llm
    };
    admission.settle(Money::ZERO, cost_kind, true, None);
    error.into_response(Some(kind))
}

/// A call that ended before any response body: refused, or the upstream
/// could not be reached. It costs nothing but belongs to the run's record.
struct Unmetered<'a> {
    started_ms: u64,
    started: Instant,
    attribution: &'a attribution::Attribution,
    route: &'a str,
    kind: RouteKind,
    model: Option<String>,
    tool: Option<String>,
    status: u16,
    outcome: &'static str,
    flags: CallFlags,
    run_ceiling: Option<Money>,
}

fn record_unmetered(state: &AppState, call: Unmetered<'_>) {
    let Some(ledger) = &state.ledger else { return };
    ledger.record_call(CallRecord {
        ts_ms: call.started_ms,
        run_id: call.attribution.run_id.as_deref().map(CompactString::from),
        release: call.attribution.release.as_str().into(),
        request_type: call.attribution.request_type.as_str().into(),
        route: call.route.into(),
        provider: call.kind.as_str(),
        model: call.model.map(CompactString::from),
        tool: call.tool.map(CompactString::from),
        status: call.status,
        outcome: call.outcome,
        latency_ms: call.started.elapsed().as_millis() as u64,
        sdk_retry: call.flags.sdk_retry,
        repeat_after_failure: call.flags.repeat_after_failure,
        duplicate_body: call.flags.duplicate_body,
        run_ceiling: call.run_ceiling,
        price_version: state.pricing.load().version().into(),
        ..CallRecord::default()
    });
}

fn apply_settled(response: &mut Response<ProxyBody>, settled: Settled) {
    set_cost_headers(response, settled.run_cost_after, settled.remaining_after);
}

fn set_cost_headers(response: &mut Response<ProxyBody>, run_cost: Money, remaining: Option<Money>) {
    let headers = response.headers_mut();
    // Names built once, not parsed from the strings on every call.
    const RUN_COST: HeaderName = HeaderName::from_static(RUN_COST_HEADER);
    const REMAINING: HeaderName = HeaderName::from_static(BUDGET_REMAINING_HEADER);
    headers.insert(RUN_COST, usd_header(run_cost));
    if let Some(remaining) = remaining {
        headers.insert(REMAINING, usd_header(remaining));
    }
}

fn usd_header(amount: Money) -> HeaderValue {
    HeaderValue::from_str(amount.header_digits().as_str())
        // Digits and a dot are always a valid header value.
        .unwrap_or_else(|_| HeaderValue::from_static("0.000000000"))
}

/// Tells the client its output limit was lowered by the budget guard.
fn note_clamp(response: &mut Response<ProxyBody>, clamped_to: Option<u64>) {
    if let Some(limit) = clamped_to {
        response
            .headers_mut()
            .insert(MAX_TOKENS_CLAMPED_HEADER, HeaderValue::from(limit));
    }
}

fn header_str(headers: &http::HeaderMap, name: http::header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Identity of a call for repeat detection: route and exact body bytes.
/// xxh3 rather than SipHash: the body is kilobytes on every call, and a
/// forged collision could only set a flag on the attacker's own run.
fn hash_body(route: &str, body: &Bytes) -> u64 {
    use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};
    xxh3_64_with_seed(body, xxh3_64(route.as_bytes()))
}
