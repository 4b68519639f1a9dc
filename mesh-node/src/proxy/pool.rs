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
//! A connection also stops taking new streams shortly before the earlier of the two
//! certificates of its handshake expires (its own and the peer's, see [`retire_at`]): TLS
//! proves identities once, at the handshake, so a connection kept past an expiry would keep
//! carrying new traffic on a proof that is no longer valid. [`Pool::sweep`] drops retired and
//! closed connections nobody looks up any more, and the keys left empty.
//!
//! A single-use pool ([`Pool::single_use`]) pools nothing: every stream dials its own
//! connection, which closes with the stream for the same reason. It exists to measure what a
//! cold connection (a full handshake per stream) costs.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use h2::client::SendRequest;
use http::StatusCode;
use parking_lot::Mutex;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::{ClientAddr, HboneAddr, OriginalDst, read_ahead::ReadAhead};
use crate::{
    hbone::{self, H2Stream, client::ConnectError},
    identity::{
        CertStore, Identity,
        store::{WorkloadCert, certificate_validity},
    },
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
    /// When the connection stops taking new streams (see [`retire_at`]).
    retire_at: SystemTime,
}

impl Conn {
    /// Whether new streams may use this connection at `now`: still open, dialled with the
    /// certificate the store holds now, and not close to either certificate's expiry.
    fn is_current(&self, current: Option<&Arc<WorkloadCert>>, now: SystemTime) -> bool {
        !self.is_closed()
            && current.is_some_and(|c| Arc::ptr_eq(c, &self.cert))
            && now < self.retire_at
    }

    /// Why the connection takes no new streams (for the log), given that it is not current.
    fn retired_because(&self, now: SystemTime) -> &'static str {
        if now >= self.retire_at {
            "a certificate of its handshake is about to expire"
        } else {
            "its source certificate was replaced"
        }
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

/// How often idle keys and retired connections are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(15);

/// The most a connection is retired ahead of the earlier certificate expiry.
const RETIRE_AHEAD_MAX: Duration = Duration::from_mins(1);

/// When a connection dialled at `now` stops taking new streams: ahead of the earlier of the
/// two expiries by a quarter of the time left, at most [`RETIRE_AHEAD_MAX`], so streams that
/// open just before retirement still start well inside both certificates' validity. A peer
/// expiry that could not be read retires the connection at once (it serves the stream it was
/// dialled for and is not reused).
fn retire_at(
    now: SystemTime,
    own_expiry: SystemTime,
    peer_expiry: Option<SystemTime>,
) -> SystemTime {
    let Some(peer_expiry) = peer_expiry else {
        return now;
    };
    let expiry = own_expiry.min(peer_expiry);
    let left = expiry.duration_since(now).unwrap_or_default();
    expiry - (left / 4).min(RETIRE_AHEAD_MAX)
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
    /// The wall clock certificate expiries are compared with.
    clock: fn() -> SystemTime,
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
            clock: SystemTime::now,
        }
    }

    /// Drops the connections that take no new streams (closed, retired, or dialled with a
    /// replaced certificate), and the keys left with none. Connections busy in a checkout
    /// are left for the next sweep. Dropping a retired connection's handle lets HTTP/2 close
    /// it once its open streams end.
    pub fn sweep(&self, certs: &CertStore) {
        let now = (self.clock)();
        let slots: Vec<(Key, Slot)> = self
            .slots
            .lock()
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        for (key, slot) in slots {
            let Ok(mut conns) = slot.try_lock() else {
                continue;
            };
            let current = certs.get(&key.src);
            conns.retain(|c| c.is_current(current.as_ref(), now));
            if conns.is_empty() {
                drop(conns);
                let mut slots = self.slots.lock();
                // Only if no checkout took the slot meanwhile (it would hold a clone).
                if slots.get(&key).is_some_and(|s| Arc::strong_count(s) == 2) {
                    slots.remove(&key);
                }
            }
        }
    }

    /// Sweeps every [`SWEEP_EVERY`] until `shutdown`.
    pub async fn keep_swept(&self, certs: &CertStore, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = every.tick() => self.sweep(certs),
            }
        }
    }

    /// Every key's pooled connections (open or not yet swept), for tests and the dump.
    #[cfg(test)]
    fn pooled(&self) -> usize {
        self.slots
            .lock()
            .values()
            .map(|s| s.try_lock().map_or(0, |c| c.len()))
            .sum()
    }

    /// With a clock of its own (tests move time past certificate expiries).
    #[cfg(test)]
    fn with_clock(self, clock: fn() -> SystemTime) -> Self {
        Self { clock, ..self }
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
            let (sender, closed, _, _) = self.dial(certs, &key).await?;
            return Ok((sender, closed, StreamGuard(Arc::new(AtomicUsize::new(1)))));
        }
        let slot = {
            let mut slots = self.slots.lock();
            slots.entry(key.clone()).or_default().clone()
        };
        let mut conns = slot.lock().await;
        let current = certs.get(&key.src);
        let now = (self.clock)();
        conns.retain(|c| {
            let keep = c.is_current(current.as_ref(), now);
            if !keep && !c.is_closed() {
                tracing::debug!(
                    src = %key.src,
                    dst = %key.dst,
                    peer = %key.node.0,
                    serial = %c.cert.serial,
                    open_streams = c.streams.load(Ordering::Relaxed),
                    because = c.retired_because(now),
                    "retiring HBONE connection"
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
        let (sender, closed, cert, peer_expiry) = self.dial(certs, &key).await?;
        let streams = Arc::new(AtomicUsize::new(1));
        let retire_at = retire_at((self.clock)(), cert.not_after, peer_expiry);
        conns.push(Conn {
            sender: sender.clone(),
            closed: closed.clone(),
            streams: streams.clone(),
            cert,
            retire_at,
        });
        Ok((sender, closed, StreamGuard(streams)))
    }

    /// Opens a connection for `key`; returns it, the flag its task sets when it ends, the
    /// certificate it presented and when the peer's expires.
    async fn dial(
        &self,
        certs: &CertStore,
        key: &Key,
    ) -> Result<
        (
            SendRequest<Bytes>,
            Arc<AtomicBool>,
            Arc<WorkloadCert>,
            Option<SystemTime>,
        ),
        PoolError,
    > {
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
        let peer_expiry = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(<[_]>::first)
            .and_then(certificate_validity)
            .map(|(_, not_after)| not_after);
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
        Ok((sender, closed, cert, peer_expiry))
    }
}

#[cfg(test)]
mod tests;
