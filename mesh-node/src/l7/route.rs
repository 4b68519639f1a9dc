//! Gateway API routing at the waypoint: `HTTPRoute` and `GRPCRoute` (v1), from the object as
//! written to the rule a request takes.
//!
//! Routes arrive as written (kind, namespace, name, generation and the spec as JSON), the way
//! policies reach agents, and are converted on arrival by [`compile`], which never fails: a
//! route it cannot program carries its error, for the status, and is left out of routing.
//!
//! - [`crate::k8s::gateway`] (`spec` here): the wire types, lenient (strings and wide integers) so that a bad value is
//!   reported with its field path instead of vanishing in a deserialisation error.
//! - [`compile`](mod@compile): validation against the Gateway API's rules (enumerations, value
//!   grammars, `maxItems`, the CEL rules of the CRDs) and conversion into [`model`].
//! - [`table`]: [`RouteTable`], which answers "which rule applies to this request", and
//!   [`MatchedRule`], everything the waypoint needs to act on that rule.
//! - [`filters`]: request and response filters applied to `http` request and response parts.
//! - [`status`]: the `status.parents[]` conditions (`Accepted`, `ResolvedRefs`).
//!
//! Choices this implementation makes where the specification leaves room (each also noted
//! where it is implemented):
//!
//! - **Whole-route validity.** Any invalid value rejects the whole route (no per-rule
//!   `PartiallyInvalid`): the route is not programmed and `Accepted` is `False` with reason
//!   `UnsupportedValue` (or `IncompatibleFilters`) naming the field.
//! - **Filters that cannot be honoured fail closed.** A filter type this waypoint does not
//!   implement (`ExtensionRef`, `CORS`, `ExternalAuth`, anything unknown) is never skipped, as
//!   the specification requires: the route is programmed, requests reaching that rule (or
//!   that backend) get a 500, and `Accepted` is `False` saying so.
//! - **Attachment.** A route attaches to a Service only from the Service's own namespace
//!   ("producer" routes; "consumer" routes would need the caller's namespace, which routing
//!   does not see) and to a waypoint Gateway only from the Gateway's namespace (the default
//!   `allowedRoutes`). Hostnames are ignored for Service parents, as in the mesh profile.
//! - **Precedence.** Gateway API order (exact path, longest prefix, method, most headers,
//!   most query parameters); regular-expression paths rank between exact and prefix paths.
//!   Ties between routes go to the first in `namespace/name` order: creation timestamps do
//!   not reach the waypoint. For gRPC requests, `GRPCRoute` rules are tried before
//!   `HTTPRoute` rules on the same parent.
//! - **Regular expressions** use the `regex` crate's syntax (RE2-like, no backreferences or
//!   look-around), must match the whole value, and are size-limited ([`limits`]).
//!
//! Typical use: `compile` every route, publish `route_status` for each, build a
//! [`RouteTable`] (immutable, cheap to share behind an `ArcSwap`) and call
//! [`RouteTable::lookup`] per request.

pub mod compile;
pub mod duration;
pub mod error;
pub mod filters;
pub mod matching;
pub mod model;
pub mod status;
pub mod table;

#[cfg(test)]
mod tests;

use std::{fmt, str::FromStr};

pub use compile::{CompiledRoute, compile};
pub use error::RouteError;
pub use filters::{FilterFailure, Redirect, RequestAction};
pub use model::{Backend, InvalidBackend, Mirror, RefProblem, Retry, Timeouts};
pub use status::{ParentStatus, RouteStatus, route_status};
pub use table::{GatewayRef, MatchedRule, NoBackend, RouteTable, Routing, RuleId, ServiceRef};

// The routes as written, as this module's files name them.
use crate::k8s::gateway as spec;

/// Limits enforced on every route. Where the Gateway API CRDs set a `maxItems` or
/// `maxLength`, the limit is the same, so a route the API server accepts is never refused
/// for its size; the others bound what only this implementation interprets.
pub mod limits {
    /// `spec.parentRefs`.
    pub const PARENT_REFS: usize = 32;
    /// `spec.hostnames`.
    pub const HOSTNAMES: usize = 16;
    /// `spec.rules`.
    pub const RULES: usize = 16;
    /// `matches` of one `HTTPRoute` rule.
    pub const HTTP_MATCHES: usize = 64;
    /// `matches` of one `GRPCRoute` rule.
    pub const GRPC_MATCHES: usize = 8;
    /// `matches` over all rules of a route.
    pub const MATCHES_PER_ROUTE: usize = 128;
    /// `headers` and `queryParams` of one match.
    pub const CONDITIONS: usize = 16;
    /// `filters` of a rule or of a backend, and `set`/`add`/`remove` of a header filter.
    pub const FILTERS: usize = 16;
    /// `backendRefs` of a rule.
    pub const BACKEND_REFS: usize = 16;
    /// Path values and path replacements (bytes).
    pub const PATH_LENGTH: usize = 1024;
    /// Header values (bytes).
    pub const HEADER_VALUE_LENGTH: usize = 4096;
    /// Query parameter values, gRPC service and method names (bytes).
    pub const VALUE_LENGTH: usize = 1024;
    /// Header and query parameter names (bytes).
    pub const NAME_LENGTH: usize = 256;
    /// Hostnames (bytes).
    pub const HOSTNAME_LENGTH: usize = 253;
    /// Regular expressions in one route (this implementation's limit: each is a compiled
    /// program, so the count bounds a route's memory).
    pub const REGEXES_PER_ROUTE: usize = 64;
    /// Compiled size of one regular expression (bytes), and of its lazy DFA cache.
    pub const REGEX_SIZE: usize = 256 * 1024;
    /// Nesting depth of one regular expression.
    pub const REGEX_NESTING: u32 = 32;
    /// `retry.codes` (distinct codes from 400 to 599).
    pub const RETRY_CODES: usize = 200;
    /// Backend weights (`weight` maximum).
    pub const WEIGHT: u32 = 1_000_000;
}

/// The route kinds the waypoint serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    Http,
    Grpc,
    /// Istio's `VirtualService`, translated by [`crate::l7::istio`]: its rules are tried in
    /// the order written.
    Virtual,
}

impl RouteKind {
    /// The Gateway API group of both kinds.
    pub const GROUP: &'static str = crate::k8s::GATEWAY_GROUP;

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Http => "HTTPRoute",
            Self::Grpc => "GRPCRoute",
            Self::Virtual => "VirtualService",
        }
    }
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A kind other than `HTTPRoute` or `GRPCRoute`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a route kind the waypoint serves (HTTPRoute, GRPCRoute, VirtualService)")]
pub struct UnknownRouteKind(pub String);

impl FromStr for RouteKind {
    type Err = UnknownRouteKind;

    fn from_str(kind: &str) -> Result<Self, Self::Err> {
        match kind {
            "HTTPRoute" => Ok(Self::Http),
            "GRPCRoute" => Ok(Self::Grpc),
            "VirtualService" => Ok(Self::Virtual),
            other => Err(UnknownRouteKind(other.into())),
        }
    }
}

/// The object a route came from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteId {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for RouteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}
