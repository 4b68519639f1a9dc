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

use std::{
    future::poll_fn,
    pin::Pin,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

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
        idle: Duration::from_secs(100 * 365 * 24 * 3600),
        half_close: Duration::from_secs(100 * 365 * 24 * 3600),
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
    let progress = Progress {
        started: tokio::time::Instant::now(),
        last_ms: AtomicU64::new(0),
        half_closed: AtomicBool::new(false),
    };
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
        if self.bytes.capacity() < self.size || self.bytes.capacity() > 2 * self.size {
            self.bytes = BytesMut::with_capacity(self.size);
        }
        match tokio_util::io::poll_read_buf(reader, cx, &mut self.bytes) {
            Poll::Pending => {
                self.bytes = BytesMut::new();
                Poll::Pending
            }
            ready => ready,
        }
    }

    /// The first `n` bytes read.
    fn filled(&self, n: usize) -> &[u8] {
        self.bytes.get(..n).unwrap_or(&self.bytes)
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
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[test]
    fn the_buffer_grows_with_a_busy_flow_and_shrinks_when_it_slows() {
        let mut buf = Buffer::default();
        let mut sizes = Vec::new();
        for _ in 0..8 {
            let full = buf.size;
            buf.adapt(full);
            sizes.push(buf.size / 1024);
        }
        assert_eq!(sizes, [8, 16, 32, 64, 128, 256, 256, 256], "KiB, capped");
        buf.adapt(MAX_BUFFER / 2);
        assert_eq!(buf.size, MAX_BUFFER, "half full: unchanged");
        buf.adapt(100);
        assert_eq!(buf.size, MAX_BUFFER / 2);
        for _ in 0..10 {
            buf.adapt(1);
        }
        assert_eq!(buf.size, INITIAL_BUFFER, "never below the initial size");
    }

    #[tokio::test]
    async fn a_waiting_read_holds_no_buffer() {
        let (mut tx, mut rx) = tokio::io::duplex(1024);
        let mut buf = Buffer::default();
        tx.write_all(b"ping").await.expect("write");
        let n = poll_fn(|cx| buf.poll_fill(Pin::new(&mut rx), cx))
            .await
            .expect("read");
        assert_eq!(buf.filled(n), b"ping");
        assert!(
            buf.bytes.capacity() >= INITIAL_BUFFER,
            "allocated while serving a read"
        );

        let waiting = poll_fn(|cx| Poll::Ready(buf.poll_fill(Pin::new(&mut rx), cx))).await;
        assert!(waiting.is_pending(), "nothing to read yet");
        assert_eq!(buf.bytes.capacity(), 0, "given back while waiting");
    }

    #[tokio::test]
    async fn copies_both_ways_and_propagates_half_close() {
        let (mut client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, mut server) = tokio::io::duplex(1024);
        let copier = tokio::spawn(async move {
            let mut counted = Counted::default();
            let result = bidirectional(proxy_a, proxy_b, &mut counted, Timeouts::NONE).await;
            (result.is_ok(), counted.a_to_b, counted.b_to_a)
        });
        let request = vec![7u8; 300_000];
        let client_task = tokio::spawn(async move {
            client.write_all(&request).await.expect("write");
            client.shutdown().await.expect("shutdown");
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.expect("read");
            reply
        });
        // The server sees EOF only after the whole request: half-close propagated.
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert_eq!(got.len(), 300_000);
        server.write_all(b"done").await.expect("write");
        server.shutdown().await.expect("shutdown");
        assert_eq!(client_task.await.expect("client"), b"done");
        assert_eq!(copier.await.expect("copier"), (true, 300_000, 4));
    }

    const TIMEOUTS: Timeouts = Timeouts {
        idle: Duration::from_secs(60),
        half_close: Duration::from_secs(5),
    };

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_progress_times_out_and_traffic_keeps_it_alive() {
        let (mut client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, mut server) = tokio::io::duplex(1024);
        let started = tokio::time::Instant::now();
        let copier = tokio::spawn(async move {
            let mut counted = Counted::default();
            bidirectional(proxy_a, proxy_b, &mut counted, TIMEOUTS).await
        });
        // A byte every 50 s keeps it open past the idle timeout...
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            client.write_all(b"x").await.expect("write");
            let mut byte = [0u8; 1];
            server.read_exact(&mut byte).await.expect("read");
        }
        // ...and then silence ends it 60 s after the last byte.
        let error = copier.await.expect("copier").expect_err("times out");
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed().as_secs(), 150 + 60);
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_closed_connection_whose_other_side_is_silent_times_out_sooner() {
        let (mut client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, _server) = tokio::io::duplex(1024);
        let started = tokio::time::Instant::now();
        let copier = tokio::spawn(async move {
            let mut counted = Counted::default();
            bidirectional(proxy_a, proxy_b, &mut counted, TIMEOUTS).await
        });
        client.shutdown().await.expect("shutdown");
        let error = copier.await.expect("copier").expect_err("times out");
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed().as_secs(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_is_not_progress() {
        let (mut client, proxy_a) = tokio::io::duplex(64 * 1024);
        // The server end never reads: the proxy's writes block once this small pipe is full.
        let (proxy_b, _server) = tokio::io::duplex(16);
        let started = tokio::time::Instant::now();
        let copier = tokio::spawn(async move {
            let mut counted = Counted::default();
            bidirectional(proxy_a, proxy_b, &mut counted, TIMEOUTS).await
        });
        client.write_all(&[1u8; 32 * 1024]).await.expect("write");
        let error = copier.await.expect("copier").expect_err("times out");
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed().as_secs(), 60);
    }
}
