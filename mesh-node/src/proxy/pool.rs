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
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h2::client::SendRequest;
use http::StatusCode;
use parking_lot::Mutex;
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
            let mut slots = self.slots.lock();
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
mod tests;
