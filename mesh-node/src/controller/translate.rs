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
//!   pod does not have `trellis.dev/mesh=disabled`; label values are compared exactly.
//! - Pods without an IP or a node yet are skipped (they appear once scheduled), as are
//!   finished pods (their IP may already belong to a new pod) and host-network pods (they
//!   share the node's address and have no identity of their own on it).
//! - When two pods claim one IP, the newer pod keeps it and the other is rejected: a new pod
//!   must never inherit an old pod's identity through its address.
//! - Waypoints (Gateways of class `trellis-waypoint`), their pods, and the
//!   `trellis.dev/use-waypoint` labels: see [`waypoint`].
//! - Routing objects (HTTPRoute, GRPCRoute, TrafficPolicy) are carried as written under
//!   `route/<kind>/<ns>/<name>` for the waypoints; agents never receive them (see
//!   [`for_role`]). Their status is derived in [`l7`].

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::{
    api::{core::v1::Pod, discovery::v1::EndpointSlice},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::objects::{ClusterObjects, RouteKind};
use crate::{
    api::v1 as api,
    identity::Identity,
    k8s::{MESH_DISABLED, MESH_ENABLED, MESH_LABEL, SERVICE_NAME_LABEL, ZONE_LABEL},
    l7::route::{ParentStatus, RouteId},
    policy::{Policy, PolicyId, PolicyKind, status::Condition},
};

mod l7;
pub mod waypoint;

pub use waypoint::waypoint_key;
use waypoint::{Choice, PodWorkload, Waypoints};

/// Everything the translation needs besides the objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranslateSettings {
    pub trust_domain: String,
    /// Port of every node agent's HBONE listener.
    pub hbone_port: u16,
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
    /// The `Accepted` condition of every policy, as the agents will enforce it.
    pub policy_status: BTreeMap<(PolicyKind, PolicyId), Condition>,
    /// The `Accepted` condition of every TrafficPolicy, as the waypoints will apply it.
    pub traffic_policy_status: BTreeMap<PolicyId, Condition>,
    /// The `status.parents` entries of every HTTPRoute and GRPCRoute for the parents the
    /// waypoints serve (none when it names none of them).
    pub route_status: BTreeMap<RouteId, Vec<ParentStatus>>,
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
pub fn policy_key(kind: PolicyKind, namespace: &str, name: &str) -> String {
    format!("policy/{kind}/{namespace}/{name}")
}
pub fn route_key(kind: RouteKind, namespace: &str, name: &str) -> String {
    format!("{ROUTE_PREFIX}{kind}/{namespace}/{name}")
}

/// Whether a namespace with `labels` is in the mesh.
fn enabled(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(MESH_LABEL))
        .is_some_and(|v| v == MESH_ENABLED)
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

    let waypoints = Waypoints::of(objects);
    translate_nodes(objects, settings, &zone_of, &mut out);
    waypoints.check_namespaces(objects, &mut out);
    let workloads = translate_pods(objects, settings, &waypoints, &zone_of, &mut out);
    translate_services(objects, &waypoints, &workloads, &zone_of, &mut out);
    translate_policies(objects, &mut out);
    translate_routes(objects, &mut out);
    l7::traffic_policies(objects, &mut out);
    l7::routes(objects, &waypoints, &mut out);
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
    for kind in PolicyKind::ALL {
        for object in objects.policies(kind).values() {
            let policy = match Policy::compile(kind, &object.metadata, &object.spec) {
                Ok(policy) => policy,
                Err(e) => {
                    reject(out, format!("{kind} (unnamed)"), e.to_string());
                    continue;
                }
            };
            let id = policy.id().clone();
            let resource = api::Policy {
                kind: kind.as_str().to_owned(),
                namespace: id.namespace.clone(),
                name: id.name.clone(),
                generation: object.metadata.generation.unwrap_or_default(),
                spec_json: object.spec.to_string(),
            };
            out.resources.insert(
                policy_key(kind, &id.namespace, &id.name),
                api::Resource {
                    key: policy_key(kind, &id.namespace, &id.name),
                    kind: Some(api::resource::Kind::Policy(resource)),
                },
            );
            out.policy_status.insert((kind, id), policy.condition());
        }
    }
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

/// A pod that became a workload, as services see it.
struct WorkloadRef {
    node: String,
    zone: String,
}

/// Translates pods (and with them the waypoints they serve); returns the translated workloads
/// by pod uid.
fn translate_pods(
    objects: &ClusterObjects,
    settings: &TranslateSettings,
    waypoints: &Waypoints,
    zone_of: &dyn Fn(&str) -> String,
    out: &mut Translation,
) -> HashMap<String, WorkloadRef> {
    let mut candidates: Vec<(&Pod, api::Workload, Identity)> = Vec::new();
    for (key, pod) in &objects.pods {
        let object = format!("Pod {key}");
        match workload_of(objects, settings, waypoints, pod, zone_of) {
            Ok(Some(candidate)) => candidates.push((pod, candidate.0, candidate.1)),
            Ok(None) => {}
            Err(reason) => reject(out, object, reason),
        }
    }

    // One owner per IP: the pod that is not being deleted, then the newer one, then the
    // larger uid (only so that the outcome never depends on iteration order).
    let rank = |pod: &Pod, uid: &str| {
        (
            pod.metadata.deletion_timestamp.is_none(),
            pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
            uid.to_owned(),
        )
    };
    let mut owner: HashMap<&str, usize> = HashMap::new();
    for (i, (pod, workload, _)) in candidates.iter().enumerate() {
        for ip in &workload.ips {
            match owner.get(ip.as_str()) {
                Some(&j)
                    if rank(candidates[j].0, &candidates[j].1.uid) >= rank(pod, &workload.uid) => {}
                _ => {
                    owner.insert(ip.as_str(), i);
                }
            }
        }
    }
    let mut losers: BTreeMap<usize, (String, usize)> = BTreeMap::new();
    for (i, (_, workload, _)) in candidates.iter().enumerate() {
        for ip in &workload.ips {
            if let Some(&j) = owner.get(ip.as_str()).filter(|&&j| j != i) {
                losers.entry(i).or_insert((ip.clone(), j));
            }
        }
    }

    let mut winners: Vec<PodWorkload<'_>> = Vec::with_capacity(candidates.len());
    for (i, (pod, workload, identity)) in candidates.iter().enumerate() {
        if let Some((ip, j)) = losers.get(&i) {
            let winner = &candidates[*j].1;
            reject(
                out,
                format!("Pod {}/{}", workload.namespace, workload.name),
                format!(
                    "IP {ip} is also claimed by the newer pod {}/{}; the older pod is left out",
                    winner.namespace, winner.name
                ),
            );
            continue;
        }
        winners.push(PodWorkload {
            pod,
            workload: workload.clone(),
            identity: identity.clone(),
        });
    }

    // Waypoints first: which service accounts are theirs decides the other pods' identities.
    waypoint::translate_waypoints(waypoints, &winners, settings.hbone_port, out);

    let mut workloads = HashMap::new();
    for PodWorkload {
        pod,
        mut workload,
        identity,
    } in winners
    {
        let object = || format!("Pod {}/{}", workload.namespace, workload.name);
        if workload.enrolled {
            match waypoints.choose(
                &workload.namespace,
                pod.metadata.labels.as_ref(),
                namespace_labels(objects, &workload.namespace),
            ) {
                Choice::Direct => {}
                Choice::Through(name) => workload.waypoint = name,
                Choice::Missing {
                    waypoint,
                    own_label: true,
                } => reject(out, object(), waypoint::missing(&waypoint)),
                // Reported once, on the namespace.
                Choice::Missing { .. } => {}
            }
            if out.is_waypoint_account(identity.namespace(), identity.service_account()) {
                reject(
                    out,
                    object(),
                    format!(
                        "runs as service account {}, which is a waypoint's: agents are never \
                         given a waypoint's identity, so this pod gets no certificate (give it a \
                         service account of its own)",
                        workload.service_account
                    ),
                );
            } else {
                out.identities_by_node
                    .entry(workload.node.clone())
                    .or_default()
                    .insert(identity);
            }
        }
        workloads.insert(
            workload.uid.clone(),
            WorkloadRef {
                node: workload.node.clone(),
                zone: workload.zone.clone(),
            },
        );
        let key = workload_key(&workload.uid);
        out.resources.insert(
            key.clone(),
            api::Resource {
                key,
                kind: Some(api::resource::Kind::Workload(workload.clone())),
            },
        );
    }
    workloads
}

/// The workload of one pod: `Ok(None)` when the pod is not (yet, or any more) a workload,
/// `Err(reason)` when it should be and cannot. Its waypoint is resolved later, once the
/// waypoints are known.
fn workload_of(
    objects: &ClusterObjects,
    settings: &TranslateSettings,
    waypoints: &Waypoints,
    pod: &Pod,
    zone_of: &dyn Fn(&str) -> String,
) -> Result<Option<(api::Workload, Identity)>, String> {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Ok(None);
    }
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Ok(None);
    }
    let Some(node) = spec
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
    else {
        return Ok(None);
    };
    let mut ip_strings: Vec<&str> = status
        .and_then(|s| s.pod_ips.as_deref())
        .unwrap_or_default()
        .iter()
        .map(|p| p.ip.as_str())
        .collect();
    if ip_strings.is_empty() {
        ip_strings.extend(status.and_then(|s| s.pod_ip.as_deref()));
    }
    ip_strings.retain(|ip| !ip.is_empty());
    if ip_strings.is_empty() {
        return Ok(None);
    }
    let mut ips = Vec::with_capacity(ip_strings.len());
    for ip in ip_strings {
        let parsed: IpAddr = ip
            .parse()
            .map_err(|_| format!("status.podIPs entry {ip:?} is not an IP address"))?;
        let ip = parsed.to_string();
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }

    let meta = &pod.metadata;
    let uid = meta
        .uid
        .as_deref()
        .filter(|u| !u.is_empty())
        .ok_or("metadata.uid is missing: give the pod a unique uid")?;
    let namespace = meta.namespace.as_deref().unwrap_or_default();
    let name = meta.name.as_deref().unwrap_or_default();
    let service_account = spec
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|sa| !sa.is_empty())
        .unwrap_or("default");
    let identity = Identity::new(&settings.trust_domain, namespace, service_account)
        .map_err(|e| format!("no valid SPIFFE identity: {e}"))?;

    let labels = meta.labels.clone().unwrap_or_default();
    let namespace_enabled = enabled(namespace_labels(objects, namespace));
    let opted_out = labels.get(MESH_LABEL).is_some_and(|v| v == MESH_DISABLED);
    // Loop protection: a waypoint's own connections are never redirected (module docs).
    let waypoint_pod = waypoints
        .served_by(namespace, meta.labels.as_ref())
        .is_some();

    let workload = api::Workload {
        uid: uid.to_owned(),
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        node: node.to_owned(),
        ips,
        labels: labels.into_iter().collect(),
        enrolled: namespace_enabled && !opted_out && !waypoint_pod,
        zone: zone_of(node),
        waypoint: String::new(),
    };
    Ok(Some((workload, identity)))
}

fn translate_services(
    objects: &ClusterObjects,
    waypoints: &Waypoints,
    workloads: &HashMap<String, WorkloadRef>,
    zone_of: &dyn Fn(&str) -> String,
    out: &mut Translation,
) {
    // Slices by the service they belong to; BTreeMap iteration keeps slice order stable.
    let mut slices: HashMap<(&str, &str), Vec<(&str, &EndpointSlice)>> = HashMap::new();
    for (key, slice) in &objects.endpoint_slices {
        let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
        if let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        {
            slices
                .entry((ns, service.as_str()))
                .or_default()
                .push((key.as_str(), slice));
        }
    }

    for (key, svc) in &objects.services {
        let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let my_slices = slices
            .get(&(ns, name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        match service_of(ns, name, svc, my_slices, workloads, zone_of, out) {
            Ok(mut resource) => {
                let namespace_labels = namespace_labels(objects, ns);
                let own = svc.metadata.labels.as_ref();
                // A waypoint's own Service never routes through a waypoint (loop protection).
                if enabled(namespace_labels) && waypoints.served_by(ns, own).is_none() {
                    match waypoints.choose(ns, own, namespace_labels) {
                        Choice::Direct => {}
                        Choice::Through(waypoint) => resource.waypoint = waypoint,
                        Choice::Missing {
                            waypoint,
                            own_label: true,
                        } => reject(out, format!("Service {key}"), waypoint::missing(&waypoint)),
                        Choice::Missing { .. } => {}
                    }
                }
                let key = service_key(ns, name);
                out.resources.insert(
                    key.clone(),
                    api::Resource {
                        key,
                        kind: Some(api::resource::Kind::Service(resource)),
                    },
                );
            }
            Err(reason) => reject(out, format!("Service {key}"), reason),
        }
    }
}

fn service_of(
    namespace: &str,
    name: &str,
    svc: &k8s_openapi::api::core::v1::Service,
    slices: &[(&str, &EndpointSlice)],
    workloads: &HashMap<String, WorkloadRef>,
    zone_of: &dyn Fn(&str) -> String,
    out: &mut Translation,
) -> Result<api::Service, String> {
    let spec = svc.spec.as_ref();
    let mut vip_strings: Vec<&str> = spec
        .and_then(|s| s.cluster_ips.as_deref())
        .unwrap_or_default()
        .iter()
        .map(String::as_str)
        .collect();
    if vip_strings.is_empty() {
        vip_strings.extend(spec.and_then(|s| s.cluster_ip.as_deref()));
    }
    let mut vips = Vec::new();
    // Headless services ("None") have endpoints but no VIP.
    for vip in vip_strings
        .into_iter()
        .filter(|v| !v.is_empty() && *v != "None")
    {
        let ip: IpAddr = vip
            .parse()
            .map_err(|_| format!("spec.clusterIPs entry {vip:?} is not an IP address"))?;
        vips.push(ip.to_string());
    }

    let mut ports = Vec::new();
    for port in spec.and_then(|s| s.ports.as_deref()).unwrap_or_default() {
        let port_name = port.name.clone().unwrap_or_default();
        let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
        let number = u16::try_from(port.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {} is out of range", port.port))?;
        let target_port = match &port.target_port {
            None => u32::from(number),
            Some(IntOrString::Int(n)) => u16::try_from(*n)
                .ok()
                .filter(|p| *p != 0)
                .map(u32::from)
                .ok_or_else(|| format!("targetPort {n} is out of range"))?,
            // A named target port resolves per pod; EndpointSlices carry the resolved number
            // under the service port's name. 0 until a slice says (no endpoints yet).
            Some(IntOrString::String(_)) => slices
                .iter()
                .flat_map(|(_, s)| s.ports.as_deref().unwrap_or_default())
                .find(|p| {
                    p.name.as_deref().unwrap_or_default() == port_name
                        && p.protocol.as_deref().unwrap_or("TCP") == protocol
                })
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
                .map(u32::from)
                .unwrap_or(0),
        };
        ports.push(api::ServicePort {
            name: port_name,
            port: u32::from(number),
            target_port,
            protocol,
        });
    }

    let mut endpoints: BTreeMap<String, api::Endpoint> = BTreeMap::new();
    for (slice_key, slice) in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        for endpoint in &slice.endpoints {
            let pod_uid = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.uid.as_deref())
                .filter(|uid| workloads.contains_key(*uid));
            let workload = pod_uid.and_then(|uid| workloads.get(uid));
            let node = endpoint
                .node_name
                .clone()
                .or_else(|| workload.map(|w| w.node.clone()))
                .unwrap_or_default();
            let zone = endpoint
                .zone
                .clone()
                .or_else(|| workload.map(|w| w.zone.clone()))
                .unwrap_or_else(|| zone_of(&node));
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            for address in &endpoint.addresses {
                let Ok(ip) = address.parse::<IpAddr>() else {
                    reject(
                        out,
                        format!("EndpointSlice {slice_key}"),
                        format!(
                            "endpoint address {address:?} is not an IP address; endpoint left out of Service {namespace}/{name}"
                        ),
                    );
                    continue;
                };
                // The same address in two slices (while slices are rebalanced): first wins.
                endpoints
                    .entry(ip.to_string())
                    .or_insert_with(|| api::Endpoint {
                        workload_uid: pod_uid.unwrap_or_default().to_owned(),
                        ip: ip.to_string(),
                        node: node.clone(),
                        zone: zone.clone(),
                        ready,
                    });
            }
        }
    }

    Ok(api::Service {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        vips,
        ports,
        endpoints: endpoints.into_values().collect(),
        waypoint: String::new(),
        prefer_close: prefer_close(spec.and_then(|s| s.traffic_distribution.as_deref())),
    })
}

/// Whether `spec.trafficDistribution` asks for close endpoints. `PreferClose` is the stable
/// value; `PreferSameZone` (its newer name) and `PreferSameNode` ask for at least as much
/// locality, which the agent's node-then-zone order gives. Unknown values mean the default
/// spreading, as Kubernetes specifies for implementations that do not recognise them.
fn prefer_close(traffic_distribution: Option<&str>) -> bool {
    matches!(
        traffic_distribution,
        Some("PreferClose" | "PreferSameZone" | "PreferSameNode")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        controller::objects::{Object, PolicyObject},
        k8s::{GATEWAY_NAME_LABEL, NO_WAYPOINT, USE_WAYPOINT_LABEL, WAYPOINT_CLASS},
    };

    fn settings() -> TranslateSettings {
        TranslateSettings {
            trust_domain: "cluster.local".into(),
            hbone_port: 15008,
        }
    }

    fn apply(objects: &mut ClusterObjects, value: serde_json::Value) {
        let kind = value["kind"].as_str().expect("kind").to_owned();
        let object = match kind.as_str() {
            "Namespace" => Object::Namespace(serde_json::from_value(value).expect("namespace")),
            "Pod" => Object::Pod(serde_json::from_value(value).expect("pod")),
            "Service" => Object::Service(serde_json::from_value(value).expect("service")),
            "EndpointSlice" => {
                Object::EndpointSlice(serde_json::from_value(value).expect("endpointslice"))
            }
            "Node" => Object::Node(serde_json::from_value(value).expect("node")),
            "Gateway" => Object::Gateway(PolicyObject::untyped(&value).expect("gateway")),
            other => match (PolicyKind::from_kind(other), RouteKind::from_kind(other)) {
                (Some(kind), _) => Object::policy(
                    kind,
                    PolicyObject::from_manifest(kind, &value).expect("policy"),
                ),
                (None, Some(kind)) => {
                    Object::Route(kind, PolicyObject::untyped(&value).expect("route"))
                }
                (None, None) => panic!("unexpected kind {other}"),
            },
        };
        objects.apply(object).expect("named");
    }

    fn namespace(name: &str, mesh: Option<&str>) -> serde_json::Value {
        let labels = mesh.map_or(
            serde_json::json!({}),
            |v| serde_json::json!({MESH_LABEL: v}),
        );
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels}})
    }

    fn pod(ns: &str, name: &str, node: Option<&str>, ip: Option<&str>) -> serde_json::Value {
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"),
                         "labels": {"app": name}},
            "spec": {"serviceAccountName": name, "nodeName": node, "containers": []},
            "status": {"phase": "Running", "podIP": ip,
                       "podIPs": ip.map(|ip| vec![serde_json::json!({"ip": ip})])}})
    }

    fn node(name: &str, ip: &str, zone: &str) -> serde_json::Value {
        serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {ZONE_LABEL: zone}},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
    }

    fn workload<'a>(t: &'a Translation, uid: &str) -> Option<&'a api::Workload> {
        match t.resources.get(&workload_key(uid))?.kind.as_ref()? {
            api::resource::Kind::Workload(w) => Some(w),
            _ => None,
        }
    }

    fn base() -> ClusterObjects {
        let mut o = ClusterObjects::default();
        apply(&mut o, namespace("shop", Some("enabled")));
        apply(&mut o, namespace("plain", None));
        apply(&mut o, node("node-a", "192.168.0.1", "z1"));
        apply(&mut o, node("node-b", "fd00::2", "z2"));
        o
    }

    #[test]
    fn membership_decision_table() {
        let mut o = base();
        apply(&mut o, namespace("almost", Some("Enabled")));
        apply(&mut o, namespace("regexy", Some("enab.ed")));
        apply(&mut o, pod("shop", "web", Some("node-a"), Some("10.0.0.1")));
        let mut opted_out = pod("shop", "batch", Some("node-a"), Some("10.0.0.2"));
        opted_out["metadata"]["labels"][MESH_LABEL] = "disabled".into();
        apply(&mut o, opted_out);
        let mut not_quite = pod("shop", "odd", Some("node-a"), Some("10.0.0.3"));
        not_quite["metadata"]["labels"][MESH_LABEL] = "Disabled".into();
        apply(&mut o, not_quite);
        apply(
            &mut o,
            pod("plain", "api", Some("node-b"), Some("10.0.1.1")),
        );
        apply(&mut o, pod("almost", "x", Some("node-b"), Some("10.0.1.2")));
        apply(&mut o, pod("regexy", "y", Some("node-b"), Some("10.0.1.3")));
        apply(
            &mut o,
            pod("nowhere", "z", Some("node-b"), Some("10.0.1.4")),
        );

        let t = translate(&o, &settings());
        let enrolled = |uid: &str| workload(&t, uid).map(|w| w.enrolled);
        assert_eq!(enrolled("uid-shop-web"), Some(true));
        assert_eq!(enrolled("uid-shop-batch"), Some(false), "opted out");
        assert_eq!(
            enrolled("uid-shop-odd"),
            Some(true),
            "label values are exact"
        );
        assert_eq!(
            enrolled("uid-plain-api"),
            Some(false),
            "namespace not labelled"
        );
        assert_eq!(
            enrolled("uid-almost-x"),
            Some(false),
            "label values are exact"
        );
        assert_eq!(enrolled("uid-regexy-y"), Some(false), "no pattern matching");
        assert_eq!(enrolled("uid-nowhere-z"), Some(false), "namespace unknown");
        assert!(t.rejected.is_empty(), "{:?}", t.rejected);

        let web = workload(&t, "uid-shop-web").expect("web");
        assert_eq!(web.zone, "z1");
        assert_eq!(web.node, "node-a");
        assert_eq!(web.service_account, "web");
        assert_eq!(web.ips, vec!["10.0.0.1".to_owned()]);
        assert_eq!(web.labels.get("app").map(String::as_str), Some("web"));

        let ids: Vec<String> = t.identities_by_node["node-a"]
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            ids,
            vec![
                "spiffe://cluster.local/ns/shop/sa/odd".to_owned(),
                "spiffe://cluster.local/ns/shop/sa/web".to_owned()
            ]
        );
        assert!(
            !t.identities_by_node.contains_key("node-b"),
            "no enrolled pods there"
        );
    }

    #[test]
    fn relabelling_enrolls_and_removes_without_touching_the_pod() {
        let mut o = base();
        apply(
            &mut o,
            pod("plain", "api", Some("node-b"), Some("10.0.1.1")),
        );
        let before = translate(&o, &settings());
        assert_eq!(
            workload(&before, "uid-plain-api").map(|w| w.enrolled),
            Some(false)
        );

        apply(&mut o, namespace("plain", Some("enabled")));
        let after = translate(&o, &settings());
        assert_eq!(
            workload(&after, "uid-plain-api").map(|w| w.enrolled),
            Some(true)
        );
        assert!(after.node_may_hold(
            "node-b",
            &Identity::new("cluster.local", "plain", "api").expect("id")
        ));

        let mut opted_out = pod("plain", "api", Some("node-b"), Some("10.0.1.1"));
        opted_out["metadata"]["labels"][MESH_LABEL] = "disabled".into();
        apply(&mut o, opted_out);
        let out = translate(&o, &settings());
        assert_eq!(
            workload(&out, "uid-plain-api").map(|w| w.enrolled),
            Some(false)
        );
        assert!(out.identities_by_node.is_empty());
    }

    #[test]
    fn pending_finished_and_host_network_pods_are_skipped_not_rejected() {
        let mut o = base();
        apply(&mut o, pod("shop", "unscheduled", None, None));
        apply(&mut o, pod("shop", "no-ip-yet", Some("node-a"), None));
        let mut done = pod("shop", "done", Some("node-a"), Some("10.0.0.9"));
        done["status"]["phase"] = "Succeeded".into();
        apply(&mut o, done);
        let mut host = pod("shop", "host", Some("node-a"), Some("192.168.0.1"));
        host["spec"]["hostNetwork"] = true.into();
        apply(&mut o, host);
        let t = translate(&o, &settings());
        assert!(t.rejected.is_empty(), "{:?}", t.rejected);
        assert_eq!(
            t.resources.keys().collect::<Vec<_>>(),
            vec!["node/node-a", "node/node-b"]
        );
    }

    #[test]
    fn a_bad_identity_is_rejected_alone() {
        let mut o = base();
        apply(&mut o, pod("shop", "web", Some("node-a"), Some("10.0.0.1")));
        let mut bad = pod("shop", "bad", Some("node-a"), Some("10.0.0.2"));
        bad["spec"]["serviceAccountName"] = "Not_A_Name".into();
        apply(&mut o, bad);
        let mut bad_ip = pod("shop", "badip", Some("node-a"), Some("10.0.0.300"));
        bad_ip["metadata"]["uid"] = "uid-badip".into();
        apply(&mut o, bad_ip);
        let mut no_uid = pod("shop", "nouid", Some("node-a"), Some("10.0.0.4"));
        no_uid["metadata"]["uid"] = serde_json::Value::Null;
        apply(&mut o, no_uid);

        let t = translate(&o, &settings());
        assert!(workload(&t, "uid-shop-web").is_some());
        assert!(workload(&t, "uid-shop-bad").is_none());
        let rejected: BTreeMap<_, _> = t.rejected.iter().cloned().collect();
        assert_eq!(rejected.len(), 3, "{rejected:?}");
        assert!(
            rejected["Pod shop/bad"].contains("Not_A_Name"),
            "{rejected:?}"
        );
        assert!(
            rejected["Pod shop/badip"].contains("10.0.0.300"),
            "{rejected:?}"
        );
        assert!(
            rejected["Pod shop/nouid"].contains("metadata.uid"),
            "{rejected:?}"
        );
    }

    #[test]
    fn dots_in_service_accounts_are_literal() {
        let mut o = base();
        let mut dotted = pod("shop", "web", Some("node-a"), Some("10.0.0.1"));
        dotted["spec"]["serviceAccountName"] = "web.v2".into();
        apply(&mut o, dotted);
        let t = translate(&o, &settings());
        let td = "cluster.local";
        assert!(t.node_may_hold("node-a", &Identity::new(td, "shop", "web.v2").expect("id")));
        assert!(!t.node_may_hold("node-a", &Identity::new(td, "shop", "webxv2").expect("id")));
        assert!(!t.node_may_hold("node-a", &Identity::new(td, "shop", "web").expect("id")));
        assert!(!t.node_may_hold("node-b", &Identity::new(td, "shop", "web.v2").expect("id")));
    }

    #[test]
    fn a_reused_ip_belongs_to_the_newer_pod() {
        let mut o = base();
        let mut old = pod("shop", "old", Some("node-a"), Some("10.0.0.1"));
        old["metadata"]["creationTimestamp"] = "2024-01-01T00:00:00Z".into();
        apply(&mut o, old);
        let mut new = pod("shop", "new", Some("node-a"), Some("10.0.0.1"));
        new["metadata"]["creationTimestamp"] = "2024-01-02T00:00:00Z".into();
        apply(&mut o, new);
        let t = translate(&o, &settings());
        assert!(workload(&t, "uid-shop-new").is_some());
        assert!(workload(&t, "uid-shop-old").is_none());
        assert_eq!(t.rejected.len(), 1);
        assert_eq!(t.rejected[0].0, "Pod shop/old");
        let ids = &t.identities_by_node["node-a"];
        assert!(!ids.contains(&Identity::new("cluster.local", "shop", "old").expect("id")));
    }

    #[test]
    fn nodes_get_their_internal_ip_and_hbone_port() {
        let mut o = base();
        apply(
            &mut o,
            serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "bare"},
                "status": {"addresses": [{"type": "Hostname", "address": "bare"}]}}),
        );
        let t = translate(&o, &settings());
        let hbone = |name: &str| match t
            .resources
            .get(&node_key(name))
            .and_then(|r| r.kind.clone())
        {
            Some(api::resource::Kind::Node(n)) => Some((n.hbone, n.zone)),
            _ => None,
        };
        assert_eq!(
            hbone("node-a"),
            Some(("192.168.0.1:15008".into(), "z1".into()))
        );
        assert_eq!(
            hbone("node-b"),
            Some(("[fd00::2]:15008".into(), "z2".into()))
        );
        assert_eq!(hbone("bare"), None);
        assert_eq!(t.rejected.len(), 1);
        assert!(t.rejected[0].1.contains("InternalIP"));
    }

    #[test]
    fn services_join_endpoint_slices_and_pods() {
        let mut o = base();
        apply(
            &mut o,
            pod("shop", "web-1", Some("node-a"), Some("10.0.0.1")),
        );
        apply(
            &mut o,
            pod("shop", "web-2", Some("node-b"), Some("10.0.1.1")),
        );
        apply(
            &mut o,
            serde_json::json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                         "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                                   {"name": "metrics", "port": 9090, "targetPort": 9091},
                                   {"name": "admin", "port": 8000}]}}),
        );
        apply(
            &mut o,
            serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "web-abc", "namespace": "shop",
                             "labels": {SERVICE_NAME_LABEL: "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [
                    {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "nodeName": "node-a",
                     "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop", "uid": "uid-shop-web-1"}},
                    {"addresses": ["10.0.1.1"], "conditions": {"ready": false},
                     "targetRef": {"kind": "Pod", "name": "web-2", "namespace": "shop", "uid": "uid-shop-web-2"}},
                    {"addresses": ["10.0.9.9"], "zone": "z9"},
                    {"addresses": ["not-an-ip"]}]}),
        );
        // A slice of another service, and one without the label: neither joins.
        apply(
            &mut o,
            serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "other-x", "namespace": "shop",
                             "labels": {SERVICE_NAME_LABEL: "other"}},
                "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.5.5"]}]}),
        );
        apply(
            &mut o,
            serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "orphan", "namespace": "shop"},
                "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.6.6"]}]}),
        );

        let t = translate(&o, &settings());
        let Some(api::resource::Kind::Service(svc)) = t
            .resources
            .get(&service_key("shop", "web"))
            .and_then(|r| r.kind.clone())
        else {
            panic!("service missing: {:?}", t.resources.keys());
        };
        assert_eq!(
            svc.vips,
            vec!["10.96.0.10".to_owned(), "fd00:96::10".to_owned()]
        );
        let ports: Vec<_> = svc
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.target_port))
            .collect();
        assert_eq!(
            ports,
            vec![
                ("http", 80, 8080),
                ("metrics", 9090, 9091),
                ("admin", 8000, 8000)
            ]
        );
        assert!(svc.ports.iter().all(|p| p.protocol == "TCP"));
        let eps: Vec<_> = svc
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.ip.as_str(),
                    e.workload_uid.as_str(),
                    e.node.as_str(),
                    e.zone.as_str(),
                    e.ready,
                )
            })
            .collect();
        assert_eq!(
            eps,
            vec![
                ("10.0.0.1", "uid-shop-web-1", "node-a", "z1", true),
                ("10.0.1.1", "uid-shop-web-2", "node-b", "z2", false),
                ("10.0.9.9", "", "", "z9", true),
            ]
        );
        assert_eq!(t.rejected.len(), 1, "{:?}", t.rejected);
        assert_eq!(t.rejected[0].0, "EndpointSlice shop/web-abc");
        assert!(t.rejected[0].1.contains("not-an-ip"));
        assert!(!svc.prefer_close, "no trafficDistribution: spread");
    }

    #[test]
    fn traffic_distribution_asks_for_close_endpoints() {
        let prefer_close = |distribution: Option<&str>| {
            let mut o = base();
            let mut svc = serde_json::json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}});
            if let Some(d) = distribution {
                svc["spec"]["trafficDistribution"] = d.into();
            }
            // Through the store, so stripping must keep the field.
            apply(&mut o, svc);
            match translate(&o, &settings())
                .resources
                .get(&service_key("shop", "web"))
                .and_then(|r| r.kind.clone())
            {
                Some(api::resource::Kind::Service(s)) => s.prefer_close,
                other => panic!("service missing: {other:?}"),
            }
        };
        assert!(prefer_close(Some("PreferClose")));
        assert!(prefer_close(Some("PreferSameZone")));
        assert!(prefer_close(Some("PreferSameNode")));
        assert!(!prefer_close(None));
        assert!(!prefer_close(Some("preferclose")), "values are exact");
        assert!(!prefer_close(Some("SomethingNew")));
    }

    #[test]
    fn output_is_deterministic() {
        let mut o = base();
        for i in 0..20 {
            apply(
                &mut o,
                pod(
                    "shop",
                    &format!("p{i}"),
                    Some("node-a"),
                    Some(&format!("10.0.0.{i}")),
                ),
            );
        }
        let a = translate(&o, &settings());
        let b = translate(&o.clone(), &settings());
        assert_eq!(a, b);
    }

    #[test]
    fn policies_are_sent_as_written_and_report_what_the_agents_enforce() {
        let mut objects = base();
        let policy = |name: &str, spec: serde_json::Value| {
            serde_json::json!({"apiVersion": "security.trellis.dev/v1", "kind": "AuthorizationPolicy",
                "metadata": {"namespace": "shop", "name": name, "generation": 7}, "spec": spec})
        };
        apply(
            &mut objects,
            policy(
                "deny-ssh",
                serde_json::json!({"action": "DENY",
                "rules": [{"to": [{"operation": {"ports": ["22"]}}]}]}),
            ),
        );
        // `rules` is not a list: the agents enforce the strictest stand-in, and say so.
        apply(
            &mut objects,
            policy("broken", serde_json::json!({"rules": 3})),
        );
        let t = translate(&objects, &settings());

        let key = policy_key(PolicyKind::Authorization, "shop", "deny-ssh");
        let Some(api::resource::Kind::Policy(sent)) = t.resources[&key].kind.clone() else {
            panic!("{key} is a policy resource");
        };
        assert_eq!(sent.kind, "AuthorizationPolicy");
        assert_eq!(sent.generation, 7);
        let spec: serde_json::Value = serde_json::from_str(&sent.spec_json).expect("json");
        assert_eq!(spec["rules"][0]["to"][0]["operation"]["ports"][0], "22");

        let status = |name: &str| {
            t.policy_status[&(
                PolicyKind::Authorization,
                PolicyId {
                    namespace: "shop".into(),
                    name: name.into(),
                },
            )]
                .clone()
        };
        assert_eq!(status("deny-ssh").status, "True");
        assert_eq!(status("deny-ssh").observed_generation, Some(7));
        let broken = status("broken");
        assert_eq!(
            (broken.status.as_str(), broken.reason.as_str()),
            ("False", "Invalid")
        );
        assert!(
            broken.message.contains("spec: cannot be read"),
            "{}",
            broken.message
        );
        assert!(
            t.resources
                .contains_key(&policy_key(PolicyKind::Authorization, "shop", "broken")),
            "a broken policy still reaches the agents, as its stand-in"
        );
    }

    #[test]
    fn request_authentications_are_sent_as_written_with_their_status() {
        let mut objects = base();
        let request_authentication = |name: &str, spec: serde_json::Value| {
            serde_json::json!({"apiVersion": "security.trellis.dev/v1",
                "kind": "RequestAuthentication",
                "metadata": {"namespace": "shop", "name": name, "generation": 2}, "spec": spec})
        };
        let at_waypoint = serde_json::json!({
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                            "name": "waypoint"}],
            "jwtRules": [{"issuer": "https://issuer.example",
                          "jwksUri": "https://issuer.example/keys"}]});
        apply(
            &mut objects,
            request_authentication("at-waypoint", at_waypoint),
        );
        // Bound to workloads, whose nodes never see a request: accepted, but it does nothing.
        apply(
            &mut objects,
            request_authentication(
                "on-pods",
                serde_json::json!({"selector": {"matchLabels": {"app": "web"}},
                    "jwtRules": [{"issuer": "https://issuer.example",
                                  "jwksUri": "https://issuer.example/keys"}]}),
            ),
        );
        let t = translate(&objects, &settings());

        let key = policy_key(PolicyKind::RequestAuthentication, "shop", "at-waypoint");
        assert_eq!(key, "policy/RequestAuthentication/shop/at-waypoint");
        let Some(api::resource::Kind::Policy(sent)) = t.resources[&key].kind.clone() else {
            panic!("{key} is a policy resource");
        };
        assert_eq!(sent.kind, "RequestAuthentication");
        assert_eq!(sent.generation, 2);
        let spec: serde_json::Value = serde_json::from_str(&sent.spec_json).expect("json");
        assert_eq!(spec["jwtRules"][0]["issuer"], "https://issuer.example");
        assert!(
            for_role(&key, Role::Agent) && for_role(&key, Role::Waypoint),
            "agents ignore the kind themselves; the policy path is the same for both"
        );

        let status = |name: &str| {
            t.policy_status[&(
                PolicyKind::RequestAuthentication,
                PolicyId {
                    namespace: "shop".into(),
                    name: name.into(),
                },
            )]
                .clone()
        };
        let accepted = status("at-waypoint");
        assert_eq!(
            (accepted.status.as_str(), accepted.observed_generation),
            ("True", Some(2)),
            "{accepted:?}"
        );
        let on_pods = status("on-pods");
        assert_eq!(
            (on_pods.status.as_str(), on_pods.reason.as_str()),
            ("False", "NoEffect"),
            "{on_pods:?}"
        );
    }

    #[test]
    fn traffic_policies_report_what_the_waypoints_apply() {
        let mut o = base();
        let policy = |name: &str, spec: serde_json::Value| {
            serde_json::json!({"apiVersion": "traffic.trellis.dev/v1", "kind": "TrafficPolicy",
                "metadata": {"namespace": "shop", "name": name, "generation": 5}, "spec": spec})
        };
        let service = |name: &str| serde_json::json!({"kind": "Service", "name": name});
        apply(
            &mut o,
            policy(
                "a-retries",
                serde_json::json!({"targetRefs": [service("reviews")],
                    "retries": {"attempts": 2}}),
            ),
        );
        // Later in name order and also on `reviews`: applied to `ratings` only.
        apply(
            &mut o,
            policy(
                "b-limits",
                serde_json::json!({"targetRefs": [service("reviews"), service("ratings")],
                    "rateLimit": {"requestsPerSecond": 10}}),
            ),
        );
        // Rejected, so it takes no Service from anyone.
        apply(
            &mut o,
            policy(
                "c-typo",
                serde_json::json!({"targetRefs": [service("ratings")],
                    "retries": {"attempts": 2, "perTryTimout": "1s"}}),
            ),
        );
        let t = translate(&o, &settings());
        let status = |name: &str| {
            t.traffic_policy_status[&PolicyId {
                namespace: "shop".into(),
                name: name.into(),
            }]
                .clone()
        };

        let a = status("a-retries");
        assert_eq!(
            (a.status.as_str(), a.reason.as_str(), a.observed_generation),
            ("True", "Accepted", Some(5))
        );
        let b = status("b-limits");
        assert_eq!(
            (b.status.as_str(), b.reason.as_str()),
            ("False", "Conflicted")
        );
        assert!(
            b.message.contains("reviews (taken by a-retries)")
                && b.message.contains("applied to its other targets"),
            "{}",
            b.message
        );
        let c = status("c-typo");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "Unsupported")
        );
        assert!(
            c.message.contains("spec.retries.perTryTimout"),
            "{}",
            c.message
        );
        assert!(
            t.resources
                .contains_key(&route_key(RouteKind::TrafficPolicy, "shop", "c-typo")),
            "a rejected policy is still carried as written; the waypoints ignore it the same way"
        );
        assert!(t.policy_status.is_empty(), "not a security policy");
    }

    fn gateway(ns: &str, name: &str, class: &str) -> serde_json::Value {
        serde_json::json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"gatewayClassName": class,
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})
    }

    /// A running pod of waypoint `waypoint` (label only; the Gateway is separate).
    fn waypoint_pod(
        ns: &str,
        name: &str,
        waypoint: &str,
        account: &str,
        node: &str,
        ip: &str,
    ) -> serde_json::Value {
        let mut p = pod(ns, name, Some(node), Some(ip));
        p["metadata"]["labels"][GATEWAY_NAME_LABEL] = waypoint.into();
        p["spec"]["serviceAccountName"] = account.into();
        p
    }

    fn service(ns: &str, name: &str, labels: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}})
    }

    fn waypoint_of(t: &Translation, ns: &str, name: &str) -> Option<api::Waypoint> {
        match t.resources.get(&waypoint_key(ns, name))?.kind.clone()? {
            api::resource::Kind::Waypoint(w) => Some(w),
            _ => None,
        }
    }

    fn service_waypoint(t: &Translation, ns: &str, name: &str) -> Option<String> {
        match t.resources.get(&service_key(ns, name))?.kind.clone()? {
            api::resource::Kind::Service(s) => Some(s.waypoint),
            _ => None,
        }
    }

    fn rejections(t: &Translation) -> BTreeMap<String, String> {
        t.rejected.iter().cloned().collect()
    }

    #[test]
    fn waypoints_are_gateways_of_their_class_served_by_their_running_pods() {
        let mut o = base();
        apply(&mut o, gateway("shop", "waypoint", WAYPOINT_CLASS));
        apply(&mut o, gateway("shop", "idle", WAYPOINT_CLASS));
        apply(&mut o, gateway("shop", "ingress", "some-other-class"));
        apply(&mut o, gateway("shop", "almost", "Trellis-Waypoint"));
        for (name, account, node, ip) in [
            ("wp-1", "waypoint", "node-a", "10.0.0.10"),
            ("wp-2", "waypoint", "node-b", "10.0.1.10"),
            ("wp-odd", "intruder", "node-b", "10.0.1.11"),
        ] {
            apply(
                &mut o,
                waypoint_pod("shop", name, "waypoint", account, node, ip),
            );
        }
        let mut pending = waypoint_pod(
            "shop",
            "wp-new",
            "waypoint",
            "waypoint",
            "node-a",
            "10.0.0.11",
        );
        pending["status"]["phase"] = "Pending".into();
        apply(&mut o, pending);
        let mut draining = waypoint_pod(
            "shop",
            "wp-old",
            "waypoint",
            "waypoint",
            "node-a",
            "10.0.0.12",
        );
        draining["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z".into();
        apply(&mut o, draining);
        // Pods of a Gateway of another class, and pods naming a Gateway of another namespace,
        // are ordinary workloads.
        apply(
            &mut o,
            waypoint_pod(
                "shop",
                "ingress-1",
                "ingress",
                "ingress",
                "node-a",
                "10.0.0.20",
            ),
        );
        apply(&mut o, namespace("other", Some("enabled")));
        apply(
            &mut o,
            waypoint_pod(
                "other",
                "stray",
                "waypoint",
                "waypoint",
                "node-a",
                "10.0.0.30",
            ),
        );

        let t = translate(&o, &settings());
        let wp = waypoint_of(&t, "shop", "waypoint").expect("published");
        assert_eq!(
            (wp.namespace.as_str(), wp.name.as_str()),
            ("shop", "waypoint")
        );
        assert_eq!(wp.service_account, "waypoint", "the most common account");
        assert_eq!(wp.port, 15008);
        let endpoints: Vec<_> = wp
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.ip.as_str(),
                    e.workload_uid.as_str(),
                    e.node.as_str(),
                    e.zone.as_str(),
                    e.ready,
                )
            })
            .collect();
        assert_eq!(
            endpoints,
            vec![
                ("10.0.0.10", "uid-shop-wp-1", "node-a", "z1", true),
                ("10.0.0.12", "uid-shop-wp-old", "node-a", "z1", false),
                ("10.0.1.10", "uid-shop-wp-2", "node-b", "z2", true),
            ],
            "running pods only; a draining one takes no new connections"
        );
        let idle = waypoint_of(&t, "shop", "idle").expect("a waypoint without pods still exists");
        assert!(idle.endpoints.is_empty());
        assert_eq!(idle.service_account, "");
        assert!(waypoint_of(&t, "shop", "ingress").is_none(), "other class");
        assert!(
            waypoint_of(&t, "shop", "almost").is_none(),
            "class names are exact"
        );

        // Waypoint pods are workloads, never enrolled; the others are.
        let enrolled = |uid: &str| workload(&t, uid).map(|w| w.enrolled);
        for uid in [
            "uid-shop-wp-1",
            "uid-shop-wp-2",
            "uid-shop-wp-odd",
            "uid-shop-wp-new",
        ] {
            assert_eq!(enrolled(uid), Some(false), "{uid}");
        }
        assert_eq!(enrolled("uid-shop-ingress-1"), Some(true));
        assert_eq!(enrolled("uid-other-stray"), Some(true));

        // The waypoint's identity is its own: no agent may hold it.
        assert_eq!(
            t.waypoint_accounts,
            BTreeSet::from([("shop".to_owned(), "waypoint".to_owned())])
        );
        let id = Identity::new("cluster.local", "shop", "waypoint").expect("id");
        assert!(!t.node_may_hold("node-a", &id));
        assert!(!t.node_may_hold("node-b", &id));
        assert!(
            !t.is_waypoint_account("shop", "intruder"),
            "the minority account is not the waypoint's"
        );
        // The other namespace's pod runs as "waypoint" too, but that is another identity.
        assert!(t.node_may_hold(
            "node-a",
            &Identity::new("cluster.local", "other", "waypoint").expect("id")
        ));

        let rejected = rejections(&t);
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        let odd = &rejected["Pod shop/wp-odd"];
        assert!(
            odd.contains("waypoint shop/waypoint")
                && odd.contains("intruder")
                && odd.contains("run as waypoint"),
            "{odd}"
        );
    }

    #[test]
    fn a_tie_between_accounts_is_decided_by_name_not_by_order() {
        let mut o = base();
        apply(&mut o, gateway("shop", "waypoint", WAYPOINT_CLASS));
        apply(
            &mut o,
            waypoint_pod("shop", "a", "waypoint", "zeta", "node-a", "10.0.0.1"),
        );
        apply(
            &mut o,
            waypoint_pod("shop", "b", "waypoint", "alpha", "node-a", "10.0.0.2"),
        );
        let t = translate(&o, &settings());
        let wp = waypoint_of(&t, "shop", "waypoint").expect("published");
        assert_eq!(wp.service_account, "alpha");
        assert_eq!(wp.endpoints.len(), 1);
        assert!(rejections(&t).contains_key("Pod shop/a"));
    }

    #[test]
    fn an_enrolled_pod_sharing_a_waypoints_account_gets_no_identity() {
        let mut o = base();
        apply(&mut o, gateway("shop", "waypoint", WAYPOINT_CLASS));
        apply(
            &mut o,
            waypoint_pod("shop", "wp", "waypoint", "shared", "node-a", "10.0.0.1"),
        );
        let mut app = pod("shop", "app", Some("node-b"), Some("10.0.1.1"));
        app["spec"]["serviceAccountName"] = "shared".into();
        apply(&mut o, app);
        let t = translate(&o, &settings());
        assert_eq!(
            workload(&t, "uid-shop-app").map(|w| w.enrolled),
            Some(true),
            "still a workload"
        );
        let id = Identity::new("cluster.local", "shop", "shared").expect("id");
        assert!(!t.node_may_hold("node-b", &id));
        assert!(
            t.identities_by_node.values().all(|ids| !ids.contains(&id)),
            "{:?}",
            t.identities_by_node
        );
        let rejected = rejections(&t);
        assert!(
            rejected["Pod shop/app"].contains("waypoint's"),
            "{rejected:?}"
        );
    }

    #[test]
    fn use_waypoint_labels_on_namespaces_services_and_pods() {
        let mut o = base();
        let mut shop = namespace("shop", Some("enabled"));
        shop["metadata"]["labels"][USE_WAYPOINT_LABEL] = "waypoint".into();
        apply(&mut o, shop);
        apply(&mut o, gateway("shop", "waypoint", WAYPOINT_CLASS));
        apply(&mut o, gateway("shop", "special", WAYPOINT_CLASS));
        apply(
            &mut o,
            waypoint_pod("shop", "wp", "waypoint", "waypoint", "node-a", "10.0.0.100"),
        );
        let labelled = |name: &str, ip: &str, key: &str, value: &str| {
            let mut p = pod("shop", name, Some("node-a"), Some(ip));
            p["metadata"]["labels"][key] = value.into();
            p
        };
        apply(&mut o, pod("shop", "web", Some("node-a"), Some("10.0.0.1")));
        apply(
            &mut o,
            labelled("api", "10.0.0.2", USE_WAYPOINT_LABEL, "special"),
        );
        apply(
            &mut o,
            labelled("batch", "10.0.0.3", USE_WAYPOINT_LABEL, NO_WAYPOINT),
        );
        apply(
            &mut o,
            labelled("ghost", "10.0.0.4", USE_WAYPOINT_LABEL, "nope"),
        );
        apply(
            &mut o,
            labelled("legacy", "10.0.0.5", MESH_LABEL, MESH_DISABLED),
        );

        apply(&mut o, service("shop", "web", serde_json::json!({})));
        apply(
            &mut o,
            service(
                "shop",
                "api",
                serde_json::json!({USE_WAYPOINT_LABEL: "special"}),
            ),
        );
        apply(
            &mut o,
            service(
                "shop",
                "batch",
                serde_json::json!({USE_WAYPOINT_LABEL: NO_WAYPOINT}),
            ),
        );
        apply(
            &mut o,
            service(
                "shop",
                "ghost",
                serde_json::json!({USE_WAYPOINT_LABEL: "nope"}),
            ),
        );
        apply(
            &mut o,
            service(
                "shop",
                "waypoint",
                serde_json::json!({GATEWAY_NAME_LABEL: "waypoint"}),
            ),
        );

        // Not in the mesh: the label means nothing there.
        let mut plain = namespace("plain", None);
        plain["metadata"]["labels"][USE_WAYPOINT_LABEL] = "waypoint".into();
        apply(&mut o, plain);
        apply(&mut o, gateway("plain", "waypoint", WAYPOINT_CLASS));
        apply(
            &mut o,
            pod("plain", "api", Some("node-b"), Some("10.0.1.1")),
        );
        apply(&mut o, service("plain", "api", serde_json::json!({})));

        // In the mesh, its label naming a waypoint that does not exist.
        let mut typo = namespace("typo", Some("enabled"));
        typo["metadata"]["labels"][USE_WAYPOINT_LABEL] = "waypiont".into();
        apply(&mut o, typo);
        apply(&mut o, pod("typo", "a", Some("node-b"), Some("10.0.1.2")));
        apply(&mut o, pod("typo", "b", Some("node-b"), Some("10.0.1.3")));
        apply(&mut o, service("typo", "a", serde_json::json!({})));

        let t = translate(&o, &settings());
        let of_pod = |uid: &str| workload(&t, uid).map(|w| w.waypoint.clone());
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            of_pod("uid-shop-web"),
            some("shop/waypoint"),
            "from the namespace"
        );
        assert_eq!(
            of_pod("uid-shop-api"),
            some("shop/special"),
            "its own label first"
        );
        assert_eq!(of_pod("uid-shop-batch"), some(""), "opted out");
        assert_eq!(of_pod("uid-shop-ghost"), some(""), "missing: direct");
        assert_eq!(of_pod("uid-shop-legacy"), some(""), "not enrolled");
        assert_eq!(of_pod("uid-shop-wp"), some(""), "a waypoint never uses one");
        assert_eq!(
            of_pod("uid-plain-api"),
            some(""),
            "namespace not in the mesh"
        );
        assert_eq!(of_pod("uid-typo-a"), some(""));

        let of_service = |ns: &str, name: &str| service_waypoint(&t, ns, name);
        assert_eq!(of_service("shop", "web"), some("shop/waypoint"));
        assert_eq!(of_service("shop", "api"), some("shop/special"));
        assert_eq!(of_service("shop", "batch"), some(""));
        assert_eq!(of_service("shop", "ghost"), some(""));
        assert_eq!(
            of_service("shop", "waypoint"),
            some(""),
            "the waypoint's own Service"
        );
        assert_eq!(of_service("plain", "api"), some(""));
        assert_eq!(of_service("typo", "a"), some(""));

        let rejected = rejections(&t);
        assert_eq!(
            rejected.keys().map(String::as_str).collect::<Vec<_>>(),
            vec!["Namespace typo", "Pod shop/ghost", "Service shop/ghost"],
            "each label naming a missing waypoint once, on the object carrying it"
        );
        assert!(
            rejected["Pod shop/ghost"].starts_with("waypoint shop/nope does not exist"),
            "{rejected:?}"
        );
        assert!(
            rejected["Namespace typo"].starts_with("waypoint typo/waypiont does not exist"),
            "{rejected:?}"
        );
    }

    #[test]
    fn routes_are_carried_as_written_for_waypoints_only() {
        let mut o = base();
        let spec = serde_json::json!({
            "parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}],
            "rules": [{"backendRefs": [{"name": "web", "port": 80}], "someFutureField": true}]});
        for (kind, api_version) in [
            ("HTTPRoute", "gateway.networking.k8s.io/v1"),
            ("GRPCRoute", "gateway.networking.k8s.io/v1"),
            ("TrafficPolicy", "traffic.trellis.dev/v1"),
        ] {
            apply(
                &mut o,
                serde_json::json!({"apiVersion": api_version, "kind": kind,
                    "metadata": {"name": "web", "namespace": "shop", "generation": 3},
                    "spec": spec}),
            );
        }
        let t = translate(&o, &settings());
        for kind in RouteKind::ALL {
            let key = route_key(kind, "shop", "web");
            assert_eq!(key, format!("route/{}/shop/web", kind.as_str()));
            let Some(api::resource::Kind::Policy(route)) =
                t.resources.get(&key).and_then(|r| r.kind.clone())
            else {
                panic!("{key} missing: {:?}", t.resources.keys());
            };
            assert_eq!(route.kind, kind.as_str());
            assert_eq!(
                (route.namespace.as_str(), route.name.as_str()),
                ("shop", "web")
            );
            assert_eq!(route.generation, 3);
            let sent: serde_json::Value = serde_json::from_str(&route.spec_json).expect("json");
            assert_eq!(sent, spec, "as written, unknown fields included");
            assert!(for_role(&key, Role::Waypoint));
            assert!(!for_role(&key, Role::Agent));
        }
        assert!(
            t.policy_status.is_empty(),
            "routing objects are not policies"
        );
        assert!(for_role("waypoint/shop/waypoint", Role::Agent));
        assert!(for_role("workload/u", Role::Agent));
    }
}
