//! The I/O of an upstream connection, as its connection task holds it.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::connect::{Connected, Connection};

use crate::proxy::egress::UpstreamStream;

/// An upstream connection's stream: plain TCP held inline, TLS boxed.
///
/// hyper-rustls's `MaybeHttpsStream` holds rustls's client state inline,
/// 1,112 bytes against 40 for a plain stream, and a connection's task holds
/// its stream for as long as the connection is open: held as it comes,
/// every connection to an `http` upstream (a local model server, a tool
/// inside the cluster) would carry the size of a TLS one, ~1 KiB for each
/// open stream. A TLS connection pays one allocation when it opens.
pub enum UpstreamIo {
    Plain(UpstreamStream),
    Tls(Box<MaybeHttpsStream<UpstreamStream>>),
}

impl From<MaybeHttpsStream<UpstreamStream>> for UpstreamIo {
    fn from(stream: MaybeHttpsStream<UpstreamStream>) -> Self {
        match stream {
            MaybeHttpsStream::Http(plain) => UpstreamIo::Plain(plain),
            tls => UpstreamIo::Tls(Box::new(tls)),
        }
    }
}

/// Evaluates `$call` with `$stream` bound to the pinned stream, whichever
/// kind it is (both are `Unpin`).
macro_rules! on_stream {
    ($io:expr, $stream:ident => $call:expr) => {
        match $io.get_mut() {
            UpstreamIo::Plain(plain) => {
                let $stream = Pin::new(plain);
                $call
            }
            UpstreamIo::Tls(tls) => {
                let $stream = Pin::new(&mut **tls);
                $call
            }
        }
    };
}

impl Read for UpstreamIo {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        on_stream!(self, stream => stream.poll_read(cx, buf))
    }
}

impl Write for UpstreamIo {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        on_stream!(self, stream => stream.poll_write(cx, buf))
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(self, stream => stream.poll_flush(cx))
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(self, stream => stream.poll_shutdown(cx))
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(plain) => plain.is_write_vectored(),
            UpstreamIo::Tls(tls) => tls.is_write_vectored(),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_stream!(self, stream => stream.poll_write_vectored(cx, bufs))
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        match self {
            UpstreamIo::Plain(plain) => plain.connected(),
            UpstreamIo::Tls(tls) => tls.connected(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The point of the type: a plain stream is held at its own size, not
    /// at the size of a TLS one.
    #[test]
    fn a_plain_stream_is_held_without_room_for_tls_state() {
        let plain = std::mem::size_of::<UpstreamStream>();
        let held = std::mem::size_of::<UpstreamIo>();
        let as_it_comes = std::mem::size_of::<MaybeHttpsStream<UpstreamStream>>();
        assert!(held <= plain + 8, "{held} bytes for a {plain}-byte stream");
        assert!(as_it_comes > held + 512, "{as_it_comes} against {held}");
    }
}
