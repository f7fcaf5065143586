//! The admin listener: `/metrics`, `/healthz`, `/readyz`, and the `/api`
//! (reload, finishing a run, and the investigation API in [`crate::api`]).
//! When `admin.token_env` is set, `/api/*` (and `/metrics` with
//! `admin.protect_metrics`) require `Authorization: Bearer <token>`,
//! compared in constant time.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::budget::RunStatus;
use crate::proxy::attribution::STOP_REASONS;
use crate::proxy::{full_body, ProxyBody};
use crate::state::AppState;

/// Largest body accepted on admin endpoints.
const MAX_ADMIN_BODY: usize = 64 * 1024;

pub async fn handle(
    state: Arc<AppState>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    let config = state.config.load_full();
    let needs_token = path.starts_with("/api/")
        || path == "/api"
        || (path == "/metrics" && config.raw.admin.protect_metrics);
    if needs_token {
        if let Some(token) = &config.admin_token {
            if !bearer_matches(request.headers(), token) {
                let mut response = json(
                    StatusCode::UNAUTHORIZED,
                    &serde_json::json!({"error": "missing or wrong bearer token"}),
                );
                response.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer"),
                );
                return Ok(response);
            }
        }
    }
    let response = match (&method, path.as_str()) {
        (&Method::GET, "/metrics") => {
            state.refresh_gauges();
            let mut response = Response::new(full_body(Bytes::from(state.metrics.render())));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        (&Method::GET, p) if p == "/ui" || p.starts_with("/ui/") => crate::ui::serve(p),
        (&Method::GET, "/healthz") => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        (&Method::GET, "/readyz") => {
            let routes = config.routes.len();
            json(
                StatusCode::OK,
                &serde_json::json!({"status": "ready", "routes": routes}),
            )
        }
        (&Method::POST, "/api/reload") => match state.reload() {
            Ok(needs_restart) => json(
                StatusCode::OK,
                &serde_json::json!({"reloaded": true, "needs_restart": needs_restart}),
            ),
            Err(e) => json(
                StatusCode::UNPROCESSABLE_ENTITY,
                &serde_json::json!({"reloaded": false, "error": e}),
            ),
        },
        (&Method::GET, "/api/runs") => crate::api::runs(&state, request.uri().query()).await,
        (&Method::GET, "/api/segments") => {
            crate::api::segments(&state, request.uri().query()).await
        }
        (&Method::GET, "/api/compare") => crate::api::compare(&state, request.uri().query()).await,
        (_, p) if p.starts_with("/api/runs/") => runs(&state, method, p, request).await,
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": format!("no admin endpoint {method} {path}")}),
        ),
    };
    Ok(response)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FinishBody {
    status: String,
    stop_reason: Option<String>,
}

async fn runs(
    state: &AppState,
    method: Method,
    path: &str,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let rest = &path["/api/runs/".len()..];
    let (run_id, action) = match rest.split_once('/') {
        Some((id, action)) => (id, Some(action)),
        None => (rest, None),
    };
    if run_id.is_empty() || run_id.len() > 128 || !run_id.bytes().all(crate::config::is_label_byte)
    {
        return json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": "run id must be 1 to 128 characters of [A-Za-z0-9._:-]"}),
        );
    }
    match (method, action) {
        (Method::GET, None) => crate::api::run(state, run_id, request.uri().query()).await,
        (Method::POST, Some("finish")) => {
            let body = match http_body_util::Limited::new(request.into_body(), MAX_ADMIN_BODY)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        &serde_json::json!({"error": "body unreadable or over 64 KiB"}),
                    )
                }
            };
            let finish: FinishBody = match serde_json::from_slice(&body) {
                Ok(f) => f,
                Err(e) => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        &serde_json::json!({"error": format!("body must be {{\"status\": \"completed\"|\"ok\"|\"error\", \"stop_reason\": ...}}: {e}")}),
                    )
                }
            };
            let status = match finish.status.as_str() {
                "completed" | "ok" => RunStatus::Ok,
                "error" => RunStatus::Error,
                other => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        &serde_json::json!({"error": format!("status `{other}` must be completed, ok or error")}),
                    )
                }
            };
            if let Some(reason) = finish.stop_reason.as_deref() {
                if !STOP_REASONS.contains(&reason) {
                    return json(
                        StatusCode::BAD_REQUEST,
                        &serde_json::json!({"error": format!("stop_reason `{reason}` is not one of {}", STOP_REASONS.join(", "))}),
                    );
                }
            }
            let finished = match &state.shared {
                // The claim in the shared state decides (any replica may
                // hold the run); the local copy, if any, is dropped after.
                Some(shared) => {
                    let claimed = match shared
                        .finish_run(run_id, status, finish.stop_reason.as_deref())
                        .await
                    {
                        Ok(claimed) => claimed,
                        Err(e) => {
                            return json(
                                StatusCode::SERVICE_UNAVAILABLE,
                                &serde_json::json!({"error": format!("shared state unreachable: {e}")}),
                            )
                        }
                    };
                    state
                        .budgets
                        .finish_run(run_id, status, finish.stop_reason.as_deref());
                    claimed
                }
                None => state
                    .budgets
                    .finish_run(run_id, status, finish.stop_reason.as_deref()),
            };
            if finished {
                json(
                    StatusCode::OK,
                    &serde_json::json!({"finished": true, "run_id": run_id}),
                )
            } else {
                json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": format!("no active run `{run_id}`")}),
                )
            }
        }
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "unknown runs endpoint"}),
        ),
    }
}

fn bearer_matches(headers: &http::HeaderMap, token: &str) -> bool {
    let Some(given) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    given.as_bytes().ct_eq(token.as_bytes()).into()
}

pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(full_body(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
