//! Kubernetes Services as the node proxy sees them: virtual IPs resolved to endpoints by the
//! source agent, so kube-proxy is not on the mesh's path.
//!
//! Endpoint choice: ready endpoints only; those on this node first, then this zone, then any;
//! round robin within the preferred tier. The outbound proxy walks the returned order and moves
//! to the next endpoint when a connect fails.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use crate::api::v1 as api;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ServiceError {
    #[error("service {0}: {1}")]
    Invalid(String, String),
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub node: String,
    pub zone: String,
    pub ready: bool,
    /// The backing pod's uid, when it is a workload the mesh knows.
    pub workload_uid: Option<String>,
}

#[derive(Debug, serde::Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
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
    ) -> Self {
        Self {
            name,
            namespace,
            vips,
            ports,
            endpoints,
            cursor: AtomicUsize::new(0),
        }
    }

    /// The port endpoints listen on for a connection to `port` on a VIP.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.target_port)
    }

    /// Ready endpoints in the order to try them: same node, then same zone, then the rest;
    /// rotating within the first tier so load spreads across calls.
    pub fn candidates(&self, local_node: &str, local_zone: &str) -> Vec<&Endpoint> {
        let tier = |e: &Endpoint| {
            if e.node == local_node {
                0
            } else if !local_zone.is_empty() && e.zone == local_zone {
                1
            } else {
                2
            }
        };
        let mut ready: Vec<&Endpoint> = self.endpoints.iter().filter(|e| e.ready).collect();
        ready.sort_by_key(|e| tier(e));
        let Some(first) = ready.first() else {
            return ready;
        };
        let best = tier(first);
        let in_best = ready.iter().take_while(|e| tier(e) == best).count();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % in_best;
        ready[..in_best].rotate_left(start);
        ready
    }
}

impl TryFrom<&api::Service> for Service {
    type Error = ServiceError;

    fn try_from(s: &api::Service) -> Result<Self, Self::Error> {
        let name = format!("{}/{}", s.namespace, s.name);
        let invalid = |reason: String| ServiceError::Invalid(name.clone(), reason);
        let vips = s
            .vips
            .iter()
            .map(|v| {
                v.parse::<IpAddr>()
                    .map_err(|_| invalid(format!("virtual IP {v:?} is not an address")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let port = |p: u32, what: &str| {
            u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid(format!("{what} {p} is not a port")))
        };
        let ports = s
            .ports
            .iter()
            .filter(|p| p.protocol.is_empty() || p.protocol.eq_ignore_ascii_case("TCP"))
            .map(|p| {
                Ok(ServicePort {
                    name: p.name.clone(),
                    port: port(p.port, "port")?,
                    target_port: port(p.target_port, "target port")?,
                })
            })
            .collect::<Result<Vec<_>, ServiceError>>()?;
        let endpoints =
            s.endpoints
                .iter()
                .map(|e| {
                    Ok(Endpoint {
                        ip: e.ip.parse().map_err(|_| {
                            invalid(format!("endpoint {:?} is not an address", e.ip))
                        })?,
                        node: e.node.clone(),
                        zone: e.zone.clone(),
                        ready: e.ready,
                        workload_uid: (!e.workload_uid.is_empty()).then(|| e.workload_uid.clone()),
                    })
                })
                .collect::<Result<Vec<_>, ServiceError>>()?;
        Ok(Service::new(
            s.name.clone(),
            s.namespace.clone(),
            vips,
            ports,
            endpoints,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(ip: &str, node: &str, zone: &str, ready: bool) -> Endpoint {
        Endpoint {
            ip: ip.parse().expect("ip"),
            node: node.into(),
            zone: zone.into(),
            ready,
            workload_uid: None,
        }
    }

    fn service(endpoints: Vec<Endpoint>) -> Service {
        Service::new(
            "web".into(),
            "shop".into(),
            vec!["10.96.0.10".parse().expect("ip")],
            vec![ServicePort {
                name: "http".into(),
                port: 80,
                target_port: 8080,
            }],
            endpoints,
        )
    }

    #[test]
    fn prefers_this_node_then_this_zone_and_skips_unready() {
        let svc = service(vec![
            endpoint("10.0.2.1", "far", "b", true),
            endpoint("10.0.1.1", "near", "a", true),
            endpoint("10.0.0.1", "here", "a", true),
            endpoint("10.0.0.2", "here", "a", false),
        ]);
        let ips: Vec<String> = svc
            .candidates("here", "a")
            .iter()
            .map(|e| e.ip.to_string())
            .collect();
        assert_eq!(ips, ["10.0.0.1", "10.0.1.1", "10.0.2.1"]);
        assert_eq!(svc.target_port(80), Some(8080));
        assert_eq!(svc.target_port(81), None);
    }

    #[test]
    fn rotates_within_the_preferred_tier() {
        let svc = service(vec![
            endpoint("10.0.0.1", "n1", "", true),
            endpoint("10.0.0.2", "n2", "", true),
            endpoint("10.0.0.3", "n3", "", true),
        ]);
        let firsts: Vec<String> = (0..6)
            .map(|_| {
                svc.candidates("elsewhere", "")
                    .first()
                    .map(|e| e.ip.to_string())
                    .unwrap_or_default()
            })
            .collect();
        for ip in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            assert_eq!(firsts.iter().filter(|f| *f == ip).count(), 2, "{firsts:?}");
        }
        assert!(
            service(vec![endpoint("10.0.0.1", "n1", "", false)])
                .candidates("n1", "")
                .is_empty()
        );
    }

    #[test]
    fn wire_services_convert_and_bad_ones_are_rejected() {
        let mut wire = api::Service {
            name: "web".into(),
            namespace: "shop".into(),
            vips: vec!["10.96.0.10".into()],
            ports: vec![api::ServicePort {
                name: "http".into(),
                port: 80,
                target_port: 8080,
                protocol: "TCP".into(),
            }],
            endpoints: vec![api::Endpoint {
                workload_uid: "u1".into(),
                ip: "10.0.0.1".into(),
                node: "n1".into(),
                zone: String::new(),
                ready: true,
            }],
        };
        let svc = Service::try_from(&wire).expect("valid");
        assert_eq!(svc.endpoints[0].workload_uid.as_deref(), Some("u1"));
        wire.ports[0].target_port = 70000;
        assert!(Service::try_from(&wire).is_err());
        wire.ports[0].target_port = 8080;
        wire.vips = vec!["web.shop".into()];
        assert!(Service::try_from(&wire).is_err());
    }
}
