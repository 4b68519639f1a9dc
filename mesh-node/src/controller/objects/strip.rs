//! Stripping: every object is cut down to the fields the translation reads before it is
//! stored (see the module docs of [`super`]).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{
            Namespace, Node, NodeAddress, NodeStatus, Pod, PodSpec, PodStatus, Service, ServiceSpec,
        },
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};

use super::{Object, PolicyObject};
use crate::k8s::ZONE_LABEL;

impl Object {
    /// Drops every field the translation does not read (see the module docs).
    #[must_use]
    pub fn stripped(self) -> Self {
        match self {
            Object::Namespace(ns) => Object::Namespace(Namespace {
                metadata: strip_meta(ns.metadata, false),
                ..Namespace::default()
            }),
            Object::Pod(pod) => Object::Pod(strip_pod(pod)),
            Object::Service(svc) => Object::Service(strip_service(svc)),
            Object::EndpointSlice(slice) => Object::EndpointSlice(EndpointSlice {
                metadata: strip_meta(slice.metadata, false),
                address_type: slice.address_type,
                endpoints: slice
                    .endpoints
                    .into_iter()
                    .map(|mut e| {
                        e.hints = None;
                        e.deprecated_topology = None;
                        e.hostname = None;
                        if let Some(r) = e.target_ref.as_mut() {
                            r.resource_version = None;
                            r.field_path = None;
                            r.api_version = None;
                        }
                        e
                    })
                    .collect(),
                ports: slice.ports,
            }),
            Object::Node(node) => Object::Node(strip_node(node)),
            Object::Policy(group, kind, p) => Object::Policy(group, kind, strip_policy(p)),
            Object::Gateway(g) => Object::Gateway(strip_policy(g)),
            Object::Route(kind, r) => Object::Route(kind, strip_policy(r)),
        }
    }
}

/// Keeps identity, labels and (for pods) the timestamps that order a reused IP's owners.
fn strip_meta(meta: ObjectMeta, keep_times: bool) -> ObjectMeta {
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        labels: meta.labels.filter(|l| !l.is_empty()),
        creation_timestamp: meta.creation_timestamp.filter(|_| keep_times),
        deletion_timestamp: meta.deletion_timestamp.filter(|_| keep_times),
        ..ObjectMeta::default()
    }
}

/// Policies keep their whole spec (every field matters, unknown ones most of all) and the
/// generation their status condition reports on. Gateways and routes are stripped the same way:
/// routes are read by the waypoints, whole; Gateway specs are small.
fn strip_policy(policy: PolicyObject) -> PolicyObject {
    let generation = policy.metadata.generation;
    let mut metadata = strip_meta(policy.metadata, false);
    metadata.generation = generation;
    PolicyObject {
        metadata,
        spec: policy.spec,
    }
}

fn strip_pod(pod: Pod) -> Pod {
    let spec = pod.spec.unwrap_or_default();
    let status = pod.status.unwrap_or_default();
    // The controlling owner names the pod's workload in telemetry; the other references, and
    // every other field of that one, are never read.
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
        .map(|r| OwnerReference {
            kind: r.kind.clone(),
            name: r.name.clone(),
            controller: Some(true),
            ..OwnerReference::default()
        });
    let mut metadata = strip_meta(pod.metadata, true);
    metadata.owner_references = owner.map(|o| vec![o]);
    Pod {
        metadata,
        spec: Some(PodSpec {
            service_account_name: spec.service_account_name,
            node_name: spec.node_name,
            host_network: spec.host_network,
            // Required by the type; the mesh never looks at containers.
            containers: Vec::new(),
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            ..PodStatus::default()
        }),
    }
}

fn strip_service(svc: Service) -> Service {
    let spec = svc.spec.unwrap_or_default();
    Service {
        metadata: strip_meta(svc.metadata, false),
        spec: Some(ServiceSpec {
            type_: spec.type_,
            cluster_ip: spec.cluster_ip,
            cluster_ips: spec.cluster_ips,
            traffic_distribution: spec.traffic_distribution,
            ports: spec.ports.map(|ports| {
                ports
                    .into_iter()
                    .map(|mut p| {
                        p.node_port = None;
                        p
                    })
                    .collect()
            }),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn strip_node(node: Node) -> Node {
    let mut metadata = strip_meta(node.metadata, false);
    // Nodes carry dozens of labels; only the zone is read.
    metadata.labels = metadata
        .labels
        .map(|labels| {
            labels
                .into_iter()
                .filter(|(k, _)| k == ZONE_LABEL)
                .collect::<BTreeMap<_, _>>()
        })
        .filter(|l| !l.is_empty());
    let addresses: Option<Vec<NodeAddress>> = node
        .status
        .and_then(|s| s.addresses)
        .map(|a| a.into_iter().filter(|a| a.type_ == "InternalIP").collect());
    Node {
        metadata,
        spec: None,
        status: Some(NodeStatus {
            addresses,
            ..NodeStatus::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Container;

    use super::*;
    use crate::controller::objects::ClusterObjects;

    #[test]
    fn stripping_keeps_what_the_mesh_reads_and_nothing_else() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-1", "namespace": "shop", "uid": "u1",
                "labels": {"app": "web"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
                "managedFields": [{"manager": "kubectl"}],
                "resourceVersion": "42",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "cfg", "uid": "c1"},
                    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d8f", "uid": "r1",
                     "controller": true, "blockOwnerDeletion": true},
                ],
            },
            "spec": {
                "serviceAccountName": "web", "nodeName": "node-a",
                "containers": [{"name": "app", "image": "web:1"}],
            },
            "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}],
                       "hostIP": "192.168.0.1"},
        }))
        .expect("pod");
        let mut objects = ClusterObjects::default();
        assert_eq!(objects.apply(Object::Pod(pod)), Ok(false));
        let stored = &objects.pods["shop/web-1"];
        assert_eq!(stored.metadata.annotations, None);
        assert_eq!(stored.metadata.managed_fields, None);
        assert_eq!(stored.metadata.resource_version, None);
        assert_eq!(stored.metadata.uid.as_deref(), Some("u1"));
        // Only the controlling owner, by kind and name (the pod's workload in telemetry).
        assert_eq!(
            stored.metadata.owner_references,
            Some(vec![OwnerReference {
                kind: "ReplicaSet".into(),
                name: "web-5d8f".into(),
                controller: Some(true),
                ..OwnerReference::default()
            }])
        );
        let spec = stored.spec.as_ref().expect("spec");
        assert_eq!(spec.containers, Vec::<Container>::new());
        assert_eq!(spec.node_name.as_deref(), Some("node-a"));
        let status = stored.status.as_ref().expect("status");
        assert_eq!(status.host_ip, None);
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
    }

    #[test]
    fn nodes_keep_only_the_zone_label_and_internal_addresses() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "node-a", "labels": {
                "topology.kubernetes.io/zone": "z1", "kubernetes.io/hostname": "node-a"}},
            "status": {"addresses": [
                {"type": "Hostname", "address": "node-a"},
                {"type": "InternalIP", "address": "192.168.0.1"}],
                "capacity": {"cpu": "2"}},
        }))
        .expect("node");
        let mut objects = ClusterObjects::default();
        objects.apply(Object::Node(node)).expect("named");
        let stored = &objects.nodes["node-a"];
        assert_eq!(
            stored.metadata.labels,
            Some(BTreeMap::from([(ZONE_LABEL.into(), "z1".into())]))
        );
        let status = stored.status.as_ref().expect("status");
        assert_eq!(status.capacity, None);
        assert_eq!(status.addresses.as_ref().map(Vec::len), Some(1));
    }
}
