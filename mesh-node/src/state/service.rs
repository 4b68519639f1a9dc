//! Kubernetes Services as the node proxy sees them: virtual IPs resolved to endpoints by the
//! source agent, so kube-proxy is not on the mesh's path.
//!
//! Endpoint choice: ready endpoints only, round robin, each service with its own cursor. A
//! Service that asks for locality (`spec.trafficDistribution: PreferClose`, carried as
//! `prefer_close`) gets the endpoints on this node first, then those in this zone, then the
//! rest, round robin within each tier. The outbound proxy walks the returned order and moves to
//! the next endpoint when a connect fails.
//!
//! The protobuf type is converted here, at the boundary ([`Service::try_from`]); a Service
//! that does not convert is rejected alone by the feed, like a malformed workload.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use super::{
    resource::{ResourceError, bad, canonical, check_label},
    waypoint::{self, WaypointRef},
};
use crate::api::v1 as api;

/// The cluster DNS domain Kubernetes uses unless configured otherwise. It names services in
/// telemetry (`destination_service`), as Istio does; the agent has no setting for it yet.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    /// The port endpoints listen on. `None` while a named target port is not resolved yet
    /// (no EndpointSlice says which number it is): connections to it cannot be served.
    pub target_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// Empty when unknown.
    pub node: String,
    /// Empty when unknown.
    pub zone: String,
    pub ready: bool,
    /// The backing pod's uid, when it is a workload the mesh knows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_uid: Option<String>,
}

#[derive(Debug, serde::Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `<name>.<namespace>.svc.<cluster domain>`: how telemetry names the service.
    pub hostname: String,
    /// Canonical addresses (IPv4-mapped IPv6 turned into IPv4).
    pub vips: Vec<IpAddr>,
    /// TCP ports only: the proxy carries nothing else.
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    /// Prefer endpoints on this node, then in this zone.
    pub prefer_close: bool,
    /// The waypoint traffic to the virtual IPs goes through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
    /// Round-robin cursor; each service owns its own.
    #[serde(skip)]
    cursor: AtomicUsize,
}

impl Service {
    pub fn new(
        name: String,
        namespace: String,
        vips: Vec<IpAddr>,
        ports: Vec<ServicePort>,
        endpoints: Vec<Endpoint>,
        prefer_close: bool,
    ) -> Self {
        Self {
            hostname: format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}"),
            name,
            namespace,
            vips,
            ports,
            endpoints,
            prefer_close,
            waypoint: None,
            cursor: AtomicUsize::new(0),
        }
    }

    /// The same service, sent through `waypoint`.
    pub fn with_waypoint(mut self, waypoint: Option<WaypointRef>) -> Self {
        self.waypoint = waypoint;
        self
    }

    /// The service port a connection to `port` on a VIP uses, if the service defines it.
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// Ready endpoints in the order to try them. Each call advances the service's cursor, so
    /// consecutive connections start at consecutive endpoints. With `prefer_close`, the
    /// endpoints on `local_node` come first, then those in `local_zone`, then the rest, each
    /// tier rotated by the cursor.
    pub fn candidates(&self, local_node: &str, local_zone: Option<&str>) -> Vec<&Endpoint> {
        let mut ready: Vec<&Endpoint> = self.endpoints.iter().filter(|e| e.ready).collect();
        if ready.is_empty() {
            return ready;
        }
        let turn = self.cursor.fetch_add(1, Ordering::Relaxed);
        if !self.prefer_close {
            let len = ready.len();
            ready.rotate_left(turn % len);
            return ready;
        }
        let local_zone = local_zone.filter(|z| !z.is_empty());
        let tier = |e: &Endpoint| {
            if !local_node.is_empty() && e.node == local_node {
                0
            } else if local_zone.is_some_and(|z| e.zone == z) {
                1
            } else {
                2
            }
        };
        // Stable: endpoints keep their relative order within a tier before the rotation.
        ready.sort_by_key(|e| tier(e));
        let mut start = 0;
        while start < ready.len() {
            let this = tier(ready[start]);
            let len = ready[start..]
                .iter()
                .take_while(|e| tier(e) == this)
                .count();
            ready[start..start + len].rotate_left(turn % len);
            start += len;
        }
        ready
    }
}

/// Addresses a service may never resolve to or be reached at: the proxy dials endpoints from
/// the node, so a loopback or link-local endpoint would hand pods the node's own local
/// services (the admin port among them).
fn routable(ip: IpAddr) -> bool {
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || link_local)
}

fn port(value: u32, field: &str) -> Result<u16, ResourceError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad(field, format!("{value} is not a port")))
}

impl TryFrom<&api::Service> for Service {
    type Error = ResourceError;

    fn try_from(s: &api::Service) -> Result<Self, Self::Error> {
        check_label("name", &s.name)?;
        check_label("namespace", &s.namespace)?;
        let address = |field: String, text: &str| -> Result<IpAddr, ResourceError> {
            let ip = text
                .parse::<IpAddr>()
                .map(canonical)
                .map_err(|_| bad(field.clone(), format!("{text:?} is not an IP address")))?;
            if routable(ip) {
                Ok(ip)
            } else {
                Err(bad(
                    field,
                    format!("{ip} is not a routable unicast address"),
                ))
            }
        };
        let mut vips = Vec::with_capacity(s.vips.len());
        for (i, text) in s.vips.iter().enumerate() {
            let ip = address(format!("vips[{i}]"), text)?;
            if !vips.contains(&ip) {
                vips.push(ip);
            }
        }
        let mut ports = Vec::with_capacity(s.ports.len());
        for (i, p) in s.ports.iter().enumerate() {
            if !(p.protocol.is_empty() || p.protocol.eq_ignore_ascii_case("TCP")) {
                continue;
            }
            ports.push(ServicePort {
                name: p.name.clone(),
                port: port(p.port, &format!("ports[{i}].port"))?,
                // 0: a named target port no EndpointSlice has resolved yet.
                target_port: match p.target_port {
                    0 => None,
                    n => Some(port(n, &format!("ports[{i}].target_port"))?),
                },
            });
        }
        let mut endpoints = Vec::with_capacity(s.endpoints.len());
        for (i, e) in s.endpoints.iter().enumerate() {
            endpoints.push(Endpoint {
                ip: address(format!("endpoints[{i}].ip"), &e.ip)?,
                node: e.node.clone(),
                zone: e.zone.clone(),
                ready: e.ready,
                workload_uid: (!e.workload_uid.is_empty()).then(|| e.workload_uid.clone()),
            });
        }
        Ok(Service::new(
            s.name.clone(),
            s.namespace.clone(),
            vips,
            ports,
            endpoints,
            s.prefer_close,
        )
        .with_waypoint(waypoint::optional_ref(&s.waypoint)?))
    }
}

#[cfg(test)]
mod tests;
