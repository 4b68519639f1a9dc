//! Bidirectional copy with byte accounting and half-close.
//!
//! When one side finishes sending (EOF), the other side's write half is shut down and the
//! opposite direction keeps flowing until it finishes too. Each direction reads into a buffer
//! that doubles while the flow fills it (bulk transfers move large chunks) and halves when
//! reads come back small. The buffer exists only while bytes flow: a read that has to wait
//! gives it back first, so an idle connection holds no copy buffer at all.

use std::{
    future::poll_fn,
    pin::Pin,
    task::{Context, Poll},
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

/// Copies until both directions reached EOF, or the first error.
pub async fn bidirectional<A, B>(a: A, b: B, counted: &mut Counted) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let Counted { a_to_b, b_to_a } = counted;
    tokio::try_join!(
        one_way(&mut a_read, &mut b_write, a_to_b),
        one_way(&mut b_read, &mut a_write, b_to_a),
    )?;
    Ok(())
}

async fn one_way<R, W>(reader: &mut R, writer: &mut W, count: &mut u64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = Buffer::default();
    loop {
        let n = poll_fn(|cx| buf.poll_fill(Pin::new(&mut *reader), cx)).await?;
        if n == 0 {
            // Propagate the half-close and let the other direction finish.
            writer.shutdown().await?;
            return Ok(());
        }
        writer.write_all(buf.filled(n)).await?;
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
            let result = bidirectional(proxy_a, proxy_b, &mut counted).await;
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
}
