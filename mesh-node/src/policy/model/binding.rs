//! Where a policy is enforced: on workloads by node agents, or on requests by waypoints.
//!
//! Istio ambient's rules, which Trellis follows for `AuthorizationPolicy` and
//! `RequestAuthentication`:
//!
//! - A policy with `targetRefs` (or the older single `targetRef`) is **attached to
//!   waypoints** and only there: node agents ignore it. A target is
//!   - `kind: Gateway` (group `gateway.networking.k8s.io`, the default): the waypoint of that
//!     name in the policy's namespace, for every request through it;
//!   - `kind: Service` (group `""` or `core`): requests for that service of the policy's
//!     namespace, at whichever waypoint serves it;
//!   - `kind: GatewayClass`: every waypoint of that class, honoured only for policies in the
//!     root namespace (elsewhere it binds nothing, as in Istio). The Trellis waypoint class is
//!     [`WAYPOINT_CLASS`](crate::k8s::WAYPOINT_CLASS).
//! - A policy with a `selector`, or with neither, applies to **workloads** and is enforced by
//!   node agents only; waypoints ignore it, root namespace included (Istio's waypoints apply
//!   no selector or namespace-wide policy either; a mesh-wide waypoint policy targets the
//!   `GatewayClass` from the root namespace).
//!
//! A target in another namespace, of another kind (`ServiceEntry`, routes), or both a
//! `selector` and `targetRefs` make the object invalid; its stand-in is then bound as
//! narrowly as surely covers what the author meant ([`Binding::stand_in`]).

use serde_json::Value;

use super::conversion::{PolicyError, Why};
use crate::k8s::GATEWAY_GROUP;

/// Istio's limit on `targetRefs` (the CRD's `maxItems`).
pub const MAX_TARGET_REFS: usize = 16;

/// One target of a waypoint policy; the namespace is the policy's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetRef {
    Gateway(String),
    Service(String),
    GatewayClass(String),
}

impl std::fmt::Display for TargetRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gateway(n) => write!(f, "Gateway {n}"),
            Self::Service(n) => write!(f, "Service {n}"),
            Self::GatewayClass(n) => write!(f, "GatewayClass {n}"),
        }
    }
}

/// Where a policy is enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// By node agents, on the workloads its selector picks (all of its scope without one).
    Workloads,
    /// By waypoints, for these targets of its namespace.
    Targets(Vec<TargetRef>),
    /// A stand-in whose targets could not be read: by every waypoint, for requests to its
    /// namespace or through a waypoint of its namespace (every request, in the root
    /// namespace).
    NamespaceWaypoints,
    /// A stand-in that cannot tell how the author meant to bind it: both of the above.
    Everywhere,
}

impl Binding {
    /// Whether node agents enforce the policy.
    pub fn at_workloads(&self) -> bool {
        matches!(self, Self::Workloads | Self::Everywhere)
    }

    /// Whether waypoints enforce the policy.
    pub fn at_waypoints(&self) -> bool {
        !matches!(self, Self::Workloads)
    }

    /// The binding of a valid object: `Targets` with targetRefs, else `Workloads`.
    pub(crate) fn of(
        namespace: &str,
        has_selector: bool,
        target_ref: Option<&Value>,
        target_refs: Option<&Value>,
    ) -> Result<Self, PolicyError> {
        match targets(namespace, target_ref, target_refs)? {
            None => Ok(Self::Workloads),
            Some(_) if has_selector => Err(PolicyError::Unsupported {
                path: "spec.targetRefs".into(),
                why: Why::SelectorAndTargets,
            }),
            Some(refs) => Ok(Self::Targets(refs)),
        }
    }

    /// The binding of a rejected object's stand-in: as written when readable; a waypoint
    /// binding whose targets cannot be read covers every waypoint of the namespace; with
    /// both a selector and targets, both places.
    pub(crate) fn stand_in(
        namespace: &str,
        has_selector: bool,
        target_ref: Option<&Value>,
        target_refs: Option<&Value>,
    ) -> Self {
        let written = |v: Option<&Value>| v.is_some_and(|v| !is_empty_list(v));
        if !written(target_ref) && !written(target_refs) {
            return Self::Workloads;
        }
        if has_selector {
            return Self::Everywhere;
        }
        match targets(namespace, target_ref, target_refs) {
            Ok(Some(refs)) => Self::Targets(refs),
            _ => Self::NamespaceWaypoints,
        }
    }
}

fn is_empty_list(v: &Value) -> bool {
    v.is_null() || v.as_array().is_some_and(Vec::is_empty)
}

/// The targets written in `targetRef` / `targetRefs`; `None` when neither is (an empty
/// list is none, as in Istio).
fn targets(
    namespace: &str,
    target_ref: Option<&Value>,
    target_refs: Option<&Value>,
) -> Result<Option<Vec<TargetRef>>, PolicyError> {
    let single = target_ref.filter(|v| !v.is_null());
    let list = target_refs.filter(|v| !is_empty_list(v));
    match (single, list) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(PolicyError::Unsupported {
            path: "spec.targetRef".into(),
            why: Why::BothTargetRefForms,
        }),
        (Some(one), None) => Ok(Some(vec![target("spec.targetRef", namespace, one)?])),
        (None, Some(list)) => {
            let Some(items) = list.as_array() else {
                return Err(invalid("spec.targetRefs", "is not a list"));
            };
            if items.len() > MAX_TARGET_REFS {
                return Err(invalid(
                    "spec.targetRefs",
                    "has more than 16 entries (Istio's limit)",
                ));
            }
            let mut refs: Vec<TargetRef> = items
                .iter()
                .enumerate()
                .map(|(i, v)| target(&format!("spec.targetRefs[{i}]"), namespace, v))
                .collect::<Result<_, _>>()?;
            refs.sort();
            refs.dedup();
            Ok(Some(refs))
        }
    }
}

fn invalid(path: &str, what: &str) -> PolicyError {
    PolicyError::Invalid {
        path: path.into(),
        why: what.into(),
    }
}

fn target(path: &str, namespace: &str, v: &Value) -> Result<TargetRef, PolicyError> {
    let Some(obj) = v.as_object() else {
        return Err(invalid(path, "is not an object with kind and name"));
    };
    if let Some(key) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "group" | "kind" | "name" | "namespace"))
    {
        return Err(PolicyError::Unsupported {
            path: format!("{path}.{key}"),
            why: Why::UnknownField,
        });
    }
    let text = |field: &str| -> Result<Option<&str>, PolicyError> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(invalid(&format!("{path}.{field}"), "is not a string")),
        }
    };
    let name = match text("name")? {
        Some(n) if !n.is_empty() => n.to_owned(),
        _ => return Err(invalid(&format!("{path}.name"), "is missing")),
    };
    if let Some(ns) = text("namespace")?
        && ns != namespace
    {
        return Err(PolicyError::Unsupported {
            path: format!("{path}.namespace"),
            why: Why::OtherNamespace(ns.to_owned()),
        });
    }
    let group = text("group")?;
    let kind = text("kind")?.unwrap_or("");
    let gateway_group = matches!(group, None | Some(GATEWAY_GROUP));
    match kind {
        "Gateway" if gateway_group => Ok(TargetRef::Gateway(name)),
        "GatewayClass" if gateway_group => Ok(TargetRef::GatewayClass(name)),
        "Service" if matches!(group, None | Some("" | "core")) => Ok(TargetRef::Service(name)),
        _ => Err(PolicyError::Unsupported {
            path: format!("{path}.kind"),
            why: Why::TargetKind(format!(
                "{}{kind}",
                group.map(|g| format!("{g}/")).unwrap_or_default()
            )),
        }),
    }
}
