//! Log lines reach stdout in batches: each event's line is appended to a
//! shared buffer, and one thread writes the buffer out at most
//! [`BATCH_WINDOW`] after the batch's first line.
//!
//! Writing each line from the runtime's workers cost a `write(2)` per call,
//! and the workers queued on stdout's lock while another was in that
//! syscall (futex waits that park a worker; see BENCHMARKS.md). nginx
//! (`access_log … buffer= flush=`) and Envoy (access logs flushed every
//! second) batch the same way. `tracing-appender`'s non-blocking writer
//! was not used because its thread is woken for every line; here only the
//! first line after a window with no line wakes it.
//!
//! Nothing is dropped: a batch past [`MAX_PENDING`] bytes is written by the
//! logging thread itself, and [`StdoutBatchGuard::flush_and_stop`] writes
//! what is left at shutdown. Lines keep their order: the output is always
//! taken while the buffer is held, then the buffer is released.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Longest time a line waits in the buffer.
pub const BATCH_WINDOW: Duration = Duration::from_millis(20);
/// Pending bytes past which the logging thread writes the batch itself.
const MAX_PENDING: usize = 1 << 20;

type Output = Mutex<Box<dyn Write + Send>>;

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    stopping: bool,
    /// The writing thread waits on `first_line` (nothing was logged in its
    /// last window): the next batch's first line must wake it. Otherwise it
    /// is sleeping out a window and takes the line when it ends.
    idle: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    first_line: Condvar,
    output: Output,
}

fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A [`MakeWriter`] for `tracing-subscriber` that batches lines to stdout.
#[derive(Clone)]
pub struct StdoutBatch {
    shared: Arc<Shared>,
}

/// Owns the writing thread; dropping it (or
/// [`StdoutBatchGuard::flush_and_stop`]) writes what is pending.
pub struct StdoutBatchGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl StdoutBatch {
    /// Starts the writing thread, writing to stdout.
    pub fn start() -> io::Result<(StdoutBatch, StdoutBatchGuard)> {
        Self::start_to(Box::new(io::stdout()))
    }

    fn start_to(output: Box<dyn Write + Send>) -> io::Result<(StdoutBatch, StdoutBatchGuard)> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            first_line: Condvar::new(),
            output: Mutex::new(output),
        });
        let thread = std::thread::Builder::new()
            .name("tollgate-log".into())
            .spawn({
                let shared = shared.clone();
                move || write_batches(&shared)
            })?;
        Ok((
            StdoutBatch {
                shared: shared.clone(),
            },
            StdoutBatchGuard {
                shared,
                thread: Some(thread),
            },
        ))
    }
}

impl StdoutBatchGuard {
    /// Writes every pending line and stops the thread; later lines are
    /// written directly.
    pub fn flush_and_stop(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        lock(&self.shared.pending).stopping = true;
        self.shared.first_line.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for StdoutBatchGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The writing thread: lets a batch fill for [`BATCH_WINDOW`], writes it
/// out. While lines keep coming it sleeps window after window, so a batch's
/// first line wakes no one (a `futex` call per batch, ~50 a second under
/// steady traffic); after a window with no line it waits for the next
/// batch's first line to wake it.
fn write_batches(shared: &Shared) {
    let mut batch = Vec::new();
    let mut busy = false;
    loop {
        let mut pending = lock(&shared.pending);
        if !busy {
            pending.idle = true;
            while pending.bytes.is_empty() && !pending.stopping {
                pending = shared
                    .first_line
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            pending.idle = false;
        }
        if pending.bytes.is_empty() && pending.stopping {
            return; // nothing is left
        }
        if !pending.stopping {
            drop(pending);
            std::thread::sleep(BATCH_WINDOW);
            pending = lock(&shared.pending);
        }
        busy = !pending.bytes.is_empty();
        if !busy {
            continue;
        }
        let mut output = lock(&shared.output);
        // Swap buffers so that lines keep arriving while this batch is out.
        std::mem::swap(&mut batch, &mut pending.bytes);
        drop(pending);
        write_out(&mut **output, &batch);
        drop(output);
        batch.clear();
    }
}

/// A write error (stdout closed) loses the batch, as an unbuffered write
/// would have lost its line; logging never fails the caller.
fn write_out(out: &mut dyn Write, bytes: &[u8]) {
    let _ = out.write_all(bytes).and_then(|()| out.flush());
}

/// One event's writer: appends the event's line to the pending batch.
pub struct BatchLine<'a> {
    shared: &'a Shared,
}

impl Write for BatchLine<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut pending = lock(&self.shared.pending);
        if pending.stopping {
            write_out(&mut **lock(&self.shared.output), line);
            return Ok(line.len());
        }
        let starts_batch = pending.bytes.is_empty();
        pending.bytes.extend_from_slice(line);
        if pending.bytes.len() > MAX_PENDING {
            // The writing thread is behind: write here, keeping the buffer
            // bounded and the lines in order.
            write_out(&mut **lock(&self.shared.output), &pending.bytes);
            pending.bytes.clear();
        } else if starts_batch && pending.idle {
            drop(pending);
            self.shared.first_line.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for StdoutBatch {
    type Writer = BatchLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        BatchLine {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that records each `write` call separately.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Recorder {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            lock(&self.0).push(bytes.to_vec());
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Recorder {
        fn text(&self) -> String {
            String::from_utf8(lock(&self.0).concat()).unwrap()
        }
    }

    #[test]
    fn lines_written_together_leave_in_one_write_and_in_order() {
        let recorder = Recorder::default();
        let (sink, guard) = StdoutBatch::start_to(Box::new(recorder.clone())).unwrap();
        let expected: String = (0..100).map(|i| format!("line {i}\n")).collect();
        for i in 0..100 {
            sink.make_writer()
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        guard.flush_and_stop();
        assert_eq!(recorder.text(), expected);
        // 100 lines logged well inside one batch window: one write, not 100.
        assert!(
            lock(&recorder.0).len() < 100,
            "{} writes",
            lock(&recorder.0).len()
        );
    }

    #[test]
    fn a_line_reaches_the_output_without_a_shutdown() {
        let recorder = Recorder::default();
        let (sink, _guard) = StdoutBatch::start_to(Box::new(recorder.clone())).unwrap();
        sink.make_writer().write_all(b"hello\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while recorder.text().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::yield_now();
        }
        assert_eq!(recorder.text(), "hello\n");
    }

    #[test]
    fn lines_spaced_across_busy_and_quiet_windows_all_reach_the_output() {
        // Gaps shorter than a window (the thread stays on its timed sleep),
        // and longer than two (it goes back to waiting for a first line).
        let recorder = Recorder::default();
        let (sink, _guard) = StdoutBatch::start_to(Box::new(recorder.clone())).unwrap();
        let mut expected = String::new();
        for (i, gap_ms) in [0, 5, 0, 50, 1, 45, 0].into_iter().enumerate() {
            std::thread::sleep(Duration::from_millis(gap_ms));
            let line = format!("line {i}\n");
            sink.make_writer().write_all(line.as_bytes()).unwrap();
            expected.push_str(&line);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while recorder.text() != expected {
                assert!(
                    std::time::Instant::now() < deadline,
                    "line {i} never written"
                );
                std::thread::yield_now();
            }
        }
    }

    #[test]
    fn an_oversized_batch_is_written_by_the_logger_in_order() {
        let recorder = Recorder::default();
        let (sink, guard) = StdoutBatch::start_to(Box::new(recorder.clone())).unwrap();
        let line = vec![b'x'; 4096];
        let mut expected = Vec::new();
        for i in 0..600 {
            let mut l = format!("{i:04}").into_bytes();
            l.extend_from_slice(&line);
            l.push(b'\n');
            sink.make_writer().write_all(&l).unwrap();
            expected.extend_from_slice(&l);
        }
        guard.flush_and_stop();
        assert_eq!(lock(&recorder.0).concat(), expected);
    }

    #[test]
    fn lines_after_shutdown_are_written_directly() {
        let recorder = Recorder::default();
        let (sink, guard) = StdoutBatch::start_to(Box::new(recorder.clone())).unwrap();
        sink.make_writer().write_all(b"before\n").unwrap();
        guard.flush_and_stop();
        sink.make_writer().write_all(b"after\n").unwrap();
        assert_eq!(recorder.text(), "before\nafter\n");
    }
}
