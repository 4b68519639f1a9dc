//! Routes as the waypoint evaluates them: validated, defaults applied, regular expressions
//! compiled, header names parsed. Built only by [`super::compile`]; read by the table
//! ([`super::table`]), the matchers ([`super::matching`]) and the filters
//! ([`super::filters`]).

use std::{fmt, time::Duration};

use http::{HeaderName, HeaderValue, Method, StatusCode};
use regex::Regex;

use super::RouteId;
use crate::l7::resilience::fault::FaultPolicy;

/// A backend or mirror port meaning "the port the client dialled" (a VirtualService
/// destination without `port`).
pub const SAME_PORT: u16 = 0;

/// A route that passed validation.
#[derive(Debug, Clone)]
pub struct Route {
    pub id: RouteId,
    pub generation: Option<i64>,
    /// Empty: any host.
    pub(crate) hostnames: Vec<Hostname>,
    pub(crate) rules: Vec<Rule>,
}

impl Route {
    /// Why some requests on this route get a 500 instead of being served: filters this
    /// waypoint does not implement, which must not be skipped.
    pub fn unsupported_filters(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().flat_map(|rule| {
            rule.filters.unsupported.iter().map(String::as_str).chain(
                rule.backends.iter().filter_map(|slot| match slot {
                    BackendSlot::Usable(b) => b.filters.unsupported.as_deref(),
                    BackendSlot::Invalid(_) => None,
                }),
            )
        })
    }
}

/// A `spec.hostnames` entry, lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Hostname {
    Exact(String),
    /// `*.example.com`, stored as the suffix `.example.com`: any host with at least one more
    /// label matches.
    Wildcard(String),
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: Option<String>,
    pub(crate) matches: Matches,
    pub(crate) filters: Filters,
    pub(crate) backends: Vec<BackendSlot>,
    pub timeouts: Timeouts,
    pub retry: Option<Retry>,
    /// Faults injected into the requests this rule takes (a VirtualService's `fault`);
    /// applied before, and instead of, the Service's own.
    pub fault: Option<FaultPolicy>,
}

/// A rule's matches, defaults applied: never empty.
#[derive(Debug, Clone)]
pub(crate) enum Matches {
    Http(Vec<HttpMatch>),
    Grpc(Vec<GrpcMatch>),
}

impl Matches {
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Http(m) => m.len(),
            Self::Grpc(m) => m.len(),
        }
    }

    /// The `PathPrefix` of match `index`, if it is one: what `ReplacePrefixMatch` replaces.
    pub(crate) fn prefix(&self, index: usize) -> Option<&str> {
        match self {
            Self::Http(m) => match m.get(index).map(|m| &m.path) {
                Some(PathMatch::Prefix { prefix, .. }) => Some(prefix),
                _ => None,
            },
            Self::Grpc(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct HttpMatch {
    pub path: PathMatch,
    /// Deduplicated by name (the first entry for a name counts).
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
    pub method: Option<Method>,
}

#[derive(Debug, Clone)]
pub(crate) enum PathMatch {
    Exact(String),
    /// Matches whole path segments. `prefix` has no trailing `/` (so `/` is stored as `""`);
    /// `written` is the length as written, which orders prefixes by precedence.
    Prefix {
        prefix: String,
        written: usize,
    },
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub(crate) enum StringMatch {
    Exact(String),
    /// Anchored at both ends: the whole value must match.
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub(crate) struct HeaderMatch {
    pub name: HeaderName,
    pub value: StringMatch,
}

#[derive(Debug, Clone)]
pub(crate) struct QueryMatch {
    /// Compared exactly (case-sensitive), after percent-decoding the request's names.
    pub name: String,
    pub value: StringMatch,
}

/// Matches `POST /<service>/<method>` gRPC requests.
#[derive(Debug, Clone)]
pub(crate) struct GrpcMatch {
    /// `None`: any service.
    pub service: Option<StringMatch>,
    /// `None`: any method.
    pub method: Option<StringMatch>,
    pub headers: Vec<HeaderMatch>,
}

/// The filters of a rule or of one backend.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub(crate) request_headers: Option<HeaderModifier>,
    pub(crate) response_headers: Option<HeaderModifier>,
    pub(crate) redirect: Option<RedirectConfig>,
    pub(crate) rewrite: Option<RewriteConfig>,
    pub(crate) mirrors: Vec<Mirror>,
    /// A filter this waypoint does not implement (`path: why`): requests it would have
    /// processed get a 500 instead of skipping it.
    pub(crate) unsupported: Option<String>,
}

/// `RequestHeaderModifier` / `ResponseHeaderModifier`. Names are distinct across the three
/// lists, so the order of application does not matter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RedirectConfig {
    /// `http` or `https`; `None`: the request's.
    pub scheme: Option<&'static str>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: StatusCode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RewriteConfig {
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PathModifier {
    /// The whole path (the query is kept).
    Full(String),
    /// Replaces the matched `PathPrefix`; stored without a trailing `/`.
    Prefix(String),
}

/// A `RequestMirror` filter whose backend resolved. Responses from it are to be ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub namespace: String,
    pub name: String,
    /// [`SAME_PORT`]: the port the client dialled.
    pub port: u16,
    /// Mirror `numerator` out of `denominator` requests (`denominator` >= 1).
    pub numerator: u32,
    pub denominator: u32,
}

impl Mirror {
    /// Whether to mirror this request, given a uniformly random number.
    pub fn selected(&self, random: u64) -> bool {
        scale(random, u64::from(self.denominator)) < u64::from(self.numerator)
    }
}

/// Maps a uniformly random `u64` onto `0..n` without modulo bias worth mentioning (the top
/// 64 bits of the 128-bit product). `n` must be nonzero for the result to be below `n`.
pub(crate) fn scale(random: u64, n: u64) -> u64 {
    // The product of two u64 values fits in u128; its top half is below `n`.
    ((u128::from(random) * u128::from(n)) >> 64) as u64
}

/// A backend that resolved to a Service in the route's namespace.
#[derive(Debug, Clone)]
pub struct Backend {
    pub namespace: String,
    pub name: String,
    /// [`SAME_PORT`]: the port the client dialled.
    pub port: u16,
    /// A subset of the Service's endpoints (a DestinationRule's, by name); `None`: all.
    pub subset: Option<String>,
    pub weight: u32,
    /// Applied only to requests sent to this backend, after the rule's filters.
    pub filters: Filters,
}

/// A backend reference that did not resolve: requests it would have received get a 500.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidBackend {
    /// `[group/]kind namespace/name` as referenced.
    pub reference: String,
    pub problem: RefProblem,
    pub weight: u32,
}

/// Why a backend reference does not resolve, decided from the route alone. (Whether the
/// Service exists is the caller's knowledge: see [`super::status`].)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefProblem {
    /// Not a core `Service`.
    InvalidKind,
    /// In another namespace: cross-namespace references need a `ReferenceGrant`, which is not
    /// supported.
    RefNotPermitted,
}

impl RefProblem {
    /// The `ResolvedRefs` condition reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::InvalidKind => "InvalidKind",
            Self::RefNotPermitted => "RefNotPermitted",
        }
    }
}

impl fmt::Display for RefProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InvalidKind => "only core Services can be backends",
            Self::RefNotPermitted => {
                "backends in another namespace are not permitted (ReferenceGrant is not supported)"
            }
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) enum BackendSlot {
    /// Boxed: a backend with its filters is ten times the size of an invalid reference.
    Usable(Box<Backend>),
    Invalid(InvalidBackend),
}

impl BackendSlot {
    pub(crate) fn weight(&self) -> u32 {
        match self {
            Self::Usable(b) => b.weight,
            Self::Invalid(b) => b.weight,
        }
    }
}

/// `timeouts` of an `HTTPRoute` rule. `None`: no timeout (the field was absent, or `0s`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub request: Option<Duration>,
    pub backend_request: Option<Duration>,
}

/// `retry` of an `HTTPRoute` rule, as written (validated); applying it is up to the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retry {
    /// Status codes to retry on (400-599).
    pub codes: Vec<StatusCode>,
    /// Retries after the first attempt; `None`: the implementation's default.
    pub attempts: Option<u32>,
    pub backoff: Option<Duration>,
    /// Also retry tries reset before a response (a VirtualService's `reset`,
    /// `refused-stream`).
    pub reset: bool,
}
