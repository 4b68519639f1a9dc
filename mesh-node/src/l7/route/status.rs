//! Route status: for each parent this implementation serves, the `Accepted` and
//! `ResolvedRefs` conditions, with `observedGeneration`.
//!
//! | condition | status | reason | when |
//! |---|---|---|---|
//! | Accepted | True | `Accepted` | attached and programmed |
//! | Accepted | False | `NoMatchingParent` | the parent Service does not exist; a port the waypoint does not listen on |
//! | Accepted | False | `NotAllowedByListeners` | a waypoint in another namespace |
//! | Accepted | False | `UnsupportedValue` | the route is invalid (not programmed), or programmed with filters that answer 500 |
//! | Accepted | False | `IncompatibleFilters` | filters that cannot be combined (not programmed) |
//! | ResolvedRefs | True | `ResolvedRefs` | every backend and mirror reference resolves |
//! | ResolvedRefs | False | `InvalidKind`, `RefNotPermitted`, `BackendNotFound` | the first that does not (all are listed in the message) |
//!
//! Parents of kinds this implementation does not serve, and Gateways that are not waypoints
//! (another controller's, or none at all), get no entry: the specification leaves a parent's
//! status to the controller of that parent.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::{
    CompiledRoute,
    compile::{Parent, ParentKind},
    limits,
    spec::ParentReference,
};
use crate::{k8s::WAYPOINT_CONTROLLER_NAME, policy::status::Condition};

/// Problems listed in one condition message.
const LISTED: usize = 8;

/// The conditions of one route on each of its parents.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteStatus {
    pub parents: Vec<ParentStatus>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParentStatus {
    /// As written in the route.
    pub parent_ref: ParentReference,
    /// Without transition times: [`RouteStatus::to_status_json`] sets them.
    pub conditions: Vec<Condition>,
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: String::new(),
    }
}

/// The status of `route`, given which Services exist and which Gateways are waypoints (both
/// by namespace and name).
pub fn route_status(
    route: &CompiledRoute,
    service_exists: &dyn Fn(&str, &str) -> bool,
    is_waypoint: &dyn Fn(&str, &str) -> bool,
) -> RouteStatus {
    let resolved = resolved_refs(route, service_exists);
    let parents = route
        .parents
        .iter()
        .filter_map(|parent| {
            let accepted = accepted(route, parent, service_exists, is_waypoint)?;
            Some(ParentStatus {
                parent_ref: parent.written.clone(),
                conditions: std::iter::once(accepted).chain(resolved.clone()).collect(),
            })
        })
        .collect();
    RouteStatus { parents }
}

/// `None`: not a parent this implementation reports on.
fn accepted(
    route: &CompiledRoute,
    parent: &Parent,
    service_exists: &dyn Fn(&str, &str) -> bool,
    is_waypoint: &dyn Fn(&str, &str) -> bool,
) -> Option<Condition> {
    let generation = route.generation;
    let (namespace, name) = (parent.namespace.as_str(), parent.name.as_str());
    let rejected = |reason: &str, message: String| {
        Some(condition("Accepted", false, reason, message, generation))
    };
    match parent.kind? {
        ParentKind::Gateway if !is_waypoint(namespace, name) => return None,
        ParentKind::Service if !service_exists(namespace, name) => {
            return rejected(
                "NoMatchingParent",
                format!("Service {namespace}/{name} does not exist"),
            );
        }
        _ => {}
    }
    if let Some(refusal) = &parent.refusal {
        return rejected(refusal.reason, refusal.message.clone());
    }
    let route = match &route.outcome {
        Err(e) => return rejected(e.reason(), format!("not programmed: {e}")),
        Ok(route) => route,
    };
    let unsupported: Vec<&str> = route.unsupported_filters().collect();
    if !unsupported.is_empty() {
        let mut message = format!(
            "programmed, but requests reaching these filters get 500 (they cannot be skipped): {}",
            unsupported[..unsupported.len().min(LISTED)].join("; ")
        );
        if unsupported.len() > LISTED {
            let _ = write!(message, "; and {} more", unsupported.len() - LISTED);
        }
        return rejected("UnsupportedValue", message);
    }
    Some(condition(
        "Accepted",
        true,
        "Accepted",
        "programmed".into(),
        generation,
    ))
}

/// `None` when the spec could not be read (there are no references to check).
fn resolved_refs(
    route: &CompiledRoute,
    service_exists: &dyn Fn(&str, &str) -> bool,
) -> Option<Condition> {
    let refs = route.refs.as_ref()?;
    let mut reason = None;
    let mut message = String::new();
    let mut problems = 0;
    for r in refs {
        let (why, problem_reason) = match r.problem {
            Some(problem) => (problem.to_string(), problem.reason()),
            None if !service_exists(&r.namespace, &r.name) => (
                format!("Service {}/{} does not exist", r.namespace, r.name),
                "BackendNotFound",
            ),
            None => continue,
        };
        reason.get_or_insert(problem_reason);
        problems += 1;
        if problems <= LISTED {
            let _ = write!(
                message,
                "{}{}: {}",
                if problems == 1 { "" } else { "; " },
                r.path,
                why
            );
        }
    }
    if problems > LISTED {
        let _ = write!(message, "; and {} more", problems - LISTED);
    }
    Some(match reason {
        None => condition(
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "every backend reference resolves".into(),
            route.generation,
        ),
        Some(reason) => condition("ResolvedRefs", false, reason, message, route.generation),
    })
}

impl RouteStatus {
    /// The route's `status` object. Entries of other controllers in `previous` (the current
    /// `status`, if any) are kept, since `parents` is replaced as a whole; a condition keeps
    /// its `lastTransitionTime` from `previous` while its status is unchanged, and gets `now`
    /// (RFC 3339) otherwise.
    pub fn to_status_json(&self, previous: Option<&Value>, now: &str) -> Value {
        let previous_parents: &[Value] = previous
            .and_then(|p| p.get("parents"))
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice);
        let ours = |p: &&Value| {
            p.get("controllerName").and_then(Value::as_str) == Some(WAYPOINT_CONTROLLER_NAME)
        };
        let mut parents: Vec<Value> = previous_parents
            .iter()
            .filter(|p| !ours(p))
            .cloned()
            .collect();
        for parent in &self.parents {
            let parent_ref = serde_json::to_value(&parent.parent_ref).unwrap_or(Value::Null);
            let before: Vec<Condition> = previous_parents
                .iter()
                .filter(ours)
                .find(|p| p.get("parentRef") == Some(&parent_ref))
                .and_then(|p| p.get("conditions"))
                .and_then(|c| serde_json::from_value(c.clone()).ok())
                .unwrap_or_default();
            let conditions: Vec<Condition> = parent
                .conditions
                .iter()
                .map(|c| {
                    let mut c = c.clone();
                    c.last_transition_time = before
                        .iter()
                        .find(|b| {
                            b.type_ == c.type_
                                && b.status == c.status
                                && !b.last_transition_time.is_empty()
                        })
                        .map_or_else(|| now.to_owned(), |b| b.last_transition_time.clone());
                    c
                })
                .collect();
            parents.push(json!({
                "parentRef": parent_ref,
                "controllerName": WAYPOINT_CONTROLLER_NAME,
                "conditions": conditions,
            }));
        }
        // The CRD allows 32 entries.
        parents.truncate(limits::PARENT_REFS);
        json!({ "parents": parents })
    }
}
