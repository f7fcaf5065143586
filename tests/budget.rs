//! Budgets and runs through the public API.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use tollgate::budget::{
    unix_ms, BudgetConfig, BudgetMode, BudgetPolicy, BudgetRule, Budgets, CallRequest, CostKind,
    ManualClock, RefusalScope, RestoredRun, RunEnd, RunStatus, RunsConfig, WindowCap, WindowPeriod,
};
use tollgate::money::Money;

fn m(usd: &str) -> Money {
    Money::parse_usd(usd).expect("test amount")
}

struct Harness {
    budgets: Arc<Budgets>,
    clock: Arc<ManualClock>,
    ends: Arc<Mutex<Vec<RunEnd>>>,
}

impl Harness {
    fn new(config: BudgetConfig, runs: RunsConfig) -> Harness {
        Harness::at(config, runs, unix_ms(2026, 3, 21, 12, 0, 0))
    }

    fn at(config: BudgetConfig, runs: RunsConfig, start_ms: u64) -> Harness {
        let policy = BudgetPolicy::from_config(&config).expect("valid test config");
        let clock = Arc::new(ManualClock::new(start_ms));
        let ends = Arc::new(Mutex::new(Vec::new()));
        let sink_ends = Arc::clone(&ends);
        let budgets = Budgets::new(
            policy,
            runs,
            clock.clone(),
            Arc::new(move |end| sink_ends.lock().expect("sink").push(end)),
        );
        Harness {
            budgets: Arc::new(budgets),
            clock,
            ends,
        }
    }

    fn ends(&self) -> Vec<RunEnd> {
        self.ends.lock().expect("ends").clone()
    }
}

fn call<'a>(run_id: Option<&'a str>, reservation: Money) -> CallRequest<'a> {
    CallRequest {
        run_id,
        release: "v1",
        request_type: "default",
        model: Some("gpt-4.1"),
        tool: None,
        route: "openai",
        budget_header: None,
        reservation,
        sdk_retry_count: None,
        body_hash: None,
    }
}

fn with_default(usd: f64) -> BudgetConfig {
    BudgetConfig {
        default_run_usd: usd,
        ..BudgetConfig::default()
    }
}

/// Runs `threads` threads that each try to admit one call on run `r`; every
/// admitted call settles only after all threads have tried, at `cost`.
fn admit_all_then_settle(h: &Harness, threads: usize, reservation: Money, cost: Money) -> usize {
    let start = Arc::new(Barrier::new(threads));
    let tried = Arc::new(Barrier::new(threads));
    let admitted = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (b, start, tried, admitted) = (
                Arc::clone(&h.budgets),
                Arc::clone(&start),
                Arc::clone(&tried),
                Arc::clone(&admitted),
            );
            thread::spawn(move || {
                start.wait();
                let result = b.admit(&call(Some("r"), reservation));
                if result.is_ok() {
                    admitted.fetch_add(1, Ordering::SeqCst);
                }
                tried.wait();
                if let Ok(adm) = result {
                    adm.settle(cost, CostKind::Llm, false, None);
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().expect("thread");
    }
    admitted.load(Ordering::SeqCst)
}

#[test]
fn reserve_mode_admits_exactly_what_the_ceiling_pays_under_contention() {
    for _ in 0..20 {
        let h = Harness::new(with_default(0.05), RunsConfig::default());
        let r = m("0.01"); // ceiling pays exactly 5 reservations
        let admitted = admit_all_then_settle(&h, 50, r, r);
        assert_eq!(admitted, 5);
        let snap = h.budgets.run_snapshot("r").expect("run");
        assert_eq!(snap.spent, m("0.05"));
        assert_eq!(snap.reserved, Money::ZERO);
        assert_eq!(snap.calls, 5);
        assert_eq!(snap.refusals, 45);
        assert_eq!(h.budgets.totals().reserved_outstanding, Money::ZERO);
        assert_eq!(h.budgets.totals().settled, m("0.05"));
    }
}

#[test]
fn reserve_mode_overshoot_is_one_calls_estimation_error() {
    // 50 threads admit and settle in a loop until refused, on a ceiling of
    // 20 reservations. Every call costs at most its reservation except one
    // that costs 0.004 more: the run may pass its ceiling by that one error
    // and no more.
    let h = Harness::new(with_default(0.2), RunsConfig::default());
    let r = m("0.01");
    let error = m("0.004");
    let calls = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(50));
    let handles: Vec<_> = (0..50)
        .map(|t| {
            let (b, calls, start) = (
                Arc::clone(&h.budgets),
                Arc::clone(&calls),
                Arc::clone(&start),
            );
            thread::spawn(move || {
                start.wait();
                let mut i = 0u64;
                while let Ok(adm) = b.admit(&call(Some("r"), r)) {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    let cost = if n == 3 {
                        r.saturating_add(error)
                    } else {
                        // 40–100 % of the reservation
                        Money::from_picos(r.picos() * (4 + (t + i) % 7) / 10)
                    };
                    i += 1;
                    adm.settle(cost, CostKind::Llm, false, None);
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().expect("thread");
    }
    let spent = h.budgets.run_snapshot("r").expect("run").spent;
    let ceiling = m("0.2");
    let calls = calls.load(Ordering::SeqCst);
    println!("{calls} calls settled, spent {spent} of ceiling {ceiling}");
    // 20 reservations fit at once; settling below the reservation frees room
    assert!(calls > 20, "settled calls free room for more ({calls})");
    assert!(
        spent <= ceiling.saturating_add(error),
        "spent {spent} > ceiling {ceiling} + {error}"
    );
}

#[test]
fn reserve_mode_overshoot_when_every_call_underestimates() {
    // All five calls in flight cost 20 % more than reserved: the overshoot is
    // the sum of the in-flight calls' errors (5 × 0.002), the documented bound.
    let h = Harness::new(with_default(0.05), RunsConfig::default());
    let admitted = admit_all_then_settle(&h, 50, m("0.01"), m("0.012"));
    assert_eq!(admitted, 5);
    let spent = h.budgets.run_snapshot("r").expect("run").spent;
    assert_eq!(spent, m("0.06"));
    assert!(h.budgets.admit(&call(Some("r"), m("0.000001"))).is_err());
}

#[test]
fn soft_mode_overshoot_is_bounded_by_calls_in_flight() {
    // Soft mode refuses only once spent ≥ ceiling, so all 50 calls admitted
    // before any settles go through: spend ends at 50 × 0.01 = 0.50 against a
    // 0.05 ceiling (overshoot = in-flight calls' cost − ceiling = 0.45).
    let config = BudgetConfig {
        mode: BudgetMode::Soft,
        ..with_default(0.05)
    };
    let h = Harness::new(config, RunsConfig::default());
    let admitted = admit_all_then_settle(&h, 50, m("0.01"), m("0.01"));
    assert_eq!(admitted, 50);
    assert_eq!(h.budgets.run_snapshot("r").expect("run").spent, m("0.5"));
    let refusal = h
        .budgets
        .admit(&call(Some("r"), m("0.01")))
        .expect_err("over");
    assert_eq!(refusal.scope, RefusalScope::Run);
    assert_eq!(refusal.spent, m("0.5"));
    assert_eq!(refusal.ceiling, m("0.05"));
}

#[test]
fn soft_mode_admits_until_spent_reaches_ceiling() {
    let config = BudgetConfig {
        mode: BudgetMode::Soft,
        ..with_default(0.05)
    };
    let h = Harness::new(config, RunsConfig::default());
    // A reservation larger than the whole ceiling is no reason to refuse.
    let a = h.budgets.admit(&call(Some("r"), m("1"))).expect("soft");
    a.settle(m("0.049"), CostKind::Llm, false, None);
    let a = h
        .budgets
        .admit(&call(Some("r"), m("1")))
        .expect("still below");
    a.settle(m("0.001"), CostKind::Llm, false, None);
    assert!(h.budgets.admit(&call(Some("r"), m("0"))).is_err());
}

#[test]
fn ceiling_resolution_header_rules_default() {
    let config = BudgetConfig {
        default_run_usd: 0.25,
        max_run_usd: 2.0,
        rules: vec![
            BudgetRule {
                release: Some("v2".into()),
                request_type: Some("research".into()),
                model: None,
                run_usd: 3.0,
            },
            BudgetRule {
                release: None,
                request_type: Some("research".into()),
                model: None,
                run_usd: 1.0,
            },
            BudgetRule {
                release: None,
                request_type: None,
                model: Some("o3".into()),
                run_usd: 0.5,
            },
        ],
        ..BudgetConfig::default()
    };
    let h = Harness::new(config, RunsConfig::default());
    let ceiling = |id: &str, release: &str, rt: &str, model: &str, header: Option<&str>| {
        let mut c = call(Some(id), Money::ZERO);
        c.release = release;
        c.request_type = rt;
        c.model = Some(model);
        c.budget_header = header.map(m);
        let a = h.budgets.admit(&c).expect("admit");
        let got = a.ceiling();
        a.settle(Money::ZERO, CostKind::Llm, false, None);
        got.expect("run")
    };
    assert_eq!(ceiling("a", "v1", "default", "gpt-4.1", None), m("0.25"));
    assert_eq!(ceiling("b", "v1", "research", "gpt-4.1", None), m("1"));
    // first match wins, and a rule is not clamped by max_run (only headers are)
    assert_eq!(ceiling("c", "v2", "research", "o3", None), m("3"));
    assert_eq!(ceiling("d", "v1", "default", "o3", None), m("0.5"));
    assert_eq!(ceiling("e", "v1", "research", "o3", Some("0.1")), m("0.1"));
    assert_eq!(ceiling("f", "v1", "default", "gpt-4.1", Some("10")), m("2"));
    // fixed at run start: a later call without header keeps it, even if its
    // segment would match a rule
    assert_eq!(ceiling("a", "v1", "research", "gpt-4.1", None), m("0.25"));
    // a later header changes it, clamped
    assert_eq!(
        ceiling("a", "v1", "default", "gpt-4.1", Some("0.75")),
        m("0.75")
    );
    assert_eq!(ceiling("a", "v1", "default", "gpt-4.1", Some("9")), m("2"));
    assert_eq!(ceiling("a", "v1", "default", "gpt-4.1", None), m("2"));
    // no run id: no ceiling
    let a = h.budgets.admit(&call(None, m("100"))).expect("no run");
    assert_eq!(a.ceiling(), None);
    assert_eq!(a.remaining(), None);
    a.settle(m("0.01"), CostKind::Llm, false, None);
    assert_eq!(h.budgets.totals().settled, m("0.01"));
}

#[test]
fn remaining_and_headroom() {
    let h = Harness::new(with_default(1.0), RunsConfig::default());
    let c = call(Some("r"), m("0.2"));
    assert_eq!(h.budgets.headroom(&c), Some(m("1")));
    let a = h.budgets.admit(&c).expect("a");
    let b = h.budgets.admit(&c).expect("b");
    assert_eq!(a.remaining(), Some(m("0.8"))); // excludes its own reservation
    assert_eq!(h.budgets.headroom(&c), Some(m("0.6")));
    a.settle(m("0.1"), CostKind::Llm, false, None);
    assert_eq!(b.remaining(), Some(m("0.9")));
    assert_eq!(b.run_spent(), m("0.1"));
    assert!(b.over_budget(m("0.95")));
    assert!(!b.over_budget(m("0.9")));
    drop(b);
    assert_eq!(h.budgets.headroom(&call(None, Money::ZERO)), None);
}

#[test]
fn idle_sweep_ends_once_with_status_of_last_call() {
    let runs = RunsConfig {
        idle_timeout_secs: 300,
        ..RunsConfig::default()
    };
    let h = Harness::new(BudgetConfig::default(), runs);
    let t0 = h.clock.now_ms_for_test();
    h.budgets
        .admit(&call(Some("ok-run"), m("0.01")))
        .expect("a")
        .settle(m("0.01"), CostKind::Llm, false, None);
    h.budgets
        .admit(&call(Some("bad-run"), m("0.01")))
        .expect("b")
        .settle(m("0.002"), CostKind::Llm, true, None);
    let busy = h
        .budgets
        .admit(&call(Some("busy-run"), m("0.01")))
        .expect("c");

    h.clock.advance(299_999);
    assert_eq!(h.budgets.sweep_idle(), 0);
    h.clock.advance(1);
    assert_eq!(h.budgets.sweep_idle(), 2);
    assert_eq!(h.budgets.sweep_idle(), 0);
    let ends = h.ends();
    assert_eq!(ends.len(), 2);
    let ok = ends.iter().find(|e| e.run_id == "ok-run").expect("ok-run");
    assert_eq!(
        (ok.status, ok.stop_reason.as_str()),
        (RunStatus::Ok, "idle_timeout")
    );
    assert_eq!(ok.cost, m("0.01"));
    assert_eq!((ok.started_ms, ok.ended_ms), (t0, t0 + 300_000));
    let bad = ends
        .iter()
        .find(|e| e.run_id == "bad-run")
        .expect("bad-run");
    assert_eq!(bad.status, RunStatus::Error);
    assert!(!bad.evicted);
    // a run with a call in flight is never swept, however long it streams
    h.clock.advance(3_600_000);
    assert_eq!(h.budgets.sweep_idle(), 0);
    busy.settle(m("0.01"), CostKind::Llm, false, None);
    assert_eq!(h.budgets.sweep_idle(), 0); // settling is activity
    h.clock.advance(300_000);
    assert_eq!(h.budgets.sweep_idle(), 1);
    assert_eq!(h.budgets.active_runs(), 0);
    assert_eq!(h.budgets.totals().runs_ended, 3);
}

trait NowForTest {
    fn now_ms_for_test(&self) -> u64;
}

impl NowForTest for ManualClock {
    fn now_ms_for_test(&self) -> u64 {
        tollgate::budget::Clock::now_ms(self)
    }
}

#[test]
fn finish_is_exactly_once_under_races() {
    for round in 0..200 {
        let runs = RunsConfig {
            idle_timeout_secs: 1,
            ..RunsConfig::default()
        };
        let h = Harness::new(BudgetConfig::default(), runs);
        h.budgets
            .admit(&call(Some("r"), m("0.01")))
            .expect("a")
            .settle(m("0.01"), CostKind::Llm, false, None);
        h.clock.advance(1_000);
        let pending = h.budgets.admit(&call(Some("r"), m("0.01"))).expect("b");
        let barrier = Arc::new(Barrier::new(3));
        let wins = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..2 {
            let (b, barrier, wins) = (
                Arc::clone(&h.budgets),
                Arc::clone(&barrier),
                Arc::clone(&wins),
            );
            handles.push(thread::spawn(move || {
                barrier.wait();
                if b.finish_run("r", RunStatus::Ok, Some("max_steps")) {
                    wins.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        let (b, barrier2) = (Arc::clone(&h.budgets), Arc::clone(&barrier));
        handles.push(thread::spawn(move || {
            barrier2.wait();
            // a settle carrying the run status races the two finishers; the
            // sweep races all of them
            pending.settle(
                m("0.01"),
                CostKind::Llm,
                false,
                Some((RunStatus::Error, None)),
            );
            b.sweep_idle();
        }));
        for handle in handles {
            handle.join().expect("thread");
        }
        let ends = h.ends();
        assert_eq!(ends.len(), 1, "round {round}: {ends:?}");
        assert!(wins.load(Ordering::SeqCst) <= 1);
        assert_eq!(h.budgets.active_runs(), 0);
        assert!(!h.budgets.finish_run("r", RunStatus::Ok, None));
        // every settle reached the totals, whoever ended the run
        assert_eq!(h.budgets.totals().settled, m("0.02"));
    }
}

#[test]
fn run_end_reasons_and_breach() {
    let h = Harness::new(with_default(0.1), RunsConfig::default());
    // completed, no reason → completed
    h.budgets
        .admit(&call(Some("a"), m("0.05")))
        .expect("a")
        .settle(m("0.2"), CostKind::Llm, false, Some((RunStatus::Ok, None)));
    // error after a failed tool call → tool_error; explicit reason wins
    let mut tool = call(Some("b"), m("0.01"));
    tool.tool = Some("web_search");
    tool.model = None;
    tool.route = "web_search";
    h.budgets.admit(&tool).expect("b").settle(
        m("0.01"),
        CostKind::Tool,
        true,
        Some((RunStatus::Error, None)),
    );
    h.budgets
        .admit(&call(Some("c"), m("0.01")))
        .expect("c")
        .settle(
            m("0.01"),
            CostKind::Llm,
            false,
            Some((RunStatus::Error, Some("max_steps".into()))),
        );
    let ends = h.ends();
    assert_eq!(ends.len(), 3);
    assert_eq!(
        (ends[0].status, ends[0].stop_reason.as_str()),
        (RunStatus::Ok, "completed")
    );
    assert!(ends[0].breached);
    assert_eq!(ends[0].cost, m("0.2"));
    assert_eq!(ends[0].ceiling, m("0.1"));
    assert_eq!(ends[1].stop_reason, "tool_error");
    assert_eq!(
        (ends[1].tool_cost, ends[1].llm_cost),
        (m("0.01"), Money::ZERO)
    );
    assert!(!ends[1].breached);
    assert_eq!(
        (ends[2].status, ends[2].stop_reason.as_str()),
        (RunStatus::Error, "max_steps")
    );
    // the ended ids start new runs
    let again = h
        .budgets
        .admit(&call(Some("a"), m("0.05")))
        .expect("new run a");
    assert_eq!(again.run_spent(), Money::ZERO);
    drop(again);
    assert_eq!(h.budgets.totals().runs_started, 4);
}

#[test]
fn refusal_then_end_gives_budget_exceeded() {
    let h = Harness::new(with_default(0.02), RunsConfig::default());
    h.budgets
        .admit(&call(Some("r"), m("0.01")))
        .expect("a")
        .settle(m("0.015"), CostKind::Llm, false, None);
    let refusal = h
        .budgets
        .admit(&call(Some("r"), m("0.01")))
        .expect_err("refused");
    assert_eq!(refusal.scope, RefusalScope::Run);
    assert_eq!(refusal.run_id.as_deref(), Some("r"));
    assert_eq!((refusal.spent, refusal.ceiling), (m("0.015"), m("0.02")));
    // the refusal did not end the run
    assert_eq!(h.budgets.active_runs(), 1);
    assert!(h.ends().is_empty());
    let snap = h.budgets.run_snapshot("r").expect("run");
    assert_eq!((snap.calls, snap.refusals), (1, 1));
    assert!(h.budgets.finish_run("r", RunStatus::Ok, None));
    let end = &h.ends()[0];
    assert_eq!(end.stop_reason, "budget_exceeded");
    assert_eq!(end.refusals, 1);
    assert!(!end.breached);

    // also when the run idles out; and an explicit reason still wins
    let h = Harness::new(with_default(0.02), RunsConfig::default());
    assert!(h.budgets.admit(&call(Some("x"), m("0.5"))).is_err()); // refused first call starts the run
    assert!(h.budgets.admit(&call(Some("y"), m("0.5"))).is_err());
    h.clock.advance(300_000);
    assert!(h
        .budgets
        .finish_run("y", RunStatus::Error, Some("llm_error")));
    assert_eq!(h.budgets.sweep_idle(), 1);
    let ends = h.ends();
    assert_eq!(ends[0].stop_reason, "llm_error");
    assert_eq!(
        (ends[1].run_id.as_str(), ends[1].stop_reason.as_str()),
        ("x", "budget_exceeded")
    );
    assert_eq!(ends[1].calls, 0);
}

fn window(period: WindowPeriod, limit: f64) -> WindowCap {
    WindowCap {
        release: Some("v1".into()),
        request_type: None,
        model: None,
        tool: None,
        period,
        limit_usd: limit,
    }
}

fn spend_until_refused(h: &Harness, run: Option<&str>) -> Result<(), tollgate::budget::Refusal> {
    h.budgets
        .admit(&call(run, m("0.01")))?
        .settle(m("1"), CostKind::Llm, false, None);
    Ok(())
}

#[test]
fn windows_refuse_then_allow_after_rollover() {
    for (period, start, before_end, next) in [
        (
            WindowPeriod::Hour,
            unix_ms(2026, 3, 21, 12, 0, 0),
            unix_ms(2026, 3, 21, 12, 59, 59) + 999,
            unix_ms(2026, 3, 21, 13, 0, 0),
        ),
        (
            WindowPeriod::Day,
            unix_ms(2026, 3, 21, 0, 0, 0),
            unix_ms(2026, 3, 21, 23, 59, 59) + 999,
            unix_ms(2026, 3, 22, 0, 0, 0),
        ),
        (
            WindowPeriod::Month,
            unix_ms(2025, 12, 1, 0, 0, 0),
            unix_ms(2025, 12, 31, 23, 59, 59) + 999,
            unix_ms(2026, 1, 1, 0, 0, 0),
        ),
        (
            WindowPeriod::Month,
            unix_ms(2024, 2, 1, 0, 0, 0),
            unix_ms(2024, 2, 29, 23, 59, 59),
            unix_ms(2024, 3, 1, 0, 0, 0),
        ),
    ] {
        let config = BudgetConfig {
            windows: vec![window(period, 2.0)],
            ..with_default(100.0)
        };
        let h = Harness::at(config, RunsConfig::default(), start);
        spend_until_refused(&h, Some("a")).expect("1 of 2");
        spend_until_refused(&h, None).expect("2 of 2 (no-run calls count)");
        let refusal = spend_until_refused(&h, Some("b")).expect_err("limit reached");
        assert_eq!(refusal.scope, RefusalScope::Window);
        assert_eq!(
            refusal.window.as_deref(),
            Some(format!("{}:release=v1", period.as_str()).as_str())
        );
        assert_eq!((refusal.spent, refusal.ceiling), (m("2"), m("2")));
        assert!(spend_until_refused(&h, None).is_err());
        // other segments are not capped
        let mut other = call(Some("c"), m("0.01"));
        other.release = "v2";
        drop(h.budgets.admit(&other).expect("other release"));
        h.clock.set(before_end);
        assert!(
            spend_until_refused(&h, Some("b")).is_err(),
            "{period:?} still the same period"
        );
        h.clock.set(next);
        spend_until_refused(&h, Some("b")).expect("new period starts at zero");
        // the window refusal counted on run b
        assert_eq!(h.budgets.run_snapshot("b").expect("b").refusals, 2);
        assert_eq!(h.budgets.totals().window_refusals, 3);
    }
}

#[test]
fn windows_match_tools_and_models() {
    let config = BudgetConfig {
        windows: vec![
            WindowCap {
                release: None,
                request_type: None,
                model: None,
                tool: Some("web_search".into()),
                period: WindowPeriod::Day,
                limit_usd: 0.01,
            },
            WindowCap {
                release: None,
                request_type: None,
                model: Some("o3".into()),
                tool: None,
                period: WindowPeriod::Day,
                limit_usd: 0.5,
            },
        ],
        ..with_default(100.0)
    };
    let h = Harness::new(config, RunsConfig::default());
    let mut search = call(Some("r"), m("0.005"));
    search.tool = Some("web_search");
    search.model = None;
    search.route = "search";
    h.budgets
        .admit(&search)
        .expect("first search")
        .settle(m("0.005"), CostKind::Tool, false, None);
    // dropped unsettled: charged its reservation, which counts for the window too
    drop(h.budgets.admit(&search).expect("second search"));
    let refusal = h.budgets.admit(&search).expect_err("tool cap");
    assert_eq!(refusal.window.as_deref(), Some("day:tool=web_search"));
    // LLM calls are not capped by the tool window
    h.budgets
        .admit(&call(Some("r"), m("0.01")))
        .expect("llm")
        .settle(m("0.01"), CostKind::Llm, false, None);
    let mut o3 = call(Some("r"), m("0.01"));
    o3.model = Some("o3");
    h.budgets
        .admit(&o3)
        .expect("o3")
        .settle(m("0.5"), CostKind::Llm, false, None);
    assert_eq!(
        h.budgets
            .admit(&o3)
            .expect_err("model cap")
            .window
            .as_deref(),
        Some("day:model=o3")
    );
    let snap = h.budgets.run_snapshot("r").expect("r");
    assert_eq!((snap.tool_cost, snap.llm_cost), (m("0.01"), m("0.51")));
}

#[test]
fn reload_keeps_run_ceilings_and_window_spend() {
    let config = BudgetConfig {
        windows: vec![window(WindowPeriod::Day, 1.0)],
        ..with_default(0.5)
    };
    let h = Harness::new(config.clone(), RunsConfig::default());
    let held = h.budgets.admit(&call(Some("r"), m("0.1"))).expect("r");
    h.budgets
        .admit(&call(Some("s"), m("0.1")))
        .expect("s")
        .settle(m("0.6"), CostKind::Llm, false, None);
    let reloaded = BudgetConfig {
        windows: vec![window(WindowPeriod::Day, 1.5)],
        ..with_default(2.0)
    };
    h.budgets
        .set_policy(BudgetPolicy::from_config(&reloaded).expect("valid"));
    assert_eq!(h.budgets.policy().default_run, m("2"));
    assert_eq!(held.ceiling(), Some(m("0.5")));
    // the admission taken before the reload still charges the live window
    held.settle(m("0.6"), CostKind::Llm, false, None);
    // window spend 1.2 carried over; the new limit 1.5 applies; a new run
    // gets the new default
    let t = h
        .budgets
        .admit(&call(Some("t"), m("0.1")))
        .expect("1.2 < 1.5");
    assert_eq!(t.ceiling(), Some(m("2")));
    t.settle(m("0.3"), CostKind::Llm, false, None);
    let refusal = h
        .budgets
        .admit(&call(Some("t"), m("0.1")))
        .expect_err("1.5 reached");
    assert_eq!((refusal.spent, refusal.ceiling), (m("1.5"), m("1.5")));
    // a changed cap starts from zero
    let changed = BudgetConfig {
        windows: vec![window(WindowPeriod::Hour, 1.5)],
        ..with_default(2.0)
    };
    h.budgets
        .set_policy(BudgetPolicy::from_config(&changed).expect("valid"));
    drop(
        h.budgets
            .admit(&call(Some("t"), m("0.1")))
            .expect("new hour cap"),
    );
}

#[test]
fn eviction_when_full_ends_least_recently_active_idle_runs() {
    let runs = RunsConfig {
        max_tracked_runs: 3,
        ..RunsConfig::default()
    };
    let h = Harness::new(BudgetConfig::default(), runs);
    for id in ["a", "b", "c"] {
        h.budgets
            .admit(&call(Some(id), m("0.01")))
            .expect(id)
            .settle(m("0.01"), CostKind::Llm, false, None);
        h.clock.advance(1_000);
    }
    // a is touched again: b is now the least recently active
    drop(h.budgets.admit(&call(Some("a"), m("0.01"))).expect("a"));
    h.clock.advance(1_000);
    drop(h.budgets.admit(&call(Some("d"), m("0.01"))).expect("d"));
    assert_eq!(h.budgets.active_runs(), 3);
    let ends = h.ends();
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0].run_id, "b");
    assert!(ends[0].evicted);
    assert_eq!(
        (ends[0].status, ends[0].stop_reason.as_str()),
        (RunStatus::Ok, "idle_timeout")
    );
    assert_eq!(h.budgets.totals().runs_evicted, 1);

    // every run busy: admitted anyway, counted, never a panic
    let busy: Vec<_> = ["a", "c", "d"]
        .iter()
        .map(|id| h.budgets.admit(&call(Some(id), m("0.01"))).expect("busy"))
        .collect();
    let extra = h
        .budgets
        .admit(&call(Some("e"), m("0.01")))
        .expect("over capacity");
    assert_eq!(h.budgets.active_runs(), 4);
    assert_eq!(h.budgets.totals().over_capacity_admits, 1);
    drop(busy);
    drop(extra);
    // the next new run brings the registry back under its bound
    drop(h.budgets.admit(&call(Some("f"), m("0.01"))).expect("f"));
    assert_eq!(h.budgets.active_runs(), 3);
    assert_eq!(h.ends().len(), 3);
}

#[test]
fn retries_repeats_and_duplicates_are_flagged_and_counted() {
    let runs = RunsConfig {
        max_body_hashes_per_run: 2,
        ..RunsConfig::default()
    };
    let h = Harness::new(with_default(10.0), runs);
    let go = |retry: Option<u32>, hash: u64, model: &'static str, failed: bool| {
        let mut c = call(Some("r"), m("0.01"));
        c.sdk_retry_count = retry;
        c.body_hash = Some(hash);
        c.model = Some(model);
        let a = h.budgets.admit(&c).expect("admit");
        let flags = a.flags();
        a.settle(m("0.01"), CostKind::Llm, failed, None);
        (
            flags.sdk_retry,
            flags.repeat_after_failure,
            flags.duplicate_body,
        )
    };
    assert_eq!(go(None, 1, "gpt-4.1", true), (false, false, false));
    // same route + model after a failure, SDK retry header, same body
    assert_eq!(go(Some(1), 1, "gpt-4.1", false), (true, true, true));
    // the previous call on this route + model succeeded
    assert_eq!(go(Some(0), 2, "gpt-4.1", false), (false, false, false));
    assert_eq!(go(None, 3, "o3", true), (false, false, false));
    // a failure on another model does not make this a repeat; body 1 is gone
    // from a 2-entry history
    assert_eq!(go(None, 1, "gpt-4.1", false), (false, false, false));
    assert_eq!(go(None, 4, "o3", false), (false, true, false));
    assert_eq!(go(None, 4, "o3", false), (false, false, true));
    let snap = h.budgets.run_snapshot("r").expect("r");
    assert_eq!((snap.calls, snap.retries, snap.repeated_calls), (7, 2, 2));
    assert!(h.budgets.finish_run("r", RunStatus::Ok, None));
    let end = &h.ends()[0];
    assert_eq!((end.calls, end.retries, end.repeated_calls), (7, 2, 2));
}

#[test]
fn dropped_admission_is_charged_its_reservation_once() {
    let h = Harness::new(with_default(1.0), RunsConfig::default());
    let a = h.budgets.admit(&call(Some("r"), m("0.3"))).expect("a");
    assert_eq!(h.budgets.totals().reserved_outstanding, m("0.3"));
    drop(a);
    let snap = h.budgets.run_snapshot("r").expect("r");
    assert_eq!(
        (snap.spent, snap.reserved, snap.in_flight),
        (m("0.3"), Money::ZERO, 0)
    );
    let totals = h.budgets.totals();
    assert_eq!(
        (totals.settled, totals.reserved_outstanding),
        (m("0.3"), Money::ZERO)
    );
    // settle consumes the guard: its Drop charges nothing more
    h.budgets
        .admit(&call(Some("r"), m("0.3")))
        .expect("b")
        .settle(m("0.1"), CostKind::Llm, false, None);
    assert_eq!(h.budgets.run_snapshot("r").expect("r").spent, m("0.4"));
    assert_eq!(h.budgets.totals().settled, m("0.4"));
}

#[test]
fn late_settle_after_run_end_does_not_touch_the_new_run() {
    let h = Harness::new(with_default(1.0), RunsConfig::default());
    let late = h.budgets.admit(&call(Some("r"), m("0.2"))).expect("late");
    assert!(h.budgets.finish_run("r", RunStatus::Ok, None));
    assert_eq!(h.ends()[0].cost, Money::ZERO);
    let fresh = h
        .budgets
        .admit(&call(Some("r"), m("0.2")))
        .expect("new run");
    late.settle(
        m("0.5"),
        CostKind::Llm,
        false,
        Some((RunStatus::Error, None)),
    );
    assert_eq!(h.ends().len(), 1, "the old run ends only once");
    assert_eq!(fresh.run_spent(), Money::ZERO);
    assert_eq!(fresh.remaining(), Some(m("1")));
    fresh.settle(m("0.1"), CostKind::Llm, false, None);
    assert_eq!(h.budgets.run_snapshot("r").expect("r").spent, m("0.1"));
    assert_eq!(h.budgets.totals().settled, m("0.6"));
}

#[test]
fn restore_run_puts_back_spend() {
    let h = Harness::new(with_default(1.0), RunsConfig::default());
    let now = h.clock.now_ms_for_test();
    h.budgets.restore_run(RestoredRun {
        run_id: "r".into(),
        release: "v1".into(),
        request_type: "default".into(),
        ceiling: Some(m("0.5")),
        llm_cost: m("0.3"),
        tool_cost: m("0.1"),
        started_ms: now - 60_000,
        last_seen_ms: now - 1_000,
        calls: 12,
        refusals: 0,
        retries: 1,
        repeated_calls: 2,
    });
    let snap = h.budgets.run_snapshot("r").expect("restored");
    assert_eq!(
        (snap.spent, snap.ceiling, snap.calls),
        (m("0.4"), m("0.5"), 12)
    );
    assert_eq!(snap.started_ms, now - 60_000);
    // the budget still holds after the restart
    assert!(h.budgets.admit(&call(Some("r"), m("0.2"))).is_err());
    let a = h.budgets.admit(&call(Some("r"), m("0.1"))).expect("fits");
    a.settle(m("0.1"), CostKind::Llm, false, Some((RunStatus::Ok, None)));
    let end = &h.ends()[0];
    assert_eq!(
        (end.cost, end.calls, end.retries, end.refusals),
        (m("0.5"), 13, 1, 1)
    );
    assert_eq!(end.stop_reason, "budget_exceeded");

    // restoring into a live run adds to it and keeps its ceiling
    drop(h.budgets.admit(&call(Some("s"), m("0.1"))).expect("s"));
    h.budgets.restore_run(RestoredRun {
        run_id: "s".into(),
        release: "v1".into(),
        request_type: "default".into(),
        ceiling: None,
        llm_cost: m("0.2"),
        tool_cost: Money::ZERO,
        started_ms: now - 5_000,
        last_seen_ms: now - 5_000,
        calls: 3,
        refusals: 0,
        retries: 0,
        repeated_calls: 0,
    });
    let snap = h.budgets.run_snapshot("s").expect("s");
    assert_eq!(
        (snap.spent, snap.ceiling, snap.calls, snap.started_ms),
        (m("0.3"), m("1"), 4, now - 5_000)
    );
}

#[test]
fn registry_stays_consistent_under_mixed_concurrent_load() {
    // Admits, settles, drops, finish headers, the finish API and the sweep
    // race on four run ids while the clock moves. Afterwards nothing is
    // reserved, every started run ended exactly once and every settled cost
    // reached the totals.
    let runs = RunsConfig {
        idle_timeout_secs: 1,
        max_tracked_runs: 3,
        ..RunsConfig::default()
    };
    let h = Harness::new(with_default(0.02), runs);
    let charged = Arc::new(AtomicUsize::new(0)); // in picos
    let start = Arc::new(Barrier::new(9));
    let mut handles = Vec::new();
    for t in 0..8u64 {
        let (b, charged, start) = (
            Arc::clone(&h.budgets),
            Arc::clone(&charged),
            Arc::clone(&start),
        );
        handles.push(thread::spawn(move || {
            start.wait();
            let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            for _ in 0..3_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let ids = ["a", "b", "c", "d"];
                let id = ids[(x % 4) as usize];
                let r = Money::from_picos(1_000_000_000 * (1 + x % 5));
                match (x >> 8) % 8 {
                    0 => {
                        b.finish_run(id, RunStatus::Ok, None);
                    }
                    1 => {
                        b.sweep_idle();
                    }
                    2 => {
                        if let Ok(a) = b.admit(&call(Some(id), r)) {
                            charged.fetch_add(r.picos() as usize, Ordering::SeqCst);
                            drop(a);
                        }
                    }
                    n => {
                        if let Ok(a) = b.admit(&call(Some(id), r)) {
                            let cost = Money::from_picos(r.picos() * (x % 3) / 2);
                            charged.fetch_add(cost.picos() as usize, Ordering::SeqCst);
                            let end = (n == 3).then_some((RunStatus::Ok, None));
                            a.settle(cost, CostKind::Llm, x % 7 == 0, end);
                        }
                    }
                }
            }
        }));
    }
    let clock = Arc::clone(&h.clock);
    handles.push(thread::spawn(move || {
        start.wait();
        for _ in 0..200 {
            clock.advance(100);
            thread::yield_now();
        }
    }));
    for handle in handles {
        handle.join().expect("thread");
    }
    for id in ["a", "b", "c", "d"] {
        h.budgets.finish_run(id, RunStatus::Ok, None);
    }
    let totals = h.budgets.totals();
    let ends = h.ends();
    assert_eq!(totals.reserved_outstanding, Money::ZERO);
    assert_eq!(
        totals.settled.picos() as usize,
        charged.load(Ordering::SeqCst)
    );
    assert_eq!(h.budgets.active_runs(), 0);
    assert_eq!(totals.runs_started, totals.runs_ended);
    assert_eq!(ends.len() as u64, totals.runs_ended);
    // no call costs more than its reservation here, so no run may pass its
    // ceiling whatever the interleaving
    assert!(ends.iter().all(|e| !e.breached && e.cost <= e.ceiling));
    let ended_cost: Money = ends.iter().map(|e| e.cost).sum();
    assert!(ended_cost <= totals.settled);
    println!(
        "{} runs, {} admitted, {} refused, {} evicted",
        ends.len(),
        totals.admitted_calls,
        totals.run_refusals,
        totals.runs_evicted
    );
}
