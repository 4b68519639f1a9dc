//! Authorization and authentication: the `security.trellis.dev/v1` policies, the decision the
//! node proxy makes for every inbound connection (layer 4), and the one a waypoint makes for
//! every request (layer 7).
//!
//! - [`crd`]: `AuthorizationPolicy`, `PeerAuthentication` and `RequestAuthentication` as
//!   users write them (Istio's fields), with generated schemas.
//! - [`model`]: the converted policies. Invalid objects are rejected one by one, with an error
//!   naming the field, and replaced by a fail-closed stand-in; fields the enforcing proxy
//!   cannot evaluate fail closed rule by rule.
//! - [`binding`]: where a policy is enforced: on workloads (selector, node agents) or at
//!   waypoints (`targetRefs`).
//! - [`eval`]: the node's decision ([`Engine::decide`]): which policy and rule decided, for
//!   access logs and `meshctl policy explain`, which must call the same function.
//! - [`waypoint`]: the waypoint's decision ([`Engine::decide_request`]) over request facts
//!   ([`request`]).
//! - [`normalize`]: the one path form that is authorized, routed and forwarded.
//! - [`jwt`]: `RequestAuthentication` at waypoints: token verification and key sets.
//! - [`explain`]: `meshctl policy explain`, one flow's decision over an agent's state.
//! - [`status`]: the `Accepted` status condition of each object.
//! - [`stored`]: objects as the control plane stores and sends them (metadata and untyped spec),
//!   and [`Policy`], any kind converted.
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

pub mod binding;
pub mod eval;
pub mod explain;
pub mod jwt;
pub mod model;
pub mod normalize;
pub mod request;
pub mod status;
pub mod stored;
pub mod waypoint;

#[cfg(test)]
mod tests;

pub use crate::k8s::policy::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};
pub use binding::{Binding, TargetRef};
// The kinds as written, as this module's files name them.
use crate::k8s::policy as crd;
pub use eval::{
    DEFAULT_ROOT_NAMESPACE, Decision, Destination, Engine, Flow, MtlsResolution, PeerAuthSet,
    PolicySet, Reason, Verdict,
};
pub use jwt::{JwtAuthenticator, JwtOutcome, JwtPolicy, VerifiedJwt};
pub use model::{AuthzPolicy, MtlsMode, PeerPolicy, PolicyError, PolicyId};
pub use normalize::{NormalizedPath, PathError, normalize_path};
pub use request::{RequestFacts, WaypointTarget};
pub use stored::{Policy, PolicyKind};
pub use waypoint::WaypointPolicies;
