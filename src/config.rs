//! Configuration: `tollgate.toml` is parsed into [`RawConfig`] (serde, unknown
//! keys refused), then validated into [`Config`], whose routes and limits are
//! ready for the request path. Every error names the key path it concerns and,
//! where the file gives it, the line (`check-config` prints them all).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::budget::{BudgetConfig, RunsConfig};
use crate::money::Money;
use crate::pricing::PricingConfig;
use crate::usage::Dialect;

/// The file as written. Field docs are the user docs (README config reference).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub routes: Vec<RouteConfig>,
    pub pricing: PricingConfig,
    pub budget: BudgetConfig,
    pub runs: RunsConfig,
    pub ledger: LedgerConfig,
    pub state: StateConfig,
    pub limits: LimitsConfig,
    pub attribution: AttributionConfig,
    pub metrics: MetricsConfig,
    pub segments: crate::api::SegmentsConfig,
    pub compare: crate::api::CompareConfig,
    pub egress: EgressConfig,
}

/// `[egress]`: the forward proxy upstream HTTPS connections go through.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// `http://[user:password@]host:port` of an HTTP proxy that accepts
    /// `CONNECT`; direct connections when absent.
    pub proxy: Option<String>,
    /// Hosts reached directly, as curl's `NO_PROXY`: comma-separated
    /// domains (each with its subdomains), IP addresses or CIDR ranges, or
    /// `*` for every host.
    pub no_proxy: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Agent traffic listener.
    pub listen: String,
    /// TLS termination on the agent listener; plain HTTP when absent.
    pub tls: Option<ServerTlsConfig>,
    /// Threads serving agent connections, each with its own event loop;
    /// one per CPU core when absent.
    pub workers: Option<usize>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8787".into(),
            tls: None,
            workers: None,
        }
    }
}

/// Most `server.workers` accepted: a thread each, and an idle list in
/// every upstream pool each.
const MAX_WORKERS: usize = 1024;

/// `[server.tls]`: PEM files for the agent listener's certificate chain
/// (leaf first) and its private key (PKCS#8, PKCS#1 or SEC1).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    pub cert_path: String,
    pub key_path: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Admin listener: /metrics, /healthz, /readyz, /api/*, /ui.
    pub listen: String,
    /// Name of an environment variable holding the admin bearer token.
    pub token_env: Option<String>,
    /// Also require the token for /metrics.
    pub protect_metrics: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9787".into(),
            token_env: None,
            protect_metrics: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteKind {
    Openai,
    Anthropic,
    Gemini,
    Tool,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Openai => "openai",
            RouteKind::Anthropic => "anthropic",
            RouteKind::Gemini => "gemini",
            RouteKind::Tool => "tool",
        }
    }

    /// The response dialect of an LLM route; `None` for tools.
    pub fn dialect(self) -> Option<Dialect> {
        match self {
            RouteKind::Openai => Some(Dialect::OpenAi),
            RouteKind::Anthropic => Some(Dialect::Anthropic),
            RouteKind::Gemini => Some(Dialect::Gemini),
            RouteKind::Tool => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    pub prefix: String,
    pub upstream: String,
    pub kind: RouteKind,
    /// Tool routes: the `tool` label (defaults to the route name).
    pub tool: Option<String>,
    /// Tool routes: a fixed price per call.
    pub cost_per_call_usd: Option<f64>,
    /// Tool routes: a response header carrying the call's cost in USD.
    pub cost_header: Option<String>,
    /// Tool routes: a JSON pointer into the response body to the cost in USD.
    pub cost_json_pointer: Option<String>,
    /// Tool routes: also charge calls answered with a non-2xx status.
    #[serde(default)]
    pub charge_failed_calls: bool,
    /// Accept any certificate from this route's HTTPS upstream (local or
    /// self-signed upstreams only). Off by default.
    #[serde(default)]
    pub tls_insecure_skip_verify: bool,
    /// A PEM file of CA certificates that this route's HTTPS upstream is
    /// verified against instead of the webpki roots (a private CA).
    pub tls_ca_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Write the ledger at all.
    pub enabled: bool,
    /// `sqlite` (the embedded file at `path`) or `postgres` (one database
    /// shared by every replica, at `url`).
    pub backend: LedgerBackendKind,
    /// Path of the embedded ledger database (SQLite, WAL mode).
    pub path: String,
    /// PostgreSQL connection URL, `postgres://user:password@host:port/db`.
    pub url: Option<String>,
    /// Environment variable holding the URL instead (keeps the password out
    /// of the file).
    pub url_env: Option<String>,
    /// PostgreSQL connections the investigation API may hold at once.
    pub pool_size: usize,
    /// Records held in memory while PostgreSQL is unreachable; later ones
    /// are dropped and counted.
    pub max_buffered_records: usize,
    /// Records are committed at most this long after their call ends: the
    /// most a SIGKILL can lose.
    pub flush_interval_ms: u64,
    /// Records waiting for the writer before callers wait (backpressure).
    pub queue_capacity: usize,
    /// Calls and runs older than this are deleted.
    pub retention_days: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerBackendKind {
    Sqlite,
    Postgres,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            enabled: true,
            backend: LedgerBackendKind::Sqlite,
            path: "data/tollgate.db".into(),
            url: None,
            url_env: None,
            pool_size: 8,
            max_buffered_records: 100_000,
            flush_interval_ms: 200,
            queue_capacity: 65_536,
            retention_days: 30,
        }
    }
}

impl LedgerConfig {
    /// Settings with the path resolved against `base_dir` and the URL read
    /// from `url_env` when set; `None` when off.
    pub fn settings(&self, base_dir: &Path) -> Option<crate::ledger::LedgerSettings> {
        use crate::ledger::{postgres::PostgresSettings, LedgerBackend};
        let backend = match self.backend {
            LedgerBackendKind::Sqlite => LedgerBackend::Sqlite {
                path: base_dir.join(&self.path),
            },
            LedgerBackendKind::Postgres => LedgerBackend::Postgres(PostgresSettings {
                url: self.postgres_url().unwrap_or_default(),
                pool_size: self.pool_size,
                max_buffered_records: self.max_buffered_records,
            }),
        };
        self.enabled.then(|| crate::ledger::LedgerSettings {
            backend,
            flush_interval: Duration::from_millis(self.flush_interval_ms),
            queue_capacity: self.queue_capacity,
            retention_days: self.retention_days,
        })
    }

    /// `url`, or the value of the `url_env` variable.
    fn postgres_url(&self) -> Option<String> {
        match (&self.url, &self.url_env) {
            (Some(url), _) => Some(url.clone()),
            (None, Some(var)) => std::env::var(var).ok().filter(|v| !v.is_empty()),
            (None, None) => None,
        }
    }

    /// Problems of the backend keys, as `(key path, message)`.
    fn problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut push = |key: &str, message: &str| {
            problems.push((format!("ledger.{key}"), message.to_string()));
        };
        match self.backend {
            LedgerBackendKind::Sqlite => {
                if self.url.is_some() || self.url_env.is_some() {
                    push(
                        "backend",
                        "url/url_env are set but backend is \"sqlite\" (set backend = \"postgres\" to use them)",
                    );
                }
                if self.path.is_empty() {
                    push(
                        "path",
                        "must not be empty (set ledger.enabled = false to turn the ledger off)",
                    );
                }
            }
            LedgerBackendKind::Postgres => {
                match (&self.url, &self.url_env) {
                    (Some(_), Some(_)) => push("url", "set url or url_env, not both"),
                    (None, None) => push(
                        "url",
                        "backend \"postgres\" needs url (or url_env naming a variable that holds it)",
                    ),
                    (None, Some(var)) if self.postgres_url().is_none() => push(
                        "url_env",
                        &format!("environment variable `{var}` is not set or empty"),
                    ),
                    _ => {}
                }
                if let Some(url) = self.postgres_url() {
                    if let Err(message) = crate::ledger::postgres::parse_url(&url) {
                        let key = if self.url.is_some() { "url" } else { "url_env" };
                        push(key, &message);
                    }
                }
                if self.pool_size == 0 {
                    push("pool_size", "must be at least 1");
                }
                if self.max_buffered_records == 0 {
                    push("max_buffered_records", "must be at least 1");
                }
            }
        }
        problems
    }
}

/// `[state]`: where run spend, reservations and window spend live. `memory`
/// keeps them in this process; `redis` shares them between replicas.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    pub backend: StateBackend,
    /// `redis://host:port/db` (or `rediss://`, `redis+unix://`).
    pub url: String,
    /// Prefix of every key, so several deployments can share one Redis.
    pub key_prefix: String,
    /// Longest wait for one round trip; past it the failure policy applies.
    pub timeout_ms: u64,
    pub on_state_error: OnStateError,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            backend: StateBackend::Memory,
            url: "redis://127.0.0.1:6379/0".into(),
            key_prefix: "tollgate:".into(),
            timeout_ms: 100,
            on_state_error: OnStateError::FailOpen,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateBackend {
    Memory,
    Redis,
}

/// What a call gets when the shared state cannot be reached in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStateError {
    /// Meter locally and reconcile into the shared state when it is back.
    FailOpen,
    /// Refuse the call with a 503 in the provider's error shape.
    FailClosed,
}

/// Safe defaults for every limit (SPEC §9).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_request_body_bytes: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout_ms: u64,
    pub upstream_connect_timeout_ms: u64,
    /// Time from sending the request to the upstream's response headers.
    pub upstream_response_timeout_ms: u64,
    /// Longest silence inside a streamed response before it is ended.
    pub stream_idle_timeout_ms: u64,
    pub shutdown_drain_ms: u64,
    /// Largest single SSE event / JSON value the usage reader holds.
    pub max_event_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_request_body_bytes: 32 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            header_read_timeout_ms: 10_000,
            upstream_connect_timeout_ms: 10_000,
            upstream_response_timeout_ms: 600_000,
            stream_idle_timeout_ms: 300_000,
            shutdown_drain_ms: 30_000,
            max_event_bytes: 1024 * 1024,
        }
    }
}

/// Names of the attribution headers (SPEC §3).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttributionConfig {
    pub run_id_header: String,
    pub release_header: String,
    pub request_type_header: String,
    pub budget_header: String,
    pub run_status_header: String,
    pub stop_reason_header: String,
}

impl Default for AttributionConfig {
    fn default() -> Self {
        AttributionConfig {
            run_id_header: "x-agent-run-id".into(),
            release_header: "x-agent-release".into(),
            request_type_header: "x-agent-request-type".into(),
            budget_header: "x-agent-budget-usd".into(),
            run_status_header: "x-agent-run-status".into(),
            stop_reason_header: "x-agent-stop-reason".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Distinct values kept per metric label; later values become `other`.
    pub max_label_values: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            max_label_values: 200,
        }
    }
}

/// How a tool route learns what a call cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolCost {
    Fixed(Money),
    Header(http::HeaderName),
    JsonPointer(String),
}

/// A validated route.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub prefix: String,
    pub kind: RouteKind,
    /// Upstream scheme + authority, e.g. `https://api.openai.com`.
    pub upstream_origin: http::uri::Scheme,
    pub upstream_authority: http::uri::Authority,
    /// The upstream request's Host: the authority, built once.
    pub upstream_host: http::HeaderValue,
    /// Upstream base path without trailing slash ("" for none).
    pub upstream_path: String,
    pub tool: Option<String>,
    pub tool_cost: Option<ToolCost>,
    pub charge_failed_calls: bool,
    /// Upstream certificates are not verified (`tls_insecure_skip_verify`).
    pub tls_insecure_skip_verify: bool,
    /// The CA certificates upstream certificates are verified against
    /// instead of the webpki roots (`tls_ca_path`).
    pub tls_ca: Option<TrustedCa>,
}

/// A route's own trust anchors, read from `tls_ca_path`.
#[derive(Debug, Clone)]
pub struct TrustedCa {
    /// The path as configured (routes sharing an upstream compare it).
    pub path: String,
    pub roots: std::sync::Arc<rustls::RootCertStore>,
}

/// Validated configuration, ready for the request path.
#[derive(Debug, Clone)]
pub struct Config {
    pub raw: RawConfig,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Routes sorted longest prefix first.
    pub routes: Vec<Route>,
    pub admin_token: Option<String>,
    pub attribution: AttributionHeaders,
    /// Directory relative paths (pricing files, ledger) resolve against.
    pub base_dir: PathBuf,
    /// TLS for the agent listener, built from `[server.tls]`.
    pub server_tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// `server.workers`, or the number of CPU cores.
    pub workers: usize,
    /// Which upstream connections go through `[egress] proxy`.
    pub egress: Option<std::sync::Arc<hyper_util::client::proxy::matcher::Matcher>>,
}

/// Attribution header names, parsed.
#[derive(Debug, Clone)]
pub struct AttributionHeaders {
    pub run_id: http::HeaderName,
    pub release: http::HeaderName,
    pub request_type: http::HeaderName,
    pub budget: http::HeaderName,
    pub run_status: http::HeaderName,
    pub stop_reason: http::HeaderName,
}

impl AttributionHeaders {
    pub fn all(&self) -> [&http::HeaderName; 6] {
        [
            &self.run_id,
            &self.release,
            &self.request_type,
            &self.budget,
            &self.run_status,
            &self.stop_reason,
        ]
    }
}

impl LimitsConfig {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
    pub fn upstream_connect_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_connect_timeout_ms)
    }
    pub fn upstream_response_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_response_timeout_ms)
    }
    pub fn stream_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.stream_idle_timeout_ms)
    }
    pub fn shutdown_drain(&self) -> Duration {
        Duration::from_millis(self.shutdown_drain_ms)
    }
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key path, e.g. `routes[2].upstream`; empty for file-level errors.
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.key.is_empty(), self.line) {
            (true, Some(line)) => write!(f, "line {line}: {}", self.message),
            (true, None) => write!(f, "{}", self.message),
            (false, Some(line)) => write!(f, "{} (line {line}): {}", self.key, self.message),
            (false, None) => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// Every problem found in a config file, with the file's path.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub path: String,
    pub issues: Vec<ConfigIssue>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for issue in &self.issues {
            if !first {
                writeln!(f)?;
            }
            first = false;
            write!(f, "{}: {issue}", self.path)?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: display.clone(),
            issues: vec![ConfigIssue {
                key: String::new(),
                line: None,
                message: format!("cannot read the config file: {e}"),
            }],
        })?;
        // Relative paths in the file resolve against the working directory,
        // as with nginx's `-p` default and LiteLLM's config loader.
        let base_dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        Config::from_toml(&text, &display, base_dir)
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str, base_dir: PathBuf) -> Result<Config, ConfigError> {
        let fail = |issues: Vec<ConfigIssue>| ConfigError {
            path: origin.to_string(),
            issues,
        };
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => return Err(fail(deserialize_issues(text, &e))),
        };
        let lines = KeyLines::new(text);
        match validate(raw, base_dir) {
            Ok(config) => Ok(config),
            Err(problems) => Err(fail(
                problems
                    .into_iter()
                    .map(|(key, message)| ConfigIssue {
                        line: lines.line_of(&key),
                        key,
                        message,
                    })
                    .collect(),
            )),
        }
    }

    /// The route serving `path`, with the rest of the path after its prefix.
    pub fn route_for<'a, 'p>(&'a self, path: &'p str) -> Option<(&'a Route, &'p str)> {
        self.routes.iter().find_map(|route| {
            let rest = path.strip_prefix(route.prefix.as_str())?;
            (rest.is_empty() || rest.starts_with('/') || route.prefix == "/")
                .then_some((route, rest))
        })
    }
}

/// Validation turns the raw file into [`Config`] or a list of
/// `(key path, message)` problems.
fn validate(raw: RawConfig, base_dir: PathBuf) -> Result<Config, Vec<(String, String)>> {
    let mut problems: Vec<(String, String)> = Vec::new();
    let mut push = |key: &str, message: String| problems.push((key.to_string(), message));

    let listen = parse_addr(&raw.server.listen)
        .map_err(|m| push("server.listen", m))
        .ok();
    let admin_listen = parse_addr(&raw.admin.listen)
        .map_err(|m| push("admin.listen", m))
        .ok();

    let admin_token = match &raw.admin.token_env {
        Some(var) => match std::env::var(var) {
            Ok(token) if !token.is_empty() => Some(token),
            _ => {
                push(
                    "admin.token_env",
                    format!("environment variable `{var}` is not set or empty"),
                );
                None
            }
        },
        None => None,
    };

    let mut routes = Vec::new();
    let mut names = HashSet::new();
    let mut prefixes = HashSet::new();
    for (i, route) in raw.routes.iter().enumerate() {
        let key = |field: &str| format!("routes[{i}].{field}");
        if route.name.is_empty() || !route.name.bytes().all(is_label_byte) {
            push(
                &key("name"),
                "must be 1+ characters of [A-Za-z0-9._:-]".into(),
            );
        } else if !names.insert(route.name.clone()) {
            push(
                &key("name"),
                format!("duplicate route name `{}`", route.name),
            );
        }
        let prefix = route.prefix.trim_end_matches('/');
        let prefix = if prefix.is_empty() { "/" } else { prefix };
        if !route.prefix.starts_with('/') {
            push(&key("prefix"), "must start with `/`".into());
        } else if prefix.contains("//") || prefix.split('/').any(|s| s == ".." || s == ".") {
            push(
                &key("prefix"),
                "must not contain `//`, `.` or `..` segments".into(),
            );
        } else if !prefixes.insert(prefix.to_string()) {
            push(&key("prefix"), format!("duplicate prefix `{prefix}`"));
        }
        let upstream = match route.upstream.parse::<http::Uri>() {
            Ok(uri) => match (uri.scheme(), uri.authority()) {
                (Some(scheme), Some(authority))
                    if (scheme == &http::uri::Scheme::HTTP
                        || scheme == &http::uri::Scheme::HTTPS)
                        && uri.query().is_none() =>
                {
                    Some((
                        scheme.clone(),
                        authority.clone(),
                        uri.path().trim_end_matches('/').to_string(),
                    ))
                }
                _ => {
                    push(
                        &key("upstream"),
                        format!(
                            "`{}` must be an http:// or https:// URL without a query",
                            route.upstream
                        ),
                    );
                    None
                }
            },
            Err(e) => {
                push(
                    &key("upstream"),
                    format!("`{}` is not a URL: {e}", route.upstream),
                );
                None
            }
        };
        let tls_ca = match &route.tls_ca_path {
            Some(_) if route.tls_insecure_skip_verify => {
                push(
                    &key("tls_ca_path"),
                    "a route that skips verification (tls_insecure_skip_verify) takes no CA".into(),
                );
                None
            }
            Some(_)
                if upstream
                    .as_ref()
                    .is_some_and(|(scheme, ..)| scheme != &http::uri::Scheme::HTTPS) =>
            {
                push(
                    &key("tls_ca_path"),
                    "the upstream is not https://; a CA applies to HTTPS upstreams only".into(),
                );
                None
            }
            Some(path) => read_trusted_ca(path, &base_dir)
                .map_err(|message| push(&key("tls_ca_path"), message))
                .ok(),
            None => None,
        };
        let tool_cost = if route.kind == RouteKind::Tool {
            let sources = [
                route.cost_per_call_usd.is_some(),
                route.cost_header.is_some(),
                route.cost_json_pointer.is_some(),
            ];
            match sources.iter().filter(|s| **s).count() {
                1 => {}
                0 => push(
                    &key("kind"),
                    "a tool route needs one of cost_per_call_usd, cost_header, cost_json_pointer".into(),
                ),
                _ => push(
                    &key("kind"),
                    "a tool route takes only one of cost_per_call_usd, cost_header, cost_json_pointer".into(),
                ),
            }
            if let Some(usd) = route.cost_per_call_usd {
                match Money::from_usd_f64(usd) {
                    Ok(m) => Some(ToolCost::Fixed(m)),
                    Err(e) => {
                        push(
                            &key("cost_per_call_usd"),
                            format!("must be a non-negative USD amount: {e}"),
                        );
                        None
                    }
                }
            } else if let Some(header) = &route.cost_header {
                match http::HeaderName::from_bytes(header.as_bytes()) {
                    Ok(h) => Some(ToolCost::Header(h)),
                    Err(_) => {
                        push(
                            &key("cost_header"),
                            format!("`{header}` is not a valid header name"),
                        );
                        None
                    }
                }
            } else if let Some(pointer) = &route.cost_json_pointer {
                if pointer.is_empty() || pointer.starts_with('/') {
                    Some(ToolCost::JsonPointer(pointer.clone()))
                } else {
                    push(
                        &key("cost_json_pointer"),
                        "a JSON pointer starts with `/`".into(),
                    );
                    None
                }
            } else {
                None
            }
        } else {
            for (field, set) in [
                ("tool", route.tool.is_some()),
                ("cost_per_call_usd", route.cost_per_call_usd.is_some()),
                ("cost_header", route.cost_header.is_some()),
                ("cost_json_pointer", route.cost_json_pointer.is_some()),
            ] {
                if set {
                    push(
                        &key(field),
                        "only tool routes (kind = \"tool\") take this key".into(),
                    );
                }
            }
            None
        };
        let upstream = upstream.and_then(|(scheme, authority, path)| {
            // The Host of every upstream request, checked and built once.
            match http::HeaderValue::from_str(authority.as_str()) {
                Ok(host) => Some((scheme, authority, path, host)),
                Err(_) => {
                    push(
                        &key("upstream"),
                        format!("`{}` has no valid Host", route.upstream),
                    );
                    None
                }
            }
        });
        if let Some((scheme, authority, path, upstream_host)) = upstream {
            routes.push(Route {
                name: route.name.clone(),
                prefix: prefix.to_string(),
                kind: route.kind,
                upstream_origin: scheme,
                upstream_host,
                upstream_authority: authority,
                upstream_path: path,
                tool: (route.kind == RouteKind::Tool)
                    .then(|| route.tool.clone().unwrap_or_else(|| route.name.clone())),
                tool_cost,
                charge_failed_calls: route.charge_failed_calls,
                tls_insecure_skip_verify: route.tls_insecure_skip_verify,
                tls_ca,
            });
        }
    }
    // The upstream client pools connections per origin, so verification is
    // decided per origin: routes sharing one must agree.
    fn ca_path(route: &Route) -> Option<&str> {
        route.tls_ca.as_ref().map(|ca| ca.path.as_str())
    }
    for (i, route) in routes.iter().enumerate() {
        let same_origin = |o: &&Route| {
            o.upstream_origin == route.upstream_origin
                && o.upstream_authority == route.upstream_authority
        };
        let disagreement = routes[..i].iter().filter(same_origin).find_map(|o| {
            if o.tls_insecure_skip_verify != route.tls_insecure_skip_verify {
                Some((o, "tls_insecure_skip_verify"))
            } else if ca_path(o) != ca_path(route) {
                Some((o, "tls_ca_path"))
            } else {
                None
            }
        });
        if let Some((other, field)) = disagreement {
            let index = raw.routes.iter().position(|r| r.name == route.name);
            push(
                &format!("routes[{}].{field}", index.unwrap_or(i)),
                format!(
                    "routes `{}` and `{}` share the upstream {}://{} but disagree on it; one connection pool serves both, so set the same value on both",
                    other.name, route.name, route.upstream_origin, route.upstream_authority
                ),
            );
        }
    }
    routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));

    let egress = match &raw.egress.proxy {
        Some(proxy) => match egress_matcher(proxy, &raw.egress.no_proxy) {
            Ok(matcher) => Some(std::sync::Arc::new(matcher)),
            Err(message) => {
                push("egress.proxy", message);
                None
            }
        },
        None => None,
    };

    let server_tls = match &raw.server.tls {
        Some(tls) => match server_tls_config(tls, &base_dir) {
            Ok(config) => Some(config),
            Err((key, message)) => {
                push(key, message);
                None
            }
        },
        None => None,
    };

    let workers = match raw.server.workers {
        Some(n) if !(1..=MAX_WORKERS).contains(&n) => {
            push(
                "server.workers",
                format!("must be between 1 and {MAX_WORKERS}"),
            );
            1
        }
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, usize::from),
    };

    for message in raw.budget.validate("budget") {
        problems.push(split_key_message(message));
    }
    for message in raw.runs.validate("runs") {
        problems.push(split_key_message(message));
    }

    let attr = &raw.attribution;
    let mut header = |field: &str, value: &str| match http::HeaderName::from_bytes(value.as_bytes())
    {
        Ok(h) => Some(h),
        Err(_) => {
            problems.push((
                format!("attribution.{field}"),
                format!("`{value}` is not a valid header name"),
            ));
            None
        }
    };
    let attribution = (
        header("run_id_header", &attr.run_id_header),
        header("release_header", &attr.release_header),
        header("request_type_header", &attr.request_type_header),
        header("budget_header", &attr.budget_header),
        header("run_status_header", &attr.run_status_header),
        header("stop_reason_header", &attr.stop_reason_header),
    );

    let limits = &raw.limits;
    for (field, value) in [
        (
            "max_request_body_bytes",
            limits.max_request_body_bytes as u64,
        ),
        ("max_header_bytes", limits.max_header_bytes as u64),
        ("max_headers", limits.max_headers as u64),
        ("header_read_timeout_ms", limits.header_read_timeout_ms),
        (
            "upstream_connect_timeout_ms",
            limits.upstream_connect_timeout_ms,
        ),
        (
            "upstream_response_timeout_ms",
            limits.upstream_response_timeout_ms,
        ),
        ("stream_idle_timeout_ms", limits.stream_idle_timeout_ms),
        ("max_event_bytes", limits.max_event_bytes as u64),
    ] {
        if value == 0 {
            problems.push((format!("limits.{field}"), "must be greater than 0".into()));
        }
    }
    if limits.max_header_bytes < 8192 {
        problems.push((
            "limits.max_header_bytes".into(),
            "must be at least 8192 (hyper's smallest read buffer)".into(),
        ));
    }
    if raw.ledger.enabled {
        problems.extend(raw.ledger.problems());
        if raw.ledger.flush_interval_ms == 0 {
            problems.push((
                "ledger.flush_interval_ms".into(),
                "must be greater than 0".into(),
            ));
        }
        if raw.ledger.queue_capacity == 0 {
            problems.push((
                "ledger.queue_capacity".into(),
                "must be greater than 0".into(),
            ));
        }
    }
    if raw.state.backend == StateBackend::Redis {
        if let Err(e) = redis::Client::open(raw.state.url.as_str()) {
            problems.push(("state.url".into(), format!("not a Redis URL: {e}")));
        }
        if raw.state.key_prefix.is_empty() {
            problems.push((
                "state.key_prefix".into(),
                "must not be empty (it keeps deployments sharing one Redis apart)".into(),
            ));
        }
    }
    if raw.state.timeout_ms == 0 {
        problems.push(("state.timeout_ms".into(), "must be greater than 0".into()));
    }
    if raw.metrics.max_label_values == 0 {
        problems.push((
            "metrics.max_label_values".into(),
            "must be greater than 0".into(),
        ));
    }

    match (listen, admin_listen, attribution, problems.is_empty()) {
        (
            Some(listen),
            Some(admin_listen),
            (Some(a), Some(b), Some(c), Some(d), Some(e), Some(f)),
            true,
        ) => Ok(Config {
            listen,
            admin_listen,
            routes,
            admin_token,
            attribution: AttributionHeaders {
                run_id: a,
                release: b,
                request_type: c,
                budget: d,
                run_status: e,
                stop_reason: f,
            },
            base_dir,
            server_tls,
            workers,
            egress,
            raw,
        }),
        _ => Err(problems),
    }
}

/// The matcher of `[egress]`: HTTPS destinations through `proxy`, except
/// those `no_proxy` lists. Only plain-HTTP proxies are accepted: the tunnel
/// is opened over a plain connection to the proxy.
fn egress_matcher(
    proxy: &str,
    no_proxy: &str,
) -> Result<hyper_util::client::proxy::matcher::Matcher, String> {
    let uri = proxy
        .parse::<http::Uri>()
        .map_err(|e| format!("`{proxy}` is not a URL: {e}"))?;
    if uri.scheme() != Some(&http::uri::Scheme::HTTP) || uri.host().is_none_or(str::is_empty) {
        return Err(format!(
            "`{proxy}` must be an http:// URL of a proxy, like http://proxy.internal:3128"
        ));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!("`{proxy}` must name a proxy only, without a path"));
    }
    Ok(hyper_util::client::proxy::matcher::Matcher::builder()
        .https(proxy)
        .no(no_proxy)
        .build())
}

/// The certificates of a PEM file, at least one; the message of an error
/// names the file. `[server.tls]` and `tls_ca_path` read theirs with it.
fn read_pem_certificates(
    path: &str,
    base_dir: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let pem =
        std::fs::read(base_dir.join(path)).map_err(|e| format!("cannot read `{path}`: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{path}` is not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err(format!("`{path}` holds no PEM certificate"));
    }
    Ok(certs)
}

/// Reads a route's `tls_ca_path`: every certificate of the PEM file becomes
/// a trust anchor. The message of an error names the file.
fn read_trusted_ca(path: &str, base_dir: &Path) -> Result<TrustedCa, String> {
    let certs = read_pem_certificates(path, base_dir)?;
    let mut roots = rustls::RootCertStore::empty();
    for (n, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            format!(
                "certificate {} of `{path}` is not a usable CA certificate: {e}",
                n + 1
            )
        })?;
    }
    Ok(TrustedCa {
        path: path.to_string(),
        roots: std::sync::Arc::new(roots),
    })
}

/// Reads `[server.tls]`'s PEM files into a rustls server config (ring
/// provider, ALPN `h2` then `http/1.1`); errors name the key they concern.
fn server_tls_config(
    tls: &ServerTlsConfig,
    base_dir: &Path,
) -> Result<std::sync::Arc<rustls::ServerConfig>, (&'static str, String)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;

    let certs =
        read_pem_certificates(&tls.cert_path, base_dir).map_err(|m| ("server.tls.cert_path", m))?;
    let key_pem = std::fs::read(base_dir.join(&tls.key_path)).map_err(|e| {
        (
            "server.tls.key_path",
            format!("cannot read `{}`: {e}", tls.key_path),
        )
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        (
            "server.tls.key_path",
            format!("`{}` holds no PEM private key: {e}", tls.key_path),
        )
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ("server.tls", e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| {
        (
            "server.tls.key_path",
            format!("the key does not fit the certificate: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(std::sync::Arc::new(config))
}

/// Budget and runs validators report `key.path: message`.
fn split_key_message(message: String) -> (String, String) {
    match message.split_once(": ") {
        Some((key, rest)) if !key.contains(' ') => (key.to_string(), rest.to_string()),
        _ => (String::new(), message),
    }
}

fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .map_err(|_| format!("`{text}` is not an address like 127.0.0.1:8787"))
}

/// The attribution charset (SPEC §3), also used for route names.
pub fn is_label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Finds the line of a dotted key path such as `routes[1].upstream` in the
/// source text, so validation errors point at the line to fix.
struct KeyLines<'a> {
    text: &'a str,
    doc: Option<toml_edit::ImDocument<&'a str>>,
}

impl<'a> KeyLines<'a> {
    fn new(text: &'a str) -> Self {
        KeyLines {
            text,
            doc: toml_edit::ImDocument::parse(text).ok(),
        }
    }

    fn line_of(&self, key: &str) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut item: &toml_edit::Item = doc.as_item();
        let mut span = None;
        for part in key.split('.') {
            let (name, index) = match part.split_once('[') {
                Some((name, idx)) => (name, idx.trim_end_matches(']').parse::<usize>().ok()),
                None => (part, None),
            };
            let next = item.get(name)?;
            item = next;
            span = item_span(item).or(span);
            if let Some(index) = index {
                item = item.get(index)?;
                span = item_span(item).or(span);
            }
        }
        span.map(|s| line_of_offset(self.text, s))
    }
}

/// The type and key errors of a file that does not deserialize, every
/// section's first one with its key path: serde stops at the first error of
/// a document, so each top-level section is read again on its own (every
/// section has defaults). A syntax error, which leaves no document to split,
/// is reported alone with its line.
fn deserialize_issues(text: &str, error: &toml::de::Error) -> Vec<ConfigIssue> {
    let whole = || {
        vec![ConfigIssue {
            key: String::new(),
            line: error.span().map(|span| line_of_offset(text, span.start)),
            message: error.message().to_string(),
        }]
    };
    let Ok(table) = text.parse::<toml::Table>() else {
        return whole();
    };
    let lines = KeyLines::new(text);
    let mut issues: Vec<ConfigIssue> = table
        .into_iter()
        .filter_map(|(section, value)| {
            let alone = toml::Value::Table(toml::Table::from_iter([(section, value)]));
            let e = serde_path_to_error::deserialize::<_, RawConfig>(alone).err()?;
            let key = e.path().to_string();
            Some(ConfigIssue {
                line: lines.line_of(&key),
                key,
                message: e.into_inner().message().to_string(),
            })
        })
        .collect();
    // In the file's order (the table's is alphabetical).
    issues.sort_by_key(|issue| issue.line.unwrap_or(usize::MAX));
    if issues.is_empty() {
        whole()
    } else {
        issues
    }
}

fn item_span(item: &toml_edit::Item) -> Option<usize> {
    match item {
        toml_edit::Item::Value(v) => v.span().map(|s| s.start),
        // A table only ever named in its children's headers, such as
        // `[extra."a"]`, has no span of its own: its first child's stands in.
        toml_edit::Item::Table(t) => t
            .span()
            .map(|s| s.start)
            .or_else(|| t.iter().filter_map(|(_, child)| item_span(child)).min()),
        toml_edit::Item::ArrayOfTables(a) => a.span().map(|s| s.start),
        toml_edit::Item::None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, "test.toml", PathBuf::from("."))
    }

    #[test]
    fn defaults_are_valid() {
        let config = load("").unwrap();
        assert_eq!(config.listen.port(), 8787);
        assert_eq!(config.admin_listen.port(), 9787);
        assert!(config.routes.is_empty());
    }

    #[test]
    fn workers_default_to_the_cores_and_out_of_range_names_the_key() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(load("").unwrap().workers, cores);
        assert_eq!(load("[server]\nworkers = 3\n").unwrap().workers, 3);
        for bad in ["0", "1025"] {
            let err = load(&format!("[server]\nworkers = {bad}\n")).unwrap_err();
            assert_eq!(err.issues.len(), 1, "{bad}");
            assert_eq!(err.issues[0].key, "server.workers");
            assert_eq!(err.issues[0].line, Some(2));
            assert!(err.issues[0].message.contains("between 1 and 1024"));
        }
    }

    #[test]
    fn routes_match_on_segment_boundaries_longest_first() {
        let config = load(
            r#"
[[routes]]
name = "openai"
prefix = "/openai"
upstream = "https://api.openai.com"
kind = "openai"

[[routes]]
name = "openai-eu"
prefix = "/openai/eu/"
upstream = "https://eu.example.com/base/"
kind = "openai"
"#,
        )
        .unwrap();
        let (route, rest) = config.route_for("/openai/v1/chat/completions").unwrap();
        assert_eq!(
            (route.name.as_str(), rest),
            ("openai", "/v1/chat/completions")
        );
        let (route, rest) = config.route_for("/openai/eu/v1/x").unwrap();
        assert_eq!((route.name.as_str(), rest), ("openai-eu", "/v1/x"));
        assert_eq!(route.upstream_path, "/base");
        assert!(config.route_for("/openaix/v1").is_none());
        assert!(config.route_for("/other").is_none());
    }

    #[test]
    fn errors_name_key_and_line() {
        let err = load(
            r#"
[server]
listen = "127.0.0.1:8787"

[[routes]]
name = "a"
prefix = "/a"
upstream = "ftp://nope"
kind = "openai"
"#,
        )
        .unwrap_err();
        assert_eq!(err.issues.len(), 1);
        assert_eq!(err.issues[0].key, "routes[0].upstream");
        assert_eq!(err.issues[0].line, Some(8));
        assert!(err
            .to_string()
            .contains("test.toml: routes[0].upstream (line 8)"));
    }

    #[test]
    fn unknown_keys_and_bad_types_are_refused_with_line() {
        let err = load("[server]\nlisten = \"x\"\nlisen = 3\n").unwrap_err();
        assert_eq!(err.issues[0].line, Some(3));
        assert!(err.issues[0].message.contains("unknown field `lisen`"));
        let err = load("[limits]\nmax_headers = \"many\"\n").unwrap_err();
        assert_eq!(err.issues[0].line, Some(2));
    }

    #[test]
    fn tool_routes_need_exactly_one_cost_source() {
        let err = load(
            r#"
[[routes]]
name = "search"
prefix = "/tools/search"
upstream = "https://search.example.com"
kind = "tool"
"#,
        )
        .unwrap_err();
        assert_eq!(err.issues[0].key, "routes[0].kind");
        let config = load(
            r#"
[[routes]]
name = "search"
prefix = "/tools/search"
upstream = "https://search.example.com/v2/search"
kind = "tool"
tool = "web_search"
cost_per_call_usd = 0.005
"#,
        )
        .unwrap();
        let route = &config.routes[0];
        assert_eq!(route.tool.as_deref(), Some("web_search"));
        assert_eq!(
            route.tool_cost,
            Some(ToolCost::Fixed(Money::parse_usd("0.005").unwrap()))
        );
    }

    #[test]
    fn every_sections_type_error_is_reported_with_its_key() {
        let err = load(
            r#"
[server]
lisen = 3
[limits]
max_headers = "many"
[[routes]]
name = "a"
prefix = "/a"
upstream = "http://127.0.0.1:1"
kind = "openapi"
[budget]
mode = "hard"
[bogus]
x = 1
[implicit."a"]
x = 1
"#,
        )
        .unwrap_err();
        let found: Vec<_> = err
            .issues
            .iter()
            .map(|i| (i.key.as_str(), i.line))
            .collect();
        assert_eq!(
            found,
            [
                ("server.lisen", Some(3)),
                ("limits.max_headers", Some(5)),
                ("routes[0].kind", Some(10)),
                ("budget.mode", Some(12)),
                ("bogus", Some(13)),
                ("implicit", Some(15)),
            ]
        );
        assert!(err.issues[3].message.contains("unknown variant `hard`"));
        // A syntax error leaves no sections to read: it alone, with its line.
        let err = load("[server]\nlisten = \"x\"\n[limits\n").unwrap_err();
        assert_eq!(err.issues.len(), 1);
        assert_eq!(
            (err.issues[0].key.as_str(), err.issues[0].line),
            ("", Some(3))
        );
    }

    #[test]
    fn every_problem_is_reported() {
        let err = load(
            r#"
[server]
listen = "nowhere"
[admin]
listen = "also nowhere"
[limits]
max_headers = 0
"#,
        )
        .unwrap_err();
        let keys: Vec<_> = err.issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            ["server.listen", "admin.listen", "limits.max_headers"]
        );
    }
}
