//! Tables of a waypoint's routing objects, from the `routes` and `traffic_policies` of its
//! config dump (see `mesh_node::l7::listing`): how the waypoint takes each route on each of its
//! parents, and whether each TrafficPolicy applies.

use serde_json::Value;

use crate::tables::{cell, header, list, render};

/// Said instead of a table by an endpoint that lists no routing objects.
const NOT_A_WAYPOINT: &str = "no routing objects listed here: only waypoints hold them \
     (point --admin at a waypoint's admin address)\n";

/// `Gateway shop/waypoint`, `Service shop/web:8080`: a `parentRef` as written, with the
/// defaults the Gateway API gives absent fields.
fn parent(parent_ref: &Value, route_namespace: &str) -> String {
    let kind = parent_ref["kind"].as_str().unwrap_or("Gateway");
    let namespace = parent_ref["namespace"].as_str().unwrap_or(route_namespace);
    let mut out = format!("{kind} {namespace}/{}", cell(&parent_ref["name"]));
    if let Some(section) = parent_ref["sectionName"].as_str() {
        out = format!("{out}/{section}");
    }
    if let Some(port) = parent_ref["port"].as_i64() {
        out = format!("{out}:{port}");
    }
    out
}

/// The condition of `type_` among `conditions`.
fn condition<'a>(conditions: &'a Value, type_: &str) -> &'a Value {
    list(conditions)
        .find(|c| c["type"] == type_)
        .unwrap_or(&Value::Null)
}

/// `meshctl routes`: one row per route and parent the waypoints serve.
pub fn routes(dump: &Value) -> String {
    if dump["routes"].is_null() {
        return NOT_A_WAYPOINT.into();
    }
    let mut rows = vec![header(&[
        "KIND",
        "ROUTE",
        "GENERATION",
        "PARENT",
        "ACCEPTED",
        "REASON",
        "REFS",
        "MESSAGE",
    ])];
    for route in list(&dump["routes"]) {
        let id = cell(&route["id"]);
        let namespace = id.split_once('/').map_or("", |(ns, _)| ns).to_owned();
        let row = |parent: String, accepted: &Value, refs: &Value, message: String| {
            vec![
                cell(&route["kind"]),
                id.clone(),
                cell(&route["generation"]),
                parent,
                cell(&accepted["status"]),
                cell(&accepted["reason"]),
                cell(&refs["reason"]),
                message,
            ]
        };
        let mut parents = list(&route["parents"]).peekable();
        if parents.peek().is_none() {
            rows.push(row(
                "-".into(),
                &Value::Null,
                &Value::Null,
                "no parent served by a waypoint".into(),
            ));
        }
        for p in parents {
            let accepted = condition(&p["conditions"], "Accepted");
            let refs = condition(&p["conditions"], "ResolvedRefs");
            // The first problem says what to fix; a route served as written needs no message.
            let problem = list(&p["conditions"]).find(|c| c["status"] != "True");
            rows.push(row(
                parent(&p["parent_ref"], &namespace),
                accepted,
                refs,
                problem.map_or_else(|| "-".into(), |c| cell(&c["message"])),
            ));
        }
    }
    render(&rows)
}

/// `meshctl traffic-policies`: each TrafficPolicy and whether it applies.
pub fn traffic_policies(dump: &Value) -> String {
    if dump["traffic_policies"].is_null() {
        return NOT_A_WAYPOINT.into();
    }
    let mut rows = vec![header(&[
        "POLICY",
        "GENERATION",
        "ACCEPTED",
        "REASON",
        "MESSAGE",
    ])];
    for p in list(&dump["traffic_policies"]) {
        let c = &p["condition"];
        rows.push(vec![
            cell(&p["id"]),
            cell(&p["generation"]),
            cell(&c["status"]),
            cell(&c["reason"]),
            cell(&c["message"]),
        ]);
    }
    render(&rows)
}

#[cfg(test)]
mod tests {
    use mesh_node::{
        k8s::gateway::ParentReference,
        l7::{
            L7Listing,
            route::{ParentStatus, RouteId, RouteKind, RouteStatus},
        },
        policy::{PolicyId, status::Condition},
    };
    use serde_json::json;

    use super::*;

    fn condition(type_: &str, ok: bool, reason: &str, message: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: if ok { "True" } else { "False" }.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: Some(2),
            last_transition_time: String::new(),
        }
    }

    /// A waypoint's dump, as the waypoint serialises its listing.
    fn dump() -> Value {
        let route = |kind, name: &str| RouteId {
            kind,
            namespace: "shop".into(),
            name: name.into(),
        };
        let waypoint = ParentStatus {
            parent_ref: ParentReference {
                name: "waypoint".into(),
                ..ParentReference::default()
            },
            conditions: vec![
                condition("Accepted", true, "Accepted", "programmed"),
                condition(
                    "ResolvedRefs",
                    false,
                    "BackendNotFound",
                    "spec.rules[0].backendRefs[0]: Service shop/v2 does not exist",
                ),
            ],
        };
        let service = ParentStatus {
            parent_ref: ParentReference {
                group: Some(String::new()),
                kind: Some("Service".into()),
                name: "web".into(),
                port: Some(8080),
                ..ParentReference::default()
            },
            conditions: vec![
                condition("Accepted", true, "Accepted", "programmed"),
                condition(
                    "ResolvedRefs",
                    true,
                    "ResolvedRefs",
                    "every backend reference resolves",
                ),
            ],
        };
        let listing = L7Listing::new(
            [
                (
                    route(RouteKind::Http, "web"),
                    Some(2),
                    RouteStatus {
                        parents: vec![waypoint, service],
                    },
                ),
                (
                    route(RouteKind::Grpc, "elsewhere"),
                    Some(1),
                    RouteStatus::default(),
                ),
            ],
            [(
                PolicyId {
                    namespace: "shop".into(),
                    name: "retries".into(),
                },
                Some(3),
                condition("Accepted", false, "Conflicted", "not applied to reviews"),
            )],
        );
        json!({"routes": listing.routes, "traffic_policies": listing.traffic_policies})
    }

    #[test]
    fn routes_show_each_parent_and_what_to_fix() {
        let table = routes(&dump());
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("KIND"), "{table}");
        assert!(
            lines[1].starts_with("GRPCRoute")
                && lines[1].ends_with("no parent served by a waypoint"),
            "sorted by name, a route without waypoint parents says so: {table}"
        );
        let waypoint = lines[2];
        assert!(
            waypoint.contains("Gateway shop/waypoint")
                && waypoint.contains("True")
                && waypoint.contains("BackendNotFound")
                && waypoint.ends_with("Service shop/v2 does not exist"),
            "{table}"
        );
        let service = lines[3];
        assert!(
            service.contains("Service shop/web:8080")
                && service.contains("ResolvedRefs")
                && service.ends_with(" -"),
            "{table}"
        );
    }

    #[test]
    fn traffic_policies_show_their_condition() {
        let table = traffic_policies(&dump());
        let row = table.lines().nth(1).expect("a row");
        assert!(
            row.starts_with("shop/retries") && row.contains("Conflicted"),
            "{table}"
        );
    }

    #[test]
    fn an_agent_is_told_it_holds_no_routing_objects() {
        let agent = json!({"policies": [], "routes": null});
        assert_eq!(routes(&agent), NOT_A_WAYPOINT);
        assert_eq!(traffic_policies(&json!({})), NOT_A_WAYPOINT);
    }
}
