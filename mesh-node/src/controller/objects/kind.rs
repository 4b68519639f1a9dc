//! The kinds of object the mesh reads ([`Kind`]), and among them the routing kinds that only
//! waypoints receive ([`RouteKind`]).

use crate::{
    k8s::{
        GATEWAY_API_VERSION, ISTIO_NETWORKING_API_VERSION, ISTIO_NETWORKING_GROUP,
        ISTIO_NETWORKING_VERSIONS, TRAFFIC_API_VERSION,
    },
    policy::{PolicyKind, SecurityGroup},
};

/// The kinds of object the mesh reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    Node,
    /// A policy kind of either security group.
    Policy(SecurityGroup, PolicyKind),
    Gateway,
    HttpRoute,
    GrpcRoute,
    TrafficPolicy,
    VirtualService,
    DestinationRule,
}

impl Kind {
    pub const ALL: [Kind; 17] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::Policy(SecurityGroup::Trellis, PolicyKind::Authorization),
        Kind::Policy(SecurityGroup::Trellis, PolicyKind::PeerAuthentication),
        Kind::Policy(SecurityGroup::Trellis, PolicyKind::RequestAuthentication),
        Kind::Policy(SecurityGroup::Istio, PolicyKind::Authorization),
        Kind::Policy(SecurityGroup::Istio, PolicyKind::PeerAuthentication),
        Kind::Policy(SecurityGroup::Istio, PolicyKind::RequestAuthentication),
        Kind::Gateway,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::TrafficPolicy,
        Kind::VirtualService,
        Kind::DestinationRule,
    ];

    /// The kind's name; policy kinds of another group than Trellis's are qualified by it
    /// (`AuthorizationPolicy.security.istio.io`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Policy(group, kind) => group.qualified(kind),
            Kind::Gateway => "Gateway",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::TrafficPolicy => "TrafficPolicy",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
        }
    }

    pub(super) const fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }

    /// Kinds whose CRDs a cluster may not have: their absence means "none of them", never
    /// an error that holds the rest of the mesh back. The mesh's own security policies are
    /// not optional: without them, agents and waypoints would run without protection they
    /// should enforce (a DENY on a token's principal means nothing if tokens go unverified).
    /// Istio's are: a cluster without Istio's CRDs cannot hold any Istio policy.
    pub const fn optional(self) -> bool {
        matches!(
            self,
            Kind::Gateway
                | Kind::HttpRoute
                | Kind::GrpcRoute
                | Kind::TrafficPolicy
                | Kind::VirtualService
                | Kind::DestinationRule
                | Kind::Policy(SecurityGroup::Istio, _)
        )
    }
}

/// The routing kinds: sent, as written, to waypoints only (`route/<kind>/<ns>/<name>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    Http,
    Grpc,
    TrafficPolicy,
    VirtualService,
    DestinationRule,
}

impl RouteKind {
    pub const ALL: [RouteKind; 5] = [
        RouteKind::Http,
        RouteKind::Grpc,
        RouteKind::TrafficPolicy,
        RouteKind::VirtualService,
        RouteKind::DestinationRule,
    ];

    /// The `kind` of the resource, as in manifests and in route keys.
    pub const fn as_str(self) -> &'static str {
        self.kind().as_str()
    }

    pub const fn kind(self) -> Kind {
        match self {
            RouteKind::Http => Kind::HttpRoute,
            RouteKind::Grpc => Kind::GrpcRoute,
            RouteKind::TrafficPolicy => Kind::TrafficPolicy,
            RouteKind::VirtualService => Kind::VirtualService,
            RouteKind::DestinationRule => Kind::DestinationRule,
        }
    }

    pub const fn api_version(self) -> &'static str {
        match self {
            RouteKind::Http | RouteKind::Grpc => GATEWAY_API_VERSION,
            RouteKind::TrafficPolicy => TRAFFIC_API_VERSION,
            // The version watched in Kubernetes; files may use any served one.
            RouteKind::VirtualService | RouteKind::DestinationRule => ISTIO_NETWORKING_API_VERSION,
        }
    }

    /// Whether a manifest of this kind at `api_version` is read: the Istio kinds at each of
    /// their served versions, the others at [`RouteKind::api_version`] only.
    pub fn reads(self, api_version: &str) -> bool {
        match self {
            RouteKind::VirtualService | RouteKind::DestinationRule => {
                api_version.split_once('/').is_some_and(|(group, version)| {
                    group == ISTIO_NETWORKING_GROUP && ISTIO_NETWORKING_VERSIONS.contains(&version)
                })
            }
            _ => api_version == self.api_version(),
        }
    }

    /// The resource name in API paths.
    pub const fn plural(self) -> &'static str {
        match self {
            RouteKind::Http => "httproutes",
            RouteKind::Grpc => "grpcroutes",
            RouteKind::TrafficPolicy => "trafficpolicies",
            RouteKind::VirtualService => "virtualservices",
            RouteKind::DestinationRule => "destinationrules",
        }
    }

    pub fn from_kind(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == kind)
    }
}

impl std::fmt::Display for RouteKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::RouteKind;

    #[test]
    fn istio_kinds_are_read_at_every_served_version_and_others_at_theirs() {
        for version in ["v1", "v1beta1", "v1alpha3"] {
            let api_version = format!("networking.istio.io/{version}");
            assert!(RouteKind::VirtualService.reads(&api_version));
            assert!(RouteKind::DestinationRule.reads(&api_version));
        }
        assert!(!RouteKind::VirtualService.reads("networking.istio.io/v2"));
        assert!(!RouteKind::DestinationRule.reads("networking.trellis.dev/v1"));
        assert!(RouteKind::Http.reads("gateway.networking.k8s.io/v1"));
        assert!(!RouteKind::Http.reads("gateway.networking.k8s.io/v1beta1"));
    }
}
