//! Bidirectional copy with byte accounting and half-close.
//!
//! When one side finishes sending (EOF), the other side's write half is shut down and the
//! opposite direction keeps flowing until it finishes too. Buffers start small and grow while
//! the flow fills them, so idle connections cost little and bulk transfers move large chunks.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
    let mut buf = vec![0u8; INITIAL_BUFFER];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            // Propagate the half-close and let the other direction finish.
            writer.shutdown().await?;
            return Ok(());
        }
        writer.write_all(&buf[..n]).await?;
        *count += n as u64;
        if n == buf.len() && buf.len() < MAX_BUFFER {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
