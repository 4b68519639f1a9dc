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

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::{
    api::{core::v1::Pod, discovery::v1::EndpointSlice},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::objects::{ClusterObjects, SERVICE_NAME_LABEL, ZONE_LABEL};
use crate::{
    api::v1 as api,
    identity::Identity,
    policy::{Policy, PolicyId, PolicyKind, status::Condition},
};

/// Namespace label that enrolls a namespace's pods, and pod label that opts one out.
pub const MESH_LABEL: &str = "trellis.dev/mesh";
pub const MESH_ENABLED: &str = "enabled";
pub const MESH_DISABLED: &str = "disabled";

/// Everything the translation needs besides the objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranslateSettings {
    pub trust_domain: String,
    /// Port of every node agent's HBONE listener.
    pub hbone_port: u16,
}

/// The mesh state derived from the cluster's objects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Translation {
    /// By key: `workload/<uid>`, `service/<ns>/<name>`, `node/<name>`.
    pub resources: BTreeMap<String, api::Resource>,
    /// Objects left out, each with the reason: `("Pod shop/web-1", "...")`.
    pub rejected: Vec<(String, String)>,
    /// The identities of enrolled pods, by the node they are scheduled on: what each node's
    /// agent may obtain certificates for.
    pub identities_by_node: BTreeMap<String, BTreeSet<Identity>>,
    /// The `Accepted` condition of every policy, as the agents will enforce it.
    pub policy_status: BTreeMap<(PolicyKind, PolicyId), Condition>,
}

impl Translation {
    /// Whether `node` runs at least one enrolled pod with `identity`.
    pub fn node_may_hold(&self, node: &str, identity: &Identity) -> bool {
        self.identities_by_node
            .get(node)
            .is_some_and(|ids| ids.contains(identity))
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

    translate_nodes(objects, settings, &zone_of, &mut out);
    let workloads = translate_pods(objects, settings, &zone_of, &mut out);
    translate_services(objects, &workloads, &zone_of, &mut out);
    translate_policies(objects, &mut out);
    out
}

/// Policies are sent as written (see `policy::stored`); converting them here only yields the
/// status each object reports, which is exactly what every agent will enforce.
fn translate_policies(objects: &ClusterObjects, out: &mut Translation) {
    for kind in [PolicyKind::Authorization, PolicyKind::PeerAuthentication] {
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

/// Translates pods; returns the translated workloads by pod uid.
fn translate_pods(
    objects: &ClusterObjects,
    settings: &TranslateSettings,
    zone_of: &dyn Fn(&str) -> String,
    out: &mut Translation,
) -> HashMap<String, WorkloadRef> {
    let mut candidates: Vec<(&Pod, api::Workload, Identity)> = Vec::new();
    for (key, pod) in &objects.pods {
        let object = format!("Pod {key}");
        match workload_of(objects, settings, pod, zone_of) {
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

    let mut workloads = HashMap::new();
    for (i, (_, workload, identity)) in candidates.iter().enumerate() {
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
        if workload.enrolled {
            out.identities_by_node
                .entry(workload.node.clone())
                .or_default()
                .insert(identity.clone());
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
/// `Err(reason)` when it should be and cannot.
fn workload_of(
    objects: &ClusterObjects,
    settings: &TranslateSettings,
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
    let namespace_enabled = objects
        .namespaces
        .get(namespace)
        .and_then(|ns| ns.metadata.labels.as_ref())
        .and_then(|l| l.get(MESH_LABEL))
        .is_some_and(|v| v == MESH_ENABLED);
    let opted_out = labels.get(MESH_LABEL).is_some_and(|v| v == MESH_DISABLED);

    let workload = api::Workload {
        uid: uid.to_owned(),
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        node: node.to_owned(),
        ips,
        labels: labels.into_iter().collect(),
        enrolled: namespace_enabled && !opted_out,
        zone: zone_of(node),
    };
    Ok(Some((workload, identity)))
}

fn translate_services(
    objects: &ClusterObjects,
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
            Ok(resource) => {
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
    use crate::controller::objects::Object;

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
            "AuthorizationPolicy" => Object::AuthorizationPolicy(
                crate::controller::objects::PolicyObject::from_manifest(
                    PolicyKind::Authorization,
                    &value,
                )
                .expect("policy"),
            ),
            other => panic!("unexpected kind {other}"),
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
}
