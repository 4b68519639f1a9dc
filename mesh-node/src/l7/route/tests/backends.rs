//! Weighted backend choice, unresolvable references, mirrors.

use super::{GW, WEB, get, randoms, table};
use crate::l7::route::{MatchedRule, NoBackend, RefProblem, RouteTable, Routing};

fn rule_with(backends: &str, filters: &str) -> RouteTable {
    table(&[&format!(
        r#"
kind: HTTPRoute
metadata: {{name: r}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web}}]
  rules: [{{backendRefs: {backends}, filters: {filters}}}]
"#
    )])
}

fn matched(t: &RouteTable) -> MatchedRule<'_> {
    match t.lookup(&GW, &WEB, &get("/")) {
        Routing::Matched(m) => m,
        other => panic!("expected a match, got {other:?}"),
    }
}

/// How many of `n` picks went to each backend name (`!` for 500s).
fn picks(m: &MatchedRule<'_>, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for random in randoms(n) {
        let name = match m.pick_backend(random) {
            Ok(b) => b.name.clone(),
            Err(_) => "!".into(),
        };
        *counts.entry(name).or_default() += 1;
    }
    counts
}

fn share(counts: &std::collections::BTreeMap<String, usize>, name: &str, n: usize) -> f64 {
    counts.get(name).copied().unwrap_or(0) as f64 / n as f64
}

#[test]
fn weights_split_traffic_proportionally() {
    let t = rule_with(
        "[{name: v1, port: 80, weight: 90}, {name: v2, port: 80, weight: 10}]",
        "[]",
    );
    let counts = picks(&matched(&t), 10_000);
    let (v1, v2) = (share(&counts, "v1", 10_000), share(&counts, "v2", 10_000));
    assert!((v1 - 0.9).abs() < 0.015, "v1 got {v1}");
    assert!((v2 - 0.1).abs() < 0.015, "v2 got {v2}");

    let three = rule_with(
        "[{name: a, port: 80}, {name: b, port: 80, weight: 2}, {name: c, port: 80, weight: 1}]",
        "[]",
    );
    let counts = picks(&matched(&three), 10_000);
    assert!(
        (share(&counts, "a", 10_000) - 0.25).abs() < 0.02,
        "{counts:?}"
    );
    assert!(
        (share(&counts, "b", 10_000) - 0.5).abs() < 0.02,
        "{counts:?}"
    );
}

#[test]
fn the_whole_random_range_maps_onto_the_backends() {
    let t = rule_with(
        "[{name: v1, port: 80, weight: 1}, {name: v2, port: 80, weight: 1}]",
        "[]",
    );
    let m = matched(&t);
    let name = |r: u64| {
        m.pick_backend(r)
            .map(|b| b.name.as_str())
            .expect("a backend")
    };
    assert_eq!(name(0), "v1");
    assert_eq!(name(u64::MAX / 2), "v1");
    assert_eq!(name(u64::MAX / 2 + 1), "v2");
    assert_eq!(name(u64::MAX), "v2");
}

#[test]
fn a_zero_weight_backend_is_never_picked() {
    let t = rule_with(
        "[{name: v1, port: 80, weight: 0}, {name: v2, port: 80, weight: 3}]",
        "[]",
    );
    let counts = picks(&matched(&t), 10_000);
    assert_eq!(counts.get("v2"), Some(&10_000), "{counts:?}");
}

#[test]
fn all_zero_weights_or_no_backends_leave_nothing_to_pick() {
    let zero = rule_with(
        "[{name: v1, port: 80, weight: 0}, {name: v2, port: 80, weight: 0}]",
        "[]",
    );
    assert_eq!(
        matched(&zero).pick_backend(42).err(),
        Some(NoBackend::ZeroWeights)
    );
    let none = rule_with("[]", "[]");
    assert_eq!(matched(&none).pick_backend(42).err(), Some(NoBackend::None));
}

#[test]
fn the_picked_backend_carries_its_service_and_port() {
    let t = rule_with("[{name: v1, port: 8443}]", "[]");
    let backend = matched(&t).pick_backend(7).expect("a backend");
    assert_eq!(
        (
            backend.namespace.as_str(),
            backend.name.as_str(),
            backend.port,
            backend.weight
        ),
        ("shop", "v1", 8443, 1)
    );
}

#[test]
fn cross_namespace_and_non_service_backends_keep_their_share_as_errors() {
    let t = rule_with(
        "[{name: v1, port: 80}, {name: db, namespace: other, port: 80}, {group: example.com, kind: Bucket, name: b}]",
        "[]",
    );
    let m = matched(&t);
    let mut problems = std::collections::BTreeMap::new();
    for random in randoms(9_000) {
        let key = match m.pick_backend(random) {
            Ok(b) => b.name.clone(),
            Err(NoBackend::Invalid(b)) => {
                let problem = match b.problem {
                    RefProblem::RefNotPermitted => "not-permitted",
                    RefProblem::InvalidKind => "invalid-kind",
                };
                format!("{problem} {}", b.reference)
            }
            Err(other) => panic!("unexpected {other}"),
        };
        *problems.entry(key).or_insert(0usize) += 1;
    }
    assert_eq!(problems.len(), 3, "{problems:?}");
    for (key, count) in &problems {
        assert!((2_700..3_300).contains(count), "{key}: {count}");
    }
    assert!(
        problems.contains_key("not-permitted Service other/db"),
        "{problems:?}"
    );
    assert!(
        problems.contains_key("invalid-kind example.com/Bucket shop/b"),
        "{problems:?}"
    );
}

#[test]
fn mirrors_take_their_percentage_of_requests() {
    let t = rule_with(
        "[{name: web, port: 8080}]",
        "[{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}, percent: 25}}]",
    );
    let m = matched(&t);
    let mirrors: Vec<_> = m.mirrors(None).collect();
    assert_eq!(mirrors.len(), 1);
    assert_eq!((mirrors[0].name.as_str(), mirrors[0].port), ("shadow", 80));
    let selected = randoms(10_000).filter(|r| mirrors[0].selected(*r)).count();
    assert!((2_300..2_700).contains(&selected), "{selected}");
}

#[test]
fn mirror_fractions_and_defaults() {
    let mirror = |config: &str| {
        let t = rule_with(
            "[{name: web, port: 8080}]",
            &format!(
                "[{{type: RequestMirror, requestMirror: {{backendRef: {{name: shadow, port: 80}}{config}}}}}]"
            ),
        );
        let m = matched(&t);
        let mirror = m.mirrors(None).next().expect("one mirror").clone();
        randoms(9_000).filter(|r| mirror.selected(*r)).count()
    };
    assert_eq!(mirror(""), 9_000, "no percentage mirrors everything");
    assert_eq!(mirror(", percent: 100"), 9_000);
    assert_eq!(mirror(", percent: 0"), 0);
    let third = mirror(", fraction: {numerator: 1, denominator: 3}");
    assert!((2_800..3_200).contains(&third), "{third}");
    let default_denominator = mirror(", fraction: {numerator: 50}");
    assert!(
        (4_300..4_700).contains(&default_denominator),
        "{default_denominator}"
    );
}

#[test]
fn invalid_mirror_settings_reject_the_route_and_unresolvable_mirrors_are_dropped() {
    let with = |mirror: &str| {
        format!(
            "kind: HTTPRoute\nmetadata: {{name: m}}\nspec: {{rules: [{{filters: [{{type: RequestMirror, requestMirror: {mirror}}}]}}]}}\n"
        )
    };
    for (bad, expected) in [
        (
            "{backendRef: {name: s, port: 80}, percent: 101}",
            "is not a percentage",
        ),
        (
            "{backendRef: {name: s, port: 80}, fraction: {numerator: 2, denominator: 1}}",
            "is not a fraction",
        ),
        (
            "{backendRef: {name: s, port: 80}, fraction: {numerator: 1, denominator: 0}}",
            "is not a fraction",
        ),
        (
            "{backendRef: {name: s, port: 80}, percent: 5, fraction: {numerator: 1}}",
            "only one of percent and fraction",
        ),
        (
            "{backendRef: {name: s}}",
            "is required for a Service backend",
        ),
    ] {
        let e = super::rejection(&with(bad));
        assert!(e.contains(expected), "{bad}: {e}");
    }
    let t = rule_with(
        "[{name: web, port: 8080}]",
        "[{type: RequestMirror, requestMirror: {backendRef: {name: s, namespace: other, port: 80}}}]",
    );
    assert_eq!(matched(&t).mirrors(None).count(), 0);
}

#[test]
fn backend_mirrors_follow_the_rule_mirrors() {
    let t = rule_with(
        "[{name: web, port: 8080, filters: [{type: RequestMirror, requestMirror: {backendRef: {name: b-shadow, port: 80}}}]}]",
        "[{type: RequestMirror, requestMirror: {backendRef: {name: r-shadow, port: 80}}}]",
    );
    let m = matched(&t);
    let backend = m.pick_backend(1).expect("a backend");
    let names: Vec<&str> = m.mirrors(Some(backend)).map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["r-shadow", "b-shadow"]);
}
