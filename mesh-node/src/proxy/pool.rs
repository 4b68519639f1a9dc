//! Outbound HBONE connections, pooled by (source identity, destination identity, node).
//!
//! Each pooled connection is one mutual-TLS HTTP/2 connection carrying up to
//! [`hbone::CLIENT_STREAMS_PER_CONNECTION`] CONNECT streams; past that a new connection is opened
//! for the same key. Connections that closed are dropped when next looked at.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::{ClientAddr, HboneAddr, OriginalDst};
use crate::{
    hbone,
    identity::{CertStore, Identity},
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
        source: hyper::Error,
    },
    #[error("CONNECT to {dst} failed: {source}")]
    Request {
        dst: std::net::SocketAddr,
        source: hyper::Error,
    },
    #[error("CONNECT to {dst} refused with {status}")]
    Status {
        dst: std::net::SocketAddr,
        status: StatusCode,
    },
    #[error("CONNECT to {dst}: tunnel not established: {source}")]
    Upgrade {
        dst: std::net::SocketAddr,
        source: hyper::Error,
    },
}

impl PoolError {
    /// Short reason for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PoolError::NoCertificate(_) => "no_certificate",
            PoolError::Connect { .. } => "hbone_connect",
            PoolError::Tls { .. } | PoolError::Alpn(_) => "hbone_tls",
            PoolError::Handshake { .. } | PoolError::Request { .. } | PoolError::Upgrade { .. } => {
                "hbone_protocol"
            }
            PoolError::Status { status, .. } if *status == StatusCode::UNAUTHORIZED => "denied",
            PoolError::Status { .. } => "hbone_status",
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
    sender: SendRequest<Empty<Bytes>>,
    streams: Arc<AtomicUsize>,
}

type Slot = Arc<tokio::sync::Mutex<Vec<Conn>>>;

/// Counts a stream against its connection until dropped.
pub struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An established CONNECT tunnel.
pub struct Tunnel {
    pub io: TokioIo<hyper::upgrade::Upgraded>,
    pub guard: StreamGuard,
}

pub struct Pool {
    slots: Mutex<HashMap<Key, Slot>>,
    connect_timeout: Duration,
}

impl Pool {
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            slots: Mutex::default(),
            connect_timeout,
        }
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
        let (mut sender, guard) = self.checkout(certs, key).await?;
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(dst.0.to_string())
            .header(http::header::FORWARDED, hbone::forwarded_for(client.0))
            .body(Empty::<Bytes>::new())
            .map_err(|_| PoolError::Status {
                dst: dst.0,
                status: StatusCode::BAD_REQUEST,
            })?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|source| PoolError::Request { dst: dst.0, source })?;
        if response.status() != StatusCode::OK {
            return Err(PoolError::Status {
                dst: dst.0,
                status: response.status(),
            });
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|source| PoolError::Upgrade { dst: dst.0, source })?;
        Ok(Tunnel {
            io: TokioIo::new(upgraded),
            guard,
        })
    }

    /// A sender on a connection with spare streams, dialing one if needed.
    async fn checkout(
        &self,
        certs: &CertStore,
        key: Key,
    ) -> Result<(SendRequest<Empty<Bytes>>, StreamGuard), PoolError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.entry(key.clone()).or_default().clone()
        };
        let mut conns = slot.lock().await;
        conns.retain(|c| !c.sender.is_closed());
        if let Some(conn) = conns.iter().find(|c| {
            c.sender.is_ready()
                && c.streams.load(Ordering::Relaxed) < hbone::CLIENT_STREAMS_PER_CONNECTION
        }) {
            conn.streams.fetch_add(1, Ordering::Relaxed);
            return Ok((conn.sender.clone(), StreamGuard(conn.streams.clone())));
        }
        let sender = self.dial(certs, &key).await?;
        let streams = Arc::new(AtomicUsize::new(1));
        conns.push(Conn {
            sender: sender.clone(),
            streams: streams.clone(),
        });
        Ok((sender, StreamGuard(streams)))
    }

    async fn dial(
        &self,
        certs: &CertStore,
        key: &Key,
    ) -> Result<SendRequest<Empty<Bytes>>, PoolError> {
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
        let tls = tokio::time::timeout(self.connect_timeout, connector.connect(server_name, tcp))
            .await
            .map_err(|_| PoolError::Tls {
                addr,
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| PoolError::Tls { addr, source })?;
        if tls.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN_H2) {
            return Err(PoolError::Alpn(addr));
        }
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(hbone::STREAM_WINDOW)
            .initial_connection_window_size(hbone::CONNECTION_WINDOW)
            .max_frame_size(hbone::MAX_FRAME_SIZE)
            .max_header_list_size(hbone::MAX_HEADER_LIST_SIZE)
            .keep_alive_interval(hbone::KEEPALIVE_INTERVAL)
            .keep_alive_timeout(hbone::KEEPALIVE_TIMEOUT)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| PoolError::Handshake { addr, source })?;
        let (src, dst) = (key.src.clone(), key.dst.clone());
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%src, %dst, peer = %addr, error = %e, "HBONE connection ended");
            }
        });
        tracing::debug!(src = %key.src, dst = %key.dst, peer = %addr, "opened HBONE connection");
        Ok(sender)
    }
}
