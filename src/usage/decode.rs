//! Content-Encoding decoding for the metering copy of a body.
//!
//! Flow: the client receives the compressed bytes untouched; the tap pushes
//! the same bytes through a write-side decoder whose output `Write` *is* the
//! body parser, so decoded bytes are parsed as they are produced and never
//! collected. Memory is the decoder's own state, which the formats bound:
//! a 32 KiB window for gzip/deflate, at most 16 MiB for brotli (RFC 7932's
//! largest window), and 8 MiB for zstd, where we lower the decoder's
//! `windowLogMax` to the 8 MiB RFC 8878 asks HTTP encoders to stay within
//! (zstd's own default would accept 128 MiB windows).
//!
//! Decompression bombs: before each write the parser is given a budget of
//! decoded bytes ([`budget_for`]: a floor plus a ratio of the compressed
//! input). When a write would exceed it, the parser refuses it with an I/O
//! error, the decoder stops, the tap reports `parse_error` and meters nothing
//! more of that body. The ratio is far above what text (JSON, SSE) reaches
//! with any of these codecs, so only pathological input trips it, and the
//! CPU spent per read stays proportional to the read.
//!
//! A broken compressed stream (bad header, corrupt data) also stops decoding
//! with `parse_error`; usage already read stays valid. An unknown or
//! multi-step encoding (`gzip, br`) is not decoded at all.

use brotli::DecompressorWriter;
use flate2::write::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};
use std::io::{self, Write};

/// Decoded bytes allowed per compressed input byte in one read.
pub const MAX_DECODED_PER_INPUT_BYTE: u64 = 1024;
/// Decoded bytes always allowed per read (decoders emit buffered output late).
pub const DECODED_FLOOR_PER_FEED: u64 = 1 << 20;
/// zstd window limit (log2 bytes): 8 MiB.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;
/// Size of brotli's output staging buffer.
const BROTLI_BUFFER: usize = 8 * 1024;

/// Decoded-byte budget for one read of `input_len` compressed bytes.
pub(crate) fn budget_for(input_len: usize) -> u64 {
    DECODED_FLOOR_PER_FEED
        .saturating_add((input_len as u64).saturating_mul(MAX_DECODED_PER_INPUT_BYTE))
}

/// Content codings the tap understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Coding {
    Identity,
    Gzip,
    /// `deflate`: RFC 9110 says zlib-wrapped; some servers send raw deflate.
    Deflate,
    Brotli,
    Zstd,
    Unsupported,
}

impl Coding {
    pub(crate) fn parse(header: Option<&str>) -> Coding {
        let Some(h) = header else {
            return Coding::Identity;
        };
        let mut codings = h
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"));
        let Some(first) = codings.next() else {
            return Coding::Identity;
        };
        if codings.next().is_some() {
            return Coding::Unsupported;
        }
        match first.to_ascii_lowercase().as_str() {
            "gzip" | "x-gzip" => Coding::Gzip,
            "deflate" => Coding::Deflate,
            "br" => Coding::Brotli,
            "zstd" => Coding::Zstd,
            _ => Coding::Unsupported,
        }
    }
}

/// A decoder stage in front of the sink `W`. Once a write fails the decoder is
/// *dead*: it is never written again, and the sink keeps refusing writes so
/// that the codecs' flush-on-drop cannot feed it either.
pub(crate) struct Decoder<W: Write + Default> {
    codec: Codec<W>,
    dead: bool,
}

enum Codec<W: Write> {
    Identity(W),
    Gzip(Box<MultiGzDecoder<W>>),
    /// `deflate` before its first two bytes tell zlib from raw deflate.
    DeflateSniff(W, Vec<u8>),
    Zlib(Box<ZlibDecoder<W>>),
    RawDeflate(Box<DeflateDecoder<W>>),
    Brotli(Box<DecompressorWriter<W>>),
    Zstd(Box<zstd::stream::write::Decoder<'static, W>>),
    /// An encoding we cannot decode: the sink sees nothing.
    Opaque(W),
}

impl<W: Write + Default> Decoder<W> {
    /// Returns the decoder and whether the coding can be decoded.
    pub(crate) fn new(coding: Coding, sink: W) -> (Self, bool) {
        let (codec, ok) = match coding {
            Coding::Identity => (Codec::Identity(sink), true),
            Coding::Gzip => (Codec::Gzip(Box::new(MultiGzDecoder::new(sink))), true),
            Coding::Deflate => (Codec::DeflateSniff(sink, Vec::with_capacity(2)), true),
            Coding::Brotli => (
                Codec::Brotli(Box::new(DecompressorWriter::new(sink, BROTLI_BUFFER))),
                true,
            ),
            Coding::Zstd => match zstd_raw() {
                Ok(raw) => (
                    Codec::Zstd(Box::new(zstd::stream::write::Decoder::with_decoder(
                        sink, raw,
                    ))),
                    true,
                ),
                Err(_) => (Codec::Opaque(sink), false),
            },
            Coding::Unsupported => (Codec::Opaque(sink), false),
        };
        let dead = !ok;
        (Decoder { codec, dead }, ok)
    }

    /// No more decoded bytes will reach the sink.
    pub(crate) fn is_dead(&self) -> bool {
        self.dead
    }

    /// Marks the decoder failed; later writes are ignored.
    pub(crate) fn kill(&mut self) {
        self.dead = true;
    }

    pub(crate) fn sink(&mut self) -> &mut W {
        match &mut self.codec {
            Codec::Identity(w) | Codec::DeflateSniff(w, _) | Codec::Opaque(w) => w,
            Codec::Gzip(d) => d.get_mut(),
            Codec::Zlib(d) => d.get_mut(),
            Codec::RawDeflate(d) => d.get_mut(),
            Codec::Brotli(d) => d.get_mut(),
            Codec::Zstd(d) => d.get_mut(),
        }
    }

    /// Pushes compressed bytes through. An error means the stream can no
    /// longer be decoded (corrupt, or over the decoded-bytes budget); the
    /// caller then calls [`Decoder::kill`].
    pub(crate) fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        if self.dead {
            return Ok(());
        }
        match &mut self.codec {
            Codec::Identity(w) => w.write_all(chunk),
            Codec::Gzip(d) => d.write_all(chunk),
            Codec::DeflateSniff(w, head) => {
                let need = 2usize.saturating_sub(head.len()).min(chunk.len());
                let (h, rest) = chunk.split_at(need);
                head.extend_from_slice(h);
                if head.len() < 2 {
                    return Ok(());
                }
                // RFC 1950 header: CM = 8 and the 16-bit header is a multiple
                // of 31. Raw deflate fails that test with high probability.
                let zlib = matches!(head.as_slice(), [cmf, flg]
                    if cmf & 0x0f == 8 && ((u16::from(*cmf) << 8) | u16::from(*flg)) % 31 == 0);
                let head = std::mem::take(head);
                let sink = std::mem::take(w);
                self.codec = if zlib {
                    Codec::Zlib(Box::new(ZlibDecoder::new(sink)))
                } else {
                    Codec::RawDeflate(Box::new(DeflateDecoder::new(sink)))
                };
                self.write(&head)?;
                self.write(rest)
            }
            Codec::Zlib(d) => d.write_all(chunk),
            Codec::RawDeflate(d) => d.write_all(chunk),
            Codec::Brotli(d) => d.write_all(chunk),
            Codec::Zstd(d) => d.write_all(chunk),
            Codec::Opaque(_) => Ok(()),
        }
    }

    /// End of body: flushes what the decoder still holds and checks that the
    /// compressed stream ended properly.
    pub(crate) fn finish(&mut self) -> io::Result<()> {
        if self.dead {
            return Ok(());
        }
        match &mut self.codec {
            Codec::Identity(_) | Codec::Opaque(_) => Ok(()),
            Codec::DeflateSniff(_, head) => {
                if head.is_empty() {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "truncated deflate stream",
                    ))
                }
            }
            Codec::Gzip(d) => d.try_finish(),
            Codec::Zlib(d) => d.try_finish(),
            Codec::RawDeflate(d) => d.try_finish(),
            Codec::Brotli(d) => d.close(),
            Codec::Zstd(d) => d.do_finish(),
        }
    }
}

fn zstd_raw() -> io::Result<zstd::stream::raw::Decoder<'static>> {
    let mut raw = zstd::stream::raw::Decoder::new()?;
    raw.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(
        ZSTD_WINDOW_LOG_MAX,
    ))?;
    Ok(raw)
}
