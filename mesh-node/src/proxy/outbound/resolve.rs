//! The resolve phase: what an original destination stands for, and how each address is reached.
//!
//! A destination that is a service's virtual IP stands for the service's endpoints; anything
//! else stands for itself. Each address is then routed the same way whether the application
//! dialled it or a service resolved to it: a local pod directly, a pod on another node through
//! that node's HBONE listener, anything else as plain TCP.
//!
//! A service or pod that uses a waypoint stands for the waypoint's pods instead: the waypoint
//! chooses the endpoint, so the original destination travels as the CONNECT authority. The
//! waypoint's own pods never go through it (loop protection). A waypoint with no ready pod
//! refuses the connection rather than bypass the L7 policy it may enforce.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use super::super::HboneAddr;
use crate::{
    metrics::FailureReason,
    state::{
        MeshState, Workload,
        service::Service,
        waypoint::{Waypoint, WaypointRef},
    },
};

/// Where the next connection through a waypoint starts among its pods.
static WAYPOINT_CURSOR: AtomicUsize = AtomicUsize::new(0);

/// Endpoints tried for one connection to a service, at most. Each failed attempt can cost up
/// to the connect timeout before the client hears anything, so this bounds the client's worst
/// case at three timeouts; it also bounds the extra connects a client adds to a service that is
/// already failing. Three rides out one or two dead endpoints in the window before their
/// readiness changes, which is the case retries are for.
pub const MAX_ATTEMPTS: usize = 3;

/// What a connection's original destination stands for.
#[derive(Debug)]
pub enum Destination {
    /// Not a service: the address the application dialled.
    Direct(SocketAddr),
    /// A service port: the endpoints to try, in order (at most [`MAX_ATTEMPTS`]).
    Service {
        service: Arc<Service>,
        endpoints: Vec<SocketAddr>,
    },
    /// Through a waypoint: its pods' HBONE addresses to try, in order; `target` (what the
    /// application dialled) is the CONNECT authority.
    Waypoint {
        waypoint: Arc<Waypoint>,
        target: SocketAddr,
        service: Option<Arc<Service>>,
        endpoints: Vec<SocketAddr>,
    },
}

impl Destination {
    pub fn service(&self) -> Option<&Arc<Service>> {
        match self {
            Destination::Direct(_) => None,
            Destination::Service { service, .. } => Some(service),
            Destination::Waypoint { service, .. } => service.as_ref(),
        }
    }

    /// The addresses to try, in order.
    pub fn candidates(&self) -> &[SocketAddr] {
        match self {
            Destination::Direct(addr) => std::slice::from_ref(addr),
            Destination::Service { endpoints, .. } | Destination::Waypoint { endpoints, .. } => {
                endpoints
            }
        }
    }

    /// The waypoint the candidates belong to, and the authority to ask it for.
    pub fn waypoint(&self) -> Option<(&Arc<Waypoint>, SocketAddr)> {
        match self {
            Destination::Waypoint {
                waypoint, target, ..
            } => Some((waypoint, *target)),
            _ => None,
        }
    }
}

/// Why a service destination has nothing to try.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("service {} defines no TCP port {port} (check the Service's spec.ports)", .service.hostname)]
    UndefinedPort { service: Arc<Service>, port: u16 },
    #[error(
        "service {} port {port}: named target port not resolved yet (no EndpointSlice lists it)",
        .service.hostname
    )]
    UnresolvedTargetPort { service: Arc<Service>, port: u16 },
    #[error(
        "service {} has no ready endpoint (check its EndpointSlices and pod readiness)",
        .service.hostname
    )]
    NoReadyEndpoint { service: Arc<Service> },
    #[error("waypoint {waypoint} is unknown or has no ready pod (check the Gateway and its pods)")]
    NoReadyWaypoint {
        waypoint: WaypointRef,
        service: Option<Arc<Service>>,
    },
}

impl ResolveError {
    /// Short reason for metrics.
    pub fn reason(&self) -> FailureReason {
        match self {
            ResolveError::UndefinedPort { .. } => FailureReason::UnknownServicePort,
            ResolveError::UnresolvedTargetPort { .. } | ResolveError::NoReadyEndpoint { .. } => {
                FailureReason::NoReadyEndpoint
            }
            ResolveError::NoReadyWaypoint { .. } => FailureReason::NoReadyWaypoint,
        }
    }

    pub fn service(&self) -> Option<&Arc<Service>> {
        match self {
            ResolveError::UndefinedPort { service, .. }
            | ResolveError::UnresolvedTargetPort { service, .. }
            | ResolveError::NoReadyEndpoint { service } => Some(service),
            ResolveError::NoReadyWaypoint { service, .. } => service.as_ref(),
        }
    }
}

/// Resolves `dst` for a connection from `src`: a service VIP to the service's ready endpoints
/// on the port's target port, in the service's order (see [`Service::candidates`]); any other
/// address to itself; either to its waypoint's pods when it uses one.
pub fn destination(
    state: &MeshState,
    src: &Workload,
    dst: SocketAddr,
) -> Result<Destination, ResolveError> {
    let Some(service) = state.service_by_vip(dst.ip()) else {
        // A pod behind a waypoint (its own, or its Service's) is reached through it even when
        // dialled by address: its node takes nothing else.
        let waypoint = state
            .workload_by_ip(dst.ip())
            .and_then(|w| state.guards(w).waypoints().first())
            .map(|w| w.id.clone());
        return match waypoint {
            Some(id) => through_waypoint(state, src, &id, dst, None),
            None => Ok(Destination::Direct(dst)),
        };
    };
    let service = service.clone();
    let port = dst.port();
    if service.port(port).is_none() {
        return Err(ResolveError::UndefinedPort { service, port });
    }
    match service.waypoint.clone() {
        Some(id) => through_waypoint(state, src, &id, dst, Some(service)),
        None => direct_service(state, service, port),
    }
}

/// A service port's ready endpoints, without a waypoint.
fn direct_service(
    state: &MeshState,
    service: Arc<Service>,
    port: u16,
) -> Result<Destination, ResolveError> {
    let Some(service_port) = service.port(port) else {
        return Err(ResolveError::UndefinedPort { service, port });
    };
    let Some(target_port) = service_port.target_port else {
        return Err(ResolveError::UnresolvedTargetPort { service, port });
    };
    let endpoints: Vec<SocketAddr> = service
        .candidates(state.local_node(), state.local_zone())
        .into_iter()
        .take(MAX_ATTEMPTS)
        .map(|e| SocketAddr::new(e.ip, target_port))
        .collect();
    if endpoints.is_empty() {
        return Err(ResolveError::NoReadyEndpoint { service });
    }
    Ok(Destination::Service { service, endpoints })
}

/// The waypoint `id`'s ready pods for `dst`, unless `src` is one of them (then `dst` is
/// resolved as if there were no waypoint).
fn through_waypoint(
    state: &MeshState,
    src: &Workload,
    id: &WaypointRef,
    dst: SocketAddr,
    service: Option<Arc<Service>>,
) -> Result<Destination, ResolveError> {
    let waypoint = state.waypoint(id);
    if let Some(waypoint) = waypoint.filter(|w| src.is_pod_of(w)) {
        tracing::debug!(waypoint = %waypoint.id, "connection from the waypoint's own pod goes direct");
        return match service {
            Some(service) => direct_service(state, service, dst.port()),
            None => Ok(Destination::Direct(dst)),
        };
    }
    // Consecutive connections start at consecutive waypoint pods.
    let start = WAYPOINT_CURSOR.fetch_add(1, Ordering::Relaxed);
    let endpoints: Vec<SocketAddr> = waypoint
        .map(|w| w.ready_endpoints(start))
        .unwrap_or_default()
        .into_iter()
        .take(MAX_ATTEMPTS)
        .collect();
    match waypoint {
        Some(waypoint) if !endpoints.is_empty() => Ok(Destination::Waypoint {
            waypoint: waypoint.clone(),
            target: dst,
            service,
            endpoints,
        }),
        _ => Err(ResolveError::NoReadyWaypoint {
            waypoint: id.clone(),
            service,
        }),
    }
}

/// How one address is reached.
#[derive(Clone, Debug)]
pub enum Route {
    /// To a pod on this node: no TLS needed, the bytes never leave the node.
    Local(Arc<Workload>),
    /// To a pod on another node, through that node's agent.
    Remote(Arc<Workload>, HboneAddr),
    /// To a waypoint's pod, which forwards to the original destination.
    Waypoint(Arc<Waypoint>, HboneAddr),
    /// Out of the mesh, as plain TCP.
    Passthrough,
}

impl Route {
    pub fn path(&self) -> &'static str {
        match self {
            Route::Local(_) => "local",
            Route::Remote(..) => "hbone",
            Route::Waypoint(..) => "waypoint",
            Route::Passthrough => "passthrough",
        }
    }

    /// The mesh workload at the other end, if any.
    pub fn workload(&self) -> Option<&Arc<Workload>> {
        match self {
            Route::Local(w) | Route::Remote(w, _) => Some(w),
            Route::Waypoint(..) | Route::Passthrough => None,
        }
    }
}

/// An address that names a mesh workload the proxy cannot reach.
#[derive(Debug, thiserror::Error)]
#[error("destination {namespace}/{name} is on unknown node {node}")]
pub struct UnknownNode {
    pub namespace: String,
    pub name: String,
    pub node: String,
}

/// Routes `addr`: to the enrolled workload that alone holds its IP, or out of the mesh.
pub fn route(state: &MeshState, addr: SocketAddr) -> Result<Route, UnknownNode> {
    match state.workload_by_ip(addr.ip()) {
        Some(w) if state.is_local(w) => Ok(Route::Local(w.clone())),
        Some(w) => match state.node(&w.node) {
            Some(node) => Ok(Route::Remote(w.clone(), HboneAddr(node.hbone))),
            None => Err(UnknownNode {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                node: w.node.clone(),
            }),
        },
        None => Ok(Route::Passthrough),
    }
}
