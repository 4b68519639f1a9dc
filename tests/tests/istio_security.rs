//! Istio's `security.istio.io` objects end to end, written in the field shapes of Istio's
//! security tasks (HTTP and TCP authorization, mutual TLS migration, JWT authentication):
//! each is accepted, with the `Accepted` condition the controller reports for it, and
//! behaves as the task describes, through the kernel redirection, the agents and, for
//! request attributes, a waypoint. Hostile objects are rejected one by one with their
//! reason, fail closed, and leave everything else working.
//!
//! Istio ambient's binding rules hold: a policy with `targetRefs` is enforced by the
//! waypoint serving its target (request attributes, 403); one with a `selector`, or
//! neither, by the destination's node agent on the connection (a reset), and never at a
//! waypoint.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_tests::{
    mesh::{
        MESH_LABEL, Mesh, MeshOptions, NAMESPACE,
        policy::{ISTIO_SECURITY, accepted, observed, principal, reach, serve_http, settle},
        waypoint::Waypoint,
    },
    testbed::{Pod, Testbed, e2e_gate},
};
use serde_json::{Value, json};

mod waypoint_fixture;

use waypoint_fixture::{ISSUER, Issuer, WAIT, count_of, get, serve, service, start, status_of};

const AUTHZ: &str = "AuthorizationPolicy";
const PEER_AUTHN: &str = "PeerAuthentication";
const REQUEST_AUTHN: &str = "RequestAuthentication";

fn write(mesh: &mut Mesh<'_>, version: &str, kind: &str, name: &str, spec: Value) {
    write_in(mesh, version, kind, NAMESPACE, name, spec);
}

fn write_in(
    mesh: &mut Mesh<'_>,
    version: &str,
    kind: &str,
    namespace: &str,
    name: &str,
    spec: Value,
) {
    mesh.write_istio_policy(version, kind, namespace, name, spec)
        .unwrap_or_else(|e| panic!("{kind} {namespace}/{name}: {e:#}"));
}

fn delete(mesh: &mut Mesh<'_>, kind: &str, name: &str) {
    mesh.delete_istio_policy(kind, NAMESPACE, name)
        .unwrap_or_else(|e| panic!("delete {kind} {name}: {e:#}"));
}

/// The generation last written of `kind` `id` (`namespace/name`).
fn generation(mesh: &Mesh<'_>, kind: &str, id: &str) -> i64 {
    let (namespace, name) = id.split_once('/').expect("namespace/name");
    mesh.istio_generation(kind, namespace, name)
        .unwrap_or_else(|| panic!("{kind} {id} was never written"))
}

/// Waits until the controller reports the generation last written of `kind` `id`
/// (`namespace/name`) `Accepted` `True`.
fn wait_accepted(mesh: &Mesh<'_>, kind: &str, id: &str) {
    let generation = generation(mesh, kind, id);
    mesh.wait_policy_status(ISTIO_SECURITY, kind, id, WAIT, |e| {
        accepted(e) && observed(e, generation)
    })
    .unwrap_or_else(|e| panic!("{kind} {id} not accepted: {e:#}"));
}

/// Waits until the controller reports the generation last written of `kind` `id` not
/// accepted, for `reason`; returns the status event (its raw text holds the message).
fn wait_refused(mesh: &Mesh<'_>, kind: &str, id: &str, reason: &str) -> String {
    let generation = generation(mesh, kind, id);
    let event = mesh
        .wait_policy_status(ISTIO_SECURITY, kind, id, WAIT, |e| {
            e["reason"] == reason && observed(e, generation)
        })
        .unwrap_or_else(|e| panic!("{kind} {id} not reported {reason}: {e:#}"));
    event.to_string()
}

/// The `Accepted` condition node `node`'s agent lists for policy `id`, once it is there.
fn listed_condition(mesh: &Mesh<'_>, node: usize, id: &str) -> Value {
    let dump = mesh
        .wait_config(node, WAIT, |d| {
            d["policies"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["id"] == id))
        })
        .unwrap_or_else(|e| panic!("{id} not listed on node {node}: {e:#}"));
    dump["policies"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["id"] == id))
        .map(|p| p["condition"].clone())
        .unwrap_or_default()
}

/// A target list naming one Service, as Istio's ambient pages write it.
fn service_target(name: &str) -> Value {
    json!([{"kind": "Service", "group": "", "name": name}])
}

/// Polls (bounded) until a GET of `path` from `client` at `to` answers `status`: a policy
/// reaches the waypoint asynchronously.
fn wait_status(tb: &Testbed, client: &Pod, to: SocketAddr, path: &str, status: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = status_of(tb, client, to, "GET", path, &[]);
        if got == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} from {} answered {got}, not {status}, after {WAIT:?}",
            client.name
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_settled(tb: &Testbed, client: &Pod, server: &Pod, port: u16, reachable: bool) {
    settle(tb, client, server, port, reachable, WAIT).unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn istio_http_authorization_at_the_waypoint_by_method_path_and_principal_where_deny_wins() {
    if !e2e_gate(
        "istio_http_authorization_at_the_waypoint_by_method_path_and_principal_where_deny_wins",
    ) {
        return;
    }
    let tb = waypoint_fixture::testbed(3);
    let (mut mesh, waypoint) = start(&tb);
    let (client, stranger) = (tb.pod(0, 0), tb.pod(0, 2));
    let backend = tb.pod(1, 0);
    let _server = serve(&tb, backend);
    let web = service(&mut mesh, "web", 60, &[backend]);
    let vault = service(&mut mesh, "vault", 61, &[backend]);
    for to in [web, vault] {
        assert_eq!(status_of(&tb, client, to, "GET", "/", &[]), 200);
    }

    // The task's first step: allow nothing. An ALLOW policy without rules on the Service.
    write(
        &mut mesh,
        "v1",
        AUTHZ,
        "web-allow-nothing",
        json!({"targetRefs": service_target("web")}),
    );
    wait_accepted(&mesh, AUTHZ, "default/web-allow-nothing");
    wait_status(&tb, client, web, "/public/page", 403);
    assert_eq!(status_of(&tb, client, vault, "GET", "/", &[]), 200);

    // Then the viewer policy: GET under /public/, for the client's principal only.
    write(
        &mut mesh,
        "v1",
        AUTHZ,
        "web-viewer",
        json!({
            "targetRefs": service_target("web"),
            "action": "ALLOW",
            "rules": [{
                "from": [{"source": {"principals": [principal(client, NAMESPACE)]}}],
                "to": [{"operation": {"methods": ["GET"], "paths": ["/public/*"]}}],
            }],
        }),
    );
    wait_accepted(&mesh, AUTHZ, "default/web-viewer");
    wait_status(&tb, client, web, "/public/page", 200);
    assert_eq!(
        status_of(&tb, client, web, "POST", "/public/page", &[]),
        403
    );
    assert_eq!(status_of(&tb, client, web, "GET", "/private", &[]), 403);
    assert_eq!(
        status_of(&tb, stranger, web, "GET", "/public/page", &[]),
        403,
        "another principal"
    );

    // DENY wins over the ALLOW that matches (written at v1beta1, as older pages do).
    write(
        &mut mesh,
        "v1beta1",
        AUTHZ,
        "web-deny-secrets",
        json!({
            "targetRefs": service_target("web"),
            "action": "DENY",
            "rules": [{"to": [{"operation": {"paths": ["/public/secret*"]}}]}],
        }),
    );
    wait_accepted(&mesh, AUTHZ, "default/web-deny-secrets");
    wait_status(&tb, client, web, "/public/secret/key", 403);
    assert_eq!(status_of(&tb, client, web, "GET", "/public/page", &[]), 200);
    // Spellings of the denied path are normalized before the decision.
    assert_eq!(
        status_of(&tb, client, web, "GET", "/public/./secret/key", &[]),
        403
    );
    assert!(
        waypoint.access_log().iter().any(|e| e["error"]
            .as_str()
            .is_some_and(|r| r.contains("DENY policy default/web-deny-secrets"))),
        "the waypoint logs the Istio policy that denied"
    );

    // Allow-all and deny-all on vault: the DENY wins; without it, everything passes. The
    // allow-all uses the older single `targetRef`.
    write(
        &mut mesh,
        "v1",
        AUTHZ,
        "vault-allow-all",
        json!({"targetRef": {"kind": "Service", "group": "", "name": "vault"}, "rules": [{}]}),
    );
    write(
        &mut mesh,
        "v1",
        AUTHZ,
        "vault-deny-all",
        json!({"targetRefs": service_target("vault"), "action": "DENY", "rules": [{}]}),
    );
    wait_accepted(&mesh, AUTHZ, "default/vault-allow-all");
    wait_accepted(&mesh, AUTHZ, "default/vault-deny-all");
    wait_status(&tb, client, vault, "/anything", 403);
    assert_eq!(status_of(&tb, stranger, vault, "POST", "/x", &[]), 403);
    delete(&mut mesh, AUTHZ, "vault-deny-all");
    wait_status(&tb, client, vault, "/anything", 200);
    assert_eq!(status_of(&tb, stranger, vault, "POST", "/x", &[]), 200);

    // The waypoint's policies stay on the waypoint: the agents let the same client reach
    // the backend's port, and web's policies never applied to vault.
    assert_eq!(status_of(&tb, client, web, "GET", "/public/page", &[]), 200);
    assert_eq!(status_of(&tb, client, vault, "GET", "/private", &[]), 200);
}

#[test]
fn istio_tcp_authorization_at_the_node_by_principal_namespace_port_service_account_and_trust_domain()
 {
    if !e2e_gate(
        "istio_tcp_authorization_at_the_node_by_principal_namespace_port_service_account_and_trust_domain",
    ) {
        return;
    }
    let tb = waypoint_fixture::testbed(3);
    let mut mesh = Mesh::start(
        &tb,
        &MeshOptions {
            control_plane: true,
            ..Default::default()
        },
    )
    .expect("mesh");
    let (a, c, b) = (tb.pod(0, 0), tb.pod(0, 1), tb.pod(0, 2));
    let (server, other_server) = (tb.pod(1, 0), tb.pod(1, 1));
    let _http = serve_http(&tb, server, &[8080, 9090]).expect("server");
    let _other = serve_http(&tb, other_server, &[8080]).expect("server");
    mesh.write_pod(server, NAMESPACE, &[("app", "tcp-echo")])
        .expect("label server");
    // b runs in its own enrolled namespace.
    mesh.set_namespace("other", &[(MESH_LABEL, "enabled")])
        .expect("namespace");
    mesh.write_pod(b, "other", &[]).expect("move b");
    for client in [a, b, c] {
        wait_settled(&tb, client, server, 8080, true);
        wait_settled(&tb, client, server, 9090, true);
    }

    // ALLOW a on port 8080 only, and namespace `other` on any port.
    let selector = json!({"matchLabels": {"app": "tcp-echo"}});
    write(
        &mut mesh,
        "v1",
        AUTHZ,
        "tcp-echo-allow",
        json!({
            "selector": selector,
            "action": "ALLOW",
            "rules": [
                {"from": [{"source": {"principals": [principal(a, NAMESPACE)]}}],
                 "to": [{"operation": {"ports": ["8080"]}}]},
                {"from": [{"source": {"namespaces": ["other"]}}]},
            ],
        }),
    );
    wait_accepted(&mesh, AUTHZ, "default/tcp-echo-allow");
    let condition = listed_condition(&mesh, 1, "default/tcp-echo-allow");
    assert_eq!(condition["status"], "True", "{condition}");
    wait_settled(&tb, c, server, 8080, false);
    wait_settled(&tb, a, server, 9090, false);
    wait_settled(&tb, a, server, 8080, true);
    wait_settled(&tb, b, server, 8080, true);
    wait_settled(&tb, b, server, 9090, true);
    assert_eq!(
        reach(&tb, c, other_server, 8080).as_deref(),
        Ok(other_server.name.as_str()),
        "the selector picks tcp-echo only"
    );

    // DENY b's service account (Istio 1.25's `serviceAccounts`): it wins over the namespace.
    write(
        &mut mesh,
        "v1",
        AUTHZ,
        "tcp-echo-deny-sa",
        json!({
            "selector": selector,
            "action": "DENY",
            "rules": [{"from": [{"source": {"serviceAccounts": [format!("other/{}", b.name)]}}]}],
        }),
    );
    wait_accepted(&mesh, AUTHZ, "default/tcp-echo-deny-sa");
    wait_settled(&tb, b, server, 8080, false);
    wait_settled(&tb, a, server, 8080, true);

    // Trust domains: denying every other trust domain changes nothing here...
    write(
        &mut mesh,
        "v1beta1",
        AUTHZ,
        "tcp-echo-trust",
        json!({
            "selector": selector,
            "action": "DENY",
            "rules": [{"from": [{"source": {"notTrustDomains": ["cluster.local"]}}]}],
        }),
    );
    wait_accepted(&mesh, AUTHZ, "default/tcp-echo-trust");
    let condition = listed_condition(&mesh, 1, "default/tcp-echo-trust");
    assert_eq!(condition["status"], "True", "{condition}");
    for _ in 0..3 {
        assert_eq!(
            reach(&tb, a, server, 8080).as_deref(),
            Ok(server.name.as_str())
        );
    }
    // ...denying this one on 8080 closes it to a.
    write(
        &mut mesh,
        "v1beta1",
        AUTHZ,
        "tcp-echo-trust",
        json!({
            "selector": selector,
            "action": "DENY",
            "rules": [{"from": [{"source": {"trustDomains": ["cluster.local"]}}],
                       "to": [{"operation": {"ports": ["8080"]}}]}],
        }),
    );
    wait_accepted(&mesh, AUTHZ, "default/tcp-echo-trust");
    wait_settled(&tb, a, server, 8080, false);
    delete(&mut mesh, AUTHZ, "tcp-echo-trust");
    wait_settled(&tb, a, server, 8080, true);

    // Allow nothing (`spec: {}`) in the namespace: workloads without another ALLOW close;
    // ALLOW policies add up, so tcp-echo keeps what its own policy allows.
    write(&mut mesh, "v1", AUTHZ, "allow-nothing", json!({}));
    wait_accepted(&mesh, AUTHZ, "default/allow-nothing");
    wait_settled(&tb, c, other_server, 8080, false);
    wait_settled(&tb, a, other_server, 8080, false);
    wait_settled(&tb, a, server, 8080, true);

    // The destination's agent explains with the Istio policy that decided.
    let explained = mesh
        .explain(
            0,
            &format!("other/{}", b.name),
            &format!("{NAMESPACE}/{}:8080", server.name),
        )
        .expect("explain");
    assert_eq!(explained["verdict"], "deny", "{explained:#}");
    assert_eq!(
        explained["policy"], "default/tcp-echo-deny-sa",
        "{explained:#}"
    );

    for name in ["allow-nothing", "tcp-echo-allow", "tcp-echo-deny-sa"] {
        delete(&mut mesh, AUTHZ, name);
    }
    for client in [a, b, c] {
        wait_settled(&tb, client, server, 9090, true);
    }
    wait_settled(&tb, c, other_server, 8080, true);
}

/// Node `node`'s enrolled cgroup of `pod`, once `pred` holds for it.
fn wait_enrolled(mesh: &Mesh<'_>, node: usize, pod: &Pod, pred: impl Fn(&Value) -> bool) {
    let path = pod.cgroup.to_string_lossy().into_owned();
    mesh.wait_config(node, WAIT, |d| {
        d["datapath"]["enrolled_cgroups"]
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c["path"] == path.as_str() && pred(c)))
    })
    .unwrap_or_else(|e| panic!("{}'s inbound mode: {e:#}", pod.name));
}

#[test]
fn istio_mutual_tls_migration_from_permissive_to_strict_with_a_port_level_exception() {
    if !e2e_gate("istio_mutual_tls_migration_from_permissive_to_strict_with_a_port_level_exception")
    {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(2)
        .build()
        .expect("testbed");
    // pod-0-1 is outside the mesh (the task's legacy client): its connections are plaintext.
    let mut mesh = Mesh::start(
        &tb,
        &MeshOptions {
            control_plane: true,
            unenrolled: vec![(0, 1)],
            ..Default::default()
        },
    )
    .expect("mesh");
    let (meshed, legacy) = (tb.pod(0, 0), tb.pod(0, 1));
    let server = tb.pod(1, 0);
    let _http = serve_http(&tb, server, &[8080, 9102]).expect("server");
    mesh.write_pod(server, NAMESPACE, &[("app", "httpbin")])
        .expect("label server");

    // PERMISSIVE for the namespace (v1beta1): both clients get in, plaintext is counted.
    write(
        &mut mesh,
        "v1beta1",
        PEER_AUTHN,
        "default",
        json!({"mtls": {"mode": "PERMISSIVE"}}),
    );
    wait_accepted(&mesh, PEER_AUTHN, "default/default");
    let condition = listed_condition(&mesh, 1, "default/default");
    assert_eq!(condition["status"], "True", "{condition}");
    wait_enrolled(&mesh, 1, server, |c| c["inbound_mtls"] == "PERMISSIVE");
    wait_settled(&tb, meshed, server, 8080, true);
    let plaintext = mesh.datapath_event(1, "plaintext_accepted");
    assert_eq!(
        reach(&tb, legacy, server, 8080).as_deref(),
        Ok(server.name.as_str())
    );
    assert!(mesh.datapath_event(1, "plaintext_accepted") > plaintext);

    // Lock down to STRICT, namespace-wide (v1, same object): plaintext is dropped in the
    // kernel, mesh traffic and the node's own probes pass.
    write(
        &mut mesh,
        "v1",
        PEER_AUTHN,
        "default",
        json!({"mtls": {"mode": "STRICT"}}),
    );
    wait_enrolled(&mesh, 1, server, |c| c["inbound_mtls"] == "STRICT");
    wait_accepted(&mesh, PEER_AUTHN, "default/default");
    let dropped = mesh.datapath_event(1, "strict_dropped");
    let error = reach(&tb, legacy, server, 8080).expect_err("plaintext is dropped under STRICT");
    assert!(error.contains("timed out"), "dropped, not refused: {error}");
    assert!(mesh.datapath_event(1, "strict_dropped") > dropped);
    assert_eq!(
        reach(&tb, meshed, server, 8080).as_deref(),
        Ok(server.name.as_str()),
        "mesh traffic still flows"
    );
    assert_eq!(
        reach(&tb, tb.node(1), server, 8080).as_deref(),
        Ok(server.name.as_str()),
        "a probe from the node itself passes"
    );

    // A workload policy keeps STRICT but opens its metrics port to plaintext.
    write(
        &mut mesh,
        "v1",
        PEER_AUTHN,
        "httpbin",
        json!({
            "selector": {"matchLabels": {"app": "httpbin"}},
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"9102": {"mode": "PERMISSIVE"}},
        }),
    );
    wait_accepted(&mesh, PEER_AUTHN, "default/httpbin");
    wait_enrolled(&mesh, 1, server, |c| {
        c["inbound_mtls_ports"]["9102"] == "PERMISSIVE"
    });
    assert_eq!(
        reach(&tb, legacy, server, 9102).as_deref(),
        Ok(server.name.as_str())
    );
    let error = reach(&tb, legacy, server, 8080).expect_err("8080 stays STRICT");
    assert!(error.contains("timed out"), "dropped, not refused: {error}");

    // Mesh-wide STRICT from the root namespace replaces the namespace's policy.
    delete(&mut mesh, PEER_AUTHN, "httpbin");
    delete(&mut mesh, PEER_AUTHN, "default");
    wait_enrolled(&mesh, 1, server, |c| c["inbound_mtls"] == "PERMISSIVE");
    wait_settled(&tb, legacy, server, 8080, true);
    write_in(
        &mut mesh,
        "v1",
        PEER_AUTHN,
        "trellis-system",
        "default",
        json!({"mtls": {"mode": "STRICT"}}),
    );
    wait_accepted(&mesh, PEER_AUTHN, "trellis-system/default");
    wait_enrolled(&mesh, 1, server, |c| c["inbound_mtls"] == "STRICT");
    let error = reach(&tb, legacy, server, 9102).expect_err("mesh-wide STRICT");
    assert!(error.contains("timed out"), "dropped, not refused: {error}");
    assert_eq!(
        reach(&tb, meshed, server, 9102).as_deref(),
        Ok(server.name.as_str())
    );
}

#[test]
fn istio_jwt_authentication_and_claim_based_authorization_at_the_waypoint() {
    if !e2e_gate("istio_jwt_authentication_and_claim_based_authorization_at_the_waypoint") {
        return;
    }
    let tb = waypoint_fixture::testbed(2);
    let (mut mesh, waypoint) = start(&tb);
    let client = tb.pod(0, 0);
    let backend = tb.pod(1, 0);
    let _server = serve(&tb, backend);
    let web = service(&mut mesh, "web", 62, &[backend]);
    let issuer = Issuer::new();
    let bearer = |token: &str| vec![format!("authorization: Bearer {token}")];
    let status = |path: &str, headers: &[String]| status_of(&tb, client, web, "GET", path, headers);

    // RequestAuthentication alone: a bad token is refused, a request without one passes.
    write(
        &mut mesh,
        "v1",
        REQUEST_AUTHN,
        "jwt-example",
        json!({
            "targetRefs": service_target("web"),
            "jwtRules": [{"issuer": ISSUER, "jwks": issuer.jwks()}],
        }),
    );
    wait_accepted(&mesh, REQUEST_AUTHN, "default/jwt-example");
    waypoint
        .wait_l7(WAIT, |l7| {
            l7["request_authentications"] == json!(["default/jwt-example"])
        })
        .expect("request authentication applied");
    assert_eq!(status("/headers", &bearer("deadbeef")), 401);
    assert_eq!(status("/headers", &[]), 200);
    assert_eq!(
        status("/headers", &bearer(&issuer.token("alice", 600))),
        200
    );

    // A valid token is required: no token 403, a bad one still 401.
    write(
        &mut mesh,
        "v1",
        AUTHZ,
        "require-jwt",
        json!({
            "targetRefs": service_target("web"),
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}],
        }),
    );
    wait_accepted(&mesh, AUTHZ, "default/require-jwt");
    wait_status(&tb, client, web, "/headers", 403);
    assert_eq!(
        status("/headers", &bearer(&issuer.token("alice", 600))),
        200
    );
    assert_eq!(
        status("/headers", &bearer(&issuer.token("alice", -600))),
        401
    );
    assert_eq!(
        status("/headers", &bearer(&Issuer::new().token("alice", 600))),
        401,
        "signed by another key"
    );

    // Claim-based: only members of group1.
    write(
        &mut mesh,
        "v1",
        AUTHZ,
        "require-jwt",
        json!({
            "targetRefs": service_target("web"),
            "action": "ALLOW",
            "rules": [{
                "from": [{"source": {"requestPrincipals": [format!("{ISSUER}/alice")]}}],
                "when": [{"key": "request.auth.claims[groups]", "values": ["group1"]}],
            }],
        }),
    );
    wait_accepted(&mesh, AUTHZ, "default/require-jwt");
    let member = issuer.token_with_claims("alice", &json!({"groups": ["group1", "group2"]}));
    let outsider = issuer.token_with_claims("alice", &json!({"groups": ["group2"]}));
    let deadline = Instant::now() + WAIT;
    while status("/headers", &bearer(&outsider)) != 403 {
        assert!(Instant::now() < deadline, "the claim rule never applied");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status("/headers", &bearer(&member)), 200);
    assert_eq!(
        status("/headers", &bearer(&issuer.token("alice", 600))),
        403,
        "no groups claim"
    );
    let bob = issuer.token_with_claims("bob", &json!({"groups": ["group1"]}));
    assert_eq!(status("/headers", &bearer(&bob)), 403, "another principal");
    assert_eq!(status("/headers", &[]), 403);

    // Removing the RequestAuthentication leaves no verifier: tokens are not trusted.
    delete(&mut mesh, REQUEST_AUTHN, "jwt-example");
    waypoint
        .wait_l7(WAIT, |l7| l7["request_authentications"] == json!([]))
        .expect("request authentication removed");
    assert_eq!(status("/headers", &bearer(&member)), 403);
}

#[test]
fn hostile_istio_objects_are_rejected_alone_fail_closed_and_leave_the_rest_working() {
    if !e2e_gate("hostile_istio_objects_are_rejected_alone_fail_closed_and_leave_the_rest_working")
    {
        return;
    }
    let tb = waypoint_fixture::testbed(3);
    let (mut mesh, mut waypoint) = start(&tb);
    let client = tb.pod(0, 0);
    let (backend, l4_server) = (tb.pod(1, 0), tb.pod(1, 1));
    let _server = serve(&tb, backend);
    let _l4 = serve_http(&tb, l4_server, &[8080]).expect("server");
    let web = service(&mut mesh, "web", 63, &[backend]);
    let open = service(&mut mesh, "open", 64, &[backend]);
    let guarded = service(&mut mesh, "guarded", 65, &[backend]);
    let routed = service(&mut mesh, "routed", 66, &[backend]);
    // The L4 server lives in a meshed namespace without a waypoint.
    mesh.set_namespace("plain", &[(MESH_LABEL, "enabled")])
        .expect("namespace");
    mesh.write_pod(l4_server, "plain", &[("app", "l4")])
        .expect("move the L4 server");
    wait_settled(&tb, client, l4_server, 8080, true);

    // A good policy that must keep working throughout.
    write(
        &mut mesh,
        "v1",
        AUTHZ,
        "web-ok",
        json!({"targetRefs": service_target("web"),
               "rules": [{"to": [{"operation": {"methods": ["GET"], "paths": ["/ok*"]}}]}]}),
    );
    wait_accepted(&mesh, AUTHZ, "default/web-ok");
    wait_status(&tb, client, web, "/nope", 403);
    let still_working = |waypoint: &Waypoint<'_>| {
        for (to, path, want) in [(web, "/ok", 200), (web, "/nope", 403), (routed, "/", 200)] {
            let got = status_of(&tb, client, to, "GET", path, &[]);
            let last = waypoint.access_log().pop().unwrap_or_default();
            assert_eq!(
                got, want,
                "GET {path} at {to}; the waypoint's last event: {last}"
            );
        }
    };
    still_working(&waypoint);
    for to in [open, guarded] {
        assert_eq!(status_of(&tb, client, to, "GET", "/", &[]), 200);
    }

    // An ALLOW with a value that is no address: rejected, naming the field; its stand-in
    // allows nothing at `open` (read loosely, it would have allowed everything there).
    write(
        &mut mesh,
        "v1",
        AUTHZ,
        "open-bad-value",
        json!({"targetRefs": service_target("open"), "action": "ALLOW",
               "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/99"]}}]}]}),
    );
    let status = wait_refused(&mesh, AUTHZ, "default/open-bad-value", "Invalid");
    assert!(
        status.contains("spec.rules[0].from[0].source.ipBlocks[0]"),
        "{status}"
    );
    wait_status(&tb, client, open, "/", 403);
    still_working(&waypoint);

    // Unknown field: `principalz` in an ALLOW. The rule using it matches nothing.
    delete(&mut mesh, AUTHZ, "open-bad-value");
    wait_status(&tb, client, open, "/", 200);
    write(
        &mut mesh,
        "v1",
        AUTHZ,
        "open-unknown-field",
        json!({"targetRefs": service_target("open"),
               "rules": [{"from": [{"source": {"principalz": ["*"]}}]}]}),
    );
    let status = wait_refused(
        &mesh,
        AUTHZ,
        "default/open-unknown-field",
        "PartiallyEnforced",
    );
    assert!(
        status.contains("spec.rules[0].from[0].source.principalz: unknown field"),
        "{status}"
    );
    wait_status(&tb, client, open, "/", 403);

    // A DENY with a port that is no number is rejected and fails closed: everything to
    // `guarded` is denied, and only there.
    write(
        &mut mesh,
        "v1",
        AUTHZ,
        "guarded-deny",
        json!({"targetRefs": service_target("guarded"), "action": "DENY",
               "rules": [{"to": [{"operation": {"ports": ["eighty"], "paths": ["/admin"]}}]}]}),
    );
    let status = wait_refused(&mesh, AUTHZ, "default/guarded-deny", "Invalid");
    assert!(
        status.contains("spec.rules[0].to[0].operation.ports[0]")
            && status.contains("denying every connection"),
        "{status}"
    );
    wait_status(&tb, client, guarded, "/public", 403);
    still_working(&waypoint);

    // Thousands of rules are enforced, not dropped: the last one still decides.
    let rules: Vec<Value> = (0..3000)
        .map(|i| json!({"to": [{"operation": {"methods": ["GET"], "paths": [format!("/r{i}")]}}]}))
        .collect();
    write(
        &mut mesh,
        "v1",
        AUTHZ,
        "guarded-many",
        json!({"targetRefs": service_target("guarded"), "action": "DENY", "rules": rules}),
    );
    wait_accepted(&mesh, AUTHZ, "default/guarded-many");
    delete(&mut mesh, AUTHZ, "guarded-deny");
    wait_status(&tb, client, guarded, "/public", 200);
    assert_eq!(status_of(&tb, client, guarded, "GET", "/r2999", &[]), 403);
    assert_eq!(status_of(&tb, client, guarded, "GET", "/r3000", &[]), 200);

    // A regex whose program would be huge, and a VirtualService with thousands of routes:
    // each rejected alone, with its reason, and `routed` keeps its plain routing.
    mesh.write_l7(
        "networking.istio.io/v1",
        "VirtualService",
        "routed-regex",
        json!({"hosts": ["routed"], "http": [{
            "match": [{"uri": {"regex": "((((a{100}){100}){100}){100})"}}],
            "route": [{"destination": {"host": "web"}}],
        }]}),
    )
    .expect("VirtualService");
    let routes: Vec<Value> = (0..5000)
        .map(|i| {
            json!({"match": [{"uri": {"exact": format!("/r{i}")}}],
                        "route": [{"destination": {"host": "web"}}]})
        })
        .collect();
    mesh.write_l7(
        "networking.istio.io/v1",
        "VirtualService",
        "routed-many",
        json!({"hosts": ["open"], "http": routes}),
    )
    .expect("VirtualService");
    let dump = waypoint
        .wait_dump(WAIT, |d| {
            let rejected = |object: &str| {
                d["l7"]["rejected"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|e| e["object"] == object))
            };
            rejected("VirtualService default/routed-regex")
                && rejected("VirtualService default/routed-many")
        })
        .expect("both rejected");
    let reason = |object: &str| {
        dump["l7"]["rejected"]
            .as_array()
            .and_then(|r| r.iter().find(|e| e["object"] == object))
            .map(|e| e["reason"].to_string())
            .unwrap_or_default()
    };
    let regex = reason("VirtualService default/routed-regex");
    assert!(regex.contains("spec.http[0].match[0].uri"), "{regex}");
    let many = reason("VirtualService default/routed-many");
    assert!(many.contains("spec.http"), "{many}");
    assert_eq!(status_of(&tb, client, routed, "GET", "/", &[]), 200);

    // Request attributes in a policy bound to workloads (no waypoint on `plain`): the node
    // cannot see paths, so the ALLOW rule matches nothing and the DENY rule everything.
    write_in(
        &mut mesh,
        "v1",
        AUTHZ,
        "plain",
        "l4-allow-paths",
        json!({"selector": {"matchLabels": {"app": "l4"}},
               "rules": [{"to": [{"operation": {"paths": ["/public"]}}]}]}),
    );
    let status = wait_refused(&mesh, AUTHZ, "plain/l4-allow-paths", "PartiallyEnforced");
    assert!(status.contains("cannot be evaluated at L4"), "{status}");
    wait_settled(&tb, client, l4_server, 8080, false);
    mesh.delete_istio_policy(AUTHZ, "plain", "l4-allow-paths")
        .expect("delete");
    wait_settled(&tb, client, l4_server, 8080, true);
    write_in(
        &mut mesh,
        "v1",
        AUTHZ,
        "plain",
        "l4-deny-paths",
        json!({"selector": {"matchLabels": {"app": "l4"}}, "action": "DENY",
               "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}),
    );
    wait_refused(&mesh, AUTHZ, "plain/l4-deny-paths", "PartiallyEnforced");
    wait_settled(&tb, client, l4_server, 8080, false);

    // Wrong types (rules as a string): nothing of the spec can be read, not even its
    // action or scope, so its stand-in denies its whole namespace, as documented: every
    // workload of `plain`, and nothing elsewhere.
    mesh.delete_istio_policy(AUTHZ, "plain", "l4-deny-paths")
        .expect("delete");
    wait_settled(&tb, client, l4_server, 8080, true);
    write_in(
        &mut mesh,
        "v1",
        AUTHZ,
        "plain",
        "wrong-types",
        json!({"selector": {"matchLabels": {"app": "l4"}}, "action": "ALLOW", "rules": "everyone"}),
    );
    let status = wait_refused(&mesh, AUTHZ, "plain/wrong-types", "Invalid");
    assert!(status.contains("spec: cannot be read"), "{status}");
    wait_settled(&tb, client, l4_server, 8080, false);
    still_working(&waypoint);
    mesh.delete_istio_policy(AUTHZ, "plain", "wrong-types")
        .expect("delete");
    wait_settled(&tb, client, l4_server, 8080, true);

    // Through all of it, the controller and the waypoint kept running, and the good objects
    // kept working.
    assert!(waypoint.process.is_running(), "the waypoint survived");
    mesh.controller_metrics()
        .expect("the controller still serves");
    still_working(&waypoint);
    let summary = get(&tb, client, web, "/ok/more", 20);
    assert_eq!(count_of(&summary, "statuses", "200"), 20, "{summary}");
}
