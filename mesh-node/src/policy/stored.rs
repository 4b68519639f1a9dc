//! Policies as the control plane stores and distributes them: the object's metadata and its
//! spec, untyped.
//!
//! The spec travels as JSON and is converted by [`Policy::compile`] wherever it is used: on the
//! controller for the status condition, on every agent for enforcement. Keeping it untyped
//! until then means that a spec which does not even have the kind's shape still reaches the
//! nodes, as a fail-closed stand-in ([`AuthzPolicy::unreadable`]), instead of vanishing in a
//! parse error on the way and taking a `DENY` with it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{
    istio,
    jwt::JwtPolicy,
    model::{AuthzPolicy, PeerPolicy, PolicyError, PolicyId, identify},
    status::{self, Condition},
};
use crate::k8s::policy::{
    AuthorizationPolicy, AuthorizationPolicySpec, PeerAuthentication, PeerAuthenticationSpec,
    RequestAuthentication, RequestAuthenticationSpec,
};

/// The policy kinds, the same in both groups ([`SecurityGroup`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyKind {
    Authorization,
    PeerAuthentication,
    /// JWT verification at waypoints.
    RequestAuthentication,
}

impl PolicyKind {
    pub const API_VERSION: &'static str = crate::k8s::SECURITY_API_VERSION;

    /// Every kind, in a fixed order.
    pub const ALL: [Self; 3] = [
        Self::Authorization,
        Self::PeerAuthentication,
        Self::RequestAuthentication,
    ];

    /// The `kind` of the custom resource.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Authorization => "AuthorizationPolicy",
            Self::PeerAuthentication => "PeerAuthentication",
            Self::RequestAuthentication => "RequestAuthentication",
        }
    }

    /// The resource name in API paths (the same in both groups).
    pub const fn plural(self) -> &'static str {
        match self {
            Self::Authorization => "authorizationpolicies",
            Self::PeerAuthentication => "peerauthentications",
            Self::RequestAuthentication => "requestauthentications",
        }
    }

    pub fn from_kind(kind: &str) -> Option<Self> {
        match kind {
            "AuthorizationPolicy" => Some(Self::Authorization),
            "PeerAuthentication" => Some(Self::PeerAuthentication),
            "RequestAuthentication" => Some(Self::RequestAuthentication),
            _ => None,
        }
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The API group a policy object is written in. Both groups' kinds have the same fields and
/// compile into the same model ([`Policy::compile_in`]); the group decides where the object's
/// status is written, how it is named on the wire, and which Trellis additions it may use
/// ([`super::istio`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SecurityGroup {
    /// `security.trellis.dev`.
    Trellis,
    /// `security.istio.io`, read unchanged.
    Istio,
}

impl SecurityGroup {
    pub const ALL: [Self; 2] = [Self::Trellis, Self::Istio];

    pub const fn group(self) -> &'static str {
        match self {
            Self::Trellis => crate::k8s::SECURITY_GROUP,
            Self::Istio => crate::k8s::ISTIO_SECURITY_GROUP,
        }
    }

    /// The version watched and written to.
    pub const fn api_version(self) -> &'static str {
        match self {
            Self::Trellis => crate::k8s::SECURITY_API_VERSION,
            Self::Istio => crate::k8s::ISTIO_SECURITY_API_VERSION,
        }
    }

    /// The group of a manifest's `apiVersion`, if it is one of the versions read.
    pub fn from_api_version(api_version: &str) -> Option<Self> {
        if api_version == crate::k8s::SECURITY_API_VERSION {
            Some(Self::Trellis)
        } else if crate::k8s::ISTIO_SECURITY_API_VERSIONS.contains(&api_version) {
            Some(Self::Istio)
        } else {
            None
        }
    }

    /// The kind as the control plane names it (resource keys, the wire, logs): `kind` for
    /// Trellis's group, `kind.group` (as `kubectl` spells it) for the others.
    pub const fn qualified(self, kind: PolicyKind) -> &'static str {
        match (self, kind) {
            (Self::Trellis, kind) => kind.as_str(),
            (Self::Istio, PolicyKind::Authorization) => "AuthorizationPolicy.security.istio.io",
            (Self::Istio, PolicyKind::PeerAuthentication) => "PeerAuthentication.security.istio.io",
            (Self::Istio, PolicyKind::RequestAuthentication) => {
                "RequestAuthentication.security.istio.io"
            }
        }
    }

    /// The inverse of [`SecurityGroup::qualified`].
    pub fn parse_qualified(name: &str) -> Option<(Self, PolicyKind)> {
        Self::ALL.into_iter().find_map(|group| {
            PolicyKind::ALL
                .into_iter()
                .find(|kind| group.qualified(*kind) == name)
                .map(|kind| (group, kind))
        })
    }
}

impl std::fmt::Display for SecurityGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.group())
    }
}

/// A converted policy of any kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    Authorization(AuthzPolicy),
    PeerAuthentication(PeerPolicy),
    RequestAuthentication(JwtPolicy),
}

impl Policy {
    /// Converts a stored `security.trellis.dev` object. A spec that does not deserialise
    /// becomes the kind's strictest stand-in; only an object without namespace or name is an
    /// error.
    pub fn compile(
        kind: PolicyKind,
        metadata: &ObjectMeta,
        spec: &serde_json::Value,
    ) -> Result<Self, PolicyError> {
        Self::compile_in(SecurityGroup::Trellis, kind, metadata, spec)
    }

    /// Converts a stored object of either group: the one compile path, with the group's
    /// differences applied to the typed spec first ([`super::istio`]).
    pub fn compile_in(
        group: SecurityGroup,
        kind: PolicyKind,
        metadata: &ObjectMeta,
        spec: &serde_json::Value,
    ) -> Result<Self, PolicyError> {
        let (id, generation) = identify(metadata)?;
        // An absent spec reads like an empty one, as the API server would default it.
        let spec = if spec.is_null() {
            &serde_json::Value::Object(serde_json::Map::new())
        } else {
            spec
        };
        let istio = group == SecurityGroup::Istio;
        Ok(match kind {
            PolicyKind::Authorization => Self::Authorization(
                match serde_json::from_value::<AuthorizationPolicySpec>(spec.clone()) {
                    Ok(mut spec) => {
                        if istio {
                            istio::authorization(&mut spec);
                        }
                        AuthzPolicy::compile(&AuthorizationPolicy {
                            metadata: metadata.clone(),
                            spec,
                            status: None,
                        })?
                    }
                    Err(e) => AuthzPolicy::unreadable(id, generation, e.to_string()),
                },
            ),
            PolicyKind::PeerAuthentication => Self::PeerAuthentication(
                match serde_json::from_value::<PeerAuthenticationSpec>(spec.clone()) {
                    Ok(spec) => PeerPolicy::compile(&PeerAuthentication {
                        metadata: metadata.clone(),
                        spec,
                        status: None,
                    })?,
                    Err(e) => PeerPolicy::unreadable(id, generation, e.to_string()),
                },
            ),
            PolicyKind::RequestAuthentication => Self::RequestAuthentication(
                match serde_json::from_value::<RequestAuthenticationSpec>(spec.clone()) {
                    Ok(mut spec) => {
                        if istio {
                            istio::request_authentication(&mut spec);
                        }
                        JwtPolicy::compile(&RequestAuthentication {
                            metadata: metadata.clone(),
                            spec,
                            status: None,
                        })?
                    }
                    Err(e) => JwtPolicy::unreadable(id, generation, e.to_string()),
                },
            ),
        })
    }

    pub fn kind(&self) -> PolicyKind {
        match self {
            Self::Authorization(_) => PolicyKind::Authorization,
            Self::PeerAuthentication(_) => PolicyKind::PeerAuthentication,
            Self::RequestAuthentication(_) => PolicyKind::RequestAuthentication,
        }
    }

    pub fn id(&self) -> &PolicyId {
        match self {
            Self::Authorization(p) => &p.id,
            Self::PeerAuthentication(p) => &p.id,
            Self::RequestAuthentication(p) => &p.id,
        }
    }

    /// The `Accepted` status condition (without transition time).
    pub fn condition(&self) -> Condition {
        match self {
            Self::Authorization(p) => status::authorization_condition(p),
            Self::PeerAuthentication(p) => status::peer_condition(p),
            Self::RequestAuthentication(p) => status::request_authentication_condition(p),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::policy::{
        engine::Engine,
        facts::{Destination, Flow},
        model::{Binding, Enforcement, MtlsMode},
    };

    fn meta(ns: &str, name: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            generation: Some(3),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn an_unreadable_spec_denies_its_whole_namespace() {
        // `rules` must be a list: nothing about this object can be trusted, not even that it
        // was meant as an ALLOW.
        let spec = json!({"action": "ALLOW", "rules": "everyone"});
        let Ok(Policy::Authorization(policy)) =
            Policy::compile(PolicyKind::Authorization, &meta("shop", "p"), &spec)
        else {
            panic!("expected an authorization policy");
        };
        assert!(matches!(
            policy.enforcement,
            Enforcement::Rejected {
                error: PolicyError::Unreadable(_),
                ..
            }
        ));
        let engine = Engine::new("trellis-system", [policy], []);
        let labels = Default::default();
        let decision = engine.decide(&Flow {
            destination: Destination {
                namespace: "shop",
                labels: &labels,
            },
            port: 80,
            source: None,
            source_ip: None,
        });
        assert!(!decision.is_allowed(), "{decision}");
        assert!(decision.policy().is_some_and(|p| p.id.name == "p"));
    }

    #[test]
    fn an_unreadable_peer_authentication_is_strict() {
        let Ok(Policy::PeerAuthentication(policy)) = Policy::compile(
            PolicyKind::PeerAuthentication,
            &meta("shop", "pa"),
            &json!({"mtls": "PERMISSIVE"}),
        ) else {
            panic!("expected a peer authentication");
        };
        assert_eq!(policy.mode, Some(MtlsMode::Strict));
        assert_eq!(
            Policy::PeerAuthentication(policy).condition().status,
            "False"
        );
    }

    #[test]
    fn an_absent_spec_is_an_empty_one_and_a_nameless_object_an_error() {
        let compiled = Policy::compile(
            PolicyKind::PeerAuthentication,
            &meta("shop", "pa"),
            &serde_json::Value::Null,
        )
        .expect("compiles");
        assert_eq!(compiled.condition().status, "True");
        let mut nameless = meta("shop", "x");
        nameless.name = None;
        assert_eq!(
            Policy::compile(PolicyKind::Authorization, &nameless, &json!({})),
            Err(PolicyError::MissingMetadata("name"))
        );
    }

    #[test]
    fn request_authentication_travels_as_a_stored_kind() {
        assert_eq!(
            PolicyKind::from_kind("RequestAuthentication"),
            Some(PolicyKind::RequestAuthentication)
        );
        let spec = json!({"targetRefs": [{"kind": "Gateway", "name": "waypoint"}],
            "jwtRules": [{"issuer": "https://issuer.example", "jwksFile": "/keys.json"}]});
        let policy = Policy::compile(
            PolicyKind::RequestAuthentication,
            &meta("shop", "ra"),
            &spec,
        )
        .expect("compiles");
        assert_eq!(policy.kind(), PolicyKind::RequestAuthentication);
        assert_eq!(policy.condition().observed_generation, Some(3));
        assert_eq!(policy.condition().reason, "Accepted");
        let Ok(Policy::RequestAuthentication(unreadable)) = Policy::compile(
            PolicyKind::RequestAuthentication,
            &meta("shop", "ra"),
            &json!({"jwtRules": "x"}),
        ) else {
            panic!("expected a request authentication");
        };
        assert_eq!(unreadable.binding, Binding::NamespaceWaypoints);
        assert!(unreadable.rules.is_empty());
    }
}
