//! The Kubernetes objects the mesh is built from, as both sources deliver them.
//!
//! [`ClusterObjects`] holds Namespaces, Pods, Services, EndpointSlices, Nodes, the mesh's
//! policies, Gateways (a Gateway of class `trellis-waypoint` is a waypoint) and the routing
//! objects waypoints read (HTTPRoute, GRPCRoute, TrafficPolicy), keyed by `namespace/name`
//! (cluster-scoped objects by `name`). Policies, Gateways and routing objects are kept as
//! metadata plus an untyped spec ([`PolicyObject`]): the controller only carries them, and the
//! component that reads each converts it. Every object enters through
//! [`ClusterObjects::apply`], which strips it to the fields the translation reads: a cluster's
//! pods carry container specs, managed fields and annotations many times larger than what the
//! mesh needs, and the controller keeps every object in memory. Both the directory and the
//! Kubernetes source use this one type and this one stripping, so they cannot disagree.
//!
//! The kinds are in [`kind`], the stripping in [`strip`].

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::policy::{
    AuthorizationPolicy, PeerAuthentication, PolicyKind, RequestAuthentication, SecurityGroup,
};

mod kind;
mod strip;

pub use kind::{Kind, RouteKind};

/// A policy object: its metadata and its spec, untyped until [`crate::policy::Policy::compile`]
/// converts it (see [`crate::policy::stored`] for why). Gateways and routing objects are kept
/// the same way: the controller reads only a Gateway's `spec.gatewayClassName`, and routes
/// travel to the waypoints as written, for them to convert.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyObject {
    pub metadata: ObjectMeta,
    pub spec: serde_json::Value,
}

impl From<AuthorizationPolicy> for PolicyObject {
    fn from(o: AuthorizationPolicy) -> Self {
        Self {
            metadata: o.metadata,
            // Serialising a type that came from JSON cannot fail; `Null` would read as empty.
            spec: serde_json::to_value(o.spec).unwrap_or_default(),
        }
    }
}

impl From<PeerAuthentication> for PolicyObject {
    fn from(o: PeerAuthentication) -> Self {
        Self {
            metadata: o.metadata,
            spec: serde_json::to_value(o.spec).unwrap_or_default(),
        }
    }
}

impl From<RequestAuthentication> for PolicyObject {
    fn from(o: RequestAuthentication) -> Self {
        Self {
            metadata: o.metadata,
            spec: serde_json::to_value(o.spec).unwrap_or_default(),
        }
    }
}

impl PolicyObject {
    /// Metadata and spec of any manifest, the spec as written (`null` when absent).
    pub fn untyped(value: &serde_json::Value) -> Result<Self, serde_json::Error> {
        let metadata = match value.get("metadata") {
            Some(m) => serde_json::from_value(m.clone())?,
            None => ObjectMeta::default(),
        };
        Ok(Self {
            metadata,
            spec: value.get("spec").cloned().unwrap_or_default(),
        })
    }

    /// From a manifest of a policy kind: never fails on the spec, which is converted later.
    /// A spec of the kind's shape is normalised through its type, so a manifest on disk and
    /// the same object from the API server give the same bytes to the agents.
    pub fn from_manifest(
        kind: PolicyKind,
        value: &serde_json::Value,
    ) -> Result<Self, serde_json::Error> {
        let metadata = match value.get("metadata") {
            Some(m) => serde_json::from_value(m.clone())?,
            None => ObjectMeta::default(),
        };
        let spec = value.get("spec").cloned().unwrap_or_default();
        let normalised = match kind {
            PolicyKind::Authorization => {
                serde_json::from_value::<crate::k8s::policy::AuthorizationPolicySpec>(spec.clone())
                    .and_then(serde_json::to_value)
            }
            PolicyKind::PeerAuthentication => {
                serde_json::from_value::<crate::k8s::policy::PeerAuthenticationSpec>(spec.clone())
                    .and_then(serde_json::to_value)
            }
            PolicyKind::RequestAuthentication => serde_json::from_value::<
                crate::k8s::policy::RequestAuthenticationSpec,
            >(spec.clone())
            .and_then(serde_json::to_value),
        };
        Ok(Self {
            metadata,
            spec: normalised.unwrap_or(spec),
        })
    }
}

/// One object of a kind the mesh reads.
#[derive(Clone, Debug, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "objects only pass through on their way into the store; boxing adds an allocation per event"
)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    EndpointSlice(EndpointSlice),
    Node(Node),
    /// A policy of either group (see [`SecurityGroup`]).
    Policy(SecurityGroup, PolicyKind, PolicyObject),
    Gateway(PolicyObject),
    Route(RouteKind, PolicyObject),
}

impl Object {
    /// A `security.trellis.dev` policy of `kind`.
    pub fn policy(kind: PolicyKind, object: PolicyObject) -> Self {
        Object::Policy(SecurityGroup::Trellis, kind, object)
    }

    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Node(_) => Kind::Node,
            Object::Policy(group, kind, _) => Kind::Policy(*group, *kind),
            Object::Gateway(_) => Kind::Gateway,
            Object::Route(kind, _) => kind.kind(),
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::Policy(_, _, o) | Object::Gateway(o) | Object::Route(_, o) => &o.metadata,
        }
    }

    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Namespace(o) => &mut o.metadata,
            Object::Pod(o) => &mut o.metadata,
            Object::Service(o) => &mut o.metadata,
            Object::EndpointSlice(o) => &mut o.metadata,
            Object::Node(o) => &mut o.metadata,
            Object::Policy(_, _, o) | Object::Gateway(o) | Object::Route(_, o) => &mut o.metadata,
        }
    }

    /// The store key: `namespace/name`, or `name` for cluster-scoped kinds. `None` when the
    /// object has no name (or a namespaced object no namespace), which no store can hold.
    pub fn key(&self) -> Option<String> {
        object_key(self.kind(), self.metadata())
    }

    /// `Kind namespace/name`, for log lines and rejection reasons.
    pub fn describe(&self) -> String {
        let meta = self.metadata();
        let name = meta.name.as_deref().unwrap_or("<unnamed>");
        match (&meta.namespace, self.kind().namespaced()) {
            (Some(ns), true) => format!("{} {ns}/{name}", self.kind()),
            _ => format!("{} {name}", self.kind()),
        }
    }
}

fn object_key(kind: Kind, meta: &ObjectMeta) -> Option<String> {
    let name = meta.name.as_deref().filter(|n| !n.is_empty())?;
    if kind.namespaced() {
        let ns = meta.namespace.as_deref().filter(|n| !n.is_empty())?;
        Some(format!("{ns}/{name}"))
    } else {
        Some(name.to_owned())
    }
}

/// The objects the mesh is built from. Values are shared (`Arc`) so that publishing a
/// snapshot after each change copies pointers, not objects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterObjects {
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    pub pods: BTreeMap<String, Arc<Pod>>,
    pub services: BTreeMap<String, Arc<Service>>,
    pub endpoint_slices: BTreeMap<String, Arc<EndpointSlice>>,
    pub nodes: BTreeMap<String, Arc<Node>>,
    /// Policies by group and kind, then by `namespace/name`: an Istio and a Trellis policy of
    /// the same name are two objects, both enforced.
    pub policies: BTreeMap<(SecurityGroup, PolicyKind), BTreeMap<String, Arc<PolicyObject>>>,
    pub gateways: BTreeMap<String, Arc<PolicyObject>>,
    pub http_routes: BTreeMap<String, Arc<PolicyObject>>,
    pub grpc_routes: BTreeMap<String, Arc<PolicyObject>>,
    pub traffic_policies: BTreeMap<String, Arc<PolicyObject>>,
    pub virtual_services: BTreeMap<String, Arc<PolicyObject>>,
    pub destination_rules: BTreeMap<String, Arc<PolicyObject>>,
}

/// An object that cannot be stored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{object}: metadata.name is missing, or metadata.namespace for a namespaced kind")]
pub struct MissingName {
    pub object: String,
}

impl ClusterObjects {
    /// The `security.trellis.dev` policies of `kind`, by `namespace/name`.
    pub fn policies(&self, kind: PolicyKind) -> &BTreeMap<String, Arc<PolicyObject>> {
        self.policies_in(SecurityGroup::Trellis, kind)
    }

    /// The policies of `kind` in `group`, by `namespace/name`.
    pub fn policies_in(
        &self,
        group: SecurityGroup,
        kind: PolicyKind,
    ) -> &BTreeMap<String, Arc<PolicyObject>> {
        static NONE: BTreeMap<String, Arc<PolicyObject>> = BTreeMap::new();
        self.policies.get(&(group, kind)).unwrap_or(&NONE)
    }

    /// The routing objects of `kind`, by `namespace/name`.
    pub fn routes(&self, kind: RouteKind) -> &BTreeMap<String, Arc<PolicyObject>> {
        match kind {
            RouteKind::Http => &self.http_routes,
            RouteKind::Grpc => &self.grpc_routes,
            RouteKind::TrafficPolicy => &self.traffic_policies,
            RouteKind::VirtualService => &self.virtual_services,
            RouteKind::DestinationRule => &self.destination_rules,
        }
    }

    fn routes_mut(&mut self, kind: RouteKind) -> &mut BTreeMap<String, Arc<PolicyObject>> {
        match kind {
            RouteKind::Http => &mut self.http_routes,
            RouteKind::Grpc => &mut self.grpc_routes,
            RouteKind::TrafficPolicy => &mut self.traffic_policies,
            RouteKind::VirtualService => &mut self.virtual_services,
            RouteKind::DestinationRule => &mut self.destination_rules,
        }
    }

    /// Strips and stores `object`, replacing any object of the same kind and key. Returns
    /// whether an object was replaced.
    pub fn apply(&mut self, object: Object) -> Result<bool, MissingName> {
        let key = object.key().ok_or_else(|| MissingName {
            object: object.describe(),
        })?;
        let replaced = match object.stripped() {
            Object::Namespace(o) => self.namespaces.insert(key, Arc::new(o)).is_some(),
            Object::Pod(o) => self.pods.insert(key, Arc::new(o)).is_some(),
            Object::Service(o) => self.services.insert(key, Arc::new(o)).is_some(),
            Object::EndpointSlice(o) => self.endpoint_slices.insert(key, Arc::new(o)).is_some(),
            Object::Node(o) => self.nodes.insert(key, Arc::new(o)).is_some(),
            Object::Policy(group, kind, o) => self
                .policies
                .entry((group, kind))
                .or_default()
                .insert(key, Arc::new(o))
                .is_some(),
            Object::Gateway(o) => self.gateways.insert(key, Arc::new(o)).is_some(),
            Object::Route(kind, o) => self.routes_mut(kind).insert(key, Arc::new(o)).is_some(),
        };
        Ok(replaced)
    }

    /// Removes the object of `kind` named like `object` (a deletion event carries the last
    /// state of the object; only its name matters).
    pub fn delete(&mut self, object: &Object) {
        if let Some(key) = object.key() {
            self.remove(object.kind(), &key);
        }
    }

    pub fn remove(&mut self, kind: Kind, key: &str) {
        match kind {
            Kind::Namespace => self.namespaces.remove(key).is_some(),
            Kind::Pod => self.pods.remove(key).is_some(),
            Kind::Service => self.services.remove(key).is_some(),
            Kind::EndpointSlice => self.endpoint_slices.remove(key).is_some(),
            Kind::Node => self.nodes.remove(key).is_some(),
            Kind::Policy(group, kind) => {
                let Some(policies) = self.policies.get_mut(&(group, kind)) else {
                    return;
                };
                policies.remove(key);
                // No empty entries, so equal contents compare equal however they came about.
                if policies.is_empty() {
                    self.policies.remove(&(group, kind));
                }
                true
            }
            Kind::Gateway => self.gateways.remove(key).is_some(),
            Kind::HttpRoute => self.http_routes.remove(key).is_some(),
            Kind::GrpcRoute => self.grpc_routes.remove(key).is_some(),
            Kind::TrafficPolicy => self.traffic_policies.remove(key).is_some(),
            Kind::VirtualService => self.virtual_services.remove(key).is_some(),
            Kind::DestinationRule => self.destination_rules.remove(key).is_some(),
        };
    }

    /// Replaces every object of `kind` with those of `from` (a completed re-list).
    pub fn replace_kind(&mut self, kind: Kind, from: &mut ClusterObjects) {
        match kind {
            Kind::Namespace => self.namespaces = std::mem::take(&mut from.namespaces),
            Kind::Pod => self.pods = std::mem::take(&mut from.pods),
            Kind::Service => self.services = std::mem::take(&mut from.services),
            Kind::EndpointSlice => {
                self.endpoint_slices = std::mem::take(&mut from.endpoint_slices);
            }
            Kind::Node => self.nodes = std::mem::take(&mut from.nodes),
            Kind::Policy(group, kind) => match from.policies.remove(&(group, kind)) {
                Some(listed) if !listed.is_empty() => {
                    self.policies.insert((group, kind), listed);
                }
                _ => {
                    self.policies.remove(&(group, kind));
                }
            },
            Kind::Gateway => self.gateways = std::mem::take(&mut from.gateways),
            Kind::HttpRoute => self.http_routes = std::mem::take(&mut from.http_routes),
            Kind::GrpcRoute => self.grpc_routes = std::mem::take(&mut from.grpc_routes),
            Kind::TrafficPolicy => {
                self.traffic_policies = std::mem::take(&mut from.traffic_policies);
            }
            Kind::VirtualService => {
                self.virtual_services = std::mem::take(&mut from.virtual_services);
            }
            Kind::DestinationRule => {
                self.destination_rules = std::mem::take(&mut from.destination_rules);
            }
        }
    }

    /// The number of stored objects of `kind`.
    pub fn count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Namespace => self.namespaces.len(),
            Kind::Pod => self.pods.len(),
            Kind::Service => self.services.len(),
            Kind::EndpointSlice => self.endpoint_slices.len(),
            Kind::Node => self.nodes.len(),
            Kind::Policy(group, kind) => self.policies_in(group, kind).len(),
            Kind::Gateway => self.gateways.len(),
            Kind::HttpRoute => self.http_routes.len(),
            Kind::GrpcRoute => self.grpc_routes.len(),
            Kind::TrafficPolicy => self.traffic_policies.len(),
            Kind::VirtualService => self.virtual_services.len(),
            Kind::DestinationRule => self.destination_rules.len(),
        }
    }

    pub fn len(&self) -> usize {
        Kind::ALL.iter().map(|k| self.count(*k)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unnamed_objects_are_refused() {
        let mut objects = ClusterObjects::default();
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        };
        assert!(objects.apply(Object::Pod(pod)).is_err());
        assert!(objects.is_empty());
    }
}
