//! `GET /ui`: the dashboard, a static page embedded in the binary.
//!
//! The HTML, CSS, JS and icon are compiled in with `include_str!` (no CDN,
//! no external font: it works offline). The page itself is served without a
//! token; its script reads the JSON API (`/api/segments`, `/api/runs`,
//! `/api/runs/{id}`, `/api/compare`) and, when `admin.token_env` is set,
//! sends the token the user typed once (kept in `sessionStorage`) as
//! `Authorization: Bearer`. Views are picked by the URL fragment
//! (`/ui#run=<id>`, `/ui#compare&base=..&head=..`), so the server has only
//! these few paths.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use crate::proxy::{full_body, ProxyBody};

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");
const FAVICON_SVG: &str = include_str!("ui/favicon.svg");

/// Everything from the page's own origin, nothing inline, no framing.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The asset at `path` (`/ui`, `/ui/`, `/ui/app.js`, ...), or `None` when
/// there is none.
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    Some(match path {
        "/ui" | "/ui/" | "/ui/index.html" => (INDEX_HTML, "text/html; charset=utf-8"),
        "/ui/app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "/ui/style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        "/ui/favicon.svg" => (FAVICON_SVG, "image/svg+xml"),
        _ => return None,
    })
}

/// Serves a `GET` of `path` under `/ui`: the asset with its content type and
/// a strict `Content-Security-Policy`, or a plain 404.
pub fn serve(path: &str) -> Response<ProxyBody> {
    let (body, content_type, status) = match asset(path) {
        Some((body, content_type)) => (body, content_type, StatusCode::OK),
        None => (
            "no such dashboard asset\n",
            "text/plain; charset=utf-8",
            StatusCode::NOT_FOUND,
        ),
    };
    let mut response = Response::new(full_body(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    headers.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Small and embedded: always revalidate, so an upgrade shows at once.
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_have_their_content_types_and_the_policy() {
        for (path, ty) in [
            ("/ui", "text/html"),
            ("/ui/", "text/html"),
            ("/ui/app.js", "text/javascript"),
            ("/ui/style.css", "text/css"),
            ("/ui/favicon.svg", "image/svg+xml"),
        ] {
            let response = serve(path);
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            let got = response.headers()[http::header::CONTENT_TYPE]
                .to_str()
                .unwrap();
            assert!(got.starts_with(ty), "{path}: {got}");
            let csp = response.headers()[http::header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap();
            assert!(csp.starts_with("default-src 'self'"), "{path}: {csp}");
        }
        assert_eq!(serve("/ui/nope.js").status(), StatusCode::NOT_FOUND);
        assert_eq!(serve("/ui/../Cargo.toml").status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn the_page_loads_only_its_own_assets() {
        // Nothing inline (the policy would block it) and nothing remote.
        assert!(!INDEX_HTML.contains("<script>"));
        assert!(!INDEX_HTML.contains("style="));
        assert!(!INDEX_HTML.contains("http://") && !INDEX_HTML.contains("https://"));
        assert!(!APP_JS.contains("innerHTML"));
        for asset in ["/ui/app.js", "/ui/style.css", "/ui/favicon.svg"] {
            assert!(INDEX_HTML.contains(asset), "{asset}");
        }
    }
}
