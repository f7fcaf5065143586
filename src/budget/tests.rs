use std::mem::size_of;
use std::sync::{Arc, Mutex};

use super::run::{
    outcome_key, NewRun, RunKey, RunLabels, RunState, SpareRuns, INLINE_HASHES, INLINE_ID,
    SPARE_BLOCK,
};
use super::*;

fn m(usd: &str) -> Money {
    Money::parse_usd(usd).expect("test amount")
}

/// A plain LLM call of run `run` (release `v1`, request type `default`,
/// `gpt-4.1` on route `openai`) reserving `reservation`.
fn call(run: &str, reservation: Money) -> CallRequest<'_> {
    CallRequest {
        run_id: Some(run),
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

/// Budgets with the default policy and runs config, a still clock, and run
/// ends dropped.
fn default_budgets() -> Budgets {
    Budgets::new(
        BudgetPolicy::default(),
        RunsConfig::default(),
        Arc::new(ManualClock::new(1_000)),
        Arc::new(|_| {}),
    )
}

/// A run's state outside any registry.
fn lone_run() -> RunState {
    RunState::new(
        "r",
        NewRun {
            ceiling: m("1"),
            labels: Arc::new(RunLabels {
                release: Arc::from("x"),
                request_type: Arc::from("y"),
            }),
            now_ms: 0,
        },
    )
}

#[test]
fn run_state_is_small() {
    // Per tracked run: RunState behind its `RunRef` (+1 counter), one map
    // slot (the pointer itself, ~1/0.875 for the table's load factor, + 1
    // control byte); an id longer than INLINE_ID in its own allocation;
    // body hashes past the first few 4 bytes each. glibc adds 8 bytes and
    // rounds up to 16: 136 bytes of state and count fit a 144-byte block.
    let word = size_of::<usize>();
    let state = size_of::<RunState>() + word;
    let entry = size_of::<(RunKey, ())>() * 8 / 7 + 1;
    let fixed = state + entry;
    println!(
        "RunState+count {state} B (ids up to {INLINE_ID} B inside), map slot ~{entry} B: \
         ~{fixed} B per run; the first {INLINE_HASHES} body hashes inline, \
         then 4 B each (64 → 256 B)"
    );
    assert!(state <= 136, "RunState and its count grew to {state} bytes");
    assert_eq!(size_of::<(RunKey, ())>(), word);
    assert!(fixed < 152, "{fixed}");
}

#[test]
fn activity_word_keeps_last_seen_and_calls_in_flight_apart() {
    let run = lone_run();
    let g = run.lock();
    let now = 1_795_998_380_378; // 2026-11-30, ms
    run.touch(&g, now);
    run.call_started(&g);
    run.call_started(&g);
    assert_eq!((run.last_seen_ms(), run.in_flight()), (now, 2));
    // An earlier time does not move the last activity back.
    run.touch(&g, 5);
    assert_eq!((run.last_seen_ms(), run.in_flight()), (now, 2));
    // One end more than started stays at 0 and leaves the time alone.
    for _ in 0..3 {
        run.call_ended(&g);
    }
    assert_eq!((run.last_seen_ms(), run.in_flight()), (now, 0));
    // At the top of its 20 bits the count stops instead of carrying into
    // the time; a time past 44 bits stops instead of shifting into the count.
    let max_flight = (1 << 20) - 1;
    for _ in 0..max_flight + 3 {
        run.call_started(&g);
    }
    assert_eq!((run.last_seen_ms(), run.in_flight()), (now, max_flight));
    run.touch(&g, u64::MAX);
    assert_eq!(
        (run.last_seen_ms(), run.in_flight()),
        (u64::MAX >> 20, max_flight)
    );
    run.call_ended(&g);
    assert_eq!(run.in_flight(), max_flight - 1);
}

#[test]
fn new_runs_take_spare_states_allocated_a_block_at_a_time() {
    let spares = SpareRuns::default();
    let count = SPARE_BLOCK + 2;
    let mut runs = Vec::new();
    for i in 0..count {
        let run = spares.take(
            &format!("run-{i}"),
            NewRun {
                ceiling: Money::from_picos(i as u64 + 1),
                labels: Arc::new(RunLabels {
                    release: Arc::from(format!("v{i}")),
                    request_type: Arc::from("t"),
                }),
                now_ms: 1_000 + i as u64,
            },
        );
        // A block is allocated when none is spare, then handed out one by one.
        assert_eq!(spares.spare_count(), SPARE_BLOCK - 1 - i % SPARE_BLOCK);
        runs.push(run);
    }
    for (i, run) in runs.iter().enumerate() {
        assert_eq!(&*run.id, format!("run-{i}"));
        assert_eq!(run.last_seen_ms(), 1_000 + i as u64);
        assert_eq!(run.in_flight(), 0);
        let g = run.lock();
        assert_eq!(g.ceiling, Money::from_picos(i as u64 + 1));
        assert_eq!(&*g.labels.release, format!("v{i}"));
        assert_eq!(g.started_ms(), 1_000 + i as u64);
        assert_eq!(
            (g.llm, g.tool, g.reserved),
            (Money::ZERO, Money::ZERO, Money::ZERO)
        );
        assert_eq!(g.calls, 0);
        assert!(!g.ended() && !g.last_failed() && !g.last_was_tool());
    }
}

#[test]
fn run_ids_short_and_long_are_found_by_their_text() {
    let short = "r".repeat(INLINE_ID);
    let long = "l".repeat(INLINE_ID + 1);
    let uuid = "0b7e6a52-2d4f-4f7e-9a57-3f1c8e2b9d10";
    let budgets = default_budgets();
    for id in [short.as_str(), long.as_str(), uuid, "a"] {
        let admission = budgets.admit(&call(id, m("0.01"))).expect("admitted");
        assert_eq!(admission.run_id(), Some(id));
        drop(admission);
        let snapshot = budgets.run_snapshot(id).expect("tracked");
        assert_eq!(snapshot.run_id, id);
        assert_eq!(snapshot.calls, 1);
    }
    assert_eq!(budgets.active_runs(), 4);
    assert!(budgets.run_snapshot(&"r".repeat(INLINE_ID - 1)).is_none());
    assert!(budgets.finish_run(&long, RunStatus::Ok, None));
    assert!(budgets.run_snapshot(&long).is_none());
    assert!(budgets.run_snapshot(&short).is_some());
}

#[test]
fn shared_types_are_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<Budgets>();
    check::<Admission>();
    check::<RunEnd>();
    check::<Refusal>();
}

#[test]
fn civil_dates_round_trip() {
    for days in [
        -1_000_000i64,
        -1,
        0,
        59,
        60,
        365,
        10_957,
        11_016,
        20_000,
        2_932_896,
    ] {
        let (y, mo, d) = civil_from_days(days);
        assert_eq!(days_from_civil(y, mo, d), days, "{y}-{mo}-{d}");
    }
    assert_eq!(civil_from_days(0), (1970, 1, 1));
    assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    assert_eq!(
        civil_from_days(days_from_civil(2024, 12, 31)),
        (2024, 12, 31)
    );
    assert_eq!(civil_from_days(days_from_civil(2025, 1, 1)), (2025, 1, 1));
    assert_eq!(unix_ms(2026, 3, 21, 0, 0, 0), 1_774_051_200_000);
}

/// Day by day from 1970 to 2800, the date moves as a calendar does:
/// next day of the month, or the 1st of the next month after the
/// month's last day (leap years by the Gregorian rule).
#[test]
fn civil_dates_follow_the_calendar() {
    let leap = |y: i64| y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_len = |y: i64, m: u32| match m {
        2 if leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    let mut expected: (i64, u32, u32) = (1970, 1, 1);
    for days in 0..302_000i64 {
        assert_eq!(civil_from_days(days), expected, "day {days}");
        let (y, m, d) = expected;
        expected = if d < month_len(y, m) {
            (y, m, d + 1)
        } else if m < 12 {
            (y, m + 1, 1)
        } else {
            (y + 1, 1, 1)
        };
    }
}

#[test]
fn periods_change_at_utc_boundaries() {
    let month = |ms| period_id(WindowPeriod::Month, ms);
    let day = |ms| period_id(WindowPeriod::Day, ms);
    let hour = |ms| period_id(WindowPeriod::Hour, ms);
    let dec31 = unix_ms(2025, 12, 31, 23, 59, 59) + 999;
    let jan1 = unix_ms(2026, 1, 1, 0, 0, 0);
    assert_eq!(month(jan1), month(dec31) + 1);
    assert_eq!(day(jan1), day(dec31) + 1);
    assert_eq!(hour(jan1), hour(dec31) + 1);
    // February in a leap year ends on the 29th.
    assert_eq!(
        month(unix_ms(2024, 2, 29, 23, 0, 0)),
        month(unix_ms(2024, 2, 1, 0, 0, 0))
    );
    assert_eq!(
        month(unix_ms(2024, 3, 1, 0, 0, 0)),
        month(unix_ms(2024, 2, 29, 0, 0, 0)) + 1
    );
    assert_eq!(
        month(unix_ms(2026, 4, 30, 12, 0, 0)),
        month(unix_ms(2026, 4, 1, 0, 0, 0))
    );
}

#[test]
fn body_hash_ring_remembers_the_latest() {
    let run = lone_run();
    let mut g = run.lock();
    for h in 0..3u64 {
        assert!(!g.note_body(h, 3));
    }
    assert!(g.note_body(0, 3)); // replaces 0 (oldest) by 0
    assert!(!g.note_body(3, 3)); // replaces 1
    assert!(!g.note_body(1, 3)); // 1 was forgotten
    assert!(g.note_body(3, 3));
    assert!(!g.note_body(7, 0));
    assert!(!g.note_body(7, 0));
}

#[test]
fn body_hash_ring_spills_from_inline_and_shortens_on_reload() {
    let run = lone_run();
    let mut g = run.lock();
    let n = INLINE_HASHES as u64 + 3;
    for h in 0..n {
        assert!(!g.note_body(h, 8));
    }
    for h in 0..n {
        assert!(g.note_body(h, 8), "{h} remembered");
    }
    // Full at 8: the oldest goes.
    assert!(!g.note_body(100, 8));
    assert!(!g.note_body(101, 8));
    // A reload shortens the history to the latest 2, 100 and 101.
    assert!(g.note_body(100, 2)); // now 101, 100
    assert!(!g.note_body(n - 1, 2)); // forgotten; now 100, n - 1
    assert!(!g.note_body(101, 2));
    drop(g);
    let run = lone_run();
    let mut g2 = run.lock();
    for h in 0..INLINE_HASHES as u64 {
        assert!(!g2.note_body(h, 64));
    }
    assert!(
        g2.note_body(INLINE_HASHES as u64 - 1, 1),
        "shortened inline history keeps the latest"
    );
    assert!(!g2.note_body(0, 1), "and only the latest");
}

#[test]
fn outcome_memory_tracks_last_result_per_route_and_model() {
    let run = lone_run();
    let a = outcome_key("openai", Some("gpt-4.1"));
    let b = outcome_key("openai", Some("gpt-4.1-mini"));
    assert_ne!(a, b);
    assert_ne!(outcome_key("openai", None), 0);
    let mut g = run.lock();
    g.note_outcome(a, true);
    assert!(g.failed_before(a));
    assert!(!g.failed_before(b));
    g.note_outcome(a, false);
    assert!(!g.failed_before(a));
}

#[test]
fn outcome_memory_keeps_the_two_latest_failed_pairs() {
    let run = lone_run();
    let [a, b, c] = ["a", "b", "c"].map(|route| outcome_key(route, Some("m")));
    let mut g = run.lock();
    g.note_outcome(a, true);
    g.note_outcome(b, true);
    // A third failing pair pushes out the oldest.
    g.note_outcome(c, true);
    assert_eq!([a, b, c].map(|k| g.failed_before(k)), [false, true, true]);
    // Failing again makes a pair the latest: a new one then pushes out c.
    g.note_outcome(b, true);
    g.note_outcome(a, true);
    assert_eq!([a, b, c].map(|k| g.failed_before(k)), [true, true, false]);
    // A success forgets its pair and frees its place; a success on a pair
    // not remembered changes nothing.
    g.note_outcome(b, false);
    g.note_outcome(c, false);
    assert_eq!([a, b, c].map(|k| g.failed_before(k)), [true, false, false]);
    g.note_outcome(c, true);
    assert_eq!([a, b, c].map(|k| g.failed_before(k)), [true, false, true]);
}

#[test]
fn start_and_flags_share_a_word_without_touching_each_other() {
    let run = lone_run();
    let mut g = run.lock();
    let now = 1_795_998_380_378;
    g.set_started_ms(now);
    g.set_last_outcome(true, true);
    assert_eq!(g.started_ms(), now);
    assert!(g.last_failed() && g.last_was_tool() && !g.ended());
    g.set_last_outcome(true, false);
    g.set_ended();
    g.set_started_ms(now - 5);
    assert_eq!(g.started_ms(), now - 5);
    assert!(g.last_failed() && !g.last_was_tool() && g.ended());
    // A time past 44 bits stops at their top instead of setting the flags.
    g.set_last_outcome(false, false);
    g.set_started_ms(u64::MAX);
    assert_eq!(g.started_ms(), (1 << 44) - 1);
    assert!(!g.last_failed() && !g.last_was_tool() && g.ended());
}

#[test]
fn config_defaults_and_parse() {
    let cfg: BudgetConfig = toml::from_str("").expect("empty section");
    assert_eq!(cfg, BudgetConfig::default());
    let policy = BudgetPolicy::from_config(&cfg).expect("defaults are valid");
    assert_eq!(policy, BudgetPolicy::default());
    assert_eq!(RunsConfig::default().validate("runs"), Vec::<String>::new());

    let cfg: BudgetConfig = toml::from_str(
        r#"
        default_run_usd = 0.1
        mode = "soft"
        [[rules]]
        request_type = "research"
        run_usd = 1.0
        [[windows]]
        release = "2026-03-21"
        period = "day"
        limit_usd = 100.0
        "#,
    )
    .expect("valid");
    let policy = BudgetPolicy::from_config(&cfg).expect("valid");
    assert_eq!(policy.default_run, m("0.1"));
    assert_eq!(policy.mode, BudgetMode::Soft);
    assert_eq!(policy.rules[0].run, m("1"));
    assert_eq!(policy.windows[0].name, "day:release=2026-03-21");
    assert_eq!(policy.windows[0].limit, m("100"));

    assert!(toml::from_str::<BudgetConfig>("default_run = 1.0").is_err());
    assert!(toml::from_str::<BudgetConfig>("mode = \"hard\"").is_err());
    assert!(toml::from_str::<RunsConfig>("idle_timeout = 3").is_err());
}

#[test]
fn validation_names_key_paths() {
    let cfg = BudgetConfig {
        default_run_usd: 0.0,
        max_run_usd: f64::NAN,
        fallback_reservation_usd: -1.0,
        expected_output_tokens: 0,
        rules: vec![
            BudgetRule {
                release: None,
                request_type: None,
                model: None,
                run_usd: 1.0,
            },
            BudgetRule {
                release: Some(String::new()),
                request_type: None,
                model: None,
                run_usd: -2.0,
            },
        ],
        windows: vec![
            WindowCap {
                release: None,
                request_type: None,
                model: None,
                tool: Some("web_search".into()),
                period: WindowPeriod::Hour,
                limit_usd: 0.1 + 0.2,
            },
            WindowCap {
                release: None,
                request_type: None,
                model: None,
                tool: Some("web_search".into()),
                period: WindowPeriod::Hour,
                limit_usd: 5.0,
            },
        ],
        ..BudgetConfig::default()
    };
    let errors = cfg.validate("budget");
    let has = |prefix: &str| errors.iter().any(|e| e.starts_with(prefix));
    assert!(
        has("budget.default_run_usd: must be a positive number"),
        "{errors:#?}"
    );
    assert!(
        has("budget.max_run_usd: must be a positive number"),
        "{errors:#?}"
    );
    assert!(has(
        "budget.fallback_reservation_usd: must be a non-negative number"
    ));
    assert!(has("budget.expected_output_tokens: "));
    assert!(has("budget.rules[1].release: must not be empty"));
    assert!(has("budget.rules[1].run_usd: must be a positive number"));
    assert!(!has("budget.rules[0]"));
    assert!(has(
        "budget.windows[0].limit_usd: must be a positive number with at most 12 fraction digits"
    ));
    assert!(has(
        "budget.windows[1]: same match keys and period as budget.windows[0]"
    ));
    assert_eq!(errors.len(), 8, "{errors:#?}");
    assert!(BudgetPolicy::from_config(&cfg).is_err());

    let runs = RunsConfig {
        idle_timeout_secs: 0,
        max_tracked_runs: 0,
        max_body_hashes_per_run: 100_000,
    };
    let errors = runs.validate("runs");
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(errors[0].starts_with("runs.idle_timeout_secs: "));
}

#[test]
fn ended_run_entry_is_replaced_not_reused() {
    // A finisher that flipped `ended` but has not yet removed the entry:
    // the next admit must start a new run, not charge the old one.
    let ends = Arc::new(Mutex::new(Vec::new()));
    let sink_ends = Arc::clone(&ends);
    let budgets = Budgets::new(
        BudgetPolicy::default(),
        RunsConfig::default(),
        Arc::new(ManualClock::new(1_000)),
        Arc::new(move |e| sink_ends.lock().expect("sink").push(e)),
    );
    let call = call("r1", m("0.01"));
    budgets
        .admit(&call)
        .expect("admit")
        .settle(m("0.02"), CostKind::Llm, false, None);
    let old = budgets.shared.lookup("r1").expect("run");
    old.lock().set_ended(); // as if an end were half done
    let adm = budgets.admit(&call).expect("admit");
    assert_eq!(adm.run_spent(), Money::ZERO);
    adm.settle(m("0.01"), CostKind::Llm, false, None);
    assert_eq!(budgets.run_snapshot("r1").map(|s| s.spent), Some(m("0.01")));
    assert_eq!(budgets.active_runs(), 1);
    assert!(ends.lock().expect("ends").is_empty());
}

#[test]
fn a_withdrawn_admission_charges_nothing_and_a_shared_ticket_settles_first() {
    let budgets = default_budgets();
    let call = CallRequest {
        sdk_retry_count: Some(1),
        ..call("r1", m("0.01"))
    };
    budgets
        .admit(&call)
        .expect("admit")
        .withdraw(Some(RefusalScope::Run));
    budgets.admit(&call).expect("admit").withdraw(None);
    let run = budgets.run_snapshot("r1").expect("run");
    assert_eq!(
        (run.calls, run.refusals, run.retries, run.in_flight),
        (0, 1, 0, 0)
    );
    assert_eq!((run.spent, run.reserved), (Money::ZERO, Money::ZERO));
    let totals = budgets.totals();
    assert_eq!((totals.admitted_calls, totals.run_refusals), (0, 1));
    assert_eq!(totals.reserved_outstanding, Money::ZERO);

    // The fleet's figures replace the local ones; settling (or dropping)
    // hands the cost to the shared store once.
    let settled = Arc::new(Mutex::new(Vec::new()));
    let mut adm = budgets.admit(&call).expect("admit");
    let seen = Arc::clone(&settled);
    adm.attach_shared(SharedTicket {
        view: Some(SharedView {
            spent: m("0.05"),
            reserved: m("0.03"),
            ceiling: m("0.2"),
        }),
        settle: Box::new(move |cost, kind, failed, _end| {
            seen.lock().expect("seen").push((cost, kind, failed))
        }),
    });
    assert_eq!(adm.run_spent(), m("0.05"));
    assert_eq!(adm.ceiling(), Some(m("0.2")));
    // 0.2 − 0.05 spent − (0.03 − 0.01 own) reserved by other calls.
    assert_eq!(adm.remaining(), Some(m("0.13")));
    drop(adm);
    assert_eq!(
        *settled.lock().expect("settled"),
        vec![(m("0.01"), CostKind::Llm, false)]
    );
}

#[test]
fn with_limits_left_to_the_fleet_a_replica_never_refuses_on_its_own_view() {
    let budgets = default_budgets();
    let call = CallRequest {
        budget_header: Some(m("0.01")),
        ..call("r1", m("0.01"))
    };
    // Locally the run has spent its whole ceiling…
    budgets
        .admit(&call)
        .expect("first call fits")
        .settle(m("0.01"), CostKind::Llm, false, None);
    assert!(budgets.admit(&call).is_err(), "refused on the local view");
    // …but with a shared state backend only the fleet-wide check refuses.
    budgets.leave_limits_to_fleet();
    let admission = budgets.admit(&call).expect("not refused locally");
    assert_eq!(admission.reservation(), m("0.01"));
    admission.withdraw(None);
}
