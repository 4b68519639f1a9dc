//! Istio's `networking.istio.io` VirtualService and DestinationRule at the waypoint, end to
//! end, with objects shaped like those of Istio's tasks (request routing, traffic shifting,
//! request timeouts, fault injection, mirroring, circuit breaking): each is accepted and
//! behaves as the task describes, through the kernel redirection, the agents and a waypoint.
//!
//! The backends are `l7` servers labelled `version: v1` / `v2`; the DestinationRule's subsets
//! select them by those labels.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_tests::{
    mesh::{Mesh, metric_sum, waypoint::Waypoint},
    testbed::{Pod, RequestsOpts, Server, Testbed, e2e_gate},
};
use serde_json::{Value, json};

mod waypoint_fixture;

use waypoint_fixture::{
    TARGET_PORT, WAIT, count_of, get_with, requests, serve, service, start, testbed,
};

fn istio(mesh: &mut Mesh<'_>, version: &str, kind: &str, name: &str, spec: Value) {
    mesh.write_l7(&format!("networking.istio.io/{version}"), kind, name, spec)
        .unwrap_or_else(|e| panic!("{kind} {name}: {e:#}"));
}

/// Waits until the waypoint lists each `VirtualService default/<name>` of `virtual` as a
/// route and each DestinationRule of `rules` with `Accepted` `True`.
fn wait_applied(waypoint: &Waypoint<'_>, virtual_services: &[&str], rules: &[&str]) -> Value {
    waypoint
        .wait_dump(WAIT, |dump| {
            let routes_ok = virtual_services.iter().all(|name| {
                dump["routes"].as_array().is_some_and(|routes| {
                    routes.iter().any(|r| {
                        r["kind"] == "VirtualService" && r["id"] == format!("default/{name}")
                    })
                }) && !rejected(dump, &format!("VirtualService default/{name}"))
            });
            let rules_ok = rules.iter().all(|name| {
                dump["destination_rules"].as_array().is_some_and(|listed| {
                    listed.iter().any(|r| {
                        r["id"] == format!("default/{name}") && r["condition"]["status"] == "True"
                    })
                })
            });
            routes_ok && rules_ok
        })
        .unwrap_or_else(|e| panic!("not applied: {e:#}"))
}

fn rejected(dump: &Value, object: &str) -> bool {
    dump["l7"]["rejected"]
        .as_array()
        .is_some_and(|r| r.iter().any(|e| e["object"] == object))
}

/// `reviews` over a `version: v1` pod and a `version: v2` pod, with the subsets of Istio's
/// Bookinfo DestinationRule (written at `v1alpha3`, as the task's older pages do).
fn reviews<'tb>(tb: &'tb Testbed, mesh: &mut Mesh<'tb>) -> (SocketAddr, &'tb Pod, &'tb Pod) {
    let (v1, v2) = (tb.pod(1, 0), tb.pod(1, 1));
    mesh.set_pod_label(v1, "version", Some("v1"))
        .expect("label v1");
    mesh.set_pod_label(v2, "version", Some("v2"))
        .expect("label v2");
    let vip = service(mesh, "reviews", 70, &[v1, v2]);
    istio(
        mesh,
        "v1alpha3",
        "DestinationRule",
        "reviews",
        json!({"host": "reviews", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ]}),
    );
    (vip, v1, v2)
}

#[test]
fn request_routing_by_header_and_weighted_shifting_to_subsets() {
    if !e2e_gate("request_routing_by_header_and_weighted_shifting_to_subsets") {
        return;
    }
    let tb = testbed(3);
    let (mut mesh, waypoint) = start(&tb);
    let client = tb.pod(0, 0);
    let (vip, v1, v2) = reviews(&tb, &mut mesh);
    let _servers: Vec<Server> = [v1, v2].iter().map(|p| serve(&tb, p)).collect();

    // The request-routing task's rule, exactly as written there.
    istio(
        &mut mesh,
        "v1",
        "VirtualService",
        "reviews",
        json!({
            "hosts": ["reviews"],
            "http": [
                {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
                 "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
                {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
            ],
        }),
    );
    wait_applied(&waypoint, &["reviews"], &["reviews"]);
    let jason = get_with(&tb, client, vip, "/", 30, &["end-user: jason"]);
    assert_eq!(count_of(&jason, "servers", &v2.name), 30, "{jason}");
    let others = get_with(&tb, client, vip, "/", 30, &["end-user: someone-else"]);
    assert_eq!(count_of(&others, "servers", &v1.name), 30, "{others}");
    let anonymous = get_with(&tb, client, vip, "/", 30, &[]);
    assert_eq!(count_of(&anonymous, "servers", &v1.name), 30, "{anonymous}");

    // Traffic shifting: 90/10 over 2,000 requests. v2's count is binomial (n 2000, p 0.1:
    // mean 200, sd 13.4); 5 sd either way fails a correct split about once in 1.7 million.
    istio(
        &mut mesh,
        "v1beta1",
        "VirtualService",
        "reviews",
        json!({
            "hosts": ["reviews"],
            "http": [{"route": [
                {"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
                {"destination": {"host": "reviews", "subset": "v2"}, "weight": 10},
            ]}],
        }),
    );
    // The header rule is gone once the new version is served: jason reaches v1 as well.
    let deadline = Instant::now() + WAIT;
    loop {
        let probe = get_with(&tb, client, vip, "/", 20, &["end-user: jason"]);
        if count_of(&probe, "servers", &v1.name) > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the weighted rule never applied: {probe}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let split = get_with(&tb, client, vip, "/", 2000, &[]);
    assert_eq!(count_of(&split, "statuses", "200"), 2000, "{split}");
    let to_v2 = count_of(&split, "servers", &v2.name);
    assert_eq!(
        count_of(&split, "servers", &v1.name) + to_v2,
        2000,
        "{split}"
    );
    assert!(
        (133..=267).contains(&to_v2),
        "v2 got {to_v2} of 2000: {split}"
    );

    // An object with a field Trellis does not implement is rejected alone, naming the field,
    // and changes nothing: reviews keeps its split, ratings its plain routing.
    let ratings = service(&mut mesh, "ratings", 71, &[v1]);
    istio(
        &mut mesh,
        "v1",
        "VirtualService",
        "ratings",
        json!({"hosts": ["ratings"], "http": [{
            "match": [{"uri": {"prefix": "/"}, "ignoreUriCase": true}],
            "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
        }]}),
    );
    let dump = waypoint
        .wait_dump(WAIT, |dump| {
            rejected(dump, "VirtualService default/ratings")
        })
        .expect("rejection listed");
    let reason = dump["l7"]["rejected"]
        .as_array()
        .and_then(|r| {
            r.iter()
                .find(|e| e["object"] == "VirtualService default/ratings")
        })
        .map(|e| e["reason"].to_string())
        .unwrap_or_default();
    assert!(
        reason.contains("spec.http[0].match[0].ignoreUriCase"),
        "{reason}"
    );
    let plain = get_with(&tb, client, ratings, "/", 10, &[]);
    assert_eq!(count_of(&plain, "servers", &v1.name), 10, "{plain}");
}

#[test]
fn retries_timeouts_faults_and_mirroring_from_virtual_services() {
    if !e2e_gate("retries_timeouts_faults_and_mirroring_from_virtual_services") {
        return;
    }
    let tb = testbed(3);
    let (mut mesh, waypoint) = start(&tb);
    let client = tb.pod(0, 0);
    let (a, shadow) = (tb.pod(1, 0), tb.pod(1, 1));
    let _servers: Vec<Server> = [a, shadow].iter().map(|p| serve(&tb, p)).collect();
    let flaky = service(&mut mesh, "flaky", 80, &[a]);
    let slow = service(&mut mesh, "slow", 81, &[a]);
    let faulty = service(&mut mesh, "faulty", 82, &[a]);
    let mirrored = service(&mut mesh, "mirrored", 83, &[a]);
    service(&mut mesh, "shadow", 84, &[shadow]);

    let route_to = |host: &str| json!([{"destination": {"host": host}}]);
    istio(
        &mut mesh,
        "v1",
        "VirtualService",
        "flaky",
        json!({"hosts": ["flaky"], "http": [
            {"route": route_to("flaky"), "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx"}},
        ]}),
    );
    istio(
        &mut mesh,
        "v1",
        "VirtualService",
        "slow",
        json!({"hosts": ["slow"], "http": [
            {"route": route_to("slow"), "timeout": "0.3s"},
        ]}),
    );
    istio(
        &mut mesh,
        "v1",
        "VirtualService",
        "faulty",
        json!({"hosts": ["faulty"], "http": [
            {"fault": {"abort": {"httpStatus": 500, "percentage": {"value": 30}}}, "route": route_to("faulty")},
        ]}),
    );
    istio(
        &mut mesh,
        "v1",
        "VirtualService",
        "mirrored",
        json!({"hosts": ["mirrored"], "http": [
            {"route": route_to("mirrored"), "mirror": {"host": "shadow"}, "mirrorPercentage": {"value": 100.0}},
        ]}),
    );
    wait_applied(&waypoint, &["faulty", "flaky", "mirrored", "slow"], &[]);

    // Retries turn the flaky backend's first two 503s into a success.
    let retried = get_with(&tb, client, flaky, "/flaky/vs/2", 1, &[]);
    assert_eq!(count_of(&retried, "statuses", "200"), 1, "{retried}");

    // The request timeout answers 504 long before the backend would.
    let started = Instant::now();
    let timed_out = get_with(&tb, client, slow, "/delay/5000", 1, &[]);
    assert_eq!(count_of(&timed_out, "statuses", "504"), 1, "{timed_out}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the timeout fired late"
    );

    // Aborts at 30% of 1,000 requests (binomial: mean 300, sd 14.5; 5 sd either way).
    let faults = get_with(&tb, client, faulty, "/", 1000, &[]);
    let aborted = count_of(&faults, "statuses", "500");
    assert_eq!(
        aborted + count_of(&faults, "statuses", "200"),
        1000,
        "{faults}"
    );
    assert!(
        (227..=373).contains(&aborted),
        "aborted {aborted} of 1000: {faults}"
    );
    let injected = metric_sum(
        &waypoint.metrics().expect("metrics"),
        "istio_requests_total",
        &[
            ("reporter", "waypoint"),
            ("destination_service_name", "faulty"),
            ("response_flags", "FI"),
        ],
    );
    assert_eq!(injected, aborted as f64);

    // Mirroring: answers come from the Service, and the shadow receives a copy of each.
    let answered = get_with(&tb, client, mirrored, "/copied", 20, &[]);
    assert_eq!(count_of(&answered, "servers", &a.name), 20, "{answered}");
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = get_with(
            &tb,
            client,
            SocketAddr::new(shadow.ip4.into(), TARGET_PORT),
            "/_seen",
            1,
            &[],
        );
        let copies = seen["last"]["body"]["paths"]["/copied"]
            .as_u64()
            .unwrap_or(0);
        if copies == 20 {
            break;
        }
        assert!(copies < 20, "more copies than requests: {seen}");
        assert!(
            Instant::now() < deadline,
            "shadow saw {copies} of 20 copies: {seen}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn destination_rule_breaks_circuits_and_ejects_outliers() {
    if !e2e_gate("destination_rule_breaks_circuits_and_ejects_outliers") {
        return;
    }
    let tb = testbed(3);
    let (mut mesh, waypoint) = start(&tb);
    let client = tb.pod(0, 0);
    let (a, b) = (tb.pod(1, 0), tb.pod(1, 1));
    let servers: Vec<Server> = [a, b].iter().map(|p| serve(&tb, p)).collect();
    let narrow = service(&mut mesh, "narrow", 90, &[a]);
    let pair = service(&mut mesh, "pair", 91, &[a, b]);
    // The circuit-breaking task's limits: one connection, one pending request.
    istio(
        &mut mesh,
        "v1",
        "DestinationRule",
        "narrow",
        json!({"host": "narrow", "trafficPolicy": {
            "connectionPool": {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1, "http2MaxRequests": 1}},
        }}),
    );
    istio(
        &mut mesh,
        "v1",
        "DestinationRule",
        "pair",
        json!({"host": "pair", "trafficPolicy": {
            "outlierDetection": {"consecutive5xxErrors": 3, "interval": "1s", "baseEjectionTime": "2s", "maxEjectionPercent": 50},
        }}),
    );
    wait_applied(&waypoint, &[], &["narrow", "pair"]);

    // Eight concurrent slow requests: one in flight and one queued at a time; the rest are
    // refused at once.
    let burst = requests(
        &tb,
        client,
        narrow,
        RequestsOpts {
            path: "/delay/500".into(),
            count: 8,
            concurrency: 8,
            ..Default::default()
        },
    );
    let refused = count_of(&burst, "statuses", "503");
    let served = count_of(&burst, "statuses", "200");
    assert_eq!(refused + served, 8, "{burst}");
    assert!(served >= 2 && refused >= 1, "{burst}");

    // With b's server gone, its failures eject it and requests go to a.
    drop(servers);
    let _a_server = serve(&tb, a);
    let failing = get_with(&tb, client, pair, "/", 40, &[]);
    let failed = 40 - count_of(&failing, "statuses", "200");
    assert!(failed <= 5, "b was not ejected after 3 errors: {failing}");
    let healthy = get_with(&tb, client, pair, "/", 20, &[]);
    assert_eq!(count_of(&healthy, "servers", &a.name), 20, "{healthy}");
}
