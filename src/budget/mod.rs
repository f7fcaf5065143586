//! Budgets and the run registry (SPEC §5, §6).
//!
//! # Flow
//!
//! 1. **admit** — the proxy calls [`Budgets::admit`] before anything goes
//!    upstream. Window caps matching the call are checked first (each cap
//!    holds one spend counter for its current UTC period). With a run id, the
//!    run is looked up in the registry (a `DashMap` whose keys are the
//!    `RunRef`s themselves, hashed and looked up by run id; the map
//!    guard is held only to clone the `RunRef`) or created (in a spare state
//!    from a block allocated at once, [`run::SpareRuns`]) with its
//!    ceiling (header clamped to `max_run`, else first matching rule, else
//!    the default). Then, under the run's own short mutex, the ceiling check
//!    and the reservation happen together: reserve mode refuses when
//!    `spent + reserved + reservation > ceiling`, soft mode when
//!    `spent >= ceiling`; an admitted call adds its reservation to
//!    `reserved`, counts as in flight and gets its retry / repeat / duplicate
//!    flags. A refusal counts on the run and starts nothing upstream.
//! 2. **hold** — the returned [`Admission`] is an RAII guard the proxy keeps
//!    inside the response body while the call streams.
//! 3. **settle** — [`Admission::settle`] replaces the reservation by the real
//!    cost in one step under the run's mutex (`reserved -= reservation`,
//!    `spent += cost`), then adds the cost to the matched windows and the
//!    process totals. Dropping an unsettled admission settles it with its
//!    reservation as cost (an unknown outcome is charged what it may cost).
//!    Settling consumes the guard and `Drop` checks a flag, so a call is
//!    charged exactly once.
//! 4. **run end** — a settle carrying `x-agent-run-status`, the finish API,
//!    the idle sweep and eviction all go through one function that sets
//!    `ended` under the run's mutex only if it was not set; only the caller
//!    that flips it builds the [`RunEnd`], removes the run from the registry
//!    (`remove_if` on pointer identity, so a newer run under the same id is
//!    never removed) and hands it to the sink, after every lock is released.
//!
//! # Why the ceiling holds under concurrency
//!
//! Every read and write of a run's `spent` and `reserved` happens under that
//! run's mutex, so admits and settles of one run are serialised: each admit
//! sees every earlier reservation and every earlier settlement, and a settle
//! swaps reservation for cost with no moment where neither is counted. In
//! reserve mode the sum of `spent + reserved` therefore never passes the
//! ceiling through admits; it can pass it only when a call's real cost
//! exceeds its reservation, by that call's error (by the sum of the errors of
//! the calls in flight together, when several underestimate at once). In
//! soft mode admits are not bounded by reservations: overshoot is at most
//! the cost of the calls admitted before `spent` reached the ceiling.
//! Window caps are checked the same soft way (spend, no reservations), so a
//! period can pass its limit by the calls in flight when it was reached.
//!
//! An admit that finds its run already `ended` (a finisher won the race
//! between the map lookup and the lock) removes that entry and retries, so
//! it starts a new run under the same id, as SPEC §9 asks; late settles of
//! an ended run's calls still reach the windows and totals but no live run.
//! Map, run and window locks are never nested: each is taken alone and
//! released before the next (the map guard only long enough to clone an
//! `Arc`). The only lock held while others are taken is the eviction mutex,
//! which is taken first and by nothing that holds a lock, so no lock order
//! can deadlock. Nothing here blocks on I/O or awaits; the sink is called
//! with no lock held.

mod clock;
mod config;
mod run;
#[cfg(test)]
mod tests;
mod window;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use dashmap::mapref::entry::Entry;
use dashmap::{DashMap, DashSet};

use crate::money::Money;

pub use clock::{
    civil_from_days, days_from_civil, period_id, unix_ms, Clock, ManualClock, SystemClock,
};
pub use config::{
    BudgetConfig, BudgetMode, BudgetPolicy, BudgetRule, RulePolicy, RunsConfig, WindowCap,
    WindowPeriod, WindowPolicy, MAX_BODY_HASHES_PER_RUN,
};

use run::{outcome_key, NewRun, RunInner, RunKey, RunLabels, RunRef, SpareRuns};
use window::WindowSlot;

/// How a run ended (the `status` label of `agent_run_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunStatus {
    Ok,
    Error,
}

impl RunStatus {
    /// `"ok"` / `"error"`.
    pub fn as_label(self) -> &'static str {
        match self {
            RunStatus::Ok => "ok",
            RunStatus::Error => "error",
        }
    }

    /// `completed` / `ok` → `Ok`, `error` → `Error` (header and finish API
    /// values, ASCII case-insensitive).
    pub fn parse(text: &str) -> Option<RunStatus> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("completed") || t.eq_ignore_ascii_case("ok") {
            Some(RunStatus::Ok)
        } else if t.eq_ignore_ascii_case("error") {
            Some(RunStatus::Error)
        } else {
            None
        }
    }
}

/// One run's end, emitted exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunEnd {
    pub run_id: String,
    pub release: String,
    pub request_type: String,
    pub status: RunStatus,
    pub stop_reason: String,
    /// `llm_cost + tool_cost`: the settled spend.
    pub cost: Money,
    pub llm_cost: Money,
    pub tool_cost: Money,
    pub ceiling: Money,
    /// `cost > ceiling`.
    pub breached: bool,
    pub started_ms: u64,
    pub ended_ms: u64,
    /// Admitted calls.
    pub calls: u64,
    pub refusals: u64,
    /// Calls that were an SDK retry or repeated a call that had just failed.
    pub retries: u64,
    /// Calls whose body was identical to a recent call of the run.
    pub repeated_calls: u64,
    /// Ended early because the registry was full.
    pub evicted: bool,
    /// Ended by the run-status header or the finish API (not idle or evicted).
    pub explicit: bool,
}

/// Receives every [`RunEnd`]; called with no lock held.
pub type RunEndSink = Arc<dyn Fn(RunEnd) + Send + Sync>;

/// What the budget layer needs to know about one call.
#[derive(Debug, Clone, Copy)]
pub struct CallRequest<'a> {
    pub run_id: Option<&'a str>,
    pub release: &'a str,
    pub request_type: &'a str,
    pub model: Option<&'a str>,
    pub tool: Option<&'a str>,
    /// Route name, for repeat-after-failure detection.
    pub route: &'a str,
    /// `x-agent-budget-usd`, parsed; clamped to `max_run` here.
    pub budget_header: Option<Money>,
    /// Expected cost of this call.
    pub reservation: Money,
    /// `x-stainless-retry-count` and similar (> 0 means a retry).
    pub sdk_retry_count: Option<u32>,
    /// Hash of the request body, for identical-call detection.
    pub body_hash: Option<u64>,
}

/// Which limit refused a call (metric label via [`RefusalScope::as_label`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalScope {
    Run,
    Window,
}

impl RefusalScope {
    /// `"run"` / `"window"`.
    pub fn as_label(self) -> &'static str {
        match self {
            RefusalScope::Run => "run",
            RefusalScope::Window => "window",
        }
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub scope: RefusalScope,
    pub run_id: Option<String>,
    /// Run scope: the run's settled spend; window scope: the period's spend.
    pub spent: Money,
    /// Run scope: the run's ceiling; window scope: the cap's limit.
    pub ceiling: Money,
    /// Window scope: the cap's readable name, e.g. `day:release=2026-03-21`.
    pub window: Option<String>,
}

/// How an admitted call relates to earlier calls of its run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallFlags {
    /// The client's SDK marked it as a retry.
    pub sdk_retry: bool,
    /// The run's previous settled call on the same route + model failed.
    pub repeat_after_failure: bool,
    /// Same body hash as one of the run's recent calls.
    pub duplicate_body: bool,
}

/// What a settled cost was spent on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CostKind {
    Llm,
    Tool,
}

/// A run's live state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSnapshot {
    pub run_id: String,
    pub release: String,
    pub request_type: String,
    pub spent: Money,
    pub llm_cost: Money,
    pub tool_cost: Money,
    pub reserved: Money,
    pub ceiling: Money,
    pub calls: u64,
    pub refusals: u64,
    pub retries: u64,
    pub repeated_calls: u64,
    pub started_ms: u64,
    pub last_seen_ms: u64,
    pub in_flight: u64,
}

/// A run's spend read back from the ledger after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredRun {
    pub run_id: String,
    pub release: String,
    pub request_type: String,
    /// `None`: resolve from the current policy's rules (no model known).
    pub ceiling: Option<Money>,
    pub llm_cost: Money,
    pub tool_cost: Money,
    pub started_ms: u64,
    pub last_seen_ms: u64,
    pub calls: u64,
    pub refusals: u64,
    pub retries: u64,
    pub repeated_calls: u64,
}

/// Process-lifetime figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Reservations of all calls in flight now.
    pub reserved_outstanding: Money,
    /// Everything settled since start (including drop-charged reservations).
    pub settled: Money,
    pub admitted_calls: u64,
    pub run_refusals: u64,
    pub window_refusals: u64,
    pub runs_started: u64,
    pub runs_ended: u64,
    pub runs_evicted: u64,
    /// New runs admitted while the registry was full of busy runs.
    pub over_capacity_admits: u64,
    pub active_runs: usize,
}

/// The budget layer: run registry, ceilings, window caps. `Send + Sync`;
/// share it through an `Arc`.
pub struct Budgets {
    shared: Arc<Shared>,
}

struct Active {
    policy: Arc<BudgetPolicy>,
    /// `windows[i]` counts the spend of `policy.windows[i]`.
    windows: Vec<Arc<WindowSlot>>,
}

#[derive(Default)]
struct Counters {
    reserved_outstanding: AtomicU64,
    settled: AtomicU64,
    admitted_calls: AtomicU64,
    run_refusals: AtomicU64,
    window_refusals: AtomicU64,
    runs_started: AtomicU64,
    runs_ended: AtomicU64,
    runs_evicted: AtomicU64,
    over_capacity_admits: AtomicU64,
}

struct Shared {
    active: ArcSwap<Active>,
    reload: Mutex<()>,
    runs: DashMap<RunKey, ()>,
    /// Where new runs' states come from.
    spare_runs: SpareRuns,
    /// Entries in `runs`: +1 under the shard lock of a vacant insert, −1
    /// after a successful `remove_if`: never below the true count, above it
    /// only for the instant around an insert or a removal.
    run_count: AtomicUsize,
    evicting: Mutex<()>,
    /// Interned release / request-type labels, bounded.
    labels: DashSet<Arc<str>>,
    /// Interned (release, request type) pairs, bounded.
    label_pairs: DashMap<(Arc<str>, Arc<str>), Arc<RunLabels>>,
    runs_config: ArcSwap<RunsConfig>,
    clock: Arc<dyn Clock>,
    sink: RunEndSink,
    counters: Counters,
    /// False when a shared state backend enforces ceilings and window caps
    /// for the fleet: this replica's view may be stale (a run ended and
    /// restarted elsewhere), so it must not refuse on it.
    enforces_limits: AtomicBool,
}

/// Distinct labels interned; beyond this each run allocates its own copy.
const MAX_INTERNED_LABELS: usize = 4096;
/// Admit retries when the run keeps being ended between lookup and lock.
const MAX_ADMIT_ATTEMPTS: usize = 64;

enum EndCause {
    Explicit {
        status: RunStatus,
        reason: Option<String>,
    },
    Idle {
        timeout_ms: u64,
    },
    Evict,
}

fn add_money(counter: &AtomicU64, amount: Money) {
    let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        Some(v.saturating_add(amount.picos()))
    });
}

fn sub_money(counter: &AtomicU64, amount: Money) {
    let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        Some(v.saturating_sub(amount.picos()))
    });
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Budgets {
    pub fn new(
        policy: BudgetPolicy,
        runs: RunsConfig,
        clock: Arc<dyn Clock>,
        sink: RunEndSink,
    ) -> Budgets {
        let policy = Arc::new(policy);
        let windows = policy
            .windows
            .iter()
            .map(|w| Arc::new(WindowSlot::new(w.name.clone(), w.period)))
            .collect();
        Budgets {
            shared: Arc::new(Shared {
                active: ArcSwap::from_pointee(Active { policy, windows }),
                reload: Mutex::new(()),
                runs: DashMap::new(),
                spare_runs: SpareRuns::default(),
                run_count: AtomicUsize::new(0),
                evicting: Mutex::new(()),
                labels: DashSet::new(),
                label_pairs: DashMap::new(),
                runs_config: ArcSwap::from_pointee(runs),
                clock,
                sink,
                counters: Counters::default(),
                enforces_limits: AtomicBool::new(true),
            }),
        }
    }

    /// Hot reload. Live runs keep their ceiling; window caps with the same
    /// match keys and period keep their period's spend.
    pub fn set_policy(&self, policy: BudgetPolicy) {
        let _reload = self
            .shared
            .reload
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let old = self.shared.active.load_full();
        let windows = policy
            .windows
            .iter()
            .map(|w| {
                old.windows
                    .iter()
                    .find(|slot| slot.name == w.name)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(WindowSlot::new(w.name.clone(), w.period)))
            })
            .collect();
        self.shared.active.store(Arc::new(Active {
            policy: Arc::new(policy),
            windows,
        }));
    }

    /// Hot reload of `[runs]`: a new idle timeout and registry bound apply
    /// from the next sweep / new run; a smaller body-hash history applies to
    /// runs as they record new hashes.
    pub fn set_runs_config(&self, runs: RunsConfig) {
        self.shared.runs_config.store(Arc::new(runs));
    }

    pub fn runs_config(&self) -> RunsConfig {
        RunsConfig::clone(&self.shared.runs_config.load())
    }

    pub fn policy(&self) -> Arc<BudgetPolicy> {
        Arc::clone(&self.shared.active.load().policy)
    }

    /// Leaves ceilings and window caps to a shared state backend: from now on
    /// [`Budgets::admit`] only registers calls (flags, in-flight counts,
    /// reservations) and never refuses; the fleet-wide check refuses instead.
    pub fn leave_limits_to_fleet(&self) {
        self.shared.enforces_limits.store(false, Ordering::Release);
    }

    /// Checks the run ceiling and the window caps, registers the call
    /// (starting its run on the first call) and holds its reservation.
    pub fn admit(&self, call: &CallRequest<'_>) -> Result<Admission, Refusal> {
        let shared = &self.shared;
        let active = shared.active.load_full();
        let policy = &active.policy;
        let now = shared.clock.now_ms();
        let enforce = shared.enforces_limits.load(Ordering::Acquire);

        let mut windows = Vec::new();
        let mut window_refusal = None;
        for (cap, slot) in policy.windows.iter().zip(&active.windows) {
            if !cap.matches(call.release, call.request_type, call.model, call.tool) {
                continue;
            }
            let spent = slot.spent(now);
            if enforce && spent >= cap.limit && window_refusal.is_none() {
                window_refusal = Some(Refusal {
                    scope: RefusalScope::Window,
                    run_id: call.run_id.map(str::to_string),
                    spent,
                    ceiling: cap.limit,
                    window: Some(cap.name.clone()),
                });
            }
            windows.push(Arc::clone(slot));
        }

        let kind = if call.tool.is_some() {
            CostKind::Tool
        } else {
            CostKind::Llm
        };
        let key = outcome_key(call.route, call.model);
        let hashes_per_run = shared.runs_config.load().max_body_hashes_per_run;

        let Some(run_id) = call.run_id else {
            if let Some(refusal) = window_refusal {
                bump(&shared.counters.window_refusals);
                return Err(refusal);
            }
            return Ok(shared.admitted(
                None,
                windows,
                call.reservation,
                kind,
                key,
                CallFlags::default(),
            ));
        };

        for _ in 0..MAX_ADMIT_ATTEMPTS {
            let run = shared.get_or_create(run_id, call, policy, now);
            let mut g = run.lock();
            if g.ended() {
                drop(g);
                shared.forget(&run);
                continue;
            }
            run.touch(&g, now);
            if let Some(asked) = call.budget_header {
                g.ceiling = asked.min(policy.max_run);
            }
            if let Some(refusal) = window_refusal {
                g.refusals = g.refusals.saturating_add(1);
                bump(&shared.counters.window_refusals);
                return Err(refusal);
            }
            let spent = g.spent();
            let refuse = enforce
                && match policy.mode {
                    BudgetMode::Reserve => {
                        spent
                            .saturating_add(g.reserved)
                            .saturating_add(call.reservation)
                            > g.ceiling
                    }
                    BudgetMode::Soft => spent >= g.ceiling,
                };
            if refuse {
                g.refusals = g.refusals.saturating_add(1);
                let refusal = Refusal {
                    scope: RefusalScope::Run,
                    run_id: Some(run_id.to_string()),
                    spent,
                    ceiling: g.ceiling,
                    window: None,
                };
                drop(g);
                bump(&shared.counters.run_refusals);
                return Err(refusal);
            }
            let duplicate_body = call
                .body_hash
                .is_some_and(|h| g.note_body(h, hashes_per_run));
            let flags = CallFlags {
                sdk_retry: call.sdk_retry_count.is_some_and(|n| n > 0),
                repeat_after_failure: g.failed_before(key),
                duplicate_body,
            };
            if flags.sdk_retry || flags.repeat_after_failure {
                g.retries = g.retries.saturating_add(1);
            }
            if flags.duplicate_body {
                g.repeated = g.repeated.saturating_add(1);
            }
            g.calls = g.calls.saturating_add(1);
            g.reserved = g.reserved.saturating_add(call.reservation);
            run.call_started(&g);
            drop(g);
            return Ok(shared.admitted(Some(run), windows, call.reservation, kind, key, flags));
        }
        // The run was ended between lookup and lock on every attempt (only
        // possible under a storm of finishes for this very id): admit the
        // call without a run rather than spin.
        tracing::warn!(
            run_id,
            "run kept ending during admission; call admitted without a run"
        );
        Ok(shared.admitted(
            None,
            windows,
            call.reservation,
            kind,
            key,
            CallFlags::default(),
        ))
    }

    /// How much the call's run could still reserve now (soft mode: spend
    /// left), without registering anything: for lowering `max_tokens` before
    /// [`Budgets::admit`]. `None` when the call has no run id.
    pub fn headroom(&self, call: &CallRequest<'_>) -> Option<Money> {
        let run_id = call.run_id?;
        let policy = self.policy();
        let run = self.shared.lookup(run_id);
        let (ceiling, spent, reserved) = match run {
            Some(run) => {
                let g = run.lock();
                let ceiling = match call.budget_header {
                    Some(asked) => asked.min(policy.max_run),
                    None => g.ceiling,
                };
                if g.ended() {
                    (
                        policy.resolve_ceiling(
                            call.release,
                            call.request_type,
                            call.model,
                            call.budget_header,
                        ),
                        Money::ZERO,
                        Money::ZERO,
                    )
                } else {
                    (ceiling, g.spent(), g.reserved)
                }
            }
            None => (
                policy.resolve_ceiling(
                    call.release,
                    call.request_type,
                    call.model,
                    call.budget_header,
                ),
                Money::ZERO,
                Money::ZERO,
            ),
        };
        Some(match policy.mode {
            BudgetMode::Reserve => ceiling.saturating_sub(spent).saturating_sub(reserved),
            BudgetMode::Soft => ceiling.saturating_sub(spent),
        })
    }

    /// Ends a run now (`POST /api/runs/{id}/finish`). False when no live run
    /// has this id, or another end won the race.
    pub fn finish_run(&self, run_id: &str, status: RunStatus, stop_reason: Option<&str>) -> bool {
        let Some(run) = self.shared.lookup(run_id) else {
            return false;
        };
        let cause = EndCause::Explicit {
            status,
            reason: stop_reason.map(str::to_string),
        };
        match self.shared.end_run(&run, cause) {
            Some(end) => {
                self.shared.emit(end);
                true
            }
            None => false,
        }
    }

    /// Ends every run idle for at least `idle_timeout_secs` with no call in
    /// flight (`stop_reason` `idle_timeout`, or `budget_exceeded` after a
    /// refusal; status `error` when its last call failed). Returns how many.
    pub fn sweep_idle(&self) -> usize {
        let shared = &self.shared;
        let timeout_ms = shared
            .runs_config
            .load()
            .idle_timeout_secs
            .saturating_mul(1_000);
        let now = shared.clock.now_ms();
        let candidates: Vec<RunRef> = shared
            .runs
            .iter()
            .filter(|e| {
                let run = &e.key().0;
                run.in_flight() == 0 && now.saturating_sub(run.last_seen_ms()) >= timeout_ms
            })
            .map(|e| RunRef::clone(&e.key().0))
            .collect();
        let mut ended = 0;
        for run in candidates {
            if let Some(end) = shared.end_run(&run, EndCause::Idle { timeout_ms }) {
                shared.emit(end);
                ended += 1;
            }
        }
        ended
    }

    pub fn run_snapshot(&self, run_id: &str) -> Option<RunSnapshot> {
        let run = self.shared.lookup(run_id)?;
        let g = run.lock();
        if g.ended() {
            return None;
        }
        Some(RunSnapshot {
            run_id: run.id.to_string(),
            release: g.labels.release.to_string(),
            request_type: g.labels.request_type.to_string(),
            spent: g.spent(),
            llm_cost: g.llm,
            tool_cost: g.tool,
            reserved: g.reserved,
            ceiling: g.ceiling,
            calls: u64::from(g.calls),
            refusals: u64::from(g.refusals),
            retries: u64::from(g.retries),
            repeated_calls: u64::from(g.repeated),
            started_ms: g.started_ms(),
            last_seen_ms: run.last_seen_ms(),
            in_flight: run.in_flight(),
        })
    }

    pub fn active_runs(&self) -> usize {
        self.shared.run_count.load(Ordering::Acquire)
    }

    pub fn totals(&self) -> Totals {
        let c = &self.shared.counters;
        Totals {
            reserved_outstanding: Money::from_picos(c.reserved_outstanding.load(Ordering::Acquire)),
            settled: Money::from_picos(c.settled.load(Ordering::Acquire)),
            admitted_calls: c.admitted_calls.load(Ordering::Relaxed),
            run_refusals: c.run_refusals.load(Ordering::Relaxed),
            window_refusals: c.window_refusals.load(Ordering::Relaxed),
            runs_started: c.runs_started.load(Ordering::Relaxed),
            runs_ended: c.runs_ended.load(Ordering::Relaxed),
            runs_evicted: c.runs_evicted.load(Ordering::Relaxed),
            over_capacity_admits: c.over_capacity_admits.load(Ordering::Relaxed),
            active_runs: self.active_runs(),
        }
    }

    /// Puts back a run's spend after a restart. Call once per run, before or
    /// after its first new call: a live run under the id keeps its ceiling
    /// and gets the restored spend and counts added.
    pub fn restore_run(&self, restored: RestoredRun) {
        let shared = &self.shared;
        let policy = self.policy();
        let ceiling = restored.ceiling.unwrap_or_else(|| {
            policy.resolve_ceiling(&restored.release, &restored.request_type, None, None)
        });
        let add = |g: &mut RunInner| {
            g.llm = g.llm.saturating_add(restored.llm_cost);
            g.tool = g.tool.saturating_add(restored.tool_cost);
            g.calls = g.calls.saturating_add(sat32(restored.calls));
            g.refusals = g.refusals.saturating_add(sat32(restored.refusals));
            g.retries = g.retries.saturating_add(sat32(restored.retries));
            g.repeated = g.repeated.saturating_add(sat32(restored.repeated_calls));
            let started_ms = g.started_ms().min(restored.started_ms);
            g.set_started_ms(started_ms);
        };
        for _ in 0..MAX_ADMIT_ATTEMPTS {
            if let Some(run) = shared.lookup(&restored.run_id) {
                let mut g = run.lock();
                if g.ended() {
                    drop(g);
                    shared.forget(&run);
                    continue;
                }
                add(&mut g);
                run.touch(&g, restored.last_seen_ms);
                return;
            }
            shared.make_room();
            let fresh = shared.spare_runs.take(
                &restored.run_id,
                NewRun {
                    ceiling,
                    labels: shared.intern_labels(&restored.release, &restored.request_type),
                    now_ms: restored.last_seen_ms,
                },
            );
            {
                let mut g = fresh.lock();
                g.set_started_ms(restored.started_ms);
                g.llm = restored.llm_cost;
                g.tool = restored.tool_cost;
                g.calls = sat32(restored.calls);
                g.refusals = sat32(restored.refusals);
                g.retries = sat32(restored.retries);
                g.repeated = sat32(restored.repeated_calls);
            }
            if shared.insert_if_vacant(&fresh) {
                return;
            }
        }
    }
}

fn sat32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl Shared {
    fn admitted(
        self: &Arc<Self>,
        run: Option<RunRef>,
        windows: Vec<Arc<WindowSlot>>,
        reservation: Money,
        kind: CostKind,
        key: u32,
        flags: CallFlags,
    ) -> Admission {
        add_money(&self.counters.reserved_outstanding, reservation);
        bump(&self.counters.admitted_calls);
        Admission {
            shared: Arc::clone(self),
            run,
            windows,
            reservation,
            kind,
            key,
            flags,
            done: false,
            global: None,
        }
    }

    fn lookup(&self, run_id: &str) -> Option<RunRef> {
        self.runs.get(run_id).map(|e| RunRef::clone(&e.key().0))
    }

    /// The shared labels of a (release, request type) pair; beyond
    /// `MAX_INTERNED_LABELS` pairs each run gets its own.
    fn intern_labels(&self, release: &str, request_type: &str) -> Arc<RunLabels> {
        let key = (self.intern(release), self.intern(request_type));
        if let Some(found) = self.label_pairs.get(&key) {
            return Arc::clone(found.value());
        }
        let fresh = Arc::new(RunLabels {
            release: Arc::clone(&key.0),
            request_type: Arc::clone(&key.1),
        });
        if self.label_pairs.len() < MAX_INTERNED_LABELS {
            self.label_pairs.insert(key, Arc::clone(&fresh));
        }
        fresh
    }

    fn intern(&self, label: &str) -> Arc<str> {
        if let Some(found) = self.labels.get(label) {
            return Arc::clone(found.key());
        }
        let fresh: Arc<str> = Arc::from(label);
        if self.labels.len() < MAX_INTERNED_LABELS {
            self.labels.insert(Arc::clone(&fresh));
        }
        fresh
    }

    fn get_or_create(
        &self,
        run_id: &str,
        call: &CallRequest<'_>,
        policy: &BudgetPolicy,
        now: u64,
    ) -> RunRef {
        if let Some(run) = self.lookup(run_id) {
            return run;
        }
        self.make_room();
        let fresh = self.spare_runs.take(
            run_id,
            NewRun {
                ceiling: policy.resolve_ceiling(
                    call.release,
                    call.request_type,
                    call.model,
                    call.budget_header,
                ),
                labels: self.intern_labels(call.release, call.request_type),
                now_ms: now,
            },
        );
        match self.runs.entry(RunKey(RunRef::clone(&fresh))) {
            Entry::Occupied(existing) => RunRef::clone(&existing.key().0),
            Entry::Vacant(slot) => {
                // Counted while the shard is still locked, so the removal
                // (which needs that lock) can never be counted first.
                self.run_count.fetch_add(1, Ordering::AcqRel);
                slot.insert(());
                bump(&self.counters.runs_started);
                fresh
            }
        }
    }

    fn insert_if_vacant(&self, fresh: &RunRef) -> bool {
        match self.runs.entry(RunKey(RunRef::clone(fresh))) {
            Entry::Occupied(_) => false,
            Entry::Vacant(slot) => {
                self.run_count.fetch_add(1, Ordering::AcqRel);
                slot.insert(());
                bump(&self.counters.runs_started);
                true
            }
        }
    }

    /// Removes `run`'s registry entry if it is still this very run.
    fn forget(&self, run: &RunRef) {
        if self
            .runs
            .remove_if(&*run.id, |k, ()| RunRef::ptr_eq(&k.0, run))
            .is_some()
        {
            let _ = self
                .run_count
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    Some(n.saturating_sub(1))
                });
        }
    }

    /// Before a new run is inserted: when the registry is full, ends the
    /// least recently active runs with no call in flight, a batch of 1/256
    /// of the capacity at a time so the scan is amortised. When every run is
    /// busy the new run is admitted anyway and counted.
    fn make_room(&self) {
        let max = self.runs_config.load().max_tracked_runs.max(1);
        if self.run_count.load(Ordering::Acquire) < max {
            return;
        }
        let mut ends = Vec::new();
        {
            let _one_evictor = self.evicting.lock().unwrap_or_else(PoisonError::into_inner);
            let count = self.run_count.load(Ordering::Acquire);
            if count < max {
                return;
            }
            let want = (count.saturating_add(1) - max).max(max / 256).max(1);
            let mut idle: Vec<(u64, RunRef)> = self
                .runs
                .iter()
                .filter(|e| e.key().0.in_flight() == 0)
                .map(|e| (e.key().0.last_seen_ms(), RunRef::clone(&e.key().0)))
                .collect();
            if idle.len() > want {
                idle.select_nth_unstable_by_key(want, |(seen, _)| *seen);
                idle.truncate(want);
            }
            for (_, run) in idle {
                if let Some(end) = self.end_run(&run, EndCause::Evict) {
                    ends.push(end);
                }
            }
            if ends.is_empty() {
                bump(&self.counters.over_capacity_admits);
                tracing::debug!(
                    runs = count,
                    "run registry full of busy runs; admitting over capacity"
                );
            }
        }
        for end in ends {
            self.emit(end);
        }
    }

    /// Ends `run` if `cause` still applies and nobody ended it before; the
    /// one caller that gets `Some` must [`Shared::emit`] it.
    fn end_run(&self, run: &RunRef, cause: EndCause) -> Option<RunEnd> {
        let now = self.clock.now_ms();
        let end = {
            let mut g = run.lock();
            if g.ended() {
                return None;
            }
            let evicted = matches!(cause, EndCause::Evict);
            let ended_explicitly = matches!(cause, EndCause::Explicit { .. });
            let (status, explicit, default_reason) = match cause {
                EndCause::Explicit { status, reason } => {
                    let default = match status {
                        RunStatus::Ok => "completed",
                        RunStatus::Error if g.last_failed() && g.last_was_tool() => "tool_error",
                        RunStatus::Error if g.last_failed() => "llm_error",
                        RunStatus::Error => "step_error",
                    };
                    (status, reason.filter(|r| !r.is_empty()), default)
                }
                EndCause::Idle { timeout_ms } => {
                    if run.in_flight() > 0 || now.saturating_sub(run.last_seen_ms()) < timeout_ms {
                        return None;
                    }
                    (idle_status(&g), None, "idle_timeout")
                }
                EndCause::Evict => {
                    if run.in_flight() > 0 {
                        return None;
                    }
                    (idle_status(&g), None, "idle_timeout")
                }
            };
            g.set_ended();
            let stop_reason = match explicit {
                Some(reason) => reason,
                None if g.refusals > 0 => "budget_exceeded".to_string(),
                None => default_reason.to_string(),
            };
            let cost = g.spent();
            RunEnd {
                run_id: run.id.to_string(),
                release: g.labels.release.to_string(),
                request_type: g.labels.request_type.to_string(),
                status,
                stop_reason,
                cost,
                llm_cost: g.llm,
                tool_cost: g.tool,
                ceiling: g.ceiling,
                breached: cost > g.ceiling,
                started_ms: g.started_ms(),
                ended_ms: now,
                calls: u64::from(g.calls),
                refusals: u64::from(g.refusals),
                retries: u64::from(g.retries),
                repeated_calls: u64::from(g.repeated),
                evicted,
                explicit: ended_explicitly,
            }
        };
        self.forget(run);
        bump(&self.counters.runs_ended);
        if end.evicted {
            bump(&self.counters.runs_evicted);
        }
        Some(end)
    }

    fn emit(&self, end: RunEnd) {
        (self.sink)(end);
    }

    /// Reverses [`Budgets::admit`] for a call that will not run.
    fn undo_admit(
        &self,
        run: Option<&RunRef>,
        reservation: Money,
        flags: CallFlags,
        refused: Option<RefusalScope>,
    ) {
        if let Some(run) = run {
            let mut g = run.lock();
            g.reserved = g.reserved.saturating_sub(reservation);
            g.calls = g.calls.saturating_sub(1);
            if flags.sdk_retry || flags.repeat_after_failure {
                g.retries = g.retries.saturating_sub(1);
            }
            if flags.duplicate_body {
                g.repeated = g.repeated.saturating_sub(1);
            }
            if refused.is_some() {
                g.refusals = g.refusals.saturating_add(1);
            }
            run.call_ended(&g);
        }
        sub_money(&self.counters.reserved_outstanding, reservation);
        let _ =
            self.counters
                .admitted_calls
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        match refused {
            Some(RefusalScope::Run) => bump(&self.counters.run_refusals),
            Some(RefusalScope::Window) => bump(&self.counters.window_refusals),
            None => {}
        }
    }

    /// Settles one call (explicitly or from `Drop`).
    #[allow(clippy::too_many_arguments)]
    fn finish_call(
        &self,
        run: Option<&RunRef>,
        windows: &[Arc<WindowSlot>],
        reservation: Money,
        cost: Money,
        kind: CostKind,
        outcome: Option<(u32, bool)>,
        end_run: Option<(RunStatus, Option<String>)>,
    ) {
        let now = self.clock.now_ms();
        if let Some(run) = run {
            {
                let mut g = run.lock();
                g.reserved = g.reserved.saturating_sub(reservation);
                match kind {
                    CostKind::Llm => g.llm = g.llm.saturating_add(cost),
                    CostKind::Tool => g.tool = g.tool.saturating_add(cost),
                }
                if let Some((key, failed)) = outcome {
                    g.note_outcome(key, failed);
                    g.set_last_outcome(failed, kind == CostKind::Tool);
                }
                run.call_ended(&g);
                run.touch(&g, now);
            }
        }
        for slot in windows {
            slot.add(now, cost);
        }
        sub_money(&self.counters.reserved_outstanding, reservation);
        add_money(&self.counters.settled, cost);
        if let (Some(run), Some((status, reason))) = (run, end_run) {
            if let Some(end) = self.end_run(run, EndCause::Explicit { status, reason }) {
                self.emit(end);
            }
        }
    }
}

fn idle_status(g: &RunInner) -> RunStatus {
    if g.last_failed() {
        RunStatus::Error
    } else {
        RunStatus::Ok
    }
}

/// RAII guard of one admitted call. Settle it with the real cost; dropped
/// unsettled, it is charged its reservation. Either way exactly once.
#[must_use = "an admission charges its reservation when dropped unsettled"]
pub struct Admission {
    shared: Arc<Shared>,
    run: Option<RunRef>,
    windows: Vec<Arc<WindowSlot>>,
    reservation: Money,
    kind: CostKind,
    key: u32,
    flags: CallFlags,
    done: bool,
    /// The call's admission in a shared state store, when one is configured.
    global: Option<SharedTicket>,
}

/// A run's figures in the shared state store right after a call was admitted
/// there (the whole fleet's spend, not only this replica's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedView {
    pub spent: Money,
    /// Reservations of the run's calls in flight, this one included.
    pub reserved: Money,
    pub ceiling: Money,
}

/// Called once when the call settles: cost, kind, failed, and the run's end
/// when the call carried one. Must not block.
pub type SharedSettle =
    Box<dyn FnOnce(Money, CostKind, bool, Option<(RunStatus, Option<String>)>) + Send + Sync>;

/// A call's admission in the shared state store, attached to its local
/// [`Admission`] with [`Admission::attach_shared`].
pub struct SharedTicket {
    /// `None` when the store could not be asked (admitted on local figures).
    pub view: Option<SharedView>,
    pub settle: SharedSettle,
}

impl std::fmt::Debug for SharedTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTicket")
            .field("view", &self.view)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("run_id", &self.run.as_ref().map(|r| &r.id))
            .field("reservation", &self.reservation)
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

impl Admission {
    pub fn flags(&self) -> CallFlags {
        self.flags
    }

    /// Attaches the call's admission in the shared state store: its figures
    /// then take part in [`Admission::run_spent`], [`Admission::ceiling`] and
    /// [`Admission::remaining`], and settling the call settles it there too.
    pub fn attach_shared(&mut self, ticket: SharedTicket) {
        self.global = Some(ticket);
    }

    fn shared_view(&self) -> Option<SharedView> {
        self.global.as_ref().and_then(|t| t.view)
    }

    /// The run's settled spend now (zero without a run); with a shared
    /// store, at least the fleet's spend when this call was admitted.
    pub fn run_spent(&self) -> Money {
        let local = self.run.as_ref().map_or(Money::ZERO, |r| r.lock().spent());
        self.shared_view().map_or(local, |v| local.max(v.spent))
    }

    /// The run's ceiling; `None` when the call has no run.
    pub fn ceiling(&self) -> Option<Money> {
        let local = self.run.as_ref().map(|r| r.lock().ceiling)?;
        Some(self.shared_view().map_or(local, |v| v.ceiling))
    }

    /// `ceiling − spent − reservations of the run's other calls in flight`.
    pub fn remaining(&self) -> Option<Money> {
        let run = self.run.as_ref()?;
        let (mut ceiling, mut spent, mut others) = {
            let g = run.lock();
            (
                g.ceiling,
                g.spent(),
                g.reserved.saturating_sub(self.reservation),
            )
        };
        if let Some(v) = self.shared_view() {
            ceiling = v.ceiling;
            spent = spent.max(v.spent);
            others = others.max(v.reserved.saturating_sub(self.reservation));
        }
        Some(ceiling.saturating_sub(spent).saturating_sub(others))
    }

    /// Takes back an admission the shared state store did not confirm: the
    /// reservation is released, the call is no longer counted, nothing is
    /// charged. `refused`: the store refused it (counted as a refusal here
    /// too); `None`: the store could not be asked.
    pub fn withdraw(mut self, refused: Option<RefusalScope>) {
        self.done = true;
        self.global = None;
        self.shared
            .undo_admit(self.run.as_ref(), self.reservation, self.flags, refused);
    }

    /// True when `running_cost` of this call no longer fits in
    /// [`Admission::remaining`] (for `stop_streams_over_budget`).
    pub fn over_budget(&self, running_cost: Money) -> bool {
        self.remaining().is_some_and(|left| running_cost > left)
    }

    pub fn reservation(&self) -> Money {
        self.reservation
    }

    pub fn run_id(&self) -> Option<&str> {
        self.run.as_deref().map(|r| &*r.id)
    }

    /// Settles the call exactly once with its real cost. `failed`: upstream
    /// status ≥ 400 or an in-band error. `end_run`: the call carried
    /// `x-agent-run-status`; the run ends once this call is settled.
    pub fn settle(
        mut self,
        cost: Money,
        kind: CostKind,
        failed: bool,
        end_run: Option<(RunStatus, Option<String>)>,
    ) {
        self.done = true;
        // Before the local settle, which may end the run: the shared store
        // must see this call's cost before the run's end.
        if let Some(ticket) = self.global.take() {
            (ticket.settle)(cost, kind, failed, end_run.clone());
        }
        self.shared.finish_call(
            self.run.as_ref(),
            &self.windows,
            self.reservation,
            cost,
            kind,
            Some((self.key, failed)),
            end_run,
        );
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        if let Some(ticket) = self.global.take() {
            (ticket.settle)(self.reservation, self.kind, false, None);
        }
        self.shared.finish_call(
            self.run.as_ref(),
            &self.windows,
            self.reservation,
            self.reservation,
            self.kind,
            None,
            None,
        );
    }
}
