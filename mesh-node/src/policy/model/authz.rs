//! An `AuthorizationPolicy` as the proxies evaluate it: its action, where it is enforced, and
//! its rules with their sources, operations and request conditions.

use std::{collections::BTreeMap, fmt, sync::Arc};

use super::{
    attributes::{HttpMatch, StringMatch, WhenMatch},
    binding::Binding,
    conversion::{Enforcement, PolicyId},
    source::{IpBlock, NamespaceMatch, PrincipalMatch, ServiceAccountMatch, TrustDomainMatch},
};

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
    pub(crate) port_hint: PortHint,
}

/// Ports a rule may match: `Any`, or at most [`PortHint::MAX`] listed ones. A port outside
/// the list surely fails every operation of the rule, whatever else the rule holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum PortHint {
    #[default]
    Any,
    Only {
        ports: [u16; PortHint::MAX],
        len: u8,
    },
}

impl PortHint {
    const MAX: usize = 6;

    pub(super) fn of(to: &[OperationMatch]) -> Self {
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
            // `len` < `Self::MAX` (checked in the loop), which fits a u8.
            len: u8::try_from(len).unwrap_or(u8::MAX),
        }
    }

    pub(crate) fn may_match(&self, port: u16) -> bool {
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
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    pub trust_domains: Vec<TrustDomainMatch>,
    pub not_trust_domains: Vec<TrustDomainMatch>,
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

/// Shared handle to a converted policy; decisions point at the policy that made them.
pub type PolicyRef = Arc<AuthzPolicy>;
