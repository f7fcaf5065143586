//! The request side of a call: check the head's size, read the body
//! (bounded), peek at what
//! metering needs (model, stream, output limit), and ask OpenAI-style
//! streams for usage when the client did not.
//!
//! Request bodies are read whole: LLM and tool requests are small next to
//! responses, the limit bounds them, and the body is needed to estimate the
//! reservation, hash the call and inject `stream_options`.

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;

use crate::config::RouteKind;
use crate::proxy::error::ProxyError;

mod peek;

/// Refuses a request head larger than `limit` bytes, counted as its HTTP/1.1
/// text: the request line, one `name: value` line per header, the blank line.
///
/// hyper's `max_buf_size` bounds only what it buffers before a head is
/// complete, and a read may bring up to as much again at once: a head of
/// nearly twice the limit that arrives in one piece gets through. This makes
/// the limit exact whatever the reads were (and the same for HTTP/2).
pub fn check_head_size(parts: &http::request::Parts, limit: usize) -> Result<(), ProxyError> {
    let uri = &parts.uri;
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |p| p.as_str().len());
    let request_line = parts.method.as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let size = parts
        .headers
        .iter()
        .fold(request_line + 2, |size, (name, value)| {
            size + name.as_str().len() + value.len() + ": \r\n".len()
        });
    if size > limit {
        return Err(ProxyError::HeadTooLarge { size, limit });
    }
    Ok(())
}

/// Reads the whole request body, refusing it once it passes `limit`.
pub async fn read_body(
    body: Incoming,
    headers: &http::HeaderMap,
    limit: usize,
) -> Result<Bytes, ProxyError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Err(e) => Err(ProxyError::BadRequest(format!(
            "could not read the request body: {e}"
        ))),
    }
}

/// What metering needs from a request body. Unknown fields are skipped.
/// serde_json's reading of this struct is the definition; `peek` reads it
/// the same way, faster, when it can.
#[derive(Debug, Default, PartialEq, Deserialize)]
struct BodyPeek {
    model: Option<String>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    #[serde(rename = "generationConfig")]
    generation_config: Option<GenerationConfig>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
struct GenerationConfig {
    #[serde(rename = "maxOutputTokens")]
    max_output_tokens: Option<u64>,
}

/// A request, as metering sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// Model named by the request (body, Gemini path or Azure deployment).
    pub model: Option<String>,
    /// The response will stream.
    pub stream: bool,
    /// Output limit the client set, if any.
    pub max_output_tokens: Option<u64>,
    /// tollgate asked upstream for usage; the usage-only chunk must be removed.
    pub usage_injected: bool,
}

/// Peeks at a request and, for an OpenAI-style stream that did not ask for
/// usage, returns the body with `stream_options.include_usage = true`.
pub fn inspect(
    kind: RouteKind,
    path: &str,
    query: Option<&str>,
    body: &Bytes,
) -> (RequestInfo, Option<Bytes>) {
    let mut peek = read_peek(body);
    let mut info = RequestInfo {
        model: peek.model.take().filter(|m| !m.is_empty()),
        stream: peek.stream.unwrap_or(false),
        max_output_tokens: peek
            .max_completion_tokens
            .or(peek.max_tokens)
            .or(peek.max_output_tokens)
            .or(peek
                .generation_config
                .as_ref()
                .and_then(|g| g.max_output_tokens)),
        usage_injected: false,
    };
    match kind {
        RouteKind::Gemini => {
            if let Some((model, method)) = gemini_model(path) {
                info.model = Some(model.to_string());
                info.stream = method == "streamGenerateContent";
            }
            let _ = query;
        }
        RouteKind::Openai => {
            if info.model.is_none() {
                info.model = azure_deployment(path).map(str::to_string);
            }
        }
        RouteKind::Anthropic | RouteKind::Tool => {}
    }
    let wants_usage_injection = kind == RouteKind::Openai
        && info.stream
        && (path.ends_with("/chat/completions") || path.ends_with("/completions"))
        && peek.stream_options.as_ref().and_then(|o| o.include_usage) != Some(true);
    if wants_usage_injection {
        let rewritten = if peek.stream_options.is_none() {
            prepend_stream_options(body)
        } else {
            with_include_usage(body)
        };
        if let Some(rewritten) = rewritten {
            info.usage_injected = true;
            return (info, Some(rewritten));
        }
    }
    (info, None)
}

/// The body as serde_json reads it into a [`BodyPeek`]; anything that is
/// not such a JSON document gives the default.
fn read_peek(body: &[u8]) -> BodyPeek {
    if body.is_empty() {
        return BodyPeek::default();
    }
    peek::read(body).unwrap_or_else(|| serde_json::from_slice(body).unwrap_or_default())
}

/// When the body has no `stream_options` at all, the member is inserted
/// after the opening brace: the rest of the body stays byte for byte, with
/// no parse and re-serialisation of the whole request.
fn prepend_stream_options(body: &Bytes) -> Option<Bytes> {
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true}"#;
    let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[start] != b'{' {
        return None;
    }
    let rest = &body[start + 1..];
    let empty_object = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let mut out = Vec::with_capacity(body.len() + MEMBER.len() + 1);
    out.push(b'{');
    out.extend_from_slice(MEMBER);
    if !empty_object {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    Some(Bytes::from(out))
}

/// The body with `stream_options.include_usage` set; `None` when the body is
/// not a JSON object (then the call is metered by estimate).
fn with_include_usage(body: &Bytes) -> Option<Bytes> {
    let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let object = value.as_object_mut()?;
    let options = object
        .entry("stream_options")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    if !options.is_object() {
        *options = serde_json::Value::Object(Default::default());
    }
    options
        .as_object_mut()?
        .insert("include_usage".into(), serde_json::Value::Bool(true));
    serde_json::to_vec(&value).ok().map(Bytes::from)
}

/// `/v1beta/models/gemini-2.5-flash:streamGenerateContent` gives the model and
/// the method (also Vertex paths `.../publishers/google/models/M:method`).
fn gemini_model(path: &str) -> Option<(&str, &str)> {
    let after = &path[path.rfind("/models/")? + "/models/".len()..];
    let (model, method) = after.split_once(':')?;
    (!model.is_empty() && !model.contains('/')).then_some((model, method))
}

/// `/openai/deployments/{name}/chat/completions` gives the deployment name.
fn azure_deployment(path: &str) -> Option<&str> {
    let after = &path[path.find("/deployments/")? + "/deployments/".len()..];
    after.split('/').next().filter(|d| !d.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_counted_as_its_http1_text() {
        let request = http::Request::post("/openai/v1/chat/completions?x=1")
            .header("host", "127.0.0.1:8787")
            .header("x-agent-run-id", "run-1")
            .body(())
            .unwrap();
        let text = "POST /openai/v1/chat/completions?x=1 HTTP/1.1\r\nhost: 127.0.0.1:8787\r\nx-agent-run-id: run-1\r\n\r\n";
        let (parts, ()) = request.into_parts();
        assert!(check_head_size(&parts, text.len()).is_ok());
        match check_head_size(&parts, text.len() - 1) {
            Err(e @ ProxyError::HeadTooLarge { size, limit }) => {
                assert_eq!((size, limit), (text.len(), text.len() - 1));
                let response = e.into_response(Some(RouteKind::Openai));
                assert_eq!(response.status(), 431);
                assert_eq!(response.headers()["x-tollgate-error"], "header_too_large");
            }
            other => panic!("expected HeadTooLarge, got {other:?}"),
        }
        // An absolute-form target counts whole.
        let absolute = http::Request::get("http://localhost:8787/x")
            .body(())
            .unwrap();
        let (parts, ()) = absolute.into_parts();
        let text = "GET http://localhost:8787/x HTTP/1.1\r\n\r\n";
        assert!(check_head_size(&parts, text.len()).is_ok());
        assert!(check_head_size(&parts, text.len() - 1).is_err());
    }

    #[test]
    fn injects_usage_for_openai_streams_only() {
        let body = Bytes::from_static(br#"{"model":"gpt-4.1","stream":true,"messages":[]}"#);
        let (info, rewritten) = inspect(RouteKind::Openai, "/v1/chat/completions", None, &body);
        assert!(info.stream && info.usage_injected);
        let v: serde_json::Value = serde_json::from_slice(&rewritten.unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);

        let asked = Bytes::from_static(
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
        );
        let (info, rewritten) = inspect(RouteKind::Openai, "/v1/chat/completions", None, &asked);
        assert!(!info.usage_injected && rewritten.is_none());

        let asked_false = Bytes::from_static(
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":false}}"#,
        );
        let (info, _) = inspect(RouteKind::Openai, "/v1/completions", None, &asked_false);
        assert!(info.usage_injected);

        let responses = Bytes::from_static(br#"{"model":"m","stream":true}"#);
        let (info, rewritten) = inspect(RouteKind::Openai, "/v1/responses", None, &responses);
        assert!(!info.usage_injected && rewritten.is_none());

        let not_json = Bytes::from_static(b"garbage");
        let (info, rewritten) = inspect(RouteKind::Openai, "/v1/chat/completions", None, &not_json);
        assert!(!info.stream && rewritten.is_none());
    }

    #[test]
    fn injection_keeps_the_rest_of_the_body_byte_for_byte() {
        let body = Bytes::from_static(
            br#"  {"model":"m", "stream":true, "messages":[{"content":"a  b"}]}"#,
        );
        let (_, rewritten) = inspect(RouteKind::Openai, "/v1/chat/completions", None, &body);
        assert_eq!(
            rewritten.unwrap(),
            r#"{"stream_options":{"include_usage":true},"model":"m", "stream":true, "messages":[{"content":"a  b"}]}"#
        );
        let v: serde_json::Value =
            serde_json::from_slice(&with_include_usage(&body).unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn reads_models_and_limits() {
        let body = Bytes::from_static(br#"{"generationConfig":{"maxOutputTokens":300}}"#);
        let (info, _) = inspect(
            RouteKind::Gemini,
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            None,
            &body,
        );
        assert_eq!(info.model.as_deref(), Some("gemini-2.5-flash"));
        assert!(info.stream);
        assert_eq!(info.max_output_tokens, Some(300));

        let body = Bytes::from_static(br#"{"messages":[],"max_tokens":50}"#);
        let (info, _) = inspect(
            RouteKind::Openai,
            "/openai/deployments/my-gpt/chat/completions",
            None,
            &body,
        );
        assert_eq!(info.model.as_deref(), Some("my-gpt"));
        assert_eq!(info.max_output_tokens, Some(50));

        let body =
            Bytes::from_static(br#"{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":true}"#);
        let (info, rewritten) = inspect(RouteKind::Anthropic, "/v1/messages", None, &body);
        assert_eq!(info.model.as_deref(), Some("claude-sonnet-4-5"));
        assert!(info.stream && rewritten.is_none());
    }
}
