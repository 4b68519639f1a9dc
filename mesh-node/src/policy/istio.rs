//! The `security.istio.io` kinds, read unchanged: the same fields as their
//! `security.trellis.dev` twins, deserialised into the same types and compiled by the same
//! path ([`super::stored::Policy::compile_in`]). The few differences are applied here, at the
//! boundary, to the typed spec, on the controller (for the status) and on every agent and
//! waypoint alike (for enforcement), so both see the same object:
//!
//! - Trellis's own additions are not part of Istio's API: in an Istio object they are unknown
//!   fields, reported and failing closed like any other (`jwtRules[].jwksFile`, which would
//!   let an Istio object make a waypoint read a file of its choosing).
//! - A `GatewayClass` target named `istio-waypoint` means every waypoint, exactly as a
//!   `trellis-waypoint` one does in a Trellis object.

use crate::k8s::{
    ISTIO_WAYPOINT_CLASS, WAYPOINT_CLASS,
    policy::{AuthorizationPolicySpec, RequestAuthenticationSpec},
};

/// An Istio `AuthorizationPolicy` spec, made the twin's.
pub fn authorization(spec: &mut AuthorizationPolicySpec) {
    waypoint_class(spec.target_refs.as_mut());
    waypoint_class(spec.target_ref.as_mut());
}

/// An Istio `RequestAuthentication` spec, made the twin's.
pub fn request_authentication(spec: &mut RequestAuthenticationSpec) {
    waypoint_class(spec.target_refs.as_mut());
    waypoint_class(spec.target_ref.as_mut());
    for rule in &mut spec.jwt_rules {
        if let Some(file) = rule.jwks_file.take() {
            rule.extra
                .insert("jwksFile".to_owned(), serde_json::Value::String(file));
        }
    }
}

/// Renames Istio's waypoint class in one target or a list of them; anything that is not a
/// `GatewayClass` target of that name is left for the compile path to judge.
fn waypoint_class(targets: Option<&mut serde_json::Value>) {
    let Some(targets) = targets else { return };
    let rename = |target: &mut serde_json::Value| {
        let Some(target) = target.as_object_mut() else {
            return;
        };
        let is_class = target.get("kind").and_then(|k| k.as_str()) == Some("GatewayClass");
        if is_class && target.get("name").and_then(|n| n.as_str()) == Some(ISTIO_WAYPOINT_CLASS) {
            target.insert("name".into(), WAYPOINT_CLASS.into());
        }
    };
    match targets {
        serde_json::Value::Array(list) => list.iter_mut().for_each(rename),
        single => rename(single),
    }
}

#[cfg(test)]
mod tests;
