//! The decision: may this source connect to this workload's port?
//!
//! Order, as Istio users know it: a plaintext connection to a port whose effective
//! `PeerAuthentication` mode is `STRICT` is denied; then any matching `DENY` policy denies;
//! then, if any `ALLOW` policy applies to the workload, one of them must match; otherwise the
//! connection is allowed.
//!
//! **Three-valued matching.** Some conditions cannot be decided: a field the node cannot
//! evaluate, or a source address the caller does not know. Each condition evaluates to yes,
//! no or unknown (Kleene logic: `and` is the minimum, `or` the maximum, `not` swaps yes and
//! no). A `DENY` rule denies unless it is surely not matching; an `ALLOW` rule allows only when
//! it surely matches. So whatever the unknown value really is, the verdict is never more
//! permissive than the one for its true value.
//!
//! **Plaintext sources** have no principal and no namespace: `principals` and `namespaces`
//! conditions do not match them, their `not` forms do (as in Istio).
//!
//! **Request facts.** At a waypoint a decision also sees the request
//! ([`super::request::RequestFacts`]); HTTP and JWT conditions are then true or false. Node
//! agents have none, and such conditions are unknown, exactly as fields they cannot read.
//! Waypoint decisions ([`Engine::decide_request`]) are made in [`super::waypoint`].
//!
//! **Finding the policies** of a workload costs a hash lookup per scope (its namespace and the
//! root namespace) plus one per label of the workload: policies with a selector are indexed
//! under one of their labels, then checked against all of them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use super::{
    model::{
        Action, AuthzPolicy, Enforcement, IpBlock, MtlsMode, NamespaceMatch, OperationMatch,
        PeerPolicy, PolicyRef, PrincipalMatch, Rule, SourceMatch,
    },
    request::{self, Prepared},
    waypoint::WaypointPolicies,
};
use crate::identity::Identity;

/// The namespace whose policies apply mesh-wide unless configured otherwise.
pub const DEFAULT_ROOT_NAMESPACE: &str = "trellis-system";

/// The workload a connection is for.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

impl<'a> Destination<'a> {
    pub fn of(workload: &'a crate::state::Workload) -> Self {
        Self {
            namespace: &workload.namespace,
            labels: &workload.labels,
        }
    }
}

/// One inbound connection, as the node knows it.
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    pub destination: Destination<'a>,
    /// The destination workload's port.
    pub port: u16,
    /// The verified peer identity; `None` for plaintext.
    pub source: Option<&'a Identity>,
    /// The source address if the node knows it reliably; `None` makes `ipBlocks` conditions
    /// unknown (so they fail closed).
    pub source_ip: Option<IpAddr>,
}

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

    #[allow(clippy::should_implement_trait)]
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

pub(super) fn principals(list: &[PrincipalMatch], source: Option<&Identity>) -> Truth {
    let Some(id) = source else {
        return Truth::No;
    };
    Truth::any(list, |m| match m {
        PrincipalMatch::Exact(p) => Truth::from_bool(p == id),
        PrincipalMatch::AnyAuthenticated => Truth::Yes,
        PrincipalMatch::Unsupported => Truth::Unknown,
    })
}

pub(super) fn namespaces(list: &[NamespaceMatch], source: Option<&Identity>) -> Truth {
    let Some(id) = source else {
        return Truth::No;
    };
    Truth::any(list, |m| match m {
        NamespaceMatch::Exact(ns) => Truth::from_bool(ns == id.namespace()),
        NamespaceMatch::AnyAuthenticated => Truth::Yes,
        NamespaceMatch::Unsupported => Truth::Unknown,
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
                Condition::IpBlocks(list, neg) => (ip_blocks(list, flow.source_ip), neg),
                Condition::RequestPrincipals(list, neg) => {
                    (request::request_principals(list, false, request), neg)
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
    IpBlocks(&'a [IpBlock], bool),
    RequestPrincipals(&'a [request::StringMatch], bool),
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

    /// Whether the policy applies to the workload, given it is in the policy's scope.
    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .as_ref()
            .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

#[derive(Debug, Default)]
struct Bucket {
    deny: Vec<PolicyRef>,
    allow: Vec<PolicyRef>,
}

impl Bucket {
    fn list(&self, action: Action) -> &[PolicyRef] {
        match action {
            Action::Deny => &self.deny,
            Action::Allow => &self.allow,
            Action::Audit => &[],
        }
    }
}

/// The policies of one scope: a namespace, or the root namespace for the whole mesh.
#[derive(Debug, Default)]
struct Scope {
    wide: Bucket,
    /// By the first label (in key order) of the selector, then its value.
    by_label: HashMap<String, HashMap<String, Bucket>>,
}

impl Scope {
    fn insert(&mut self, policy: PolicyRef) {
        let bucket = match policy.selector.as_ref().and_then(|s| s.iter().next()) {
            Some((k, v)) => self
                .by_label
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default(),
            None => &mut self.wide,
        };
        match policy.action {
            Action::Deny => bucket.deny.push(policy),
            Action::Allow => bucket.allow.push(policy),
            Action::Audit => {}
        }
    }

    fn sort(&mut self) {
        let sort = |b: &mut Bucket| {
            b.deny.sort_by(|x, y| x.id.cmp(&y.id));
            b.allow.sort_by(|x, y| x.id.cmp(&y.id));
        };
        sort(&mut self.wide);
        self.by_label
            .values_mut()
            .flat_map(|m| m.values_mut())
            .for_each(sort);
    }

    /// Calls `f` on every policy of `action` in this scope selecting the workload, until it
    /// returns `Some`.
    fn find<T>(
        &self,
        labels: &BTreeMap<String, String>,
        action: Action,
        f: &mut impl FnMut(&PolicyRef) -> Option<T>,
    ) -> Option<T> {
        if let Some(found) = self.wide.list(action).iter().find_map(&mut *f) {
            return Some(found);
        }
        for (k, v) in labels {
            let Some(bucket) = self.by_label.get(k).and_then(|m| m.get(v)) else {
                continue;
            };
            let found = bucket
                .list(action)
                .iter()
                .filter(|p| p.selects(labels))
                .find_map(&mut *f);
            if found.is_some() {
                return found;
            }
        }
        None
    }
}

/// All authorization policies, indexed for evaluation. Immutable: build a new one on change.
#[derive(Debug)]
pub struct PolicySet {
    root_namespace: String,
    root: Scope,
    namespaces: HashMap<String, Scope>,
    len: usize,
}

impl PolicySet {
    /// Indexes converted policies (see [`AuthzPolicy::compile`]). Policies of
    /// `root_namespace` apply mesh-wide. `AUDIT` policies are left out: they never decide;
    /// so are policies attached to waypoints only.
    pub fn new(root_namespace: &str, policies: impl IntoIterator<Item = AuthzPolicy>) -> Self {
        let mut set = Self {
            root_namespace: root_namespace.into(),
            root: Scope::default(),
            namespaces: HashMap::new(),
            len: 0,
        };
        for policy in policies {
            if policy.action == Action::Audit || !policy.binding.at_workloads() {
                continue;
            }
            set.len += 1;
            let scope = if policy.id.namespace == set.root_namespace {
                &mut set.root
            } else {
                set.namespaces
                    .entry(policy.id.namespace.clone())
                    .or_default()
            };
            scope.insert(Arc::new(policy));
        }
        set.root.sort();
        set.namespaces.values_mut().for_each(Scope::sort);
        set
    }

    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// The number of policies that take part in decisions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn find<T>(
        &self,
        dest: &Destination<'_>,
        action: Action,
        mut f: impl FnMut(&PolicyRef) -> Option<T>,
    ) -> Option<T> {
        // A workload of the root namespace is in the mesh-wide scope only: its namespace's
        // policies are the root's.
        if dest.namespace != self.root_namespace
            && let Some(scope) = self.namespaces.get(dest.namespace)
            && let Some(found) = scope.find(dest.labels, action, &mut f)
        {
            return Some(found);
        }
        self.root.find(dest.labels, action, &mut f)
    }

    /// The policies applying to a workload, `DENY` first then `ALLOW`, in evaluation order.
    pub fn applicable(&self, dest: &Destination<'_>) -> Vec<PolicyRef> {
        let mut out = Vec::new();
        for action in [Action::Deny, Action::Allow] {
            self.find(dest, action, |p| {
                out.push(p.clone());
                None::<()>
            });
        }
        out
    }

    /// Every port that the policies applying to a workload name, in `ports`, `notPorts` or a
    /// `destination.port` condition: a decision can differ only between these ports and the
    /// rest, which all decide alike.
    pub fn named_ports(&self, dest: &Destination<'_>) -> BTreeSet<u16> {
        let mut ports = BTreeSet::new();
        for policy in self.applicable(dest) {
            for rule in &policy.rules {
                for op in &rule.to {
                    ports.extend(op.ports.iter().chain(&op.not_ports).copied());
                }
                for when in &rule.when {
                    if when.key == request::WhenKey::DestinationPort {
                        ports.extend(when.values.iter().chain(&when.not_values).filter_map(|v| {
                            match v {
                                request::WhenValue::Port(p) => Some(*p),
                                _ => None,
                            }
                        }));
                    }
                }
            }
        }
        ports
    }

    /// The authorization decision for a flow (without `PeerAuthentication`; see [`Engine`]).
    pub fn evaluate(&self, flow: &Flow<'_>) -> Decision {
        let dest = &flow.destination;
        if let Some(reason) = self.find(dest, Action::Deny, |p| {
            p.matching_rule(flow)
                .map(|(rule, fail_closed)| Reason::Denied {
                    policy: p.clone(),
                    rule,
                    fail_closed,
                })
        }) {
            return Decision::deny(reason);
        }
        let mut allow_policies = 0usize;
        if let Some(reason) = self.find(dest, Action::Allow, |p| {
            allow_policies += 1;
            p.matching_rule(flow).map(|(rule, _)| Reason::Allowed {
                policy: p.clone(),
                rule,
            })
        }) {
            return Decision::allow(reason);
        }
        if allow_policies > 0 {
            Decision::deny(Reason::NoAllowMatched { allow_policies })
        } else {
            Decision::allow(Reason::NoAllowPolicy)
        }
    }
}

/// The mode a port of a workload runs in, and what decided it.
#[derive(Debug, Clone)]
pub struct MtlsResolution {
    pub mode: MtlsMode,
    /// `None`: no policy applies, the default (`PERMISSIVE`).
    pub policy: Option<Arc<PeerPolicy>>,
    /// The mode came from the policy's `portLevelMtls`.
    pub port_level: bool,
}

#[derive(Debug, Default)]
struct PeerScope {
    wide: Vec<Arc<PeerPolicy>>,
    selected: Vec<Arc<PeerPolicy>>,
}

/// All peer authentication policies, indexed by namespace.
///
/// Precedence: policies selecting the workload, then its namespace's policies without a
/// selector, then those of the root namespace without a selector (a root-namespace policy
/// with a selector applies to that namespace's workloads only, as in Istio). Within a policy a
/// port-level mode wins over the policy's mode; `UNSET` inherits from the next level. When
/// several policies of the same level apply (a conflict Istio settles by age, which a
/// snapshot may not know), the strictest wins: a conflict never opens a port to plaintext.
#[derive(Debug)]
pub struct PeerAuthSet {
    root_namespace: String,
    namespaces: HashMap<String, PeerScope>,
}

impl PeerAuthSet {
    pub fn new(root_namespace: &str, policies: impl IntoIterator<Item = PeerPolicy>) -> Self {
        let mut namespaces: HashMap<String, PeerScope> = HashMap::new();
        for policy in policies {
            let scope = namespaces.entry(policy.id.namespace.clone()).or_default();
            if policy.selector.is_some() {
                scope.selected.push(Arc::new(policy));
            } else {
                scope.wide.push(Arc::new(policy));
            }
        }
        for scope in namespaces.values_mut() {
            scope.wide.sort_by(|x, y| x.id.cmp(&y.id));
            scope.selected.sort_by(|x, y| x.id.cmp(&y.id));
        }
        Self {
            root_namespace: root_namespace.into(),
            namespaces,
        }
    }

    /// The effective mode of every port of a workload: the mode of the ports no policy names,
    /// and the ports whose mode differs from it. This is what the datapath enforces per pod.
    pub fn resolve_workload(&self, dest: &Destination<'_>) -> (MtlsMode, BTreeMap<u16, MtlsMode>) {
        // Port-level modes only exist for ports a policy names, and 0 is never one.
        let default = self.resolve(dest, 0).mode;
        let ports = self
            .named_ports(dest)
            .into_iter()
            .filter_map(|port| {
                let mode = self.resolve(dest, port).mode;
                (mode != default).then_some((port, mode))
            })
            .collect();
        (default, ports)
    }

    /// Every port a policy in a workload's scopes names at port level.
    pub fn named_ports(&self, dest: &Destination<'_>) -> BTreeSet<u16> {
        [dest.namespace, self.root_namespace.as_str()]
            .into_iter()
            .filter_map(|ns| self.namespaces.get(ns))
            .flat_map(|scope| scope.wide.iter().chain(&scope.selected))
            .flat_map(|p| p.ports.keys().copied())
            .collect()
    }

    /// The effective mode of a workload's port.
    pub fn resolve(&self, dest: &Destination<'_>, port: u16) -> MtlsResolution {
        let own = self.namespaces.get(dest.namespace);
        let root = (dest.namespace != self.root_namespace)
            .then(|| self.namespaces.get(&self.root_namespace))
            .flatten();
        let none: &[Arc<PeerPolicy>] = &[];
        let selects = |p: &&Arc<PeerPolicy>| {
            p.selector
                .as_ref()
                .is_some_and(|sel| sel.iter().all(|(k, v)| dest.labels.get(k) == Some(v)))
        };
        // Most general level first, so each level can inherit the one below it.
        let levels: [Vec<&Arc<PeerPolicy>>; 3] = [
            root.map_or(none, |s| s.wide.as_slice()).iter().collect(),
            own.map_or(none, |s| s.wide.as_slice()).iter().collect(),
            own.map_or(none, |s| s.selected.as_slice())
                .iter()
                .filter(selects)
                .collect(),
        ];
        let mut current = MtlsResolution {
            mode: MtlsMode::Permissive,
            policy: None,
            port_level: false,
        };
        for level in levels {
            let mut best: Option<MtlsResolution> = None;
            for p in level {
                let candidate = match p.mode_for(port) {
                    Some((mode, port_level)) => MtlsResolution {
                        mode,
                        policy: Some(p.clone()),
                        port_level,
                    },
                    None => current.clone(),
                };
                if best.as_ref().is_none_or(|b| candidate.mode > b.mode) {
                    best = Some(candidate);
                }
            }
            if let Some(best) = best {
                current = best;
            }
        }
        current
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        })
    }
}

/// What decided, for access logs and `meshctl policy explain`.
#[derive(Debug, Clone)]
pub enum Reason {
    /// No `DENY` policy matched and no `ALLOW` policy applies to the workload.
    NoAllowPolicy,
    Allowed {
        policy: PolicyRef,
        rule: usize,
    },
    /// `fail_closed`: the rule matched only because part of it cannot be evaluated.
    Denied {
        policy: PolicyRef,
        rule: usize,
        fail_closed: bool,
    },
    /// `ALLOW` policies apply to the workload and none matched.
    NoAllowMatched {
        allow_policies: usize,
    },
    /// A plaintext connection to a port that requires mutual TLS.
    MtlsRequired {
        policy: Arc<PeerPolicy>,
        port_level: bool,
    },
}

#[derive(Debug, Clone)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
}

impl Decision {
    pub(super) fn allow(reason: Reason) -> Self {
        Self {
            verdict: Verdict::Allow,
            reason,
        }
    }

    pub(super) fn deny(reason: Reason) -> Self {
        Self {
            verdict: Verdict::Deny,
            reason,
        }
    }

    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    /// The authorization policy that decided, if one did.
    pub fn policy(&self) -> Option<&PolicyRef> {
        match &self.reason {
            Reason::Allowed { policy, .. } | Reason::Denied { policy, .. } => Some(policy),
            _ => None,
        }
    }
}

fn enforcement_note(enforcement: &Enforcement) -> &'static str {
    match enforcement {
        Enforcement::Rejected { .. } => " (the policy is rejected: its fail-closed stand-in)",
        _ => "",
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.verdict)?;
        match &self.reason {
            Reason::NoAllowPolicy => {
                f.write_str("no DENY policy matched and no ALLOW policy applies to the workload")
            }
            Reason::Allowed { policy, rule } => write!(
                f,
                "ALLOW policy {} rule {rule} matched{}",
                policy.id,
                enforcement_note(&policy.enforcement)
            ),
            Reason::Denied {
                policy,
                rule,
                fail_closed,
            } => {
                write!(
                    f,
                    "DENY policy {} rule {rule} matched{}",
                    policy.id,
                    enforcement_note(&policy.enforcement)
                )?;
                if *fail_closed {
                    f.write_str(
                        " (fail closed: part of the rule cannot be evaluated for this connection)",
                    )?;
                }
                Ok(())
            }
            Reason::NoAllowMatched { allow_policies } => write!(
                f,
                "{allow_policies} ALLOW {} to the workload and none matched",
                if *allow_policies == 1 {
                    "policy applies"
                } else {
                    "policies apply"
                }
            ),
            Reason::MtlsRequired { policy, port_level } => write!(
                f,
                "plaintext connection, but PeerAuthentication {} requires mutual TLS{}",
                policy.id,
                if *port_level { " on this port" } else { "" }
            ),
        }
    }
}

/// Everything the node needs to decide: the entry point for the agent and for `explain`,
/// and for the waypoint ([`Engine::decide_request`]).
#[derive(Debug)]
pub struct Engine {
    /// Policies bound to workloads, for node agents.
    pub authorization: PolicySet,
    /// Policies attached to waypoints.
    pub waypoint: WaypointPolicies,
    pub peer_authentication: PeerAuthSet,
    /// Every policy the engine was built from, with its `Accepted` condition, sorted: what
    /// the agent's config dump shows.
    pub listing: Vec<Listed>,
}

/// One policy as the engine enforces it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listed {
    pub kind: &'static str,
    /// `namespace/name`.
    pub id: String,
    pub generation: Option<i64>,
    pub condition: super::status::Condition,
}

impl Default for Engine {
    /// No policies: every connection allowed, every workload `PERMISSIVE`.
    fn default() -> Self {
        Self::new(DEFAULT_ROOT_NAMESPACE, [], [])
    }
}

impl Engine {
    pub fn new(
        root_namespace: &str,
        authorization: impl IntoIterator<Item = AuthzPolicy>,
        peer_authentication: impl IntoIterator<Item = PeerPolicy>,
    ) -> Self {
        let authorization: Vec<AuthzPolicy> = authorization.into_iter().collect();
        let peer_authentication: Vec<PeerPolicy> = peer_authentication.into_iter().collect();
        let mut listing: Vec<Listed> = authorization
            .iter()
            .map(|p| Listed {
                kind: "AuthorizationPolicy",
                id: p.id.to_string(),
                generation: p.generation,
                condition: super::status::authorization_condition(p),
            })
            .chain(peer_authentication.iter().map(|p| Listed {
                kind: "PeerAuthentication",
                id: p.id.to_string(),
                generation: p.generation,
                condition: super::status::peer_condition(p),
            }))
            .collect();
        listing.sort_by(|a, b| (&a.id, a.kind).cmp(&(&b.id, b.kind)));
        let waypoint = WaypointPolicies::new(root_namespace, &authorization);
        Self {
            authorization: PolicySet::new(root_namespace, authorization),
            waypoint,
            peer_authentication: PeerAuthSet::new(root_namespace, peer_authentication),
            listing,
        }
    }

    /// What the datapath enforces for plaintext to a workload: whether a caller without an
    /// identity, whose address the kernel does not weigh, is refused on the ports no policy
    /// names, and on each named port where that differs. It is [`Engine::decide`] itself for
    /// such a caller (STRICT mutual TLS, DENY and ALLOW policies alike), so the kernel and
    /// `explain` cannot disagree; `ipBlocks` conditions are unknown for it and fail closed.
    pub fn plaintext_refusals(&self, dest: &Destination<'_>) -> (bool, BTreeMap<u16, bool>) {
        let mut named = self.authorization.named_ports(dest);
        named.extend(self.peer_authentication.named_ports(dest));
        let refused = |port: u16| {
            !self
                .decide(&Flow {
                    destination: *dest,
                    port,
                    source: None,
                    source_ip: None,
                })
                .is_allowed()
        };
        // Any port no policy names stands for all of them; if every port is named, there is
        // no other port and the default never applies.
        let other = (0..=u16::MAX).find(|p| !named.contains(p));
        let default = other.is_none_or(refused);
        let ports = named
            .into_iter()
            .filter_map(|port| {
                let r = refused(port);
                (r != default).then_some((port, r))
            })
            .collect();
        (default, ports)
    }

    pub fn decide(&self, flow: &Flow<'_>) -> Decision {
        if flow.source.is_none() {
            let mtls = self
                .peer_authentication
                .resolve(&flow.destination, flow.port);
            if let (MtlsMode::Strict, Some(policy)) = (mtls.mode, mtls.policy) {
                return Decision::deny(Reason::MtlsRequired {
                    policy,
                    port_level: mtls.port_level,
                });
            }
        }
        self.authorization.evaluate(flow)
    }
}
