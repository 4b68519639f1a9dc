//! The waypoint's decision: may this request pass?
//!
//! The policies are those attached to the waypoint ([`Binding`](crate::policy::model::Binding)): by its `Gateway`,
//! by the destination `Service`, by the waypoint `GatewayClass` from the root namespace, and
//! the stand-ins of rejected waypoint policies of the gateway's or the service's namespace
//! (of any namespace, from the root namespace). Policies bound to workloads are never
//! consulted here: node agents enforce them.
//!
//! The order is the node's ([`super`]): any matching `DENY` denies (a rule that cannot
//! be fully evaluated counts as matching); then, if any `ALLOW` applies, one must surely
//! match; otherwise the request is allowed. The [`Flow`] gives the source identity (the
//! verified peer of the HBONE connection), its address (or `None`, which makes `ipBlocks`
//! unknown) and the port the request was addressed to (the service port, which `ports` and
//! `destination.port` match); its `destination` is not used. `PeerAuthentication` does not
//! apply: waypoints only accept mutual TLS.

use std::sync::Arc;

use super::decision::{Decision, Reason};
use crate::policy::{
    facts::{Flow, RequestFacts, WaypointTarget},
    matching::Prepared,
    model::{Action, AuthzPolicy, PolicyRef},
    targets::TargetIndex,
};

/// The policies attached to waypoints, indexed by target. Immutable: rebuilt with the engine.
#[derive(Debug)]
pub struct WaypointPolicies {
    deny: TargetIndex<PolicyRef>,
    allow: TargetIndex<PolicyRef>,
    len: usize,
}

impl WaypointPolicies {
    /// Indexes the policies attached to waypoints among `policies`; the rest are ignored.
    pub fn new(root_namespace: &str, policies: &[AuthzPolicy]) -> Self {
        let mut set = Self {
            deny: TargetIndex::new(root_namespace),
            allow: TargetIndex::new(root_namespace),
            len: 0,
        };
        for policy in policies {
            let index = match policy.action {
                Action::Deny => &mut set.deny,
                Action::Allow => &mut set.allow,
                Action::Audit => continue,
            };
            if !policy.binding.at_waypoints() {
                continue;
            }
            set.len += 1;
            let policy = Arc::new(policy.clone());
            index.insert(&policy.id.namespace, &policy.binding, policy.clone());
        }
        set
    }

    /// The number of policies attached to waypoints that take part in decisions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The policies of `action` applying to requests at `target`, each once, by id.
    fn find(&self, target: &WaypointTarget<'_>, action: Action) -> Vec<&PolicyRef> {
        let index = match action {
            Action::Deny => &self.deny,
            Action::Allow => &self.allow,
            Action::Audit => return Vec::new(),
        };
        let mut out = index.find(target);
        // One policy may be attached several ways (its gateway and its service).
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out.dedup_by(|a, b| Arc::ptr_eq(a, b));
        out
    }

    /// The policies applying to requests at `target`, `DENY` first then `ALLOW`, in
    /// evaluation order (for explanations).
    pub fn applicable(&self, target: &WaypointTarget<'_>) -> Vec<PolicyRef> {
        [Action::Deny, Action::Allow]
            .into_iter()
            .flat_map(|action| self.find(target, action))
            .cloned()
            .collect()
    }

    /// The decision for one request (see the module documentation).
    pub fn evaluate(
        &self,
        target: &WaypointTarget<'_>,
        flow: &Flow<'_>,
        request: &RequestFacts<'_>,
    ) -> Decision {
        let prepared = Prepared::new(request);
        for policy in self.find(target, Action::Deny) {
            if let Some((rule, fail_closed)) = policy.matching_rule_with(flow, Some(&prepared)) {
                return Decision::deny(Reason::Denied {
                    policy: policy.clone(),
                    rule,
                    fail_closed,
                });
            }
        }
        let allow = self.find(target, Action::Allow);
        for policy in &allow {
            if let Some((rule, _)) = policy.matching_rule_with(flow, Some(&prepared)) {
                return Decision::allow(Reason::Allowed {
                    policy: (*policy).clone(),
                    rule,
                });
            }
        }
        if allow.is_empty() {
            Decision::allow(Reason::NoAllowPolicy)
        } else {
            Decision::deny(Reason::NoAllowMatched {
                allow_policies: allow.len(),
            })
        }
    }
}
