//! The resolve phase: what an original destination stands for, and how each address is reached.
//!
//! A destination that is a service's virtual IP stands for the service's endpoints; anything
//! else stands for itself. Each address is then routed the same way whether the application
//! dialled it or a service resolved to it: a local pod directly, a pod on another node through
//! that node's HBONE listener, anything else as plain TCP.

use std::{net::SocketAddr, sync::Arc};

use super::super::HboneAddr;
use crate::{
    service::Service,
    workload::{MeshState, Workload},
};

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
}

impl Destination {
    pub fn service(&self) -> Option<&Arc<Service>> {
        match self {
            Destination::Direct(_) => None,
            Destination::Service { service, .. } => Some(service),
        }
    }

    /// The addresses to try, in order.
    pub fn candidates(&self) -> &[SocketAddr] {
        match self {
            Destination::Direct(addr) => std::slice::from_ref(addr),
            Destination::Service { endpoints, .. } => endpoints,
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
}

impl ResolveError {
    /// Short reason for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ResolveError::UndefinedPort { .. } => "unknown_service_port",
            ResolveError::UnresolvedTargetPort { .. } | ResolveError::NoReadyEndpoint { .. } => {
                "no_ready_endpoint"
            }
        }
    }

    pub fn service(&self) -> &Arc<Service> {
        match self {
            ResolveError::UndefinedPort { service, .. }
            | ResolveError::UnresolvedTargetPort { service, .. }
            | ResolveError::NoReadyEndpoint { service } => service,
        }
    }
}

/// Resolves `dst`: a service VIP to the service's ready endpoints on the port's target port,
/// in the service's order (see [`Service::candidates`]); any other address to itself.
pub fn destination(state: &MeshState, dst: SocketAddr) -> Result<Destination, ResolveError> {
    let Some(service) = state.service_by_vip(dst.ip()) else {
        return Ok(Destination::Direct(dst));
    };
    let service = service.clone();
    let port = dst.port();
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

/// How one address is reached.
#[derive(Clone, Debug)]
pub enum Route {
    /// To a pod on this node: no TLS needed, the bytes never leave the node.
    Local(Arc<Workload>),
    /// To a pod on another node, through that node's agent.
    Remote(Arc<Workload>, HboneAddr),
    /// Out of the mesh, as plain TCP.
    Passthrough,
}

impl Route {
    pub fn path(&self) -> &'static str {
        match self {
            Route::Local(_) => "local",
            Route::Remote(..) => "hbone",
            Route::Passthrough => "passthrough",
        }
    }

    /// The mesh workload at the other end, if any.
    pub fn workload(&self) -> Option<&Arc<Workload>> {
        match self {
            Route::Local(w) | Route::Remote(w, _) => Some(w),
            Route::Passthrough => None,
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
