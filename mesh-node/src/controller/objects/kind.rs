//! The kinds of object the mesh reads ([`Kind`]), and among them the routing kinds that only
//! waypoints receive ([`RouteKind`]).

use crate::{
    k8s::{GATEWAY_API_VERSION, TRAFFIC_API_VERSION},
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
}

impl Kind {
    pub const ALL: [Kind; 15] = [
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
}

impl RouteKind {
    pub const ALL: [RouteKind; 3] = [RouteKind::Http, RouteKind::Grpc, RouteKind::TrafficPolicy];

    /// The `kind` of the resource, as in manifests and in route keys.
    pub const fn as_str(self) -> &'static str {
        self.kind().as_str()
    }

    pub const fn kind(self) -> Kind {
        match self {
            RouteKind::Http => Kind::HttpRoute,
            RouteKind::Grpc => Kind::GrpcRoute,
            RouteKind::TrafficPolicy => Kind::TrafficPolicy,
        }
    }

    pub const fn api_version(self) -> &'static str {
        match self {
            RouteKind::Http | RouteKind::Grpc => GATEWAY_API_VERSION,
            RouteKind::TrafficPolicy => TRAFFIC_API_VERSION,
        }
    }

    /// The resource name in API paths.
    pub const fn plural(self) -> &'static str {
        match self {
            RouteKind::Http => "httproutes",
            RouteKind::Grpc => "grpcroutes",
            RouteKind::TrafficPolicy => "trafficpolicies",
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
