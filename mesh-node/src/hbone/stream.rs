//! One CONNECT stream, driven on `h2` directly.
//!
//! [`H2Stream`] is the two halves `h2` hands out for a stream: [`SendHalf`] puts bytes into
//! DATA frames and [`RecvHalf`] takes them out. The TCP proxy moves chunks through them
//! without copying: a chunk read from a pod's socket is sent as the buffer it was read into,
//! and a DATA frame's bytes are written to the pod's socket from the buffer `h2` received them
//! in ([`crate::proxy::copy::hbone`]).
//!
//! **Flow control stays honest.** A sender waits for window before it hands `h2` a chunk, so
//! `h2` never buffers more than the peer granted; a receiver releases window only once the
//! bytes are written to the pod, so a slow reader backs pressure up to the sender.
//!
//! **Aborts stay aborts.** An `RST_STREAM` from the peer, or the HBONE connection breaking,
//! reads as an error (`ConnectionReset`, `ConnectionAborted`), never as end of stream; only the
//! peer's `END_STREAM` is end of stream. The one reset that is not an abort is
//! `RST_STREAM(NO_ERROR)` after the peer's own `END_STREAM`: the peer has answered in full and
//! needs no more bytes (RFC 9113 section 8.1), so sending stops quietly. [`H2Stream::reset`] sends `RST_STREAM(CANCEL)`, and
//! dropping a stream that has not finished both ways sends it too (h2 cancels a stream whose
//! handles are all gone).
//!
//! [`H2Io`] puts the same stream behind `AsyncRead` + `AsyncWrite` for the waypoint, whose
//! HTTP server and client run on a tunnel (they copy: hyper reads into its own buffers).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Both halves of a CONNECT stream.
pub struct H2Stream {
    pub send: SendHalf,
    pub recv: RecvHalf,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send: SendHalf { inner: send },
            recv: RecvHalf { inner: recv },
        }
    }

    /// Aborts the stream: the peer sees `RST_STREAM(CANCEL)` (and resets its end).
    pub fn reset(&mut self) {
        self.send.inner.send_reset(Reason::CANCEL);
    }
}

/// The sending half: DATA frames towards the peer.
pub struct SendHalf {
    inner: SendStream<Bytes>,
}

impl SendHalf {
    /// Waits until the peer granted window for at least one byte of `want`; returns how many
    /// bytes may be sent now (at most `want`), or `None` once the peer needs no more
    /// (`RST_STREAM(NO_ERROR)` after its complete answer, RFC 9113 section 8.1). Fails once the
    /// peer reset the stream or the connection broke.
    pub fn poll_capacity(
        &mut self,
        cx: &mut Context<'_>,
        want: usize,
    ) -> Poll<io::Result<Option<usize>>> {
        // Capacity is reserved only for bytes already in hand, so an idle stream holds none
        // of the connection's window.
        self.inner.reserve_capacity(want);
        loop {
            let capacity = self.inner.capacity();
            if capacity > 0 {
                return Poll::Ready(Ok(Some(capacity.min(want))));
            }
            // `poll_capacity` only reports an increase; the loop reads the amount itself.
            match ready!(self.inner.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(stream_error(e))),
                None => {
                    // The stream cannot send any more: see why.
                    return match self.poll_stopped(cx) {
                        Poll::Ready(stopped) => Poll::Ready(stopped.map(|()| None)),
                        Poll::Pending => Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "HBONE stream closed for sending",
                        ))),
                    };
                }
            }
        }
    }

    /// Hands `h2` a chunk the peer granted window for (see [`Self::poll_capacity`]).
    pub fn send(&mut self, chunk: Bytes) -> io::Result<()> {
        self.inner.send_data(chunk, false).map_err(stream_error)
    }

    /// Ends this direction: `END_STREAM`, the HBONE form of a TCP FIN.
    pub fn finish(&mut self) -> io::Result<()> {
        self.inner
            .send_data(Bytes::new(), true)
            .map_err(stream_error)
    }

    /// Resolves once the peer stopped the stream: `Ok` when it needs no more bytes
    /// (`RST_STREAM(NO_ERROR)`), an error when it reset the stream or the connection broke.
    /// Lets a direction that waits on its pod notice that the tunnel is gone.
    pub fn poll_stopped(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(self.inner.poll_reset(cx)) {
            Ok(Reason::NO_ERROR) => Poll::Ready(Ok(())),
            Ok(reason) => Poll::Ready(Err(reset_error(reason))),
            Err(e) => Poll::Ready(Err(stream_error(e))),
        }
    }
}

/// The receiving half: DATA frames from the peer.
pub struct RecvHalf {
    inner: RecvStream,
}

impl RecvHalf {
    /// The next chunk the peer sent; `None` at its `END_STREAM`. Its window is released by
    /// [`Self::release`] once the chunk has been delivered.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        match ready!(self.inner.poll_data(cx)) {
            Some(Ok(chunk)) => Poll::Ready(Ok(Some(chunk))),
            Some(Err(e)) => Poll::Ready(Err(stream_error(e))),
            None => Poll::Ready(Ok(None)),
        }
    }

    /// Gives the peer back window for `n` delivered bytes.
    pub fn release(&mut self, n: usize) {
        // Only fails for more than was received, which the callers never release.
        let _ = self.inner.flow_control().release_capacity(n);
    }
}

/// What a reset by the peer reads as.
fn reset_error(reason: Reason) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("HBONE stream reset by peer ({reason})"),
    )
}

/// An `h2` error as the I/O error a socket would have given: a stream reset is a reset, a
/// broken or abandoned connection an abort.
fn stream_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::ErrorKind::BrokenPipe.into());
    }
    let kind = if e.is_reset() && e.is_remote() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::ConnectionAborted
    };
    let what = if e.is_go_away() {
        "HBONE connection going away"
    } else if e.is_reset() && e.is_remote() {
        "HBONE stream reset by peer"
    } else {
        "HBONE stream failed"
    };
    io::Error::new(kind, format!("{what}: {e}"))
}

/// A CONNECT stream as a byte stream, for the waypoint's HTTP layers (see the module docs).
///
/// Dropping it is what `close()` is to a socket: with no unread bytes in hand it ends the
/// sending direction (END_STREAM, a FIN), with unread bytes it resets the stream (an RST);
/// either way `h2` then cancels whatever the peer still sends.
pub struct H2Io {
    stream: H2Stream,
    /// The rest of the last chunk received, not yet read.
    pending: Bytes,
    /// The peer's `END_STREAM` was read.
    eof: bool,
    /// Our `END_STREAM` was sent.
    finished: bool,
}

impl H2Io {
    pub fn new(stream: H2Stream) -> Self {
        Self {
            stream,
            pending: Bytes::new(),
            eof: false,
            finished: false,
        }
    }
}

impl Drop for H2Io {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            self.stream.reset();
        } else if !self.finished {
            // Fails only when the stream is already reset: nothing to end.
            let _ = self.stream.send.finish();
        }
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() && !this.eof {
            match ready!(this.stream.recv.poll_chunk(cx))? {
                Some(chunk) => this.pending = chunk,
                None => this.eof = true,
            }
        }
        let n = this.pending.len().min(buf.remaining());
        if n > 0 {
            buf.put_slice(this.pending.get(..n).unwrap_or_default());
            this.pending.advance(n);
            this.stream.recv.release(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.stream.send;
        let Some(n) = ready!(send.poll_capacity(cx, buf.len()))? else {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the HBONE peer needs no more bytes",
            )));
        };
        send.send(Bytes::copy_from_slice(buf.get(..n).unwrap_or(buf)))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // `h2` writes what it was handed as the connection task runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        self.finished = true;
        Poll::Ready(self.stream.send.finish())
    }
}
