//! Whether a rule, and so a policy, matches what is known of a connection or a request
//! ([`super::facts`]).
//!
//! **Three-valued matching.** Some conditions cannot be decided: a field the node cannot
//! evaluate, or a source address the caller does not know. Each condition evaluates to yes,
//! no or unknown ([`Truth`], Kleene logic: `and` is the minimum, `or` the maximum, `not` swaps
//! yes and no). A `DENY` rule denies unless it is surely not matching; an `ALLOW` rule allows
//! only when it surely matches ([`AuthzPolicy::matching_rule`]). So whatever the unknown value
//! really is, the verdict is never more permissive than the one for its true value.
//!
//! **Plaintext sources** have no principal and no namespace: `principals`, `namespaces`,
//! `serviceAccounts` and `trustDomains` conditions do not match them, their `not` forms do
//! (as in Istio).
//!
//! **Request facts.** At a waypoint a decision also sees the request
//! ([`RequestFacts`]); HTTP and JWT conditions are then true or false (their forms are
//! described in [`super::model::StringMatch`] and the `attributes` part of the model). Node
//! agents have none, and such conditions are unknown, exactly as fields they cannot read.

use std::{borrow::Cow, net::IpAddr};

use http::{HeaderMap, HeaderName};

use super::{
    facts::{Flow, RequestFacts},
    model::{
        Action, AuthzPolicy, HttpMatch, IpBlock, NamespaceMatch, OperationMatch, PrincipalMatch,
        Rule, ServiceAccountMatch, SourceMatch, StringMatch, TrustDomainMatch, WhenKey, WhenMatch,
        WhenValue,
    },
};
use crate::identity::Identity;

/// Kleene truth values, ordered so that `and` is `min` and `or` is `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Truth {
    No,
    Unknown,
    Yes,
}

impl Truth {
    pub fn from_bool(b: bool) -> Self {
        if b { Self::Yes } else { Self::No }
    }

    #[allow(
        clippy::should_implement_trait,
        reason = "three-valued: `!` on a Truth would read as a bool's"
    )]
    pub fn not(self) -> Self {
        match self {
            Self::No => Self::Yes,
            Self::Unknown => Self::Unknown,
            Self::Yes => Self::No,
        }
    }

    /// `or` over the items, stopping at the first yes.
    pub fn any<T>(items: &[T], mut f: impl FnMut(&T) -> Truth) -> Self {
        let mut t = Self::No;
        for item in items {
            t = t.max(f(item));
            if t == Self::Yes {
                break;
            }
        }
        t
    }

    fn start(unevaluable: bool) -> Self {
        if unevaluable {
            Self::Unknown
        } else {
            Self::Yes
        }
    }
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

fn principals(list: &[PrincipalMatch], source: Option<&Identity>) -> Truth {
    let Some(id) = source else {
        return Truth::No;
    };
    Truth::any(list, |m| match m {
        PrincipalMatch::Exact(p) => Truth::from_bool(p == id),
        PrincipalMatch::AnyAuthenticated => Truth::Yes,
        PrincipalMatch::Unsupported => Truth::Unknown,
    })
}

fn namespaces(list: &[NamespaceMatch], source: Option<&Identity>) -> Truth {
    let Some(id) = source else {
        return Truth::No;
    };
    Truth::any(list, |m| match m {
        NamespaceMatch::Exact(ns) => Truth::from_bool(ns == id.namespace()),
        NamespaceMatch::AnyAuthenticated => Truth::Yes,
        NamespaceMatch::Unsupported => Truth::Unknown,
    })
}

fn service_accounts(list: &[ServiceAccountMatch], source: Option<&Identity>) -> Truth {
    let Some(id) = source else {
        return Truth::No;
    };
    Truth::any(list, |m| match m {
        ServiceAccountMatch::Exact {
            namespace,
            service_account,
        } => {
            Truth::from_bool(namespace == id.namespace() && service_account == id.service_account())
        }
        ServiceAccountMatch::Unsupported => Truth::Unknown,
    })
}

fn trust_domains(list: &[TrustDomainMatch], source: Option<&Identity>) -> Truth {
    let Some(id) = source else {
        return Truth::No;
    };
    Truth::any(list, |m| match m {
        TrustDomainMatch::Exact(td) => Truth::from_bool(td == id.trust_domain()),
        TrustDomainMatch::Unsupported => Truth::Unknown,
    })
}

fn ip_blocks(list: &[IpBlock], ip: Option<IpAddr>) -> Truth {
    match ip {
        Some(ip) => Truth::from_bool(list.iter().any(|b| b.contains(ip))),
        None => Truth::Unknown,
    }
}

impl SourceMatch {
    /// The match for a connection (no request facts).
    pub fn eval(&self, flow: &Flow<'_>) -> Truth {
        self.eval_with(flow, None)
    }

    pub(super) fn eval_with(&self, flow: &Flow<'_>, request: Option<&Prepared<'_>>) -> Truth {
        let source = flow.source;
        // Each condition present narrows the match (`and`); stop once it surely fails.
        let conditions = [
            (
                !self.principals.is_empty(),
                Condition::Principals(&self.principals, false),
            ),
            (
                !self.not_principals.is_empty(),
                Condition::Principals(&self.not_principals, true),
            ),
            (
                !self.namespaces.is_empty(),
                Condition::Namespaces(&self.namespaces, false),
            ),
            (
                !self.not_namespaces.is_empty(),
                Condition::Namespaces(&self.not_namespaces, true),
            ),
            (
                !self.service_accounts.is_empty(),
                Condition::ServiceAccounts(&self.service_accounts, false),
            ),
            (
                !self.not_service_accounts.is_empty(),
                Condition::ServiceAccounts(&self.not_service_accounts, true),
            ),
            (
                !self.trust_domains.is_empty(),
                Condition::TrustDomains(&self.trust_domains, false),
            ),
            (
                !self.not_trust_domains.is_empty(),
                Condition::TrustDomains(&self.not_trust_domains, true),
            ),
            (
                !self.ip_blocks.is_empty(),
                Condition::IpBlocks(&self.ip_blocks, false),
            ),
            (
                !self.not_ip_blocks.is_empty(),
                Condition::IpBlocks(&self.not_ip_blocks, true),
            ),
            (
                !self.request_principals.is_empty(),
                Condition::RequestPrincipals(&self.request_principals, false),
            ),
            (
                !self.not_request_principals.is_empty(),
                Condition::RequestPrincipals(&self.not_request_principals, true),
            ),
        ];
        let mut t = Truth::start(self.unevaluable);
        for (present, condition) in conditions {
            if !present {
                continue;
            }
            let (value, negated) = match condition {
                Condition::Principals(list, neg) => (principals(list, source), neg),
                Condition::Namespaces(list, neg) => (namespaces(list, source), neg),
                Condition::ServiceAccounts(list, neg) => (service_accounts(list, source), neg),
                Condition::TrustDomains(list, neg) => (trust_domains(list, source), neg),
                Condition::IpBlocks(list, neg) => (ip_blocks(list, flow.source_ip), neg),
                Condition::RequestPrincipals(list, neg) => {
                    (request_principals(list, false, request), neg)
                }
            };
            t = t.min(if negated { value.not() } else { value });
            if t == Truth::No {
                break;
            }
        }
        t
    }
}

enum Condition<'a> {
    Principals(&'a [PrincipalMatch], bool),
    Namespaces(&'a [NamespaceMatch], bool),
    ServiceAccounts(&'a [ServiceAccountMatch], bool),
    TrustDomains(&'a [TrustDomainMatch], bool),
    IpBlocks(&'a [IpBlock], bool),
    RequestPrincipals(&'a [StringMatch], bool),
}

impl OperationMatch {
    /// The match for a connection (no request facts).
    pub fn eval(&self, port: u16) -> Truth {
        self.eval_with(port, None)
    }

    pub(super) fn eval_with(&self, port: u16, request: Option<&Prepared<'_>>) -> Truth {
        let mut t = Truth::start(self.unevaluable);
        if !self.ports.is_empty() {
            t = t.min(Truth::from_bool(self.ports.contains(&port)));
        }
        if !self.not_ports.is_empty() {
            t = t.min(Truth::from_bool(!self.not_ports.contains(&port)));
        }
        if t != Truth::No && !self.http.is_empty() {
            t = t.min(self.http.eval(request));
        }
        t
    }
}

impl Rule {
    /// The match for a connection (no request facts).
    pub fn eval(&self, flow: &Flow<'_>) -> Truth {
        self.eval_with(flow, None)
    }

    pub(super) fn eval_with(&self, flow: &Flow<'_>, request: Option<&Prepared<'_>>) -> Truth {
        if !self.port_hint.may_match(flow.port) {
            return Truth::No;
        }
        let mut t = Truth::start(self.unevaluable);
        // Ports first: the cheapest test, and often the one that rules a rule out.
        if !self.to.is_empty() {
            t = t.min(Truth::any(&self.to, |op| op.eval_with(flow.port, request)));
            if t == Truth::No {
                return t;
            }
        }
        if !self.from.is_empty() {
            t = t.min(Truth::any(&self.from, |s| s.eval_with(flow, request)));
            if t == Truth::No {
                return t;
            }
        }
        for condition in &self.when {
            t = t.min(condition.eval(flow, request));
            if t == Truth::No {
                break;
            }
        }
        t
    }
}

impl AuthzPolicy {
    /// The first rule that makes this policy act on the flow, and whether that rule matched
    /// only because part of it could not be evaluated (a fail-closed denial).
    pub fn matching_rule(&self, flow: &Flow<'_>) -> Option<(usize, bool)> {
        self.matching_rule_with(flow, None)
    }

    pub(super) fn matching_rule_with(
        &self,
        flow: &Flow<'_>,
        request: Option<&Prepared<'_>>,
    ) -> Option<(usize, bool)> {
        match self.action {
            Action::Deny => {
                self.rules
                    .iter()
                    .enumerate()
                    .find_map(|(i, r)| match r.eval_with(flow, request) {
                        Truth::Yes => Some((i, false)),
                        Truth::Unknown => Some((i, true)),
                        Truth::No => None,
                    })
            }
            Action::Allow => self
                .rules
                .iter()
                .position(|r| !r.unevaluable && r.eval_with(flow, request) == Truth::Yes)
                .map(|i| (i, false)),
            Action::Audit => None,
        }
    }
}

impl StringMatch {
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
}

/// `or` over `list` matched against one request attribute.
fn any_of(list: &[StringMatch], value: Option<&str>) -> Truth {
    Truth::any(list, |m| m.eval(value))
}

impl HttpMatch {
    /// Unknown without request facts (when there is any condition).
    fn eval(&self, request: Option<&Prepared<'_>>) -> Truth {
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
fn request_principals(
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
    fn eval(&self, flow: &Flow<'_>, request: Option<&Prepared<'_>>) -> Truth {
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
            principals(std::slice::from_ref(m), *source)
        }
        (WhenValue::Namespace(m), Fact::Source(source)) => {
            namespaces(std::slice::from_ref(m), *source)
        }
        (WhenValue::Port(p), Fact::Port(port)) => Truth::from_bool(p == port),
        // A value of another shape than the key's cannot be compared.
        _ => Truth::Unknown,
    }
}
