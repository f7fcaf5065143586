//! Graceful shutdown of the served connections: [`Drain`] tells every open
//! connection to finish the call it is serving and close, then waits until
//! all of them have. The same signal stops a connection still waiting for
//! its first bytes ([`Watcher::stopped`]).
//!
//! This is hyper-util's `GracefulShutdown` with one change. Its wrapper
//! polls the shutdown signal (a tokio `watch`, ~170 instructions) on every
//! poll of the connection, and a connection is polled once per chunk of a
//! stream. [`Watcher::watch`] polls the signal only when it must: on the
//! connection's first poll, which registers the task's waker with the
//! signal; after shutdown has begun (a flag read); and when the connection
//! is polled with another waker than the one registered. Per OpenAI
//! stream of 34 events that is 5.9k instructions less (2.0 %), of the
//! 7.6k the watcher cost (BENCHMARKS.md, "Results, thirty-fifth round").

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use hyper_util::server::graceful::GracefulConnection;
use pin_project_lite::pin_project;
use tokio::sync::watch;

/// Owns the shutdown signal of one listener's connections.
pub(super) struct Drain {
    signal: watch::Sender<()>,
    begun: Arc<AtomicBool>,
}

impl Drain {
    pub(super) fn new() -> Drain {
        Drain {
            signal: watch::channel(()).0,
            begun: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A watcher for one connection, taken before its task starts.
    pub(super) fn watcher(&self) -> Watcher {
        Watcher {
            receiver: self.signal.subscribe(),
            begun: Arc::clone(&self.begun),
        }
    }

    /// Tells every watched connection to close gracefully, and returns
    /// once all of them have ended.
    pub(super) async fn shutdown(self) {
        // Set before the signal is sent: a connection woken by the signal
        // then finds the flag set and polls the signal.
        self.begun.store(true, Ordering::Release);
        let _ = self.signal.send(());
        self.signal.closed().await;
    }
}

/// Watches one connection for shutdown.
pub(super) struct Watcher {
    receiver: watch::Receiver<()>,
    begun: Arc<AtomicBool>,
}

impl Watcher {
    /// Resolves once shutdown has begun, for a connection not served yet
    /// (still waiting for its first bytes).
    pub(super) async fn stopped(&mut self) {
        let _ = self.receiver.changed().await;
    }

    /// Serves `connection` until it ends, telling it to close gracefully
    /// (finish the call in flight, then close) once [`Drain::shutdown`]
    /// begins.
    pub(super) fn watch<C: GracefulConnection>(
        self,
        connection: C,
    ) -> impl Future<Output = C::Output> {
        let Watcher {
            mut receiver,
            begun,
        } = self;
        Draining {
            connection,
            // Yields the receiver, which is kept until the connection ends:
            // `shutdown` waits for every receiver to go.
            signal: async move {
                let _ = receiver.changed().await;
                receiver
            },
            begun,
            registered: None,
            closing: None,
        }
    }
}

pin_project! {
    struct Draining<C, S: Future> {
        #[pin]
        connection: C,
        #[pin]
        signal: S,
        begun: Arc<AtomicBool>,
        // The waker the signal was last polled with: it holds it until the
        // signal fires.
        registered: Option<Waker>,
        // Set once the connection was told to close: the signal's receiver.
        closing: Option<S::Output>,
    }
}

impl<C, S> Future for Draining<C, S>
where
    C: GracefulConnection,
    S: Future,
{
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        let must_poll_signal = this.closing.is_none()
            && (this.begun.load(Ordering::Acquire)
                || !this
                    .registered
                    .as_ref()
                    .is_some_and(|waker| waker.will_wake(cx.waker())));
        if must_poll_signal {
            match this.signal.poll(cx) {
                Poll::Ready(receiver) => {
                    *this.closing = Some(receiver);
                    this.connection.as_mut().graceful_shutdown();
                }
                Poll::Pending => *this.registered = Some(cx.waker().clone()),
            }
        }
        this.connection.poll(cx)
    }
}
