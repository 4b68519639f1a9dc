//! The policies as the node and the waypoints enforce them, converted from the custom
//! resources as users write them ([`crate::k8s::policy`]) with [`TryFrom`] (strict) or
//! `compile` (fail-closed stand-ins for rejected objects).
//!
//! Where a policy is enforced follows from `selector` / `targetRefs` ([`Binding`]): on
//! workloads by node agents, or on requests by waypoints. Conversion sorts every problem into
//! one of two kinds:
//!
//! - **Unsupported** fields and values are ones the enforcing proxy cannot evaluate (request
//!   attributes on workloads, wildcard principals, unmatchable patterns, fields unknown to this
//!   version). The policy is kept and those conditions fail closed: in an `ALLOW` rule they
//!   make the whole rule match nothing; in a `DENY` rule they count as matching, so the rule
//!   matches everything its other conditions allow. The evaluator implements both with a
//!   three-valued match. Rules are converted in `rules`.
//! - **Invalid** objects (a port that is not a number, an address that is not a CIDR, an
//!   unknown action, an unreadable scope) are rejected as a whole with an error naming the
//!   field ([`PolicyError`]). A rejected object is not ignored, which would weaken protection
//!   when it was a `DENY` or the only `ALLOW` of a workload: [`AuthzPolicy::compile`] puts a
//!   stand-in in its place that is at least as strict as anything the author could have meant
//!   (see [`StandIn`]), and the status condition says so.
//!
//! Identities match literally ([`PrincipalMatch`], [`NamespaceMatch`]); request attributes at
//! waypoints take Istio's exact, `prefix*`, `*suffix` and `*` forms ([`StringMatch`]).
//!
//! Files, each importing only files listed before it: `source` (identities, address
//! blocks), `conversion` (ids, errors, enforcement, helpers every kind's conversion shares),
//! `attributes` (request conditions), `binding` (where a policy is enforced), `authz` (the
//! evaluated form of an `AuthorizationPolicy`), `rules` and `compile` (its conversion), `peer`
//! (`PeerAuthentication`).

mod attributes;
mod authz;
mod binding;
mod compile;
mod conversion;
mod peer;
mod rules;
mod source;

pub use attributes::{HttpMatch, StringMatch, WhenKey, WhenMatch, WhenValue};
#[cfg(test)]
pub(crate) use authz::PortHint;
pub use authz::{Action, AuthzPolicy, OperationMatch, PolicyRef, Rule, SourceMatch};
pub use binding::{Binding, MAX_TARGET_REFS, TargetRef};
pub use conversion::{Enforcement, PolicyError, PolicyId, StandIn, Unsupported, Why};
pub(crate) use conversion::{identify, metadata, reject_extra, selector};
pub use peer::{MtlsMode, PeerPolicy};
pub use source::{IpBlock, NamespaceMatch, PrincipalMatch, ServiceAccountMatch, TrustDomainMatch};
