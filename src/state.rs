//! Shared state of one tollgate instance, and the config reload that swaps
//! its hot-reloadable parts (routes, limits, prices, budget policy) without
//! dropping a connection. Listener addresses and the admin token need a
//! restart.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::budget::{BudgetPolicy, Budgets, Clock, RunEndSink, RunStatus};
use crate::config::Config;
use crate::ledger::{Ledger, RunRecord};
use crate::metrics::{Metrics, ReleaseLabel, ResultLabel, RunLabels};
use crate::money::Money;
use crate::pricing::{PriceTable, UnknownModel};
use crate::proxy::request::RequestInfo;
use crate::proxy::upstream::{build_client, UpstreamClient};
use crate::state_backend::SharedState;
use crate::usage::Usage;

/// How many distinct unpriced model names are remembered for log-once.
const MAX_UNPRICED_REMEMBERED: usize = 10_000;

pub struct AppState {
    pub config: ArcSwap<Config>,
    pub pricing: ArcSwap<PriceTable>,
    pub budgets: Arc<Budgets>,
    pub metrics: Arc<Metrics>,
    /// The ledger; `None` with `ledger.enabled = false`.
    pub ledger: Option<Arc<Ledger>>,
    /// Run and window spend shared with other replicas (`[state] backend =
    /// "redis"`); `None` with the memory backend.
    pub shared: Option<Arc<SharedState>>,
    pub client: UpstreamClient,
    pub clock: Arc<dyn Clock>,
    /// The file the config came from, for reloads.
    pub config_path: Option<PathBuf>,
    /// The config as started: what a reload cannot change is compared
    /// with it, not with the last reload's file.
    started: Arc<Config>,
    unpriced_seen: Mutex<HashSet<String>>,
}

/// Why an instance could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("pricing: {0}")]
    Pricing(#[from] crate::pricing::PricingError),
    #[error("budget: {}", .0.join("; "))]
    Budget(Vec<String>),
    #[error("{0}")]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error("state: {0}")]
    State(String),
}

impl AppState {
    pub fn new(
        config: Config,
        config_path: Option<PathBuf>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<AppState>, StartError> {
        let pricing = PriceTable::load(&config.raw.pricing, &config.base_dir)?;
        let policy = BudgetPolicy::from_config(&config.raw.budget).map_err(StartError::Budget)?;
        let metrics = Metrics::new(config.raw.metrics.max_label_values);
        let ledger = match config.raw.ledger.settings(&config.base_dir) {
            Some(settings) => Some(Arc::new(Ledger::open(&settings)?)),
            None => None,
        };
        let sink = run_end_sink(metrics.clone(), ledger.clone());
        let shared = SharedState::from_config(
            &config.raw.state,
            metrics.clone(),
            clock.clone(),
            sink.clone(),
        )
        .map_err(StartError::State)?;
        // With a shared state the claimer of a run's end emits it, from the
        // fleet's figures; local ends only drop the local copy.
        let sink = match shared {
            Some(_) => SharedState::local_end_sink(),
            None => sink,
        };
        let budgets = Arc::new(Budgets::new(
            policy,
            config.raw.runs.clone(),
            clock.clone(),
            sink,
        ));
        if shared.is_some() {
            budgets.leave_limits_to_fleet();
        }
        if let (Some(ledger), None) = (&ledger, &shared) {
            // A run cannot escape its ceiling by a restart: live runs get
            // their spend back from the ledger (with a shared state backend
            // the fleet's spend is in the backend).
            let idle_ms = config.raw.runs.idle_timeout_secs.saturating_mul(1000);
            let runs = ledger.runs_to_restore(clock.now_ms(), idle_ms)?;
            if !runs.is_empty() {
                tracing::info!(
                    message = "restored live runs from the ledger",
                    runs = runs.len()
                );
            }
            for run in runs {
                budgets.restore_run(run);
            }
        }
        if let Some(proxy) = &config.raw.egress.proxy {
            tracing::info!(
                message = "upstream HTTPS connections go through the egress proxy",
                proxy = %crate::proxy::egress::proxy_address(proxy),
                no_proxy = %config.raw.egress.no_proxy,
            );
        }
        let client = build_client(
            config.raw.limits.upstream_connect_timeout(),
            &config.routes,
            config.egress.clone(),
            config.workers,
        );
        let config = Arc::new(config);
        Ok(Arc::new(AppState {
            started: config.clone(),
            config: ArcSwap::new(config),
            pricing: ArcSwap::from_pointee(pricing),
            budgets,
            metrics,
            ledger,
            shared,
            client,
            clock,
            config_path,
            unpriced_seen: Mutex::new(HashSet::new()),
        }))
    }

    /// Re-reads the config file and swaps config, prices, budget policy and
    /// `[runs]`. On any error the running config stays and the error is
    /// returned; on success, the settings where the file differs from what
    /// runs and only a restart applies (each named, and logged).
    pub fn reload(&self) -> Result<Vec<&'static str>, String> {
        let result = self.try_reload();
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .config_reloads
            .get_or_create(&ResultLabel {
                result: label.into(),
            })
            .inc();
        match &result {
            Ok(needs_restart) if needs_restart.is_empty() => {
                tracing::info!(message = "config reloaded")
            }
            Ok(needs_restart) => tracing::warn!(
                message = "config reloaded; changed settings that take effect on restart only",
                settings = %needs_restart.join(", ")
            ),
            Err(e) => {
                tracing::error!(message = "config reload refused; keeping the running config", error = %e)
            }
        }
        result
    }

    fn try_reload(&self) -> Result<Vec<&'static str>, String> {
        let path = self
            .config_path
            .as_ref()
            .ok_or("this instance was not started from a config file")?;
        let config = Config::load(path).map_err(|e| e.to_string())?;
        let pricing = PriceTable::load(&config.raw.pricing, &config.base_dir)
            .map_err(|e| format!("pricing: {e}"))?;
        let policy = BudgetPolicy::from_config(&config.raw.budget)
            .map_err(|e| format!("budget: {}", e.join("; ")))?;
        let started = &self.started;
        let (new, old) = (&config.raw, &started.raw);
        // What is built once at start: the listeners, the worker threads,
        // the ledger writer, the shared state connection, the metric
        // families' label caps and the upstream clients' connectors (their
        // timeout and egress proxy).
        let needs_restart = [
            ("server.listen", config.listen != started.listen),
            ("admin.listen", config.admin_listen != started.admin_listen),
            ("server.tls", new.server.tls != old.server.tls),
            ("server.workers", config.workers != started.workers),
            ("ledger", new.ledger != old.ledger),
            ("state", new.state != old.state),
            ("metrics.max_label_values", new.metrics != old.metrics),
            ("egress", new.egress != old.egress),
            (
                "limits.upstream_connect_timeout_ms",
                new.limits.upstream_connect_timeout_ms != old.limits.upstream_connect_timeout_ms,
            ),
        ]
        .into_iter()
        .filter_map(|(setting, changed)| changed.then_some(setting))
        .collect();
        self.budgets.set_policy(policy);
        self.budgets.set_runs_config(config.raw.runs.clone());
        self.client.set_routes(&config.routes);
        self.pricing.store(Arc::new(pricing));
        self.config.store(Arc::new(config));
        Ok(needs_restart)
    }

    /// Worker threads serving agent connections (`server.workers` as
    /// started).
    pub fn workers(&self) -> usize {
        self.started.workers
    }

    pub fn reject_unknown_models(&self) -> bool {
        matches!(
            self.config.load().raw.pricing.unknown_model,
            UnknownModel::Reject
        )
    }

    /// Logs an unpriced model once per process.
    pub fn note_unpriced(&self, model: &str) {
        let mut seen = match self.unpriced_seen.lock() {
            Ok(seen) => seen,
            Err(poisoned) => poisoned.into_inner(),
        };
        if seen.len() < MAX_UNPRICED_REMEMBERED && seen.insert(model.to_string()) {
            tracing::warn!(message = "model has no price; its calls are charged zero and counted in agent_unpriced_calls_total", model = %model);
        }
    }

    /// The expected cost of an LLM call, reserved before it goes upstream:
    /// prompt tokens from the body size (about 4 bytes a token; JSON framing
    /// makes this an overestimate of the text), output from the request's
    /// limit, else `budget.expected_output_tokens` capped by the model's
    /// maximum output. A model without a price reserves
    /// `budget.fallback_reservation_usd`.
    pub fn reservation_for(
        &self,
        pricing: &PriceTable,
        info: &RequestInfo,
        body_bytes: u64,
    ) -> Money {
        let policy = self.budgets.policy();
        let Some(found) = info.model.as_deref().and_then(|m| pricing.lookup(m)) else {
            return policy.fallback_reservation;
        };
        let expected = policy.expected_output_tokens;
        let output = info.max_output_tokens.unwrap_or_else(|| {
            found
                .price
                .max_output_tokens
                .map_or(expected, |max| expected.min(max))
        });
        let usage = Usage {
            input_tokens: Some(body_bytes.div_ceil(4)),
            output_tokens: Some(output),
            ..Usage::default()
        };
        PriceTable::price_cost(found.price, &usage)
    }

    /// Copies totals kept by other components into the exported metrics.
    pub fn refresh_gauges(&self) {
        let totals = self.budgets.totals();
        self.metrics
            .budget_reserved
            .set(totals.reserved_outstanding.as_usd_f64());
        self.metrics.budget_settled.set(totals.settled);
        self.metrics
            .active_runs
            .set(self.budgets.active_runs() as i64);
        if let Some(ledger) = &self.ledger {
            let stats = &ledger.stats;
            let get = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
            let gauge =
                |n: &std::sync::atomic::AtomicU64| i64::try_from(get(n)).unwrap_or(i64::MAX);
            let m = &self.metrics;
            m.ledger_written.set(gauge(&stats.written));
            m.ledger_queue.set(
                i64::try_from(
                    get(&stats.queued)
                        .saturating_sub(get(&stats.written))
                        .saturating_sub(get(&stats.dropped)),
                )
                .unwrap_or(i64::MAX),
            );
            m.ledger_write_errors.set(gauge(&stats.write_errors));
            m.ledger_backpressure.set(gauge(&stats.backpressure_waits));
            m.ledger_buffered.set(gauge(&stats.buffered));
            // The writer's own count is the counter's value.
            m.ledger_dropped
                .inner()
                .store(get(&stats.dropped), Ordering::Relaxed);
        }
    }
}

/// Turns each run end into the run-level metrics (SPEC §6, §7).
fn run_end_sink(metrics: Arc<Metrics>, ledger: Option<Arc<Ledger>>) -> RunEndSink {
    Arc::new(move |end| {
        if let Some(ledger) = &ledger {
            ledger.record_run(RunRecord::from(&end));
        }
        let release = metrics.release(&end.release);
        let status = match end.status {
            RunStatus::Ok => "ok",
            RunStatus::Error => "error",
        };
        metrics
            .run_total
            .get_or_create(&RunLabels {
                status: status.into(),
                stop_reason: metrics.stop_reason(&end.stop_reason),
                release: release.clone(),
            })
            .inc();
        metrics
            .run_cost
            .get_or_create(&ReleaseLabel {
                release: release.clone(),
            })
            .observe(end.cost.as_usd_f64());
        if end.breached {
            metrics
                .budget_breach
                .get_or_create(&ReleaseLabel { release })
                .inc();
        }
        if end.evicted {
            metrics.runs_evicted.inc();
        }
        tracing::info!(
            target: "tollgate::run",
            run_id = %end.run_id,
            release = %end.release,
            request_type = %end.request_type,
            status,
            stop_reason = %end.stop_reason,
            cost_usd = %end.cost,
            ceiling_usd = %end.ceiling,
            breached = end.breached,
            calls = end.calls,
            "run ended"
        );
    })
}
