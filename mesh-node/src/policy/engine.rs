//! The decisions: may this source connect to this workload's port ([`Engine::decide`]), and
//! may this request pass a waypoint ([`Engine::decide_request`])?
//!
//! Order, as Istio users know it: a plaintext connection to a port whose effective
//! `PeerAuthentication` mode is `STRICT` is denied ([`PeerAuthSet`]); then any matching `DENY`
//! policy denies; then, if any `ALLOW` policy applies to the workload, one of them must match;
//! otherwise the connection is allowed ([`PolicySet`]). A waypoint applies the same order to
//! the policies attached to it ([`WaypointPolicies`]). Whether a rule matches is decided in
//! [`super::matching`]; every decision names what made it ([`Decision`]).

use std::collections::BTreeMap;

use super::{
    facts::{Destination, Flow, RequestFacts, WaypointTarget},
    model::{AuthzPolicy, MtlsMode, PeerPolicy},
    status::{self, Listed},
};

mod decision;
mod peer;
mod waypoint;
mod workloads;

pub use decision::{Decision, Reason, Verdict};
pub use peer::{MtlsResolution, PeerAuthSet};
pub use waypoint::WaypointPolicies;
pub use workloads::PolicySet;

/// The namespace whose policies apply mesh-wide unless configured otherwise.
pub const DEFAULT_ROOT_NAMESPACE: &str = "trellis-system";

/// Everything the node needs to decide: the entry point for the agent and for `explain`,
/// and for the waypoint ([`Engine::decide_request`]).
#[derive(Debug)]
pub struct Engine {
    /// Policies bound to workloads, for node agents.
    pub authorization: PolicySet,
    /// Policies attached to waypoints.
    pub waypoint: WaypointPolicies,
    pub peer_authentication: PeerAuthSet,
    /// Every policy the engine was built from, with its `Accepted` condition, sorted: what
    /// the agent's config dump shows.
    pub listing: Vec<Listed>,
}

impl Default for Engine {
    /// No policies: every connection allowed, every workload `PERMISSIVE`.
    fn default() -> Self {
        Self::new(DEFAULT_ROOT_NAMESPACE, [], [])
    }
}

impl Engine {
    pub fn new(
        root_namespace: &str,
        authorization: impl IntoIterator<Item = AuthzPolicy>,
        peer_authentication: impl IntoIterator<Item = PeerPolicy>,
    ) -> Self {
        let authorization: Vec<AuthzPolicy> = authorization.into_iter().collect();
        let peer_authentication: Vec<PeerPolicy> = peer_authentication.into_iter().collect();
        let mut listing: Vec<Listed> = authorization
            .iter()
            .map(|p| Listed {
                kind: "AuthorizationPolicy",
                id: p.id.to_string(),
                generation: p.generation,
                condition: status::authorization_condition(p),
            })
            .chain(peer_authentication.iter().map(|p| Listed {
                kind: "PeerAuthentication",
                id: p.id.to_string(),
                generation: p.generation,
                condition: status::peer_condition(p),
            }))
            .collect();
        listing.sort_by(|a, b| (&a.id, a.kind).cmp(&(&b.id, b.kind)));
        let waypoint = WaypointPolicies::new(root_namespace, &authorization);
        Self {
            authorization: PolicySet::new(root_namespace, authorization),
            waypoint,
            peer_authentication: PeerAuthSet::new(root_namespace, peer_authentication),
            listing,
        }
    }

    /// What the datapath enforces for plaintext to a workload: whether a caller without an
    /// identity, whose address the kernel does not weigh, is refused on the ports no policy
    /// names, and on each named port where that differs. It is [`Engine::decide`] itself for
    /// such a caller (STRICT mutual TLS, DENY and ALLOW policies alike), so the kernel and
    /// `explain` cannot disagree; `ipBlocks` conditions are unknown for it and fail closed.
    pub fn plaintext_refusals(&self, dest: &Destination<'_>) -> (bool, BTreeMap<u16, bool>) {
        let mut named = self.authorization.named_ports(dest);
        named.extend(self.peer_authentication.named_ports(dest));
        let refused = |port: u16| {
            !self
                .decide(&Flow {
                    destination: *dest,
                    port,
                    source: None,
                    source_ip: None,
                })
                .is_allowed()
        };
        // Any port no policy names stands for all of them; if every port is named, there is
        // no other port and the default never applies.
        let other = (0..=u16::MAX).find(|p| !named.contains(p));
        let default = other.is_none_or(refused);
        let ports = named
            .into_iter()
            .filter_map(|port| {
                let r = refused(port);
                (r != default).then_some((port, r))
            })
            .collect();
        (default, ports)
    }

    pub fn decide(&self, flow: &Flow<'_>) -> Decision {
        if flow.source.is_none() {
            let mtls = self
                .peer_authentication
                .resolve(&flow.destination, flow.port);
            if let (MtlsMode::Strict, Some(policy)) = (mtls.mode, mtls.policy) {
                return Decision::deny(Reason::MtlsRequired {
                    policy,
                    port_level: mtls.port_level,
                });
            }
        }
        self.authorization.evaluate(flow)
    }

    /// The waypoint's decision for a request at `target` (see [`WaypointPolicies`]). The
    /// request's path must already be normalized ([`super::normalize::normalize_path`]) and
    /// its JWT verified ([`super::jwt::JwtAuthenticator`]): a request with an invalid token
    /// is refused (401) before authorization.
    pub fn decide_request(
        &self,
        target: &WaypointTarget<'_>,
        flow: &Flow<'_>,
        request: &RequestFacts<'_>,
    ) -> Decision {
        self.waypoint.evaluate(target, flow, request)
    }
}
