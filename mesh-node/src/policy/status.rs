//! Status conditions of the policy resources.
//!
//! Each object gets one condition, `Accepted`, shaped like Kubernetes' `metav1.Condition`:
//!
//! | status | reason | meaning |
//! |---|---|---|
//! | True | `Accepted` | enforced exactly as written |
//! | False | `PartiallyEnforced` | enforced, but some fields fail closed (named in the message) |
//! | False | `Invalid` | rejected (bad value); a stand-in is enforced fail closed |
//! | False | `Unsupported` | rejected (a field changing the whole object's meaning); a stand-in is enforced |
//! | False | `NoEffect` | never changes anything: an `AUDIT` policy (audit logging is not implemented), or a `RequestAuthentication` bound to workloads (only waypoints read tokens) |
//!
//! Request attributes (HTTP fields, JWT principals, `when`) are enforced as written in a
//! policy attached to waypoints (`targetRefs`); in a policy bound to workloads they make it
//! `PartiallyEnforced`, with a message saying to attach it to a waypoint.
//!
//! `observedGeneration` is the object's `metadata.generation` the condition describes, so a
//! reader can tell a stale status from a current one.

use std::fmt::Write as _;

use super::{
    jwt::JwtPolicy,
    model::{Action, AuthzPolicy, Binding, Enforcement, PeerPolicy, StandIn},
};
pub use crate::k8s::status::{ACCEPTED, Condition, PolicyStatus};

/// One object as a config dump lists it: the policies an engine enforces, the traffic
/// policies of a waypoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listed {
    pub kind: &'static str,
    /// `namespace/name`.
    pub id: String,
    pub generation: Option<i64>,
    pub condition: Condition,
}

/// What the rules of an action do with a field that fails closed.
fn fail_closed_effect(action: Action) -> &'static str {
    match action {
        Action::Allow => "fails closed: the ALLOW rules using them match nothing",
        Action::Deny => {
            "fails closed: the DENY rules using them match every connection their other fields match"
        }
        Action::Audit => "audit policies never change a decision",
    }
}

/// Where a stand-in applies, in words.
fn scope(binding: &Binding) -> &'static str {
    match binding {
        Binding::Workloads => "the workloads it may select",
        Binding::Targets(_) => "the waypoints and services it targets",
        Binding::NamespaceWaypoints => "the waypoints serving its namespace",
        Binding::Everywhere => {
            "the workloads it may select and the waypoints serving its namespace"
        }
    }
}

fn stand_in_effect(stand_in: StandIn, binding: &Binding) -> String {
    let scope = scope(binding);
    match stand_in {
        StandIn::AllowNothing => format!(
            "enforced as an ALLOW policy with no rules on {scope}: they are reachable only through other ALLOW policies"
        ),
        StandIn::DenyAll => format!("enforced as denying every connection to {scope}"),
        StandIn::Strict => format!("enforced as STRICT on every port of {scope}"),
        StandIn::Nothing => "it had no effect on decisions anyway".into(),
        StandIn::RejectTokens => format!(
            "enforced as accepting no issuer at {scope}: requests carrying a token there are refused unless another RequestAuthentication verifies it"
        ),
    }
}

const AUDIT_NO_EFFECT: &str =
    "AUDIT policies never change a decision and audit logging is not implemented";

fn condition(ok: bool, reason: &str, message: String, generation: Option<i64>) -> Condition {
    Condition {
        type_: ACCEPTED.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: String::new(),
    }
}

fn from_enforcement(
    enforcement: &Enforcement,
    binding: &Binding,
    (effect, no_effect): (&str, &str),
    generation: Option<i64>,
) -> Condition {
    match enforcement {
        Enforcement::Full => condition(true, "Accepted", "enforced as written".into(), generation),
        Enforcement::FailClosed(fields) => {
            let mut message = String::from("partially enforced: ");
            for (i, field) in fields.iter().enumerate() {
                let _ = write!(message, "{}{field}", if i == 0 { "" } else { "; " });
            }
            if !effect.is_empty() {
                let _ = write!(message, "; {effect}");
            }
            condition(false, "PartiallyEnforced", message, generation)
        }
        Enforcement::Rejected { error, stand_in } => condition(
            false,
            error.reason(),
            format!("rejected: {error}; {}", stand_in_effect(*stand_in, binding)),
            generation,
        ),
        Enforcement::NoEffect => condition(false, "NoEffect", no_effect.into(), generation),
    }
}

/// The `Accepted` condition of an authorization policy (without a transition time: see
/// [`set_condition`]).
pub fn authorization_condition(policy: &AuthzPolicy) -> Condition {
    from_enforcement(
        &policy.enforcement,
        &policy.binding,
        (fail_closed_effect(policy.action), AUDIT_NO_EFFECT),
        policy.generation,
    )
}

/// The `Accepted` condition of a request authentication.
pub fn request_authentication_condition(policy: &JwtPolicy) -> Condition {
    from_enforcement(
        &policy.enforcement,
        &policy.binding,
        (
            "",
            "RequestAuthentication applies at waypoints only: attach it to one with targetRefs (with a selector or neither, nothing reads its tokens)",
        ),
        policy.generation,
    )
}

/// The `Accepted` condition of a peer authentication.
pub fn peer_condition(policy: &PeerPolicy) -> Condition {
    from_enforcement(
        &policy.enforcement,
        &Binding::Workloads,
        // The only partial case is DISABLE, whose note says what is enforced instead.
        ("", ""),
        policy.generation,
    )
}

/// Puts `new` into `conditions`, replacing the one of the same type. The transition time is
/// kept when the status did not change (Kubernetes' convention), set to `now` otherwise.
/// Returns whether anything changed, so callers write the status only when needed.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition, now: &str) -> bool {
    if let Some(old) = conditions.iter_mut().find(|c| c.type_ == new.type_) {
        new.last_transition_time = if old.status == new.status {
            old.last_transition_time.clone()
        } else {
            now.into()
        };
        let changed = *old != new;
        *old = new;
        changed
    } else {
        new.last_transition_time = now.into();
        conditions.push(new);
        true
    }
}

/// `time` as RFC 3339 in UTC with second precision, as Kubernetes writes it.
pub fn rfc3339(time: time::OffsetDateTime) -> String {
    let t = time.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::policy::RequestAuthentication;

    /// A `RequestAuthentication` of `shop` at generation 4, scoped as `scope` says.
    fn request_authentication(scope: &str, rules: &str) -> JwtPolicy {
        let text = format!(
            "kind: RequestAuthentication\nmetadata: {{namespace: shop, name: ra, generation: 4}}\nspec:\n  {scope}\n  jwtRules: {rules}\n"
        );
        let obj: RequestAuthentication = serde_saphyr::from_str(&text).expect("manifest parses");
        JwtPolicy::compile(&obj).expect("manifest has metadata")
    }

    const ON_WEB: &str = "targetRefs: [{kind: Service, name: web}]";

    #[test]
    fn request_authentication_conditions() {
        let ok = request_authentication(ON_WEB, "[{issuer: i, jwksFile: /k}]");
        let c = request_authentication_condition(&ok);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Accepted"));
        assert_eq!(c.observed_generation, Some(4));

        let partial =
            request_authentication(ON_WEB, "[{issuer: i, jwksFile: /k, fromParams: [token]}]");
        let c = request_authentication_condition(&partial);
        assert_eq!(c.reason, "PartiallyEnforced");
        assert!(
            c.message.contains("spec.jwtRules[0].fromParams"),
            "{}",
            c.message
        );

        let rejected = request_authentication(ON_WEB, "[{issuer: i}]");
        let c = request_authentication_condition(&rejected);
        assert_eq!(c.status, "False");
        for expected in [
            "rejected: spec.jwtRules[0]",
            "needs one of jwks, jwksUri or jwksFile",
            "requests carrying a token there are refused",
        ] {
            assert!(
                c.message.contains(expected),
                "{expected:?} in {}",
                c.message
            );
        }

        let selector = request_authentication(
            "selector: {matchLabels: {app: web}}",
            "[{issuer: i, jwksFile: /k}]",
        );
        let c = request_authentication_condition(&selector);
        assert_eq!(c.reason, "NoEffect");
        assert!(
            c.message.contains("attach it to one with targetRefs"),
            "{}",
            c.message
        );
    }
}
