//! Layer-4 authorization: the `security.trellis.dev/v1` policies and the decision the node
//! proxy makes for every inbound connection.
//!
//! - [`crd`]: `AuthorizationPolicy` and `PeerAuthentication` as users write them (Istio's
//!   fields), with generated schemas.
//! - [`model`]: the converted policies. Invalid objects are rejected one by one, with an error
//!   naming the field, and replaced by a fail-closed stand-in; fields a layer-4 proxy cannot
//!   evaluate fail closed rule by rule.
//! - [`eval`]: the decision ([`Engine::decide`]): which policy and rule decided, for access
//!   logs and `meshctl policy explain`, which must call the same function.
//! - [`explain`]: `meshctl policy explain`, one flow's decision over an agent's state.
//! - [`status`]: the `Accepted` status condition of each object.
//! - [`stored`]: objects as the control plane stores and sends them (metadata and untyped spec),
//!   and [`Policy`], either kind converted.
//!
//! The invariant everything here keeps: a policy the node cannot fully understand never lets
//! through a connection the author's policy would have denied.
//!
//! Typical use: convert every object with [`AuthzPolicy::compile`] / [`PeerPolicy::compile`],
//! report [`status::authorization_condition`] on it, build an [`Engine`] (immutable, cheap to
//! share behind an `ArcSwap`), and call [`Engine::decide`] per connection.

pub mod crd;
pub mod eval;
pub mod explain;
pub mod model;
pub mod status;
pub mod stored;

#[cfg(test)]
mod tests;

pub use crd::{AuthorizationPolicy, PeerAuthentication};
pub use eval::{
    DEFAULT_ROOT_NAMESPACE, Decision, Destination, Engine, Flow, MtlsResolution, PeerAuthSet,
    PolicySet, Reason, Verdict,
};
pub use model::{AuthzPolicy, MtlsMode, PeerPolicy, PolicyError, PolicyId};
pub use stored::{Policy, PolicyKind};
