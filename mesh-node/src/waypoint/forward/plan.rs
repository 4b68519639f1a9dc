//! Where a request goes: the route lookup, the matched rule's request filters and the
//! backend, resolved to a Service port (or, for a pod addressed directly, the pod).
//!
//! Pod-addressed traffic is not routed: routes attach to Services (and to the waypoint for
//! Service traffic), so a request to a pod goes to that pod, after authorization.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::{HeaderValue, Response, StatusCode, request::Parts};

use super::{Downstream, Outcome};
use crate::{
    l7::{
        resilience::ServiceResilience,
        route::{
            Backend, GatewayRef, MatchedRule, NoBackend, RequestAction, Routing, ServiceRef,
            model::SAME_PORT,
        },
    },
    state::{MeshState, Service},
    waypoint::{
        body::{self, Body},
        l7::L7,
        response_flags::ResponseFlags,
    },
};

/// The upstream of one request.
pub enum Upstream {
    /// The pod the client dialled.
    Pod(SocketAddr),
    /// A ready endpoint of this Service, on this target port.
    Service {
        service: Arc<Service>,
        target_port: u16,
        /// Only these endpoints (a subset's); `None`: all of the Service's.
        only: Option<Vec<IpAddr>>,
    },
}

/// Everything the send phase needs.
pub struct Plan<'a> {
    pub upstream: Upstream,
    pub rule: Option<MatchedRule<'a>>,
    pub backend: Option<&'a Backend>,
    /// `HTTPRoute ns/name rule N`, for logs and rate-limit buckets.
    pub route: Option<String>,
    pub resilience: Option<Arc<ServiceResilience>>,
}

impl Plan<'_> {
    pub fn service(&self) -> Option<&Arc<Service>> {
        match &self.upstream {
            Upstream::Service { service, .. } => Some(service),
            Upstream::Pod(_) => None,
        }
    }

    /// The endpoint for the next try: not ejected, and not one already tried when another
    /// is available.
    pub fn endpoint(&self, tried: &[SocketAddr]) -> Option<SocketAddr> {
        match &self.upstream {
            Upstream::Pod(addr) => Some(*addr),
            Upstream::Service {
                service,
                target_port,
                only,
            } => {
                // No node of its own: every endpoint is as close as any other.
                let all: Vec<SocketAddr> = service
                    .candidates("", None)
                    .into_iter()
                    .filter(|e| only.as_ref().is_none_or(|only| only.contains(&e.ip)))
                    .map(|e| SocketAddr::new(e.ip, *target_port))
                    .collect();
                let usable: Vec<SocketAddr> = match &self.resilience {
                    Some(r) => r.choose(&all, |a| *a).into_iter().copied().collect(),
                    None => all,
                };
                usable
                    .iter()
                    .find(|a| !tried.contains(a))
                    .or_else(|| usable.first())
                    .copied()
            }
        }
    }
}

/// A request answered without going upstream.
pub struct Refusal {
    status: StatusCode,
    flags: ResponseFlags,
    error: String,
    route: Option<String>,
    location: Option<HeaderValue>,
}

impl Refusal {
    fn new(status: StatusCode, flags: ResponseFlags, error: String) -> Self {
        Self {
            status,
            flags,
            error,
            route: None,
            location: None,
        }
    }

    fn on(mut self, route: &str) -> Self {
        self.route = Some(route.to_owned());
        self
    }

    pub fn respond(self, mut outcome: Outcome) -> (Response<Body>, Outcome) {
        outcome.route = self.route;
        match self.location {
            Some(location) => {
                let mut response = Response::new(body::empty());
                *response.status_mut() = self.status;
                response
                    .headers_mut()
                    .insert(http::header::LOCATION, location);
                outcome.status = self.status;
                (response, outcome)
            }
            None => outcome.local(self.status, self.flags, self.error),
        }
    }
}

pub fn plan<'a>(
    down: &Downstream,
    mesh: &MeshState,
    l7: &'a L7,
    parts: &mut Parts,
) -> Result<Plan<'a>, Refusal> {
    let target = &down.target;
    let dialled = target
        .service
        .as_ref()
        .map(|s| mesh.service_by_vip(target.addr.ip()).unwrap_or(s));
    let Some(dialled) = dialled else {
        return Ok(Plan {
            upstream: Upstream::Pod(target.addr),
            rule: None,
            backend: None,
            route: None,
            resilience: None,
        });
    };
    let gateway = GatewayRef {
        namespace: &down.inputs.me.namespace,
        name: &down.inputs.me.name,
    };
    let service = ServiceRef {
        namespace: &dialled.namespace,
        name: &dialled.name,
        port: target.addr.port(),
    };
    match l7.routes.lookup(&gateway, &service, parts) {
        Routing::NotRouted => {
            let upstream = service_port(dialled, target.addr.port())?;
            Ok(Plan {
                upstream,
                rule: None,
                backend: None,
                route: None,
                resilience: l7
                    .resilience
                    .get(&dialled.namespace, &dialled.name)
                    .cloned(),
            })
        }
        Routing::NoMatch => Err(Refusal::new(
            StatusCode::NOT_FOUND,
            ResponseFlags::NoRoute,
            format!(
                "no route rule of {}/{} matches the request",
                dialled.namespace, dialled.name
            ),
        )),
        Routing::Matched(rule) => {
            let route = rule.id().to_string();
            filtered(rule.apply_request_filters(parts)).map_err(|r| r.on(&route))?;
            let backend = match rule.pick_backend(fastrand::u64(..)) {
                Ok(backend) => backend,
                Err(e) => {
                    let flags = match e {
                        NoBackend::Invalid(_) => ResponseFlags::NoCluster,
                        NoBackend::None | NoBackend::ZeroWeights => ResponseFlags::ConfigError,
                    };
                    return Err(Refusal::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        flags,
                        format!("{route}: {e}"),
                    )
                    .on(&route));
                }
            };
            filtered(rule.apply_backend_request_filters(backend, parts))
                .map_err(|r| r.on(&route))?;
            let Some(service) = mesh.service(&backend.namespace, &backend.name) else {
                return Err(Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ResponseFlags::NoCluster,
                    format!(
                        "{route}: backend Service {}/{} is unknown",
                        backend.namespace, backend.name
                    ),
                )
                .on(&route));
            };
            let port = if backend.port == SAME_PORT {
                target.addr.port()
            } else {
                backend.port
            };
            let mut upstream = service_port(service, port).map_err(|r| r.on(&route))?;
            if let Some(subset) = &backend.subset {
                let selected =
                    subset_endpoints(mesh, l7, service, subset).map_err(|r| r.on(&route))?;
                if let Upstream::Service { only, .. } = &mut upstream {
                    *only = Some(selected);
                }
            }
            Ok(Plan {
                upstream,
                rule: Some(rule),
                backend: Some(backend),
                resilience: l7
                    .resilience
                    .get(&service.namespace, &service.name)
                    .cloned(),
                route: Some(route),
            })
        }
    }
}

/// The Service's endpoints on the target port of `port`.
fn service_port(service: &Arc<Service>, port: u16) -> Result<Upstream, Refusal> {
    let Some(service_port) = service.port(port) else {
        return Err(Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ResponseFlags::NoCluster,
            format!(
                "Service {}/{} has no port {port}",
                service.namespace, service.name
            ),
        ));
    };
    let Some(target_port) = service_port.target_port else {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlags::NoHealthyUpstream,
            format!(
                "Service {}/{} port {port} has no resolved target port",
                service.namespace, service.name
            ),
        ));
    };
    Ok(Upstream::Service {
        service: service.clone(),
        target_port,
        only: None,
    })
}

/// The endpoints of `service` whose workloads carry every label of its DestinationRule's
/// `subset`. A subset no DestinationRule defines is answered with 503, as Istio does.
fn subset_endpoints(
    mesh: &MeshState,
    l7: &L7,
    service: &Service,
    subset: &str,
) -> Result<Vec<IpAddr>, Refusal> {
    let key = (service.namespace.clone(), service.name.clone());
    let Some(labels) = l7.subsets.get(&key).and_then(|s| s.get(subset)) else {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlags::NoHealthyUpstream,
            format!(
                "subset {subset:?} of Service {}/{} is not defined by any DestinationRule",
                service.namespace, service.name
            ),
        ));
    };
    Ok(service
        .endpoints
        .iter()
        .filter(|e| {
            mesh.workload_by_ip(e.ip).is_some_and(|w| {
                labels
                    .iter()
                    .all(|(k, v)| w.labels.get(k).is_some_and(|have| have == v))
            })
        })
        .map(|e| e.ip)
        .collect())
}

fn filtered(action: RequestAction) -> Result<(), Refusal> {
    match action {
        RequestAction::Forward => Ok(()),
        RequestAction::Redirect(redirect) => Err(Refusal {
            status: redirect.status,
            flags: ResponseFlags::Upstream,
            error: String::new(),
            route: None,
            location: Some(redirect.location),
        }),
        RequestAction::Fail(failure) => Err(Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ResponseFlags::ConfigError,
            failure.to_string(),
        )),
    }
}
