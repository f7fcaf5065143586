//! The threads that serve agent connections: `server.workers` of them,
//! each running its own single-threaded tokio runtime, as nginx's worker
//! processes and Envoy's worker threads each run their own event loop.
//!
//! The accept loop hands each new connection to the next worker in turn,
//! and the connection lives on that worker: its socket is registered with
//! the worker's reactor, its timers with the worker's timer, and the
//! upstream connections its calls open run there too (each worker keeps
//! its own idle list in every upstream pool, [`slot`]). A call's request
//! and reply then pass from the client's connection to the upstream's and
//! back on one thread, where tokio's shared work-stealing runtime wakes
//! other threads as tasks move between its workers: BENCHMARKS.md, "Results,
//! twenty-seventh round".
//!
//! Everything else (the admin listener, background sweeps, the shared
//! state's connections) stays on the runtime that started tollgate.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// The worker this thread is, from 0; 0 on any other thread.
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

/// How long a stopping worker waits for blocking tasks it started.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// The index of the worker running on this thread (0 off the workers).
pub fn slot() -> usize {
    SLOT.with(Cell::get)
}

/// Running worker threads. Dropping this stops them without waiting.
pub struct Workers {
    handles: Vec<Handle>,
    /// Dropping a sender ends its worker's runtime.
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `count` worker threads (at least one).
    pub fn start(count: usize) -> std::io::Result<Workers> {
        let mut workers = Workers {
            handles: Vec::new(),
            stops: Vec::new(),
            threads: Vec::new(),
            next: AtomicUsize::new(0),
        };
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            workers.handles.push(runtime.handle().clone());
            workers.stops.push(stop);
            let thread = std::thread::Builder::new()
                .name(format!("tollgate-worker-{index}"))
                .spawn(move || {
                    SLOT.with(|slot| slot.set(index));
                    // Runs the connections spawned onto this runtime until
                    // the stop sender is dropped.
                    let _ = runtime.block_on(stopped);
                    runtime.shutdown_timeout(STOP_WAIT);
                })?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// The worker to take the next connection: each in turn.
    pub fn next(&self) -> &Handle {
        let at = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[at]
    }

    /// Stops the workers and waits for their threads to end. Blocks: call
    /// it off the async runtime.
    pub fn stop(mut self) {
        self.stops.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_to_each_worker_in_turn() {
        let workers = Workers::start(3).unwrap();
        let slots: Vec<usize> = (0..6)
            .map(|_| {
                let (tx, rx) = std::sync::mpsc::channel();
                workers
                    .next()
                    .spawn(async move { tx.send(slot()).unwrap() });
                rx.recv().unwrap()
            })
            .collect();
        assert_eq!(slots, [0, 1, 2, 0, 1, 2]);
        workers.stop();
    }

    #[test]
    fn stop_ends_the_threads_with_tasks_still_pending() {
        let workers = Workers::start(2).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        for _ in 0..2 {
            let tx = tx.clone();
            workers.next().spawn(async move {
                std::future::pending::<()>().await;
                drop(tx);
            });
        }
        drop(tx);
        workers.stop();
        // The pending tasks were dropped with their runtimes, and their
        // senders with them (the wait only bounds a failure).
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
    }
}
