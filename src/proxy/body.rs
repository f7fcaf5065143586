//! [`MeteredBody`]: the response body wrapper. Each upstream frame is handed
//! to the client as it arrives, untouched (unless the usage chunk tollgate
//! asked for must be removed again), while a copy of its bytes feeds the usage
//! reader. The call settles exactly once:
//!
//! - at end of stream (`None`, or `is_end_stream()` turning true after a data
//!   frame, since hyper may never poll again then);
//! - on an upstream error frame;
//! - when the stream idle timeout fires (the client sees the body end with an
//!   error, as on an upstream reset);
//! - on drop before any of these: the client went away.
//!
//! Frames that are already in the process join the frame being handed over
//! (see `Held`): hyper's client passes the upstream body one chunk at a
//! time through a channel of one slot, and forwarding each chunk alone costs
//! a `writev` and a wake-up of the client per SSE event (38 of them for a
//! short chat stream). An HTTP/1.1 upstream body drives its connection
//! itself (`pool`): it is read until the socket has nothing more, and what
//! was read goes out together. An HTTP/2 connection runs as a task of its
//! own: before handing data over, the body yields to the runtime
//! (`tokio::task::yield_now`), the connection's task, woken by the read,
//! delivers what it has already received, and the data goes out together
//! once `MAX_IDLE_YIELDS` turns in a row bring nothing new. The first data
//! chunk is not held: it is the client's time to first byte. A chunk is
//! never held waiting for the network.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::money::Money;
use crate::pricing::{ModelPrice, PriceTable};
use crate::proxy::pool::UpstreamBody;
use crate::proxy::settle::{CallMeter, End, Settled};
use crate::usage::{Usage, UsageChunkFilter, UsageTap};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest tool response body kept to read a cost at a JSON pointer.
pub const MAX_TOOL_CAPTURE: usize = 1024 * 1024;

/// Largest frame made of upstream chunks that arrived together.
const MAX_COALESCED: usize = 64 * 1024;

/// Turns of the runtime given, without new data, before held data goes out.
const MAX_IDLE_YIELDS: u8 = 3;

#[derive(Debug, thiserror::Error)]
#[error("upstream stream was idle for more than {0:?}")]
pub struct IdleTimeout(Duration);

pin_project! {
    pub struct MeteredBody {
        inner: Option<UpstreamBody>,
        idle: Pin<Box<Sleep>>,
        idle_timeout: Duration,
        // When the idle timer is due: moved on by each frame, and given to
        // the timer only when the body waits (a reset registers the timer
        // with the runtime's wheel, under its lock).
        idle_deadline: Instant,
        tap: Option<UsageTap>,
        filter: Option<UsageChunkFilter>,
        tool_capture: Option<BytesMut>,
        prefix: Option<Bytes>,
        meter: Option<CallMeter>,
        settled: Option<Settled>,
        // Boxed: set on few streams, and ~200 bytes held by every body.
        cutoff: Option<Box<StreamCutoff>>,
        held: Held,
        // The end of the upstream body, an error or trailers, read while
        // data was held; handled on the next poll, after the data.
        deferred: Option<Option<Result<Frame<Bytes>, hyper::Error>>>,
        // Turns yielded to the runtime since data last arrived.
        yielded: u8,
        // Data has gone to the client: only later chunks are held back to
        // be coalesced (the first is the client's time to first byte).
        data_sent: bool,
        done: bool,
    }

    impl PinnedDrop for MeteredBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if this.meter.is_some() {
                settle(this.meter, this.tap, this.tool_capture, this.settled, End::ClientGone);
            }
        }
    }
}

impl MeteredBody {
    pub fn new(
        inner: UpstreamBody,
        meter: CallMeter,
        tap: Option<UsageTap>,
        filter: Option<UsageChunkFilter>,
        capture_tool_body: bool,
        idle_timeout: Duration,
    ) -> MeteredBody {
        let idle = Box::pin(tokio::time::sleep(idle_timeout));
        MeteredBody {
            inner: Some(inner),
            idle_deadline: idle.deadline(),
            idle,
            idle_timeout,
            tap,
            filter,
            tool_capture: capture_tool_body.then(BytesMut::new),
            prefix: None,
            meter: Some(meter),
            settled: None,
            cutoff: None,
            held: Held::default(),
            deferred: None,
            yielded: 0,
            data_sent: false,
            done: false,
        }
    }

    /// Ends the stream once its running cost passes what the run has left
    /// (`budget.stop_streams_over_budget`).
    pub fn set_cutoff(&mut self, cutoff: StreamCutoff) {
        self.cutoff = Some(Box::new(cutoff));
    }

    /// Bytes already read (and metered) to be sent before the rest.
    pub fn set_prefix(&mut self, prefix: Bytes) {
        if !prefix.is_empty() {
            self.prefix = Some(prefix);
        }
    }

    /// The settlement, once the body has ended.
    pub fn settled(&self) -> Option<Settled> {
        self.settled
    }
}

/// The opt-in guard that ends a stream whose running cost passes the run's
/// remaining budget. The running cost is the usage reported so far, or the
/// prompt estimate and the generated text seen (about 4 bytes a token),
/// priced with the requested model's prices. It is checked only where the
/// bytes forwarded so far end on an event boundary, so the client's stream
/// stays well-formed: the guard appends the provider's end of stream
/// (`terminator`) and stops.
pub struct StreamCutoff {
    pub price: ModelPrice,
    pub prompt_tokens: u64,
    pub terminator: Bytes,
}

impl StreamCutoff {
    fn running_cost(&self, tap: &mut UsageTap) -> Money {
        let (reported, text_bytes) = tap.progress();
        let reported = reported.unwrap_or_default();
        let usage = Usage {
            input_tokens: Some(reported.input_tokens.unwrap_or(self.prompt_tokens)),
            output_tokens: Some(
                reported
                    .output_tokens
                    .unwrap_or(0)
                    .max(text_bytes.div_ceil(4)),
            ),
            cached_input_tokens: reported.cached_input_tokens,
            cache_write_input_tokens: reported.cache_write_input_tokens,
            cache_write_1h_input_tokens: reported.cache_write_1h_input_tokens,
            reasoning_tokens: reported.reasoning_tokens,
        };
        PriceTable::price_cost(&self.price, &usage)
    }
}

/// The end-of-stream marker a client of this provider and endpoint expects.
pub fn stream_terminator(kind: crate::config::RouteKind, path: &str) -> Bytes {
    use crate::config::RouteKind;
    match kind {
        RouteKind::Openai if path.ends_with("/chat/completions") || path.ends_with("/completions") => {
            Bytes::from_static(b"data: [DONE]\n\n")
        }
        RouteKind::Anthropic => Bytes::from_static(
            b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":0}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ),
        // Gemini streams and the Responses API end at EOF.
        _ => Bytes::new(),
    }
}

/// Data read from upstream, metered, and not yet handed to the client.
#[derive(Default)]
pub struct Held {
    parts: Vec<Bytes>,
    len: usize,
}

impl Held {
    pub fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.len += data.len();
            self.parts.push(data);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Everything held, as one buffer (copied only when there are several).
    pub fn take(&mut self) -> Bytes {
        let data = if self.parts.len() == 1 {
            self.parts.pop().unwrap_or_default()
        } else {
            let mut joined = BytesMut::with_capacity(self.len);
            for part in self.parts.drain(..) {
                joined.extend_from_slice(&part);
            }
            joined.freeze()
        };
        self.len = 0;
        data
    }
}

fn ends_on_event_boundary(data: &[u8]) -> bool {
    data.ends_with(b"\n\n") || data.ends_with(b"\r\n\r\n") || data.ends_with(b"\r\r")
}

fn settle(
    meter: &mut Option<CallMeter>,
    tap: &mut Option<UsageTap>,
    capture: &mut Option<BytesMut>,
    settled: &mut Option<Settled>,
    end: End,
) {
    if let Some(meter) = meter.take() {
        let observation = tap.take().map(UsageTap::finish);
        let body = capture.as_ref().map(|b| &b[..]);
        *settled = Some(meter.settle(observation, body, end));
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        if *this.done {
            return Poll::Ready(None);
        }
        loop {
            let polled = match (this.deferred.take(), this.inner.as_mut()) {
                (Some(deferred), _) => Poll::Ready(deferred),
                (None, Some(inner)) => Pin::new(inner).poll_frame(cx),
                (None, None) => Poll::Ready(None),
            };
            match polled {
                Poll::Pending => {
                    if !this.held.is_empty() {
                        let delivered_by_a_task =
                            this.inner.as_ref().is_some_and(|b| !b.drives_connection());
                        if delivered_by_a_task && *this.yielded < MAX_IDLE_YIELDS {
                            // A turn of the runtime for chunks already
                            // received to arrive (module comment). tokio's
                            // `yield_now` wakes this task once the tasks that
                            // are ready have run and the I/O driver has been
                            // polled; a wake from inside this poll would be
                            // taken for the connection's own hand-over and
                            // polled again at once (`server::self_wake`).
                            *this.yielded += 1;
                            let _ = std::pin::pin!(tokio::task::yield_now()).poll(cx);
                            return Poll::Pending;
                        }
                        *this.yielded = 0;
                        return Poll::Ready(Some(Ok(Frame::data(this.held.take()))));
                    }
                    if this.idle.deadline() != *this.idle_deadline {
                        this.idle.as_mut().reset(*this.idle_deadline);
                    }
                    if this.idle.as_mut().poll(cx).is_ready() {
                        *this.done = true;
                        settle(
                            this.meter,
                            this.tap,
                            this.tool_capture,
                            this.settled,
                            End::IdleTimeout,
                        );
                        return Poll::Ready(Some(Err(Box::new(IdleTimeout(*this.idle_timeout)))));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(end @ (None | Some(Err(_)))) if !this.held.is_empty() => {
                    *this.deferred = Some(end);
                    *this.yielded = 0;
                    return Poll::Ready(Some(Ok(Frame::data(this.held.take()))));
                }
                Poll::Ready(None) => {
                    *this.done = true;
                    let rest = this
                        .filter
                        .as_mut()
                        .map(UsageChunkFilter::finish)
                        .unwrap_or_default();
                    settle(
                        this.meter,
                        this.tap,
                        this.tool_capture,
                        this.settled,
                        End::Complete,
                    );
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                Poll::Ready(Some(Err(error))) => {
                    *this.done = true;
                    settle(
                        this.meter,
                        this.tap,
                        this.tool_capture,
                        this.settled,
                        End::UpstreamError,
                    );
                    return Poll::Ready(Some(Err(Box::new(error))));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    *this.idle_deadline = Instant::now() + *this.idle_timeout;
                    let inner_ended = this.inner.as_ref().is_none_or(Body::is_end_stream);
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            if let Some(meter) = this.meter.as_mut() {
                                meter
                                    .first_byte
                                    .get_or_insert_with(|| meter.started.elapsed());
                            }
                            if let Some(tap) = this.tap.as_mut() {
                                tap.feed(&data);
                            }
                            if let Some(capture) = this.tool_capture.as_mut() {
                                if capture.len() + data.len() <= MAX_TOOL_CAPTURE {
                                    capture.extend_from_slice(&data);
                                } else {
                                    *this.tool_capture = None;
                                }
                            }
                            let data = match this.filter.as_mut() {
                                Some(filter) => filter.push(data),
                                None => data,
                            };
                            this.held.push(data);
                            *this.yielded = 0;
                            // The stream guard checks each chunk on its own.
                            let coalesce = this.cutoff.is_none();
                            if this.held.is_empty() && !inner_ended {
                                // Everything so far was held back or removed.
                                continue;
                            }
                            if coalesce
                                && *this.data_sent
                                && !inner_ended
                                && this.held.len < MAX_COALESCED
                            {
                                continue;
                            }
                            *this.data_sent = true;
                            Frame::data(this.held.take())
                        }
                        Err(frame) if !this.held.is_empty() => {
                            // Trailers go after the data held.
                            *this.deferred = Some(Some(Ok(frame)));
                            *this.yielded = 0;
                            return Poll::Ready(Some(Ok(Frame::data(this.held.take()))));
                        }
                        Err(frame) => frame,
                    };
                    if let (Some(cutoff), Some(tap), Some(meter)) =
                        (this.cutoff.as_ref(), this.tap.as_mut(), this.meter.as_ref())
                    {
                        let at_boundary =
                            frame.data_ref().is_some_and(|d| ends_on_event_boundary(d));
                        let over = at_boundary
                            && meter
                                .admission
                                .as_ref()
                                .is_some_and(|a| a.over_budget(cutoff.running_cost(tap)));
                        if over {
                            *this.done = true;
                            let terminator = cutoff.terminator.clone();
                            settle(
                                this.meter,
                                this.tap,
                                this.tool_capture,
                                this.settled,
                                End::BudgetStop,
                            );
                            let mut data = frame.into_data().unwrap_or_default();
                            if !terminator.is_empty() {
                                let mut joined =
                                    BytesMut::with_capacity(data.len() + terminator.len());
                                joined.extend_from_slice(&data);
                                joined.extend_from_slice(&terminator);
                                data = joined.freeze();
                            }
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                    }
                    if inner_ended && this.filter.is_none() {
                        *this.done = true;
                        settle(
                            this.meter,
                            this.tap,
                            this.tool_capture,
                            this.settled,
                            End::Complete,
                        );
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && self.held.is_empty()
            && self.deferred.is_none()
            && (self.done
                || (self.filter.is_none() && self.inner.as_ref().is_none_or(Body::is_end_stream)))
    }

    fn size_hint(&self) -> SizeHint {
        if self.filter.is_some() {
            return SizeHint::default();
        }
        let mut hint = self.inner.as_ref().map(Body::size_hint).unwrap_or_default();
        if let Some(prefix) = &self.prefix {
            let extra = prefix.len() as u64;
            hint.set_lower(hint.lower() + extra);
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + extra);
            }
        }
        hint
    }
}
