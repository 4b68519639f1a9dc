//! Bidirectional copy with byte accounting and half-close.
//!
//! When one side finishes sending (EOF), the other side's write half is shut down and the
//! opposite direction keeps flowing until it finishes too. Each direction reads into a buffer
//! that doubles while the flow fills it (bulk transfers move large chunks) and halves when
//! reads come back small. The buffer exists only while bytes flow: a read that has to wait
//! gives it back first, so an idle connection holds no copy buffer at all.
//!
//! **Timeouts.** A connection on which no byte moves either way (read or written) for
//! [`Timeouts::idle`] ends with a `TimedOut` error, and so does one with one direction finished
//! and the other silent for [`Timeouts::half_close`]: a peer that stops reading, or never
//! closes its half, cannot hold the node's descriptors forever. A write blocked on a peer that
//! does not read is not progress.
//!
//! **HBONE** ([`hbone`]): between a pod's socket and a CONNECT stream the chunks move without
//! user-space copies: a chunk read from the socket is handed to `h2` as the buffer it was
//! read into, and a DATA frame is written to the socket from the buffer `h2` received it in.
//! Both directions run in the connection's one task.

use std::{
    future::poll_fn,
    pin::Pin,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::hbone::{
    H2Stream,
    stream::{RecvHalf, SendHalf},
};

const INITIAL_BUFFER: usize = 4 * 1024;
const MAX_BUFFER: usize = 256 * 1024;

/// Bytes moved each way, valid even when the copy failed midway.
#[derive(Debug, Default)]
pub struct Counted {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// How long a connection may go without progress (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub idle: Duration,
    pub half_close: Duration,
}

impl Timeouts {
    /// No timeout in practice: for copies whose ends enforce their own.
    pub const NONE: Self = Self {
        idle: Duration::from_hours(876_000),
        half_close: Duration::from_hours(876_000),
    };
}

/// When bytes last moved, shared by both directions and the watchdog of one copy.
struct Progress {
    started: tokio::time::Instant,
    /// Milliseconds from `started` to the last progress.
    last_ms: AtomicU64,
    half_closed: AtomicBool,
}

impl Progress {
    fn new() -> Self {
        Self {
            started: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            half_closed: AtomicBool::new(false),
        }
    }

    fn mark(&self) {
        let ms = self.started.elapsed().as_millis();
        self.last_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Resolves with the timeout error once the connection went too long without progress.
    async fn stalled(&self, timeouts: Timeouts) -> std::io::Error {
        if timeouts == Timeouts::NONE {
            // Needs no timer at all.
            return std::future::pending().await;
        }
        loop {
            let half_closed = self.half_closed.load(Ordering::Relaxed);
            let limit = if half_closed {
                timeouts.half_close
            } else {
                timeouts.idle
            };
            let last = self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last.checked_add(limit);
            match deadline {
                Some(deadline) if deadline > tokio::time::Instant::now() => {
                    // A direction may finish meanwhile and shorten the limit: look again
                    // within the shorter one.
                    let recheck = tokio::time::Instant::now() + timeouts.half_close;
                    tokio::time::sleep_until(deadline.min(recheck)).await;
                }
                None => std::future::pending::<()>().await,
                Some(_) => {
                    let what = if half_closed {
                        "half-closed connection silent"
                    } else {
                        "connection idle"
                    };
                    return std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("{what} for {limit:?}"),
                    );
                }
            }
        }
    }
}

/// Copies until both directions reached EOF, the first error, or a timeout.
pub async fn bidirectional<A, B>(
    a: A,
    b: B,
    counted: &mut Counted,
    timeouts: Timeouts,
) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let Counted { a_to_b, b_to_a } = counted;
    let progress = Progress::new();
    let copy = async {
        tokio::try_join!(
            one_way(&mut a_read, &mut b_write, a_to_b, &progress),
            one_way(&mut b_read, &mut a_write, b_to_a, &progress),
        )
    };
    tokio::select! {
        result = copy => result.map(|_| ()),
        error = progress.stalled(timeouts) => Err(error),
    }
}

async fn one_way<R, W>(
    reader: &mut R,
    writer: &mut W,
    count: &mut u64,
    progress: &Progress,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = Buffer::default();
    loop {
        let n = poll_fn(|cx| buf.poll_fill(Pin::new(&mut *reader), cx)).await?;
        progress.mark();
        if n == 0 {
            // Propagate the half-close and let the other direction finish.
            writer.shutdown().await?;
            progress.half_closed.store(true, Ordering::Relaxed);
            return Ok(());
        }
        writer.write_all(buf.filled(n)).await?;
        progress.mark();
        *count += n as u64;
        buf.adapt(n);
    }
}

/// Copies between a pod's socket (`a`) and a CONNECT stream (`b`) until both directions
/// reached their end (EOF, `END_STREAM`), the first error, or a timeout. An `RST_STREAM` or
/// a broken HBONE connection is an error, never an end: the caller resets both sides.
pub async fn hbone<T>(
    tcp: T,
    stream: &mut H2Stream,
    counted: &mut Counted,
    timeouts: Timeouts,
) -> std::io::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut tcp_read, mut tcp_write) = tokio::io::split(tcp);
    let H2Stream { send, recv } = stream;
    let Counted { a_to_b, b_to_a } = counted;
    let progress = Progress::new();
    let copy = async {
        tokio::try_join!(
            into_stream(&mut tcp_read, send, a_to_b, &progress),
            out_of_stream(recv, &mut tcp_write, b_to_a, &progress),
        )
    };
    tokio::select! {
        result = copy => result.map(|_| ()),
        error = progress.stalled(timeouts) => Err(error),
    }
}

/// Socket to stream: each chunk read is sent as it is, once the peer granted window for it.
async fn into_stream<R>(
    reader: &mut R,
    send: &mut SendHalf,
    count: &mut u64,
    progress: &Progress,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
{
    let mut buf = Buffer::default();
    loop {
        // While the socket is quiet, a reset of the stream still ends the copy.
        let read = poll_fn(|cx| {
            if let Poll::Ready(stopped) = send.poll_stopped(cx) {
                return Poll::Ready(stopped.map(|()| None));
            }
            buf.poll_fill(Pin::new(&mut *reader), cx).map_ok(Some)
        })
        .await?;
        progress.mark();
        let Some(n) = read else {
            // The peer answered in full and needs no more: this direction is done.
            progress.half_closed.store(true, Ordering::Relaxed);
            return Ok(());
        };
        if n == 0 {
            send.finish()?;
            progress.half_closed.store(true, Ordering::Relaxed);
            return Ok(());
        }
        let mut chunk = buf.take(n);
        while !chunk.is_empty() {
            let Some(granted) = poll_fn(|cx| send.poll_capacity(cx, chunk.len())).await? else {
                progress.half_closed.store(true, Ordering::Relaxed);
                return Ok(());
            };
            send.send(chunk.split_to(granted.min(chunk.len())))?;
            progress.mark();
        }
        *count += n as u64;
        buf.adapt(n);
    }
}

/// Stream to socket: each DATA frame is written from `h2`'s buffer; its window goes back to
/// the peer once the socket took it.
async fn out_of_stream<W>(
    recv: &mut RecvHalf,
    writer: &mut W,
    count: &mut u64,
    progress: &Progress,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    loop {
        let chunk = poll_fn(|cx| recv.poll_chunk(cx)).await?;
        progress.mark();
        let Some(chunk) = chunk else {
            writer.shutdown().await?;
            progress.half_closed.store(true, Ordering::Relaxed);
            return Ok(());
        };
        writer.write_all(&chunk).await?;
        recv.release(chunk.len());
        progress.mark();
        *count += chunk.len() as u64;
    }
}

/// One direction's read buffer: its size follows the flow, its memory exists only while a
/// read is being served.
struct Buffer {
    /// Allocated on demand (never zero-filled: reads go into its spare capacity); empty and
    /// unallocated while waiting for bytes.
    bytes: BytesMut,
    /// The size the next read gets.
    size: usize,
}

impl Default for Buffer {
    fn default() -> Self {
        Self {
            bytes: BytesMut::new(),
            size: INITIAL_BUFFER,
        }
    }
}

impl Buffer {
    /// Reads into the buffer, allocating it first when needed; releases it if the read has to
    /// wait. Returns how many bytes were read (0 at EOF).
    fn poll_fill<R: AsyncRead>(
        &mut self,
        reader: Pin<&mut R>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<usize>> {
        self.bytes.clear();
        if self.bytes.capacity() > 2 * self.size {
            self.bytes = BytesMut::new();
        }
        // Reuses the allocation once the chunks taken from it were dropped.
        self.bytes.reserve(self.size);
        match tokio_util::io::poll_read_buf(reader, cx, &mut self.bytes) {
            Poll::Pending => {
                self.bytes = BytesMut::new();
                Poll::Pending
            }
            ready @ Poll::Ready(_) => ready,
        }
    }

    /// The first `n` bytes read.
    fn filled(&self, n: usize) -> &[u8] {
        self.bytes.get(..n).unwrap_or(&self.bytes)
    }

    /// The first `n` bytes read, as a chunk of their own (no copy); the buffer keeps the rest
    /// of its allocation.
    fn take(&mut self, n: usize) -> Bytes {
        self.bytes.split_to(n.min(self.bytes.len())).freeze()
    }

    /// Doubles the size after a read that filled the buffer, halves it after one that used
    /// less than a quarter of it, within [`INITIAL_BUFFER`]..=[`MAX_BUFFER`].
    fn adapt(&mut self, n: usize) {
        if n == self.size {
            self.size = (self.size * 2).min(MAX_BUFFER);
        } else if n < self.size / 4 {
            self.size = (self.size / 2).max(INITIAL_BUFFER);
        }
    }
}

#[cfg(test)]
mod tests;
