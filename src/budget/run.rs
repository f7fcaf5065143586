//! Per-run state.
//!
//! Size on 64-bit targets: `RunState` is 176 bytes (asserted in the unit
//! tests), 192 behind its `Arc`; with the map entry (~28 bytes at the
//! table's load factor) and a 36-character run id behind its own `Arc`
//! (52 bytes, shared by the map key and the state) a tracked run costs
//! about 272 bytes, plus 4 bytes per remembered body hash (at most
//! `runs.max_body_hashes_per_run`, default 64 → 256 bytes, allocated as
//! calls arrive). Release and request-type labels are interned.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::money::Money;

/// Route + model combinations whose last settled call failed, remembered per
/// run for repeat-after-failure detection (oldest replaced when full).
const FAILED_KEYS: usize = 4;

pub(crate) struct RunState {
    pub(crate) id: Arc<str>,
    /// Mirrors of fields guarded by `inner`, written only under that lock,
    /// readable without it by the sweep and eviction scans.
    last_seen_ms: AtomicU64,
    in_flight: AtomicU32,
    inner: Mutex<RunInner>,
}

pub(crate) struct RunInner {
    pub(crate) ceiling: Money,
    pub(crate) llm: Money,
    pub(crate) tool: Money,
    /// Sum of the reservations of this run's calls in flight.
    pub(crate) reserved: Money,
    pub(crate) started_ms: u64,
    pub(crate) release: Arc<str>,
    pub(crate) request_type: Arc<str>,
    /// Ring of folded body hashes of the latest calls.
    body_hashes: Vec<u32>,
    failed_keys: [u32; FAILED_KEYS],
    pub(crate) calls: u32,
    pub(crate) refusals: u32,
    pub(crate) retries: u32,
    pub(crate) repeated: u32,
    hash_next: u16,
    failed_next: u8,
    pub(crate) last_failed: bool,
    pub(crate) last_was_tool: bool,
    /// Set exactly once, by whoever ends the run; a run that is `ended` is
    /// (or is about to be) gone from the registry and admits nothing.
    pub(crate) ended: bool,
}

pub(crate) struct NewRun {
    pub(crate) ceiling: Money,
    pub(crate) release: Arc<str>,
    pub(crate) request_type: Arc<str>,
    pub(crate) now_ms: u64,
}

impl RunState {
    pub(crate) fn new(id: Arc<str>, new: NewRun) -> RunState {
        RunState {
            id,
            last_seen_ms: AtomicU64::new(new.now_ms),
            in_flight: AtomicU32::new(0),
            inner: Mutex::new(RunInner {
                ceiling: new.ceiling,
                llm: Money::ZERO,
                tool: Money::ZERO,
                reserved: Money::ZERO,
                started_ms: new.now_ms,
                release: new.release,
                request_type: new.request_type,
                body_hashes: Vec::new(),
                failed_keys: [0; FAILED_KEYS],
                calls: 0,
                refusals: 0,
                retries: 0,
                repeated: 0,
                hash_next: 0,
                failed_next: 0,
                last_failed: false,
                last_was_tool: false,
                ended: false,
            }),
        }
    }

    /// The run's lock. Held only for arithmetic on this run: nothing blocks
    /// or awaits under it and no other lock is taken while it is held (map
    /// and window locks are taken before or after, never inside).
    pub(crate) fn lock(&self) -> MutexGuard<'_, RunInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn last_seen_ms(&self) -> u64 {
        self.last_seen_ms.load(Ordering::Acquire)
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Marks activity; call with the run's lock held.
    pub(crate) fn touch(&self, _held: &RunInner, now_ms: u64) {
        self.last_seen_ms.fetch_max(now_ms, Ordering::AcqRel);
    }

    /// Call with the run's lock held.
    pub(crate) fn call_started(&self, _held: &RunInner) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    /// Call with the run's lock held.
    pub(crate) fn call_ended(&self, _held: &RunInner) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

impl RunInner {
    pub(crate) fn spent(&self) -> Money {
        self.llm.saturating_add(self.tool)
    }

    /// Records `hash` among the latest `cap` body hashes; true when it was
    /// already there.
    pub(crate) fn note_body(&mut self, hash: u64, cap: usize) -> bool {
        let cap = cap.min(super::config::MAX_BODY_HASHES_PER_RUN);
        if cap == 0 {
            return false;
        }
        if self.body_hashes.len() > cap {
            // The history was shortened by a reload.
            self.body_hashes.truncate(cap);
            self.body_hashes.shrink_to_fit();
        }
        let folded = fold(hash);
        let seen = self.body_hashes.contains(&folded);
        if self.body_hashes.len() < cap {
            if self.body_hashes.len() == self.body_hashes.capacity() {
                let len = self.body_hashes.len();
                // Grow 4, 8, 16, … but never past `cap`.
                self.body_hashes.reserve_exact(len.max(4).min(cap - len));
            }
            self.body_hashes.push(folded);
        } else {
            let at = usize::from(self.hash_next) % cap;
            self.body_hashes[at] = folded;
            self.hash_next = u16::try_from((at + 1) % cap).unwrap_or(0);
        }
        seen
    }

    /// True when the last settled call on this route + model failed.
    pub(crate) fn failed_before(&self, key: u32) -> bool {
        self.failed_keys.contains(&key)
    }

    /// Remembers the outcome of a settled call on route + model `key`.
    pub(crate) fn note_outcome(&mut self, key: u32, failed: bool) {
        let at = self.failed_keys.iter().position(|k| *k == key);
        match (failed, at) {
            (true, None) => {
                let slot = usize::from(self.failed_next) % FAILED_KEYS;
                self.failed_keys[slot] = key;
                self.failed_next = u8::try_from((slot + 1) % FAILED_KEYS).unwrap_or(0);
            }
            (false, Some(i)) => self.failed_keys[i] = 0,
            _ => {}
        }
    }
}

/// 32 bits of a 64-bit hash; collisions among 64 remembered hashes happen
/// about once in 67 million calls.
fn fold(hash: u64) -> u32 {
    (hash ^ (hash >> 32)) as u32
}

/// Key of a route + model pair, never 0 (0 marks an empty slot).
pub(crate) fn outcome_key(route: &str, model: Option<&str>) -> u32 {
    // FNV-1a: deterministic and cheap; a collision only merges two pairs'
    // failure memory.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in route
        .bytes()
        .chain(std::iter::once(0xff))
        .chain(model.unwrap_or("").bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    fold(h).max(1)
}
