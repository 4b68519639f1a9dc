//! Request attributes: the HTTP and JWT conditions of `AuthorizationPolicy` rules, which only
//! a waypoint can evaluate, as converted from the values written.
//!
//! **Patterns** are Istio's, for every string attribute except identities: `value` (exact),
//! `prefix*`, `*suffix`, and `*` alone (present, any value). Anything else with a `*`, or a
//! path template (`{*}`), is an unsupported value: it evaluates as unknown, so it fails closed
//! (an `ALLOW` rule using it matches nothing; a `DENY` rule treats it as matching).
//!
//! - `methods`: exact and case-sensitive (`get` is not `GET`), no patterns.
//! - `paths`: matched against the normalized path without its query
//!   ([`crate::policy::normalize`]); exact and prefix values must already be in normal form (a
//!   value the waypoint would never see, like `/a//b`, is unsupported rather than silently
//!   dead).
//! - `hosts`: matched against the request's one authority (the waypoint refuses a `Host` that
//!   disagrees with `:authority` or an absolute-form target, and two `Host` headers);
//!   case-insensitive and port-insensitive: the request's host is lower-cased and
//!   its port and one trailing dot removed; values with a port are unsupported.
//! - `requestPrincipals`: `<iss>/<sub>` of the verified JWT; no JWT matches nothing (so
//!   `notRequestPrincipals: ["*"]` matches requests without one).
//! - `when`: `request.headers[<name>]` (a header sent several times is judged value by value:
//!   the condition holds, or fails, only if it does for every value; when the values disagree
//!   it is unknown, so a `DENY` matches if any value matches and an `ALLOW` only if every
//!   value satisfies it; one field line is one value, commas included),
//!   `request.auth.principal`, `request.auth.audiences`, `request.auth.presenter`,
//!   `request.auth.claims[<c>]` (nested as `[a][b]`; a claim must be a string or a list of
//!   strings), `source.principal` and `source.namespace` (literal, like `principals` and
//!   `namespaces`), `destination.port`. Other keys are unsupported and fail closed.
//!
//! Without request facts (a node agent deciding a connection) every such condition is unknown.

use http::HeaderName;

use super::source::{NamespaceMatch, PrincipalMatch, namespace_match, principal_match};
use crate::policy::normalize::normalize_path;

/// One of Istio's string patterns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// `*`: any value, as long as there is one.
    Present,
    /// A value that cannot be matched as written; evaluates as unknown.
    Unsupported,
}

impl StringMatch {
    /// `*`, `prefix*`, `*suffix` or an exact value; any other `*` is unsupported.
    pub fn parse(value: &str) -> Self {
        if value == "*" {
            return Self::Present;
        }
        match (value.strip_prefix('*'), value.strip_suffix('*')) {
            (Some(suffix), None) if !suffix.contains('*') => Self::Suffix(suffix.into()),
            (None, Some(prefix)) if !prefix.contains('*') => Self::Prefix(prefix.into()),
            (None, None) if !value.contains('*') => Self::Exact(value.into()),
            _ => Self::Unsupported,
        }
    }

    /// The literal part of the pattern, if it has one.
    fn text(&self) -> Option<&str> {
        match self {
            Self::Exact(s) | Self::Prefix(s) | Self::Suffix(s) => Some(s),
            Self::Present | Self::Unsupported => None,
        }
    }
}

/// What a value of an HTTP field must look like, for the status message.
pub(super) const PATH_FORMS: &str =
    "paths are a normalized path (like /api/v1), a prefix (/api/*), a suffix (*.html) or *";
pub(super) const HOST_FORMS: &str =
    "hosts are a name without port (example.com), *.example.com, example.* or *";
pub(super) const METHOD_FORMS: &str = "methods are exact names (GET, POST), without wildcards";
pub(super) const PRINCIPAL_FORMS: &str =
    "request principals are <issuer>/<subject>, a prefix (issuer/*), a suffix (*/subject) or *";
pub(super) const VALUE_FORMS: &str = "values are exact, a prefix (abc*), a suffix (*abc) or *";

/// A `paths` value, or `Unsupported` when the waypoint could never see such a path.
pub(super) fn path_match(value: &str) -> StringMatch {
    let m = StringMatch::parse(value);
    let ok = match &m {
        // Exact values and prefixes are compared with normalized paths, so must be normal
        // themselves (a prefix `/a/.` would match nothing the waypoint forwards).
        StringMatch::Exact(p) | StringMatch::Prefix(p) => {
            !p.contains(['{', '}'])
                && normalize_path(p).is_ok_and(|n| n.path() == p && n.query().is_none())
        }
        StringMatch::Suffix(s) => !s.is_empty() && !s.contains(['?', '#', '{', '}', '\\']),
        StringMatch::Present => true,
        StringMatch::Unsupported => false,
    };
    if ok { m } else { StringMatch::Unsupported }
}

/// A `hosts` value, lower-cased.
pub(super) fn host_match(value: &str) -> StringMatch {
    let lower = value.to_ascii_lowercase();
    match StringMatch::parse(&lower) {
        // A port (or an IPv6 literal, which the request form would bracket) is not a host.
        m if m.text().is_some_and(|t| t.contains(':') || t.is_empty()) => StringMatch::Unsupported,
        m => m,
    }
}

/// A `methods` value: exact only.
pub(super) fn method_match(value: &str) -> StringMatch {
    let token = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'+-.^_`|~".contains(&b));
    if token {
        StringMatch::Exact(value.into())
    } else {
        StringMatch::Unsupported
    }
}

/// A `requestPrincipals` value.
pub(super) fn request_principal_match(value: &str) -> StringMatch {
    match StringMatch::parse(value) {
        StringMatch::Exact(e) if e.is_empty() => StringMatch::Unsupported,
        m => m,
    }
}

/// The attribute a `when` condition reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WhenKey {
    Header(HeaderName),
    AuthPrincipal,
    AuthAudiences,
    AuthPresenter,
    /// The path into the claims (`[a][b]` is `["a", "b"]`).
    AuthClaim(Vec<String>),
    SourcePrincipal,
    SourceNamespace,
    DestinationPort,
    /// A key this version does not evaluate: unknown.
    Unsupported,
}

/// The deepest claim path of a `request.auth.claims[..]` key.
const MAX_CLAIM_DEPTH: usize = 8;

impl WhenKey {
    pub fn parse(key: &str) -> Self {
        match key {
            "request.auth.principal" => return Self::AuthPrincipal,
            "request.auth.audiences" => return Self::AuthAudiences,
            "request.auth.presenter" => return Self::AuthPresenter,
            "source.principal" => return Self::SourcePrincipal,
            "source.namespace" => return Self::SourceNamespace,
            "destination.port" => return Self::DestinationPort,
            _ => {}
        }
        if let Some(name) = bracketed(key, "request.headers").and_then(|names| match &names[..] {
            [name] => HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).ok(),
            _ => None,
        }) {
            return Self::Header(name);
        }
        match bracketed(key, "request.auth.claims") {
            Some(path) if path.len() <= MAX_CLAIM_DEPTH => Self::AuthClaim(path),
            _ => Self::Unsupported,
        }
    }
}

/// `base[a][b]...` as `["a", "b"]`; `None` unless every part is a non-empty `[...]`.
fn bracketed(key: &str, base: &str) -> Option<Vec<String>> {
    let mut rest = key.strip_prefix(base)?;
    let mut parts = Vec::new();
    while !rest.is_empty() {
        let (part, after) = rest.strip_prefix('[')?.split_once(']')?;
        if part.is_empty() || part.contains('[') || parts.len() > MAX_CLAIM_DEPTH {
            return None;
        }
        parts.push(part.to_owned());
        rest = after;
    }
    (!parts.is_empty()).then_some(parts)
}

/// One value of a `when` condition, of the shape its key takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WhenValue {
    Str(StringMatch),
    Principal(PrincipalMatch),
    Namespace(NamespaceMatch),
    Port(u16),
    Unsupported,
}

impl WhenValue {
    /// The value as `key` reads it; `Unsupported` when it cannot be.
    pub fn parse(key: &WhenKey, value: &str) -> Self {
        match key {
            WhenKey::SourcePrincipal => match principal_match(value) {
                PrincipalMatch::Unsupported => Self::Unsupported,
                m => Self::Principal(m),
            },
            WhenKey::SourceNamespace => match namespace_match(value) {
                NamespaceMatch::Unsupported => Self::Unsupported,
                m => Self::Namespace(m),
            },
            WhenKey::DestinationPort => match value.parse::<u16>() {
                Ok(p) if p != 0 && value.bytes().all(|b| b.is_ascii_digit()) => Self::Port(p),
                _ => Self::Unsupported,
            },
            WhenKey::Unsupported => Self::Unsupported,
            _ => match StringMatch::parse(value) {
                StringMatch::Unsupported => Self::Unsupported,
                m => Self::Str(m),
            },
        }
    }
}

/// One `when` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhenMatch {
    pub key: WhenKey,
    pub values: Vec<WhenValue>,
    pub not_values: Vec<WhenValue>,
}

/// The HTTP conditions of one `to[].operation`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpMatch {
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
    pub methods: Vec<StringMatch>,
    pub not_methods: Vec<StringMatch>,
    pub paths: Vec<StringMatch>,
    pub not_paths: Vec<StringMatch>,
}

impl HttpMatch {
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
    }
}
