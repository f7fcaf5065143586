//! Errors tollgate itself answers with, in the shape of the route's provider
//! so the client's SDK raises its usual exception. Upstream error responses
//! are not these: they pass through untouched (and are still metered).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use crate::config::RouteKind;
use crate::proxy::ProxyBody;

/// Every reason tollgate answers a call itself. One exhaustive mapping to a
/// status ([`ProxyError::status`]) and a metric label ([`ProxyError::kind`]).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for path `{0}`")]
    NoRoute(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("invalid header `{header}`: {reason}")]
    BadHeader { header: String, reason: String },
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("request head is {size} bytes, larger than limits.max_header_bytes ({limit})")]
    HeadTooLarge { size: usize, limit: usize },
    #[error("method CONNECT is not supported")]
    Connect,
    #[error("{message}")]
    Budget { message: String, code: &'static str },
    #[error("model `{0}` has no price and unknown models are refused (pricing.unknown_model = \"reject\")")]
    UnpricedModel(String),
    #[error("upstream unreachable: {0}")]
    UpstreamConnect(String),
    #[error("upstream did not send response headers within {0} ms")]
    UpstreamTimeout(u64),
    #[error("upstream failed: {0}")]
    Upstream(String),
    #[error("tollgate is shutting down")]
    ShuttingDown,
    #[error("the shared budget state is unreachable and calls are refused until it answers (state.on_state_error = \"fail_closed\")")]
    StateUnavailable,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute(_) => StatusCode::NOT_FOUND,
            ProxyError::BadRequest(_) | ProxyError::BadHeader { .. } => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::HeadTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::Connect => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Budget { .. } => StatusCode::PAYMENT_REQUIRED,
            ProxyError::UnpricedModel(_) => StatusCode::BAD_REQUEST,
            ProxyError::UpstreamConnect(_) | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ShuttingDown | ProxyError::StateUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// Label for `agent_calls_total{status}` alongside the numeric status.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NoRoute(_) => "no_route",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::BadHeader { .. } => "bad_header",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::HeadTooLarge { .. } => "header_too_large",
            ProxyError::Connect => "connect_refused",
            ProxyError::Budget { .. } => "budget_exceeded",
            ProxyError::UnpricedModel(_) => "unpriced_model",
            ProxyError::UpstreamConnect(_) => "upstream_unreachable",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::Upstream(_) => "upstream_error",
            ProxyError::ShuttingDown => "shutting_down",
            ProxyError::StateUnavailable => "state_unavailable",
        }
    }

    /// The provider's `type` string for this error.
    fn error_type(&self) -> &'static str {
        match self {
            ProxyError::NoRoute(_) => "not_found_error",
            ProxyError::Budget { .. } => "budget_exceeded",
            ProxyError::BadRequest(_)
            | ProxyError::BadHeader { .. }
            | ProxyError::UnpricedModel(_)
            | ProxyError::Connect => "invalid_request_error",
            ProxyError::BodyTooLarge { .. } | ProxyError::HeadTooLarge { .. } => {
                "request_too_large"
            }
            ProxyError::UpstreamTimeout(_) => "timeout_error",
            ProxyError::UpstreamConnect(_)
            | ProxyError::Upstream(_)
            | ProxyError::StateUnavailable => "api_error",
            ProxyError::ShuttingDown => "overloaded_error",
        }
    }

    /// The response, shaped like the provider of `kind` (OpenAI's shape for
    /// tools and for requests that match no route).
    pub fn into_response(self, kind: Option<RouteKind>) -> http::Response<ProxyBody> {
        let status = self.status();
        let message = self.to_string();
        let body = match kind {
            Some(RouteKind::Anthropic) => serde_json::json!({
                "type": "error",
                "error": {"type": self.error_type(), "message": message},
            }),
            Some(RouteKind::Gemini) => serde_json::json!({
                "error": {"code": status.as_u16(), "message": message, "status": google_status(&self)},
            }),
            Some(RouteKind::Openai) | Some(RouteKind::Tool) | None => serde_json::json!({
                "error": {
                    "message": message,
                    "type": self.error_type(),
                    "code": match &self { ProxyError::Budget { code, .. } => *code, _ => self.kind() },
                    "param": null,
                },
            }),
        };
        let mut response = Response::new(crate::proxy::full_body(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert("x-tollgate-error", HeaderValue::from_static(self.kind()));
        if matches!(self, ProxyError::Budget { .. }) {
            // The official SDKs obey this before looking at the status.
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if matches!(self, ProxyError::StateUnavailable) {
            // A short outage of the shared state: the SDKs' backoff (they
            // retry 503, and obey this header first) usually outlasts it.
            headers.insert("x-should-retry", HeaderValue::from_static("true"));
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

fn google_status(error: &ProxyError) -> &'static str {
    match error {
        ProxyError::NoRoute(_) => "NOT_FOUND",
        ProxyError::Budget { .. } => "RESOURCE_EXHAUSTED",
        ProxyError::BadRequest(_)
        | ProxyError::BadHeader { .. }
        | ProxyError::UnpricedModel(_)
        | ProxyError::Connect
        | ProxyError::BodyTooLarge { .. }
        | ProxyError::HeadTooLarge { .. } => "INVALID_ARGUMENT",
        ProxyError::UpstreamTimeout(_) => "DEADLINE_EXCEEDED",
        ProxyError::UpstreamConnect(_)
        | ProxyError::Upstream(_)
        | ProxyError::ShuttingDown
        | ProxyError::StateUnavailable => "UNAVAILABLE",
    }
}
