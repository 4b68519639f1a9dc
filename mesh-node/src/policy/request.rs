//! Request attributes: the HTTP and JWT conditions of `AuthorizationPolicy` rules, which only
//! a waypoint can evaluate, and the facts of one request it evaluates them on.
//!
//! **Patterns** are Istio's, for every string attribute except identities: `value` (exact),
//! `prefix*`, `*suffix`, and `*` alone (present, any value). Anything else with a `*`, or a
//! path template (`{*}`), is an unsupported value: it evaluates as unknown, so it fails closed
//! (an `ALLOW` rule using it matches nothing; a `DENY` rule treats it as matching).
//!
//! - `methods`: exact and case-sensitive (`get` is not `GET`), no patterns.
//! - `paths`: matched against the normalized path without its query
//!   ([`super::normalize`]); exact and prefix values must already be in normal form (a value
//!   the waypoint would never see, like `/a//b`, is unsupported rather than silently dead).
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

use std::borrow::Cow;

use http::{HeaderMap, HeaderName};

use super::{
    eval::{Flow, Truth},
    jwt::VerifiedJwt,
    model::{NamespaceMatch, PrincipalMatch, namespace_match, principal_match},
    normalize::normalize_path,
};
use crate::identity::Identity;

/// The waypoint a request arrived at and the services it is for: which policies apply.
#[derive(Debug, Clone, Copy)]
pub struct WaypointTarget<'a> {
    /// The waypoint's `Gateway` object.
    pub gateway_namespace: &'a str,
    pub gateway_name: &'a str,
    /// The destination services (namespace, name): the one whose address was dialled, or,
    /// for a request addressed to a pod, every service that has the pod as an endpoint (the
    /// policies attached to a service protect its endpoints however they are addressed).
    pub services: &'a [(&'a str, &'a str)],
}

/// What a waypoint knows about one request, beyond the connection ([`Flow`]).
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// The normalized path ([`super::normalize::NormalizedPath::path`]); a query, if passed
    /// along, is ignored.
    pub path: &'a str,
    /// The request's one authority (`:authority`, absolute-form target or `Host`, which the
    /// waypoint has made agree); case and port are ignored when matching.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    /// The request's verified JWT, if it carried one ([`super::jwt::JwtAuthenticator`]).
    pub jwt: Option<&'a VerifiedJwt>,
}

/// Request facts prepared once per decision.
pub(super) struct Prepared<'a> {
    facts: &'a RequestFacts<'a>,
    host: String,
    path: &'a str,
}

impl<'a> Prepared<'a> {
    pub(super) fn new(facts: &'a RequestFacts<'a>) -> Self {
        let path = facts.path.split_once('?').map_or(facts.path, |(p, _)| p);
        Self {
            facts,
            host: request_host(facts.host),
            path,
        }
    }
}

/// The host part of an authority, lower-cased, without port and without one trailing dot
/// (`Example.COM.:8080` is `example.com`).
pub fn request_host(authority: &str) -> String {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        // An IPv6 literal keeps its brackets; what follows `]` can only be a port.
        match rest.split_once(']') {
            Some((ip, _)) => return format!("[{}]", ip.to_ascii_lowercase()),
            None => authority,
        }
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    host.to_ascii_lowercase()
}

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

    /// Whether `value` (absent: `None`) matches. Absent values match no pattern.
    pub fn eval(&self, value: Option<&str>) -> Truth {
        let Some(v) = value else {
            return Truth::No;
        };
        match self {
            Self::Exact(e) => Truth::from_bool(v == e),
            Self::Prefix(p) => Truth::from_bool(v.starts_with(p.as_str())),
            Self::Suffix(s) => Truth::from_bool(v.ends_with(s.as_str())),
            Self::Present => Truth::Yes,
            Self::Unsupported => Truth::Unknown,
        }
    }

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

/// The value of an attribute in one request.
enum Fact<'a> {
    Absent,
    Str(Cow<'a, str>),
    /// Several values, any of which may match (audiences, a list claim).
    List(Vec<&'a str>),
    Source(Option<&'a Identity>),
    Port(u16),
    Unknown,
}

impl WhenMatch {
    /// Unknown without request facts; otherwise whether the attribute has one of `values`
    /// (if any) and none of `not_values` (if any). Istio requires one of the two lists;
    /// without either the condition is unknown.
    pub(super) fn eval(&self, flow: &Flow<'_>, request: Option<&Prepared<'_>>) -> Truth {
        let Some(request) = request else {
            return Truth::Unknown;
        };
        if self.values.is_empty() && self.not_values.is_empty() {
            return Truth::Unknown;
        }
        if let WhenKey::Header(name) = &self.key {
            return self.eval_header(request.facts.headers, name);
        }
        self.eval_fact(&self.fact(flow, request.facts))
    }

    fn eval_fact(&self, fact: &Fact<'_>) -> Truth {
        let mut t = Truth::Yes;
        if !self.values.is_empty() {
            t = t.min(Truth::any(&self.values, |v| value_matches(v, fact)));
        }
        if !self.not_values.is_empty() {
            t = t.min(Truth::any(&self.not_values, |v| value_matches(v, fact)).not());
        }
        t
    }

    /// A header condition on each of the header's values: their common verdict, or unknown
    /// when they disagree (a repeated header must not let a client pick the value a policy
    /// judges while the backend reads another).
    fn eval_header(&self, headers: &HeaderMap, name: &HeaderName) -> Truth {
        let mut verdict = None;
        for value in headers.get_all(name) {
            let fact = value
                .to_str()
                .map_or(Fact::Unknown, |v| Fact::Str(Cow::Borrowed(v)));
            let t = self.eval_fact(&fact);
            match verdict {
                None => verdict = Some(t),
                Some(seen) if seen == t => {}
                Some(_) => return Truth::Unknown,
            }
        }
        verdict.unwrap_or_else(|| self.eval_fact(&Fact::Absent))
    }

    fn fact<'a>(&'a self, flow: &Flow<'a>, facts: &'a RequestFacts<'a>) -> Fact<'a> {
        let jwt = facts.jwt;
        match &self.key {
            // Judged value by value in `eval_header`.
            WhenKey::Header(_) => Fact::Unknown,
            WhenKey::AuthPrincipal => jwt.map_or(Fact::Absent, |j| {
                Fact::Str(Cow::Borrowed(j.principal.as_str()))
            }),
            WhenKey::AuthAudiences => jwt.map_or(Fact::Absent, |j| {
                Fact::List(j.audiences.iter().map(String::as_str).collect())
            }),
            WhenKey::AuthPresenter => jwt.map_or(Fact::Absent, |j| claim_fact(j.claims.get("azp"))),
            WhenKey::AuthClaim(path) => jwt.map_or(Fact::Absent, |j| {
                let mut value = Some(&j.claims);
                for part in path {
                    value = value.and_then(|v| v.get(part.as_str()));
                }
                claim_fact(value)
            }),
            WhenKey::SourcePrincipal | WhenKey::SourceNamespace => Fact::Source(flow.source),
            WhenKey::DestinationPort => Fact::Port(flow.port),
            WhenKey::Unsupported => Fact::Unknown,
        }
    }
}

fn claim_fact(value: Option<&serde_json::Value>) -> Fact<'_> {
    match value {
        None | Some(serde_json::Value::Null) => Fact::Absent,
        Some(serde_json::Value::String(s)) => Fact::Str(Cow::Borrowed(s)),
        Some(serde_json::Value::Array(items)) => {
            let strings: Option<Vec<&str>> = items.iter().map(|i| i.as_str()).collect();
            strings.map_or(Fact::Unknown, Fact::List)
        }
        // Numbers, booleans and objects: Istio compares strings only.
        Some(_) => Fact::Unknown,
    }
}

fn value_matches(value: &WhenValue, fact: &Fact<'_>) -> Truth {
    match (value, fact) {
        (WhenValue::Unsupported, _) | (_, Fact::Unknown) => Truth::Unknown,
        (WhenValue::Str(m), Fact::Str(s)) => m.eval(Some(s)),
        (WhenValue::Str(m), Fact::List(items)) => Truth::any(items, |i| m.eval(Some(i))),
        (WhenValue::Str(_), Fact::Absent) => Truth::No,
        (WhenValue::Principal(m), Fact::Source(source)) => {
            super::eval::principals(std::slice::from_ref(m), *source)
        }
        (WhenValue::Namespace(m), Fact::Source(source)) => {
            super::eval::namespaces(std::slice::from_ref(m), *source)
        }
        (WhenValue::Port(p), Fact::Port(port)) => Truth::from_bool(p == port),
        // A value of another shape than the key's cannot be compared.
        _ => Truth::Unknown,
    }
}

/// `or` over `list` matched against one request attribute.
fn any_of(list: &[StringMatch], value: Option<&str>) -> Truth {
    Truth::any(list, |m| m.eval(value))
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

    /// Unknown without request facts (when there is any condition).
    pub(super) fn eval(&self, request: Option<&Prepared<'_>>) -> Truth {
        if self.is_empty() {
            return Truth::Yes;
        }
        let Some(r) = request else {
            return Truth::Unknown;
        };
        let host = Some(r.host.as_str());
        let method = Some(r.facts.method);
        let path = Some(r.path);
        let conditions: [(&[StringMatch], Option<&str>, bool); 6] = [
            (&self.methods, method, false),
            (&self.not_methods, method, true),
            (&self.paths, path, false),
            (&self.not_paths, path, true),
            (&self.hosts, host, false),
            (&self.not_hosts, host, true),
        ];
        let mut t = Truth::Yes;
        for (list, value, negated) in conditions {
            if list.is_empty() {
                continue;
            }
            let v = any_of(list, value);
            t = t.min(if negated { v.not() } else { v });
            if t == Truth::No {
                break;
            }
        }
        t
    }
}

/// `requestPrincipals` / `notRequestPrincipals` of a source: unknown without request facts.
pub(super) fn request_principals(
    list: &[StringMatch],
    negated: bool,
    request: Option<&Prepared<'_>>,
) -> Truth {
    let Some(r) = request else {
        return Truth::Unknown;
    };
    let principal = r.facts.jwt.map(|j| j.principal.as_str());
    let t = any_of(list, principal);
    if negated { t.not() } else { t }
}
