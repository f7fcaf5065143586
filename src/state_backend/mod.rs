//! Shared state for several replicas (`[state] backend = "redis"`): one run
//! ceiling and one spend per window cap across the fleet, and each run
//! ended exactly once.
//!
//! # Flow
//!
//! The local [`crate::budget::Budgets`] still runs every call: it detects
//! retries and duplicates, counts calls in flight and feeds the stream
//! guard. Its spend is this replica's share, never more than the fleet's, so
//! a local refusal is also a fleet refusal and costs no round trip.
//!
//! 1. **reserve** — after a local admit, [`SharedState::reserve`] runs the
//!    RESERVE script (one round trip): window caps, then the run's ceiling
//!    against the fleet's spend and reservations, then the reservation. The
//!    answer becomes a [`SharedTicket`] on the local admission, or a
//!    refusal (the local admission is withdrawn). When Redis does not answer
//!    within `timeout_ms`, `on_state_error` decides: `fail_open` keeps the
//!    local admission and settles the call later by reconciliation,
//!    `fail_closed` withdraws it and the proxy answers 503.
//! 2. **settle** — settling the admission (explicitly or on drop) never
//!    waits: it hands a job to the one settle worker through a bounded
//!    channel (full: the job goes to the reconcile queue). The worker runs
//!    SETTLE (one round trip per call; the settles waiting at one time are
//!    sent together, pipelined on the connection); a failure moves the job
//!    to the reconcile queue.
//! 3. **run end** — a call carrying the run-status header ends its run in
//!    the worker right after its own SETTLE: END claims that incarnation
//!    (the script deletes it), and the replica whose END claimed it emits
//!    its [`RunEnd`] built from the fleet's figures. The finish API claims
//!    directly. Local ends only drop the local copy; every replica's sweeper
//!    runs SWEEP, which claims runs idle fleet-wide, each by exactly one
//!    replica.
//! 4. **reconcile** — a bounded queue of settlements (and ends) that did not
//!    reach Redis, retried in order by a background task as soon as Redis
//!    answers; recovery needs no restart. A job whose SETTLE reached Redis
//!    but whose answer was lost is applied twice (at-least-once).

mod redis;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::budget::{
    period_id, BudgetMode, BudgetPolicy, CallFlags, CallRequest, Clock, CostKind, Refusal,
    RefusalScope, RunEnd, RunEndSink, RunSnapshot, RunStatus, SharedTicket, SharedView,
    WindowPeriod,
};
use crate::config::{OnStateError, StateConfig};
use crate::metrics::{Metrics, StateErrorLabels, StateOpLabel};
use crate::money::Money;

use self::redis::{IdleBounds, RedisStore, Reserved, RunFields, SettleArgs};

/// Jobs waiting for the settle worker before new ones go to the reconcile
/// queue instead.
const SETTLE_CHANNEL: usize = 8192;
/// Jobs the settle worker sends to Redis together.
const WORKER_BATCH: usize = 256;
/// Jobs the reconcile queue holds; past it new ones are dropped and counted.
const RECONCILE_CAPACITY: usize = 100_000;
/// Runs one SWEEP claims at most.
const SWEEP_BATCH: usize = 100;
/// A run key lives at least this long after its last call.
const MIN_RUN_TTL_MS: u64 = 3_600_000;
/// A window counter outlives its period by this much.
const WINDOW_GRACE_MS: u64 = 86_400_000;
/// Pause of the reconcile task while Redis keeps failing.
const RECONCILE_RETRY: Duration = Duration::from_millis(200);

/// Why a shared state operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("redis: {0}")]
    Redis(String),
    #[error("unexpected reply: {0}")]
    Reply(String),
}

impl From<::redis::RedisError> for StateError {
    fn from(e: ::redis::RedisError) -> StateError {
        StateError::Redis(e.to_string())
    }
}

/// One operation on the store (the `op` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Reserve,
    Settle,
    End,
    Sweep,
    Reconcile,
    Read,
}

impl Op {
    const ALL: [Op; 6] = [
        Op::Reserve,
        Op::Settle,
        Op::End,
        Op::Sweep,
        Op::Reconcile,
        Op::Read,
    ];

    fn as_label(self) -> &'static str {
        match self {
            Op::Reserve => "reserve",
            Op::Settle => "settle",
            Op::End => "end",
            Op::Sweep => "sweep",
            Op::Reconcile => "reconcile",
            Op::Read => "read",
        }
    }
}

/// Outcome of [`SharedState::reserve`].
#[derive(Debug)]
pub enum SharedAdmit {
    Admitted(SharedTicket),
    Refused(Refusal),
}

/// What a call's settlement needs to find its keys again.
#[derive(Debug)]
struct CallKeys {
    run_id: Option<String>,
    /// (counter key, ttl ms) of each window cap the call matched.
    windows: Vec<(String, u64)>,
    /// For reconciliation, when the run must be created again.
    ceiling: Money,
    release: String,
    request_type: String,
    ttl_ms: u64,
}

#[derive(Debug)]
struct SettleJob {
    call: Arc<CallKeys>,
    /// `None`: admitted while the store was unreachable.
    gen: Option<u64>,
    reservation: Money,
    cost: Money,
    kind: CostKind,
    failed: bool,
    now_ms: u64,
    /// Retried after a failure (or never reserved): RECONCILE semantics.
    reconcile: bool,
    /// The call carried the run's end.
    end: Option<(RunStatus, Option<String>)>,
}

/// The end a call's run-status header asked for, claimed after its settle.
#[derive(Debug)]
struct EndJob {
    run_id: String,
    /// The incarnation the call belonged to; `None` when admitted without
    /// the store (any incarnation).
    gen: Option<u64>,
    status: RunStatus,
    stop_reason: Option<String>,
}

#[derive(Debug)]
enum Job {
    Settle(SettleJob),
    End(EndJob),
}

/// Rate-limited failure logging and the "reachable again" line.
struct Health {
    healthy: AtomicBool,
    last_logged: Mutex<[Option<Instant>; 5]>,
}

/// The Redis-backed shared state of one replica. See the module docs.
pub struct SharedState {
    store: RedisStore,
    on_error: OnStateError,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    /// Receives the run ends this replica claimed (metrics and ledger).
    emit: RunEndSink,
    jobs: mpsc::Sender<Job>,
    jobs_rx: Mutex<Option<mpsc::Receiver<Job>>>,
    reconcile: Mutex<VecDeque<Job>>,
    reconcile_wake: Notify,
    health: Health,
}

impl std::fmt::Debug for SharedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedState")
            .field("on_error", &self.on_error)
            .finish_non_exhaustive()
    }
}

/// `max(3 × idle timeout, 1 h)`: a live run's key never expires (every call
/// pushes it back), an abandoned one goes away eventually.
fn run_ttl_ms(idle_timeout_ms: u64) -> u64 {
    idle_timeout_ms.saturating_mul(3).max(MIN_RUN_TTL_MS)
}

fn period_ms(period: WindowPeriod) -> u64 {
    match period {
        WindowPeriod::Hour => 3_600_000,
        WindowPeriod::Day => 86_400_000,
        WindowPeriod::Month => 31 * 86_400_000,
    }
}

fn idle_bounds(now_ms: u64, idle_timeout_ms: u64) -> IdleBounds {
    IdleBounds {
        idle_before: now_ms.saturating_sub(idle_timeout_ms),
        stuck_before: now_ms.saturating_sub(idle_timeout_ms.saturating_mul(2)),
    }
}

impl SharedState {
    /// `None` for the memory backend. Connects lazily: an unreachable Redis
    /// here is not an error.
    pub fn from_config(
        config: &StateConfig,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        emit: RunEndSink,
    ) -> Result<Option<Arc<SharedState>>, String> {
        if config.backend == crate::config::StateBackend::Memory {
            return Ok(None);
        }
        let store = RedisStore::new(
            &config.url,
            &config.key_prefix,
            Duration::from_millis(config.timeout_ms),
        )?;
        let (jobs, jobs_rx) = mpsc::channel(SETTLE_CHANNEL);
        Ok(Some(Arc::new(SharedState {
            store,
            on_error: config.on_state_error,
            metrics,
            clock,
            emit,
            jobs,
            jobs_rx: Mutex::new(Some(jobs_rx)),
            reconcile: Mutex::new(VecDeque::new()),
            reconcile_wake: Notify::new(),
            health: Health {
                healthy: AtomicBool::new(true),
                last_logged: Mutex::new([None; 5]),
            },
        })))
    }

    pub fn on_error(&self) -> OnStateError {
        self.on_error
    }

    /// The sink for the local budgets' run ends: with a shared state they
    /// only drop the local copy. Explicit ends are claimed in Redis by the
    /// call that carried them (after its settle) or by the finish API, idle
    /// runs by the shared sweep; the claimer emits the end.
    pub fn local_end_sink() -> RunEndSink {
        Arc::new(|_: RunEnd| {})
    }

    /// Tells whether Redis answers (logged at start; not fatal).
    pub async fn check_reachable(&self) {
        match self.store.ping().await {
            Ok(()) => tracing::info!(
                message = "shared state backend reachable",
                backend = "redis"
            ),
            Err(error) => {
                self.health.healthy.store(false, Ordering::Release);
                tracing::warn!(message = "shared state backend unreachable at start; the failure policy applies until it answers", backend = "redis", policy = ?self.on_error, %error);
            }
        }
    }

    /// RESERVE for a call the local budgets admitted with `flags`.
    pub async fn reserve(
        self: &Arc<Self>,
        call: &CallRequest<'_>,
        policy: &BudgetPolicy,
        flags: CallFlags,
        idle_timeout_ms: u64,
    ) -> Result<SharedAdmit, StateError> {
        let now_ms = self.clock.now_ms();
        let keys = self.call_keys(call, policy, idle_timeout_ms, now_ms);
        if keys.run_id.is_none() && keys.windows.is_empty() {
            // Nothing shared to check or charge: no round trip.
            return Ok(SharedAdmit::Admitted(SharedTicket {
                view: None,
                settle: Box::new(|_, _, _, _| {}),
            }));
        }
        let caps: Vec<_> = policy
            .windows
            .iter()
            .filter(|cap| cap.matches(call.release, call.request_type, call.model, call.tool))
            .collect();
        let windows: Vec<(String, Money)> = keys
            .windows
            .iter()
            .zip(&caps)
            .map(|((key, _), cap)| (key.clone(), cap.limit))
            .collect();
        let args = redis::ReserveArgs {
            run_id: call.run_id,
            reservation: call.reservation,
            new_ceiling: keys.ceiling,
            header_ceiling: call.budget_header.map(|asked| asked.min(policy.max_run)),
            soft: policy.mode == BudgetMode::Soft,
            now_ms,
            ttl_ms: keys.ttl_ms,
            release: call.release,
            request_type: call.request_type,
            retry: flags.sdk_retry || flags.repeat_after_failure,
            repeated: flags.duplicate_body,
            windows: &windows,
        };
        let reply = self.observe(Op::Reserve, self.store.reserve(&args).await)?;
        Ok(match reply {
            Reserved::Admitted {
                gen,
                spent,
                reserved,
                ceiling,
            } => {
                let view = call.run_id.map(|_| SharedView {
                    spent,
                    reserved,
                    ceiling,
                });
                SharedAdmit::Admitted(self.ticket(keys, Some(gen), call.reservation, view))
            }
            Reserved::RunRefused { spent, ceiling } => SharedAdmit::Refused(Refusal {
                scope: RefusalScope::Run,
                run_id: call.run_id.map(str::to_string),
                spent,
                ceiling,
                window: None,
            }),
            Reserved::WindowRefused {
                window,
                spent,
                limit,
            } => SharedAdmit::Refused(Refusal {
                scope: RefusalScope::Window,
                run_id: call.run_id.map(str::to_string),
                spent,
                ceiling: limit,
                window: caps.get(window).map(|cap| cap.name.clone()),
            }),
        })
    }

    /// The ticket of a call admitted on local figures while Redis could not
    /// be asked (`fail_open`): its settlement goes to Redis as RECONCILE.
    pub fn unconfirmed_ticket(
        self: &Arc<Self>,
        call: &CallRequest<'_>,
        policy: &BudgetPolicy,
        idle_timeout_ms: u64,
    ) -> SharedTicket {
        let keys = self.call_keys(call, policy, idle_timeout_ms, self.clock.now_ms());
        self.ticket(keys, None, call.reservation, None)
    }

    fn call_keys(
        &self,
        call: &CallRequest<'_>,
        policy: &BudgetPolicy,
        idle_timeout_ms: u64,
        now_ms: u64,
    ) -> CallKeys {
        let windows = policy
            .windows
            .iter()
            .filter(|cap| cap.matches(call.release, call.request_type, call.model, call.tool))
            .map(|cap| {
                (
                    self.store
                        .window_key(&cap.name, period_id(cap.period, now_ms)),
                    period_ms(cap.period).saturating_add(WINDOW_GRACE_MS),
                )
            })
            .collect();
        CallKeys {
            run_id: call.run_id.map(str::to_string),
            windows,
            ceiling: policy.resolve_ceiling(
                call.release,
                call.request_type,
                call.model,
                call.budget_header,
            ),
            release: call.release.to_string(),
            request_type: call.request_type.to_string(),
            ttl_ms: run_ttl_ms(idle_timeout_ms),
        }
    }

    fn ticket(
        self: &Arc<Self>,
        keys: CallKeys,
        gen: Option<u64>,
        reservation: Money,
        view: Option<SharedView>,
    ) -> SharedTicket {
        let shared = Arc::clone(self);
        let call = Arc::new(keys);
        SharedTicket {
            view,
            settle: Box::new(move |cost, kind, failed, end| {
                let now_ms = shared.clock.now_ms();
                shared.enqueue(Job::Settle(SettleJob {
                    call,
                    gen,
                    reservation,
                    cost,
                    kind,
                    failed,
                    now_ms,
                    reconcile: gen.is_none(),
                    end,
                }));
            }),
        }
    }

    /// Hands a job to the settle worker without waiting.
    fn enqueue(&self, job: Job) {
        if let Err(e) = self.jobs.try_send(job) {
            let job = match e {
                mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job) => {
                    job
                }
            };
            self.push_reconcile(job);
        }
    }

    fn push_reconcile(&self, job: Job) {
        let job = match job {
            Job::Settle(mut settle) => {
                settle.reconcile = true;
                Job::Settle(settle)
            }
            end => end,
        };
        let pending = {
            let mut queue = self
                .reconcile
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if queue.len() >= RECONCILE_CAPACITY {
                None
            } else {
                queue.push_back(job);
                Some(queue.len())
            }
        };
        match pending {
            Some(n) => {
                self.metrics.state_reconcile_pending.set(n as i64);
                self.reconcile_wake.notify_one();
            }
            None => {
                self.metrics.state_reconcile_dropped.inc();
                tracing::error!(
                    message = "reconcile queue full; a settlement is lost to the shared state",
                    capacity = RECONCILE_CAPACITY
                );
            }
        }
    }

    /// Jobs waiting for reconciliation.
    pub fn reconcile_pending(&self) -> usize {
        self.reconcile
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Counts a round trip and its failure, logs (at most once a second per
    /// operation) and notes when Redis answers again.
    fn observe<T>(&self, op: Op, result: Result<T, StateError>) -> Result<T, StateError> {
        self.metrics
            .state_round_trips
            .get_or_create(&StateOpLabel {
                op: op.as_label().into(),
            })
            .inc();
        match &result {
            Ok(_) => {
                if !self.health.healthy.swap(true, Ordering::AcqRel) {
                    tracing::info!(
                        message = "shared state backend reachable again",
                        backend = "redis"
                    );
                }
            }
            Err(error) => {
                self.health.healthy.store(false, Ordering::Release);
                self.metrics
                    .state_errors
                    .get_or_create(&StateErrorLabels {
                        backend: "redis".into(),
                        op: op.as_label().into(),
                    })
                    .inc();
                let index = Op::ALL.iter().position(|o| *o == op).unwrap_or(0);
                let now = Instant::now();
                let log = {
                    let mut last = self
                        .health
                        .last_logged
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    let due = last[index]
                        .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1));
                    if due {
                        last[index] = Some(now);
                    }
                    due
                };
                if log {
                    tracing::warn!(message = "shared state operation failed", backend = "redis", op = op.as_label(), policy = ?self.on_error, %error);
                }
            }
        }
        result
    }

    async fn run_job(&self, job: &Job, op: Op) -> Result<(), StateError> {
        match job {
            Job::Settle(settle) => {
                let call = &settle.call;
                let args = SettleArgs {
                    run_id: call.run_id.as_deref(),
                    gen: settle.gen,
                    reservation: settle.reservation,
                    cost: settle.cost,
                    tool: settle.kind == CostKind::Tool,
                    failed: settle.failed,
                    now_ms: settle.now_ms,
                    ttl_ms: call.ttl_ms,
                    reconcile: settle.reconcile,
                    ceiling: call.ceiling,
                    release: &call.release,
                    request_type: &call.request_type,
                    windows: &call.windows,
                };
                let op = if settle.reconcile { Op::Reconcile } else { op };
                self.observe(op, self.store.settle(&args).await)?;
                if let (Some((status, reason)), Some(run_id)) = (&settle.end, &call.run_id) {
                    let end = Job::End(EndJob {
                        run_id: run_id.clone(),
                        gen: settle.gen,
                        status: *status,
                        stop_reason: reason.clone(),
                    });
                    // The settle is done: only the end is retried.
                    if Box::pin(self.run_job(&end, op)).await.is_err() {
                        self.push_reconcile(end);
                    }
                }
                Ok(())
            }
            Job::End(end) => {
                let now_ms = self.clock.now_ms();
                let op = if op == Op::Reconcile { op } else { Op::End };
                let claimed =
                    self.observe(op, self.store.end(&end.run_id, now_ms, None, end.gen).await)?;
                if let Some(fields) = claimed {
                    let stop_reason = match end.stop_reason.as_deref().filter(|r| !r.is_empty()) {
                        Some(reason) => reason.to_string(),
                        None => default_stop_reason(end.status, &fields),
                    };
                    let claim = Claim::Explicit {
                        status: end.status,
                        stop_reason,
                    };
                    (self.emit)(run_end(&end.run_id, &fields, claim, now_ms));
                }
                Ok(())
            }
        }
    }

    /// Ends a run now in the whole fleet (finish API): `Ok(false)` when no
    /// replica holds it live (or another end won).
    pub async fn finish_run(
        &self,
        run_id: &str,
        status: RunStatus,
        stop_reason: Option<&str>,
    ) -> Result<bool, StateError> {
        let now_ms = self.clock.now_ms();
        let claimed = self.observe(Op::End, self.store.end(run_id, now_ms, None, None).await)?;
        let Some(fields) = claimed else {
            return Ok(false);
        };
        let stop_reason = match stop_reason.filter(|r| !r.is_empty()) {
            Some(reason) => reason.to_string(),
            None => default_stop_reason(status, &fields),
        };
        (self.emit)(run_end(
            run_id,
            &fields,
            Claim::Explicit {
                status,
                stop_reason,
            },
            now_ms,
        ));
        Ok(true)
    }

    /// A live run as the whole fleet sees it (`GET /api/runs/{id}` on any
    /// replica): `Ok(None)` when no replica holds it live.
    pub async fn run_snapshot(&self, run_id: &str) -> Result<Option<RunSnapshot>, StateError> {
        let fields = self.observe(Op::Read, self.store.run_fields(run_id).await)?;
        Ok(fields.map(|fields| run_snapshot(run_id, &fields)))
    }

    /// SWEEP: claims runs idle across the fleet and emits their ends.
    /// Returns how many this replica claimed.
    pub async fn sweep(&self, idle_timeout_ms: u64) -> Result<usize, StateError> {
        let now_ms = self.clock.now_ms();
        let claimed = self.observe(
            Op::Sweep,
            self.store
                .sweep(now_ms, idle_bounds(now_ms, idle_timeout_ms), SWEEP_BATCH)
                .await,
        )?;
        let count = claimed.len();
        for (run_id, fields) in claimed {
            (self.emit)(run_end(&run_id, &fields, Claim::Idle, now_ms));
        }
        Ok(count)
    }

    /// Starts the settle worker and the reconcile task; both stop when
    /// `stop` flips, the worker after handing over what it still holds.
    pub fn spawn_workers(
        self: &Arc<Self>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let Some(mut jobs) = self
            .jobs_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return Vec::new();
        };
        let worker = {
            let shared = Arc::clone(self);
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let mut batch = Vec::with_capacity(WORKER_BATCH);
                loop {
                    let received = tokio::select! {
                        n = jobs.recv_many(&mut batch, WORKER_BATCH) => n,
                        _ = stop.wait_for(|s| *s) => break,
                    };
                    if received == 0 {
                        break;
                    }
                    shared.work(std::mem::take(&mut batch)).await;
                }
                // Settles that arrived before the stop still go out.
                let mut rest = Vec::new();
                while let Ok(job) = jobs.try_recv() {
                    rest.push(job);
                }
                shared.work(rest).await;
            })
        };
        let reconciler = {
            let shared = Arc::clone(self);
            let mut stop = stop;
            tokio::spawn(async move {
                loop {
                    shared.drain_reconcile().await;
                    tokio::select! {
                        () = shared.reconcile_wake.notified() => {}
                        () = tokio::time::sleep(RECONCILE_RETRY) => {}
                        _ = stop.wait_for(|s| *s) => break,
                    }
                }
                shared.drain_reconcile().await;
            })
        };
        vec![worker, reconciler]
    }

    /// Runs a batch of settles together (pipelined on the one connection;
    /// settles commute, and a run's end follows its own call's settle
    /// inside that job).
    async fn work(&self, jobs: Vec<Job>) {
        let results = futures_util::future::join_all(jobs.iter().map(|job| {
            let op = match job {
                Job::Settle(_) => Op::Settle,
                Job::End(_) => Op::End,
            };
            self.run_job(job, op)
        }))
        .await;
        for (job, result) in jobs.into_iter().zip(results) {
            if result.is_err() {
                self.push_reconcile(job);
            }
        }
    }

    /// Retries queued jobs in order until one fails (Redis still away).
    async fn drain_reconcile(&self) {
        loop {
            let job = self
                .reconcile
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front();
            let Some(job) = job else { break };
            if self.run_job(&job, Op::Reconcile).await.is_err() {
                self.reconcile
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push_front(job);
                break;
            }
        }
        self.metrics
            .state_reconcile_pending
            .set(self.reconcile_pending() as i64);
    }
}

enum Claim {
    Explicit {
        status: RunStatus,
        stop_reason: String,
    },
    Idle,
}

fn field_u64(fields: &RunFields, name: &str) -> u64 {
    fields
        .get(name)
        .and_then(|v| redis::number(v).ok())
        .unwrap_or(0)
}

fn field_money(fields: &RunFields, name: &str) -> Money {
    fields
        .get(name)
        .and_then(|v| redis::money(v).ok())
        .unwrap_or(Money::ZERO)
}

/// As the local budgets decide it: a refusal makes `budget_exceeded`, else
/// the outcome of the run's last call.
fn default_stop_reason(status: RunStatus, fields: &RunFields) -> String {
    let last_failed = field_u64(fields, "last_failed") == 1;
    let last_tool = fields.get("last_kind").is_some_and(|k| k == "tool");
    if field_u64(fields, "refusals") > 0 {
        return "budget_exceeded".into();
    }
    match status {
        RunStatus::Ok => "completed",
        RunStatus::Error if last_failed && last_tool => "tool_error",
        RunStatus::Error if last_failed => "llm_error",
        RunStatus::Error => "step_error",
    }
    .into()
}

/// The fleet-wide [`RunEnd`] of a claimed run.
fn run_snapshot(run_id: &str, fields: &RunFields) -> RunSnapshot {
    let llm_cost = field_money(fields, "llm");
    let tool_cost = field_money(fields, "tool");
    RunSnapshot {
        run_id: run_id.to_string(),
        release: fields.get("release").cloned().unwrap_or_default(),
        request_type: fields.get("request_type").cloned().unwrap_or_default(),
        spent: llm_cost.saturating_add(tool_cost),
        llm_cost,
        tool_cost,
        reserved: field_money(fields, "reserved"),
        ceiling: field_money(fields, "ceiling"),
        calls: field_u64(fields, "calls"),
        refusals: field_u64(fields, "refusals"),
        retries: field_u64(fields, "retries"),
        repeated_calls: field_u64(fields, "repeated"),
        started_ms: field_u64(fields, "started_ms"),
        last_seen_ms: field_u64(fields, "last_seen_ms"),
        in_flight: field_u64(fields, "in_flight"),
    }
}

fn run_end(run_id: &str, fields: &RunFields, claim: Claim, now_ms: u64) -> RunEnd {
    let llm_cost = field_money(fields, "llm");
    let tool_cost = field_money(fields, "tool");
    let cost = llm_cost.saturating_add(tool_cost);
    let ceiling = field_money(fields, "ceiling");
    let (status, stop_reason, explicit) = match claim {
        Claim::Explicit {
            status,
            stop_reason,
        } => (status, stop_reason, true),
        Claim::Idle => {
            let status = if field_u64(fields, "last_failed") == 1 {
                RunStatus::Error
            } else {
                RunStatus::Ok
            };
            let reason = if field_u64(fields, "refusals") > 0 {
                "budget_exceeded"
            } else {
                "idle_timeout"
            };
            (status, reason.to_string(), false)
        }
    };
    RunEnd {
        run_id: run_id.to_string(),
        release: fields.get("release").cloned().unwrap_or_default(),
        request_type: fields.get("request_type").cloned().unwrap_or_default(),
        status,
        stop_reason,
        cost,
        llm_cost,
        tool_cost,
        ceiling,
        breached: cost > ceiling,
        started_ms: field_u64(fields, "started_ms"),
        ended_ms: now_ms,
        calls: field_u64(fields, "calls"),
        refusals: field_u64(fields, "refusals"),
        retries: field_u64(fields, "retries"),
        repeated_calls: field_u64(fields, "repeated"),
        evicted: false,
        explicit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> RunFields {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn run_end_from_fields_uses_the_fleet_figures() {
        let f = fields(&[
            ("llm", "3000000000000"),
            ("tool", "500000000000"),
            ("ceiling", "3000000000000"),
            ("calls", "7"),
            ("refusals", "0"),
            ("release", "r1"),
            ("request_type", "chat"),
            ("started_ms", "10"),
            ("last_failed", "1"),
            ("last_kind", "tool"),
        ]);
        let end = run_end("run", &f, Claim::Idle, 99);
        assert_eq!(end.cost, Money::from_picos(3_500_000_000_000));
        assert!(end.breached);
        assert_eq!(end.status, RunStatus::Error);
        assert_eq!(end.stop_reason, "idle_timeout");
        assert_eq!(end.calls, 7);
        assert!(!end.explicit);
        assert_eq!(default_stop_reason(RunStatus::Error, &f), "tool_error");
        let refused = fields(&[("refusals", "2")]);
        assert_eq!(
            default_stop_reason(RunStatus::Ok, &refused),
            "budget_exceeded"
        );
    }

    #[test]
    fn run_ttl_outlives_the_idle_timeout() {
        assert_eq!(run_ttl_ms(60_000), MIN_RUN_TTL_MS);
        assert_eq!(run_ttl_ms(7_200_000), 21_600_000);
    }

    #[test]
    fn negative_figures_read_as_zero() {
        assert_eq!(redis::money("-5").unwrap(), Money::ZERO);
        assert!(redis::money("x").is_err());
    }
}
