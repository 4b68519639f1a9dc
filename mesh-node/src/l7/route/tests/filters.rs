//! Request and response filters: headers, redirects, rewrites, and the rules between them.

use http::{HeaderValue, StatusCode, header};

use super::{GW, WEB, request, table};
use crate::l7::route::{
    RequestAction, RouteTable, Routing, filters::replace_prefix, tests::rejection,
};

fn rule(matches: &str, filters: &str, backends: &str) -> RouteTable {
    table(&[&format!(
        r#"
kind: HTTPRoute
metadata: {{name: r}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web}}]
  rules: [{{matches: {matches}, filters: {filters}, backendRefs: {backends}}}]
"#
    )])
}

/// Runs the rule's request filters on `parts` and returns the action.
fn run(t: &RouteTable, parts: &mut http::request::Parts) -> RequestAction {
    match t.lookup(&GW, &WEB, parts) {
        Routing::Matched(m) => m.apply_request_filters(parts),
        other => panic!("expected a match, got {other:?}"),
    }
}

fn header_values(parts: &http::request::Parts, name: &str) -> Vec<String> {
    parts
        .headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect()
}

#[test]
fn request_header_modifier_sets_adds_and_removes() {
    let t = rule(
        "[]",
        "[{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Set, value: new}], add: [{name: x-add, value: more}], remove: [X-Gone]}}]",
        "[{name: web, port: 8080}]",
    );
    let mut parts = request(
        "GET",
        "/",
        &[
            ("x-set", "old"),
            ("x-set", "older"),
            ("x-add", "first"),
            ("x-gone", "bye"),
            ("x-kept", "k"),
        ],
    );
    assert_eq!(run(&t, &mut parts), RequestAction::Forward);
    assert_eq!(header_values(&parts, "x-set"), ["new"]);
    assert_eq!(header_values(&parts, "x-add"), ["first", "more"]);
    assert!(header_values(&parts, "x-gone").is_empty());
    assert_eq!(header_values(&parts, "x-kept"), ["k"]);
}

#[test]
fn response_header_modifiers_apply_rule_then_backend() {
    let t = rule(
        "[]",
        "[{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-who, value: rule}, {name: x-rule, value: r}]}}]",
        "[{name: web, port: 8080, filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-who, value: backend}], remove: [server]}}]}]",
    );
    let Routing::Matched(m) = t.lookup(&GW, &WEB, &request("GET", "/", &[])) else {
        panic!("expected a match");
    };
    let backend = m.pick_backend(0).expect("a backend");
    let (mut parts, ()) = http::Response::builder()
        .header("server", "secret/1.0")
        .body(())
        .expect("response")
        .into_parts();
    m.apply_response_filters(Some(backend), &mut parts);
    assert_eq!(parts.headers["x-who"], "backend");
    assert_eq!(parts.headers["x-rule"], "r");
    assert!(!parts.headers.contains_key("server"));
}

#[test]
fn backend_request_filters_apply_only_to_their_backend() {
    let t = rule(
        "[]",
        "[]",
        "[{name: v1, port: 80, filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-backend, value: v1}]}}]}]",
    );
    let mut parts = request("GET", "/", &[]);
    let Routing::Matched(m) = t.lookup(&GW, &WEB, &parts) else {
        panic!("expected a match");
    };
    assert_eq!(m.apply_request_filters(&mut parts), RequestAction::Forward);
    assert!(!parts.headers.contains_key("x-backend"));
    let backend = m.pick_backend(0).expect("a backend");
    assert_eq!(
        m.apply_backend_request_filters(backend, &mut parts),
        RequestAction::Forward
    );
    assert_eq!(parts.headers["x-backend"], "v1");
}

fn redirect_to(filter: &str, matches: &str, uri: &str) -> (StatusCode, String) {
    let t = rule(
        matches,
        &format!("[{{type: RequestRedirect, requestRedirect: {filter}}}]"),
        "[]",
    );
    let mut parts = request("GET", uri, &[]);
    match run(&t, &mut parts) {
        RequestAction::Redirect(r) => {
            let response = r.to_response();
            assert_eq!(response.status(), r.status);
            assert_eq!(response.headers()[header::LOCATION], r.location);
            (r.status, r.location.to_str().expect("ascii").to_owned())
        }
        other => panic!("expected a redirect, got {other:?}"),
    }
}

#[test]
fn redirects_rewrite_scheme_host_port_and_path_and_keep_the_query() {
    // The test request's host is web.shop.svc.cluster.local:8080.
    let cases = [
        (
            "{}",
            "/a?q=1",
            "http://web.shop.svc.cluster.local:8080/a?q=1",
        ),
        (
            "{scheme: https}",
            "/a",
            "https://web.shop.svc.cluster.local/a",
        ),
        (
            "{scheme: https, port: 8443}",
            "/a",
            "https://web.shop.svc.cluster.local:8443/a",
        ),
        (
            "{scheme: http, port: 80}",
            "/a",
            "http://web.shop.svc.cluster.local/a",
        ),
        ("{hostname: example.com}", "/a", "http://example.com:8080/a"),
        (
            "{hostname: example.com, port: 80}",
            "/a",
            "http://example.com/a",
        ),
        (
            "{path: {type: ReplaceFullPath, replaceFullPath: /new}}",
            "/a/b?x=y",
            "http://web.shop.svc.cluster.local:8080/new?x=y",
        ),
    ];
    for (filter, uri, expected) in cases {
        let (status, location) = redirect_to(filter, "[]", uri);
        assert_eq!(status, StatusCode::FOUND, "{filter}");
        assert_eq!(location, expected, "{filter}");
    }
    let (_, location) = redirect_to(
        "{path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}",
        "[{path: {value: /v1}}]",
        "/v1/items?page=2",
    );
    assert_eq!(
        location,
        "http://web.shop.svc.cluster.local:8080/v2/items?page=2"
    );
}

#[test]
fn redirects_use_the_configured_status_code() {
    for code in [301, 302, 303, 307, 308] {
        let (status, _) = redirect_to(&format!("{{statusCode: {code}}}"), "[]", "/");
        assert_eq!(status.as_u16(), code);
    }
    for code in [200, 300, 304, 404] {
        let e = rejection(&format!(
            "kind: HTTPRoute\nmetadata: {{name: r}}\nspec: {{rules: [{{filters: [{{type: RequestRedirect, requestRedirect: {{statusCode: {code}}}}}]}}]}}\n"
        ));
        assert!(
            e.contains("is not one of 301, 302, 303, 307, 308"),
            "{code}: {e}"
        );
    }
}

#[test]
fn prefix_replacement_follows_the_specification_table() {
    // Request path, prefix match, replacement, result (prefixes and replacements are stored
    // without trailing slash, as compilation leaves them).
    let table = [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
        ("/anything", "/", "/api", "/api/anything"),
    ];
    for (path, prefix, replacement, expected) in table {
        let got = replace_prefix(
            path,
            prefix.trim_end_matches('/'),
            replacement.trim_end_matches('/'),
        );
        assert_eq!(got, expected, "{path} {prefix} {replacement}");
    }
    // A path the prefix does not match element-wise is left alone.
    assert_eq!(replace_prefix("/foobar", "/foo", "/xyz"), "/foobar");
}

fn rewritten(filter: &str, matches: &str, uri: &str) -> http::request::Parts {
    let t = rule(
        matches,
        &format!("[{{type: URLRewrite, urlRewrite: {filter}}}]"),
        "[{name: web, port: 8080}]",
    );
    let mut parts = request("GET", uri, &[]);
    assert_eq!(run(&t, &mut parts), RequestAction::Forward);
    parts
}

#[test]
fn url_rewrite_replaces_the_matched_prefix_by_whole_segments() {
    let prefix = "{path: {type: ReplacePrefixMatch, replacePrefixMatch: /bar}}";
    let parts = rewritten(prefix, "[{path: {value: /foo}}]", "/foo/baz?q=1");
    assert_eq!(parts.uri, "/bar/baz?q=1");
    let parts = rewritten(prefix, "[{path: {value: /foo/}}]", "/foo/");
    assert_eq!(parts.uri, "/bar/");
    let parts = rewritten(prefix, "[{path: {value: /foo}}]", "/foo");
    assert_eq!(parts.uri, "/bar");
    // `/foobar` does not match the prefix `/foo`, so the rule does not apply at all.
    let t = rule(
        "[{path: {value: /foo}}]",
        &format!("[{{type: URLRewrite, urlRewrite: {prefix}}}]"),
        "[{name: web, port: 8080}]",
    );
    assert!(matches!(
        t.lookup(&GW, &WEB, &request("GET", "/foobar", &[])),
        Routing::NoMatch
    ));
}

#[test]
fn url_rewrite_replaces_the_full_path_and_the_host() {
    let parts = rewritten(
        "{hostname: backend.internal, path: {type: ReplaceFullPath, replaceFullPath: /v2/index}}",
        "[]",
        "/old/page?x=1",
    );
    assert_eq!(parts.uri, "/v2/index?x=1");
    assert_eq!(parts.headers[header::HOST], "backend.internal");
    // HTTP/2: the authority is in the URI and is rewritten too.
    let t = rule(
        "[]",
        "[{type: URLRewrite, urlRewrite: {hostname: backend.internal}}]",
        "[{name: web, port: 8080}]",
    );
    let mut h2 = request("GET", "http://web.shop:8080/p", &[]);
    assert_eq!(run(&t, &mut h2), RequestAction::Forward);
    assert_eq!(h2.uri, "http://backend.internal/p");
    assert_eq!(
        h2.headers[header::HOST],
        HeaderValue::from_static("backend.internal")
    );
}

#[test]
fn filter_combinations_the_specification_forbids_reject_the_route() {
    let with = |rule: &str| {
        rejection(&format!(
            "kind: HTTPRoute\nmetadata: {{name: r}}\nspec: {{rules: [{rule}]}}\n"
        ))
    };
    let redirect = "{type: RequestRedirect, requestRedirect: {scheme: https}}";
    let rewrite = "{type: URLRewrite, urlRewrite: {hostname: a.b}}";
    let header =
        "{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: b}]}}";
    let cases = [
        (format!("{{filters: [{redirect}, {rewrite}]}}"), "cannot be used together", "IncompatibleFilters"),
        (format!("{{filters: [{redirect}], backendRefs: [{{name: web, port: 80}}]}}"), "cannot be used together with backendRefs", "UnsupportedValue"),
        (format!("{{filters: [{header}, {header}]}}"), "only one RequestHeaderModifier", "UnsupportedValue"),
        (
            "{matches: [{path: {type: Exact, value: /a}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}".into(),
            "needs exactly one match in the rule, of type PathPrefix",
            "UnsupportedValue",
        ),
        (
            "{matches: [{path: {value: /a}}, {path: {value: /c}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}".into(),
            "needs exactly one match",
            "UnsupportedValue",
        ),
        ("{filters: [{type: RequestHeaderModifier}]}".into(), "must set requestHeaderModifier", "UnsupportedValue"),
        (
            "{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {}, urlRewrite: {}}]}".into(),
            "and no other filter's configuration",
            "UnsupportedValue",
        ),
        (
            "{filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replacePrefixMatch: /x}}}]}".into(),
            "needs replaceFullPath",
            "UnsupportedValue",
        ),
    ];
    for (rule, expected, reason) in cases {
        let compiled = super::route(&format!(
            "kind: HTTPRoute\nmetadata: {{name: r}}\nspec: {{rules: [{rule}]}}\n"
        ));
        let e = compiled.outcome.expect_err("the route is rejected");
        assert!(e.to_string().contains(expected), "{rule}: {e}");
        assert_eq!(e.reason(), reason, "{rule}");
        assert_eq!(with(&rule), e.to_string());
    }
}

#[test]
fn header_filters_are_validated() {
    let with = |config: &str| {
        rejection(&format!(
            "kind: HTTPRoute\nmetadata: {{name: r}}\nspec: {{rules: [{{filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {config}}}]}}]}}\n"
        ))
    };
    for (config, expected) in [
        (
            "{set: [{name: x, value: a}], remove: [X]}",
            "only one action per header name",
        ),
        (
            "{add: [{name: x, value: a}, {name: x, value: b}]}",
            "only one action per header name",
        ),
        (
            "{set: [{name: content-length, value: '0'}]}",
            "cannot be modified by a filter",
        ),
        (
            "{remove: [Transfer-Encoding]}",
            "cannot be modified by a filter",
        ),
        (
            "{set: [{name: host, value: evil}]}",
            "use URLRewrite for the host",
        ),
        (
            "{set: [{name: x, value: \"a\\nb\"}]}",
            "is not a header value",
        ),
        ("{set: [{name: x, value: ''}]}", "must be 1 to 4096 bytes"),
        ("{set: [{name: 'x y', value: a}]}", "is not a header name"),
    ] {
        let e = with(config);
        assert!(e.contains(expected), "{config}: {e}");
        assert!(
            e.starts_with("spec.rules[0].filters[0].requestHeaderModifier"),
            "{config}: {e}"
        );
    }
}

#[test]
fn filters_the_waypoint_does_not_implement_fail_closed() {
    for filter in [
        "{type: ExtensionRef, extensionRef: {group: example.com, kind: Auth, name: a}}",
        "{type: CORS, cors: {allowOrigins: ['*']}}",
        "{type: SomethingNew}",
    ] {
        let t = rule("[]", &format!("[{filter}]"), "[{name: web, port: 8080}]");
        assert_eq!(t.len(), 1, "the route is still programmed");
        let mut parts = request("GET", "/", &[]);
        assert!(
            matches!(run(&t, &mut parts), RequestAction::Fail(_)),
            "{filter} must not be skipped"
        );
    }
    // On a backend: only requests sent to that backend fail.
    let t = rule(
        "[]",
        "[]",
        "[{name: v1, port: 80, filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: F, name: f}}]}]",
    );
    let mut parts = request("GET", "/", &[]);
    let Routing::Matched(m) = t.lookup(&GW, &WEB, &parts) else {
        panic!("expected a match");
    };
    assert_eq!(m.apply_request_filters(&mut parts), RequestAction::Forward);
    let backend = m.pick_backend(0).expect("a backend");
    assert!(matches!(
        m.apply_backend_request_filters(backend, &mut parts),
        RequestAction::Fail(_)
    ));
}

#[test]
fn grpc_routes_accept_only_grpc_filter_types() {
    let t = table(&[r#"
kind: GRPCRoute
metadata: {name: g}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules: [{filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}], backendRefs: [{name: web, port: 8080}]}]
"#]);
    let mut call = request("POST", "/a.B/C", &[("content-type", "application/grpc")]);
    assert!(matches!(run(&t, &mut call), RequestAction::Fail(_)));
}
