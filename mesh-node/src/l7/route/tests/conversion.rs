//! Conversion: defaults, value grammars, the CRD's CEL rules, durations; a bad route rejects
//! only itself.

use std::time::Duration;

use super::{WEB, get, rejection, route, routed, table, valid};
use crate::l7::route::{
    RouteKind, Routing, Timeouts,
    duration::{DurationError, parse},
    error::RouteError,
};

#[test]
fn route_kinds_parse_from_their_kind_names() {
    assert_eq!("HTTPRoute".parse::<RouteKind>(), Ok(RouteKind::Http));
    assert_eq!("GRPCRoute".parse::<RouteKind>(), Ok(RouteKind::Grpc));
    assert!("TCPRoute".parse::<RouteKind>().is_err());
    assert!("httproute".parse::<RouteKind>().is_err());
}

#[test]
fn durations_follow_gep_2257() {
    let ok = [
        ("10s", Duration::from_secs(10)),
        ("500ms", Duration::from_millis(500)),
        ("1h30m", Duration::from_mins(90)),
        ("1h30m30s500ms", Duration::from_millis(5_430_500)),
        ("0s", Duration::ZERO),
        ("00060m", Duration::from_hours(1)),
        // Go's ParseDuration sums repeated units.
        ("1s1s", Duration::from_secs(2)),
        ("99999h", Duration::from_hours(99999)),
    ];
    for (text, expected) in ok {
        assert_eq!(parse(text), Ok(expected), "{text}");
    }
    let bad = [
        ("", DurationError::Empty),
        ("10", DurationError::BadUnit),
        ("1.5s", DurationError::BadUnit),
        ("1d", DurationError::BadUnit),
        ("10us", DurationError::BadUnit),
        ("10 s", DurationError::BadUnit),
        ("-1s", DurationError::MissingNumber),
        ("s", DurationError::MissingNumber),
        ("100000s", DurationError::TooManyDigits),
        ("1h1m1s1ms1h", DurationError::TooManyComponents),
    ];
    for (text, expected) in bad {
        assert_eq!(parse(text), Err(expected), "{text:?}");
    }
}

fn with_timeouts(timeouts: &str) -> String {
    format!(
        r#"
kind: HTTPRoute
metadata: {{name: t}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web}}]
  rules:
  - timeouts: {timeouts}
    backendRefs: [{{name: web, port: 8080}}]
"#
    )
}

fn timeouts_of(timeouts: &str) -> Timeouts {
    let table = table(&[&with_timeouts(timeouts)]);
    match table.lookup(&super::GW, &WEB, &get("/")) {
        Routing::Matched(m) => m.timeouts(),
        other => panic!("expected a match, got {other:?}"),
    }
}

#[test]
fn timeouts_are_durations_and_zero_disables_them() {
    assert_eq!(
        timeouts_of("{request: 10s, backendRequest: 500ms}"),
        Timeouts {
            request: Some(Duration::from_secs(10)),
            backend_request: Some(Duration::from_millis(500)),
        }
    );
    assert_eq!(timeouts_of("{request: 0s}"), Timeouts::default());
    assert_eq!(timeouts_of("{}"), Timeouts::default());
    // A backend request timeout longer than an unlimited request timeout is fine.
    assert_eq!(
        timeouts_of("{request: 0s, backendRequest: 1h}").backend_request,
        Some(Duration::from_hours(1))
    );
}

#[test]
fn invalid_timeouts_reject_the_route_naming_the_field() {
    let e = rejection(&with_timeouts("{request: 1.5s}"));
    assert!(
        e.starts_with("spec.rules[0].timeouts.request: \"1.5s\" is not a duration"),
        "{e}"
    );
    let e = rejection(&with_timeouts("{request: 1s, backendRequest: 2s}"));
    assert!(
        e.contains("cannot be longer than the request timeout"),
        "{e}"
    );
}

#[test]
fn a_rule_without_matches_matches_every_request() {
    let t = table(&[r#"
kind: HTTPRoute
metadata: {name: all}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules: [{backendRefs: [{name: web, port: 8080}]}]
"#]);
    for path in ["/", "/anything/at/all", "/x?y=z"] {
        assert_eq!(routed(&t, &WEB, &get(path)), "all#0", "{path}");
    }
}

#[test]
fn a_match_without_path_is_a_prefix_match_on_slash() {
    let t = table(&[r#"
kind: HTTPRoute
metadata: {name: get-only}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{method: GET}]
    backendRefs: [{name: web, port: 8080}]
"#]);
    assert_eq!(routed(&t, &WEB, &get("/deep/path")), "get-only#0");
    assert_eq!(
        routed(&t, &WEB, &super::request("POST", "/deep/path", &[])),
        "404"
    );
}

fn with_match(m: &str) -> String {
    format!(
        r#"
kind: HTTPRoute
metadata: {{name: m}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web}}]
  rules:
  - matches: [{m}]
    backendRefs: [{{name: web, port: 8080}}]
"#
    )
}

#[test]
fn match_values_outside_their_grammar_reject_the_route() {
    let cases = [
        ("{path: {type: Exact, value: foo}}", "must start with '/'"),
        ("{path: {value: /a//b}}", "must not contain '//'"),
        ("{path: {value: /a/./b}}", "'.' segments"),
        ("{path: {value: /a/..}}", "'..' segments"),
        ("{path: {value: /a%2Fb}}", "encoded '/'"),
        ("{path: {value: '/a#b'}}", "only path characters"),
        ("{path: {value: '/a b'}}", "only path characters"),
        (
            "{path: {type: Glob, value: /a}}",
            "is not one of Exact, PathPrefix",
        ),
        (
            "{path: {type: RegularExpression, value: '/(a'}}",
            "is not a regular expression",
        ),
        (
            "{headers: [{name: 'bad name', value: x}]}",
            "is not a header name",
        ),
        (
            "{headers: [{name: 'x:y', value: x}]}",
            "is not a header name",
        ),
        (
            "{headers: [{name: x, value: ''}]}",
            "must be 1 to 4096 bytes",
        ),
        (
            "{headers: [{type: Prefix, name: x, value: v}]}",
            "is not one of Exact",
        ),
        (
            "{queryParams: [{name: 'a=b', value: x}]}",
            "is not a header name",
        ),
        ("{method: FETCH}", "is not one of GET"),
        ("{method: get}", "is not one of GET"),
    ];
    for (m, expected) in cases {
        let e = rejection(&with_match(m));
        assert!(e.contains(expected), "{m}: {e}");
        assert!(e.starts_with("spec.rules[0].matches[0]."), "{m}: {e}");
    }
}

#[test]
fn an_invalid_route_rejects_only_itself() {
    let good = r#"
kind: HTTPRoute
metadata: {name: good}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules: [{matches: [{path: {value: /good}}], backendRefs: [{name: web, port: 8080}]}]
"#;
    let bad_regex = r#"
kind: HTTPRoute
metadata: {name: bad-regex}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules: [{matches: [{path: {type: RegularExpression, value: "/(unclosed"}}], backendRefs: [{name: web, port: 8080}]}]
"#;
    let bad_duration = r#"
kind: HTTPRoute
metadata: {name: bad-duration}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules: [{timeouts: {request: 10}, backendRefs: [{name: web, port: 8080}]}]
"#;
    let bad_header = r#"
kind: HTTPRoute
metadata: {name: bad-header}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules: [{matches: [{headers: [{name: "x y", value: z}]}], backendRefs: [{name: web, port: 8080}]}]
"#;
    for bad in [bad_regex, bad_duration, bad_header] {
        assert!(route(bad).outcome.is_err());
    }
    let t = table(&[bad_regex, good, bad_duration, bad_header]);
    assert_eq!(t.len(), 1);
    assert_eq!(routed(&t, &WEB, &get("/good")), "good#0");
    assert_eq!(routed(&t, &WEB, &get("/other")), "404");
}

#[test]
fn a_spec_of_the_wrong_shape_is_unreadable_but_keeps_its_parents() {
    let compiled = route(
        r#"
kind: HTTPRoute
metadata: {name: shapeless}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules: "everything"
"#,
    );
    assert!(matches!(compiled.outcome, Err(RouteError::Unreadable(_))));
    assert_eq!(compiled.parents.len(), 1);
    assert!(compiled.refs.is_none());
}

#[test]
fn an_absent_spec_is_an_empty_route_and_missing_metadata_is_an_error() {
    let empty = crate::l7::route::compile(
        RouteKind::Http,
        "shop",
        "empty",
        None,
        &serde_json::Value::Null,
    );
    assert!(empty.outcome.is_ok());
    assert!(empty.parents.is_empty());
    let nameless =
        crate::l7::route::compile(RouteKind::Grpc, "shop", "", None, &serde_json::json!({}));
    assert_eq!(
        nameless.outcome.err(),
        Some(RouteError::MissingMetadata("name"))
    );
}

#[test]
fn unknown_fields_are_tolerated() {
    valid(
        r#"
kind: HTTPRoute
metadata: {name: future}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  someFutureField: {a: 1}
  rules:
  - sessionPersistence: {sessionName: s}
    matches: [{path: {value: /}, futureMatch: true}]
    backendRefs: [{name: web, port: 8080, futureKnob: 3}]
"#,
    );
}

#[test]
fn hostnames_must_be_dns_names_or_wildcards() {
    let with = |h: &str| {
        format!(
            "kind: HTTPRoute\nmetadata: {{name: h}}\nspec: {{hostnames: [{h}], rules: [{{}}]}}\n"
        )
    };
    for ok in ["example.com", "'*.example.com'", "a-b.c", "localhost"] {
        valid(&with(ok));
    }
    for bad in [
        "Example.com",
        "'*.'",
        "'*'",
        "'a.*.com'",
        "10.0.0.1",
        "-a.com",
        "a..com",
        "'a_b.com'",
    ] {
        let e = rejection(&with(bad));
        assert!(e.starts_with("spec.hostnames[0]: "), "{bad}: {e}");
    }
}

#[test]
fn backend_refs_need_a_port_and_a_weight_in_range() {
    let with = |backend: &str| {
        format!(
            "kind: HTTPRoute\nmetadata: {{name: b}}\nspec: {{rules: [{{backendRefs: [{backend}]}}]}}\n"
        )
    };
    valid(&with("{name: web, port: 8080, weight: 0}"));
    valid(&with("{name: web, port: 8080, weight: 1000000}"));
    assert!(rejection(&with("{name: web}")).contains("port: is required for a Service backend"));
    assert!(rejection(&with("{name: web, port: 0}")).contains("is not a port"));
    assert!(rejection(&with("{name: web, port: 70000}")).contains("is not a port"));
    assert!(rejection(&with("{name: web, port: 80, weight: -1}")).contains("is not a weight"));
    assert!(rejection(&with("{name: web, port: 80, weight: 1000001}")).contains("is not a weight"));
    assert!(rejection(&with("{port: 80}")).contains("name: is required"));
    // Backends that will not resolve do not need a port: they are never dialled.
    valid(&with("{group: example.com, kind: Bucket, name: b}"));
}

#[test]
fn grpc_method_matches_follow_the_grpc_grammar() {
    let with = |m: &str| {
        format!(
            "kind: GRPCRoute\nmetadata: {{name: g}}\nspec: {{rules: [{{matches: [{{method: {m}}}]}}]}}\n"
        )
    };
    valid(&with("{service: helloworld.Greeter, method: SayHello}"));
    valid(&with("{service: .pkg.Svc}"));
    valid(&with("{method: Ping}"));
    valid(&with(
        "{type: RegularExpression, service: 'helloworld\\..*'}",
    ));
    for (bad, expected) in [
        ("{}", "one or both of service and method"),
        ("{service: ''}", "one or both of service and method"),
        ("{service: 'a/b'}", "is not a gRPC service name"),
        ("{method: 'Say/Hello'}", "is not a gRPC method name"),
        ("{method: '1x'}", "is not a gRPC method name"),
        (
            "{type: Prefix, method: M}",
            "is not one of Exact, RegularExpression",
        ),
    ] {
        let e = rejection(&with(bad));
        assert!(e.contains(expected), "{bad}: {e}");
    }
}

#[test]
fn rule_names_are_section_names() {
    valid("kind: HTTPRoute\nmetadata: {name: named}\nspec: {rules: [{name: read-path}]}\n");
    let e = rejection(
        "kind: HTTPRoute\nmetadata: {name: named}\nspec: {rules: [{name: 'Read Path'}]}\n",
    );
    assert!(e.starts_with("spec.rules[0].name: "), "{e}");
}

#[test]
fn retry_is_validated_and_exposed() {
    let t = table(&[r#"
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules: [{retry: {codes: [503, 504], attempts: 2, backoff: 100ms}, backendRefs: [{name: web, port: 8080}]}]
"#]);
    let Routing::Matched(m) = t.lookup(&super::GW, &WEB, &get("/")) else {
        panic!("expected a match");
    };
    let retry = m.retry().expect("the rule has a retry");
    assert_eq!(
        retry.codes,
        [503, 504].map(|c| http::StatusCode::from_u16(c).expect("status"))
    );
    assert_eq!(retry.attempts, Some(2));
    assert_eq!(retry.backoff, Some(Duration::from_millis(100)));
    let e = rejection(
        "kind: HTTPRoute\nmetadata: {name: r}\nspec: {rules: [{retry: {codes: [200]}}]}\n",
    );
    assert!(e.contains("is not a status code from 400 to 599"), "{e}");
}
