use serde_json::json;

use super::{destination_rule, virtual_service};
use crate::l7::route::{RouteError, RouteKind, RouteTable};

fn vs(spec: serde_json::Value) -> crate::l7::route::CompiledRoute {
    virtual_service::convert("default", "reviews", Some(1), &spec)
}

fn error_of(spec: serde_json::Value) -> String {
    match vs(spec).outcome {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn request_routing_by_header_converts_as_written() {
    let compiled = vs(json!({
        "hosts": ["reviews"],
        "http": [
            {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
             "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
            {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
        ],
    }));
    let route = compiled.route().expect("accepted");
    assert_eq!(compiled.id.kind, RouteKind::Virtual);
    assert_eq!(route.rules.len(), 2);
    let crate::l7::route::model::BackendSlot::Usable(b) = &route.rules[0].backends[0] else {
        panic!("usable backend");
    };
    assert_eq!(b.subset.as_deref(), Some("v2"));
    assert_eq!(b.port, crate::l7::route::model::SAME_PORT);
    assert_eq!(b.name, "reviews");
}

#[test]
fn rules_keep_their_written_order() {
    // The catch-all prefix comes first: Istio takes it for every request, where the Gateway
    // API would prefer the longer prefix.
    let compiled = vs(json!({
        "hosts": ["reviews.default.svc.cluster.local"],
        "http": [
            {"match": [{"uri": {"prefix": "/"}}], "route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
            {"match": [{"uri": {"prefix": "/api"}}], "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
        ],
    }));
    let table = RouteTable::new([compiled]);
    let gateway = crate::l7::route::GatewayRef {
        namespace: "default",
        name: "waypoint",
    };
    let service = crate::l7::route::ServiceRef {
        namespace: "default",
        name: "reviews",
        port: 9080,
    };
    let (parts, ()) = http::Request::get("/api/x")
        .body(())
        .expect("request")
        .into_parts();
    match table.lookup(&gateway, &service, &parts) {
        crate::l7::route::Routing::Matched(rule) => assert_eq!(
            rule.id().to_string(),
            "VirtualService default/reviews rule 0"
        ),
        _ => panic!("not matched"),
    }
}

#[test]
fn unsupported_fields_reject_the_object_naming_the_field() {
    let e = error_of(
        json!({"hosts": ["reviews"], "http": [{"match": [{"ignoreUriCase": true}], "route": [{"destination": {"host": "reviews"}}]}]}),
    );
    assert!(e.starts_with("spec.http[0].match[0].ignoreUriCase:"), "{e}");
    let e = error_of(json!({"hosts": ["reviews"], "tcp": [{"route": []}], "http": []}));
    assert!(e.starts_with("spec.tcp:"), "{e}");
    let e = error_of(
        json!({"hosts": ["*.example.com"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}),
    );
    assert!(e.starts_with("spec.hosts[0]:"), "{e}");
    let e = error_of(
        json!({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}], "fault": {"abort": {"httpStatus": 500, "percentage": {"value": 0.5}}}}]}),
    );
    assert!(
        e.starts_with("spec.http[0].fault.abort.percentage.value:"),
        "{e}"
    );
    let e = error_of(
        json!({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}], "retries": {"attempts": 2, "retryOn": "cancelled"}}]}),
    );
    assert!(e.starts_with("spec.http[0].retries.retryOn:"), "{e}");
}

#[test]
fn hostile_objects_are_rejected_one_by_one() {
    // Wrong types.
    let e = error_of(json!({"hosts": "reviews", "http": []}));
    assert!(e.starts_with("spec.hosts:"), "{e}");
    let e = error_of(
        json!({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}, "weight": "ninety"}]}]}),
    );
    assert!(e.starts_with("spec.http[0].route[0].weight:"), "{e}");
    // A regular expression too large to compile.
    let e = error_of(
        json!({"hosts": ["reviews"], "http": [{"match": [{"uri": {"regex": "(a{1000}){1000}"}}], "route": [{"destination": {"host": "reviews"}}]}]}),
    );
    assert!(e.starts_with("spec.http[0].match[0].uri:"), "{e}");
    let e = error_of(
        json!({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]},
               {"match": [{"uri": {"exact": "/a"}}, {"headers": {"x-a": {"exact": "1"}, "x-b": {"regex": "((a{100}){100}){100}"}}}],
                "route": [{"destination": {"host": "reviews"}}]}]}),
    );
    assert!(e.starts_with("spec.http[1].match[1].headers:"), "{e}");
    assert!(
        e.contains("((a{100}){100}){100}"),
        "the value names the entry: {e}"
    );
    // Thousands of routes.
    let many: Vec<_> = (0..5000)
        .map(|_| json!({"route": [{"destination": {"host": "reviews"}}]}))
        .collect();
    let e = error_of(json!({"hosts": ["reviews"], "http": many}));
    assert!(e.starts_with("spec.http:"), "{e}");
}

#[test]
fn retries_timeouts_and_faults_reach_the_model() {
    let compiled = vs(json!({
        "hosts": ["ratings"],
        "http": [{
            "route": [{"destination": {"host": "ratings", "port": {"number": 9080}}}],
            "timeout": "0.5s",
            "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "gateway-error,connect-failure,refused-stream"},
            "fault": {"delay": {"fixedDelay": "7s", "percentage": {"value": 100.0}}, "abort": {"httpStatus": 500, "percentage": {"value": 10}}},
        }],
    }));
    let route = compiled.route().expect("accepted");
    let rule = &route.rules[0];
    assert_eq!(
        rule.timeouts.request,
        Some(std::time::Duration::from_millis(500))
    );
    // The per-try timeout cannot outlast the request's.
    assert_eq!(
        rule.timeouts.backend_request,
        Some(std::time::Duration::from_millis(500))
    );
    let retry = rule.retry.as_ref().expect("retry");
    assert_eq!(retry.attempts, Some(3));
    assert!(retry.reset);
    assert_eq!(retry.codes.len(), 3);
    let fault = rule.fault.expect("fault");
    assert_eq!(fault.delay.map(|d| d.percent), Some(100));
    assert_eq!(
        fault.abort.map(|a| (a.status.as_u16(), a.percent)),
        Some((500, 10))
    );
}

#[test]
fn precedence_gateway_api_first_then_name_order() {
    let http = crate::l7::route::compile(
        RouteKind::Http,
        "default",
        "web",
        None,
        &json!({"parentRefs": [{"group": "", "kind": "Service", "name": "web"}], "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}),
    );
    let spec = json!({"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web"}}]}]});
    let a = virtual_service::convert("default", "a", None, &spec);
    let b = virtual_service::convert("default", "b", None, &spec);
    let mut routes = vec![b.clone(), a.clone()];
    super::precedence(&mut routes);
    assert!(
        routes
            .iter()
            .find(|r| r.id.name == "a")
            .expect("a")
            .outcome
            .is_ok()
    );
    let lost = routes.iter().find(|r| r.id.name == "b").expect("b");
    assert!(
        matches!(lost.outcome, Err(RouteError::Conflicted { .. })),
        "{lost:?}"
    );

    let mut routes = vec![a, http];
    super::precedence(&mut routes);
    let e = routes[0].outcome.as_ref().expect_err("HTTPRoute wins");
    assert!(e.to_string().contains("HTTPRoute default/web"), "{e}");
}

#[test]
fn destination_rules_convert_subsets_and_policies() {
    let rule = destination_rule::convert(
        "default",
        "reviews",
        Some(2),
        &json!({
            "host": "reviews",
            "trafficPolicy": {
                "connectionPool": {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1, "http2MaxRequests": 1}},
                "outlierDetection": {"consecutive5xxErrors": 1, "interval": "1s", "baseEjectionTime": "3m", "maxEjectionPercent": 100},
            },
            "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
        }),
    )
    .expect("accepted");
    assert_eq!(rule.service, "reviews");
    assert_eq!(rule.subsets["v2"]["version"], "v2");
    let policy = rule.resilience.expect("policy");
    assert_eq!(policy.targets, vec!["reviews".to_owned()]);
    assert_eq!(policy.connection_pool.and_then(|p| p.max_requests), Some(1));
    assert_eq!(
        policy.outlier_detection.map(|o| o.consecutive_errors),
        Some(1)
    );

    for (spec, field) in [
        (
            json!({"host": "reviews", "trafficPolicy": {"loadBalancer": {"consistentHash": {"httpHeaderName": "x"}}}}),
            "spec.trafficPolicy.loadBalancer.consistentHash",
        ),
        (
            json!({"host": "reviews", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}),
            "spec.trafficPolicy.tls",
        ),
        (
            json!({"host": "reviews", "subsets": [{"name": "v1", "trafficPolicy": {}}]}),
            "spec.subsets[0].trafficPolicy",
        ),
        (json!({"host": "reviews", "subsets": "v1"}), "spec.subsets"),
    ] {
        let e = destination_rule::convert("default", "r", None, &spec)
            .expect_err("rejected")
            .to_string();
        assert!(e.starts_with(&format!("{field}:")), "{e}");
    }
}

#[test]
fn durations_and_hosts() {
    assert_eq!(
        super::duration("t", "1.5s").expect("ok"),
        std::time::Duration::from_millis(1500)
    );
    assert_eq!(
        super::duration("t", "1m30s").expect("ok"),
        std::time::Duration::from_secs(90)
    );
    assert!(super::duration("t", "2h").is_err());
    assert!(super::duration("t", "-1s").is_err());
    assert_eq!(
        super::gateway_duration(std::time::Duration::from_millis(90_500)),
        "1m30s500ms"
    );
    assert_eq!(
        super::service_of("reviews", "shop"),
        Some(("shop".into(), "reviews".into()))
    );
    assert_eq!(
        super::service_of("reviews.x", "shop"),
        Some(("x".into(), "reviews".into()))
    );
    assert_eq!(
        super::service_of("reviews.x.svc.cluster.local", "shop"),
        Some(("x".into(), "reviews".into()))
    );
    assert_eq!(super::service_of("www.example.com", "shop"), None);
    assert_eq!(super::service_of("*", "shop"), None);
}
