//! Hostile HTTP at the waypoint, end to end, as one table: requests that try to make the L7
//! policy judge one thing while the backend reads another (two hosts, a repeated header, path
//! parameters, a pod address instead of the Service's), and requests the waypoint must not
//! forward as they are (CONNECT, authority-form targets, malformed chunked bodies, tokens
//! with critical extensions). Each row asserts the status the client got and what the
//! backend received: the `l7` server's echo of the request, or nothing (its request counter
//! did not move). Answers the waypoint makes itself carry the reason phrase only.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test traffic casts sizes and counts bounded by its own arguments"
)]

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_tests::{
    mesh::NAMESPACE,
    testbed::{Pod, RequestsOpts, Testbed, e2e_gate},
};
use serde_json::{Value, json};

mod waypoint_fixture;

use waypoint_fixture::{ISSUER, Issuer, TARGET_PORT, WAIT, serve, service, start};

/// Where a row's request is sent.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// The `web` Service's VIP.
    Vip,
    /// The backend pod's own address (still through the waypoint).
    Pod,
    /// A Service whose one endpoint has no server.
    Dead,
}

/// How a row's request is written.
enum Sent {
    /// `pod-app attack --kind raw`: HTTP/1.1 bytes as given.
    Raw(String),
    /// `pod-app requests`: one well-formed request (HTTP/2 when `http2`).
    Request {
        method: &'static str,
        path: &'static str,
        headers: Vec<String>,
        http2: bool,
        authority: Option<&'static str>,
    },
}

fn get(path: &'static str, headers: &[&str]) -> Sent {
    Sent::Request {
        method: "GET",
        path,
        headers: headers.iter().map(|h| (*h).to_owned()).collect(),
        http2: false,
        authority: None,
    }
}

fn raw(head: &str) -> Sent {
    Sent::Raw(format!("{head}\r\nConnection: close\r\n\r\n"))
}

/// What the backend must have received.
#[derive(Debug)]
enum Backend {
    /// Nothing at all.
    Nothing,
    /// At most the head of a request whose body then failed (bodies are streamed).
    AtMostAHead,
    /// One request, whose echo has these values (`path`, `host`, or a header name); a
    /// `None` value is a header that must be absent.
    Got(&'static [(&'static str, Option<&'static str>)]),
}

struct Row {
    name: &'static str,
    via: Via,
    send: Sent,
    status: u64,
    backend: Backend,
}

/// Runs one row's request; the status and the response body.
fn send(tb: &Testbed, client: &Pod, to: SocketAddr, how: &Sent) -> (u64, Value) {
    match how {
        Sent::Raw(bytes) => {
            let to = to.to_string();
            let out = tb
                .run(
                    client,
                    &[
                        "pod-app",
                        "--timeout-ms",
                        "10000",
                        "attack",
                        "--to",
                        &to,
                        "--kind",
                        "raw",
                        "--request",
                        bytes,
                    ],
                    Duration::from_secs(20),
                )
                .unwrap_or_else(|e| panic!("raw request: {e:#}"));
            let report = out.ok_json().expect("attack report");
            let first = &report["responses"][0];
            let status = first["status"]
                .as_u64()
                .unwrap_or_else(|| panic!("no response: {report}"));
            (status, first["body"].clone())
        }
        Sent::Request {
            method,
            path,
            headers,
            http2,
            authority,
        } => {
            let summary = tb
                .requests(
                    client,
                    to,
                    &RequestsOpts {
                        method: (*method).to_owned(),
                        path: (*path).to_owned(),
                        headers: headers.clone(),
                        http2: *http2,
                        authority: authority.map(str::to_owned),
                        count: 1,
                        ..Default::default()
                    },
                )
                .unwrap_or_else(|e| panic!("request {path}: {e:#}"));
            let status = summary["last"]["status"]
                .as_u64()
                .unwrap_or_else(|| panic!("no status: {summary}"));
            (status, summary["last"]["body"].clone())
        }
    }
}

/// Requests the backend has answered so far.
fn backend_requests(tb: &Testbed, client: &Pod, backend: SocketAddr) -> u64 {
    let seen = tb
        .l7_seen(client, backend)
        .expect("backend's seen requests");
    seen["requests"].as_u64().expect("request count")
}

#[test]
fn requests_that_would_make_policy_and_backend_disagree_are_refused() {
    if !e2e_gate("requests_that_would_make_policy_and_backend_disagree_are_refused") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(2)
        .build()
        .expect("testbed");
    let (mut mesh, waypoint) = start(&tb);
    let client = tb.pod(0, 0);
    let backend_pod = tb.pod(1, 0);
    let _server = serve(&tb, backend_pod);
    let web = service(&mut mesh, "web", 90, &[backend_pod]);
    // Pod (1, 1) runs no server: the endpoint refuses connections.
    let dead = service(&mut mesh, "dead", 91, &[tb.pod(1, 1)]);
    let pod = SocketAddr::new(backend_pod.ip4.into(), TARGET_PORT);

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
        "web-deny",
        json!({"targetRefs": target, "action": "DENY", "rules": [
            {"to": [{"operation": {"hosts": ["evil.example"]}}]},
            {"to": [{"operation": {"paths": ["/admin*"]}}]},
            {"when": [{"key": "request.headers[x-debug]", "values": ["1"]}]},
        ]}),
    )
    .expect("deny policy");
    mesh.write_policy(
        "AuthorizationPolicy",
        NAMESPACE,
        "web-allow",
        json!({"targetRefs": target, "action": "ALLOW", "rules": [
            {"to": [{"operation": {"notPaths": ["/tenant*", "/private*"]}}]},
            {"to": [{"operation": {"paths": ["/tenant*"]}}],
             "when": [{"key": "request.headers[x-tenant]", "values": ["acme"]}]},
            {"from": [{"source": {"requestPrincipals": [format!("{ISSUER}/alice")]}}],
             "to": [{"operation": {"paths": ["/private*"]}}]},
        ]}),
    )
    .expect("allow policy");
    waypoint
        .wait_l7(WAIT, |l7| {
            l7["request_authentications"] == json!(["default/web-jwt"])
        })
        .expect("request authentication applied");
    let deadline = Instant::now() + WAIT;
    while send(&tb, client, web, &get("/tenant/probe", &[])).0 != 403 {
        assert!(Instant::now() < deadline, "the ALLOW policy never applied");
        std::thread::sleep(Duration::from_millis(100));
    }

    let bearer = |header: Value| {
        format!(
            "authorization: Bearer {}",
            issuer.token_with_header(&header, "alice", 600)
        )
    };
    let alice = bearer(json!({"alg": "ES256", "kid": "k1"}));
    let alice = alice.as_str();
    // Signed by the right key: only the `crit` header makes it fail.
    let crit = bearer(json!({"alg": "ES256", "kid": "k1", "crit": ["x-ext"], "x-ext": 1}));
    let crit = crit.as_str();
    let h2 =
        |path: &'static str, headers: &[&str], authority: Option<&'static str>| Sent::Request {
            method: "GET",
            path,
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            http2: true,
            authority,
        };

    #[rustfmt::skip]
    let rows = vec![
        // One authority: a Host that disagrees with the target or :authority, or two of them, is 400.
        Row { name: "absolute-form target and another Host", via: Via::Vip, send: raw("GET http://good.example/h HTTP/1.1\r\nHost: evil.example"), status: 400, backend: Backend::Nothing },
        Row { name: "absolute-form evil target and a good Host", via: Via::Vip, send: raw("GET http://evil.example/h HTTP/1.1\r\nHost: good.example"), status: 400, backend: Backend::Nothing },
        Row { name: "two Host headers", via: Via::Vip, send: raw("GET /h HTTP/1.1\r\nHost: good.example\r\nHost: evil.example"), status: 400, backend: Backend::Nothing },
        Row { name: "two equal Host headers", via: Via::Vip, send: raw("GET /h HTTP/1.1\r\nHost: good.example\r\nHost: good.example"), status: 400, backend: Backend::Nothing },
        Row { name: "HTTP/2 :authority beside another host", via: Via::Vip, send: h2("/h", &["host: evil.example"], Some("good.example")), status: 400, backend: Backend::Nothing },
        Row { name: "the DENY on a host applies to Host", via: Via::Vip, send: raw("GET /h HTTP/1.1\r\nHost: evil.example"), status: 403, backend: Backend::Nothing },
        Row { name: "the DENY on a host applies to an absolute-form target", via: Via::Vip, send: raw("GET http://evil.example/h HTTP/1.1"), status: 403, backend: Backend::Nothing },
        Row { name: "the DENY on a host applies to :authority", via: Via::Vip, send: h2("/h", &["host: evil.example"], None), status: 403, backend: Backend::Nothing },
        Row { name: "an agreeing absolute-form target: the backend gets that host", via: Via::Vip, send: raw("GET http://good.example/abs HTTP/1.1\r\nHost: GOOD.example"), status: 200, backend: Backend::Got(&[("path", Some("/abs")), ("host", Some("good.example"))]) },
        Row { name: "an absolute-form target alone: the backend gets its host", via: Via::Vip, send: raw("GET http://good.example/abs HTTP/1.1"), status: 200, backend: Backend::Got(&[("host", Some("good.example"))]) },

        // Service-attached policies protect the Service's pods when dialled directly.
        Row { name: "pod address: the Service's DENY", via: Via::Pod, send: get("/admin", &[]), status: 403, backend: Backend::Nothing },
        Row { name: "pod address: the Service's ALLOW", via: Via::Pod, send: get("/tenant/x", &[]), status: 403, backend: Backend::Nothing },
        Row { name: "pod address: the Service's RequestAuthentication refuses a bad token", via: Via::Pod, send: get("/public", &["authorization: Bearer not.a.token"]), status: 401, backend: Backend::Nothing },
        Row { name: "pod address: a verified token is not forwarded", via: Via::Pod, send: get("/private", &[alice]), status: 200, backend: Backend::Got(&[("path", Some("/private")), ("authorization", None)]) },
        Row { name: "pod address: what the policies allow passes", via: Via::Pod, send: get("/public", &[]), status: 200, backend: Backend::Got(&[("path", Some("/public"))]) },

        // A repeated header: a DENY matches if any value does, an ALLOW only if all do.
        Row { name: "DENY x-debug=1: values 1 and 0", via: Via::Vip, send: get("/d", &["x-debug: 1", "x-debug: 0"]), status: 403, backend: Backend::Nothing },
        Row { name: "DENY x-debug=1: values 0 and 1", via: Via::Vip, send: get("/d", &["x-debug: 0", "x-debug: 1"]), status: 403, backend: Backend::Nothing },
        Row { name: "DENY x-debug=1: values 0 and 2 pass, both forwarded", via: Via::Vip, send: get("/d", &["x-debug: 0", "x-debug: 2"]), status: 200, backend: Backend::Got(&[("x-debug", Some("0, 2"))]) },
        Row { name: "ALLOW x-tenant=acme: values acme and evil", via: Via::Vip, send: get("/tenant/a", &["x-tenant: acme", "x-tenant: evil"]), status: 403, backend: Backend::Nothing },
        Row { name: "ALLOW x-tenant=acme: values evil and acme", via: Via::Vip, send: get("/tenant/a", &["x-tenant: evil", "x-tenant: acme"]), status: 403, backend: Backend::Nothing },
        Row { name: "ALLOW x-tenant=acme: acme twice", via: Via::Vip, send: get("/tenant/a", &["x-tenant: acme", "x-tenant: acme"]), status: 200, backend: Backend::Got(&[("x-tenant", Some("acme, acme"))]) },

        // Path parameters are refused in every segment, raw or encoded.
        Row { name: "/;/admin", via: Via::Vip, send: raw("GET /;/admin HTTP/1.1\r\nHost: web"), status: 400, backend: Backend::Nothing },
        Row { name: "/;x/admin", via: Via::Vip, send: raw("GET /;x/admin HTTP/1.1\r\nHost: web"), status: 400, backend: Backend::Nothing },
        Row { name: "/%3B/admin", via: Via::Vip, send: raw("GET /%3B/admin HTTP/1.1\r\nHost: web"), status: 400, backend: Backend::Nothing },
        Row { name: "/admin;x", via: Via::Vip, send: raw("GET /admin;x HTTP/1.1\r\nHost: web"), status: 400, backend: Backend::Nothing },
        Row { name: "/public/..;/admin", via: Via::Vip, send: raw("GET /public/..;/admin HTTP/1.1\r\nHost: web"), status: 400, backend: Backend::Nothing },
        Row { name: "/public;x=1/page", via: Via::Vip, send: raw("GET /public;x=1/page HTTP/1.1\r\nHost: web"), status: 400, backend: Backend::Nothing },
        Row { name: "a normalized path is what the backend gets", via: Via::Vip, send: raw("GET /public/./x/../page HTTP/1.1\r\nHost: web"), status: 200, backend: Backend::Got(&[("path", Some("/public/page"))]) },

        // Requests that cannot be forwarded as sent.
        Row { name: "CONNECT inside the tunnel", via: Via::Vip, send: raw("CONNECT open:80 HTTP/1.1\r\nHost: open:80"), status: 405, backend: Backend::Nothing },
        Row { name: "an authority-form target (GET admin)", via: Via::Vip, send: raw("GET admin HTTP/1.1\r\nHost: web"), status: 400, backend: Backend::Nothing },
        Row { name: "an authority-form target (GET open:80)", via: Via::Vip, send: raw("GET open:80 HTTP/1.1\r\nHost: web"), status: 400, backend: Backend::Nothing },
        Row { name: "a malformed chunked body", via: Via::Vip, send: Sent::Raw("POST /chunked HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".into()), status: 400, backend: Backend::AtMostAHead },
        Row { name: "a token with a critical extension", via: Via::Vip, send: get("/private", &[crit]), status: 401, backend: Backend::Nothing },
        Row { name: "the same token without it passes", via: Via::Vip, send: get("/private", &[alice]), status: 200, backend: Backend::Got(&[("authorization", None)]) },
        Row { name: "an unreachable endpoint is not named", via: Via::Dead, send: get("/x", &[]), status: 503, backend: Backend::Nothing },
    ];

    let mut failures = Vec::new();
    for row in &rows {
        let to = match row.via {
            Via::Vip => web,
            Via::Pod => pod,
            Via::Dead => dead,
        };
        let before = backend_requests(&tb, client, pod);
        let (status, body) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            send(&tb, client, to, &row.send)
        }))
        .unwrap_or_else(|_| {
            let log = waypoint.log_text();
            let tail = &log[log.len().saturating_sub(4000)..];
            panic!(
                "{}: no answer; the waypoint's log ends with:\n{tail}",
                row.name
            )
        });
        let received = backend_requests(&tb, client, pod) - before;
        let mut problems = Vec::new();
        if status != row.status {
            problems.push(format!("status {status}, want {}", row.status));
        }
        match &row.backend {
            Backend::Nothing if received != 0 => {
                problems.push(format!("the backend received {received} requests"));
            }
            Backend::AtMostAHead if received > 1 => {
                problems.push(format!("the backend received {received} requests"));
            }
            Backend::Got(_) if received != 1 => {
                problems.push(format!("the backend received {received} requests, want 1"));
            }
            Backend::Got(want) => {
                for (field, value) in *want {
                    let got = match *field {
                        "path" => &body["path"],
                        name => &body["headers"][name],
                    };
                    if got.as_str() != *value {
                        problems.push(format!("backend {field} {got}, want {value:?}"));
                    }
                }
            }
            _ => {}
        }
        // The waypoint's own answers say nothing but the reason phrase: no policy, token
        // detail or endpoint address.
        if !(200..300).contains(&status) {
            let reason = http::StatusCode::from_u16(status as u16)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("");
            if body != Value::String(format!("{reason}\n")) {
                problems.push(format!("error body {body}"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {} ({body})", row.name, problems.join("; ")));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));

    // The details the client did not get are in the access log.
    let log = waypoint.access_log();
    for detail in [
        "DENY policy default/web-deny",
        "crit",
        "names another authority",
    ] {
        assert!(
            log.iter()
                .any(|e| e["error"].as_str().is_some_and(|r| r.contains(detail))),
            "no access log error mentions {detail:?}"
        );
    }
}
