//! A pod as the mesh knows it ([`Workload`]), converted from the controller's resource at the
//! boundary.
//!
//! Workloads are keyed by pod uid, never by address: a new pod that reuses an old pod's IP is
//! a different workload.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use super::{
    resource::{ResourceError, bad, canonical, check_subdomain, non_empty},
    waypoint::{self, Waypoint, WaypointRef},
};
use crate::{api::v1 as api, identity::Identity, k8s::GATEWAY_NAME_LABEL};

mod telemetry;
pub use telemetry::{DEFAULT_CLUSTER_ID, POD_KIND, UNKNOWN, WorkloadTelemetry};

/// A pod known to the mesh: enrolled pods are mesh sources and destinations; the others are
/// known for telemetry only.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    /// The pod's uid: the stable key of the workload, and how its cgroup is found.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// In the mesh: traffic is redirected, it holds a certificate, it is an HBONE destination.
    pub enrolled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The pod's cgroup v2 directory, once known (configured, or discovered from the uid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    #[serde(serialize_with = "serialize_display")]
    pub identity: Identity,
    /// The waypoint traffic addressed to this pod's own IPs goes through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
    /// What its metrics say about it (owner, canonical service, cluster).
    pub telemetry: WorkloadTelemetry,
}

fn serialize_display<S: serde::Serializer>(v: &Identity, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Pod uids are UUIDs. They end up in cgroup directory names we match on, so anything that
/// could act as a path component (`/`, `.`) or a pattern is refused outright.
fn check_uid(value: &str) -> Result<(), ResourceError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(bad(
            "uid",
            format!("{value:?} is not a pod uid (letters, digits, '-' and '_')"),
        ))
    }
}

impl Workload {
    /// Converts a streamed workload. The protobuf carries no trust domain (it is the mesh's,
    /// not the pod's), so it is a parameter rather than a `TryFrom`.
    pub fn from_resource(w: api::Workload, trust_domain: &str) -> Result<Self, ResourceError> {
        check_uid(&w.uid)?;
        check_subdomain("name", &w.name)?;
        check_subdomain("node", &w.node)?;
        let identity = Identity::new(trust_domain, &w.namespace, &w.service_account)
            .map_err(|e| bad("namespace/service_account", e.to_string()))?;
        let mut ips = Vec::with_capacity(w.ips.len());
        for (i, text) in w.ips.iter().enumerate() {
            let ip: IpAddr = text.parse().map_err(|_| {
                bad(
                    format!("ips[{i}]"),
                    format!("{text:?} is not an IP address"),
                )
            })?;
            let ip = canonical(ip);
            if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                return Err(bad(
                    format!("ips[{i}]"),
                    format!("{ip} is not a pod address"),
                ));
            }
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        for (key, value) in &w.labels {
            if key.is_empty() || key.len() > 317 || value.len() > 63 {
                return Err(bad(
                    format!("labels[{key:?}]"),
                    "not a Kubernetes label (key 1..=317 bytes, value at most 63)",
                ));
            }
        }
        let labels: BTreeMap<String, String> = w.labels.into_iter().collect();
        let telemetry = WorkloadTelemetry::from_resource(w.telemetry, &w.name, &labels)?;
        Ok(Self {
            uid: w.uid,
            name: w.name,
            namespace: w.namespace,
            service_account: w.service_account,
            node: w.node,
            ips,
            labels,
            enrolled: w.enrolled,
            zone: non_empty(w.zone),
            cgroup: None,
            identity,
            waypoint: waypoint::optional_ref(&w.waypoint)?,
            telemetry,
        })
    }

    /// Whether this workload is one of `waypoint`'s own pods: its traffic must never be sent
    /// back to the waypoint (loop protection; the controller also never enrolls them).
    pub fn is_pod_of(&self, waypoint: &Waypoint) -> bool {
        self.namespace == waypoint.id.namespace
            && self
                .labels
                .get(GATEWAY_NAME_LABEL)
                .is_some_and(|name| *name == waypoint.id.name)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn api_workload(uid: &str, name: &str, node: &str, ip: &str) -> api::Workload {
        api::Workload {
            uid: uid.into(),
            name: name.into(),
            namespace: "shop".into(),
            service_account: name.into(),
            node: node.into(),
            ips: vec![ip.into()],
            labels: [("app".to_owned(), name.to_owned())].into(),
            enrolled: true,
            zone: "zone-a".into(),
            waypoint: String::new(),
            telemetry: None,
        }
    }

    fn convert(w: api::Workload) -> Result<Workload, ResourceError> {
        Workload::from_resource(w, "cluster.local")
    }

    #[test]
    fn streamed_workloads_convert_with_their_identity() {
        let mut w = api_workload("0b1c-2d", "web", "node-a", "::ffff:10.0.0.1");
        w.ips.push("10.0.0.1".into());
        let w = convert(w).expect("valid");
        assert_eq!(
            w.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(w.ips, vec!["10.0.0.1".parse::<IpAddr>().expect("ip")]);
        assert_eq!(w.zone.as_deref(), Some("zone-a"));
        assert_eq!(w.labels["app"], "web");
    }

    #[test]
    fn malformed_workloads_name_the_field() {
        let field = |edit: &dyn Fn(&mut api::Workload)| {
            let mut w = api_workload("u1", "web", "node-a", "10.0.0.1");
            edit(&mut w);
            convert(w).expect_err("must be rejected").field
        };
        assert_eq!(field(&|w| w.uid = "../../etc".into()), "uid");
        assert_eq!(field(&|w| w.uid.clear()), "uid");
        assert_eq!(field(&|w| w.name = "Web".into()), "name");
        assert_eq!(field(&|w| w.node.clear()), "node");
        assert_eq!(field(&|w| w.ips.push("10.0.0.300".into())), "ips[1]");
        assert_eq!(field(&|w| w.ips = vec!["127.0.0.1".into()]), "ips[0]");
        assert_eq!(
            field(&|w| w.service_account = "a/b".into()),
            "namespace/service_account"
        );
    }
}
