//! Which routes apply (attachment) and which of their matches wins (precedence).

use super::{WEB, get, request, routed, table};
use crate::l7::route::ServiceRef;

/// A route on `web` named `name` with one rule per match (`matches` of one entry each).
fn on_web(name: &str, matches: &[&str]) -> String {
    let rules: String = matches
        .iter()
        .map(|m| format!("  - {{matches: [{m}], backendRefs: [{{name: web, port: 8080}}]}}\n"))
        .collect();
    format!(
        "kind: HTTPRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web}}]\n  rules:\n{rules}"
    )
}

#[test]
fn an_exact_path_beats_any_prefix_whatever_the_order() {
    let t = table(&[
        &on_web("a", &["{path: {type: PathPrefix, value: /foo}}"]),
        &on_web("b", &["{path: {type: Exact, value: /foo}}"]),
    ]);
    assert_eq!(routed(&t, &WEB, &get("/foo")), "b#0");
    assert_eq!(routed(&t, &WEB, &get("/foo/x")), "a#0");
}

#[test]
fn the_longest_prefix_wins() {
    let t = table(&[&on_web(
        "r",
        &[
            "{path: {value: /}}",
            "{path: {value: /api}}",
            "{path: {value: /api/v1}}",
        ],
    )]);
    assert_eq!(routed(&t, &WEB, &get("/api/v1/users")), "r#2");
    assert_eq!(routed(&t, &WEB, &get("/api/v2")), "r#1");
    assert_eq!(routed(&t, &WEB, &get("/index.html")), "r#0");
}

#[test]
fn a_regular_expression_ranks_below_exact_and_above_prefixes() {
    let t = table(&[&on_web(
        "r",
        &[
            "{path: {value: /items}}",
            "{path: {type: RegularExpression, value: '/items/[0-9]+'}}",
            "{path: {type: Exact, value: /items/42}}",
        ],
    )]);
    assert_eq!(routed(&t, &WEB, &get("/items/42")), "r#2");
    assert_eq!(routed(&t, &WEB, &get("/items/7")), "r#1");
    assert_eq!(routed(&t, &WEB, &get("/items/x")), "r#0");
}

#[test]
fn then_method_then_more_headers_then_more_query_parameters() {
    let t = table(&[&on_web(
        "r",
        &[
            "{path: {value: /p}}",
            "{path: {value: /p}, queryParams: [{name: a, value: '1'}, {name: b, value: '2'}]}",
            "{path: {value: /p}, headers: [{name: x, value: '1'}]}",
            "{path: {value: /p}, headers: [{name: x, value: '1'}, {name: z, value: '2'}]}",
            "{path: {value: /p}, method: GET}",
        ],
    )]);
    let both = [("x", "1"), ("z", "2")];
    assert_eq!(routed(&t, &WEB, &request("GET", "/p", &both)), "r#4");
    assert_eq!(routed(&t, &WEB, &request("POST", "/p", &both)), "r#3");
    assert_eq!(
        routed(&t, &WEB, &request("POST", "/p?a=1&b=2", &[("x", "1")])),
        "r#2"
    );
    assert_eq!(routed(&t, &WEB, &request("POST", "/p?a=1&b=2", &[])), "r#1");
    assert_eq!(routed(&t, &WEB, &request("POST", "/p", &[])), "r#0");
}

#[test]
fn ties_go_to_the_route_first_in_namespace_name_order_then_the_first_rule() {
    let same = "{path: {value: /same}}";
    let t = table(&[&on_web("zeta", &[same]), &on_web("alpha", &[same, same])]);
    assert_eq!(routed(&t, &WEB, &get("/same")), "alpha#0");
}

#[test]
fn precedence_is_per_match_not_per_rule() {
    // Rule 0 has a broad match listed first and a specific one; rule 1 is in between.
    let t = table(&[r#"
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{path: {value: /}}, {path: {type: Exact, value: /a/b}}]
    backendRefs: [{name: web, port: 8080}]
  - matches: [{path: {value: /a}}]
    backendRefs: [{name: web, port: 8080}]
"#]);
    assert_eq!(routed(&t, &WEB, &get("/a/b")), "r#0");
    assert_eq!(routed(&t, &WEB, &get("/a/c")), "r#1");
    assert_eq!(routed(&t, &WEB, &get("/z")), "r#0");
}

const ON_GATEWAY: &str = r"
kind: HTTPRoute
metadata: {name: gw-route}
spec:
  parentRefs: [{name: waypoint}]
  rules: [{matches: [{path: {value: /gw}}], backendRefs: [{name: web, port: 8080}]}]
";

const OTHER: ServiceRef<'static> = ServiceRef {
    namespace: "shop",
    name: "other",
    port: 80,
};

#[test]
fn service_routes_take_precedence_over_gateway_routes() {
    let t = table(&[ON_GATEWAY, &on_web("svc-route", &["{path: {value: /svc}}"])]);
    // `web` has its own route: the waypoint's do not apply, even where they would match.
    assert_eq!(routed(&t, &WEB, &get("/svc")), "svc-route#0");
    assert_eq!(routed(&t, &WEB, &get("/gw")), "404");
    // `other` has none: the waypoint's apply.
    assert_eq!(routed(&t, &OTHER, &get("/gw")), "gw-route#0");
    assert_eq!(routed(&t, &OTHER, &get("/svc")), "404");
}

#[test]
fn without_any_route_the_request_is_not_routed() {
    let t = table(&[&on_web("svc-route", &["{path: {value: /svc}}"])]);
    assert_eq!(routed(&t, &OTHER, &get("/svc")), "-");
    assert_eq!(routed(&table(&[]), &WEB, &get("/")), "-");
}

#[test]
fn a_port_on_a_service_parent_limits_the_route_to_that_port() {
    let t = table(&[r#"
kind: HTTPRoute
metadata: {name: on-8080}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 8080}]
  rules: [{backendRefs: [{name: web, port: 8080}]}]
"#]);
    assert_eq!(routed(&t, &WEB, &get("/")), "on-8080#0");
    let web_9090 = ServiceRef { port: 9090, ..WEB };
    assert_eq!(routed(&t, &web_9090, &get("/")), "-");
}

#[test]
fn the_core_group_may_be_written_empty_or_core() {
    let t = table(&[r"
kind: HTTPRoute
metadata: {name: core}
spec:
  parentRefs: [{group: core, kind: Service, name: web}]
  rules: [{}]
"]);
    assert_eq!(routed(&t, &WEB, &get("/")), "core#0");
}

#[test]
fn routes_attach_only_within_their_parents_namespace() {
    let t = table(&[
        // A "consumer" route for shop/web from another namespace.
        r#"
kind: HTTPRoute
metadata: {namespace: elsewhere, name: consumer}
spec:
  parentRefs: [{group: "", kind: Service, name: web, namespace: shop}]
  rules: [{}]
"#,
        // A route in another namespace naming the waypoint.
        r"
kind: HTTPRoute
metadata: {namespace: elsewhere, name: foreign}
spec:
  parentRefs: [{name: waypoint, namespace: shop}]
  rules: [{}]
",
    ]);
    assert_eq!(routed(&t, &WEB, &get("/")), "-");
}

#[test]
fn a_gateway_parent_on_another_port_or_of_another_kind_does_not_attach() {
    let t = table(&[
        r"
kind: HTTPRoute
metadata: {name: port-80}
spec:
  parentRefs: [{name: waypoint, port: 80}]
  rules: [{}]
",
        r"
kind: HTTPRoute
metadata: {name: mesh-kind}
spec:
  parentRefs: [{group: networking.example.com, kind: Mesh, name: waypoint}]
  rules: [{}]
",
    ]);
    assert_eq!(routed(&t, &OTHER, &get("/")), "-");
    let explicit = table(&[r"
kind: HTTPRoute
metadata: {name: port-15008}
spec:
  parentRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint, port: 15008, sectionName: mesh}]
  rules: [{}]
"]);
    assert_eq!(routed(&explicit, &OTHER, &get("/")), "port-15008#0");
}

#[test]
fn on_a_gateway_the_most_specific_hostname_wins_before_the_path() {
    let route = |name: &str, hostnames: &str, path: &str| {
        format!(
            "kind: HTTPRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{name: waypoint}}]\n  hostnames: {hostnames}\n  rules: [{{matches: [{{path: {{value: {path}}}}}]}}]\n"
        )
    };
    let t = table(&[
        &route("any", "[]", "/api/v1"),
        &route("wild", "['*.example.com']", "/api"),
        &route("wider-wild", "['*.com']", "/api/v1/x"),
        &route("exact", "[web.example.com]", "/"),
    ]);
    let to = |host: &str, path: &str| {
        http::Request::builder()
            .uri(path)
            .header("host", host)
            .body(())
            .expect("test request")
            .into_parts()
            .0
    };
    assert_eq!(
        routed(&t, &OTHER, &to("web.example.com", "/api/v1/x")),
        "exact#0"
    );
    assert_eq!(
        routed(&t, &OTHER, &to("api.example.com", "/api/v1/x")),
        "wild#0"
    );
    // A more specific hostname's routes are tried first, then less specific ones.
    assert_eq!(routed(&t, &OTHER, &to("api.example.com", "/other")), "404");
    assert_eq!(
        routed(&t, &OTHER, &to("example.com", "/api/v1/x")),
        "wider-wild#0"
    );
    assert_eq!(routed(&t, &OTHER, &to("example.org", "/api/v1")), "any#0");
}

#[test]
fn grpc_routes_come_before_http_routes_for_grpc_calls() {
    let t = table(&[
        &on_web("http", &["{path: {value: /}}"]),
        r#"
kind: GRPCRoute
metadata: {name: grpc}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules: [{matches: [{method: {service: pkg.Svc}}]}]
"#,
    ]);
    let call = |path: &str| request("POST", path, &[("content-type", "application/grpc")]);
    assert_eq!(routed(&t, &WEB, &call("/pkg.Svc/Get")), "grpc#0");
    // A gRPC call no GRPCRoute rule takes may still take an HTTPRoute rule.
    assert_eq!(routed(&t, &WEB, &call("/other.Svc/Get")), "http#0");
    assert_eq!(routed(&t, &WEB, &get("/pkg.Svc/Get")), "http#0");
}

#[test]
fn grpc_precedence_prefers_longer_service_then_method_then_headers() {
    let t = table(&[r#"
kind: GRPCRoute
metadata: {name: g}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{method: {method: Get}}]
  - matches: [{method: {service: pkg.Svc}}]
  - matches: [{method: {service: pkg.Svc, method: Get}}]
  - matches: [{method: {service: pkg.Svc, method: Get}, headers: [{name: x, value: '1'}]}]
"#]);
    let call = |path: &str, extra: &[(&str, &str)]| {
        let mut headers = vec![("content-type", "application/grpc")];
        headers.extend_from_slice(extra);
        request("POST", path, &headers)
    };
    assert_eq!(
        routed(&t, &WEB, &call("/pkg.Svc/Get", &[("x", "1")])),
        "g#3"
    );
    assert_eq!(routed(&t, &WEB, &call("/pkg.Svc/Get", &[])), "g#2");
    assert_eq!(routed(&t, &WEB, &call("/pkg.Svc/Put", &[])), "g#1");
    assert_eq!(routed(&t, &WEB, &call("/other.Svc/Get", &[])), "g#0");
    assert_eq!(routed(&t, &WEB, &call("/other.Svc/Put", &[])), "404");
}

#[test]
fn the_last_of_duplicate_routes_counts() {
    let t = table(&[
        &on_web("dup", &["{path: {value: /old}}"]),
        &on_web("dup", &["{path: {value: /new}}"]),
    ]);
    assert_eq!(t.len(), 1);
    assert_eq!(routed(&t, &WEB, &get("/new")), "dup#0");
    assert_eq!(routed(&t, &WEB, &get("/old")), "404");
}
