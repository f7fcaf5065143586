//! Memory of tracked runs: admits and settles one call on each of N distinct
//! runs (default 100 000) and prints the resident set size before and after,
//! read from /proc/self/status. Run with `cargo bench --bench runs_memory`
//! (optionally `-- 200000` for another count).

use std::sync::Arc;

use tollgate::budget::{
    BudgetConfig, BudgetPolicy, Budgets, CallRequest, CostKind, RunsConfig, SystemClock,
};
use tollgate::money::Money;

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let policy = match BudgetPolicy::from_config(&BudgetConfig::default()) {
        Ok(p) => p,
        Err(e) => panic!("default budget config is valid: {e:?}"),
    };
    let runs_config = RunsConfig {
        max_tracked_runs: runs * 2,
        ..RunsConfig::default()
    };
    let budgets = Budgets::new(policy, runs_config, Arc::new(SystemClock), Arc::new(|_| {}));
    let before = rss_kib().unwrap_or(0);
    let reservation = Money::parse_usd("0.001").unwrap_or(Money::ZERO);
    for i in 0..runs {
        let id = format!("run-{i:08}-0123456789abcdef0123");
        let call = CallRequest {
            run_id: Some(&id),
            release: "2026-11-15",
            request_type: "default",
            model: Some("gpt-4.1-mini"),
            tool: None,
            route: "openai",
            budget_header: None,
            reservation,
            sdk_retry_count: None,
            body_hash: Some(i as u64),
        };
        if let Ok(admission) = budgets.admit(&call) {
            admission.settle(reservation, CostKind::Llm, false, None);
        }
    }
    let after = rss_kib().unwrap_or(0);
    assert_eq!(budgets.active_runs(), runs);
    let delta = after.saturating_sub(before);
    println!(
        "runs tracked: {runs}; RSS before {before} KiB, after {after} KiB; +{delta} KiB = {:.0} bytes per run",
        delta as f64 * 1024.0 / runs as f64
    );
}
