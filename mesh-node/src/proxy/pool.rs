//! Outbound HBONE connections, pooled by (source identity, destination identity, node).
//!
//! Each pooled connection is one mutual-TLS HTTP/2 connection carrying CONNECT streams. One
//! connection is one task on each node (its TLS records are sealed and opened there), so one
//! connection cannot move more bytes than one core can encrypt. Streams of a key are
//! therefore spread over up to `spread` connections (the agent uses its number of cores): a
//! new stream takes an idle connection if there is one, else opens another connection while
//! the key has fewer than `spread`, else joins the least loaded one ([`choose`]). A
//! connection never carries more than [`hbone::CLIENT_STREAMS_PER_CONNECTION`] streams, so the
//! peer's stream limit is never hit; past that, more connections open whatever `spread` says.
//! Connections that closed are dropped when next looked at.
//!
//! A connection remembers the certificate it was dialled with. Once the store holds another
//! one for its source identity (renewed, or re-issued) or none, the connection gets no new
//! streams: the next lookup of its key drops it from the pool and dials again, so new
//! connections always handshake with the current certificate and a replaced one stops being
//! presented. Streams already open keep running; HTTP/2 closes the connection once they are
//! done, since the pool no longer holds a handle to it.
//!
//! A single-use pool ([`Pool::single_use`]) pools nothing: every stream dials its own
//! connection, which closes with the stream for the same reason. It exists to measure what a
//! cold connection (a full handshake per stream) costs.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h2::client::SendRequest;
use http::StatusCode;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::{ClientAddr, HboneAddr, OriginalDst, read_ahead::ReadAhead};
use crate::{
    hbone::{self, H2Stream, client::ConnectError},
    identity::{CertStore, Identity, store::WorkloadCert},
    metrics::FailureReason,
};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no certificate held for source identity {0}")]
    NoCertificate(Identity),
    #[error("cannot reach HBONE peer {addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed (peer identity or trust bundle mismatch?): {source}")]
    Tls {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("HBONE peer {0} did not negotiate h2")]
    Alpn(std::net::SocketAddr),
    #[error("HTTP/2 handshake with {addr} failed: {source}")]
    Handshake {
        addr: std::net::SocketAddr,
        source: h2::Error,
    },
    #[error("CONNECT to {dst} failed: {source}")]
    Request {
        dst: std::net::SocketAddr,
        source: h2::Error,
    },
    #[error("CONNECT to {dst} refused with {status}")]
    Status {
        dst: std::net::SocketAddr,
        status: StatusCode,
    },
}

impl PoolError {
    /// Short reason for metrics.
    pub fn reason(&self) -> FailureReason {
        match self {
            PoolError::NoCertificate(_) => FailureReason::NoCertificate,
            PoolError::Connect { .. } => FailureReason::HboneConnect,
            PoolError::Tls { .. } | PoolError::Alpn(_) => FailureReason::HboneTls,
            PoolError::Handshake { .. } | PoolError::Request { .. } => FailureReason::HboneProtocol,
            PoolError::Status { status, .. } if *status == StatusCode::UNAUTHORIZED => {
                FailureReason::Denied
            }
            PoolError::Status { .. } => FailureReason::HboneStatus,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    src: Identity,
    dst: Identity,
    node: HboneAddr,
}

struct Conn {
    sender: SendRequest<Bytes>,
    /// Set once the connection's task ended (closed, failed, or its peer went silent).
    closed: Arc<AtomicBool>,
    streams: Arc<AtomicUsize>,
    /// The source certificate presented in this connection's handshake.
    cert: Arc<WorkloadCert>,
}

impl Conn {
    /// Whether new streams may use this connection: still open, and dialled with the
    /// certificate the store holds now.
    fn is_current(&self, current: Option<&Arc<WorkloadCert>>) -> bool {
        !self.is_closed() && current.is_some_and(|c| Arc::ptr_eq(c, &self.cert))
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

type Slot = Arc<tokio::sync::Mutex<Vec<Conn>>>;

/// What [`choose`] knows of one pooled connection.
#[derive(Clone, Copy, Debug)]
struct Load {
    /// Still open.
    ready: bool,
    /// Streams open on it now.
    streams: usize,
}

#[derive(Debug, PartialEq, Eq)]
enum Choice {
    /// Put the stream on the connection at this index.
    Use(usize),
    /// Open another connection for it.
    Dial,
}

/// Where a new stream goes, given the key's current connections: an idle one first; else a
/// new connection while there are fewer than `spread`; else the least loaded one with room
/// (the first of equals, so the choice is stable). Only a key whose every connection is at
/// [`hbone::CLIENT_STREAMS_PER_CONNECTION`] dials past `spread`.
fn choose(loads: &[Load], spread: usize) -> Choice {
    let least = loads
        .iter()
        .enumerate()
        .filter(|(_, l)| l.ready && l.streams < hbone::CLIENT_STREAMS_PER_CONNECTION)
        .min_by_key(|(_, l)| l.streams);
    match least {
        Some((i, l)) if l.streams == 0 || loads.len() >= spread => Choice::Use(i),
        _ => Choice::Dial,
    }
}

/// Counts a stream against its connection until dropped.
pub struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An established CONNECT tunnel.
pub struct Tunnel {
    pub stream: H2Stream,
    pub guard: StreamGuard,
}

pub struct Pool {
    slots: Mutex<HashMap<Key, Slot>>,
    connect_timeout: Duration,
    /// How many connections per key streams are spread over (see the module docs).
    spread: usize,
    /// Every stream gets its own connection, never pooled.
    single_use: bool,
}

impl Pool {
    /// A pool dialling within `connect_timeout` that spreads each key's streams over up to
    /// `spread` connections (at least one).
    pub fn new(connect_timeout: Duration, spread: usize) -> Self {
        Self {
            slots: Mutex::default(),
            connect_timeout,
            spread: spread.max(1),
            single_use: false,
        }
    }

    /// With `single_use`, every stream dials a connection of its own that closes when the
    /// stream ends (see the module docs).
    pub fn single_use(self, single_use: bool) -> Self {
        Self { single_use, ..self }
    }

    /// Opens a CONNECT stream to `dst` through the agent at `node`, presenting `src` and
    /// requiring the peer to prove `dst_identity`.
    pub async fn tunnel(
        &self,
        certs: &CertStore,
        src: &Identity,
        dst_identity: &Identity,
        node: HboneAddr,
        dst: OriginalDst,
        client: ClientAddr,
    ) -> Result<Tunnel, PoolError> {
        let key = Key {
            src: src.clone(),
            dst: dst_identity.clone(),
            node,
        };
        let (sender, closed, guard) = self.checkout(certs, key).await?;
        let stream = hbone::client::connect(&sender, dst.0, client.0)
            .await
            .map_err(|e| match e {
                ConnectError::Connection(source) => {
                    // Going away or broken: no new streams go to it.
                    closed.store(true, Ordering::Relaxed);
                    PoolError::Request { dst: dst.0, source }
                }
                ConnectError::Request(source) => PoolError::Request { dst: dst.0, source },
                ConnectError::Status(status) => PoolError::Status { dst: dst.0, status },
            })?;
        Ok(Tunnel { stream, guard })
    }

    /// A sender on a connection with spare streams, dialing one if needed.
    async fn checkout(
        &self,
        certs: &CertStore,
        key: Key,
    ) -> Result<(SendRequest<Bytes>, Arc<AtomicBool>, StreamGuard), PoolError> {
        if self.single_use {
            // Not stored: once this stream's sender is dropped, the connection closes.
            let (sender, closed, _) = self.dial(certs, &key).await?;
            return Ok((sender, closed, StreamGuard(Arc::new(AtomicUsize::new(1)))));
        }
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.entry(key.clone()).or_default().clone()
        };
        let mut conns = slot.lock().await;
        let current = certs.get(&key.src);
        conns.retain(|c| {
            let keep = c.is_current(current.as_ref());
            if !keep && !c.is_closed() {
                tracing::debug!(
                    src = %key.src,
                    dst = %key.dst,
                    peer = %key.node.0,
                    serial = %c.cert.serial,
                    open_streams = c.streams.load(Ordering::Relaxed),
                    "retiring HBONE connection: its source certificate was replaced"
                );
            }
            keep
        });
        let loads: Vec<Load> = conns
            .iter()
            .map(|c| Load {
                ready: !c.is_closed(),
                streams: c.streams.load(Ordering::Relaxed),
            })
            .collect();
        if let Choice::Use(i) = choose(&loads, self.spread)
            && let Some(conn) = conns.get(i)
        {
            conn.streams.fetch_add(1, Ordering::Relaxed);
            return Ok((
                conn.sender.clone(),
                conn.closed.clone(),
                StreamGuard(conn.streams.clone()),
            ));
        }
        // The slot stays locked while dialling: streams of this key that arrive meanwhile
        // wait for this connection instead of each dialling their own. It happens at most
        // `spread` times per key and certificate while streams stay open.
        let (sender, closed, cert) = self.dial(certs, &key).await?;
        let streams = Arc::new(AtomicUsize::new(1));
        conns.push(Conn {
            sender: sender.clone(),
            closed: closed.clone(),
            streams: streams.clone(),
            cert,
        });
        Ok((sender, closed, StreamGuard(streams)))
    }

    /// Opens a connection for `key`; returns it, the flag its task sets when it ends, and the
    /// certificate it presented.
    async fn dial(
        &self,
        certs: &CertStore,
        key: &Key,
    ) -> Result<(SendRequest<Bytes>, Arc<AtomicBool>, Arc<WorkloadCert>), PoolError> {
        let addr = key.node.0;
        let cert = certs
            .wait_for(&key.src, self.connect_timeout)
            .await
            .ok_or_else(|| PoolError::NoCertificate(key.src.clone()))?;
        let tcp = super::connect(addr, self.connect_timeout)
            .await
            .map_err(|source| PoolError::Connect { addr, source })?;
        let server_name = ServerName::try_from(key.dst.to_sni()).map_err(|e| PoolError::Tls {
            addr,
            source: std::io::Error::other(e),
        })?;
        let connector = TlsConnector::from(cert.client_config.clone());
        let tls = tokio::time::timeout(
            self.connect_timeout,
            connector.connect(server_name, ReadAhead::new(tcp)),
        )
        .await
        .map_err(|_| PoolError::Tls {
            addr,
            source: std::io::ErrorKind::TimedOut.into(),
        })?
        .map_err(|source| PoolError::Tls { addr, source })?;
        if tls.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN_H2) {
            return Err(PoolError::Alpn(addr));
        }
        let (sender, driver) = hbone::client::handshake(tls)
            .await
            .map_err(|source| PoolError::Handshake { addr, source })?;
        let closed = Arc::new(AtomicBool::new(false));
        let (src, dst, ended) = (key.src.clone(), key.dst.clone(), closed.clone());
        tokio::spawn(async move {
            if let Err(e) = driver.run().await {
                tracing::debug!(%src, %dst, peer = %addr, error = %e, "HBONE connection ended");
            }
            ended.store(true, Ordering::Relaxed);
        });
        tracing::debug!(src = %key.src, dst = %key.dst, peer = %addr, serial = %cert.serial, "opened HBONE connection");
        Ok((sender, closed, cert))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashSet,
        net::{Ipv4Addr, SocketAddr},
        sync::Mutex as StdMutex,
    };

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Notify;

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
        handshakes: StdMutex<Vec<String>>,
        closed: StdMutex<Vec<String>>,
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
            CertStore::new(tls::provider(), std::slice::from_ref(ca.cert_der()), TD)
                .expect("store"),
        )
    }

    fn local_issuer(ca: &LocalCa) -> Issuer {
        Issuer::Local(LocalCa::from_pem(ca.cert_pem(), &ca.key_pem()).expect("ca copy"))
    }

    impl Harness {
        async fn start() -> Self {
            let ca = LocalCa::generate(TD).expect("ca");
            let src = Identity::new(TD, "shop", "web").expect("src");
            let dst = Identity::new(TD, "shop", "db").expect("dst");
            let ttl = Duration::from_secs(3600);

            let certs = store(&ca);
            let mut manager = CertManager::new(certs.clone(), local_issuer(&ca), ttl);
            assert!(
                manager
                    .reconcile(&HashSet::from([src.clone()]))
                    .await
                    .is_empty()
            );

            let server_certs = store(&ca);
            let mut server_manager = CertManager::new(server_certs.clone(), local_issuer(&ca), ttl);
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
            self.seen.handshakes.lock().expect("lock").clone()
        }

        fn closed(&self) -> Vec<String> {
            self.seen.closed.lock().expect("lock").clone()
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
                seen.handshakes.lock().expect("lock").push(serial.clone());
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
                seen.closed.lock().expect("lock").push(serial);
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
}
