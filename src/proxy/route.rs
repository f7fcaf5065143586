//! From a request's target to a route: path safety checks, the URL form of
//! attribution, and the prefix match. Nothing here ever picks an upstream
//! host from the request: the host always comes from the matched route, so a
//! request can never turn tollgate into an open relay.

use percent_encoding::percent_decode;

use crate::proxy::attribution::UrlAttribution;
use crate::proxy::error::ProxyError;

/// Refuses targets that could be normalised into another route or another
/// host (SPEC §9): `CONNECT`, HTTP/1 absolute-form URIs naming another host,
/// `.`/`..` segments (also percent-encoded), empty segments (`//`), encoded
/// slashes and backslashes, and NUL bytes.
pub fn check_target(
    req: &http::request::Parts,
    local: Option<std::net::SocketAddr>,
) -> Result<(), ProxyError> {
    if req.method == http::Method::CONNECT {
        return Err(ProxyError::Connect);
    }
    if req.version < http::Version::HTTP_2 {
        if let Some(authority) = req.uri.authority() {
            if !is_local_authority(authority, local) {
                return Err(ProxyError::BadRequest(format!(
                    "absolute-form request target for another host (`{authority}`) is not allowed: tollgate is not a forward proxy"
                )));
            }
        }
    }
    let path = req.uri.path();
    if !path.starts_with('/') {
        return Err(ProxyError::BadRequest(
            "request target must be an absolute path".into(),
        ));
    }
    // Split and searched as bytes: `str::split(char)` and `contains(char)`
    // set up a char searcher per segment, which costs more than a byte
    // loop over a path of a few dozen bytes.
    let mut segments = path.as_bytes()[1..].split(|&b| b == b'/').peekable();
    while let Some(segment) = segments.next() {
        // Decoded only when the segment has escapes (most have none).
        let decoded: std::borrow::Cow<'_, [u8]> = if segment.contains(&b'%') {
            percent_decode(segment).into()
        } else {
            segment.into()
        };
        let last = segments.peek().is_none();
        if segment.is_empty() && !last {
            return Err(ProxyError::BadRequest(
                "empty path segment (`//`) is not allowed".into(),
            ));
        }
        if *decoded == *b"." || *decoded == *b".." {
            return Err(ProxyError::BadRequest(
                "`.` and `..` path segments are not allowed".into(),
            ));
        }
        if decoded.iter().any(|b| matches!(b, b'/' | b'\\' | 0)) {
            return Err(ProxyError::BadRequest(
                "encoded `/`, `\\` or NUL in a path segment is not allowed".into(),
            ));
        }
    }
    Ok(())
}

fn is_local_authority(
    authority: &http::uri::Authority,
    local: Option<std::net::SocketAddr>,
) -> bool {
    let Some(local) = local else { return false };
    let port_ok = authority.port_u16().is_none_or(|p| p == local.port());
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    port_ok
        && (host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip == local.ip() || ip.is_loopback() && local.ip().is_loopback()))
}

/// Splits an optional leading attribution segment off the path:
/// `/@run=r-1,release=v2/openai/v1/chat/completions` gives the attribution
/// and `/openai/v1/chat/completions`.
pub fn split_url_attribution(path: &str) -> Result<(Option<UrlAttribution>, &str), ProxyError> {
    let Some(rest) = path.strip_prefix("/@") else {
        return Ok((None, path));
    };
    let (segment, remainder) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let attribution = UrlAttribution::parse(segment)?;
    Ok((Some(attribution), remainder))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str) -> http::request::Parts {
        let (parts, _) = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts();
        parts
    }

    #[test]
    fn refuses_traversal_and_tricks() {
        let local = Some("127.0.0.1:8787".parse().unwrap());
        for bad in [
            "/openai/../admin",
            "/openai/%2e%2e/x",
            "/openai/%2E/x",
            "/openai//v1",
            "/openai/a%2fb",
            "/openai/a%5cb",
            "/openai/a%00b",
            "http://evil.example.com/openai/v1",
        ] {
            assert!(
                check_target(&parts("GET", bad), local).is_err(),
                "{bad} must be refused"
            );
        }
        assert!(matches!(
            check_target(&parts("CONNECT", "evil.example.com:443"), local),
            Err(ProxyError::Connect)
        ));
        for good in [
            "/openai/v1/chat/completions",
            "/openai/v1/",
            "http://127.0.0.1:8787/openai/v1",
            "http://localhost/x",
        ] {
            assert!(
                check_target(&parts("POST", good), local).is_ok(),
                "{good} must pass"
            );
        }
    }

    #[test]
    fn splits_url_attribution() {
        let (attr, rest) =
            split_url_attribution("/@run=r-1,release=v2,type=research/openai/v1/chat").unwrap();
        let attr = attr.unwrap();
        assert_eq!(attr.run_id.as_deref(), Some("r-1"));
        assert_eq!(attr.release.as_deref(), Some("v2"));
        assert_eq!(attr.request_type.as_deref(), Some("research"));
        assert_eq!(rest, "/openai/v1/chat");
        let (attr, rest) = split_url_attribution("/openai/v1").unwrap();
        assert!(attr.is_none());
        assert_eq!(rest, "/openai/v1");
        assert!(split_url_attribution("/@run=a b/openai").is_err());
        assert!(split_url_attribution("/@nope=1/openai").is_err());
    }
}
