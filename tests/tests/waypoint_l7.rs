//! L7 behaviour at the waypoint, end to end: Gateway API routing (header match, weighted
//! split, mirroring, rewrites, redirects, response headers), resilience from `TrafficPolicy`
//! (retries, timeouts, faults, circuit breaking, outlier ejection, rate limiting), L7
//! authorization with path normalization and JWT, gRPC, and span export to an OTLP collector.
//!
//! Each test runs the whole mesh for real (eBPF redirection, agents, controller, the
//! waypoint process in a testbed pod, mutual TLS on both legs); clients are `pod-app` in a
//! client pod, sending to a Service VIP whose namespace uses the waypoint.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_tests::{
    mesh::{
        Mesh, MeshOptions, NAMESPACE, metric_sum,
        waypoint::{USE_WAYPOINT_LABEL, Waypoint},
    },
    testbed::{Pod, RequestsOpts, Server, Testbed, e2e_gate},
};
use serde_json::{Value, json};

mod waypoint_fixture;

use waypoint_fixture::{
    ISSUER, Issuer, PORT, TARGET_PORT, WAIT, WAYPOINT, count_of, get, requests, serve, service,
    start, status_of, testbed,
};

/// Requests the waypoint counted with these labels.
fn waypoint_count(waypoint: &Waypoint<'_>, labels: &[(&str, &str)]) -> f64 {
    let metrics = waypoint.metrics().expect("waypoint metrics");
    let mut all = vec![("reporter", "waypoint")];
    all.extend_from_slice(labels);
    metric_sum(&metrics, "istio_requests_total", &all)
}

fn backend(name: &str) -> Value {
    json!({"name": name, "port": PORT})
}

fn parent(service: &str) -> Value {
    json!([{"group": "", "kind": "Service", "name": service, "port": PORT}])
}

#[test]
fn routes_match_headers_split_by_weight_mirror_rewrite_and_redirect() {
    if !e2e_gate("routes_match_headers_split_by_weight_mirror_rewrite_and_redirect") {
        return;
    }
    let tb = testbed(4);
    let (mut mesh, waypoint) = start(&tb);
    let client = tb.pod(0, 0);
    let (v1, v2, shadow) = (tb.pod(1, 0), tb.pod(1, 1), tb.pod(1, 2));
    let _servers: Vec<Server> = [v1, v2, shadow].iter().map(|p| serve(&tb, p)).collect();
    let web = service(&mut mesh, "web", 30, &[v1]);
    service(&mut mesh, "web-v1", 31, &[v1]);
    service(&mut mesh, "web-v2", 32, &[v2]);
    service(&mut mesh, "shadow", 33, &[shadow]);

    // Before any route: straight to the Service's own endpoints.
    let plain = get(&tb, client, web, "/", 5);
    assert_eq!(count_of(&plain, "servers", &v1.name), 5, "{plain}");

    mesh.write_route(
        "HTTPRoute",
        "web",
        json!({
            "parentRefs": parent("web"),
            "rules": [
                {
                    "matches": [{"headers": [{"name": "x-version", "value": "v2"}]}],
                    "backendRefs": [backend("web-v2")],
                },
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/mirrored"}}],
                    "filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": backend("shadow")}}],
                    "backendRefs": [backend("web-v1")],
                },
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
                    "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}],
                    "backendRefs": [backend("web-v1")],
                },
                {
                    "matches": [{"path": {"type": "Exact", "value": "/moved"}}],
                    "filters": [{"type": "RequestRedirect", "requestRedirect": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/here"}, "statusCode": 301}}],
                },
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "x-routed", "value": "split"}]}}],
                    "backendRefs": [
                        {"name": "web-v1", "port": PORT, "weight": 90},
                        {"name": "web-v2", "port": PORT, "weight": 10},
                    ],
                },
            ],
        }),
    )
    .expect("route");
    waypoint
        .wait_programmed(&["HTTPRoute default/web"], &[], WAIT)
        .expect("route programmed");

    // A header match sends every request to v2.
    let by_header = requests(
        &tb,
        client,
        web,
        RequestsOpts {
            path: "/".into(),
            count: 20,
            headers: vec!["x-version: v2".into()],
            ..Default::default()
        },
    );
    assert_eq!(count_of(&by_header, "servers", &v2.name), 20, "{by_header}");

    // 90/10 over 2,000 requests: v2's share is binomial (mean 200, sd 13.4); 5 sd either way.
    let split = get(&tb, client, web, "/", 2000);
    assert_eq!(count_of(&split, "statuses", "200"), 2000, "{split}");
    let to_v2 = count_of(&split, "servers", &v2.name);
    let to_v1 = count_of(&split, "servers", &v1.name);
    assert_eq!(to_v1 + to_v2, 2000, "{split}");
    assert!(
        (133..=267).contains(&to_v2),
        "v2 got {to_v2} of 2000: {split}"
    );
    assert_eq!(split["last"]["headers"]["x-routed"], "split", "{split}");

    // Mirroring: the client's answers come from v1, and the shadow receives a copy of each.
    let mirrored = get(&tb, client, web, "/mirrored/x", 20);
    assert_eq!(count_of(&mirrored, "servers", &v1.name), 20, "{mirrored}");
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = get(
            &tb,
            client,
            SocketAddr::new(shadow.ip4.into(), TARGET_PORT),
            "/_seen",
            1,
        );
        let copies = seen["last"]["body"]["paths"]["/mirrored/x"]
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

    // Rewrite and redirect.
    let rewritten = get(&tb, client, web, "/old/page", 1);
    assert_eq!(
        rewritten["last"]["body"]["path"], "/new/page",
        "{rewritten}"
    );
    let redirected = get(&tb, client, web, "/moved", 1);
    assert_eq!(redirected["last"]["status"], 301, "{redirected}");
    assert_eq!(
        redirected["last"]["headers"]["location"]
            .as_str()
            .map(|l| l.ends_with("/here")),
        Some(true),
        "{redirected}"
    );

    // The route's telemetry names the backend Service that answered.
    assert!(
        waypoint_count(
            &waypoint,
            &[
                ("destination_service_name", "web-v2"),
                ("response_code", "200")
            ]
        ) >= 20.0
    );
    let events = waypoint.access_log();
    assert!(
        events.iter().any(|e| e["route"]
            .as_str()
            .is_some_and(|r| r.starts_with("HTTPRoute default/web rule 0"))),
        "access log names the rule"
    );

    // The trace continues through the waypoint, which forwards its own span as the parent.
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced = requests(
        &tb,
        client,
        web,
        RequestsOpts {
            path: "/".into(),
            count: 1,
            headers: vec![format!("traceparent: {parent}")],
            ..Default::default()
        },
    );
    let forwarded = traced["last"]["body"]["headers"]["traceparent"]
        .as_str()
        .unwrap_or_default();
    assert!(
        forwarded.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && forwarded != parent,
        "{traced}"
    );

    // Without the route, traffic goes to the Service's own endpoints again.
    mesh.delete_l7_object("HTTPRoute", "web")
        .expect("delete route");
    waypoint
        .wait_programmed(&[], &[], WAIT)
        .expect("route removed");
    let after = requests(
        &tb,
        client,
        web,
        RequestsOpts {
            path: "/".into(),
            count: 5,
            headers: vec!["x-version: v2".into()],
            ..Default::default()
        },
    );
    assert_eq!(count_of(&after, "servers", &v1.name), 5, "{after}");
}

#[test]
fn traffic_policies_retry_time_out_inject_faults_break_circuits_and_rate_limit() {
    if !e2e_gate("traffic_policies_retry_time_out_inject_faults_break_circuits_and_rate_limit") {
        return;
    }
    let tb = testbed(4);
    let (mut mesh, waypoint) = start(&tb);
    let client = tb.pod(0, 0);
    let (a, b) = (tb.pod(1, 0), tb.pod(1, 1));
    let servers: Vec<Server> = [a, b].iter().map(|p| serve(&tb, p)).collect();
    let flaky = service(&mut mesh, "flaky", 40, &[a]);
    let slow = service(&mut mesh, "slow", 41, &[a]);
    let faulty = service(&mut mesh, "faulty", 42, &[a]);
    let limited = service(&mut mesh, "limited", 43, &[a]);
    let pair = service(&mut mesh, "pair", 44, &[a, b]);

    // Without a policy, a flaky backend's 503 reaches the client.
    let unprotected = get(&tb, client, flaky, "/flaky/first/2", 1);
    assert_eq!(
        count_of(&unprotected, "statuses", "503"),
        1,
        "{unprotected}"
    );

    mesh.write_traffic_policy(
        "flaky",
        json!({"targetRefs": [{"group": "", "kind": "Service", "name": "flaky"}],
               "retries": {"attempts": 3, "retryOn": ["5xx"]}}),
    )
    .expect("retry policy");
    mesh.write_route(
        "HTTPRoute",
        "slow",
        json!({"parentRefs": parent("slow"),
               "rules": [{"backendRefs": [backend("slow")], "timeouts": {"request": "300ms"}}]}),
    )
    .expect("timeout route");
    mesh.write_traffic_policy(
        "faulty",
        json!({"targetRefs": [{"group": "", "kind": "Service", "name": "faulty"}],
               "fault": {"abort": {"httpStatus": 418, "percent": 30},
                         "delay": {"fixedDelay": "1ms", "percent": 50}}}),
    )
    .expect("fault policy");
    mesh.write_traffic_policy(
        "limited",
        json!({"targetRefs": [{"group": "", "kind": "Service", "name": "limited"}],
               "rateLimit": {"requestsPerSecond": 1, "burst": 5}}),
    )
    .expect("rate limit policy");
    mesh.write_traffic_policy(
        "pair",
        json!({"targetRefs": [{"group": "", "kind": "Service", "name": "pair"}],
               "outlierDetection": {"consecutiveErrors": 3, "interval": "1s", "baseEjectionTime": "2s", "maxEjectionPercent": 50}}),
    )
    .expect("outlier policy");
    waypoint
        .wait_programmed(
            &["HTTPRoute default/slow"],
            &[
                "default/faulty",
                "default/flaky",
                "default/limited",
                "default/pair",
            ],
            WAIT,
        )
        .expect("policies applied");

    // Retries turn the flaky backend's first two 503s into a success.
    let retried = get(&tb, client, flaky, "/flaky/second/2", 1);
    assert_eq!(count_of(&retried, "statuses", "200"), 1, "{retried}");
    let event = waypoint
        .access_log()
        .into_iter()
        .rev()
        .find(|e| e["path"] == "/flaky/second/2")
        .expect("access event of the retried request");
    assert_eq!(event["tries"], 3, "{event}");

    // The rule's request timeout answers 504 well before the backend would.
    let started = Instant::now();
    let timed_out = get(&tb, client, slow, "/delay/5000", 1);
    assert_eq!(count_of(&timed_out, "statuses", "504"), 1, "{timed_out}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the timeout fired late"
    );

    // Aborts at 30% and delays at 50% of 1,000 requests (binomial: sd 14.5 and 15.8).
    let faults = get(&tb, client, faulty, "/", 1000);
    let aborted = count_of(&faults, "statuses", "418");
    assert_eq!(
        aborted + count_of(&faults, "statuses", "200"),
        1000,
        "{faults}"
    );
    assert!(
        (227..=373).contains(&aborted),
        "aborted {aborted} of 1000: {faults}"
    );
    let delayed = waypoint_count(
        &waypoint,
        &[
            ("destination_service_name", "faulty"),
            ("response_flags", "DI"),
        ],
    );
    let aborted_metric = waypoint_count(
        &waypoint,
        &[
            ("destination_service_name", "faulty"),
            ("response_flags", "FI"),
        ],
    );
    assert_eq!(aborted_metric, aborted as f64);
    // Delays are drawn for every request; those also aborted are counted as aborts.
    let delayed_share = delayed / (1000.0 - aborted as f64);
    assert!(
        (0.38..=0.62).contains(&delayed_share),
        "delayed share {delayed_share}"
    );

    // The token bucket lets the burst through, then answers 429 with retry-after.
    let burst = get(&tb, client, limited, "/", 20);
    let allowed = count_of(&burst, "statuses", "200");
    let limited_count = count_of(&burst, "statuses", "429");
    assert_eq!(allowed + limited_count, 20, "{burst}");
    assert!((5..=8).contains(&allowed), "allowed {allowed}: {burst}");

    // Outlier ejection: with pod b's server gone, its failures eject it and every request
    // then goes to a; once b serves again and the ejection ends, it takes traffic again.
    drop(servers);
    let _a_server = serve(&tb, a);
    let failing = get(&tb, client, pair, "/", 40);
    let failed = 40 - count_of(&failing, "statuses", "200");
    assert!(failed <= 5, "b was not ejected after 3 errors: {failing}");
    let healthy = get(&tb, client, pair, "/", 20);
    assert_eq!(count_of(&healthy, "servers", &a.name), 20, "{healthy}");
    let _b_server = serve(&tb, b);
    let deadline = Instant::now() + WAIT;
    loop {
        let spread = get(&tb, client, pair, "/", 10);
        if count_of(&spread, "servers", &b.name) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "b never came back: {spread}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn circuit_breaker_refuses_requests_beyond_the_limit() {
    if !e2e_gate("circuit_breaker_refuses_requests_beyond_the_limit") {
        return;
    }
    let tb = testbed(2);
    let (mut mesh, waypoint) = start(&tb);
    let client = tb.pod(0, 0);
    let backend_pod = tb.pod(1, 0);
    let _server = serve(&tb, backend_pod);
    let narrow = service(&mut mesh, "narrow", 50, &[backend_pod]);
    mesh.write_traffic_policy(
        "narrow",
        json!({"targetRefs": [{"group": "", "kind": "Service", "name": "narrow"}],
               "connectionPool": {"maxRequests": 1, "maxPendingRequests": 1}}),
    )
    .expect("breaker policy");
    waypoint
        .wait_programmed(&[], &["default/narrow"], WAIT)
        .expect("policy applied");
    // Eight concurrent slow requests: one in flight and one queued at a time; the others are
    // refused at once with the limit named.
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
    assert!(
        waypoint_count(
            &waypoint,
            &[
                ("destination_service_name", "narrow"),
                ("response_flags", "UO")
            ]
        ) >= 1.0
    );
}

#[test]
fn l7_authorization_on_normalized_paths_and_verified_tokens() {
    if !e2e_gate("l7_authorization_on_normalized_paths_and_verified_tokens") {
        return;
    }
    let tb = testbed(2);
    let (mut mesh, waypoint) = start(&tb);
    let client = tb.pod(0, 0);
    let backend_pod = tb.pod(1, 0);
    let _server = serve(&tb, backend_pod);
    let web = service(&mut mesh, "web", 60, &[backend_pod]);
    let target = json!([{"group": "", "kind": "Service", "name": "web"}]);
    let issuer = Issuer::new();
    mesh.write_policy(
        "RequestAuthentication",
        NAMESPACE,
        "web-jwt",
        json!({"targetRefs": target, "jwtRules": [{"issuer": ISSUER, "jwks": issuer.jwks()}]}),
    )
    .expect("request authentication");
    mesh.write_policy(
        "AuthorizationPolicy",
        NAMESPACE,
        "web-allow",
        json!({"targetRefs": target, "action": "ALLOW", "rules": [
            {"to": [{"operation": {"methods": ["GET"], "paths": ["/public/*"]}}]},
            {"from": [{"source": {"requestPrincipals": [format!("{ISSUER}/alice")]}}],
             "to": [{"operation": {"methods": ["GET"], "paths": ["/private"]}}]},
        ]}),
    )
    .expect("allow policy");
    mesh.write_policy(
        "AuthorizationPolicy",
        NAMESPACE,
        "web-deny-admin",
        json!({"targetRefs": target, "action": "DENY", "rules": [
            {"to": [{"operation": {"paths": ["/admin*", "/public/admin*"]}}]},
        ]}),
    )
    .expect("deny policy");
    waypoint
        .wait_l7(WAIT, |l7| {
            l7["request_authentications"] == json!(["default/web-jwt"])
        })
        .expect("request authentication applied");
    let deadline = Instant::now() + WAIT;
    while status_of(&tb, client, web, "GET", "/nowhere", &[]) != 403 {
        assert!(
            Instant::now() < deadline,
            "the ALLOW policy never applied at the waypoint"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Method and path.
    assert_eq!(status_of(&tb, client, web, "GET", "/public/page", &[]), 200);
    assert_eq!(
        status_of(&tb, client, web, "POST", "/public/page", &[]),
        403
    );
    assert_eq!(status_of(&tb, client, web, "GET", "/admin", &[]), 403);

    // Spellings of /admin that a backend would resolve are normalized before the decision;
    // encoded separators are refused outright.
    for bypass in [
        "//admin",
        "/public/../admin",
        "/%61dmin",
        "/public/%2e%2e/admin",
        "/./admin",
    ] {
        assert_eq!(
            status_of(&tb, client, web, "GET", bypass, &[]),
            403,
            "{bypass}"
        );
    }
    assert_eq!(
        status_of(&tb, client, web, "GET", "/public%2F..%2Fadmin", &[]),
        400
    );
    assert_eq!(
        status_of(&tb, client, web, "GET", "/public/a/../b", &[]),
        200
    );

    // /private needs alice's token; a bad or expired token is refused before authorization.
    let bearer = |token: &str| vec![format!("authorization: Bearer {token}")];
    assert_eq!(status_of(&tb, client, web, "GET", "/private", &[]), 403);
    assert_eq!(
        status_of(
            &tb,
            client,
            web,
            "GET",
            "/private",
            &bearer(&issuer.token("alice", 600))
        ),
        200
    );
    assert_eq!(
        status_of(
            &tb,
            client,
            web,
            "GET",
            "/private",
            &bearer(&issuer.token("bob", 600))
        ),
        403
    );
    assert_eq!(
        status_of(
            &tb,
            client,
            web,
            "GET",
            "/private",
            &bearer(&issuer.token("alice", -600))
        ),
        401
    );
    assert_eq!(
        status_of(
            &tb,
            client,
            web,
            "GET",
            "/private",
            &bearer(&Issuer::new().token("alice", 600))
        ),
        401
    );
    assert_eq!(
        status_of(&tb, client, web, "GET", "/public/x", &bearer("not.a.token")),
        401
    );

    // The verified token is not forwarded to the backend.
    let answer = requests(
        &tb,
        client,
        web,
        RequestsOpts {
            path: "/private".into(),
            count: 1,
            headers: bearer(&issuer.token("alice", 600)),
            ..Default::default()
        },
    );
    assert_eq!(answer["last"]["status"], 200, "{answer}");
    assert!(
        answer["last"]["body"]["headers"]
            .get("authorization")
            .is_none(),
        "{answer}"
    );

    // Denials are counted and logged with the deciding policy.
    assert!(
        waypoint_count(
            &waypoint,
            &[("response_code", "403"), ("response_flags", "DENY")]
        ) >= 8.0
    );
    assert!(
        waypoint_count(
            &waypoint,
            &[("response_code", "401"), ("response_flags", "UA")]
        ) >= 3.0
    );
    assert!(
        waypoint.access_log().iter().any(|e| e["error"]
            .as_str()
            .is_some_and(|r| r.contains("DENY policy default/web-deny-admin"))),
        "the deny names its policy"
    );
}

#[test]
fn grpc_unary_and_streaming_calls_cross_the_waypoint() {
    if !e2e_gate("grpc_unary_and_streaming_calls_cross_the_waypoint") {
        return;
    }
    let tb = testbed(2);
    let (mut mesh, waypoint) = start(&tb);
    let client = tb.pod(0, 0);
    let backend_pod = tb.pod(1, 0);
    let _server = serve(&tb, backend_pod);
    let grpc = service(&mut mesh, "grpc", 70, &[backend_pod]);

    let answer = tb.grpc(client, grpc, "", 0).expect("unary check");
    assert_eq!(answer["check"], "SERVING", "{answer}");
    let streamed = tb
        .grpc(client, grpc, "toggle", 10)
        .expect("streaming watch");
    assert_eq!(streamed["watched"], 10, "{streamed}");
    let statuses: Vec<&str> = streamed["statuses"]
        .as_array()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        statuses.contains(&"SERVING") && statuses.contains(&"NOT_SERVING"),
        "{streamed}"
    );
    assert!(
        waypoint_count(
            &waypoint,
            &[
                ("request_protocol", "grpc"),
                ("destination_service_name", "grpc")
            ]
        ) >= 2.0
    );
}

/// Runs `pod-app attack --kind KIND` from `pod` against `to`; its report.
fn attack(tb: &Testbed, pod: &Pod, to: SocketAddr, kind: &str) -> Value {
    let to = to.to_string();
    let out = tb
        .run(
            pod,
            &[
                "pod-app",
                "--timeout-ms",
                "15000",
                "attack",
                "--to",
                &to,
                "--kind",
                kind,
            ],
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("attack {kind}: {e:#}"));
    out.ok_json()
        .unwrap_or_else(|e| panic!("attack {kind} report: {e:#}"))
}

#[test]
fn hostile_http_is_refused_and_other_clients_keep_being_served() {
    if !e2e_gate("hostile_http_is_refused_and_other_clients_keep_being_served") {
        return;
    }
    let tb = testbed(3);
    let (mut mesh, mut waypoint) = start(&tb);
    let (client, attacker) = (tb.pod(0, 0), tb.pod(0, 2));
    let backend_pod = tb.pod(1, 0);
    let _server = serve(&tb, backend_pod);
    let web = service(&mut mesh, "web", 80, &[backend_pod]);
    let served = |n: usize| {
        let summary = get(&tb, client, web, "/", n);
        assert_eq!(count_of(&summary, "statuses", "200"), n as u64, "{summary}");
    };
    served(5);

    // Smuggling: a length beside a transfer coding is answered once and the connection is
    // closed, so the hidden request never runs; two different lengths are refused.
    let cl_te = attack(&tb, attacker, web, "cl-te");
    assert_eq!(
        cl_te["statuses"].as_array().map(Vec::len),
        Some(1),
        "{cl_te}"
    );
    assert_eq!(cl_te["closed"], true, "{cl_te}");
    let cl_cl = attack(&tb, attacker, web, "cl-cl");
    assert!(
        cl_cl["statuses"][0]
            .as_str()
            .is_some_and(|s| s.starts_with("HTTP/1.1 400")),
        "{cl_cl}"
    );
    assert_eq!(cl_cl["closed"], true, "{cl_cl}");
    let seen = tb
        .l7_seen(client, SocketAddr::new(backend_pod.ip4.into(), TARGET_PORT))
        .expect("backend's seen paths");
    assert!(seen["paths"].get("/smuggled").is_none(), "{seen}");
    served(5);

    // HTTP/2 floods end the attacker's connection while everyone else is served.
    std::thread::scope(|s| {
        let flood = s.spawn(|| attack(&tb, attacker, web, "rapid-reset"));
        served(50);
        let report = flood.join().expect("attack thread");
        assert!(
            report["closed"] == true || report["goaway_error"].is_u64(),
            "rapid reset not contained: {report}"
        );
    });
    let continuation = attack(&tb, attacker, web, "continuation");
    assert!(
        continuation["closed"] == true || continuation["goaway_error"].is_u64(),
        "CONTINUATION flood not contained: {continuation}"
    );
    served(20);
    assert!(waypoint.process.is_running(), "the waypoint survived");
}

/// The collector's spans, read from inside its pod.
fn spans(collector: &Pod) -> Value {
    let addr = SocketAddr::from(([127, 0, 0, 1], TARGET_PORT));
    let (status, body) = collector
        .netns
        .run(move || mesh_tests::mesh::http_get(addr, "/_spans"))
        .expect("enter the collector's pod")
        .expect("GET /_spans");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("spans JSON")
}

/// Waits (bounded) until the collector holds a span of `trace_id`; returns every span then.
fn wait_span(collector: &Pod, trace_id: &str) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let all = spans(collector)["spans"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if all.iter().any(|s| s["trace_id"] == trace_id) {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "no span of trace {trace_id} after {WAIT:?}: {all:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn traced(tb: &Testbed, client: &Pod, to: SocketAddr, path: &str, traceparent: &str) -> Value {
    requests(
        tb,
        client,
        to,
        RequestsOpts {
            path: path.into(),
            headers: vec![format!("traceparent: {traceparent}")],
            ..Default::default()
        },
    )
}

#[test]
fn sampled_requests_are_exported_as_spans_to_an_otlp_collector() {
    if !e2e_gate("sampled_requests_are_exported_as_spans_to_an_otlp_collector") {
        return;
    }
    let tb = testbed(2);
    let (client, waypoint_pod, backend, collector_pod) =
        (tb.pod(0, 0), tb.pod(0, 1), tb.pod(1, 0), tb.pod(1, 1));
    let mut mesh = Mesh::start(
        &tb,
        &MeshOptions {
            control_plane: true,
            ..Default::default()
        },
    )
    .expect("mesh");
    let collector = serve(&tb, collector_pod);
    // The waypoint's own connections (span export) are plaintext, and the collector is in the
    // namespace the waypoint serves: it opts out of taking connections through it only.
    mesh.write_pod(
        collector_pod,
        NAMESPACE,
        &[("trellis.dev/waypoint-enforcement", "disabled")],
    )
    .expect("collector opts out");
    // Traces the waypoint starts itself are never sampled here, so only the callers'
    // decisions count; export fails fast once the collector is gone.
    let tracing = format!(
        "tracing:\n  otlp_endpoint: http://{}:{TARGET_PORT}\n  sampling_percent: 0\n  \
         flush_interval_ms: 100\n  export_timeout_ms: 1000\n",
        collector_pod.ip4
    );
    let waypoint = mesh
        .start_waypoint_with(WAYPOINT, waypoint_pod, &tracing)
        .expect("waypoint starts");
    mesh.set_namespace_label(NAMESPACE, USE_WAYPOINT_LABEL, Some(WAYPOINT))
        .expect("label namespace");
    let _backend = serve(&tb, backend);
    let web = service(&mut mesh, "web", 30, &[backend]);

    // Unsampled: no caller context (the waypoint's own traces sample at 0%), or a caller
    // that decided not to sample. Sent first: spans leave in order, so once the sampled
    // request's span has arrived, any of these would have too.
    let plain = get(&tb, client, web, "/", 10);
    assert_eq!(count_of(&plain, "statuses", "200"), 10, "{plain}");
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    traced(&tb, client, web, "/", unsampled);

    // Sampled by the caller: one server span, child of the caller's, parent of the backend's.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let sampled = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let answer = traced(&tb, client, web, "/hello", &sampled);
    let forwarded = answer["last"]["body"]["headers"]["traceparent"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let all = wait_span(collector_pod, trace_id);
    assert_eq!(
        all.len(),
        1,
        "only the sampled request is exported: {all:?}"
    );
    let span = &all[0];
    assert_eq!(span["parent_span_id"], "00f067aa0ba902b7", "{span}");
    assert_eq!(
        forwarded,
        format!(
            "00-{trace_id}-{}-01",
            span["span_id"].as_str().unwrap_or_default()
        ),
        "the backend's parent is the exported span"
    );
    assert_eq!(span["kind"], 2, "SPAN_KIND_SERVER: {span}");
    assert_eq!(span["name"], "GET web.default.svc.cluster.local", "{span}");
    let attributes = &span["attributes"];
    assert_eq!(attributes["http.request.method"], "GET", "{span}");
    assert_eq!(attributes["url.path"], "/hello", "{span}");
    assert_eq!(attributes["http.response.status_code"], 200, "{span}");
    assert_eq!(
        attributes["trellis.destination.service"], "web.default.svc.cluster.local",
        "{span}"
    );
    assert_eq!(
        attributes["trellis.source.principal"],
        mesh_tests::mesh::spiffe_id(client),
        "{span}"
    );
    assert_eq!(
        attributes["trellis.upstream"],
        format!("{}:{TARGET_PORT}", backend.ip4),
        "{span}"
    );
    assert_eq!(
        span["resource"]["service.name"], "waypoint.default",
        "{span}"
    );
    assert_eq!(span["status_code"], 0, "a 200 is no error: {span}");
    let (start, end) = (
        span["start_time_unix_nano"].as_u64().unwrap_or_default(),
        span["end_time_unix_nano"].as_u64().unwrap_or_default(),
    );
    assert!(start > 0 && end >= start, "{span}");

    // A 5xx is an error span.
    let failing = "5bf92f3577b34da6a3ce929d0e0e4736";
    let answer = traced(
        &tb,
        client,
        web,
        "/status/503",
        &format!("00-{failing}-00f067aa0ba902b7-01"),
    );
    assert_eq!(count_of(&answer, "statuses", "503"), 1, "{answer}");
    let all = wait_span(collector_pod, failing);
    let span = all
        .iter()
        .find(|s| s["trace_id"] == failing)
        .expect("the failing request's span");
    assert_eq!(span["status_code"], 2, "STATUS_CODE_ERROR: {span}");
    assert_eq!(
        span["attributes"]["http.response.status_code"], 503,
        "{span}"
    );
    let exported = metric_sum(
        &waypoint.metrics().expect("metrics"),
        "trellis_spans_exported_total",
        &[],
    );
    assert_eq!(
        exported, 2.0,
        "the waypoint counts what the collector accepted"
    );

    // The collector goes away: requests are served as before, spans are dropped and counted.
    drop(collector);
    let after = get(&tb, client, web, "/", 1);
    assert_eq!(count_of(&after, "statuses", "200"), 1, "{after}");
    let lost = "6bf92f3577b34da6a3ce929d0e0e4736";
    let answer = traced(
        &tb,
        client,
        web,
        "/",
        &format!("00-{lost}-00f067aa0ba902b7-01"),
    );
    assert_eq!(count_of(&answer, "statuses", "200"), 1, "{answer}");
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = waypoint.metrics().expect("metrics");
        if metric_sum(
            &metrics,
            "trellis_spans_dropped_total",
            &[("reason", "export_failed")],
        ) >= 1.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no export failure counted: {metrics}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        waypoint.log_text().contains("span export failed"),
        "the failure is logged with its reason"
    );
    let still = get(&tb, client, web, "/", 5);
    assert_eq!(count_of(&still, "statuses", "200"), 5, "{still}");
}
