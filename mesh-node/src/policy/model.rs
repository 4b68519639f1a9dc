//! The policies as the node and the waypoints enforce them, converted from the custom
//! resources.
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
//!   three-valued match ([`super::eval`]). Rules are converted in [`rules`].
//! - **Invalid** objects (a port that is not a number, an address that is not a CIDR, an
//!   unknown action, an unreadable scope) are rejected as a whole with an error naming the
//!   field ([`PolicyError`]). A rejected object is not ignored, which would weaken protection
//!   when it was a `DENY` or the only `ALLOW` of a workload: [`AuthzPolicy::compile`] puts a
//!   stand-in in its place that is at least as strict as anything the author could have meant
//!   (see [`StandIn`]), and the status condition says so.
//!
//! Identities match literally: principals are compared component by component with the
//! verified SPIFFE ID, namespaces by equality; the only pattern is Istio's `"*"` alone, meaning
//! "any authenticated source". Other wildcard or regular-expression forms are unsupported
//! values, never patterns. Request attributes at waypoints take Istio's exact, `prefix*`,
//! `*suffix` and `*` forms ([`super::request`]).

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
    sync::Arc,
};

use kube::ResourceExt;

use super::{
    binding::Binding,
    crd::{self, AuthorizationPolicy, ExtraFields, PeerAuthentication},
    request::{HttpMatch, StringMatch, WhenMatch},
};
use crate::identity::Identity;

mod rules;

pub(crate) use rules::{namespace_match, principal_match};

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
    /// A value that cannot be used, with what is wrong with it.
    #[error("{path}: {why}")]
    Invalid { path: String, why: String },
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

/// Why a field cannot be evaluated where the policy is enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// A request attribute (HTTP, JWT, `when`) in a policy bound to workloads: only a
    /// waypoint sees it, and only policies attached to one with `targetRefs` apply there.
    Layer7(&'static str),
    /// A value of a request attribute that cannot be matched as written.
    Pattern {
        value: String,
        expected: &'static str,
    },
    /// A `when` key this version does not evaluate.
    WhenKey(String),
    /// A field or form Trellis evaluates nowhere.
    NotSupported(&'static str),
    /// A field this version does not know.
    UnknownField,
    /// A value that can never be matched literally (wildcards, patterns, malformed names).
    NotLiteral(String),
    /// `action: CUSTOM` delegates to an external authorizer, which Trellis does not call.
    CustomAction,
    /// Both `selector` and `targetRefs`: the object's scope is ambiguous.
    SelectorAndTargets,
    /// Both `targetRef` and `targetRefs`.
    BothTargetRefForms,
    /// A target of a kind waypoints do not serve (`group/kind`).
    TargetKind(String),
    /// A target in another namespace than the policy's.
    OtherNamespace(String),
    /// `mode: DISABLE`: mesh traffic is always mutual TLS; plaintext stays accepted.
    DisableMode,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Layer7(what) => write!(
                f,
                "{what} cannot be evaluated at L4 (needs a waypoint: attach the policy to one with targetRefs instead of a selector)"
            ),
            Self::Pattern { value, expected } => {
                write!(f, "{value:?} cannot be matched as written: {expected}")
            }
            Self::WhenKey(key) => write!(f, "{key:?} is not a supported condition key"),
            Self::NotSupported(what) => write!(f, "{what} is not supported"),
            Self::UnknownField => f.write_str("unknown field"),
            Self::NotLiteral(v) => write!(
                f,
                "{v:?} is not a literal name: matching is exact, wildcards and patterns are not supported"
            ),
            Self::CustomAction => {
                f.write_str("CUSTOM needs an external authorizer, which is not supported")
            }
            Self::SelectorAndTargets => {
                f.write_str("a policy may have a selector or targetRefs, not both")
            }
            Self::BothTargetRefForms => f.write_str("use targetRefs or targetRef, not both"),
            Self::OtherNamespace(ns) => write!(
                f,
                "targets in another namespace ({ns:?}) are not supported: put the policy in the target's namespace"
            ),
            Self::TargetKind(kind) => write!(
                f,
                "{kind:?} is not a supported target: waypoints serve Gateway and GatewayClass (gateway.networking.k8s.io) and Service (core) targets"
            ),
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
    /// A rejected `RequestAuthentication`: it accepts no issuer where it applies, so requests
    /// carrying a token there are refused unless another one verifies it.
    RejectTokens,
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
    /// Labels a workload must all carry; `None`: every workload of the scope. Only for
    /// policies bound to workloads.
    pub selector: Option<BTreeMap<String, String>>,
    /// Where the policy is enforced.
    pub binding: Binding,
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
    /// Request conditions; all must match (only in policies bound to waypoints).
    pub when: Vec<WhenMatch>,
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
    /// `<iss>/<sub>` of the request's JWT (evaluated at waypoints only).
    pub request_principals: Vec<StringMatch>,
    pub not_request_principals: Vec<StringMatch>,
    /// A condition of this source cannot be evaluated.
    pub unevaluable: bool,
}

/// One `to[].operation`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OperationMatch {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    /// Hosts, methods and paths (evaluated at waypoints only).
    pub http: HttpMatch,
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
pub(super) struct Notes(pub(super) Vec<Unsupported>);

impl Notes {
    pub(super) fn add(&mut self, path: impl Into<String>, why: Why) {
        self.0.push(Unsupported {
            path: path.into(),
            why,
        });
    }

    /// Notes every unknown field under `path`; true if there was any.
    pub(super) fn extra(&mut self, path: &str, extra: &ExtraFields) -> bool {
        for key in extra.keys() {
            self.add(format!("{path}.{key}"), Why::UnknownField);
        }
        !extra.is_empty()
    }

    /// Notes a non-empty layer-7 field; true if it was set.
    pub(super) fn l7(
        &mut self,
        path: &str,
        field: &str,
        values: &[String],
        what: &'static str,
    ) -> bool {
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
pub(super) fn reject_extra(path: &str, extra: &ExtraFields) -> Result<(), PolicyError> {
    match extra.keys().next() {
        Some(key) => Err(unsupported_err(format!("{path}.{key}"), Why::UnknownField)),
        None => Ok(()),
    }
}

pub(super) fn metadata(obj: &impl ResourceExt) -> Result<(PolicyId, Option<i64>), PolicyError> {
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
pub(super) fn selector(
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
        let selector = selector(spec.selector.as_ref())?;
        let binding = Binding::of(
            &id.namespace,
            selector.is_some(),
            spec.target_ref.as_ref(),
            spec.target_refs.as_ref(),
        )?;
        let mut ctx = rules::Ctx {
            notes: &mut notes,
            action,
            at_waypoint: binding.at_waypoints(),
        };
        let rules = spec
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| rules::rule(&format!("spec.rules[{i}]"), r, &mut ctx))
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
            binding,
            action,
            rules,
            enforcement,
        })
    }
}

impl AuthzPolicy {
    /// The stand-in for an object whose spec cannot be read at all: nothing about it is
    /// known, not even its action or binding, so every connection to its namespace (the
    /// whole mesh, in the root namespace) and every request through waypoints for it is
    /// denied until it is fixed.
    pub fn unreadable(id: PolicyId, generation: Option<i64>, error: String) -> Self {
        Self {
            id,
            generation,
            selector: None,
            binding: Binding::Everywhere,
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
        // The narrowest scope that surely covers what the author meant: the selector or the
        // targets if readable, else the namespace (its waypoints, for a waypoint policy).
        let selector = selector(obj.spec.selector.as_ref()).unwrap_or(None);
        let binding = Binding::stand_in(
            &id.namespace,
            obj.spec.selector.is_some(),
            obj.spec.target_ref.as_ref(),
            obj.spec.target_refs.as_ref(),
        );
        let (action, rules, stand_in) = match obj.spec.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => (Action::Allow, Vec::new(), StandIn::AllowNothing),
            "AUDIT" => (Action::Audit, Vec::new(), StandIn::Nothing),
            _ => (Action::Deny, vec![Rule::default()], StandIn::DenyAll),
        };
        Ok(Self {
            id,
            generation,
            selector,
            binding,
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
