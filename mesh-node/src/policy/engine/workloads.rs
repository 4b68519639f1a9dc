//! Authorization policies bound to workloads, indexed for the node's decision
//! ([`PolicySet::evaluate`]): any matching `DENY` denies; then, if any `ALLOW` policy applies
//! to the workload, one of them must match; otherwise the connection is allowed.
//!
//! **Finding the policies** of a workload costs a hash lookup per scope (its namespace and the
//! root namespace) plus one per label of the workload: policies with a selector are indexed
//! under one of their labels, then checked against all of them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use super::decision::{Decision, Reason};
use crate::policy::{
    facts::{Destination, Flow},
    model::{Action, AuthzPolicy, PolicyRef, WhenKey, WhenValue},
};

impl AuthzPolicy {
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
                    if when.key == WhenKey::DestinationPort {
                        ports.extend(when.values.iter().chain(&when.not_values).filter_map(|v| {
                            match v {
                                WhenValue::Port(p) => Some(*p),
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
