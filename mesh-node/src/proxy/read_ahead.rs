//! A read-ahead buffer under the TLS layer of HBONE connections.
//!
//! rustls asks its transport for at most a few KiB per read, so receiving one full 16 KiB
//! record costs several `read` system calls (on a bulk flow, four times as many as with this
//! buffer). [`ReadAhead`] reads up to [`CAPACITY`] bytes from the
//! socket at once and serves rustls's small reads from memory. The buffer exists only while
//! bytes flow: once the socket has nothing more to read and the buffer is drained, it is
//! released, so an idle pooled connection holds no read-ahead memory. Writes pass straight
//! through (vectored when the socket supports it).

use std::{
    io::IoSlice,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from the socket at once: about four full TLS records.
pub const CAPACITY: usize = 64 * 1024;

/// `io` with reads buffered in chunks of up to [`CAPACITY`] bytes.
#[derive(Debug)]
pub struct ReadAhead<IO> {
    io: IO,
    /// Bytes read from `io` and not yet handed out. Unallocated while idle; never zero-filled
    /// (reads go into its spare capacity).
    buf: BytesMut,
}

impl<IO> ReadAhead<IO> {
    pub fn new(io: IO) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Bytes of memory held for buffered reads now (0 while idle).
    pub fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ReadAhead<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            // A reader asking for at least a buffer's worth gains nothing from a copy.
            if dst.remaining() >= CAPACITY {
                return Pin::new(&mut this.io).poll_read(cx, dst);
            }
            this.buf.reserve(CAPACITY);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
                Poll::Pending => {
                    // Nothing buffered and nothing to read: idle until woken, so let the
                    // memory go.
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(result) => result?,
            };
        }
        let n = dst.remaining().min(this.buf.len());
        dst.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ReadAhead<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Counts the reads that reach the transport.
    struct CountingReads<IO> {
        io: IO,
        reads: usize,
    }

    impl<IO: AsyncRead + Unpin> AsyncRead for CountingReads<IO> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            dst: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let polled = Pin::new(&mut self.io).poll_read(cx, dst);
            if polled.is_ready() {
                self.reads += 1;
            }
            polled
        }
    }

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_transport_read() {
        let (mut tx, rx) = tokio::io::duplex(4 * CAPACITY);
        let data: Vec<u8> = (0..CAPACITY)
            .map(|i| u8::try_from(i % 251).expect("below 251"))
            .collect();
        tx.write_all(&data).await.expect("write");
        let mut reader = ReadAhead::new(CountingReads { io: rx, reads: 0 });

        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while got.len() < data.len() {
            let n = reader.read(&mut chunk).await.expect("read");
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data, "bytes arrive intact and in order");
        assert_eq!(
            reader.io.reads, 1,
            "16 reads of 4 KiB cost one transport read"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_holds_no_buffer_and_eof_passes_through() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        let mut reader = ReadAhead::new(rx);
        tx.write_all(b"hello").await.expect("write");
        let mut chunk = [0u8; 16];
        assert_eq!(reader.read(&mut chunk).await.expect("read"), 5);
        assert_eq!(&chunk[..5], b"hello");
        assert!(
            reader.buffered_capacity() >= CAPACITY / 2,
            "holds the buffer while reading"
        );

        // Nothing more to read: the next read waits, and the buffer is released meanwhile.
        let pending = tokio::time::timeout(
            std::time::Duration::from_millis(10),
            reader.read(&mut chunk),
        )
        .await;
        assert!(pending.is_err(), "no bytes yet");
        assert_eq!(reader.buffered_capacity(), 0, "idle: no read-ahead memory");

        drop(tx);
        assert_eq!(reader.read(&mut chunk).await.expect("eof"), 0);
    }

    #[tokio::test]
    async fn large_reads_bypass_the_buffer_and_writes_pass_through() {
        let (mut a, b) = tokio::io::duplex(4 * CAPACITY);
        let mut wrapped = ReadAhead::new(b);
        let data = vec![9u8; CAPACITY];
        a.write_all(&data).await.expect("write");
        let mut big = vec![0u8; CAPACITY];
        wrapped.read_exact(&mut big).await.expect("read");
        assert_eq!(big, data);
        assert_eq!(wrapped.buffered_capacity(), 0, "never buffered");

        wrapped.write_all(b"reply").await.expect("write");
        wrapped.shutdown().await.expect("shutdown");
        let mut reply = Vec::new();
        a.read_to_end(&mut reply).await.expect("read");
        assert_eq!(reply, b"reply");
    }
}
