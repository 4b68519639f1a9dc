//! The HBONE pool: which connection a stream takes, the spread per key, single-use pools, and
//! certificate rotation.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
};

use parking_lot::Mutex as SyncMutex;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::Notify,
};

use super::*;
use crate::{
    hbone::H2Io,
    identity::{
        LocalCa,
        store::{CertManager, Issuer, certificate_serial},
    },
    tls,
};

const TD: &str = "cluster.local";

/// What the fake HBONE server saw: the client certificate serial of every handshake, and
/// of every connection that has ended.
#[derive(Default)]
struct Seen {
    handshakes: SyncMutex<Vec<String>>,
    closed: SyncMutex<Vec<String>>,
    changed: Notify,
}

/// A client node holding `src`'s certificate and a server echoing every CONNECT stream
/// as `dst`.
struct Harness {
    src: Identity,
    dst: Identity,
    certs: Arc<CertStore>,
    manager: CertManager,
    addr: SocketAddr,
    seen: Arc<Seen>,
}

fn store(ca: &LocalCa) -> Arc<CertStore> {
    Arc::new(
        CertStore::new(tls::provider(), std::slice::from_ref(ca.cert_der()), TD).expect("store"),
    )
}

fn local_issuer(ca: &LocalCa) -> Issuer {
    Issuer::Local(LocalCa::from_pem(ca.cert_pem(), &ca.key_pem()).expect("ca copy"))
}

impl Harness {
    async fn start() -> Self {
        Self::with_lifetimes(Duration::from_hours(1), Duration::from_hours(1)).await
    }

    /// Client certificates live `client_ttl`, the server's `server_ttl`.
    async fn with_lifetimes(client_ttl: Duration, server_ttl: Duration) -> Self {
        let ca = LocalCa::generate(TD).expect("ca");
        let src = Identity::new(TD, "shop", "web").expect("src");
        let dst = Identity::new(TD, "shop", "db").expect("dst");

        let certs = store(&ca);
        let mut manager = CertManager::new(certs.clone(), local_issuer(&ca), client_ttl);
        assert!(
            manager
                .reconcile(&HashSet::from([src.clone()]))
                .await
                .is_empty()
        );

        let server_certs = store(&ca);
        let mut server_manager =
            CertManager::new(server_certs.clone(), local_issuer(&ca), server_ttl);
        assert!(
            server_manager
                .reconcile(&HashSet::from([dst.clone()]))
                .await
                .is_empty()
        );
        let config = tls::server_config(
            tls::provider(),
            server_certs.roots().clone(),
            TD,
            server_certs.clone(),
        )
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Seen::default());
        tokio::spawn(serve(listener, acceptor, seen.clone()));
        Self {
            src,
            dst,
            certs,
            manager,
            addr,
            seen,
        }
    }

    async fn tunnel(&self, pool: &Pool) -> Open {
        let tunnel = pool
            .tunnel(
                &self.certs,
                &self.src,
                &self.dst,
                HboneAddr(self.addr),
                OriginalDst(SocketAddr::from(([10, 0, 0, 2], 80))),
                ClientAddr(SocketAddr::from(([10, 0, 0, 1], 40000))),
            )
            .await
            .expect("tunnel");
        Open {
            io: H2Io::new(tunnel.stream),
            _guard: tunnel.guard,
        }
    }

    fn serial(&self) -> String {
        self.certs
            .get(&self.src)
            .expect("certificate held")
            .serial
            .clone()
    }

    /// Replaces the source certificate (as a renewal does) and returns the new serial.
    async fn renew(&mut self) -> String {
        let before = self.certs.get(&self.src).expect("held");
        // Leaving and rejoining forces a new certificate now rather than at half life.
        self.manager.reconcile(&HashSet::new()).await;
        let failures = self
            .manager
            .reconcile(&HashSet::from([self.src.clone()]))
            .await;
        assert!(failures.is_empty(), "{failures:?}");
        let after = self.certs.get(&self.src).expect("renewed");
        assert!(!Arc::ptr_eq(&before, &after));
        after.serial.clone()
    }

    fn handshakes(&self) -> Vec<String> {
        self.seen.handshakes.lock().clone()
    }

    fn closed(&self) -> Vec<String> {
        self.seen.closed.lock().clone()
    }

    async fn wait_closed(&self, serial: &str) {
        let wait = async {
            loop {
                let changed = self.seen.changed.notified();
                if self.closed().iter().any(|s| s == serial) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "connection dialled with {serial} still open; closed: {:?}",
                    self.closed()
                )
            });
    }
}

/// Accepts HBONE connections, recording each client certificate, and echoes every stream.
async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    seen: Arc<Seen>,
) {
    while let Ok((tcp, _)) = listener.accept().await {
        let (acceptor, seen) = (acceptor.clone(), seen.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let serial = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(certificate_serial)
                .expect("client certificate");
            seen.handshakes.lock().push(serial.clone());
            seen.changed.notify_waiters();
            if let Ok(mut server) = hbone::server::Server::handshake(tls, 100).await {
                while let hbone::server::Next::Stream(request, respond) = server.next().await {
                    tokio::spawn(async move {
                        if let Ok(stream) = hbone::server::accept(respond, request) {
                            let (mut r, mut w) = tokio::io::split(H2Io::new(stream));
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                            let _ = w.shutdown().await;
                        }
                    });
                }
            }
            seen.closed.lock().push(serial);
            seen.changed.notify_waiters();
        });
    }
}

/// A tunnel as a byte stream, holding its place in the pool.
struct Open {
    io: H2Io,
    _guard: StreamGuard,
}

async fn echo(tunnel: &mut Open, bytes: &[u8]) {
    tunnel.io.write_all(bytes).await.expect("write");
    let mut back = vec![0; bytes.len()];
    tokio::time::timeout(Duration::from_secs(5), tunnel.io.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(back, bytes);
}

/// Half-closes and reads the peer's end of stream.
async fn finish(mut tunnel: Open) {
    tunnel.io.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tunnel.io.read_to_end(&mut rest))
        .await
        .expect("end of stream in time")
        .expect("clean end of stream");
    assert!(rest.is_empty());
}

fn loads(streams: &[usize]) -> Vec<Load> {
    streams
        .iter()
        .map(|&streams| Load {
            ready: true,
            streams,
        })
        .collect()
}

#[test]
fn a_new_stream_takes_an_idle_connection_before_opening_another() {
    assert_eq!(choose(&[], 2), Choice::Dial, "no connection yet");
    assert_eq!(choose(&loads(&[0]), 2), Choice::Use(0));
    assert_eq!(choose(&loads(&[3, 0]), 4), Choice::Use(1));
}

#[test]
fn busy_connections_grow_to_the_spread_then_the_least_loaded_takes_the_stream() {
    assert_eq!(choose(&loads(&[1]), 2), Choice::Dial);
    assert_eq!(
        choose(&loads(&[1]), 1),
        Choice::Use(0),
        "spread 1: one shared connection"
    );
    assert_eq!(choose(&loads(&[2, 1]), 2), Choice::Use(1));
    assert_eq!(
        choose(&loads(&[1, 1]), 2),
        Choice::Use(0),
        "the first of equals"
    );
    assert_eq!(
        choose(&loads(&[5, 4, 6]), 2),
        Choice::Use(1),
        "more than the spread"
    );
}

#[test]
fn full_or_closed_connections_take_no_stream() {
    let full = hbone::CLIENT_STREAMS_PER_CONNECTION;
    assert_eq!(
        choose(&loads(&[full, full]), 2),
        Choice::Dial,
        "past the spread"
    );
    assert_eq!(choose(&loads(&[full, 7]), 2), Choice::Use(1));
    let closed = Load {
        ready: false,
        streams: 0,
    };
    assert_eq!(choose(&[closed], 1), Choice::Dial);
}

#[tokio::test]
async fn concurrent_streams_spread_over_connections_and_idle_ones_are_reused() {
    let h = Harness::start().await;
    let pool = Pool::new(Duration::from_secs(5), 2);

    let mut first = h.tunnel(&pool).await;
    let mut second = h.tunnel(&pool).await;
    assert_eq!(h.handshakes().len(), 2, "a busy connection: open a second");
    let mut third = h.tunnel(&pool).await;
    assert_eq!(
        h.handshakes().len(),
        2,
        "at the spread: share the least loaded"
    );
    for tunnel in [&mut first, &mut second, &mut third] {
        echo(tunnel, b"each stream carries its own bytes").await;
    }
    finish(first).await;
    finish(second).await;
    finish(third).await;

    let fourth = h.tunnel(&pool).await;
    let fifth = h.tunnel(&pool).await;
    assert_eq!(
        h.handshakes().len(),
        2,
        "idle pooled connections are reused"
    );
    finish(fourth).await;
    finish(fifth).await;
    assert!(h.closed().is_empty(), "pooled connections stay open");
}

#[tokio::test]
async fn a_single_use_pool_handshakes_per_stream_and_closes_with_it() {
    let h = Harness::start().await;
    let pool = Pool::new(Duration::from_secs(5), 2).single_use(true);

    let mut first = h.tunnel(&pool).await;
    echo(&mut first, b"cold").await;
    finish(first).await;
    let first_serial = h.handshakes();
    assert_eq!(first_serial.len(), 1);
    h.wait_closed(&first_serial[0]).await;

    let mut second = h.tunnel(&pool).await;
    echo(&mut second, b"cold again").await;
    finish(second).await;
    assert_eq!(h.handshakes().len(), 2, "no connection is reused");
}

#[tokio::test]
async fn a_replaced_certificate_retires_pooled_connections_without_cutting_their_streams() {
    let mut h = Harness::start().await;
    // One connection per key, so that both streams share the connection being retired.
    let pool = Pool::new(Duration::from_secs(5), 1);

    let mut first = h.tunnel(&pool).await;
    echo(&mut first, b"before renewal").await;
    let mut second = h.tunnel(&pool).await;
    echo(&mut second, b"shares the connection").await;
    let old = h.serial();
    assert_eq!(h.handshakes(), vec![old.clone()], "one pooled connection");

    let new = h.renew().await;
    assert_ne!(old, new);
    let mut third = h.tunnel(&pool).await;
    echo(&mut third, b"after renewal").await;
    assert_eq!(
        h.handshakes(),
        vec![old.clone(), new.clone()],
        "a new stream after the renewal handshakes with the new certificate"
    );

    // The streams of the retired connection are not cut.
    echo(&mut first, b"still flowing").await;
    echo(&mut second, b"both ways").await;
    assert!(h.closed().is_empty());

    // Once they are done, the retired connection closes; the new one stays pooled.
    finish(first).await;
    drop(second);
    h.wait_closed(&old).await;
    let fourth = h.tunnel(&pool).await;
    assert_eq!(h.handshakes().len(), 2, "the new connection is reused");
    finish(third).await;
    finish(fourth).await;
    assert!(
        !h.closed().contains(&new),
        "the current connection stays open"
    );
}

#[test]
fn a_connection_retires_ahead_of_the_earlier_expiry_by_a_quarter_of_the_time_left_at_most_a_minute()
{
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let hours = |h| now + Duration::from_hours(h);
    assert_eq!(
        retire_at(now, hours(2), Some(hours(1))),
        hours(1) - RETIRE_AHEAD_MAX,
        "the peer's earlier expiry counts"
    );
    assert_eq!(
        retire_at(now, hours(1), Some(hours(3))),
        hours(1) - RETIRE_AHEAD_MAX,
        "our own earlier expiry counts"
    );
    let soon = now + Duration::from_secs(40);
    assert_eq!(
        retire_at(now, soon, Some(hours(1))),
        now + Duration::from_secs(30),
        "a quarter of a short time left"
    );
    assert_eq!(
        retire_at(now, now, Some(now)),
        now,
        "expiring now: not reused"
    );
    assert_eq!(
        retire_at(now, hours(1), None),
        now,
        "an unreadable peer certificate: not reused"
    );
}

/// A clock 59 minutes and a half ahead: past the retirement of a connection whose earlier
/// certificate lives one hour.
fn near_expiry() -> SystemTime {
    SystemTime::now() + Duration::from_secs(59 * 60 + 30)
}

#[tokio::test]
async fn a_connection_close_to_a_certificate_expiry_takes_no_new_stream_but_keeps_its_own() {
    let h = Harness::start().await;
    let pool = Pool::new(Duration::from_secs(5), 1);
    let mut first = h.tunnel(&pool).await;
    echo(&mut first, b"fresh").await;
    assert_eq!(h.handshakes().len(), 1);

    // The same certificates, an hour later: the pooled connection is not reused.
    let later = pool.with_clock(near_expiry);
    let mut second = h.tunnel(&later).await;
    echo(&mut second, b"new handshake").await;
    let handshakes = h.handshakes();
    assert_eq!(handshakes.len(), 2, "a new connection was dialled");
    assert_eq!(
        handshakes[0], handshakes[1],
        "with the same, unexpired certificate"
    );
    // The retired connection's stream is not cut.
    echo(&mut first, b"still flowing").await;
    finish(first).await;
    finish(second).await;
}

#[tokio::test]
async fn the_peer_certificate_expiry_retires_the_connection_too() {
    // The client's certificate lives a day; the server's an hour.
    let h = Harness::with_lifetimes(Duration::from_hours(24), Duration::from_hours(1)).await;
    let pool = Pool::new(Duration::from_secs(5), 1);
    let first = h.tunnel(&pool).await;
    finish(first).await;
    let later = pool.with_clock(near_expiry);
    let second = h.tunnel(&later).await;
    assert_eq!(
        h.handshakes().len(),
        2,
        "the server certificate about to expire retired the connection"
    );
    finish(second).await;
}

#[tokio::test]
async fn a_sweep_drops_retired_connections_and_empty_keys_so_idle_ones_close() {
    let h = Harness::start().await;
    let pool = Pool::new(Duration::from_secs(5), 1);
    let first = h.tunnel(&pool).await;
    finish(first).await;
    let serial = h.serial();

    pool.sweep(&h.certs);
    assert_eq!(pool.pooled(), 1, "a current idle connection stays pooled");
    assert!(h.closed().is_empty());

    let later = pool.with_clock(near_expiry);
    later.sweep(&h.certs);
    assert_eq!(later.pooled(), 0);
    assert!(later.slots.lock().is_empty(), "the empty key is dropped");
    h.wait_closed(&serial).await;
}
