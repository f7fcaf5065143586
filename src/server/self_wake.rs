//! Polls a connection again at once when it wakes itself during its own
//! poll, instead of handing it back to the runtime.
//!
//! hyper runs the handler inside the connection's task, and its request-body
//! channel wakes the other side at each hand-over: the handler asking for
//! the body wakes the connection's reader, and the reader handing it over
//! wakes the handler, both in the same task, during the same poll. tokio
//! takes a task woken during its own poll for a task that yields: it goes
//! to the back of the run queue and an idle worker is woken to steal it (a
//! futex call on each side, the other core woken up, and the connection
//! often carried over to it). At a moderate call rate that was every call
//! (`strace -f` at 500 calls/s: 2.2 futex calls per call, against 0.07 for
//! hyper forwarding the body without reading it).
//!
//! [`SelfWakes`] polls the connection with a waker of its own. A wake that
//! arrives while the connection is being polled marks it, and the
//! connection is polled again before the poll returns; a wake at any other
//! time goes to the task's waker as before. A wake from another thread
//! during the poll is never lost: the mark and its check are one atomic
//! state. The re-polls stop when the task's cooperative budget is spent or
//! after [`MAX_REPOLLS`], so a future that yields on purpose (hyper's
//! dispatcher does after 16 rounds) still yields.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use pin_project_lite::pin_project;

/// Not being polled: a wake goes to the task.
const IDLE: u8 = 0;
/// Being polled: a wake only marks the state.
const POLLING: u8 = 1;
/// Woken while being polled: poll again.
const WOKEN_IN_POLL: u8 = 2;

/// Most re-polls in one poll of the task before it yields to the runtime.
const MAX_REPOLLS: u32 = 4;

struct Shared {
    state: AtomicU8,
    /// The waker of the task that last polled the connection.
    task: AtomicWaker,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self.state.compare_exchange(
            POLLING,
            WOKEN_IN_POLL,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            // The poll in progress sees the mark and polls again.
            Ok(_) | Err(WOKEN_IN_POLL) => {}
            Err(_) => self.task.wake(),
        }
    }
}

pin_project! {
    /// A future that polls `inner` again, at once, when `inner` wakes
    /// itself while it is being polled (see the module docs).
    pub struct SelfWakes<F> {
        #[pin]
        inner: F,
        shared: Arc<Shared>,
        waker: Waker,
    }
}

impl<F> SelfWakes<F> {
    pub fn new(inner: F) -> SelfWakes<F> {
        let shared = Arc::new(Shared {
            state: AtomicU8::new(IDLE),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(Arc::clone(&shared));
        SelfWakes {
            inner,
            shared,
            waker,
        }
    }
}

impl<F: Future> Future for SelfWakes<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let mut this = self.project();
        this.shared.task.register(cx.waker());
        let mut inner_cx = Context::from_waker(this.waker);
        let mut repolls = 0;
        loop {
            this.shared.state.store(POLLING, Ordering::Release);
            let poll = this.inner.as_mut().poll(&mut inner_cx);
            // One atomic step: a wake from another thread either marked the
            // state before this (seen here) or finds it idle afterwards and
            // wakes the task.
            let woken = this.shared.state.swap(IDLE, Ordering::AcqRel) == WOKEN_IN_POLL;
            if poll.is_ready() || !woken {
                return poll;
            }
            repolls += 1;
            if repolls > MAX_REPOLLS || !tokio::task::coop::has_budget_remaining() {
                // Yield as the wake asked, letting the runtime run others.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::AtomicUsize;

    /// Counts the wakes that reach the task.
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting_task() -> Arc<CountingWaker> {
        Arc::new(CountingWaker(AtomicUsize::new(0)))
    }

    fn task_wakes(task: &CountingWaker) -> usize {
        task.0.load(Ordering::SeqCst)
    }

    fn poll_once<F: Future>(
        future: Pin<&mut SelfWakes<F>>,
        task: &Arc<CountingWaker>,
    ) -> Poll<F::Output> {
        let waker = Waker::from(Arc::clone(task));
        future.poll(&mut Context::from_waker(&waker))
    }

    /// Wakes itself during its first `self_wakes` polls, then is ready;
    /// counts its polls.
    struct WakesItself {
        self_wakes: u32,
        polls: u32,
    }

    impl WakesItself {
        fn new(self_wakes: u32) -> WakesItself {
            WakesItself {
                self_wakes,
                polls: 0,
            }
        }
    }

    impl Future for WakesItself {
        type Output = u32;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
            self.polls += 1;
            if self.polls > self.self_wakes {
                return Poll::Ready(self.polls);
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[test]
    fn a_wake_during_the_poll_is_a_repoll_not_a_task_wake() {
        let task = counting_task();
        let mut future = std::pin::pin!(SelfWakes::new(WakesItself::new(2)));
        assert_eq!(poll_once(future.as_mut(), &task), Poll::Ready(3));
        assert_eq!(task_wakes(&task), 0);
    }

    #[test]
    fn a_future_that_keeps_waking_itself_still_yields_to_the_task() {
        let task = counting_task();
        let mut future = std::pin::pin!(SelfWakes::new(WakesItself::new(100)));
        assert_eq!(poll_once(future.as_mut(), &task), Poll::Pending);
        // Polled once and re-polled `MAX_REPOLLS` times, then yielded with
        // one wake of the task.
        assert_eq!(future.as_mut().project().inner.polls, 1 + MAX_REPOLLS);
        assert_eq!(task_wakes(&task), 1);
    }

    #[test]
    fn a_wake_after_the_poll_reaches_the_task() {
        let task = counting_task();
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let mut future = std::pin::pin!(SelfWakes::new(rx));
        assert!(poll_once(future.as_mut(), &task).is_pending());
        assert_eq!(task_wakes(&task), 0);
        let sender = std::thread::spawn(move || tx.send(7));
        sender.join().unwrap().unwrap();
        assert_eq!(task_wakes(&task), 1);
        assert!(matches!(
            poll_once(future.as_mut(), &task),
            Poll::Ready(Ok(7))
        ));
    }

    /// Polls a oneshot receiver, then spins `spin` rounds before
    /// returning, so a send from another thread lands anywhere in the poll.
    struct SlowPoll {
        rx: tokio::sync::oneshot::Receiver<u8>,
        spin: u32,
        in_poll: Option<Arc<std::sync::Barrier>>,
    }

    impl Future for SlowPoll {
        type Output = u8;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u8> {
            let poll = Pin::new(&mut self.rx).poll(cx);
            if let Some(barrier) = self.in_poll.take() {
                // The sender sends now, while this poll is in progress, and
                // this poll waits until it has.
                barrier.wait();
                barrier.wait();
            }
            for _ in 0..self.spin {
                std::hint::spin_loop();
            }
            poll.map(Result::unwrap)
        }
    }

    #[test]
    fn a_wake_from_another_thread_during_the_poll_is_a_repoll() {
        let task = counting_task();
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let sender_barrier = Arc::clone(&barrier);
        let sender = std::thread::spawn(move || {
            sender_barrier.wait();
            let _ = tx.send(5);
            sender_barrier.wait();
        });
        let mut future = std::pin::pin!(SelfWakes::new(SlowPoll {
            rx,
            spin: 0,
            in_poll: Some(barrier),
        }));
        assert_eq!(poll_once(future.as_mut(), &task), Poll::Ready(5));
        assert_eq!(task_wakes(&task), 0);
        sender.join().unwrap();
    }

    #[test]
    fn wakes_from_another_thread_racing_the_poll_are_never_lost() {
        // Each round a thread sends while the future may be in any part of
        // its poll. Either the poll returns the value, or the task is woken
        // afterwards; a round where neither happens is a lost wake.
        for round in 0..4_000 {
            let task = counting_task();
            let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
            let go = Arc::new(std::sync::Barrier::new(2));
            let sender_go = Arc::clone(&go);
            let sender = std::thread::spawn(move || {
                sender_go.wait();
                for _ in 0..round % 64 {
                    std::hint::spin_loop();
                }
                tx.send(1)
            });
            let mut future = std::pin::pin!(SelfWakes::new(SlowPoll {
                rx,
                spin: 64,
                in_poll: None,
            }));
            go.wait();
            let first = poll_once(future.as_mut(), &task);
            sender.join().unwrap().unwrap();
            if first.is_pending() {
                assert_eq!(task_wakes(&task), 1, "the wake was lost");
                assert_eq!(poll_once(future.as_mut(), &task), Poll::Ready(1));
            }
        }
    }
}
