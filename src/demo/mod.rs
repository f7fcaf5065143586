//! `tollgate demo`: tollgate in front of a simulated provider and paid
//! tools, driven by a simulated agent fleet, with no API key and no network.
//!
//! Flow of [`run`]:
//!
//! 1. Start the simulation server ([`provider`]) on 127.0.0.1:0.
//! 2. Write the shipped price list (embedded in the binary) to a fresh temp
//!    directory, since price tables load from files, and build the config in
//!    code: routes `/openai` and `/anthropic` to the simulation,
//!    `/tools/search` (`web_search`, fixed price per call) and
//!    `/tools/research` (`deep_research`, priced by its `x-request-cost`
//!    header), small run ceilings so budgets fire, segment thresholds the
//!    regressed release crosses, a short idle timeout, the ledger in the
//!    temp directory.
//! 3. Bind the two listeners (a taken port falls back to an ephemeral one)
//!    and serve tollgate in-process, exactly as `tollgate serve` does.
//! 4. Start the runaway run ([`fleet::Fleet::runaway`]), then drive the
//!    first batch: `runs` planned runs of two releases, a few at a time
//!    ([`fleet`]).
//! 5. Flush the ledger, so every URL printed answers with the whole batch,
//!    print the summary (URLs, runs and cost per run by release, budget
//!    refusals, SDK base URLs) and hand it to `options.ready`.
//! 6. Keep a slow trickle of new runs going until `shutdown` resolves, then
//!    stop the fleet, drain tollgate, stop the simulation and clean up.

pub mod fleet;
pub mod provider;
pub mod rng;

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::{Listeners, Tollgate};
use fleet::{Fleet, RunOutcome, BASELINE, REGRESSED, RELEASES};
use provider::SimProvider;

/// The shipped price list, so the demo prices exactly as a deployment does.
const PRICING_TOML: &str = include_str!("../../config/pricing.toml");

/// Per-run ceiling for runs without a rule.
pub const DEFAULT_RUN_USD: f64 = 0.05;
/// Per-run ceiling of `research` runs (a `[[budget.rules]]` entry).
pub const RESEARCH_RUN_USD: f64 = 0.25;
/// Runs with no call for this long are ended by tollgate.
pub const IDLE_TIMEOUT_SECS: u64 = 10;
/// Pace of the runaway run's steps; well under the idle timeout.
const RUNAWAY_INTERVAL: Duration = Duration::from_secs(2);
/// Pace of new runs after the first batch.
const TRICKLE_INTERVAL: Duration = Duration::from_secs(3);

/// What `tollgate demo` runs with.
pub struct DemoOptions {
    pub agent_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Runs in the first batch.
    pub runs: usize,
    /// Divides every simulated latency (2.0 = twice as fast).
    pub speed: f64,
    /// Runs of the first batch in flight at once.
    pub concurrency: usize,
    /// Receives the summary once the first batch has ended.
    pub ready: Option<oneshot::Sender<DemoSummary>>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            agent_listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9787)),
            runs: 40,
            speed: 1.0,
            concurrency: 8,
            ready: None,
        }
    }
}

/// Cost and outcome of one release's runs in the first batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseStats {
    pub release: &'static str,
    pub runs: usize,
    pub ok: usize,
    pub error: usize,
    /// Runs that had a call refused with 402.
    pub refused: usize,
    /// SDK retries after provider errors.
    pub retries: u32,
    pub mean_cost_usd: f64,
    /// Nearest-rank 95th percentile of run cost.
    pub p95_cost_usd: f64,
    pub max_cost_usd: f64,
}

/// What the demo printed after the first batch.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    pub agent: SocketAddr,
    pub admin: SocketAddr,
    pub releases: Vec<ReleaseStats>,
    /// The still-running runaway: id and spend when the summary was made.
    pub runaway: Option<(String, f64)>,
    /// The costliest run of the batch.
    pub costliest: Option<RunOutcome>,
    /// The printed text.
    pub text: String,
}

/// What happened, returned when the demo stops.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub agent: SocketAddr,
    pub admin: SocketAddr,
    /// Outcomes of the first batch (empty when stopped before it ended).
    pub batch: Vec<RunOutcome>,
    pub summary: Option<DemoSummary>,
    /// Runs started by the background trickle.
    pub trickle_runs: usize,
}

/// Runs the demo until `shutdown` resolves. Errors are one line naming the
/// cause (a listener that cannot be bound, an unwritable temp dir).
pub async fn run(
    options: DemoOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<DemoReport, String> {
    if !(options.speed.is_finite() && options.speed > 0.0) {
        return Err(format!(
            "--speed must be a positive number, not {}",
            options.speed
        ));
    }
    let sim = SimProvider::start(options.speed)
        .await
        .map_err(|e| format!("cannot start the simulated provider: {e}"))?;
    let workdir = TempDir::create()?;
    let result = serve(options, shutdown, &sim, &workdir).await;
    sim.stop().await;
    drop(workdir);
    result
}

async fn serve(
    mut options: DemoOptions,
    shutdown: impl Future<Output = ()>,
    sim: &SimProvider,
    workdir: &TempDir,
) -> Result<DemoReport, String> {
    let mut notes = Vec::new();
    let agent = bind(options.agent_listen, "--agent-listen", &mut notes).await?;
    let admin = bind(options.admin_listen, "--admin-listen", &mut notes).await?;
    let agent_addr = agent
        .local_addr()
        .map_err(|e| format!("agent listener: {e}"))?;
    let admin_addr = admin
        .local_addr()
        .map_err(|e| format!("admin listener: {e}"))?;

    let config = demo_config(workdir, &sim.url(), agent_addr, admin_addr)?;
    let tollgate = Tollgate::new(config, None).map_err(|e| format!("demo config: {e}"))?;
    let state = tollgate.state().clone();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(tollgate.run(Listeners { agent, admin }, async move {
        let _ = stop_rx.await;
    }));

    let fleet = Fleet::new(
        format!("http://{agent_addr}"),
        format!("http://{admin_addr}"),
        options.speed,
    );
    println!(
        "tollgate demo: simulated provider, paid tools and agent fleet (no API key, no network)\n\
         driving {} runs over releases {BASELINE} and {REGRESSED}, {} at a time...",
        options.runs,
        options.concurrency.max(1)
    );
    for note in &notes {
        println!("note: {note}");
    }

    let runaway = {
        let fleet = fleet.clone();
        tokio::spawn(async move { fleet.runaway(RUNAWAY_INTERVAL).await })
    };
    tokio::pin!(shutdown);
    let batch = tokio::select! {
        outcomes = first_batch(&fleet, options.runs, options.concurrency) => Some(outcomes),
        () = &mut shutdown => None,
    };

    let mut report = DemoReport {
        agent: agent_addr,
        admin: admin_addr,
        batch: Vec::new(),
        summary: None,
        trickle_runs: 0,
    };
    if let Some(outcomes) = batch {
        if let Some(ledger) = state.ledger.clone() {
            // Run ends and calls are queued to the ledger's writer; commit
            // them so the printed URLs show the whole batch at once.
            let _ = tokio::task::spawn_blocking(move || ledger.flush()).await;
        }
        let runaway_spent = runaway_spend(&fleet).await;
        let summary = summarize(agent_addr, admin_addr, &outcomes, runaway_spent);
        print!("{}", summary.text);
        if let Some(ready) = options.ready.take() {
            let _ = ready.send(summary.clone());
        }
        report.batch = outcomes;
        report.summary = Some(summary);

        let started = Arc::new(AtomicUsize::new(0));
        let trickle = {
            let (fleet, started) = (fleet.clone(), started.clone());
            let first = report.batch.len() as u64;
            tokio::spawn(async move { trickle(fleet, first, started).await })
        };
        shutdown.await;
        trickle.abort();
        let _ = trickle.await;
        report.trickle_runs = started.load(Ordering::Relaxed);
    } else {
        println!("stopped before the first batch finished");
    }
    runaway.abort();
    let _ = runaway.await;
    println!("stopping: draining in-flight calls");
    let _ = stop_tx.send(());
    let _ = server.await;
    Ok(report)
}

/// Binds `addr`; when its port is taken, an ephemeral port on the same
/// address instead (noted, since the printed URLs then differ).
async fn bind(
    addr: SocketAddr,
    flag: &str,
    notes: &mut Vec<String>,
) -> Result<TcpListener, String> {
    match TcpListener::bind(addr).await {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && addr.port() != 0 => {
            let fallback = SocketAddr::new(addr.ip(), 0);
            let listener = TcpListener::bind(fallback)
                .await
                .map_err(|e| format!("cannot listen on {fallback} ({flag}): {e}"))?;
            if let Ok(local) = listener.local_addr() {
                notes.push(format!("{addr} is in use; {flag} falls back to {local}"));
            }
            Ok(listener)
        }
        Err(e) => Err(format!("cannot listen on {addr} ({flag}): {e}")),
    }
}

/// The demo's tollgate config, built in code around the simulation's URL.
fn demo_config(
    workdir: &TempDir,
    sim_url: &str,
    agent: SocketAddr,
    admin: SocketAddr,
) -> Result<Config, String> {
    let pricing = workdir.path.join("pricing.toml");
    std::fs::write(&pricing, PRICING_TOML)
        .map_err(|e| format!("cannot write {}: {e}", pricing.display()))?;
    let ledger = workdir.path.join("tollgate-demo.db");
    // Paths go through TOML's own quoting (Windows backslashes, quotes).
    let quoted = |path: &std::path::Path| {
        toml::Value::String(path.to_string_lossy().into_owned()).to_string()
    };
    let text = format!(
        r#"
[server]
listen = "{agent}"

[admin]
listen = "{admin}"

[[routes]]
name = "openai"
prefix = "/openai"
upstream = "{sim_url}"
kind = "openai"

[[routes]]
name = "anthropic"
prefix = "/anthropic"
upstream = "{sim_url}"
kind = "anthropic"

[[routes]]
name = "web_search"
prefix = "/tools/search"
upstream = "{sim_url}/search"
kind = "tool"
tool = "web_search"
cost_per_call_usd = 0.005

[[routes]]
name = "deep_research"
prefix = "/tools/research"
upstream = "{sim_url}/research"
kind = "tool"
tool = "deep_research"
cost_header = "{cost_header}"

[pricing]
files = [{pricing}]
unknown_model = "zero"

[budget]
default_run_usd = {DEFAULT_RUN_USD}
max_run_usd = 2.0
mode = "reserve"

[[budget.rules]]
request_type = "research"
run_usd = {RESEARCH_RUN_USD}

[runs]
idle_timeout_secs = {IDLE_TIMEOUT_SECS}

[segments]
cost_per_run_warning_usd = 0.05
cost_per_run_critical_usd = 0.1
cost_p95_warning_usd = 0.1
cost_p95_critical_usd = 0.25

[ledger]
path = {ledger}

[limits]
shutdown_drain_ms = 3000
"#,
        cost_header = provider::COST_HEADER,
        pricing = quoted(&pricing),
        ledger = quoted(&ledger),
    );
    Config::from_toml(&text, "demo config", workdir.path.clone())
        .map_err(|e| format!("demo config: {e}"))
}

/// Runs plans `0..runs`, `concurrency` at a time, to their end.
async fn first_batch(fleet: &Fleet, runs: usize, concurrency: usize) -> Vec<RunOutcome> {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for index in 0..runs as u64 {
        let (fleet, permits) = (fleet.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.ok();
            fleet.run(&fleet::plan(index), false).await
        });
    }
    let mut outcomes = Vec::with_capacity(runs);
    while let Some(joined) = tasks.join_next().await {
        if let Ok(outcome) = joined {
            outcomes.push(outcome);
        }
    }
    outcomes.sort_by(|a, b| a.run_id.cmp(&b.run_id));
    outcomes
}

/// A new run every few seconds until aborted. Refused runs are abandoned,
/// as a crashed agent would leave them, so tollgate's idle timeout ends them.
async fn trickle(fleet: Fleet, first_index: u64, started: Arc<AtomicUsize>) {
    let mut tasks = JoinSet::new();
    let mut index = first_index;
    loop {
        tokio::time::sleep(TRICKLE_INTERVAL).await;
        let fleet = fleet.clone();
        let plan = fleet::plan(index);
        tasks.spawn(async move { fleet.run(&plan, true).await });
        started.fetch_add(1, Ordering::Relaxed);
        index += 1;
        while tasks.try_join_next().is_some() {}
    }
}

async fn runaway_spend(fleet: &Fleet) -> Option<(String, f64)> {
    let id = fleet::runaway_plan(0).run_id;
    let spent = fleet.run_spent(&id).await?;
    Some((id, spent))
}

fn stats(release: &'static str, outcomes: &[RunOutcome]) -> ReleaseStats {
    let runs: Vec<&RunOutcome> = outcomes.iter().filter(|o| o.release == release).collect();
    let mut costs: Vec<f64> = runs.iter().map(|o| o.cost_usd).collect();
    costs.sort_by(f64::total_cmp);
    let n = costs.len();
    let p95 = if n == 0 {
        0.0
    } else {
        costs[(n * 95).div_ceil(100).clamp(1, n) - 1]
    };
    ReleaseStats {
        release,
        runs: n,
        ok: runs.iter().filter(|o| o.status == "ok").count(),
        error: runs.iter().filter(|o| o.status == "error").count(),
        refused: runs.iter().filter(|o| o.refused).count(),
        retries: runs.iter().map(|o| o.retries).sum(),
        mean_cost_usd: if n == 0 {
            0.0
        } else {
            costs.iter().sum::<f64>() / n as f64
        },
        p95_cost_usd: p95,
        max_cost_usd: costs.last().copied().unwrap_or(0.0),
    }
}

fn summarize(
    agent: SocketAddr,
    admin: SocketAddr,
    outcomes: &[RunOutcome],
    runaway: Option<(String, f64)>,
) -> DemoSummary {
    let releases: Vec<ReleaseStats> = RELEASES.iter().map(|r| stats(r, outcomes)).collect();
    let costliest = outcomes
        .iter()
        .max_by(|a, b| a.cost_usd.total_cmp(&b.cost_usd))
        .cloned();
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nFirst batch: {} runs ended (run ceiling ${DEFAULT_RUN_USD:.2}, research runs ${RESEARCH_RUN_USD:.2}).\n",
        outcomes.len()
    );
    let _ = writeln!(
        t,
        "  release      runs    ok  error  refused(402)  retries   cost/run        p95        max"
    );
    for s in &releases {
        let _ = writeln!(
            t,
            "  {:<11} {:>5} {:>5} {:>6} {:>13} {:>8}  {:>9} {:>10} {:>10}",
            s.release,
            s.runs,
            s.ok,
            s.error,
            s.refused,
            s.retries,
            format!("${:.4}", s.mean_cost_usd),
            format!("${:.4}", s.p95_cost_usd),
            format!("${:.4}", s.max_cost_usd),
        );
    }
    if let [base, head] = releases.as_slice() {
        if base.mean_cost_usd > 0.0 && head.runs > 0 {
            let _ = writeln!(
                t,
                "\n  {} costs {:.1}x per run of {}: reasoning and thinking tokens, provider \
                 retries, deep_research calls and a longer prompt.",
                head.release,
                head.mean_cost_usd / base.mean_cost_usd,
                base.release
            );
        }
    }
    if let Some(c) = &costliest {
        let _ = writeln!(
            t,
            "  Costliest finished run: {} (${:.4}, {} / {}).",
            c.run_id, c.cost_usd, c.status, c.stop_reason
        );
    }
    let _ = writeln!(t, "\nOpen:");
    let _ = writeln!(
        t,
        "  http://{admin}/ui\n      the dashboard: segments, burn rate, cost per run and p95 per \
         release, top runs, a run's call timeline"
    );
    let _ = writeln!(
        t,
        "  http://{admin}/metrics\n      Prometheus metrics: agent_run_cost_usd, agent_llm_cost_usd_total, \
         agent_tool_cost_usd_total, agent_budget_rejections_total, agent_retries_total, ..."
    );
    let _ = writeln!(
        t,
        "  http://{admin}/api/compare?base={BASELINE}&head={REGRESSED}\n      the release-to-release \
         diff and the regression it matches"
    );
    let _ = writeln!(
        t,
        "  http://{admin}/api/segments?by=release,request_type\n      cost per run, p95 and burn \
         rate per segment, against the demo's thresholds"
    );
    if let Some(c) = &costliest {
        let _ = writeln!(
            t,
            "  http://{admin}/api/runs/{}\n      the costliest finished run and its calls in order",
            c.run_id
        );
    }
    if let Some((id, spent)) = &runaway {
        let _ = writeln!(
            t,
            "  http://{admin}/api/runs/{id}\n      a runaway run, still going: ${spent:.4} of its \
             ${:.2} ceiling so far; tollgate refuses it once the next call would pass it",
            fleet::RUNAWAY_BUDGET_USD
        );
    }
    let _ = writeln!(
        t,
        "\nPoint an agent at it (any API key works; the provider is simulated):\n\
         \x20 OpenAI SDK     base_url = http://{agent}/openai/v1\n\
         \x20 Anthropic SDK  base_url = http://{agent}/anthropic\n\
         \x20 tools          http://{agent}/tools/search   http://{agent}/tools/research\n\
         \x20 attribution    x-agent-run-id, x-agent-release, x-agent-request-type; \
         x-agent-run-status: completed ends a run\n\n\
         \x20 curl -s http://{agent}/openai/v1/chat/completions -H 'content-type: application/json' \\\n\
         \x20   -H 'x-agent-run-id: my-first-run' -H 'x-agent-release: local' \\\n\
         \x20   -d '{{\"model\":\"gpt-4.1-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'\n\
         \x20 curl -s http://{admin}/metrics | grep -E '^agent_(run_cost_usd_(sum|count)|budget_rejections_total|retries_total)'\n\n\
         A slow trickle of runs keeps going. Ctrl-C to stop."
    );
    DemoSummary {
        agent,
        admin,
        releases,
        runaway,
        costliest,
        text: t,
    }
}

/// A directory under the system temp dir, removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn create() -> Result<TempDir, String> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "tollgate-demo-{}-{nanos:x}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(release: &'static str, cost: f64, refused: bool) -> RunOutcome {
        RunOutcome {
            run_id: format!("r-{cost}"),
            release,
            request_type: "support",
            status: if refused { "error" } else { "ok" },
            stop_reason: if refused {
                "budget_exceeded"
            } else {
                "completed"
            },
            cost_usd: cost,
            calls: 3,
            refused,
            retries: 0,
            abandoned: false,
        }
    }

    #[test]
    fn stats_per_release() {
        let outcomes = vec![
            outcome(BASELINE, 0.01, false),
            outcome(BASELINE, 0.03, false),
            outcome(REGRESSED, 0.10, true),
        ];
        let base = stats(BASELINE, &outcomes);
        assert_eq!((base.runs, base.ok, base.refused), (2, 2, 0));
        assert!((base.mean_cost_usd - 0.02).abs() < 1e-12);
        assert_eq!(base.p95_cost_usd, 0.03);
        let head = stats(REGRESSED, &outcomes);
        assert_eq!((head.runs, head.error, head.refused), (1, 1, 1));
    }

    #[test]
    fn the_embedded_price_list_loads() {
        let dir = TempDir::create().expect("temp dir");
        let config = demo_config(
            &dir,
            "http://127.0.0.1:9",
            SocketAddr::from(([127, 0, 0, 1], 0)),
            SocketAddr::from(([127, 0, 0, 1], 0)),
        )
        .expect("valid demo config");
        let prices = crate::pricing::PriceTable::load(&config.raw.pricing, &config.base_dir)
            .expect("prices load");
        for model in [
            "gpt-4.1-mini-2025-04-14",
            "gpt-5-2025-08-07",
            "gpt-5-mini-2025-08-07",
            "claude-sonnet-4-5-20250929",
            "claude-haiku-4-5-20251001",
        ] {
            assert!(prices.lookup(model).is_some(), "{model} has a price");
        }
    }
}
