//! Each match type, as the Gateway API defines it.

use super::{WEB, get, request, routed, table};
use crate::l7::route::{RouteTable, ServiceRef};

/// One route on `web` whose only rule has the given match.
fn one(m: &str) -> RouteTable {
    table(&[&format!(
        r#"
kind: HTTPRoute
metadata: {{name: r}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web}}]
  rules: [{{matches: [{m}], backendRefs: [{{name: web, port: 8080}}]}}]
"#
    )])
}

fn hits(t: &RouteTable, parts: &http::request::Parts) -> bool {
    match routed(t, &WEB, parts).as_str() {
        "r#0" => true,
        "404" => false,
        other => panic!("unexpected routing {other}"),
    }
}

#[test]
fn exact_paths_match_only_themselves_case_sensitively() {
    let t = one("{path: {type: Exact, value: /foo}}");
    assert!(hits(&t, &get("/foo")));
    assert!(
        hits(&t, &get("/foo?x=1")),
        "the query is not part of the path"
    );
    for miss in ["/foo/", "/Foo", "/foobar", "/", "/foo/bar"] {
        assert!(!hits(&t, &get(miss)), "{miss}");
    }
}

#[test]
fn path_prefixes_match_whole_segments() {
    for prefix in ["/foo", "/foo/"] {
        let t = one(&format!("{{path: {{type: PathPrefix, value: {prefix}}}}}"));
        for hit in ["/foo", "/foo/", "/foo/bar", "/foo/bar/baz?q"] {
            assert!(hits(&t, &get(hit)), "{prefix} should match {hit}");
        }
        for miss in ["/foobar", "/fo", "/", "/Foo", "/bar/foo"] {
            assert!(!hits(&t, &get(miss)), "{prefix} should not match {miss}");
        }
    }
    let root = one("{path: {type: PathPrefix, value: /}}");
    assert!(hits(&root, &get("/")));
    assert!(hits(&root, &get("/anything")));
}

#[test]
fn regular_expression_paths_must_match_the_whole_path() {
    let t = one("{path: {type: RegularExpression, value: '/items/[0-9]+'}}");
    assert!(hits(&t, &get("/items/42")));
    assert!(!hits(&t, &get("/items/42/details")));
    assert!(!hits(&t, &get("/v2/items/42")));
    assert!(!hits(&t, &get("/items/")));
    // Alternation stays anchored as a whole.
    let alt = one("{path: {type: RegularExpression, value: '/a|/b'}}");
    assert!(hits(&alt, &get("/a")));
    assert!(hits(&alt, &get("/b")));
    assert!(!hits(&alt, &get("/a/x")));
    assert!(!hits(&alt, &get("/x/b")));
}

#[test]
fn header_names_are_case_insensitive_and_values_exact() {
    let t = one("{headers: [{name: X-Version, value: v2}]}");
    assert!(hits(&t, &request("GET", "/", &[("x-version", "v2")])));
    assert!(hits(&t, &request("GET", "/", &[("X-VERSION", "v2")])));
    assert!(!hits(&t, &request("GET", "/", &[("x-version", "V2")])));
    assert!(!hits(&t, &request("GET", "/", &[("x-version", "v2 ")])));
    assert!(!hits(&t, &get("/")), "an absent header does not match");
    // Repeated header lines are read as one comma-separated value.
    let joined = one("{headers: [{name: accept, value: 'a,b'}]}");
    assert!(hits(
        &joined,
        &request("GET", "/", &[("accept", "a"), ("accept", "b")])
    ));
}

#[test]
fn header_regular_expressions_match_the_whole_value() {
    let t = one("{headers: [{type: RegularExpression, name: user-agent, value: '.*Firefox.*'}]}");
    assert!(hits(
        &t,
        &request("GET", "/", &[("user-agent", "Mozilla Firefox/1")])
    ));
    assert!(!hits(&t, &request("GET", "/", &[("user-agent", "curl/8")])));
    let anchored = one("{headers: [{type: RegularExpression, name: x, value: 'v[0-9]'}]}");
    assert!(hits(&anchored, &request("GET", "/", &[("x", "v1")])));
    assert!(!hits(&anchored, &request("GET", "/", &[("x", "v10")])));
}

#[test]
fn all_conditions_of_a_match_must_hold_and_any_match_of_a_rule_may() {
    let t = table(&[r#"
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches:
    - {path: {value: /foo}, headers: [{name: version, value: v2}]}
    - {path: {value: /v2/foo}}
    backendRefs: [{name: web, port: 8080}]
"#]);
    assert!(hits(&t, &request("GET", "/foo", &[("version", "v2")])));
    assert!(!hits(&t, &get("/foo")));
    assert!(hits(&t, &get("/v2/foo/x")));
}

#[test]
fn the_first_entry_for_a_header_name_counts() {
    let t = one("{headers: [{name: x, value: a}, {name: X, value: b}]}");
    assert!(hits(&t, &request("GET", "/", &[("x", "a")])));
    assert!(!hits(&t, &request("GET", "/", &[("x", "b")])));
}

#[test]
fn query_parameters_match_their_first_decoded_value() {
    let t = one("{queryParams: [{name: animal, value: whale}]}");
    assert!(hits(&t, &get("/?animal=whale")));
    assert!(hits(&t, &get("/?x=1&animal=whale")));
    assert!(hits(&t, &get("/?animal=wh%61le")));
    assert!(!hits(&t, &get("/?animal=dolphin&animal=whale")));
    assert!(
        !hits(&t, &get("/?Animal=whale")),
        "names are case-sensitive"
    );
    assert!(!hits(&t, &get("/")));
    let re = one("{queryParams: [{type: RegularExpression, name: id, value: '[0-9]+'}]}");
    assert!(hits(&re, &get("/?id=123")));
    assert!(!hits(&re, &get("/?id=12a")));
}

#[test]
fn methods_match_exactly() {
    let t = one("{method: POST}");
    assert!(hits(&t, &request("POST", "/", &[])));
    assert!(!hits(&t, &get("/")));
}

/// A route attached to the waypoint with the given hostnames.
fn on_gateway(hostnames: &str) -> RouteTable {
    table(&[&format!(
        r"
kind: HTTPRoute
metadata: {{name: r}}
spec:
  parentRefs: [{{name: waypoint}}]
  hostnames: {hostnames}
  rules: [{{backendRefs: [{{name: web, port: 8080}}]}}]
"
    )])
}

fn to_host(host: &str) -> http::request::Parts {
    http::Request::builder()
        .uri("/")
        .header("host", host)
        .body(())
        .expect("test request")
        .into_parts()
        .0
}

const OTHER: ServiceRef<'static> = ServiceRef {
    namespace: "shop",
    name: "other",
    port: 80,
};

#[test]
fn hostnames_match_the_host_without_port_and_case() {
    let t = on_gateway("[web.example.com]");
    for host in [
        "web.example.com",
        "WEB.Example.com",
        "web.example.com:8080",
        "web.example.com.",
    ] {
        assert_eq!(routed(&t, &OTHER, &to_host(host)), "r#0", "{host}");
    }
    // A route whose hostnames do not match does not apply at all.
    for host in ["api.example.com", "example.com", "web.example.com.evil"] {
        assert_eq!(routed(&t, &OTHER, &to_host(host)), "-", "{host}");
    }
    // HTTP/2 carries the host in the URI's authority.
    let h2 = http::Request::builder()
        .uri("http://web.example.com:8080/x")
        .body(())
        .expect("test request")
        .into_parts()
        .0;
    assert_eq!(routed(&t, &OTHER, &h2), "r#0");
}

#[test]
fn wildcard_hostnames_match_one_or_more_labels() {
    let t = on_gateway("['*.example.com']");
    for host in ["a.example.com", "a.b.example.com"] {
        assert_eq!(routed(&t, &OTHER, &to_host(host)), "r#0", "{host}");
    }
    for host in ["example.com", "aexample.com", "a.example.org"] {
        assert_eq!(routed(&t, &OTHER, &to_host(host)), "-", "{host}");
    }
}

#[test]
fn a_request_without_host_only_takes_routes_without_hostnames() {
    let no_host = http::Request::builder()
        .uri("/")
        .body(())
        .expect("test request")
        .into_parts()
        .0;
    assert_eq!(
        routed(&on_gateway("[web.example.com]"), &OTHER, &no_host),
        "-"
    );
    assert_eq!(routed(&on_gateway("[]"), &OTHER, &no_host), "r#0");
}

fn grpc_table(m: &str) -> RouteTable {
    table(&[&format!(
        r#"
kind: GRPCRoute
metadata: {{name: r}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web}}]
  rules: [{{matches: [{m}], backendRefs: [{{name: web, port: 8080}}]}}]
"#
    )])
}

fn grpc_call(path: &str, content_type: &str) -> http::request::Parts {
    request("POST", path, &[("content-type", content_type)])
}

#[test]
fn grpc_methods_match_service_and_method() {
    let t = grpc_table("{method: {service: helloworld.Greeter, method: SayHello}}");
    assert!(hits(
        &t,
        &grpc_call("/helloworld.Greeter/SayHello", "application/grpc")
    ));
    assert!(hits(
        &t,
        &grpc_call("/helloworld.Greeter/SayHello", "application/grpc+proto")
    ));
    assert!(hits(
        &t,
        &grpc_call(
            "/helloworld.Greeter/SayHello",
            "application/grpc;charset=utf-8"
        )
    ));
    assert!(!hits(
        &t,
        &grpc_call("/helloworld.Greeter/SayGoodbye", "application/grpc")
    ));
    assert!(!hits(
        &t,
        &grpc_call("/helloworld.Greeter/SayHello/x", "application/grpc")
    ));
    // Not gRPC: wrong method, missing or other content type.
    assert!(!hits(
        &t,
        &request(
            "GET",
            "/helloworld.Greeter/SayHello",
            &[("content-type", "application/grpc")]
        )
    ));
    assert!(!hits(
        &t,
        &request("POST", "/helloworld.Greeter/SayHello", &[])
    ));
    assert!(!hits(
        &t,
        &grpc_call("/helloworld.Greeter/SayHello", "application/json")
    ));
    assert!(!hits(
        &t,
        &grpc_call("/helloworld.Greeter/SayHello", "application/grpc-web")
    ));

    let method_only = grpc_table("{method: {method: SayHello}}");
    assert!(hits(
        &method_only,
        &grpc_call("/any.Service/SayHello", "application/grpc")
    ));
    assert!(!hits(
        &method_only,
        &grpc_call("/any.Service/Other", "application/grpc")
    ));

    let regex = grpc_table(
        "{method: {type: RegularExpression, service: 'helloworld\\..*', method: 'Say.*'}}",
    );
    assert!(hits(
        &regex,
        &grpc_call("/helloworld.Greeter/SayHi", "application/grpc")
    ));
    assert!(!hits(
        &regex,
        &grpc_call("/other.Greeter/SayHi", "application/grpc")
    ));

    let headers = grpc_table("{headers: [{name: tenant, value: a}]}");
    assert!(hits(
        &headers,
        &request(
            "POST",
            "/s.S/M",
            &[("content-type", "application/grpc"), ("tenant", "a")]
        )
    ));
    assert!(!hits(&headers, &grpc_call("/s.S/M", "application/grpc")));
}

#[test]
fn a_grpc_rule_without_matches_takes_every_grpc_call_and_nothing_else() {
    let t = table(&[r#"
kind: GRPCRoute
metadata: {name: r}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules: [{backendRefs: [{name: web, port: 8080}]}]
"#]);
    assert!(hits(&t, &grpc_call("/a.B/C", "application/grpc")));
    assert!(!hits(&t, &get("/a.B/C")));
}
