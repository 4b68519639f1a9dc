//! `AuthorizationPolicy` conversion, object by object: the strict conversion
//! ([`TryFrom`]), and [`AuthzPolicy::compile`], which puts a fail-closed stand-in in place of
//! an object it must reject. Rules are converted in [`super::rules`].

use super::{
    authz::{Action, AuthzPolicy, Rule},
    binding::Binding,
    conversion::{
        Enforcement, Notes, PolicyError, PolicyId, StandIn, Why, metadata, reject_extra, selector,
    },
    rules,
};
use crate::k8s::policy::AuthorizationPolicy;

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
