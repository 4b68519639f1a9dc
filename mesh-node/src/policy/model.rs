//! The policies as the node enforces them, converted from the custom resources.
//!
//! Conversion sorts every problem into one of two kinds:
//!
//! - **Unsupported** fields and values are ones a layer-4 proxy cannot evaluate (HTTP methods,
//!   JWT principals, `when` conditions, wildcard principals, fields unknown to this version).
//!   The policy is kept and those conditions fail closed: in an `ALLOW` rule they make the whole
//!   rule match nothing; in a `DENY` rule they count as matching, so the rule matches
//!   everything its other conditions allow. The evaluator implements both with a three-valued
//!   match ([`super::eval`]).
//! - **Invalid** objects (a port that is not a number, an address that is not a CIDR, an
//!   unknown action, an unreadable scope) are rejected as a whole with an error naming the
//!   field ([`PolicyError`]). A rejected object is not ignored, which would weaken protection
//!   when it was a `DENY` or the only `ALLOW` of a workload: [`AuthzPolicy::compile`] puts a
//!   stand-in in its place that is at least as strict as anything the author could have meant
//!   (see [`StandIn`]), and the status condition says so.
//!
//! Matching is literal throughout: principals are compared component by component with the
//! verified SPIFFE ID, namespaces by equality; the only pattern is Istio's `"*"` alone, meaning
//! "any authenticated source". Other wildcard or regular-expression forms are unsupported
//! values, never patterns.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
    sync::Arc,
};

use kube::ResourceExt;

use super::crd::{self, AuthorizationPolicy, ExtraFields, PeerAuthentication};
use crate::identity::Identity;

/// The object a policy came from: `namespace/name` and the generation it was converted from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyId {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why an object was rejected. The message starts with the field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("metadata.{0}: the object has none; it cannot be placed or reported on")]
    MissingMetadata(&'static str),
    #[error("{path}: {value:?} is not one of {allowed}")]
    UnknownValue {
        path: String,
        value: String,
        allowed: &'static str,
    },
    #[error("{path}: {value:?} is not a port number (1-65535)")]
    Port { path: String, value: String },
    #[error("{path}: {value:?} is not an IP address or CIDR block (like 10.0.0.0/8 or fd00::/8)")]
    IpBlock { path: String, value: String },
    /// The spec does not have the shape of the kind at all (a list where an object belongs).
    #[error("spec: cannot be read: {0}")]
    Unreadable(String),
    /// A field that changes what the whole object means, which this version cannot read.
    #[error("{path}: {why}")]
    Unsupported { path: String, why: Why },
}

impl PolicyError {
    /// The status condition reason for this rejection.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unsupported { .. } => "Unsupported",
            _ => "Invalid",
        }
    }
}

/// Why a field cannot be evaluated by the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// A request attribute (HTTP, JWT, `when`): only a waypoint sees it.
    Layer7(&'static str),
    /// A field this version does not know.
    UnknownField,
    /// A value that can never be matched literally (wildcards, patterns, malformed names).
    NotLiteral(String),
    /// `action: CUSTOM` delegates to an external authorizer, which Trellis does not call.
    CustomAction,
    /// Istio's binding to gateways and services (`targetRef(s)`), served by waypoints.
    TargetRef,
    /// `mode: DISABLE`: mesh traffic is always mutual TLS; plaintext stays accepted.
    DisableMode,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Layer7(what) => write!(f, "{what} cannot be evaluated at L4 (needs a waypoint)"),
            Self::UnknownField => f.write_str("unknown field"),
            Self::NotLiteral(v) => write!(
                f,
                "{v:?} is not a literal name: matching is exact, wildcards and patterns are not supported"
            ),
            Self::CustomAction => {
                f.write_str("CUSTOM needs an external authorizer, which is not supported")
            }
            Self::TargetRef => {
                f.write_str("binding to gateways or services is not supported at L4")
            }
            Self::DisableMode => f.write_str("DISABLE is not supported; enforced as PERMISSIVE"),
        }
    }
}

/// A field that fails closed, for the status message and `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub path: String,
    pub why: Why,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.why)
    }
}

/// What replaces a rejected object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandIn {
    /// A rejected `ALLOW`: an `ALLOW` policy without rules over the same scope. The workloads
    /// stay reachable only through other `ALLOW` policies, a subset of what the author could
    /// have meant.
    AllowNothing,
    /// A rejected `DENY` or `CUSTOM`, or an unknown action: every connection to the scope is
    /// denied.
    DenyAll,
    /// A rejected `PeerAuthentication`: `STRICT` on every port of its scope.
    Strict,
    /// A rejected `AUDIT` policy: audit policies never change a decision, so nothing.
    Nothing,
}

/// How faithfully an object is enforced; the status condition is derived from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforcement {
    /// Exactly as written.
    Full,
    /// As written, except these fields, which fail closed.
    FailClosed(Vec<Unsupported>),
    /// Rejected; the stand-in is enforced instead. The scope is the object's selector when it
    /// was readable, otherwise its whole namespace (the whole mesh, in the root namespace).
    Rejected {
        error: PolicyError,
        stand_in: StandIn,
    },
    /// Accepted but never changes a decision (`AUDIT`: audit logging is not implemented).
    NoEffect,
}

/// The action the node applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
    /// Never evaluated: audit policies do not change decisions.
    Audit,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
            Self::Audit => "AUDIT",
        })
    }
}

/// An `AuthorizationPolicy` ready to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthzPolicy {
    pub id: PolicyId,
    pub generation: Option<i64>,
    /// Labels a workload must all carry; `None`: every workload of the scope.
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    pub rules: Vec<Rule>,
    pub enforcement: Enforcement,
}

/// A rule: one of `from` (if any) and one of `to` (if any) must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rule {
    /// Empty: any source.
    pub from: Vec<SourceMatch>,
    /// Empty: any port.
    pub to: Vec<OperationMatch>,
    /// Part of the rule cannot be evaluated (for `ALLOW`, anywhere in it): the rule never
    /// matches for certain.
    pub unevaluable: bool,
    /// The only ports the rule can match, kept inline so that most rules are ruled out without
    /// following a pointer (which dominates when thousands of policies apply).
    pub(super) port_hint: PortHint,
}

/// Ports a rule may match: `Any`, or at most [`PortHint::MAX`] listed ones. A port outside
/// the list surely fails every operation of the rule, whatever else the rule holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum PortHint {
    #[default]
    Any,
    Only {
        ports: [u16; PortHint::MAX],
        len: u8,
    },
}

impl PortHint {
    const MAX: usize = 6;

    fn of(to: &[OperationMatch]) -> Self {
        // Every operation must list ports: one without a `ports` list may match any port.
        if to.is_empty() || to.iter().any(|op| op.ports.is_empty()) {
            return Self::Any;
        }
        let mut ports = [0; Self::MAX];
        let mut len = 0;
        for &port in to.iter().flat_map(|op| &op.ports) {
            if ports[..len].contains(&port) {
                continue;
            }
            if len == Self::MAX {
                return Self::Any;
            }
            ports[len] = port;
            len += 1;
        }
        Self::Only {
            ports,
            len: len as u8,
        }
    }

    pub(super) fn may_match(&self, port: u16) -> bool {
        match self {
            Self::Any => true,
            Self::Only { ports, len } => ports[..usize::from(*len)].contains(&port),
        }
    }
}

/// One `from[].source`. Empty lists are absent conditions, as in Istio.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceMatch {
    pub principals: Vec<PrincipalMatch>,
    pub not_principals: Vec<PrincipalMatch>,
    pub namespaces: Vec<NamespaceMatch>,
    pub not_namespaces: Vec<NamespaceMatch>,
    pub ip_blocks: Vec<IpBlock>,
    pub not_ip_blocks: Vec<IpBlock>,
    /// A condition of this source cannot be evaluated.
    pub unevaluable: bool,
}

/// One `to[].operation`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OperationMatch {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub unevaluable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrincipalMatch {
    Exact(Identity),
    /// `"*"`: any verified identity.
    AnyAuthenticated,
    /// Could never be compared literally; evaluates as unknown.
    Unsupported,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceMatch {
    Exact(String),
    AnyAuthenticated,
    Unsupported,
}

/// An address block; the address has its host bits cleared, IPv4 is never stored IPv4-mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpBlock {
    addr: IpAddr,
    prefix: u8,
}

impl IpBlock {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask4(u32::from(ip), self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask6(u128::from(ip), self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask4(v: u32, prefix: u8) -> u32 {
    v & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask6(v: u128, prefix: u8) -> u128 {
    v & u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for IpBlock {
    type Err = ();

    /// `a.b.c.d`, `a.b.c.d/n`, IPv6 alike. Host bits are cleared (`10.1.2.3/8` is `10.0.0.0/8`);
    /// an IPv4-mapped IPv6 block of prefix 96 or more is the IPv4 block it maps.
    fn from_str(s: &str) -> Result<Self, ()> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => {
                // Digits only: `u8::from_str` would also take a leading `+`.
                if prefix.is_empty()
                    || prefix.len() > 3
                    || !prefix.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(());
                }
                (addr, Some(prefix.parse::<u8>().map_err(|_| ())?))
            }
            None => (s, None),
        };
        match addr.parse::<IpAddr>().map_err(|_| ())? {
            IpAddr::V4(v4) => {
                let prefix = prefix.unwrap_or(32);
                if prefix > 32 {
                    return Err(());
                }
                Ok(Self::v4(v4, prefix))
            }
            IpAddr::V6(v6) => {
                let prefix = prefix.unwrap_or(128);
                if prefix > 128 {
                    return Err(());
                }
                match v6.to_ipv4_mapped() {
                    Some(v4) if prefix >= 96 => Ok(Self::v4(v4, prefix - 96)),
                    _ => Ok(Self {
                        addr: IpAddr::V6(Ipv6Addr::from(mask6(u128::from(v6), prefix))),
                        prefix,
                    }),
                }
            }
        }
    }
}

impl IpBlock {
    fn v4(addr: Ipv4Addr, prefix: u8) -> Self {
        Self {
            addr: IpAddr::V4(Ipv4Addr::from(mask4(u32::from(addr), prefix))),
            prefix,
        }
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Collects the fields that fail closed while converting one object.
#[derive(Default)]
struct Notes(Vec<Unsupported>);

impl Notes {
    fn add(&mut self, path: impl Into<String>, why: Why) {
        self.0.push(Unsupported {
            path: path.into(),
            why,
        });
    }

    /// Notes every unknown field under `path`; true if there was any.
    fn extra(&mut self, path: &str, extra: &ExtraFields) -> bool {
        for key in extra.keys() {
            self.add(format!("{path}.{key}"), Why::UnknownField);
        }
        !extra.is_empty()
    }

    /// Notes a non-empty layer-7 field; true if it was set.
    fn l7(&mut self, path: &str, field: &str, values: &[String], what: &'static str) -> bool {
        if !values.is_empty() {
            self.add(format!("{path}.{field}"), Why::Layer7(what));
        }
        !values.is_empty()
    }
}

fn unsupported_err(path: impl Into<String>, why: Why) -> PolicyError {
    PolicyError::Unsupported {
        path: path.into(),
        why,
    }
}

/// The first unknown field of an object whose meaning it could change entirely.
fn reject_extra(path: &str, extra: &ExtraFields) -> Result<(), PolicyError> {
    match extra.keys().next() {
        Some(key) => Err(unsupported_err(format!("{path}.{key}"), Why::UnknownField)),
        None => Ok(()),
    }
}

fn metadata(obj: &impl ResourceExt) -> Result<(PolicyId, Option<i64>), PolicyError> {
    identify(obj.meta())
}

/// The object's `namespace/name` and generation; an object without either name cannot be
/// placed or reported on.
pub(super) fn identify(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<(PolicyId, Option<i64>), PolicyError> {
    let part = |value: &Option<String>, what| {
        value
            .clone()
            .filter(|v| !v.is_empty())
            .ok_or(PolicyError::MissingMetadata(what))
    };
    let namespace = part(&meta.namespace, "namespace")?;
    let name = part(&meta.name, "name")?;
    Ok((PolicyId { namespace, name }, meta.generation))
}

/// The selector's labels, `None` for "all workloads of the scope" (absent or empty).
fn selector(
    sel: Option<&crd::WorkloadSelector>,
) -> Result<Option<BTreeMap<String, String>>, PolicyError> {
    let Some(sel) = sel else { return Ok(None) };
    // `matchExpressions` or anything else could narrow or widen the selection in ways this
    // version cannot tell.
    reject_extra("spec.selector", &sel.extra)?;
    Ok((!sel.match_labels.is_empty()).then(|| sel.match_labels.clone()))
}

fn port(path: String, value: &str) -> Result<u16, PolicyError> {
    let ok = !value.is_empty() && value.len() <= 5 && value.bytes().all(|b| b.is_ascii_digit());
    match value.parse::<u16>() {
        Ok(p) if ok && p != 0 => Ok(p),
        _ => Err(PolicyError::Port {
            path,
            value: value.into(),
        }),
    }
}

fn ip_blocks(path: &str, values: &[String]) -> Result<Vec<IpBlock>, PolicyError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.parse().map_err(|()| PolicyError::IpBlock {
                path: format!("{path}[{i}]"),
                value: v.clone(),
            })
        })
        .collect()
}

/// `<trust-domain>/ns/<namespace>/sa/<service-account>`, optionally with `spiffe://`, or `*`.
fn principal(value: &str) -> PrincipalMatch {
    if value == "*" {
        return PrincipalMatch::AnyAuthenticated;
    }
    let rest = value.strip_prefix("spiffe://").unwrap_or(value);
    let mut parts = rest.split('/');
    if let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) && let Ok(id) = Identity::new(td, ns, sa)
    {
        return PrincipalMatch::Exact(id);
    }
    PrincipalMatch::Unsupported
}

fn namespace(value: &str) -> NamespaceMatch {
    let label = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    match value {
        "*" => NamespaceMatch::AnyAuthenticated,
        v if label => NamespaceMatch::Exact(v.into()),
        _ => NamespaceMatch::Unsupported,
    }
}

fn principals(path: &str, values: &[String], notes: &mut Notes) -> Vec<PrincipalMatch> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let m = principal(v);
        if m == PrincipalMatch::Unsupported {
            notes.add(format!("{path}[{i}]"), Why::NotLiteral(v.clone()));
        }
        out.push(m);
    }
    out
}

fn namespaces(path: &str, values: &[String], notes: &mut Notes) -> Vec<NamespaceMatch> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let m = namespace(v);
        if m == NamespaceMatch::Unsupported {
            notes.add(format!("{path}[{i}]"), Why::NotLiteral(v.clone()));
        }
        out.push(m);
    }
    out
}

fn source(path: &str, from: &crd::RuleFrom, notes: &mut Notes) -> Result<SourceMatch, PolicyError> {
    let before = notes.0.len();
    notes.extra(path, &from.extra);
    let Some(s) = &from.source else {
        return Ok(SourceMatch {
            unevaluable: notes.0.len() > before,
            ..SourceMatch::default()
        });
    };
    let path = format!("{path}.source");
    notes.extra(&path, &s.extra);
    notes.l7(
        &path,
        "requestPrincipals",
        &s.request_principals,
        "request principals (JWT)",
    );
    notes.l7(
        &path,
        "notRequestPrincipals",
        &s.not_request_principals,
        "request principals (JWT)",
    );
    notes.l7(
        &path,
        "remoteIpBlocks",
        &s.remote_ip_blocks,
        "remote IP blocks (X-Forwarded-For)",
    );
    notes.l7(
        &path,
        "notRemoteIpBlocks",
        &s.not_remote_ip_blocks,
        "remote IP blocks (X-Forwarded-For)",
    );
    let mut out = SourceMatch {
        principals: principals(&format!("{path}.principals"), &s.principals, notes),
        not_principals: principals(&format!("{path}.notPrincipals"), &s.not_principals, notes),
        namespaces: namespaces(&format!("{path}.namespaces"), &s.namespaces, notes),
        not_namespaces: namespaces(&format!("{path}.notNamespaces"), &s.not_namespaces, notes),
        ip_blocks: ip_blocks(&format!("{path}.ipBlocks"), &s.ip_blocks)?,
        not_ip_blocks: ip_blocks(&format!("{path}.notIpBlocks"), &s.not_ip_blocks)?,
        unevaluable: false,
    };
    // Unsupported principal and namespace values evaluate as unknown on their own; the flag
    // covers the conditions that have no place in the model.
    out.unevaluable = notes.0[before..]
        .iter()
        .any(|n| !matches!(n.why, Why::NotLiteral(_)));
    Ok(out)
}

fn operation(
    path: &str,
    to: &crd::RuleTo,
    notes: &mut Notes,
) -> Result<OperationMatch, PolicyError> {
    let mut unevaluable = notes.extra(path, &to.extra);
    let Some(op) = &to.operation else {
        return Ok(OperationMatch {
            unevaluable,
            ..OperationMatch::default()
        });
    };
    let path = format!("{path}.operation");
    unevaluable |= notes.extra(&path, &op.extra);
    unevaluable |= notes.l7(&path, "hosts", &op.hosts, "hosts");
    unevaluable |= notes.l7(&path, "notHosts", &op.not_hosts, "hosts");
    unevaluable |= notes.l7(&path, "methods", &op.methods, "HTTP methods");
    unevaluable |= notes.l7(&path, "notMethods", &op.not_methods, "HTTP methods");
    unevaluable |= notes.l7(&path, "paths", &op.paths, "HTTP paths");
    unevaluable |= notes.l7(&path, "notPaths", &op.not_paths, "HTTP paths");
    let ports = |field: &str, values: &[String]| {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| port(format!("{path}.{field}[{i}]"), v))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(OperationMatch {
        ports: ports("ports", &op.ports)?,
        not_ports: ports("notPorts", &op.not_ports)?,
        unevaluable,
    })
}

fn rule(path: &str, r: &crd::Rule, action: Action, notes: &mut Notes) -> Result<Rule, PolicyError> {
    let before = notes.0.len();
    let mut unevaluable = notes.extra(path, &r.extra);
    if !r.when.is_empty() {
        notes.add(
            format!("{path}.when"),
            Why::Layer7("request conditions (when)"),
        );
        unevaluable = true;
    }
    let from = r
        .from
        .iter()
        .enumerate()
        .map(|(i, f)| source(&format!("{path}.from[{i}]"), f, notes))
        .collect::<Result<_, _>>()?;
    let to: Vec<OperationMatch> =
        r.to.iter()
            .enumerate()
            .map(|(i, t)| operation(&format!("{path}.to[{i}]"), t, notes))
            .collect::<Result<_, _>>()?;
    // An ALLOW rule that cannot be fully evaluated matches nothing, whichever part of it is
    // affected. DENY keeps the finer flags, so it matches on everything it can evaluate.
    if action == Action::Allow && notes.0.len() > before {
        unevaluable = true;
    }
    Ok(Rule {
        port_hint: PortHint::of(&to),
        from,
        to,
        unevaluable,
    })
}

impl TryFrom<&AuthorizationPolicy> for AuthzPolicy {
    type Error = PolicyError;

    /// The strict conversion: `Err` for an object that must be rejected. Use
    /// [`AuthzPolicy::compile`] to get the fail-closed stand-in for those.
    fn try_from(obj: &AuthorizationPolicy) -> Result<Self, PolicyError> {
        let (id, generation) = metadata(obj)?;
        let spec = &obj.spec;
        let mut notes = Notes::default();
        let action = match spec.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            "AUDIT" => Action::Audit,
            "CUSTOM" => {
                // Whatever the external authorizer would have denied must stay denied: every
                // connection the rules select is.
                notes.add("spec.action", Why::CustomAction);
                Action::Deny
            }
            other => {
                return Err(PolicyError::UnknownValue {
                    path: "spec.action".into(),
                    value: other.into(),
                    allowed: "ALLOW, DENY, AUDIT, CUSTOM",
                });
            }
        };
        reject_extra("spec", &spec.extra)?;
        if spec.target_ref.is_some() {
            return Err(unsupported_err("spec.targetRef", Why::TargetRef));
        }
        if spec.target_refs.is_some() {
            return Err(unsupported_err("spec.targetRefs", Why::TargetRef));
        }
        let selector = selector(spec.selector.as_ref())?;
        let rules = spec
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| rule(&format!("spec.rules[{i}]"), r, action, &mut notes))
            .collect::<Result<_, _>>()?;
        let enforcement = if action == Action::Audit {
            Enforcement::NoEffect
        } else if notes.0.is_empty() {
            Enforcement::Full
        } else {
            Enforcement::FailClosed(notes.0)
        };
        Ok(Self {
            id,
            generation,
            selector,
            action,
            rules,
            enforcement,
        })
    }
}

impl AuthzPolicy {
    /// The stand-in for an object whose spec cannot be read at all: nothing about it is
    /// known, not even its action or selector, so every connection to its namespace (the
    /// whole mesh, in the root namespace) is denied until it is fixed.
    pub fn unreadable(id: PolicyId, generation: Option<i64>, error: String) -> Self {
        Self {
            id,
            generation,
            selector: None,
            action: Action::Deny,
            rules: vec![Rule::default()],
            enforcement: Enforcement::Rejected {
                error: PolicyError::Unreadable(error),
                stand_in: StandIn::DenyAll,
            },
        }
    }

    /// Converts an object, replacing a rejected one by its fail-closed stand-in. Fails only
    /// for an object without namespace or name, which the API server never serves.
    pub fn compile(obj: &AuthorizationPolicy) -> Result<Self, PolicyError> {
        let error = match Self::try_from(obj) {
            Ok(policy) => return Ok(policy),
            Err(e @ PolicyError::MissingMetadata(_)) => return Err(e),
            Err(e) => e,
        };
        let (id, generation) = metadata(obj)?;
        // The narrowest scope that surely covers what the author meant: the selector if it
        // was readable, else the namespace.
        let selector = selector(obj.spec.selector.as_ref()).unwrap_or(None);
        let (action, rules, stand_in) = match obj.spec.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => (Action::Allow, Vec::new(), StandIn::AllowNothing),
            "AUDIT" => (Action::Audit, Vec::new(), StandIn::Nothing),
            _ => (Action::Deny, vec![Rule::default()], StandIn::DenyAll),
        };
        Ok(Self {
            id,
            generation,
            selector,
            action,
            rules,
            enforcement: Enforcement::Rejected { error, stand_in },
        })
    }
}

/// Whether a workload accepts plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MtlsMode {
    Permissive,
    Strict,
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Permissive => "PERMISSIVE",
            Self::Strict => "STRICT",
        })
    }
}

/// A `PeerAuthentication` ready to resolve.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerPolicy {
    pub id: PolicyId,
    pub generation: Option<i64>,
    pub selector: Option<BTreeMap<String, String>>,
    /// `None`: inherit from the next level.
    pub mode: Option<MtlsMode>,
    /// Port-level modes; `UNSET` entries are left out (they inherit `mode`).
    pub ports: BTreeMap<u16, MtlsMode>,
    pub enforcement: Enforcement,
}

impl PeerPolicy {
    /// This policy's mode for a port and whether a port-level entry gave it; `None`: inherit.
    pub fn mode_for(&self, port: u16) -> Option<(MtlsMode, bool)> {
        match self.ports.get(&port) {
            Some(mode) => Some((*mode, true)),
            None => self.mode.map(|m| (m, false)),
        }
    }
}

fn mtls_mode(
    path: &str,
    m: &crd::MutualTls,
    notes: &mut Notes,
) -> Result<Option<MtlsMode>, PolicyError> {
    // An unknown field here might mean anything about what is accepted.
    reject_extra(path, &m.extra)?;
    match m.mode.as_deref().unwrap_or("UNSET") {
        "UNSET" => Ok(None),
        "STRICT" => Ok(Some(MtlsMode::Strict)),
        "PERMISSIVE" => Ok(Some(MtlsMode::Permissive)),
        "DISABLE" => {
            notes.add(format!("{path}.mode"), Why::DisableMode);
            Ok(Some(MtlsMode::Permissive))
        }
        other => Err(PolicyError::UnknownValue {
            path: format!("{path}.mode"),
            value: other.into(),
            allowed: "UNSET, DISABLE, PERMISSIVE, STRICT",
        }),
    }
}

impl TryFrom<&PeerAuthentication> for PeerPolicy {
    type Error = PolicyError;

    fn try_from(obj: &PeerAuthentication) -> Result<Self, PolicyError> {
        let (id, generation) = metadata(obj)?;
        let spec = &obj.spec;
        let mut notes = Notes::default();
        reject_extra("spec", &spec.extra)?;
        let selector = selector(spec.selector.as_ref())?;
        let mode = match &spec.mtls {
            Some(m) => mtls_mode("spec.mtls", m, &mut notes)?,
            None => None,
        };
        let mut ports = BTreeMap::new();
        for (key, m) in &spec.port_level_mtls {
            let path = format!("spec.portLevelMtls[{key:?}]");
            let p = port(path.clone(), key)?;
            if let Some(mode) = mtls_mode(&path, m, &mut notes)? {
                ports.insert(p, mode);
            }
        }
        let enforcement = if notes.0.is_empty() {
            Enforcement::Full
        } else {
            Enforcement::FailClosed(notes.0)
        };
        Ok(Self {
            id,
            generation,
            selector,
            mode,
            ports,
            enforcement,
        })
    }
}

impl PeerPolicy {
    /// The stand-in for an object whose spec cannot be read: `STRICT` for its whole
    /// namespace (the whole mesh, in the root namespace).
    pub fn unreadable(id: PolicyId, generation: Option<i64>, error: String) -> Self {
        Self {
            id,
            generation,
            selector: None,
            mode: Some(MtlsMode::Strict),
            ports: BTreeMap::new(),
            enforcement: Enforcement::Rejected {
                error: PolicyError::Unreadable(error),
                stand_in: StandIn::Strict,
            },
        }
    }

    /// Converts an object; a rejected one becomes `STRICT` on every port of the scope it may
    /// have meant. Fails only without namespace or name.
    pub fn compile(obj: &PeerAuthentication) -> Result<Self, PolicyError> {
        let error = match Self::try_from(obj) {
            Ok(policy) => return Ok(policy),
            Err(e @ PolicyError::MissingMetadata(_)) => return Err(e),
            Err(e) => e,
        };
        let (id, generation) = metadata(obj)?;
        Ok(Self {
            id,
            generation,
            selector: selector(obj.spec.selector.as_ref()).unwrap_or(None),
            mode: Some(MtlsMode::Strict),
            ports: BTreeMap::new(),
            enforcement: Enforcement::Rejected {
                error,
                stand_in: StandIn::Strict,
            },
        })
    }
}

/// Shared handle to a converted policy; decisions point at the policy that made them.
pub type PolicyRef = Arc<AuthzPolicy>;
