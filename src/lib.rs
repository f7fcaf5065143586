//! # tollgate
//!
//! A metering reverse proxy for AI agents: it forwards LLM and paid-tool
//! calls unchanged and streaming, reads the usage each provider reports,
//! prices it exactly, attributes it to a run and a release, refuses calls of
//! a run that spent its budget, and exports the cost layer as metrics.
//!
//! # Layout
//!
//! - [`config`]: `tollgate.toml` → validated [`config::Config`].
//! - [`server`]: the accept loop shared by both listeners.
//! - [`proxy`]: one agent call, from target checks to the metered response
//!   body ([`proxy::body::MeteredBody`]) and its settlement.
//! - [`usage`]: reading usage out of JSON, SSE and NDJSON bodies.
//! - [`pricing`]: price tables and the cost formula.
//! - [`budget`]: runs, ceilings, reservations, window caps.
//! - [`state_backend`]: run and window spend shared by replicas (Redis).
//! - [`ledger`]: one record per call and per ended run, in an embedded
//!   SQLite file or a PostgreSQL database shared by replicas; the
//!   investigation API's queries ([`ledger::query`]).
//! - [`metrics`]: the Prometheus registry.
//! - [`admin`]: `/metrics`, health, `/api`.
//! - [`money`]: exact amounts (integer pico-dollars).
//! - [`ui`]: the `/ui` dashboard (embedded static page over the `/api`).
//!
//! [`Tollgate::run`] takes bound listeners and a shutdown future, so tests
//! run it in-process on port 0.

pub mod admin;
pub mod api;
pub mod budget;
pub mod config;
pub mod demo;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod money;
pub mod pricing;
pub mod proxy;
pub mod server;
pub mod state;
pub mod state_backend;
pub mod ui;
pub mod usage;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::budget::{Clock, SystemClock};
use crate::config::Config;
pub use crate::state::{AppState, StartError};

/// The two bound listeners of an instance.
pub struct Listeners {
    pub agent: TcpListener,
    pub admin: TcpListener,
}

/// One tollgate instance.
pub struct Tollgate {
    state: Arc<AppState>,
}

impl Tollgate {
    /// Builds an instance from a validated config (loads prices, sets up
    /// budgets and metrics). `config_path` enables reloads.
    pub fn new(config: Config, config_path: Option<PathBuf>) -> Result<Tollgate, StartError> {
        Tollgate::with_clock(config, config_path, Arc::new(SystemClock))
    }

    /// As [`Tollgate::new`], with the clock budgets and runs use.
    pub fn with_clock(
        config: Config,
        config_path: Option<PathBuf>,
        clock: Arc<dyn Clock>,
    ) -> Result<Tollgate, StartError> {
        Ok(Tollgate {
            state: AppState::new(config, config_path, clock)?,
        })
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves both listeners until `shutdown` resolves, then stops accepting
    /// and lets in-flight calls finish up to `limits.shutdown_drain_ms`.
    pub async fn run(self, listeners: Listeners, shutdown: impl Future<Output = ()> + Send) {
        let state = self.state;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        // Read at each accept: a reload's limits apply to new connections.
        let limits = |state: &Arc<AppState>| {
            let state = state.clone();
            move || state.config.load().raw.limits.clone()
        };

        let workers = match server::Workers::start(state.workers()) {
            Ok(workers) => Some(Arc::new(workers)),
            Err(error) => {
                tracing::warn!(message = "cannot start the worker threads; serving agent connections on the main runtime", %error);
                None
            }
        };
        let agent_state = state.clone();
        let agent = tokio::spawn(server::serve_tls(
            listeners.agent,
            state.config.load().server_tls.clone(),
            workers.clone(),
            limits(&state),
            move |request| proxy::handle(agent_state.clone(), request),
            stopped(stop_rx.clone()),
        ));
        let admin_state = state.clone();
        let admin = tokio::spawn(server::serve(
            listeners.admin,
            limits(&state),
            move |request| admin::handle(admin_state.clone(), request),
            stopped(stop_rx.clone()),
        ));
        let shared_workers = match &state.shared {
            Some(shared) => {
                shared.check_reachable().await;
                shared.spawn_workers(stop_rx.clone())
            }
            None => Vec::new(),
        };
        let sweeper_state = state.clone();
        let sweeper = tokio::spawn(async move {
            let mut rx = stop_rx;
            loop {
                let idle_secs = sweeper_state.config.load().raw.runs.idle_timeout_secs;
                let period = Duration::from_secs((idle_secs / 4).clamp(1, 15));
                tokio::select! {
                    () = tokio::time::sleep(period) => { sweeper_state.budgets.sweep_idle(); }
                    _ = rx.wait_for(|stop| *stop) => break,
                }
                if let Some(shared) = &sweeper_state.shared {
                    // Every replica sweeps; each idle run is claimed once.
                    let _ = shared.sweep(idle_secs.saturating_mul(1000)).await;
                }
            }
        });

        shutdown.await;
        tracing::info!(message = "shutting down: no new connections, draining in-flight calls");
        let _ = stop_tx.send(true);
        let _ = tokio::join!(agent, admin, sweeper);
        // The agent loop has drained and dropped its share of the workers.
        if let Some(workers) = workers.and_then(Arc::into_inner) {
            let _ = tokio::task::spawn_blocking(move || workers.stop()).await;
        }
        for worker in shared_workers {
            let _ = worker.await;
        }
        if let Some(ledger) = &state.ledger {
            // Commit every record of the calls that just drained.
            let ledger = ledger.clone();
            let _ = tokio::task::spawn_blocking(move || ledger.close()).await;
        }
    }
}
