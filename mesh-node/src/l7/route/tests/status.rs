//! `status.parents[]`: `Accepted` and `ResolvedRefs` per parent, and the status object.

use serde_json::{Value, json};

use super::route;
use crate::{
    k8s::WAYPOINT_CONTROLLER_NAME,
    l7::route::{RouteStatus, route_status},
};

const SERVICES: [(&str, &str); 3] = [("shop", "web"), ("shop", "v1"), ("other", "db")];
const WAYPOINTS: [(&str, &str); 2] = [("shop", "waypoint"), ("other", "waypoint")];

fn status_of(manifest: &str) -> RouteStatus {
    let services = |ns: &str, name: &str| SERVICES.contains(&(ns, name));
    let waypoints = |ns: &str, name: &str| WAYPOINTS.contains(&(ns, name));
    route_status(&route(manifest), &services, &waypoints)
}

/// `type=status/reason` of each condition of each parent.
fn summary(status: &RouteStatus) -> Vec<Vec<String>> {
    status
        .parents
        .iter()
        .map(|p| {
            p.conditions
                .iter()
                .map(|c| format!("{}={}/{}", c.type_, c.status, c.reason))
                .collect()
        })
        .collect()
}

#[test]
fn a_good_route_is_accepted_with_resolved_refs_at_its_generation() {
    let status = status_of(
        r#"
kind: HTTPRoute
metadata: {name: r, generation: 7}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 8080}, {name: waypoint}]
  rules: [{backendRefs: [{name: v1, port: 80}]}]
"#,
    );
    assert_eq!(
        summary(&status),
        [
            ["Accepted=True/Accepted", "ResolvedRefs=True/ResolvedRefs"],
            ["Accepted=True/Accepted", "ResolvedRefs=True/ResolvedRefs"],
        ]
    );
    assert!(
        status
            .parents
            .iter()
            .flat_map(|p| &p.conditions)
            .all(|c| c.observed_generation == Some(7))
    );
    assert_eq!(status.parents[0].parent_ref.port, Some(8080));
}

#[test]
fn unknown_parents_and_unresolved_backends_are_reported() {
    let status = status_of(
        r#"
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{group: "", kind: Service, name: gone}]
  rules:
  - backendRefs:
    - {name: missing, port: 80}
    - {name: db, namespace: other, port: 5432}
    - {group: example.com, kind: Bucket, name: b}
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}]
"#,
    );
    assert_eq!(
        summary(&status),
        [[
            "Accepted=False/NoMatchingParent",
            "ResolvedRefs=False/BackendNotFound"
        ]]
    );
    let resolved = &status.parents[0].conditions[1].message;
    for expected in [
        "spec.rules[0].filters[0].requestMirror.backendRef: Service shop/shadow does not exist",
        "spec.rules[0].backendRefs[0]: Service shop/missing does not exist",
        "spec.rules[0].backendRefs[1]: backends in another namespace are not permitted",
        "spec.rules[0].backendRefs[2]: only core Services can be backends",
    ] {
        assert!(
            resolved.contains(expected),
            "missing {expected:?} in {resolved}"
        );
    }
}

#[test]
fn the_first_reference_problem_gives_the_reason() {
    let reason = |backends: &str| {
        let status = status_of(&format!(
            "kind: HTTPRoute\nmetadata: {{name: r}}\nspec: {{parentRefs: [{{name: waypoint}}], rules: [{{backendRefs: {backends}}}]}}\n"
        ));
        status.parents[0].conditions[1].reason.clone()
    };
    assert_eq!(
        reason("[{name: db, namespace: other, port: 1}]"),
        "RefNotPermitted"
    );
    assert_eq!(reason("[{kind: ServiceImport, name: web}]"), "InvalidKind");
    assert_eq!(
        reason("[{name: nope, port: 1}, {kind: Pod, name: p}]"),
        "BackendNotFound"
    );
}

#[test]
fn an_invalid_route_is_not_accepted_and_says_why() {
    let status = status_of(
        r#"
kind: HTTPRoute
metadata: {name: r, generation: 2}
spec:
  parentRefs: [{name: waypoint}]
  rules:
  - matches: [{path: {type: RegularExpression, value: "(("}}]
    backendRefs: [{name: web, port: 8080}]
"#,
    );
    let accepted = &status.parents[0].conditions[0];
    assert_eq!(
        (accepted.status.as_str(), accepted.reason.as_str()),
        ("False", "UnsupportedValue")
    );
    assert!(
        accepted.message.starts_with("not programmed: spec.rules[0].matches[0].path.value: \"((\" is not a regular expression"),
        "{}",
        accepted.message
    );
    assert_eq!(accepted.observed_generation, Some(2));
    // References are still checked.
    assert_eq!(status.parents[0].conditions[1].reason, "ResolvedRefs");
}

#[test]
fn incompatible_filters_have_their_own_reason() {
    let status = status_of(
        r"
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: waypoint}]
  rules: [{filters: [{type: RequestRedirect, requestRedirect: {}}, {type: URLRewrite, urlRewrite: {}}]}]
",
    );
    assert_eq!(
        status.parents[0].conditions[0].reason,
        "IncompatibleFilters"
    );
}

#[test]
fn an_unreadable_route_is_reported_on_its_parents_without_resolved_refs() {
    let status = status_of(
        r"
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: waypoint}]
  rules: {not: a list}
",
    );
    assert_eq!(summary(&status), [["Accepted=False/UnsupportedValue"]]);
    assert!(
        status.parents[0].conditions[0]
            .message
            .contains("spec: cannot be read")
    );
}

#[test]
fn unsupported_filters_are_programmed_but_not_accepted() {
    let status = status_of(
        r"
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: waypoint}]
  rules: [{filters: [{type: ExtensionRef, extensionRef: {group: x.io, kind: Auth, name: a}}], backendRefs: [{name: web, port: 8080}]}]
",
    );
    let accepted = &status.parents[0].conditions[0];
    assert_eq!(accepted.reason, "UnsupportedValue");
    assert!(accepted.message.contains("get 500"), "{}", accepted.message);
    assert!(
        accepted
            .message
            .contains("spec.rules[0].filters[0]: filter type ExtensionRef"),
        "{}",
        accepted.message
    );
}

#[test]
fn parents_the_waypoint_does_not_serve_get_no_entry() {
    let status = status_of(
        r#"
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs:
  - {name: ingress}
  - {group: example.com, kind: Mesh, name: m}
  - {name: waypoint, namespace: other}
  - {name: waypoint, port: 80}
  - {group: "", kind: Service, name: db, namespace: other}
  rules: [{}]
"#,
    );
    let parents: Vec<(Option<&str>, &str, Vec<String>)> = status
        .parents
        .iter()
        .map(|p| {
            (
                p.parent_ref.namespace.as_deref(),
                p.parent_ref.name.as_str(),
                p.conditions
                    .iter()
                    .filter(|c| c.type_ == "Accepted")
                    .map(|c| c.reason.clone())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        parents,
        [
            (
                Some("other"),
                "waypoint",
                vec!["NotAllowedByListeners".to_owned()]
            ),
            (None, "waypoint", vec!["NoMatchingParent".to_owned()]),
            (Some("other"), "db", vec!["UnsupportedValue".to_owned()]),
        ]
    );
}

const ROUTE: &str = r"
kind: HTTPRoute
metadata: {name: r, generation: 3}
spec:
  parentRefs: [{name: waypoint}]
  rules: [{backendRefs: [{name: web, port: 8080}]}]
";

#[test]
fn the_status_object_has_the_gateway_api_shape() {
    let json = status_of(ROUTE).to_status_json(None, "2025-01-01T00:00:00Z");
    assert_eq!(
        json,
        json!({"parents": [{
            "parentRef": {"name": "waypoint"},
            "controllerName": WAYPOINT_CONTROLLER_NAME,
            "conditions": [
                {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "programmed",
                 "observedGeneration": 3, "lastTransitionTime": "2025-01-01T00:00:00Z"},
                {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs",
                 "message": "every backend reference resolves",
                 "observedGeneration": 3, "lastTransitionTime": "2025-01-01T00:00:00Z"},
            ],
        }]})
    );
}

#[test]
fn other_controllers_entries_and_unchanged_transition_times_are_kept() {
    let previous = json!({"parents": [
        {"parentRef": {"name": "ingress"}, "controllerName": "example.com/gateway",
         "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                         "lastTransitionTime": "2020-01-01T00:00:00Z"}]},
        {"parentRef": {"name": "waypoint"}, "controllerName": WAYPOINT_CONTROLLER_NAME,
         "conditions": [
            {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "programmed",
             "lastTransitionTime": "2024-06-01T00:00:00Z"},
            {"type": "ResolvedRefs", "status": "False", "reason": "BackendNotFound", "message": "x",
             "lastTransitionTime": "2024-06-01T00:00:00Z"}]},
    ]});
    let json = status_of(ROUTE).to_status_json(Some(&previous), "2025-01-01T00:00:00Z");
    let parents = json["parents"].as_array().expect("parents");
    assert_eq!(parents.len(), 2);
    assert_eq!(
        parents[0], previous["parents"][0],
        "another controller's entry is kept as is"
    );
    let times: Vec<&Value> = parents[1]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .map(|c| &c["lastTransitionTime"])
        .collect();
    // Accepted stayed True; ResolvedRefs went from False to True.
    assert_eq!(
        times,
        [
            &json!("2024-06-01T00:00:00Z"),
            &json!("2025-01-01T00:00:00Z")
        ]
    );
}
