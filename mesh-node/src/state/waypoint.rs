//! Waypoints as source agents see them: which traffic goes through one, and how to reach it.
//!
//! A service or a pod names its waypoint (`trellis.dev/use-waypoint`, resolved by the
//! controller into [`WaypointRef`]); the waypoint itself is a [`Waypoint`]: the identity its
//! pods present and their addresses. The source agent opens HBONE to one of those pods with
//! the original destination as `:authority`, instead of to the destination's node.

use std::{fmt, net::IpAddr, str::FromStr, sync::Arc};

use super::resource::{ResourceError, bad, canonical, check_subdomain};
use crate::{api::v1 as api, identity::Identity, k8s::WAYPOINT_ENFORCEMENT_LABEL};

/// `<namespace>/<name>` of a waypoint Gateway.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WaypointRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for WaypointRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl serde::Serialize for WaypointRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl FromStr for WaypointRef {
    type Err = ResourceError;

    fn from_str(text: &str) -> Result<Self, ResourceError> {
        let (namespace, name) = text
            .split_once('/')
            .ok_or_else(|| bad("waypoint", format!("{text:?} is not <namespace>/<name>")))?;
        check_subdomain("waypoint namespace", namespace)?;
        check_subdomain("waypoint name", name)?;
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

/// The optional `waypoint` field of a streamed workload or service: empty means none.
pub(crate) fn optional_ref(text: &str) -> Result<Option<WaypointRef>, ResourceError> {
    if text.is_empty() {
        Ok(None)
    } else {
        text.parse().map(Some)
    }
}

/// One pod serving a waypoint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WaypointEndpoint {
    pub ip: IpAddr,
    pub node: String,
    pub ready: bool,
}

/// A waypoint and the pods that serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waypoint {
    pub id: WaypointRef,
    /// What its pods present in the HBONE handshake; anything else is refused.
    pub identity: Identity,
    pub port: u16,
    pub endpoints: Vec<WaypointEndpoint>,
}

impl serde::Serialize for Waypoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Dump<'a> {
            namespace: &'a str,
            name: &'a str,
            identity: String,
            port: u16,
            endpoints: &'a [WaypointEndpoint],
        }
        Dump {
            namespace: &self.id.namespace,
            name: &self.id.name,
            identity: self.identity.to_string(),
            port: self.port,
            endpoints: &self.endpoints,
        }
        .serialize(s)
    }
}

impl Waypoint {
    /// Converts a streamed waypoint (the trust domain is the mesh's, as for workloads).
    pub fn from_resource(w: api::Waypoint, trust_domain: &str) -> Result<Self, ResourceError> {
        check_subdomain("namespace", &w.namespace)?;
        check_subdomain("name", &w.name)?;
        let identity = Identity::new(trust_domain, &w.namespace, &w.service_account)
            .map_err(|e| bad("service_account", e.to_string()))?;
        let port = u16::try_from(w.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("port", format!("{} is not a port", w.port)))?;
        let mut endpoints = Vec::with_capacity(w.endpoints.len());
        for (i, e) in w.endpoints.iter().enumerate() {
            let ip: IpAddr = e.ip.parse().map(canonical).map_err(|_| {
                bad(
                    format!("endpoints[{i}].ip"),
                    format!("{:?} is not an IP address", e.ip),
                )
            })?;
            if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                return Err(bad(
                    format!("endpoints[{i}].ip"),
                    format!("{ip} is not a pod address"),
                ));
            }
            endpoints.push(WaypointEndpoint {
                ip,
                node: e.node.clone(),
                ready: e.ready,
            });
        }
        Ok(Self {
            id: WaypointRef {
                namespace: w.namespace,
                name: w.name,
            },
            identity,
            port,
            endpoints,
        })
    }

    /// Ready pod addresses, in a rotating order so sources spread their connections.
    pub fn ready_endpoints(&self, start: usize) -> Vec<std::net::SocketAddr> {
        let ready: Vec<_> = self.endpoints.iter().filter(|e| e.ready).collect();
        if ready.is_empty() {
            return Vec::new();
        }
        let start = start % ready.len();
        ready[start..]
            .iter()
            .chain(&ready[..start])
            .map(|e| std::net::SocketAddr::new(e.ip, self.port))
            .collect()
    }
}

pub type WaypointMap = std::collections::HashMap<WaypointRef, Arc<Waypoint>>;

/// The waypoints a workload's connections must come through: its own, and those of every
/// Service it is an endpoint of. Its node refuses a connection from any other identity, and
/// all plaintext, so L7 policies cannot be skipped by dialling the pod directly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Guards(Vec<Arc<Waypoint>>);

impl Guards {
    pub fn new(mut waypoints: Vec<Arc<Waypoint>>) -> Self {
        waypoints.sort_by(|a, b| a.id.cmp(&b.id));
        waypoints.dedup_by(|a, b| a.id == b.id);
        Self(waypoints)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn waypoints(&self) -> &[Arc<Waypoint>] {
        &self.0
    }

    /// Whether a connection from `source` (`None`: plaintext) crossed one of the waypoints.
    pub fn admit(&self, source: Option<&Identity>) -> Result<(), Bypass> {
        if self.0.is_empty() || source.is_some_and(|s| self.0.iter().any(|w| w.identity == *s)) {
            return Ok(());
        }
        Err(Bypass {
            waypoints: self.0.iter().map(|w| w.id.to_string()).collect(),
        })
    }
}

/// A connection to a waypoint's workload that did not come through the waypoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the destination is served by waypoint {}: connections must come through it (label the \
     pod {WAYPOINT_ENFORCEMENT_LABEL}=disabled to accept others)",
    .waypoints.join(", ")
)]
pub struct Bypass {
    pub waypoints: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource() -> api::Waypoint {
        api::Waypoint {
            namespace: "shop".into(),
            name: "waypoint".into(),
            service_account: "waypoint".into(),
            port: 15008,
            endpoints: vec![
                api::Endpoint {
                    workload_uid: "u1".into(),
                    ip: "10.0.0.7".into(),
                    node: "n1".into(),
                    zone: String::new(),
                    ready: true,
                },
                api::Endpoint {
                    workload_uid: "u2".into(),
                    ip: "::ffff:10.0.0.8".into(),
                    node: "n2".into(),
                    zone: String::new(),
                    ready: true,
                },
                api::Endpoint {
                    workload_uid: "u3".into(),
                    ip: "10.0.0.9".into(),
                    node: "n2".into(),
                    zone: String::new(),
                    ready: false,
                },
            ],
        }
    }

    #[test]
    fn converts_and_rotates_over_ready_pods_only() {
        let w = Waypoint::from_resource(resource(), "cluster.local").expect("valid");
        assert_eq!(
            w.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/waypoint"
        );
        let first: Vec<String> = w
            .ready_endpoints(0)
            .iter()
            .map(std::string::ToString::to_string)
            .collect();
        assert_eq!(first, ["10.0.0.7:15008", "10.0.0.8:15008"]);
        let second: Vec<String> = w
            .ready_endpoints(1)
            .iter()
            .map(std::string::ToString::to_string)
            .collect();
        assert_eq!(second, ["10.0.0.8:15008", "10.0.0.7:15008"]);
    }

    #[test]
    fn refuses_bad_fields_by_name() {
        let mut bad_ip = resource();
        bad_ip.endpoints[0].ip = "127.0.0.1".into();
        let e = Waypoint::from_resource(bad_ip, "cluster.local").expect_err("loopback");
        assert_eq!(e.field, "endpoints[0].ip");
        let mut bad_port = resource();
        bad_port.port = 70000;
        let e = Waypoint::from_resource(bad_port, "cluster.local").expect_err("port");
        assert_eq!(e.field, "port");
    }

    #[test]
    fn references_parse_strictly() {
        assert_eq!(
            optional_ref("shop/waypoint").expect("valid"),
            Some(WaypointRef {
                namespace: "shop".into(),
                name: "waypoint".into()
            })
        );
        assert_eq!(optional_ref("").expect("empty"), None);
        for bad in ["shop", "shop/", "/w", "Shop/w", "shop/w/x"] {
            assert!(optional_ref(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_the_waypoints_identities_are_admitted() {
        let waypoint =
            Arc::new(Waypoint::from_resource(resource(), "cluster.local").expect("waypoint"));
        let guards = Guards::new(vec![waypoint.clone(), waypoint.clone()]);
        assert_eq!(guards.waypoints().len(), 1, "one entry per waypoint");
        assert_eq!(guards.admit(Some(&waypoint.identity)), Ok(()));
        let other = Identity::new("cluster.local", "shop", "web").expect("identity");
        let refused = guards.admit(Some(&other)).expect_err("another identity");
        assert_eq!(refused.waypoints, ["shop/waypoint"]);
        assert!(refused.to_string().contains(WAYPOINT_ENFORCEMENT_LABEL));
        assert!(guards.admit(None).is_err(), "plaintext never crossed it");
        assert_eq!(
            Guards::default().admit(None),
            Ok(()),
            "no waypoint: no constraint"
        );
    }
}
