//! Hostile routes: sizes and regular expressions are bounded, and an oversized route rejects
//! only itself with a message naming the limit.

use super::{WEB, get, rejection, routed, table, valid};
use crate::l7::route::limits;

fn rules(count: usize, rule: &str) -> String {
    let rules: Vec<&str> = std::iter::repeat_n(rule, count).collect();
    format!(
        "kind: HTTPRoute\nmetadata: {{name: big}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web}}]\n  rules: [{}]\n",
        rules.join(", ")
    )
}

fn matches(count: usize) -> String {
    let m: Vec<String> = (0..count)
        .map(|i| format!("{{path: {{value: /m{i}}}}}"))
        .collect();
    format!("{{matches: [{}]}}", m.join(", "))
}

#[test]
fn rules_and_matches_are_limited_as_the_crds_limit_them() {
    valid(&rules(limits::RULES, "{}"));
    let e = rejection(&rules(limits::RULES + 1, "{}"));
    assert_eq!(e, "spec.rules: at most 16 allowed, found 17");

    valid(&rules(1, &matches(limits::HTTP_MATCHES)));
    let e = rejection(&rules(1, &matches(limits::HTTP_MATCHES + 1)));
    assert_eq!(e, "spec.rules[0].matches: at most 64 allowed, found 65");

    // 64 per rule is allowed, but not more than 128 in the whole route.
    valid(&rules(2, &matches(64)));
    let e = rejection(&rules(3, &matches(64)));
    assert!(e.contains("at most 128 allowed, found 192"), "{e}");

    let grpc = |n: usize| {
        let m: Vec<&str> = std::iter::repeat_n("{method: {method: M}}", n).collect();
        format!(
            "kind: GRPCRoute\nmetadata: {{name: g}}\nspec: {{rules: [{{matches: [{}]}}]}}\n",
            m.join(", ")
        )
    };
    valid(&grpc(limits::GRPC_MATCHES));
    assert!(rejection(&grpc(limits::GRPC_MATCHES + 1)).contains("at most 8 allowed, found 9"));
}

#[test]
fn conditions_filters_backends_and_hostnames_are_limited() {
    let n = |count: usize, item: &dyn Fn(usize) -> String| -> String {
        (0..count).map(item).collect::<Vec<_>>().join(", ")
    };
    let headers = format!(
        "{{matches: [{{headers: [{}]}}]}}",
        n(17, &|i| format!("{{name: h{i}, value: v}}"))
    );
    assert!(rejection(&rules(1, &headers)).contains("headers: at most 16 allowed, found 17"));
    let query = format!(
        "{{matches: [{{queryParams: [{}]}}]}}",
        n(17, &|i| format!("{{name: q{i}, value: v}}"))
    );
    assert!(rejection(&rules(1, &query)).contains("queryParams: at most 16 allowed, found 17"));
    let backends = format!(
        "{{backendRefs: [{}]}}",
        n(17, &|i| format!("{{name: b{i}, port: 80}}"))
    );
    assert!(rejection(&rules(1, &backends)).contains("backendRefs: at most 16 allowed, found 17"));
    let filters = format!(
        "{{filters: [{}]}}",
        n(17, &|_| {
            "{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}}}".into()
        })
    );
    assert!(rejection(&rules(1, &filters)).contains("filters: at most 16 allowed, found 17"));
    let set = format!(
        "{{filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{}]}}}}]}}",
        n(17, &|i| format!("{{name: h{i}, value: v}}"))
    );
    assert!(rejection(&rules(1, &set)).contains("set: at most 16 allowed, found 17"));
    let hostnames = format!(
        "kind: HTTPRoute\nmetadata: {{name: h}}\nspec: {{hostnames: [{}]}}\n",
        n(17, &|i| format!("h{i}.example.com"))
    );
    assert_eq!(
        rejection(&hostnames),
        "spec.hostnames: at most 16 allowed, found 17"
    );
    let parents = format!(
        "kind: HTTPRoute\nmetadata: {{name: p}}\nspec: {{parentRefs: [{}]}}\n",
        n(33, &|i| format!("{{name: gw{i}}}"))
    );
    let compiled = super::route(&parents);
    assert_eq!(
        compiled.outcome.expect_err("too many parents").to_string(),
        "spec.parentRefs: at most 32 allowed, found 33"
    );
    assert_eq!(
        compiled.parents.len(),
        limits::PARENT_REFS,
        "status covers the first 32"
    );
}

#[test]
fn long_values_are_refused() {
    let long_path = format!("/{}", "a".repeat(limits::PATH_LENGTH));
    let e = rejection(&rules(
        1,
        &format!("{{matches: [{{path: {{value: {long_path}}}}}]}}"),
    ));
    assert!(e.contains("is too long"), "{e}");
    assert!(
        e.len() < 300,
        "the message quotes a bounded part of the value: {e}"
    );
    let long_header = "v".repeat(limits::HEADER_VALUE_LENGTH + 1);
    let e = rejection(&rules(
        1,
        &format!("{{matches: [{{headers: [{{name: x, value: {long_header}}}]}}]}}"),
    ));
    assert!(e.contains("must be 1 to 4096 bytes"), "{e}");
}

#[test]
fn huge_regular_expressions_are_refused() {
    // Small to write, large once compiled (Unicode classes repeated).
    let e = rejection(&rules(
        1,
        "{matches: [{path: {type: RegularExpression, value: '/\\w{1000}'}}]}",
    ));
    assert!(e.contains("is too complex"), "{e}");
    let nested = format!("/{}a{}", "(".repeat(100), ")".repeat(100));
    let e = rejection(&rules(
        1,
        &format!("{{matches: [{{path: {{type: RegularExpression, value: '{nested}'}}}}]}}"),
    ));
    assert!(e.contains("is not a regular expression"), "{e}");
}

#[test]
fn an_unbalanced_pattern_cannot_escape_its_anchors() {
    // Wrapped blindly in ^(?:...)$, this would become `^(?:/a)|(/b)$`, matching any path
    // starting with /a.
    let e = rejection(&rules(
        1,
        "{matches: [{path: {type: RegularExpression, value: '/a)|(/b'}}]}",
    ));
    assert!(e.contains("is not a regular expression"), "{e}");
}

#[test]
fn the_number_of_regular_expressions_per_route_is_limited() {
    let regex_headers = |count: usize| -> String {
        (0..count)
            .map(|i| format!("{{type: RegularExpression, name: h{i}, value: 'v.*'}}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // 4 matches x 16 regex headers = 64 regexes: allowed; one more is not.
    let four = (0..4)
        .map(|_| format!("{{headers: [{}]}}", regex_headers(16)))
        .collect::<Vec<_>>()
        .join(", ");
    valid(&rules(1, &format!("{{matches: [{four}]}}")));
    let five = format!("{{matches: [{four}, {{headers: [{}]}}]}}", regex_headers(1));
    let e = rejection(&rules(1, &five));
    assert!(e.contains("at most 64 allowed, found 65"), "{e}");
}

#[test]
fn a_large_table_still_answers() {
    // 16 routes of 16 rules of 8 matches each on one Service: 2,048 matches.
    let routes: Vec<String> = (0..16)
        .map(|r| {
            let rules: Vec<String> = (0..16)
                .map(|u| {
                    let m: Vec<String> = (0..8)
                        .map(|m| format!("{{path: {{type: Exact, value: /r{r}/u{u}/m{m}}}}}"))
                        .collect();
                    format!("{{matches: [{}]}}", m.join(", "))
                })
                .collect();
            format!(
                "kind: HTTPRoute\nmetadata: {{name: r{r:02}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web}}]\n  rules: [{}]\n",
                rules.join(", ")
            )
        })
        .collect();
    let t = table(&routes.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(t.len(), 16);
    assert_eq!(routed(&t, &WEB, &get("/r15/u15/m7")), "r15#15");
    assert_eq!(routed(&t, &WEB, &get("/r0/u0/m0")), "r00#0");
    assert_eq!(routed(&t, &WEB, &get("/nowhere")), "404");
}

#[test]
fn an_unreadable_spec_is_reported_in_a_bounded_message() {
    let huge = "x".repeat(10_000);
    let e = rejection(&format!(
        "kind: HTTPRoute\nmetadata: {{name: r}}\nspec: {{rules: {huge}}}\n"
    ));
    assert!(e.starts_with("spec: cannot be read: invalid type"), "{e}");
    assert!(e.len() < 400, "{} bytes", e.len());
}
