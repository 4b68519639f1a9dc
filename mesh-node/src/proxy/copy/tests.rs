//! The copy loops: buffers, half-close, timeouts, and HBONE streams with their resets.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, DuplexStream};

use super::*;
use crate::hbone::{self, H2Io};

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
    idle: Duration::from_mins(1),
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
    client
        .write_all(&vec![1u8; 32 * 1024])
        .await
        .expect("write");
    let error = copier.await.expect("copier").expect_err("times out");
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
    assert_eq!(started.elapsed().as_secs(), 60);
}

/// A CONNECT stream over an in-memory HTTP/2 connection: the client's end (as the copy
/// drives it) and the server's end, returned as the far side sees it.
async fn hbone_pair() -> (H2Stream, H2Stream) {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let (far, accepted) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut server = hbone::server::Server::handshake(server_io, 10)
            .await
            .expect("server handshake");
        let hbone::server::Next::Stream(request, respond) = server.next().await else {
            panic!("no stream");
        };
        let stream = hbone::server::accept(respond, request).expect("accept");
        let _ = far.send(stream);
        // Keep driving the connection.
        while let hbone::server::Next::Stream(..) = server.next().await {}
    });
    let (sender, driver) = hbone::client::handshake(client_io)
        .await
        .expect("client handshake");
    tokio::spawn(driver.run());
    let addr: SocketAddr = "10.0.0.2:80".parse().expect("addr");
    let near = hbone::client::connect(&sender, addr, addr)
        .await
        .expect("CONNECT");
    // The connection lives as long as its streams; the handle may go.
    drop(sender);
    (near, accepted.await.expect("accepted"))
}

/// A pod's socket (`pod`) proxied over an HBONE stream whose far end is `far`; the copy's
/// result comes out of the returned task.
async fn proxied() -> (
    DuplexStream,
    H2Io,
    tokio::task::JoinHandle<(std::io::Result<()>, u64, u64)>,
) {
    let (pod, proxy_side) = tokio::io::duplex(64 * 1024);
    let (mut near, far) = hbone_pair().await;
    let copier = tokio::spawn(async move {
        let mut counted = Counted::default();
        let result = hbone(proxy_side, &mut near, &mut counted, Timeouts::NONE).await;
        if result.is_err() {
            near.reset();
        }
        (result, counted.a_to_b, counted.b_to_a)
    });
    (pod, H2Io::new(far), copier)
}

#[tokio::test]
async fn hbone_copies_both_ways_and_propagates_half_close_as_end_stream() {
    let (mut pod, mut far, copier) = proxied().await;
    let upload = vec![3u8; 1_000_000];
    let pod_task = tokio::spawn(async move {
        pod.write_all(&upload).await.expect("write");
        pod.shutdown().await.expect("shutdown");
        let mut reply = Vec::new();
        pod.read_to_end(&mut reply).await.expect("read");
        reply
    });
    // The far end sees END_STREAM only after every byte: a FIN became END_STREAM.
    let mut got = Vec::new();
    far.read_to_end(&mut got).await.expect("far read");
    assert_eq!(got.len(), 1_000_000);
    far.write_all(b"done").await.expect("far write");
    far.shutdown().await.expect("far shutdown");
    assert_eq!(pod_task.await.expect("pod"), b"done");
    let (result, sent, received) = copier.await.expect("copier");
    result.expect("clean end");
    assert_eq!((sent, received), (1_000_000, 4));
}

#[tokio::test]
async fn hbone_a_reset_from_the_peer_is_an_error_not_an_end() {
    let (mut pod, proxy_side) = tokio::io::duplex(64 * 1024);
    let (mut near, mut far) = hbone_pair().await;
    let copier = tokio::spawn(async move {
        let mut counted = Counted::default();
        hbone(proxy_side, &mut near, &mut counted, Timeouts::NONE).await
    });
    pod.write_all(b"partial upload").await.expect("write");
    let chunk = std::future::poll_fn(|cx| far.recv.poll_chunk(cx))
        .await
        .expect("far read");
    assert!(chunk.is_some_and(|c| !c.is_empty()));
    // The far end aborts mid-upload: RST_STREAM(CANCEL).
    far.reset();
    let result = tokio::time::timeout(Duration::from_secs(5), copier)
        .await
        .expect("copy ends")
        .expect("copier");
    let error = result.expect_err("a reset is not a clean end");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
}

#[tokio::test]
async fn hbone_a_peer_closing_with_unread_bytes_resets_like_a_socket() {
    // Dropping the waypoint's byte-stream view with bytes unread is close() with unread
    // bytes: a reset, not an end.
    let (mut pod, mut far, copier) = proxied().await;
    pod.write_all(b"partial upload").await.expect("write");
    let mut first = [0u8; 7];
    far.read_exact(&mut first).await.expect("far read");
    drop(far);
    let (result, _, _) = tokio::time::timeout(Duration::from_secs(5), copier)
        .await
        .expect("copy ends")
        .expect("copier");
    let error = result.expect_err("a reset is not a clean end");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
}

#[tokio::test]
async fn hbone_a_reset_while_the_pod_is_quiet_still_ends_the_copy() {
    // The far end has sent END_STREAM and the pod waits without sending; then the far end
    // aborts (RST_STREAM(CANCEL)), so only the sending half can notice.
    let (pod, proxy_side) = tokio::io::duplex(64 * 1024);
    let (mut near, mut far) = hbone_pair().await;
    let copier = tokio::spawn(async move {
        let mut counted = Counted::default();
        hbone(proxy_side, &mut near, &mut counted, Timeouts::NONE).await
    });
    far.send.finish().expect("far END_STREAM");
    let mut pod = pod;
    let mut nothing = Vec::new();
    pod.read_to_end(&mut nothing)
        .await
        .expect("pod sees the far end's FIN");
    far.reset();
    let result = tokio::time::timeout(Duration::from_secs(5), copier)
        .await
        .expect("copy ends")
        .expect("copier");
    assert_eq!(
        result.expect_err("reset").kind(),
        std::io::ErrorKind::ConnectionReset
    );
}

/// A pod socket that was reset: every read fails as a reset socket's does.
struct ResetSocket;

impl AsyncRead for ResetSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()))
    }
}

impl AsyncWrite for ResetSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn hbone_a_reset_pod_socket_resets_the_stream() {
    let (mut near, far) = hbone_pair().await;
    let mut counted = Counted::default();
    let error = hbone(ResetSocket, &mut near, &mut counted, Timeouts::NONE)
        .await
        .expect_err("a reset socket fails the copy");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    // What the proxy does with a failed copy: the far end reads a reset, not an end.
    near.reset();
    let mut rest = Vec::new();
    let error = H2Io::new(far)
        .read_to_end(&mut rest)
        .await
        .expect_err("reset, not END_STREAM");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
}

#[tokio::test]
async fn hbone_a_copy_abandoned_midway_resets_the_stream() {
    // Cancelling the copy (a revoked policy, a drain that ran out) drops the stream before
    // either END_STREAM: the far end reads a reset.
    let (mut pod, mut far, copier) = proxied().await;
    pod.write_all(b"x").await.expect("write");
    let mut byte = [0u8; 1];
    far.read_exact(&mut byte).await.expect("far read");
    copier.abort();
    let _ = copier.await;
    let mut rest = Vec::new();
    let error = far
        .read_to_end(&mut rest)
        .await
        .expect_err("an abandoned copy resets the stream");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
}

#[tokio::test]
async fn hbone_a_peer_that_answered_in_full_and_stops_the_stream_ends_it_cleanly() {
    // The far end (a server) sends its whole answer and END_STREAM, then goes while the pod
    // still has its sending side open: h2 sends RST_STREAM(NO_ERROR), "no more needed".
    let (mut pod, mut far, copier) = proxied().await;
    pod.write_all(b"request").await.expect("write");
    let mut request = [0u8; 7];
    far.read_exact(&mut request).await.expect("far read");
    far.write_all(b"answer").await.expect("far write");
    far.shutdown().await.expect("far shutdown");
    drop(far);
    let mut answer = Vec::new();
    pod.read_to_end(&mut answer)
        .await
        .expect("the pod reads the answer and a FIN");
    assert_eq!(answer, b"answer");
    let (result, sent, received) = tokio::time::timeout(Duration::from_secs(5), copier)
        .await
        .expect("copy ends")
        .expect("copier");
    result.expect("a clean end");
    assert_eq!((sent, received), (7, 6));
}
