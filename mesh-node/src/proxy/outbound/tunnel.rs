//! The tunnel phase: open the first candidate address that accepts.
//!
//! Nothing has been read from the client while this runs, so an attempt that fails before its
//! upstream is open can move on to the next candidate without losing or repeating a byte. It
//! does not when every endpoint would give the same answer: the source holds no certificate,
//! or policy denied the connection.
//!
//! **Same-node destinations are authorized here.** A local pod is dialled directly, so no
//! other agent sees the connection: this node's engine decides it exactly as the inbound
//! path decides a CONNECT (the source is known by its cgroup, so its identity and address
//! are facts), and the delivered connection is registered so a policy change that now denies
//! it closes it.

use std::{net::SocketAddr, sync::Arc};

use http::StatusCode;
use tokio::net::TcpStream;

use super::{
    super::{
        ClientAddr, HboneAddr, OriginalDst, ProxyInputs, connect_proxied,
        inbound::authorized::{Grant, Registration},
        pool::{PoolError, Tunnel},
        transparent::{PodSource, Record},
    },
    resolve::{Route, route},
};
use crate::{
    identity::Identity,
    metrics::FailureReason,
    policy::{Destination, Flow},
    state::{MeshState, Workload, canonical, waypoint::Waypoint},
};

/// An open connection towards the destination.
pub enum Upstream {
    /// Out of the mesh.
    Tcp(TcpStream),
    /// To a pod on this node, authorized by this node's policies and registered so that a
    /// policy change can revoke it; opened from the address [`Delivered`] names.
    Local(TcpStream, Registration, Delivered),
    /// A CONNECT stream through the destination's node.
    Hbone(Tunnel),
}

/// Where a connection to a local pod was opened from, and its datapath record (kept until
/// the socket is closed).
pub struct Delivered {
    pub source: PodSource,
    pub record: Option<Record>,
}

/// The candidate that accepted.
pub struct Opened {
    pub addr: SocketAddr,
    pub route: Route,
    pub upstream: Upstream,
}

/// A candidate that did not open.
#[derive(Debug)]
pub struct Attempt {
    pub addr: SocketAddr,
    /// How it was tried; `None` when it could not be routed at all.
    pub route: Option<Route>,
    /// Short reason for metrics.
    pub reason: FailureReason,
    pub error: String,
    /// Whether another endpoint may do better.
    pub retry: bool,
}

/// Tries `candidates` in order until one opens, stopping early at an attempt that another
/// endpoint would not change. On success, also returns the attempts that failed before it;
/// on failure, every attempt made (at least one when there was a candidate).
/// `passthrough_allowed`: whether an address outside the mesh may be dialled as plain TCP.
/// `waypoint`: the candidates are that waypoint's pods, to be asked for the given address.
pub async fn open_first(
    inputs: &ProxyInputs,
    state: &MeshState,
    src: &Workload,
    candidates: &[SocketAddr],
    passthrough_allowed: bool,
    waypoint: Option<(&Arc<Waypoint>, SocketAddr)>,
    client: ClientAddr,
) -> Result<(Opened, Vec<Attempt>), Vec<Attempt>> {
    let mut failed = Vec::new();
    for &addr in candidates {
        let opened = match waypoint {
            Some((waypoint, target)) => {
                open_waypoint(inputs, src, waypoint, addr, target, client).await
            }
            None => open(inputs, state, src, addr, passthrough_allowed, client).await,
        };
        match opened {
            Ok(opened) => return Ok((opened, failed)),
            Err(attempt) => {
                let retry = attempt.retry;
                failed.push(attempt);
                if !retry {
                    break;
                }
            }
        }
    }
    Err(failed)
}

/// Routes and opens one address.
async fn open(
    inputs: &ProxyInputs,
    state: &MeshState,
    src: &Workload,
    addr: SocketAddr,
    passthrough_allowed: bool,
    client: ClientAddr,
) -> Result<Opened, Attempt> {
    let route = route(state, addr).map_err(|e| Attempt {
        addr,
        route: None,
        reason: FailureReason::UnknownNode,
        error: e.to_string(),
        retry: true,
    })?;
    let result = match &route {
        Route::Passthrough if !passthrough_allowed => Err((
            FailureReason::OutsideMeshDenied,
            "destination is outside the mesh and outbound.unknown_destination is deny".to_owned(),
            false,
        )),
        Route::Local(w) => local(inputs, state, src, w, addr, client).await,
        Route::Passthrough => match connect_proxied(addr, inputs.settings.connect_timeout).await {
            Ok(stream) => Ok(Upstream::Tcp(stream)),
            Err(e) => Err(unreachable(addr, &e)),
        },
        Route::Remote(w, node) => hbone(inputs, src, &w.identity, *node, addr, client).await,
        Route::Waypoint(w, node) => hbone(inputs, src, &w.identity, *node, addr, client).await,
    };
    match result {
        Ok(upstream) => Ok(Opened {
            addr,
            route,
            upstream,
        }),
        Err((reason, error, retry)) => Err(Attempt {
            addr,
            route: Some(route),
            reason,
            error,
            retry,
        }),
    }
}

/// Authorizes a connection to `dst`, a pod on this node, then dials it (see the module docs).
async fn local(
    inputs: &ProxyInputs,
    state: &MeshState,
    src: &Workload,
    dst: &Workload,
    addr: SocketAddr,
    client: ClientAddr,
) -> Result<Upstream, (FailureReason, String, bool)> {
    // The client's address is the source pod's own (it connected from its namespace); it is
    // a fact only while the pod still holds it.
    let client_ip = canonical(client.0.ip());
    let grant = Grant {
        destination_uid: dst.uid.clone(),
        port: addr.port(),
        source: src.identity.clone(),
        source_ip: src.ips.contains(&client_ip).then_some(client_ip),
    };
    if let Err(bypass) = state.guards(dst).admit(Some(&src.identity)) {
        let error = format!("to {addr} ({}/{}): {bypass}", dst.namespace, dst.name);
        return Err((FailureReason::WaypointBypass, error, false));
    }
    let decision = state.policy().decide(&Flow {
        destination: Destination::of(dst),
        port: grant.port,
        source: Some(&grant.source),
        source_ip: grant.source_ip,
    });
    if !decision.is_allowed() {
        let error = format!("to {addr} ({}/{}): {decision}", dst.namespace, dst.name);
        return Err((FailureReason::PolicyDenied, error, false));
    }
    // Registered before the dial, so a policy change during it is not missed.
    let registration = inputs.authorized.register(grant);
    let source = inputs.source.for_local(src, client_ip, addr.ip());
    if let crate::proxy::transparent::PodSource::Node(reason) = source {
        inputs.metrics.delivered_from_node(reason);
    }
    match inputs
        .source
        .dial(source, addr, inputs.settings.connect_timeout)
        .await
    {
        Ok((stream, record)) => Ok(Upstream::Local(
            stream,
            registration,
            Delivered { source, record },
        )),
        Err(e) => Err(unreachable(addr, &e)),
    }
}

fn unreachable(addr: SocketAddr, e: &std::io::Error) -> (FailureReason, String, bool) {
    (
        FailureReason::UpstreamUnreachable,
        format!("cannot connect to {addr}: {e}"),
        true,
    )
}

/// Opens a CONNECT stream for `addr` through `node`, whose peer must present `identity`.
async fn hbone(
    inputs: &ProxyInputs,
    src: &Workload,
    identity: &Identity,
    node: HboneAddr,
    addr: SocketAddr,
    client: ClientAddr,
) -> Result<Upstream, (FailureReason, String, bool)> {
    inputs
        .pool
        .tunnel(
            &inputs.certs,
            &src.identity,
            identity,
            node,
            OriginalDst(addr),
            client,
        )
        .await
        .map(Upstream::Hbone)
        .map_err(|e| (e.reason(), e.to_string(), retryable(&e)))
}

/// Opens HBONE to the waypoint pod at `addr`, asking for `target`.
async fn open_waypoint(
    inputs: &ProxyInputs,
    src: &Workload,
    waypoint: &Arc<Waypoint>,
    addr: SocketAddr,
    target: SocketAddr,
    client: ClientAddr,
) -> Result<Opened, Attempt> {
    let route = Route::Waypoint(waypoint.clone(), HboneAddr(addr));
    match inputs
        .pool
        .tunnel(
            &inputs.certs,
            &src.identity,
            &waypoint.identity,
            HboneAddr(addr),
            OriginalDst(target),
            client,
        )
        .await
    {
        Ok(tunnel) => Ok(Opened {
            addr,
            route,
            upstream: Upstream::Hbone(tunnel),
        }),
        Err(e) => Err(Attempt {
            addr,
            route: Some(route),
            reason: e.reason(),
            error: format!("waypoint {}: {e}", waypoint.id),
            retry: retryable(&e),
        }),
    }
}

/// Whether another endpoint may succeed where this HBONE attempt failed: yes for dial
/// failures, refused or broken streams and an unreachable pod (503); no when the source has no
/// certificate (the same for every endpoint) or policy denied the connection (a verdict, not a
/// fault).
fn retryable(e: &PoolError) -> bool {
    match e {
        PoolError::NoCertificate(_) => false,
        PoolError::Status { status, .. } => *status != StatusCode::UNAUTHORIZED,
        PoolError::Connect { .. }
        | PoolError::Tls { .. }
        | PoolError::Alpn(_)
        | PoolError::Handshake { .. }
        | PoolError::Request { .. } => true,
    }
}
