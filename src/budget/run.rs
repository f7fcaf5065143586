//! Per-run state.
//!
//! Size on 64-bit targets: `RunState` is 128 bytes, 136 with the count of
//! its [`RunRef`] (asserted in the unit tests): one 144-byte allocator
//! block (glibc adds 8 bytes to a request and rounds up to 16). An id of up
//! to `INLINE_ID` bytes is kept in the state itself, a longer one in its
//! own exact-size allocation. The registry stores only that `RunRef` (8
//! bytes a slot; the map hashes and compares by the id inside the state),
//! so a tracked run with a short id costs one block plus ~10 bytes of map,
//! and with a 36-character id one more block of 48 bytes. States are
//! allocated [`SPARE_BLOCK`] at a time, next to each other (see
//! [`SpareRuns`]). Release and request-type labels are interned as a pair
//! (one pointer per run). Body hashes: the first `INLINE_HASHES` are kept
//! inline, more go to a boxed vector that grows as calls arrive (4 bytes a
//! hash, at most `runs.max_body_hashes_per_run`, default 64 → 256 bytes).

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use triomphe::UniqueArc;

use crate::money::Money;

/// Route + model combinations whose last settled call failed, remembered per
/// run for repeat-after-failure detection (the oldest forgotten when full):
/// the two latest, which covers an agent alternating between a model and a
/// tool. Two more would take the state past 128 bytes.
const FAILED_KEYS: usize = 2;

/// A run's release and request-type labels, shared by the runs that have
/// the same pair.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RunLabels {
    pub(crate) release: Arc<str>,
    pub(crate) request_type: Arc<str>,
}

/// A shared handle on a run's state: `triomphe`'s `Arc`, whose one count
/// (no weak count) keeps the state and its count in a 144-byte block.
pub(crate) type RunRef = triomphe::Arc<RunState>;

pub(crate) struct RunState {
    pub(crate) id: RunId,
    /// The last activity (ms) and the calls in flight, packed in one word
    /// (see [`Activity`]): written only under the lock of `inner`, readable
    /// without it by the sweep and eviction scans.
    activity: AtomicU64,
    inner: Mutex<RunInner>,
}

/// The packing of [`RunState::activity`]: the time of the last activity in
/// the high 44 bits (milliseconds since 1970; they last until the year
/// 2527), the calls in flight in the low 20. One word instead of two is part
/// of what keeps a run's state at 128 bytes (see the module doc).
struct Activity;

impl Activity {
    const FLIGHT_BITS: u32 = 20;
    const MAX_FLIGHT: u64 = (1 << Self::FLIGHT_BITS) - 1;
    const MAX_MS: u64 = u64::MAX >> Self::FLIGHT_BITS;

    fn pack(last_seen_ms: u64, in_flight: u64) -> u64 {
        (last_seen_ms.min(Self::MAX_MS) << Self::FLIGHT_BITS) | in_flight.min(Self::MAX_FLIGHT)
    }

    fn last_seen_ms(word: u64) -> u64 {
        word >> Self::FLIGHT_BITS
    }

    fn in_flight(word: u64) -> u64 {
        word & Self::MAX_FLIGHT
    }
}

pub(crate) struct RunInner {
    pub(crate) ceiling: Money,
    pub(crate) llm: Money,
    pub(crate) tool: Money,
    /// Sum of the reservations of this run's calls in flight.
    pub(crate) reserved: Money,
    /// The start and the flags (see [`StartAndFlags`]).
    started: StartAndFlags,
    pub(crate) labels: Arc<RunLabels>,
    /// Folded body hashes of the latest calls, oldest first.
    body_hashes: BodyHashes,
    /// Keys of the route + model pairs whose last settled call failed,
    /// oldest first, then zeros.
    failed_keys: [u32; FAILED_KEYS],
    pub(crate) calls: u32,
    pub(crate) refusals: u32,
    pub(crate) retries: u32,
    pub(crate) repeated: u32,
}

/// A run's start (milliseconds since 1970) in the low 44 bits, as
/// [`Activity`] keeps times, and its three flags in the bits above. A `u64`
/// and three `bool`s took 16 bytes with the padding; one word is part of
/// what keeps the state at 128 bytes.
#[derive(Clone, Copy)]
struct StartAndFlags(u64);

impl StartAndFlags {
    const MAX_MS: u64 = Activity::MAX_MS;
    /// Set exactly once, by whoever ends the run; a run that is ended is
    /// (or is about to be) gone from the registry and admits nothing.
    const ENDED: u64 = 1 << 44;
    /// The last settled call failed.
    const LAST_FAILED: u64 = 1 << 45;
    /// The last settled call was a tool's.
    const LAST_WAS_TOOL: u64 = 1 << 46;

    fn new(started_ms: u64) -> StartAndFlags {
        StartAndFlags(started_ms.min(Self::MAX_MS))
    }

    fn ms(self) -> u64 {
        self.0 & Self::MAX_MS
    }

    fn with_ms(self, ms: u64) -> StartAndFlags {
        StartAndFlags((self.0 & !Self::MAX_MS) | ms.min(Self::MAX_MS))
    }

    fn has(self, flag: u64) -> bool {
        self.0 & flag != 0
    }

    fn with(self, flag: u64, on: bool) -> StartAndFlags {
        StartAndFlags(if on { self.0 | flag } else { self.0 & !flag })
    }
}

pub(crate) struct NewRun {
    pub(crate) ceiling: Money,
    pub(crate) labels: Arc<RunLabels>,
    pub(crate) now_ms: u64,
}

impl RunState {
    pub(crate) fn new(id: &str, new: NewRun) -> RunState {
        RunState {
            id: RunId::new(id),
            activity: AtomicU64::new(Activity::pack(new.now_ms, 0)),
            inner: Mutex::new(RunInner {
                ceiling: new.ceiling,
                llm: Money::ZERO,
                tool: Money::ZERO,
                reserved: Money::ZERO,
                started: StartAndFlags::new(new.now_ms),
                labels: new.labels,
                body_hashes: BodyHashes::default(),
                failed_keys: [0; FAILED_KEYS],
                calls: 0,
                refusals: 0,
                retries: 0,
                repeated: 0,
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
        Activity::last_seen_ms(self.activity.load(Ordering::Acquire))
    }

    /// Calls in flight (counted up to 2^20 − 1 at once).
    pub(crate) fn in_flight(&self) -> u64 {
        Activity::in_flight(self.activity.load(Ordering::Acquire))
    }

    /// Rewrites the activity word with `change(last_seen_ms, in_flight)`,
    /// by compare-exchange, so concurrent updates all land.
    fn update_activity(&self, change: impl Fn(u64, u64) -> (u64, u64)) {
        let _ = self
            .activity
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                let (seen, flight) =
                    change(Activity::last_seen_ms(word), Activity::in_flight(word));
                Some(Activity::pack(seen, flight))
            });
    }

    // The three below take the run's guard: ending a run checks its calls in
    // flight and last activity under that lock, so a call started or a touch
    // under it cannot fall between that check and `ended = true`.

    /// Marks activity.
    pub(crate) fn touch(&self, _held: &RunInner, now_ms: u64) {
        self.update_activity(|seen, flight| (seen.max(now_ms), flight));
    }

    pub(crate) fn call_started(&self, _held: &RunInner) {
        self.update_activity(|seen, flight| (seen, flight + 1));
    }

    pub(crate) fn call_ended(&self, _held: &RunInner) {
        self.update_activity(|seen, flight| (seen, flight.saturating_sub(1)));
    }
}

/// Run states allocated in blocks of this many at once (see [`SpareRuns`]).
pub(crate) const SPARE_BLOCK: usize = 256;

/// Spare, never-shared run states, allocated [`SPARE_BLOCK`] at a time.
///
/// Why: a run outlives the call that creates it, and that call allocates
/// and frees many short-lived blocks around it. One state allocated per
/// call sits between those blocks, and once they are freed the heap is
/// left with small holes between long-lived runs that larger allocations
/// (a connection's buffers) cannot use and that cannot be given back.
/// States allocated in a row lie next to each other instead.
#[derive(Default)]
pub(crate) struct SpareRuns {
    spare: Mutex<Vec<UniqueArc<RunState>>>,
}

impl SpareRuns {
    /// A new run's state, in a spare allocation.
    pub(crate) fn take(&self, id: &str, new: NewRun) -> RunRef {
        let popped = self.lock_spare().pop();
        let mut state = match popped {
            Some(state) => state,
            None => self.refill(&new.labels),
        };
        *state = RunState::new(id, new);
        state.shareable()
    }

    /// Allocates a block of spares outside the lock (so new runs on other
    /// threads do not wait for it), keeps all but one and returns that one.
    /// The block is built in the list's own buffer, taken out meanwhile, so
    /// a refill allocates the states and nothing else.
    fn refill(&self, labels: &Arc<RunLabels>) -> UniqueArc<RunState> {
        let blank = || {
            UniqueArc::new(RunState::new(
                "",
                NewRun {
                    ceiling: Money::ZERO,
                    labels: Arc::clone(labels),
                    now_ms: 0,
                },
            ))
        };
        let mut block = std::mem::take(&mut *self.lock_spare());
        block.reserve_exact(SPARE_BLOCK - 1);
        block.extend((1..SPARE_BLOCK).map(|_| blank()));
        let one = blank();
        let mut spare = self.lock_spare();
        if spare.is_empty() {
            *spare = block;
        } else {
            // Another thread refilled meanwhile.
            spare.append(&mut block);
        }
        one
    }

    fn lock_spare(&self) -> MutexGuard<'_, Vec<UniqueArc<RunState>>> {
        self.spare.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    pub(crate) fn spare_count(&self) -> usize {
        self.lock_spare().len()
    }
}

impl RunInner {
    pub(crate) fn spent(&self) -> Money {
        self.llm.saturating_add(self.tool)
    }

    pub(crate) fn started_ms(&self) -> u64 {
        self.started.ms()
    }

    pub(crate) fn set_started_ms(&mut self, ms: u64) {
        self.started = self.started.with_ms(ms);
    }

    pub(crate) fn ended(&self) -> bool {
        self.started.has(StartAndFlags::ENDED)
    }

    pub(crate) fn set_ended(&mut self) {
        self.started = self.started.with(StartAndFlags::ENDED, true);
    }

    pub(crate) fn last_failed(&self) -> bool {
        self.started.has(StartAndFlags::LAST_FAILED)
    }

    pub(crate) fn last_was_tool(&self) -> bool {
        self.started.has(StartAndFlags::LAST_WAS_TOOL)
    }

    /// Records how the last settled call went.
    pub(crate) fn set_last_outcome(&mut self, failed: bool, was_tool: bool) {
        self.started = self
            .started
            .with(StartAndFlags::LAST_FAILED, failed)
            .with(StartAndFlags::LAST_WAS_TOOL, was_tool);
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
            self.body_hashes.shorten(cap);
        }
        let folded = fold(hash);
        let seen = self.body_hashes.as_slice().contains(&folded);
        if self.body_hashes.len() < cap {
            self.body_hashes.push(folded, cap);
        } else {
            // Full: the oldest goes. Shifting (at most 4 KiB, 256 bytes by
            // default) keeps the order without a ring index in the state.
            let hashes = self.body_hashes.as_mut_slice();
            hashes.copy_within(1.., 0);
            hashes[cap - 1] = folded;
        }
        seen
    }

    /// True when the last settled call on this route + model failed.
    pub(crate) fn failed_before(&self, key: u32) -> bool {
        self.failed_keys.contains(&key)
    }

    /// Remembers the outcome of a settled call on route + model `key`.
    pub(crate) fn note_outcome(&mut self, key: u32, failed: bool) {
        let keys = &mut self.failed_keys;
        let filled = keys.iter().take_while(|k| **k != 0).count();
        let at = keys[..filled].iter().position(|k| *k == key);
        match (failed, at) {
            // Failed again: now the latest.
            (true, Some(i)) => keys[i..filled].rotate_left(1),
            (true, None) if filled < FAILED_KEYS => keys[filled] = key,
            (true, None) => {
                keys.rotate_left(1);
                keys[FAILED_KEYS - 1] = key;
            }
            (false, Some(i)) => {
                keys[i..filled].rotate_left(1);
                keys[filled - 1] = 0;
            }
            (false, None) => {}
        }
    }
}

/// Body hashes kept inline, without an allocation (runs of a few calls).
pub(crate) const INLINE_HASHES: usize = 3;

/// The remembered body hashes of a run: the first `INLINE_HASHES` in place,
/// then a vector. Boxed, so the enum takes 16 bytes instead of the 24 of a
/// `Vec`: the room an inline run id needs, paid for by one more small
/// allocation on runs of more than `INLINE_HASHES` calls.
enum BodyHashes {
    Inline {
        len: u8,
        hashes: [u32; INLINE_HASHES],
    },
    // A thin pointer on purpose (see above).
    #[allow(clippy::box_collection)]
    Heap(Box<Vec<u32>>),
}

impl Default for BodyHashes {
    fn default() -> BodyHashes {
        BodyHashes::Inline {
            len: 0,
            hashes: [0; INLINE_HASHES],
        }
    }
}

impl BodyHashes {
    fn as_slice(&self) -> &[u32] {
        match self {
            BodyHashes::Inline { len, hashes } => &hashes[..usize::from(*len)],
            BodyHashes::Heap(v) => v,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u32] {
        match self {
            BodyHashes::Inline { len, hashes } => &mut hashes[..usize::from(*len)],
            BodyHashes::Heap(v) => v,
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Keeps the latest `cap` hashes.
    fn shorten(&mut self, cap: usize) {
        let drop = self.len().saturating_sub(cap);
        match self {
            BodyHashes::Inline { len, hashes } => {
                hashes.copy_within(drop..usize::from(*len), 0);
                *len -= u8::try_from(drop).unwrap_or(*len);
            }
            BodyHashes::Heap(v) => {
                v.drain(..drop);
                v.shrink_to_fit();
            }
        }
    }

    /// Appends `hash`; the caller keeps the length below `cap`.
    fn push(&mut self, hash: u32, cap: usize) {
        match self {
            BodyHashes::Inline { len, hashes } if usize::from(*len) < INLINE_HASHES => {
                hashes[usize::from(*len)] = hash;
                *len += 1;
            }
            BodyHashes::Inline { hashes, .. } => {
                let mut v = Vec::with_capacity((2 * INLINE_HASHES).min(cap));
                v.extend_from_slice(hashes);
                v.push(hash);
                *self = BodyHashes::Heap(Box::new(v));
            }
            BodyHashes::Heap(v) => {
                if v.len() == v.capacity() {
                    let len = v.len();
                    // Grow by doubling, but never past `cap`.
                    v.reserve_exact(len.min(cap - len));
                }
                v.push(hash);
            }
        }
    }
}

/// Longest run id kept inside the run's state (longer ones are boxed).
pub(crate) const INLINE_ID: usize = 22;

/// A run id: in place when it is short, saving the allocation (and the
/// allocator's 32-byte minimum block) most ids would otherwise take.
pub(crate) enum RunId {
    Inline { len: u8, bytes: [u8; INLINE_ID] },
    Heap(Box<str>),
}

impl RunId {
    fn new(id: &str) -> RunId {
        match u8::try_from(id.len()) {
            Ok(len) if id.len() <= INLINE_ID => {
                let mut bytes = [0; INLINE_ID];
                bytes[..id.len()].copy_from_slice(id.as_bytes());
                RunId::Inline { len, bytes }
            }
            _ => RunId::Heap(Box::from(id)),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        match self {
            // The bytes were copied whole from a `str`, so they are UTF-8.
            RunId::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            RunId::Heap(id) => id,
        }
    }
}

impl std::ops::Deref for RunId {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for RunId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A registry entry: the run itself, hashed and compared by its id (so the
/// map needs no key of its own and is looked up with a `&str`).
#[derive(Clone)]
pub(crate) struct RunKey(pub(crate) RunRef);

impl Hash for RunKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `str` hashes, for lookups through `Borrow<str>`.
        self.0.id.as_str().hash(state);
    }
}

impl PartialEq for RunKey {
    fn eq(&self, other: &RunKey) -> bool {
        self.0.id.as_str() == other.0.id.as_str()
    }
}

impl Eq for RunKey {}

impl Borrow<str> for RunKey {
    fn borrow(&self) -> &str {
        self.0.id.as_str()
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
