//! Fuzz harnesses for tollgate's input-facing parsers. Each `fuzz_targets/*`
//! binary calls one function here. The bodies are in `harness.rs`, shared
//! with the main crate's stable smoke test; this file adds what only the
//! libFuzzer build has: a counting allocator that tracks live heap bytes, so
//! the usage-tap harness can check that memory stays within the tap's limits
//! plus the decoder window, whatever the body and however it is split.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

mod harness;

pub use harness::{attribution, chunk_filter, config, pricing, route};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Live heap bytes of the process.
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The usage tap, with its heap measured.
pub fn usage_tap(data: &[u8]) {
    harness::usage_tap(data, Some(live_bytes));
}
