//! L4 authorization and mutual TLS modes, enforced on the testbed through the controller,
//! the agents' proxies and the kernel.
//!
//! - `AuthorizationPolicy` is enforced by the destination node's proxy on the verified peer
//!   identity, before the pod is dialled: a denied client sees its connection reset promptly,
//!   the agent logs the policy and rule and counts it. DENY wins over ALLOW; once an ALLOW
//!   applies to a workload, anything it does not match is denied.
//! - A policy change closes the open connections it now denies, and only those.
//! - `PeerAuthentication` STRICT drops plaintext from outside the mesh in the kernel (on the
//!   pod's cgroup), lets the node itself (kubelet probes) through, and a port-level
//!   PERMISSIVE opens just that port.
//! - A denied flow stays denied while agents restart: not one connection gets through.
//! - `meshctl policy explain` gives the verdict of the agent's own engine, with the deciding
//!   policy and rule.

use std::{
    io::Write,
    process::ChildStdin,
    time::{Duration, Instant},
};

use mesh_tests::{
    mesh::{
        MESH_LABEL, Mesh, MeshOptions, NAMESPACE, metric_sum,
        policy::{self, principal, reach, serve_http},
    },
    testbed::{Pod, Proc, SpawnOptions, Testbed, bin_path, e2e_gate},
};
use serde_json::{Value, json};

const AUTHZ: &str = "AuthorizationPolicy";
const PEER_AUTHN: &str = "PeerAuthentication";
const WAIT: Duration = Duration::from_secs(20);

fn start(tb: &Testbed, unenrolled: Vec<(usize, usize)>) -> Mesh<'_> {
    Mesh::start(
        tb,
        &MeshOptions {
            control_plane: true,
            unenrolled,
            ..Default::default()
        },
    )
    .expect("mesh")
}

/// Polls (bounded) until `client`'s GETs to `server:port` succeed (`true`) or are promptly
/// refused (`false`) three times in a row: policies reach the nodes asynchronously.
fn settle(tb: &Testbed, client: &Pod, server: &Pod, port: u16, reachable: bool) {
    policy::settle(tb, client, server, port, reachable, WAIT).unwrap_or_else(|e| panic!("{e:#}"));
}

/// `meshctl policy explain` on `node`'s agent, as JSON.
fn explain(mesh: &Mesh<'_>, node: usize, from: &str, to: &str) -> Value {
    mesh.explain(node, from, to)
        .expect("meshctl policy explain succeeds")
}

fn access_errors(mesh: &Mesh<'_>, node: usize) -> Vec<String> {
    mesh.access_log(node)
        .into_iter()
        .filter_map(|v| v["error"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn authorization_by_namespace_and_principal_where_deny_wins() {
    if !e2e_gate("authorization_by_namespace_and_principal_where_deny_wins") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(3)
        .build()
        .expect("testbed");
    let mut mesh = start(&tb, Vec::new());
    let (a, b, c) = (tb.pod(0, 0), tb.pod(0, 1), tb.pod(0, 2));
    let server = tb.pod(1, 0);
    let _http = serve_http(&tb, server, &[8080, 9090]).expect("server");
    mesh.write_pod(server, NAMESPACE, &[("app", "server")])
        .expect("label server");
    // b lives in its own (enrolled) namespace.
    mesh.set_namespace("other", &[(MESH_LABEL, "enabled")])
        .expect("namespace");
    mesh.write_pod(b, "other", &[]).expect("move b");
    for client in [a, b, c] {
        settle(&tb, client, server, 8080, true);
    }

    // Deny by namespace: only b is refused.
    mesh.write_policy(
        AUTHZ,
        NAMESPACE,
        "deny-other",
        json!({"selector": {"matchLabels": {"app": "server"}}, "action": "DENY",
               "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}),
    )
    .expect("policy");
    settle(&tb, b, server, 8080, false);
    settle(&tb, a, server, 8080, true);
    settle(&tb, c, server, 8080, true);
    let errors = access_errors(&mesh, 1);
    assert!(
        errors.iter().any(|e| e.starts_with("401 policy_denied")
            && e.contains("DENY policy default/deny-other rule 0 matched")),
        "node 1 logs the denial with policy and rule: {errors:#?}"
    );
    let metrics = mesh.metrics(1).expect("metrics");
    assert!(
        metric_sum(
            &metrics,
            "trellis_connection_failures_total",
            &[("direction", "inbound"), ("reason", "policy_denied")]
        ) >= 3.0,
        "denials are counted"
    );

    // Allow by principal: once an ALLOW applies to the server, only a matches it.
    mesh.write_policy(
        AUTHZ,
        NAMESPACE,
        "allow-a",
        json!({"selector": {"matchLabels": {"app": "server"}},
               "rules": [{"from": [{"source": {"principals": [principal(a, NAMESPACE)]}}]}]}),
    )
    .expect("policy");
    settle(&tb, c, server, 8080, false);
    settle(&tb, a, server, 8080, true);
    settle(&tb, a, server, 9090, true);
    settle(&tb, b, server, 8080, false);

    // DENY wins over the ALLOW that matches a: port 9090 closes for a, 8080 stays open.
    mesh.write_policy(
        AUTHZ,
        NAMESPACE,
        "deny-a-9090",
        json!({"selector": {"matchLabels": {"app": "server"}}, "action": "DENY",
               "rules": [{"from": [{"source": {"principals": [principal(a, NAMESPACE)]}}],
                          "to": [{"operation": {"ports": ["9090"]}}]}]}),
    )
    .expect("policy");
    settle(&tb, a, server, 9090, false);
    settle(&tb, a, server, 8080, true);

    // The agent's engine explains both, naming the deciding policy and rule.
    let from = format!("{NAMESPACE}/{}", a.name);
    let denied = explain(
        &mesh,
        1,
        &from,
        &format!("{NAMESPACE}/{}:9090", server.name),
    );
    assert_eq!(denied["verdict"], "deny", "{denied:#}");
    assert_eq!(denied["policy"], "default/deny-a-9090", "{denied:#}");
    assert_eq!(denied["rule"], 0, "{denied:#}");
    let allowed = explain(
        &mesh,
        1,
        &from,
        &format!("{NAMESPACE}/{}:8080", server.name),
    );
    assert_eq!(allowed["verdict"], "allow", "{allowed:#}");
    assert_eq!(allowed["policy"], "default/allow-a", "{allowed:#}");
    let other = explain(
        &mesh,
        0,
        &format!("{NAMESPACE}/{}", c.name),
        &format!("{NAMESPACE}/{}:8080", server.name),
    );
    assert_eq!(other["verdict"], "deny", "any agent explains: {other:#}");
    assert!(
        other["reason"]
            .as_str()
            .is_some_and(|r| r.contains("ALLOW policy applies to the workload and none matched")),
        "{other:#}"
    );

    // Removing the policies reopens everything.
    for name in ["deny-other", "allow-a", "deny-a-9090"] {
        mesh.delete_policy(AUTHZ, NAMESPACE, name).expect("delete");
    }
    for client in [a, b, c] {
        settle(&tb, client, server, 9090, true);
    }
}

/// Starts `traffic MODE --to server:port ARGS...` in `client`, with its stdin piped (the
/// test drives it, and closing stdin stops it).
fn traffic(
    tb: &Testbed,
    client: &Pod,
    server: &Pod,
    port: u16,
    mode: &str,
    args: &[&str],
) -> (Proc, ChildStdin) {
    let program = bin_path("traffic").expect("traffic binary (cargo build --bins)");
    let program = program.to_string_lossy();
    let to = format!("{}:{port}", server.ip4);
    let mut cmd = vec![program.as_ref(), mode, "--to", &to];
    cmd.extend_from_slice(args);
    let mut proc = tb
        .spawn(
            client,
            &cmd,
            SpawnOptions::new()
                .name(format!("{mode}-{}", client.name))
                .stdin_piped(),
        )
        .expect("traffic client");
    let stdin = proc.take_stdin().expect("stdin");
    (proc, stdin)
}

/// A `traffic hold` connection from `client` to an echo server.
struct Held {
    proc: Proc,
    stdin: ChildStdin,
    pings: usize,
}

impl Held {
    fn open(tb: &Testbed, client: &Pod, server: &Pod, port: u16) -> Self {
        let (mut proc, stdin) = traffic(tb, client, server, port, "hold", &[]);
        proc.wait_for_stdout_line(WAIT, |l| l.contains("\"connected\":true"))
            .expect("connected");
        Self {
            proc,
            stdin,
            pings: 0,
        }
    }

    /// Pings (bounded by [`WAIT`]) until a ping fails: the connection was cut. Panics with
    /// `what` if it survives.
    fn wait_until_cut(&mut self, what: &str) {
        let deadline = Instant::now() + WAIT;
        while self.ping() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends one ping and waits for its result line: whether the echo came back.
    fn ping(&mut self) -> bool {
        self.pings += 1;
        let seq = self.pings;
        if writeln!(self.stdin, "ping 1000").is_err() {
            return false;
        }
        // The result line of this ping, whatever order its keys are printed in.
        let of_this_ping = |line: &str| {
            serde_json::from_str::<serde_json::Value>(line)
                .is_ok_and(|v| v["ping"].as_u64() == u64::try_from(seq).ok())
        };
        match self.proc.wait_for_stdout_line(WAIT, of_this_ping) {
            Ok(line) => serde_json::from_str::<serde_json::Value>(&line)
                .is_ok_and(|v| v["ok"] == serde_json::Value::Bool(true)),
            Err(_) => false,
        }
    }
}

#[test]
fn a_policy_change_closes_the_open_connections_it_now_denies() {
    if !e2e_gate("a_policy_change_closes_the_open_connections_it_now_denies") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(3)
        .build()
        .expect("testbed");
    let mut mesh = start(&tb, Vec::new());
    let (a, c) = (tb.pod(0, 0), tb.pod(0, 1));
    // One server across the LAN (decided by its node's agent) and one beside the clients
    // (decided by their own node's agent).
    let (server, local_server) = (tb.pod(1, 0), tb.pod(0, 2));
    let _echo = tb
        .spawn_server(server, &["--listen", "0.0.0.0:7000=echo"])
        .expect("echo server");
    let _local_echo = tb
        .spawn_server(local_server, &["--listen", "0.0.0.0:7000=echo"])
        .expect("echo server");
    let mut from_a = Held::open(&tb, a, server, 7000);
    let mut from_c = Held::open(&tb, c, server, 7000);
    let mut local_from_a = Held::open(&tb, a, local_server, 7000);
    let mut local_from_c = Held::open(&tb, c, local_server, 7000);
    assert!(
        from_a.ping() && from_c.ping() && local_from_a.ping() && local_from_c.ping(),
        "every connection works"
    );

    mesh.write_policy(
        AUTHZ,
        NAMESPACE,
        "deny-a",
        json!({"action": "DENY",
               "rules": [{"from": [{"source": {"principals": [principal(a, NAMESPACE)]}}]}]}),
    )
    .expect("policy");
    // a's open connection is closed by the destination's agent (bounded: each failed ping
    // returns at once or within the client's I/O timeout).
    from_a.wait_until_cut("a's open connection survived the policy that denies it");
    local_from_a.wait_until_cut("a's open same-node connection survived the policy that denies it");
    assert!(from_c.ping(), "c's connection is not denied and stays open");
    assert!(local_from_c.ping(), "so is c's same-node connection");
    for node in [1, 0] {
        let errors = access_errors(&mesh, node);
        assert!(
            errors.iter().any(|e| e.starts_with("policy_revoked")
                && e.contains("DENY policy default/deny-a rule 0 matched")),
            "node {node} logs why it closed the connection: {errors:#?}"
        );
    }
    settle(&tb, a, server, 7000, false);
    settle(&tb, a, local_server, 7000, false);
}

#[test]
fn strict_mtls_drops_plaintext_in_the_kernel_but_not_node_probes() {
    if !e2e_gate("strict_mtls_drops_plaintext_in_the_kernel_but_not_node_probes") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(2)
        .build()
        .expect("testbed");
    // pod-0-1 is outside the mesh: its connections are plaintext, straight to the server.
    let mut mesh = start(&tb, vec![(0, 1)]);
    let (meshed, plain) = (tb.pod(0, 0), tb.pod(0, 1));
    let server = tb.pod(1, 0);
    let _http = serve_http(&tb, server, &[8080, 9102]).expect("server");
    mesh.write_pod(server, NAMESPACE, &[("app", "server")])
        .expect("label server");
    let node1 = tb.node(1);

    // PERMISSIVE (no policy): plaintext gets in, and the datapath counts it.
    settle(&tb, meshed, server, 8080, true);
    let accepted = mesh.datapath_event(1, "plaintext_accepted");
    assert_eq!(
        reach(&tb, plain, server, 8080).as_deref(),
        Ok(server.name.as_str())
    );
    assert!(mesh.datapath_event(1, "plaintext_accepted") > accepted);

    // STRICT for the namespace.
    mesh.write_policy(
        PEER_AUTHN,
        NAMESPACE,
        "strict",
        json!({"mtls": {"mode": "STRICT"}}),
    )
    .expect("policy");
    let server_cgroup = server.cgroup.to_string_lossy().into_owned();
    mesh.wait_config(1, WAIT, |d| {
        d["datapath"]["enrolled_cgroups"]
            .as_array()
            .is_some_and(|a| {
                a.iter()
                    .any(|c| c["path"] == server_cgroup.as_str() && c["inbound_mtls"] == "STRICT")
            })
    })
    .expect("node 1 puts the server in STRICT");
    let dropped = mesh.datapath_event(1, "strict_dropped");
    let error = reach(&tb, plain, server, 8080).expect_err("plaintext is dropped under STRICT");
    assert!(error.contains("timed out"), "dropped, not refused: {error}");
    assert!(mesh.datapath_event(1, "strict_dropped") > dropped);
    assert_eq!(
        reach(&tb, meshed, server, 8080).as_deref(),
        Ok(server.name.as_str()),
        "mesh traffic still flows"
    );
    assert_eq!(
        reach(&tb, node1, server, 8080).as_deref(),
        Ok(server.name.as_str()),
        "a probe from the node itself passes"
    );

    // A port-level PERMISSIVE on the server opens only that port to plaintext.
    mesh.write_policy(
        PEER_AUTHN,
        NAMESPACE,
        "server-metrics",
        json!({"selector": {"matchLabels": {"app": "server"}},
               "portLevelMtls": {"9102": {"mode": "PERMISSIVE"}}}),
    )
    .expect("policy");
    mesh.wait_config(1, WAIT, |d| {
        d["datapath"]["enrolled_cgroups"]
            .as_array()
            .is_some_and(|a| {
                a.iter().any(|c| {
                    c["path"] == server_cgroup.as_str()
                        && c["inbound_mtls_ports"]["9102"] == "PERMISSIVE"
                })
            })
    })
    .expect("node 1 opens port 9102");
    assert_eq!(
        reach(&tb, plain, server, 9102).as_deref(),
        Ok(server.name.as_str())
    );
    assert!(
        reach(&tb, plain, server, 8080).is_err(),
        "8080 stays STRICT"
    );

    // Back to PERMISSIVE.
    mesh.delete_policy(PEER_AUTHN, NAMESPACE, "strict")
        .expect("delete");
    mesh.delete_policy(PEER_AUTHN, NAMESPACE, "server-metrics")
        .expect("delete");
    settle(&tb, plain, server, 8080, true);
}

/// A `traffic loop` (a new connection and GET every few milliseconds) from `client`.
struct Loop {
    proc: Proc,
    stdin: Option<ChildStdin>,
}

impl Loop {
    fn start(tb: &Testbed, client: &Pod, server: &Pod, port: u16) -> Self {
        let (proc, stdin) = traffic(tb, client, server, port, "loop", &["--interval-ms", "10"]);
        Self {
            proc,
            stdin: Some(stdin),
        }
    }

    fn events(&self) -> Vec<Value> {
        self.proc
            .stdout_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("seq").is_some())
            .collect()
    }

    fn successes_after(&self, seq: u64) -> usize {
        self.events()
            .iter()
            .filter(|e| e["ok"] == true && e["seq"].as_u64().is_some_and(|s| s > seq))
            .count()
    }

    fn last_seq(&self) -> u64 {
        self.events()
            .last()
            .and_then(|e| e["seq"].as_u64())
            .unwrap_or(0)
    }

    fn stop(mut self) -> Vec<Value> {
        drop(self.stdin.take());
        let _ = self.proc.wait_timeout(WAIT);
        self.events()
    }
}

#[test]
fn turning_peer_authentication_strict_aborts_the_plaintext_connections_it_admitted_before() {
    if !e2e_gate(
        "turning_peer_authentication_strict_aborts_the_plaintext_connections_it_admitted_before",
    ) {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(2)
        .build()
        .expect("testbed");
    // pod-0-1 is outside the mesh: its connections reach the server straight, in plaintext.
    let mut mesh = start(&tb, vec![(0, 1)]);
    let (meshed, plain) = (tb.pod(0, 0), tb.pod(0, 1));
    let server = tb.pod(1, 0);
    let _echo = tb
        .spawn_server(
            server,
            &[
                "--listen",
                "0.0.0.0:7000=echo",
                "--listen",
                "0.0.0.0:7001=echo",
            ],
        )
        .expect("echo servers");
    mesh.write_pod(server, NAMESPACE, &[("app", "server")])
        .expect("label server");
    // Admitted under PERMISSIVE, the default.
    let mut plain_strict_port = Held::open(&tb, plain, server, 7000);
    let mut plain_permissive_port = Held::open(&tb, plain, server, 7001);
    let mut meshed_conn = Held::open(&tb, meshed, server, 7000);
    assert!(plain_strict_port.ping() && plain_permissive_port.ping() && meshed_conn.ping());

    // STRICT for the server, except port 7001.
    mesh.write_policy(
        PEER_AUTHN,
        NAMESPACE,
        "server-strict",
        json!({"selector": {"matchLabels": {"app": "server"}},
               "mtls": {"mode": "STRICT"},
               "portLevelMtls": {"7001": {"mode": "PERMISSIVE"}}}),
    )
    .expect("policy");
    plain_strict_port
        .wait_until_cut("the plaintext connection admitted under PERMISSIVE survived STRICT");
    assert!(
        plain_permissive_port.ping(),
        "the port left PERMISSIVE keeps its plaintext connection"
    );
    assert!(meshed_conn.ping(), "the mesh connection stays open");
    only_the_plaintext_connection_was_revoked(&mesh, &tb, plain, server, 7000);
}

#[test]
fn a_denied_flow_stays_denied_while_agents_restart() {
    if !e2e_gate("a_denied_flow_stays_denied_while_agents_restart") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(2)
        .build()
        .expect("testbed");
    let mut mesh = start(&tb, Vec::new());
    let (allowed, denied) = (tb.pod(0, 0), tb.pod(0, 1));
    let server = tb.pod(1, 0);
    let _http = serve_http(&tb, server, &[8080]).expect("server");
    settle(&tb, denied, server, 8080, true);
    mesh.write_policy(
        AUTHZ,
        NAMESPACE,
        "deny-one",
        json!({"action": "DENY",
               "rules": [{"from": [{"source": {"principals": [principal(denied, NAMESPACE)]}}]}]}),
    )
    .expect("policy");
    settle(&tb, denied, server, 8080, false);
    settle(&tb, allowed, server, 8080, true);

    let probe = Loop::start(&tb, denied, server, 8080);
    let control = Loop::start(&tb, allowed, server, 8080);
    // Restart the destination's agent, then the source's, each time waiting until allowed
    // traffic flows again.
    for node in [1, 0] {
        let before = control.last_seq();
        mesh.stop_agent(node, WAIT).expect("agent stops");
        mesh.start_agent(node).expect("agent starts");
        mesh.wait_ready(node).expect("agent ready");
        let deadline = Instant::now() + WAIT;
        while control.successes_after(before) < 5 {
            assert!(
                Instant::now() < deadline,
                "allowed traffic did not resume after node {node}'s agent restarted"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let probed = probe.stop();
    let _ = control.stop();
    let through: Vec<&Value> = probed.iter().filter(|e| e["ok"] == true).collect();
    assert!(
        probed.len() > 20,
        "the probe kept trying throughout: {} attempts",
        probed.len()
    );
    assert!(
        through.is_empty(),
        "{} of {} denied connections got through during the restarts: {through:#?}",
        through.len(),
        probed.len()
    );
}

#[test]
fn open_plaintext_connections_are_aborted_when_a_policy_starts_refusing_plaintext() {
    if !e2e_gate("open_plaintext_connections_are_aborted_when_a_policy_starts_refusing_plaintext") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(2)
        .build()
        .expect("testbed");
    // pod-0-1 is outside the mesh: its connection reaches the server straight, in plaintext.
    let mut mesh = start(&tb, vec![(0, 1)]);
    let (meshed, plain) = (tb.pod(0, 0), tb.pod(0, 1));
    let server = tb.pod(1, 0);
    let _echo = tb
        .spawn_server(server, &["--listen", "0.0.0.0:7000=echo"])
        .expect("echo server");
    mesh.write_pod(server, NAMESPACE, &[("app", "server")])
        .expect("label server");
    let mut from_plain = Held::open(&tb, plain, server, 7000);
    let mut from_meshed = Held::open(&tb, meshed, server, 7000);
    assert!(
        from_plain.ping() && from_meshed.ping(),
        "both connections work"
    );

    // Only the meshed pod's principal is allowed now: plaintext has none.
    mesh.write_policy(
        AUTHZ,
        NAMESPACE,
        "allow-meshed",
        json!({"selector": {"matchLabels": {"app": "server"}},
               "rules": [{"from": [{"source": {"principals": [principal(meshed, NAMESPACE)]}}]}]}),
    )
    .expect("policy");
    from_plain
        .wait_until_cut("the open plaintext connection survived the policy that refuses plaintext");
    assert!(from_meshed.ping(), "the allowed mesh connection stays open");
    only_the_plaintext_connection_was_revoked(&mesh, &tb, plain, server, 7000);
}

/// Node 1's agent aborted exactly one plaintext connection, and `plain`'s next one to
/// `server:port` is dropped in the kernel.
fn only_the_plaintext_connection_was_revoked(
    mesh: &Mesh<'_>,
    tb: &Testbed,
    plain: &Pod,
    server: &Pod,
    port: u16,
) {
    let metrics = mesh.metrics(1).expect("metrics");
    assert_eq!(
        metric_sum(
            &metrics,
            "trellis_connection_failures_total",
            &[("direction", "inbound"), ("reason", "plaintext_revoked")]
        ),
        1.0,
        "exactly the plaintext connection was aborted"
    );
    let error = reach(tb, plain, server, port).expect_err("new plaintext is refused");
    assert!(
        error.contains("timed out"),
        "dropped in the kernel: {error}"
    );
}
