//! Kubernetes objects to mesh state: the one place that decides what the mesh contains.
//!
//! [`translate`] is a pure function of [`ClusterObjects`]: the directory source, the
//! Kubernetes source and the tests all go through it, so no rule exists in one path only.
//! An object that cannot be translated (an identity that is not a valid SPIFFE ID, an address
//! that is not an IP) is rejected alone with a reason naming it; everything else still
//! translates. Output is ordered (`BTreeMap`, sorted lists) so equal inputs give equal outputs.
//!
//! Rules:
//! - A pod is **enrolled** iff its namespace has the label `trellis.dev/mesh=enabled` and the
//!   pod does not have `trellis.dev/mesh=disabled`; label values are compared exactly. With
//!   Istio's labels read, `istio.io/dataplane-mode` counts too: see [`labels`] for the
//!   precedence.
//! - Pods without an IP or a node yet are skipped (they appear once scheduled), as are
//!   finished pods (their IP may already belong to a new pod) and host-network pods (they
//!   share the node's address and have no identity of their own on it).
//! - When two pods claim one IP, the newer pod keeps it and the other is rejected: a new pod
//!   must never inherit an old pod's identity through its address.
//! - Waypoints (Gateways of class `trellis-waypoint`, or `istio-waypoint` with Istio's labels
//!   read), their pods, and the `trellis.dev/use-waypoint` labels: see [`waypoint`].
//! - Routing objects (HTTPRoute, GRPCRoute, TrafficPolicy) are carried as written under
//!   `route/<kind>/<ns>/<name>` for the waypoints; agents never receive them (see
//!   [`for_role`]). Their status is derived in [`l7`].
//!
//! Pods become workloads in [`workload`], Services and their EndpointSlices become services in
//! [`service`]; nodes, policies and routing objects are translated here.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use super::objects::{ClusterObjects, PolicyObject, RouteKind};
use crate::{
    api::v1 as api,
    identity::Identity,
    k8s::ZONE_LABEL,
    l7::route::{ParentStatus, RouteId},
    policy::{Policy, PolicyId, PolicyKind, SecurityGroup, status::Condition},
};

mod l7;
pub mod labels;
mod service;
pub mod waypoint;
mod workload;

pub use labels::LabelReader;
use waypoint::Waypoints;
pub use waypoint::waypoint_key;

/// Everything the translation needs besides the objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranslateSettings {
    pub trust_domain: String,
    /// Port of every node agent's HBONE listener.
    pub hbone_port: u16,
    /// The cluster id workloads report in telemetry (`source_cluster`, `destination_cluster`).
    pub cluster_id: String,
    /// Whether Istio's labels and waypoint class are read too (see [`labels`]).
    pub istio_labels: bool,
}

impl TranslateSettings {
    /// The labels this translation reads.
    pub fn labels(&self) -> LabelReader {
        LabelReader {
            istio: self.istio_labels,
        }
    }
}

/// Who a discovery stream is for: what it may receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A node agent: everything but the routing objects.
    Agent,
    /// A waypoint proxy: everything, routing objects included.
    Waypoint,
}

/// Prefix of the keys of routing objects, which only waypoints receive.
pub const ROUTE_PREFIX: &str = "route/";

/// Whether a stream for `role` receives the resource under `key`.
pub fn for_role(key: &str, role: Role) -> bool {
    role == Role::Waypoint || !key.starts_with(ROUTE_PREFIX)
}

/// The mesh state derived from the cluster's objects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Translation {
    /// By key: `workload/<uid>`, `service/<ns>/<name>`, `node/<name>`,
    /// `policy/<kind>/<ns>/<name>`, `waypoint/<ns>/<name>` and (for waypoints only, see
    /// [`for_role`]) `route/<kind>/<ns>/<name>`.
    pub resources: BTreeMap<String, api::Resource>,
    /// Objects left out, each with the reason: `("Pod shop/web-1", "...")`.
    pub rejected: Vec<(String, String)>,
    /// The identities of enrolled pods, by the node they are scheduled on: what each node's
    /// agent may obtain certificates for. Never a waypoint's identity.
    pub identities_by_node: BTreeMap<String, BTreeSet<Identity>>,
    /// `(namespace, service account)` of every waypoint with running pods: the workload
    /// callers that may obtain their own certificate and stream as a waypoint.
    pub waypoint_accounts: BTreeSet<(String, String)>,
    /// The `Accepted` condition of every policy, by group and kind, as the agents will
    /// enforce it.
    pub policy_status: BTreeMap<(SecurityGroup, PolicyKind, PolicyId), Condition>,
    /// The `Accepted` condition of every TrafficPolicy, as the waypoints will apply it.
    pub traffic_policy_status: BTreeMap<PolicyId, Condition>,
    /// The `status.parents` entries of every HTTPRoute and GRPCRoute for the parents the
    /// waypoints serve (none when it names none of them).
    pub route_status: BTreeMap<RouteId, Vec<ParentStatus>>,
    /// The `Accepted` condition of every VirtualService and DestinationRule, by kind name, as
    /// the waypoints will apply them.
    pub istio_status: BTreeMap<(&'static str, PolicyId), Condition>,
}

impl Translation {
    /// Whether `node` runs at least one enrolled pod with `identity` (which is never a
    /// waypoint's).
    pub fn node_may_hold(&self, node: &str, identity: &Identity) -> bool {
        !self.is_waypoint_account(identity.namespace(), identity.service_account())
            && self
                .identities_by_node
                .get(node)
                .is_some_and(|ids| ids.contains(identity))
    }

    /// Whether `namespace/service_account` is the service account of a waypoint.
    pub fn is_waypoint_account(&self, namespace: &str, service_account: &str) -> bool {
        self.waypoint_accounts
            .contains(&(namespace.to_owned(), service_account.to_owned()))
    }
}

pub fn workload_key(uid: &str) -> String {
    format!("workload/{uid}")
}
pub fn service_key(namespace: &str, name: &str) -> String {
    format!("service/{namespace}/{name}")
}
pub fn node_key(name: &str) -> String {
    format!("node/{name}")
}
/// `policy/<kind>/<ns>/<name>`, the kind qualified by its group outside Trellis's own
/// ([`SecurityGroup::qualified`]).
pub fn policy_key(group: SecurityGroup, kind: PolicyKind, namespace: &str, name: &str) -> String {
    format!("policy/{}/{namespace}/{name}", group.qualified(kind))
}
pub fn route_key(kind: RouteKind, namespace: &str, name: &str) -> String {
    format!("{ROUTE_PREFIX}{kind}/{namespace}/{name}")
}

fn namespace_labels<'a>(
    objects: &'a ClusterObjects,
    namespace: &str,
) -> Option<&'a BTreeMap<String, String>> {
    objects
        .namespaces
        .get(namespace)
        .and_then(|ns| ns.metadata.labels.as_ref())
}

pub fn translate(objects: &ClusterObjects, settings: &TranslateSettings) -> Translation {
    let mut out = Translation::default();
    let zones: HashMap<&str, &str> = objects
        .nodes
        .iter()
        .filter_map(|(name, node)| {
            let zone = node.metadata.labels.as_ref()?.get(ZONE_LABEL)?;
            Some((name.as_str(), zone.as_str()))
        })
        .collect();
    let zone_of = |node: &str| zones.get(node).copied().unwrap_or_default().to_owned();

    let waypoints = Waypoints::of(objects, settings.labels());
    translate_nodes(objects, settings, &zone_of, &mut out);
    waypoints.check_namespaces(objects, &mut out);
    let workloads = workload::translate_pods(objects, settings, &waypoints, &zone_of, &mut out);
    service::translate_services(objects, &waypoints, &workloads, &zone_of, &mut out);
    translate_policies(objects, &mut out);
    translate_routes(objects, &mut out);
    l7::traffic_policies(objects, &mut out);
    l7::routes(objects, &waypoints, &mut out);
    l7::istio(objects, &mut out);
    out
}

/// Routing objects go to the waypoints as written; the controller does not interpret them.
fn translate_routes(objects: &ClusterObjects, out: &mut Translation) {
    for kind in RouteKind::ALL {
        for route in objects.routes(kind).values() {
            let (Some(namespace), Some(name)) = (&route.metadata.namespace, &route.metadata.name)
            else {
                continue; // The store holds named objects only.
            };
            let key = route_key(kind, namespace, name);
            out.resources.insert(
                key.clone(),
                api::Resource {
                    key,
                    kind: Some(api::resource::Kind::Policy(api::Policy {
                        kind: kind.as_str().to_owned(),
                        namespace: namespace.clone(),
                        name: name.clone(),
                        generation: route.metadata.generation.unwrap_or_default(),
                        spec_json: route.spec.to_string(),
                    })),
                },
            );
        }
    }
}

/// Policies of every kind are sent as written (see `policy::stored`) to agents and waypoints
/// alike, each of which reads the kinds it enforces; converting them here only yields the
/// status each object reports, which is exactly what the nodes and waypoints will enforce.
fn translate_policies(objects: &ClusterObjects, out: &mut Translation) {
    for group in SecurityGroup::ALL {
        for kind in PolicyKind::ALL {
            for object in objects.policies_in(group, kind).values() {
                translate_policy(group, kind, object, out);
            }
        }
    }
}

fn translate_policy(
    group: SecurityGroup,
    kind: PolicyKind,
    object: &PolicyObject,
    out: &mut Translation,
) {
    let qualified = group.qualified(kind);
    let policy = match Policy::compile_in(group, kind, &object.metadata, &object.spec) {
        Ok(policy) => policy,
        Err(e) => {
            reject(out, format!("{qualified} (unnamed)"), e.to_string());
            return;
        }
    };
    let id = policy.id().clone();
    let resource = api::Policy {
        kind: qualified.to_owned(),
        namespace: id.namespace.clone(),
        name: id.name.clone(),
        generation: object.metadata.generation.unwrap_or_default(),
        spec_json: object.spec.to_string(),
    };
    let key = policy_key(group, kind, &id.namespace, &id.name);
    out.resources.insert(
        key.clone(),
        api::Resource {
            key,
            kind: Some(api::resource::Kind::Policy(resource)),
        },
    );
    out.policy_status
        .insert((group, kind, id), policy.condition());
}

fn reject(out: &mut Translation, object: String, reason: String) {
    out.rejected.push((object, reason));
}

fn translate_nodes(
    objects: &ClusterObjects,
    settings: &TranslateSettings,
    zone_of: &dyn Fn(&str) -> String,
    out: &mut Translation,
) {
    for (name, node) in &objects.nodes {
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_deref())
            .unwrap_or_default();
        // Kubernetes lists a node's primary address first.
        let Some(internal) = addresses.iter().find(|a| a.type_ == "InternalIP") else {
            reject(
                out,
                format!("Node {name}"),
                "no InternalIP in status.addresses: its agent cannot be reached over HBONE".into(),
            );
            continue;
        };
        let Ok(ip) = internal.address.parse::<IpAddr>() else {
            reject(
                out,
                format!("Node {name}"),
                format!("InternalIP {:?} is not an IP address", internal.address),
            );
            continue;
        };
        let resource = api::Node {
            name: name.clone(),
            hbone: SocketAddr::new(ip, settings.hbone_port).to_string(),
            zone: zone_of(name),
        };
        out.resources.insert(
            node_key(name),
            api::Resource {
                key: node_key(name),
                kind: Some(api::resource::Kind::Node(resource)),
            },
        );
    }
}

#[cfg(test)]
mod tests;
