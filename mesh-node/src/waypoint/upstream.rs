//! Requests to endpoints: HTTP over HBONE, pooled per endpoint.
//!
//! The waypoint dials the endpoint's node agent as itself (its own identity, verified by the
//! destination node like any source), one CONNECT stream per upstream HTTP connection, and
//! keeps those connections for reuse: HTTP/1.1 connections one request at a time, HTTP/2 (and
//! gRPC) multiplexed on one. hyper-util's client does the pooling; this module only supplies
//! the transport (an HBONE tunnel instead of a TCP socket).

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwap;
use http::Uri;
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{body::Body, l7::L7};
use crate::{
    hbone::{self, H2Io},
    identity::{CertStore, Identity},
    l7::resilience::{ConnectionPermit, Overflow},
    proxy::{
        ClientAddr, HboneAddr, OriginalDst,
        pool::{Pool, PoolError, StreamGuard},
    },
    state::MeshState,
};

/// How long an idle upstream connection is kept for reuse.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("upstream URI {0} has no IP:port authority")]
    Authority(String),
    #[error("endpoint {0} is not a mesh workload this waypoint knows")]
    UnknownEndpoint(SocketAddr),
    #[error("endpoint {addr} is on node {node}, which is unknown")]
    UnknownNode { addr: SocketAddr, node: String },
    #[error(transparent)]
    Hbone(#[from] PoolError),
    #[error(transparent)]
    Overflow(#[from] Overflow),
}

/// Opens HBONE tunnels to endpoints, as the waypoint's identity.
#[derive(Clone)]
pub struct HboneConnector {
    pub state: Arc<ArcSwap<MeshState>>,
    /// For the connection limits (`maxConnections`) of the endpoint's Services.
    pub l7: Arc<ArcSwap<L7>>,
    pub certs: Arc<CertStore>,
    pub pool: Arc<Pool>,
    pub identity: Identity,
    /// The waypoint's own address, sent in `forwarded` (telemetry only).
    pub local: SocketAddr,
}

impl tower::Service<Uri> for HboneConnector {
    type Response = TokioIo<TunnelIo>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addr = uri
                .authority()
                .and_then(|a| hbone::parse_authority(Some(a.as_str())).ok())
                .ok_or_else(|| ConnectError::Authority(uri.to_string()))?;
            let state = this.state.load_full();
            let workload = state
                .workload_by_ip(addr.ip())
                .ok_or(ConnectError::UnknownEndpoint(addr))?;
            let node = state
                .node(&workload.node)
                .ok_or_else(|| ConnectError::UnknownNode {
                    addr,
                    node: workload.node.clone(),
                })?;
            let permits = connection_permits(&state, &this.l7.load(), addr)?;
            let tunnel = this
                .pool
                .tunnel(
                    &this.certs,
                    &this.identity,
                    &workload.identity,
                    HboneAddr(node.hbone),
                    OriginalDst(addr),
                    ClientAddr(this.local),
                )
                .await?;
            Ok(TokioIo::new(TunnelIo {
                io: H2Io::new(tunnel.stream),
                _guard: tunnel.guard,
                _permits: permits,
            }))
        })
    }
}

/// A slot of every Service the endpoint `addr` serves that limits its connections: an
/// upstream connection counts against each of them while it is open. One of them full
/// refuses the connection.
fn connection_permits(
    state: &MeshState,
    l7: &L7,
    addr: SocketAddr,
) -> Result<Vec<ConnectionPermit>, Overflow> {
    let mut permits = Vec::new();
    for service in state.services() {
        let Some(resilience) = l7.resilience.get(&service.namespace, &service.name) else {
            continue;
        };
        let serves = service.endpoints.iter().any(|e| e.ip == addr.ip())
            && service
                .ports
                .iter()
                .any(|p| p.target_port == Some(addr.port()));
        if serves && let Some(permit) = resilience.connection()? {
            permits.push(permit);
        }
    }
    Ok(permits)
}

/// One CONNECT stream, holding its slot in the HBONE connection and its connection permits
/// while it lives.
pub struct TunnelIo {
    io: H2Io,
    _guard: StreamGuard,
    _permits: Vec<ConnectionPermit>,
}

impl Connection for TunnelIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The two clients: HTTP/1.1 and HTTP/2 (prior knowledge: the mesh knows what the
/// application spoke, so no upgrade dance upstream).
#[derive(Clone)]
pub struct Upstreams {
    pub http1: Client<HboneConnector, Body>,
    pub http2: Client<HboneConnector, Body>,
}

impl Upstreams {
    pub fn new(connector: HboneConnector) -> Self {
        let mut http1 = Client::builder(TokioExecutor::new());
        http1
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(MAX_IDLE_PER_ENDPOINT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new());
        let mut http2 = Client::builder(TokioExecutor::new());
        http2
            .http2_only(true)
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_max_header_list_size(hbone::MAX_HEADER_LIST_SIZE)
            .http2_keep_alive_interval(hbone::KEEPALIVE_INTERVAL)
            .http2_keep_alive_timeout(hbone::KEEPALIVE_TIMEOUT);
        Self {
            http1: http1.build(connector.clone()),
            http2: http2.build(connector),
        }
    }

    pub fn for_version(&self, version: http::Version) -> &Client<HboneConnector, Body> {
        if version == http::Version::HTTP_2 {
            &self.http2
        } else {
            &self.http1
        }
    }
}
