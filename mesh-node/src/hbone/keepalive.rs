//! HBONE keepalive: a PING every [`super::KEEPALIVE_INTERVAL`], and a connection whose peer
//! does not answer within [`super::KEEPALIVE_TIMEOUT`] is dead.
//!
//! A peer node that vanished without closing (power loss, a partition) would otherwise hold
//! the connection and every stream on it until TCP gives up, minutes later. `h2` answers
//! PINGs but sends none of its own; this sends them through its user PING handle, which the
//! connection's own task drives, so keepalive costs no task and no timer while a PONG is
//! outstanding beyond the one deadline.

use std::{
    future::poll_fn,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use h2::{Ping, PingPong};
use tokio::time::{Instant, Sleep, sleep};

/// Sends PINGs and watches for their PONGs. Poll it alongside the connection it belongs to.
pub struct Keepalive {
    ping: Option<PingPong>,
    timer: Pin<Box<Sleep>>,
    /// A PING is out; the timer is its deadline.
    waiting: bool,
    interval: Duration,
    timeout: Duration,
}

impl Keepalive {
    /// Keepalive over `ping` (the connection's user PING handle; `None` disables it).
    pub fn new(ping: Option<PingPong>, interval: Duration, timeout: Duration) -> Self {
        Self {
            ping,
            timer: Box::pin(sleep(interval)),
            waiting: false,
            interval,
            timeout,
        }
    }

    /// Resolves once the peer failed to answer a PING in time (or the connection can no longer
    /// send one); pending for as long as the peer is alive.
    pub async fn dead(&mut self) -> String {
        poll_fn(|cx| self.poll_dead(cx)).await
    }

    fn poll_dead(&mut self, cx: &mut Context<'_>) -> Poll<String> {
        let Some(ping) = self.ping.as_mut() else {
            return Poll::Pending;
        };
        loop {
            if self.waiting {
                match ping.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.waiting = false;
                        self.timer.as_mut().reset(Instant::now() + self.interval);
                        continue;
                    }
                    // The connection itself failed: its own task reports that.
                    Poll::Ready(Err(_)) => {
                        self.ping = None;
                        return Poll::Pending;
                    }
                    Poll::Pending => {}
                }
                if self.timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(format!(
                        "peer did not answer a keepalive PING within {:?}",
                        self.timeout
                    ));
                }
                return Poll::Pending;
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if ping.send_ping(Ping::opaque()).is_err() {
                self.ping = None;
                return Poll::Pending;
            }
            self.waiting = true;
            self.timer.as_mut().reset(Instant::now() + self.timeout);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const INTERVAL: Duration = Duration::from_secs(30);
    const TIMEOUT: Duration = Duration::from_secs(10);

    type Client = (
        h2::client::SendRequest<bytes::Bytes>,
        h2::client::Connection<tokio::io::DuplexStream>,
        Keepalive,
    );

    /// A client connection on `io` with its keepalive. The caller holds the request handle:
    /// without one, the connection closes itself.
    async fn client(io: tokio::io::DuplexStream) -> Client {
        let (send, mut conn) = h2::client::handshake(io).await.expect("handshake");
        let keepalive = Keepalive::new(conn.ping_pong(), INTERVAL, TIMEOUT);
        (send, conn, keepalive)
    }

    #[tokio::test(start_paused = true)]
    async fn an_answering_peer_stays_alive() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(b).await.expect("server handshake");
            while let Some(Ok(_)) = conn.accept().await {}
        });
        let (_send, mut conn, mut keepalive) =
            tokio::time::timeout(Duration::from_secs(5), client(a))
                .await
                .expect("handshake in time");
        let outcome = tokio::time::timeout(INTERVAL * 5, async {
            tokio::select! {
                dead = keepalive.dead() => Some(dead),
                _ = &mut conn => None,
            }
        })
        .await;
        assert!(
            outcome.is_err(),
            "still alive after five intervals: {outcome:?}"
        );
        server.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_dead_after_the_timeout() {
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        // The peer completes the HTTP/2 preface exchange by hand, then reads and never answers.
        let peer = tokio::spawn(async move {
            let mut preface = [0u8; 24];
            b.read_exact(&mut preface).await.expect("preface");
            // An empty SETTINGS frame, then an ACK of the client's.
            b.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
                .await
                .expect("settings");
            b.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0])
                .await
                .expect("ack");
            let mut sink = vec![0u8; 4096];
            while b.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        });
        let (_send, mut conn, mut keepalive) = client(a).await;
        let started = Instant::now();
        let dead = tokio::time::timeout(INTERVAL * 3, async {
            tokio::select! {
                dead = keepalive.dead() => dead,
                result = &mut conn => panic!("connection ended first: {result:?}"),
            }
        })
        .await
        .expect("declared dead");
        assert!(dead.contains("keepalive"), "{dead}");
        assert_eq!(started.elapsed(), INTERVAL + TIMEOUT);
        peer.abort();
    }
}
