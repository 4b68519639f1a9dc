//! Authorization and authentication: the `security.trellis.dev/v1` policies, the decision the
//! node proxy makes for every inbound connection (layer 4), and the one a waypoint makes for
//! every request (layer 7).
//!
//! The modules form layers; each imports only the ones below it (never one above, never
//! through this file):
//!
//! 1. [`normalize`]: the one path form that is authorized, routed and forwarded.
//! 2. [`model`]: the policies as enforced, converted from the kinds users write
//!    ([`crate::k8s::policy`], Istio's fields). Invalid objects are rejected one by one, with an
//!    error naming the field, and replaced by a fail-closed stand-in; fields the enforcing
//!    proxy cannot evaluate fail closed rule by rule. Where a policy is enforced
//!    ([`Binding`]): on workloads (selector, node agents) or at waypoints (`targetRefs`).
//! 3. [`facts`]: what is known of a connection ([`Flow`]) or a request ([`RequestFacts`]).
//! 4. [`matching`]: whether a rule matches the facts, in three-valued logic; `targets`: the
//!    policies attached to a waypoint, found by the target of a request.
//! 5. [`jwt`]: `RequestAuthentication` at waypoints: token verification and key sets.
//! 6. [`status`]: the `Accepted` status condition of each object.
//! 7. [`engine`]: the node's decision ([`Engine::decide`]) and the waypoint's
//!    ([`Engine::decide_request`]): which policy and rule decided, for access logs and
//!    `meshctl policy explain`, which must call the same function.
//! 8. [`explain`]: `meshctl policy explain`, one flow's decision over an agent's state;
//!    [`istio`]: the `security.istio.io` twins' differences, applied at the boundary;
//!    [`stored`]: objects as the control plane stores and sends them (metadata and untyped
//!    spec, in either group, [`SecurityGroup`]), and [`Policy`], any kind converted.
//!
//! The invariant everything here keeps: a policy a proxy cannot fully understand never lets
//! through a connection or request the author's policy would have denied.
//!
//! Typical use on a node: convert every object with [`AuthzPolicy::compile`] /
//! [`PeerPolicy::compile`], report [`status::authorization_condition`] on it, build an
//! [`Engine`] (immutable, cheap to share behind an `ArcSwap`), and call [`Engine::decide`] per
//! connection. At a waypoint, per request: [`normalize_path`] (400 on error), then
//! [`JwtAuthenticator::authenticate`] (401 for an invalid token), then
//! [`Engine::decide_request`].

pub mod engine;
pub mod explain;
pub mod facts;
pub mod istio;
pub mod jwt;
pub mod matching;
pub mod model;
pub mod normalize;
pub mod status;
pub mod stored;
mod targets;

#[cfg(test)]
mod tests;

pub use engine::{
    DEFAULT_ROOT_NAMESPACE, Decision, Engine, MtlsResolution, PeerAuthSet, PolicySet, Reason,
    Verdict, WaypointPolicies,
};
pub use facts::{Destination, Flow, RequestFacts, VerifiedJwt, WaypointTarget};
pub use jwt::{JwtAuthenticator, JwtOutcome, JwtPolicy};
pub use model::{AuthzPolicy, Binding, MtlsMode, PeerPolicy, PolicyError, PolicyId, TargetRef};
pub use normalize::{NormalizedPath, PathError, normalize_path};
pub use stored::{Policy, PolicyKind, SecurityGroup};

pub use crate::k8s::policy::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};
