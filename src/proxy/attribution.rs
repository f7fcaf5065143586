//! Attribution of a call (SPEC §3): run, release, request type, the ceiling
//! asked for, and the end-of-run markers, from `x-agent-*` headers or from the
//! URL form `/@run=ID,release=R,type=T,budget=USD,status=S,stop=REASON/...`
//! for clients that can only set a base URL. Headers win over the URL form.
//! Every value is validated; a bad one is a 400 naming the header.

use http::{HeaderMap, HeaderValue};

use crate::budget::RunStatus;
use crate::config::{is_label_byte, AttributionHeaders};
use crate::money::Money;
use crate::proxy::error::ProxyError;

pub const DEFAULT_RELEASE: &str = "unknown";
pub const DEFAULT_REQUEST_TYPE: &str = "default";

/// Stop reasons a run may record (SPEC §6).
pub const STOP_REASONS: [&str; 7] = [
    "completed",
    "max_steps",
    "tool_error",
    "llm_error",
    "step_error",
    "budget_exceeded",
    "idle_timeout",
];

/// Who a call is for, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    pub run_id: Option<String>,
    pub release: String,
    pub request_type: String,
    pub budget: Option<Money>,
    /// Set when this call is the run's last (`x-agent-run-status`).
    pub end_run: Option<(RunStatus, Option<String>)>,
}

/// Raw values from the URL form, validated like headers when merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UrlAttribution {
    pub run_id: Option<String>,
    pub release: Option<String>,
    pub request_type: Option<String>,
    pub budget: Option<String>,
    pub status: Option<String>,
    pub stop_reason: Option<String>,
}

impl UrlAttribution {
    /// Parses `run=ID,release=R,...` (the segment after `/@`).
    pub fn parse(segment: &str) -> Result<UrlAttribution, ProxyError> {
        let bad = |reason: String| {
            ProxyError::BadRequest(format!("invalid URL attribution segment: {reason}"))
        };
        let mut out = UrlAttribution::default();
        for pair in segment.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| bad(format!("`{pair}` is not key=value")))?;
            if !value.bytes().all(is_label_byte) {
                return Err(bad(format!(
                    "value of `{key}` must be characters of [A-Za-z0-9._:-]"
                )));
            }
            let slot = match key {
                "run" => &mut out.run_id,
                "release" => &mut out.release,
                "type" => &mut out.request_type,
                "budget" => &mut out.budget,
                "status" => &mut out.status,
                "stop" => &mut out.stop_reason,
                other => {
                    return Err(bad(format!(
                        "unknown key `{other}` (known: run, release, type, budget, status, stop)"
                    )))
                }
            };
            *slot = Some(value.to_string());
        }
        Ok(out)
    }
}

/// One attribution header of a request: its value, and whether it was
/// given more than once.
#[derive(Debug, Clone, Copy, Default)]
pub struct Found<'v> {
    pub value: Option<&'v HeaderValue>,
    pub repeated: bool,
}

/// The six attribution headers of a request, in [`AttributionHeaders::all`]'s
/// order, each with its name. One look at each request header rather than
/// a lookup by name for each of the six: a lookup hashes the name, and
/// most calls carry one or two of the six among an SDK's dozen or so
/// headers.
pub fn find<'h, 'v>(
    headers: &'v HeaderMap,
    names: &'h AttributionHeaders,
) -> [(&'h http::HeaderName, Found<'v>); 6] {
    let mut found = names.all().map(|name| (name, Found::default()));
    for (name, value) in headers {
        if let Some((_, f)) = found.iter_mut().find(|(wanted, _)| *wanted == name) {
            f.repeated |= f.value.is_some();
            f.value.get_or_insert(value);
        }
    }
    found
}

/// Reads and validates the attribution of a call.
pub fn extract<'h>(
    headers: &HeaderMap,
    names: &'h AttributionHeaders,
    url: Option<&UrlAttribution>,
) -> Result<Attribution, ProxyError> {
    let [run_id, release, request_type, budget, run_status, stop_reason] = find(headers, names);
    // The header's name goes with its value, for the error that names it.
    let get = |(name, found): (&'h http::HeaderName, Found),
               from_url: Option<&String>|
     -> Result<Option<(&'h http::HeaderName, String)>, ProxyError> {
        match found.value {
            Some(_) if found.repeated => Err(ProxyError::BadHeader {
                header: name.to_string(),
                reason: "given more than once".into(),
            }),
            Some(value) => {
                let text = value.to_str().map_err(|_| ProxyError::BadHeader {
                    header: name.to_string(),
                    reason: "not visible ASCII".into(),
                })?;
                Ok(Some((name, text.trim().to_string())))
            }
            None => Ok(from_url.map(|v| (name, v.clone()))),
        }
    };
    let no_url = UrlAttribution::default();
    let url = url.unwrap_or(&no_url);

    let run_id = get(run_id, url.run_id.as_ref())?
        .map(|(h, v)| label(h, v, 128))
        .transpose()?;
    let release = get(release, url.release.as_ref())?
        .map(|(h, v)| label(h, v, 64))
        .transpose()?
        .unwrap_or_else(|| DEFAULT_RELEASE.to_string());
    let request_type = get(request_type, url.request_type.as_ref())?
        .map(|(h, v)| label(h, v, 64))
        .transpose()?
        .unwrap_or_else(|| DEFAULT_REQUEST_TYPE.to_string());
    let budget = get(budget, url.budget.as_ref())?
        .map(|(h, v)| match Money::parse_usd(&v) {
            Ok(m) if m > Money::ZERO => Ok(m),
            _ => Err(ProxyError::BadHeader {
                header: h.to_string(),
                reason: format!("`{v}` is not a positive USD amount"),
            }),
        })
        .transpose()?;
    let status = get(run_status, url.status.as_ref())?
        .map(|(h, v)| match v.as_str() {
            "completed" | "ok" => Ok(RunStatus::Ok),
            "error" => Ok(RunStatus::Error),
            _ => Err(ProxyError::BadHeader {
                header: h.to_string(),
                reason: format!("`{v}` must be `completed` or `error`"),
            }),
        })
        .transpose()?;
    let stop_reason = get(stop_reason, url.stop_reason.as_ref())?
        .map(|(h, v)| {
            if STOP_REASONS.contains(&v.as_str()) {
                Ok(v)
            } else {
                Err(ProxyError::BadHeader {
                    header: h.to_string(),
                    reason: format!("`{v}` is not one of {}", STOP_REASONS.join(", ")),
                })
            }
        })
        .transpose()?;
    if stop_reason.is_some() && status.is_none() {
        return Err(ProxyError::BadHeader {
            header: names.stop_reason.to_string(),
            reason: format!("needs `{}` on the same call", names.run_status),
        });
    }
    Ok(Attribution {
        end_run: status.map(|s| (s, stop_reason)),
        run_id,
        release,
        request_type,
        budget,
    })
}

fn label(header: &http::HeaderName, value: String, max: usize) -> Result<String, ProxyError> {
    if value.is_empty() || value.len() > max || !value.bytes().all(is_label_byte) {
        return Err(ProxyError::BadHeader {
            header: header.to_string(),
            reason: format!("must be 1 to {max} characters of [A-Za-z0-9._:-]"),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn names() -> AttributionHeaders {
        Config::from_toml("", "t", ".".into()).unwrap().attribution
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn defaults_when_absent() {
        let a = extract(&HeaderMap::new(), &names(), None).unwrap();
        assert_eq!(a.run_id, None);
        assert_eq!(a.release, "unknown");
        assert_eq!(a.request_type, "default");
        assert_eq!(a.budget, None);
        assert_eq!(a.end_run, None);
    }

    #[test]
    fn reads_all_headers() {
        let a = extract(
            &headers(&[
                ("x-agent-run-id", "run-1"),
                ("x-agent-release", "2026-03-21"),
                ("x-agent-request-type", "research"),
                ("x-agent-budget-usd", "1.5"),
                ("x-agent-run-status", "error"),
                ("x-agent-stop-reason", "tool_error"),
            ]),
            &names(),
            None,
        )
        .unwrap();
        assert_eq!(a.run_id.as_deref(), Some("run-1"));
        assert_eq!(a.budget, Some(Money::parse_usd("1.5").unwrap()));
        assert_eq!(
            a.end_run,
            Some((RunStatus::Error, Some("tool_error".to_string())))
        );
    }

    #[test]
    fn bad_values_name_the_header() {
        for (h, v) in [
            ("x-agent-run-id", "has space"),
            ("x-agent-run-id", &"x".repeat(129)),
            ("x-agent-release", &"r".repeat(65)),
            ("x-agent-budget-usd", "-1"),
            ("x-agent-budget-usd", "lots"),
            ("x-agent-run-status", "done"),
        ] {
            match extract(&headers(&[(h, v)]), &names(), None) {
                Err(ProxyError::BadHeader { header, .. }) => assert_eq!(header, h),
                other => panic!("{h}: {v} gave {other:?}"),
            }
        }
        let err = extract(
            &headers(&[("x-agent-run-id", "a"), ("x-agent-run-id", "b")]),
            &names(),
            None,
        );
        assert!(matches!(err, Err(ProxyError::BadHeader { .. })));
    }

    #[test]
    fn headers_win_over_url_form() {
        let url = UrlAttribution::parse("run=from-url,release=url-rel").unwrap();
        let a = extract(
            &headers(&[("x-agent-release", "hdr-rel")]),
            &names(),
            Some(&url),
        )
        .unwrap();
        assert_eq!(a.run_id.as_deref(), Some("from-url"));
        assert_eq!(a.release, "hdr-rel");
    }
}
