//! The control plane on the testbed, with real processes: `mesh-node controller` watching a
//! manifest directory and one agent per node on its feed.
//!
//! - Editing the manifests while traffic runs moves pods in and out of the mesh: relabelling a
//!   pod, unlabelling its namespace, deleting a pod's manifest, adding one for a new pod.
//! - Certificates rotate under a long-lived connection without resetting it, and new
//!   connections handshake with the new certificate.
//! - With the controller stopped, traffic keeps flowing from cached state and certificates;
//!   when it is back, agents resync, including changes made while it was away.
//! - The CA refuses an agent asking for an identity of another node's pod, and signs nothing.
//! - A broken manifest is reported (file or object, and why) and the rest is applied.
//!
//! How a connection travelled is read from the `peer` the server saw: through HBONE the
//! destination agent dials the pod from its node (the node's pod gateway address); a pod outside
//! the mesh arrives with its own address; a connection the source agent passed through as plain
//! TCP arrives from the source node's LAN address.

use std::{
    collections::BTreeMap,
    io::Write,
    net::IpAddr,
    process::ChildStdin,
    time::{Duration, Instant},
};

use mesh_node::{
    config::{ControlPlaneConfig, SourceAddress},
    identity::Identity,
};
use mesh_tests::{
    mesh::{MESH_LABEL, Mesh, MeshOptions, NAMESPACE, TRUST_DOMAIN, metric_sum, spiffe_id},
    testbed::{Pod, Proc, SpawnOptions, Testbed, bin_path, e2e_gate},
};
use serde_json::Value;

/// Bound on waiting for the mesh to follow a manifest change.
const CONVERGE: Duration = Duration::from_secs(20);
/// Consecutive responses of one kind that show a change has taken hold.
const STEADY: usize = 5;

/// Pods are dialled from their node's address: a server seeing its node's gateway is how
/// these tests tell a connection went through HBONE.
fn control_plane() -> MeshOptions {
    MeshOptions {
        control_plane: true,
        source_address: SourceAddress::Node,
        ..MeshOptions::default()
    }
}

fn testbed(pods_per_node: usize) -> Testbed {
    Testbed::builder()
        .nodes(2)
        .pods_per_node(pods_per_node)
        .build()
        .expect("testbed")
}

fn poll<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn traffic_bin() -> String {
    bin_path("traffic")
        .expect("traffic binary (cargo build --bins)")
        .to_string_lossy()
        .into_owned()
}

// ---- what the config dump says -------------------------------------------------------------

fn certificates(dump: &Value) -> Vec<&Value> {
    dump["certificates"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

/// The serial of the certificate the node holds for `pod`'s identity.
fn serial_of(dump: &Value, pod: &Pod) -> Option<String> {
    let id = spiffe_id(pod);
    certificates(dump)
        .into_iter()
        .find(|c| c["identity"] == id.as_str())
        .and_then(|c| c["serial"].as_str())
        .map(str::to_owned)
}

fn holds_certificate(dump: &Value, pod: &Pod) -> bool {
    serial_of(dump, pod).is_some()
}

fn enrolled(dump: &Value, pod: &Pod) -> bool {
    let path = pod.cgroup.to_string_lossy();
    dump["datapath"]["enrolled_cgroups"]
        .as_array()
        .is_some_and(|a| a.iter().any(|c| c["path"] == path.as_ref()))
}

fn enrolled_count(dump: &Value) -> usize {
    dump["datapath"]["enrolled_cgroups"]
        .as_array()
        .map_or(usize::MAX, Vec::len)
}

fn connected(dump: &Value) -> Option<bool> {
    dump["control_plane"]["connected"].as_bool()
}

// ---- clients -------------------------------------------------------------------------------

/// How a connection reached the server, from the client address the server saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// Through HBONE: the destination agent dialled the pod from its node.
    Hbone,
    /// Not redirected: the client pod's own address.
    Direct,
    /// Redirected, then passed through as plain TCP from the source node.
    Passthrough,
    /// None of those (or no answer): a test failure wherever it shows up.
    Other,
}

/// How the connection of a `traffic loop` event from `client` to `server` travelled.
fn path_of(tb: &Testbed, client: &Pod, server: &Pod, event: &Value) -> Path {
    let Some(ip) = event["peer"]
        .as_str()
        .and_then(|p| p.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.ip())
    else {
        return Path::Other;
    };
    if ip == IpAddr::from(tb.node(server.node).gateway_ip4) {
        Path::Hbone
    } else if ip == IpAddr::from(client.ip4) {
        Path::Direct
    } else if ip == IpAddr::from(tb.node(client.node).lan_ip4) {
        Path::Passthrough
    } else {
        Path::Other
    }
}

/// A `traffic loop` in a client pod: a new connection (one GET) every few milliseconds.
struct Loop<'tb> {
    tb: &'tb Testbed,
    client: &'tb Pod,
    server: &'tb Pod,
    proc: Proc,
    stdin: Option<ChildStdin>,
}

impl<'tb> Loop<'tb> {
    fn start(tb: &'tb Testbed, client: &'tb Pod, server: &'tb Pod, port: u16) -> Self {
        let to = format!("{}:{port}", server.ip4);
        let traffic = traffic_bin();
        let mut proc = tb
            .spawn(
                client,
                &[traffic.as_str(), "loop", "--to", &to, "--interval-ms", "5"],
                SpawnOptions::new()
                    .name(format!("loop-{}", client.name))
                    .stdin_piped(),
            )
            .expect("traffic loop");
        let stdin = proc.take_stdin();
        Self {
            tb,
            client,
            server,
            proc,
            stdin,
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

    fn path(&self, event: &Value) -> Path {
        path_of(self.tb, self.client, self.server, event)
    }

    fn last_seq(&self) -> u64 {
        self.events()
            .last()
            .and_then(|e| e["seq"].as_u64())
            .unwrap_or(0)
    }

    /// Waits until the responses after `after` settle on `path`: the first one that took it,
    /// and every successful one after it, took it too (a change never flaps back), and at least
    /// [`STEADY`] did. Returns the sequence number of the first.
    fn wait_path(&mut self, path: Path, after: u64) -> u64 {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let events = self.events();
            let answered: Vec<&Value> = events
                .iter()
                .filter(|e| e["seq"].as_u64().is_some_and(|s| s > after) && e["ok"] == true)
                .collect();
            if let Some(first) = answered.iter().position(|e| self.path(e) == path) {
                let since = &answered[first..];
                if let Some(other) = since.iter().find(|e| self.path(e) != path) {
                    panic!(
                        "connections went back from {path:?} to {:?}: {other}",
                        self.path(other)
                    );
                }
                if since.len() >= STEADY {
                    return since[0]["seq"].as_u64().unwrap_or(after);
                }
            }
            if Instant::now() > deadline {
                let tail: Vec<String> = answered
                    .iter()
                    .rev()
                    .take(5)
                    .map(|e| format!("{:?} {e}", self.path(e)))
                    .collect();
                panic!(
                    "connections from {} did not settle on {path:?} within {CONVERGE:?}; latest: {tail:#?}",
                    self.client.name
                );
            }
            assert!(
                self.proc.is_running(),
                "traffic loop exited: {}",
                self.proc.stdout_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for `n` more successful responses over `path` after `after`.
    fn wait_more(&mut self, path: Path, after: u64, n: usize) -> u64 {
        poll(CONVERGE, &format!("{n} more {path:?} responses"), || {
            let events = self.events();
            let later: Vec<&Value> = events
                .iter()
                .filter(|e| e["seq"].as_u64().is_some_and(|s| s > after))
                .collect();
            for e in &later {
                assert!(
                    e["ok"] == true && self.path(e) == path,
                    "expected {path:?}, got {:?}: {e}",
                    self.path(e)
                );
            }
            (later.len() >= n).then(|| self.last_seq())
        })
    }

    /// Closes stdin (the loop's stop signal), waits for it to exit and returns every attempt
    /// and the failed ones.
    fn finish(mut self) -> (Vec<Value>, Vec<Value>) {
        drop(self.stdin.take());
        self.proc
            .wait_timeout(Duration::from_secs(20))
            .expect("wait")
            .expect("traffic loop exits once stdin closes");
        let summary = self
            .proc
            .stdout_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["done"] == true)
            .expect("summary line");
        let events = self.events();
        assert_eq!(summary["attempts"], events.len(), "one line per attempt");
        let failed = events.iter().filter(|e| e["ok"] != true).cloned().collect();
        (events, failed)
    }

    /// [`Loop::finish`], requiring that every connection succeeded.
    fn stop(self) -> Vec<Value> {
        let (events, failed) = self.finish();
        assert!(
            failed.is_empty(),
            "{} of {} connections failed: {failed:#?}",
            failed.len(),
            events.len()
        );
        events
    }
}

/// A `traffic hold`: one connection to an echo server, kept open and exercised on command.
struct Hold {
    proc: Proc,
    stdin: ChildStdin,
    local: String,
    pings: u64,
    bytes: u64,
}

impl Hold {
    fn start(tb: &Testbed, client: &Pod, to: &str) -> Self {
        let traffic = traffic_bin();
        let mut proc = tb
            .spawn(
                client,
                &[traffic.as_str(), "hold", "--to", to],
                SpawnOptions::new()
                    .name(format!("hold-{}", client.name))
                    .stdin_piped(),
            )
            .expect("traffic hold");
        let stdin = proc.take_stdin().expect("stdin pipe");
        let line = proc
            .wait_for_stdout_line(Duration::from_secs(10), |l| l.contains("\"connected\""))
            .expect("connected");
        let v: Value = serde_json::from_str(&line).expect("json");
        let local = v["local"].as_str().expect("local address").to_owned();
        Self {
            proc,
            stdin,
            local,
            pings: 0,
            bytes: 0,
        }
    }

    /// Sends `n` bytes and expects them back.
    fn ping(&mut self, n: u64) {
        self.pings += 1;
        writeln!(self.stdin, "ping {n}").expect("command");
        let seq = self.pings;
        let line = self
            .proc
            .wait_for_stdout_line(Duration::from_secs(15), |l| {
                serde_json::from_str::<Value>(l).is_ok_and(|v| v["ping"] == seq)
            })
            .expect("ping answered");
        let v: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["ok"], true, "long-lived connection broke: {v}");
        self.bytes += n;
    }

    /// Half-closes and expects a clean end; returns the bytes exchanged each way.
    fn close(mut self) -> u64 {
        writeln!(self.stdin, "close").expect("command");
        let line = self
            .proc
            .wait_for_stdout_line(Duration::from_secs(15), |l| l.contains("\"closed\""))
            .expect("closed");
        let v: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(
            v["clean"], true,
            "long-lived connection did not end cleanly: {v}"
        );
        assert_eq!(v["sent"], self.bytes);
        assert_eq!(v["received"], self.bytes);
        let status = self
            .proc
            .wait_timeout(Duration::from_secs(10))
            .expect("wait")
            .expect("exits");
        assert!(status.success(), "{}", self.proc.stdout_text());
        self.bytes
    }
}

/// One GET from `client` to `server:8080`; returns (local address, peer the server saw).
fn get(tb: &Testbed, client: &Pod, server: &Pod) -> (String, String) {
    let out = tb
        .run(
            client,
            &[
                "pod-app",
                "http-get",
                "--to",
                &format!("{}:8080", server.ip4),
            ],
            Duration::from_secs(20),
        )
        .expect("run");
    let r = out.ok_json().expect("request succeeds");
    (
        r["local"].as_str().expect("local").to_owned(),
        r["body"]["peer"].as_str().expect("peer").to_owned(),
    )
}

fn ip_of(addr: &str) -> IpAddr {
    addr.parse::<std::net::SocketAddr>()
        .expect("socket address")
        .ip()
}

// ---- tests ---------------------------------------------------------------------------------

#[test]
fn manifest_changes_move_pods_in_and_out_of_the_mesh_while_traffic_runs() {
    if !e2e_gate("manifest_changes_move_pods_in_and_out_of_the_mesh_while_traffic_runs") {
        return;
    }
    let tb = testbed(2);
    let mut mesh = Mesh::start(
        &tb,
        &MeshOptions {
            absent: vec![(0, 1)],
            ..control_plane()
        },
    )
    .expect("mesh");
    let (client, newcomer, server) = (tb.pod(0, 0), tb.pod(0, 1), tb.pod(1, 0));
    let _server = tb
        .spawn_server(server, &["--listen", "0.0.0.0:8080=http"])
        .expect("server");
    let mut traffic = Loop::start(&tb, client, server, 8080);
    let mut seq = traffic.wait_path(Path::Hbone, 0);

    // A pod labelled out leaves: its new connections are not redirected.
    mesh.set_pod_label(client, MESH_LABEL, Some("disabled"))
        .expect("relabel");
    seq = traffic.wait_path(Path::Direct, seq);
    mesh.wait_config(0, CONVERGE, |d| !enrolled(d, client))
        .expect("client un-enrolled");
    mesh.set_pod_label(client, MESH_LABEL, None)
        .expect("relabel");
    seq = traffic.wait_path(Path::Hbone, seq);

    // Without the namespace label every pod of the namespace leaves, on every node.
    mesh.set_namespace_label(NAMESPACE, MESH_LABEL, None)
        .expect("namespace label");
    seq = traffic.wait_path(Path::Direct, seq);
    for node in 0..2 {
        mesh.wait_config(node, CONVERGE, |d| {
            enrolled_count(d) == 0 && certificates(d).is_empty()
        })
        .expect("nothing enrolled, no certificates");
    }
    mesh.set_namespace_label(NAMESPACE, MESH_LABEL, Some("enabled"))
        .expect("namespace label");
    seq = traffic.wait_path(Path::Hbone, seq);

    // A destination that leaves is reached as any destination outside the mesh: the source
    // agent passes the connection through as plain TCP.
    mesh.set_pod_label(server, MESH_LABEL, Some("disabled"))
        .expect("relabel");
    seq = traffic.wait_path(Path::Passthrough, seq);
    mesh.set_pod_label(server, MESH_LABEL, None)
        .expect("relabel");
    seq = traffic.wait_path(Path::Hbone, seq);

    // A pod whose manifest is deleted leaves, and its certificate is dropped.
    mesh.delete_pod(client).expect("delete");
    seq = traffic.wait_path(Path::Direct, seq);
    mesh.wait_config(0, CONVERGE, |d| {
        !holds_certificate(d, client) && !enrolled(d, client)
    })
    .expect("client's certificate dropped");
    mesh.write_pod(client, NAMESPACE, &[]).expect("recreate");
    seq = traffic.wait_path(Path::Hbone, seq);

    // A pod that had no manifest joins, its certificate fetched before its first connection.
    let dump = mesh.config_dump(0).expect("dump");
    assert!(!holds_certificate(&dump, newcomer) && !enrolled(&dump, newcomer));
    mesh.write_pod(newcomer, NAMESPACE, &[]).expect("new pod");
    mesh.wait_config(0, CONVERGE, |d| {
        holds_certificate(d, newcomer) && enrolled(d, newcomer)
    })
    .expect("newcomer enrolled with a certificate");
    assert!(
        !mesh
            .access_log(0)
            .iter()
            .any(|e| e["src_workload"] == "default/pod-0-1"),
        "the certificate came before any connection"
    );
    let (local, peer) = get(&tb, newcomer, server);
    assert_eq!(ip_of(&peer), IpAddr::from(tb.node(1).gateway_ip4));
    let inbound = mesh
        .wait_access(1, Duration::from_secs(5), |e| {
            e["direction"] == "inbound" && e["src_addr"] == local.as_str()
        })
        .expect("arrived over HBONE");
    assert_eq!(inbound["src_identity"], spiffe_id(newcomer).as_str());
    assert_eq!(inbound["src_cert_serial"], {
        let dump = mesh.config_dump(0).expect("dump");
        serial_of(&dump, newcomer).expect("serial")
    });
    traffic.wait_more(Path::Hbone, seq, STEADY);

    let (events, failed) = traffic.finish();
    // Every failure must be the one known race: when a pod leaves, its agent swaps in the new
    // mesh state a moment before the datapath stops redirecting the pod, and a connection
    // redirected in between is reset as coming from no known workload (`unknown_source`).
    // No other error may occur at any transition, on either node.
    // TODO: remove this allowance once leaving pods stop being redirected before the state
    // forgets them (or such connections pass through unmeshed).
    let errors: Vec<Value> = (0..2)
        .flat_map(|node| mesh.access_log(node))
        .filter(|e| e["error"].as_str().is_some_and(|s| !s.is_empty()))
        .collect();
    let (leave_race, other): (Vec<&Value>, Vec<&Value>) = errors.iter().partition(|e| {
        e["direction"] == "outbound"
            && e["error"]
                .as_str()
                .is_some_and(|s| s.contains("belongs to no local workload"))
    });
    assert!(other.is_empty(), "errors at transitions: {other:#?}");
    assert!(
        failed.len() <= leave_race.len(),
        "failures not explained by the leave race: {failed:#?}\n{leave_race:#?}"
    );
    if !failed.is_empty() {
        eprintln!("connections reset by the leave race: {}", failed.len());
    }

    // The source agent's access log agrees with what the server saw: it proxied exactly the
    // HBONE and passthrough connections, and never saw the direct ones.
    let mut by_path: BTreeMap<String, usize> = BTreeMap::new();
    for event in events.iter().filter(|e| e["ok"] == true) {
        let path = path_of(&tb, client, server, event);
        assert_ne!(path, Path::Other, "unexpected peer: {event}");
        *by_path.entry(format!("{path:?}")).or_default() += 1;
    }
    eprintln!("connections by path: {by_path:?}");
    assert_eq!(by_path.len(), 3, "every path was taken: {by_path:?}");
    let client_ip = client.ip4.to_string();
    let proxied = |path: &str| {
        mesh.access_log(0)
            .iter()
            .filter(|e| {
                e["direction"] == "outbound"
                    && e["path"] == path
                    && e["error"] == ""
                    && e["src_addr"]
                        .as_str()
                        .is_some_and(|a| ip_of(a).to_string() == client_ip)
            })
            .count()
    };
    // The agent logs a connection when it has closed, a moment after the client saw it end.
    let expected = (by_path["Hbone"], by_path["Passthrough"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logged = (proxied("hbone"), proxied("passthrough"));
        if logged == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "source agent logged (hbone, passthrough) = {logged:?}; the server saw {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn certificates_rotate_under_a_long_lived_connection_and_new_handshakes_use_the_new_one() {
    if !e2e_gate(
        "certificates_rotate_under_a_long_lived_connection_and_new_handshakes_use_the_new_one",
    ) {
        return;
    }
    let tb = testbed(1);
    let mesh = Mesh::start(
        &tb,
        &MeshOptions {
            certificate_ttl_secs: 60,
            ..control_plane()
        },
    )
    .expect("mesh");
    let (client, server) = (tb.pod(0, 0), tb.pod(1, 0));
    let _server = tb
        .spawn_server(
            server,
            &[
                "--listen",
                "0.0.0.0:9000=echo",
                "--listen",
                "0.0.0.0:8080=http",
            ],
        )
        .expect("server");

    let mut hold = Hold::start(&tb, client, &format!("{}:9000", server.ip4));
    hold.ping(64 * 1024);
    let dump = mesh.config_dump(0).expect("dump");
    let first = serial_of(&dump, client).expect("client certificate");
    // Renewal replaces the certificate well before it expires.
    let renewed = mesh
        .wait_config(0, Duration::from_mins(1), |d| {
            serial_of(d, client).is_some_and(|s| s != first)
        })
        .expect("renewed");
    let second = serial_of(&renewed, client).expect("serial");
    assert_ne!(first, second);
    let renewals = mesh
        .agent_log_text(0)
        .lines()
        .filter(|l| l.contains("workload certificate issued") && l.contains("/sa/pod-0-0"))
        .count();
    assert!(
        renewals <= 4,
        "renewed {renewals} times in about one lifetime: renewal must wait for half life"
    );

    let cert = certificates(&dump)
        .into_iter()
        .find(|c| c["serial"] == first.as_str())
        .cloned()
        .expect("entry");
    let lifetime =
        cert["not_after"].as_u64().unwrap_or(0) - cert["not_before"].as_u64().unwrap_or(0);
    assert!(
        lifetime <= 75,
        "a 60 s certificate, backdated by at most a quarter of that: {cert}"
    );

    // The connection opened with the first certificate still carries bytes both ways.
    hold.ping(64 * 1024);

    // A connection opened now handshakes with the current certificate. (Renewal comes about
    // every 20 seconds with this TTL, so retry if one happened while connecting.)
    let mut checked = false;
    for _ in 0..3 {
        let before = serial_of(&mesh.config_dump(0).expect("dump"), client);
        let (local, _) = get(&tb, client, server);
        let after = serial_of(&mesh.config_dump(0).expect("dump"), client);
        let event = mesh
            .wait_access(1, Duration::from_secs(5), |e| {
                e["direction"] == "inbound" && e["src_addr"] == local.as_str()
            })
            .expect("inbound event");
        if before == after {
            assert_eq!(
                event["src_cert_serial"].as_str(),
                before.as_deref(),
                "new connection used an old certificate: {event}"
            );
            assert_ne!(event["src_cert_serial"], first.as_str());
            checked = true;
            break;
        }
    }
    assert!(checked, "the certificate changed during every attempt");

    // The long-lived connection ends cleanly, never reset, authenticated all along by the
    // certificate it was opened with.
    hold.ping(1024);
    let local = hold.local.clone();
    let bytes = hold.close();
    let inbound = mesh
        .wait_access(1, Duration::from_secs(5), |e| {
            e["direction"] == "inbound" && e["src_addr"] == local.as_str()
        })
        .expect("inbound event of the long-lived connection");
    assert_eq!(inbound["src_cert_serial"], first.as_str(), "{inbound}");
    assert_eq!(inbound["error"], "", "{inbound}");
    assert_eq!(inbound["bytes_sent"], bytes);
    assert_eq!(inbound["bytes_received"], bytes);
    let outbound = mesh
        .wait_access(0, Duration::from_secs(5), |e| {
            e["direction"] == "outbound" && e["src_addr"] == local.as_str()
        })
        .expect("outbound event of the long-lived connection");
    assert_eq!(outbound["path"], "hbone");
    assert_eq!(outbound["error"], "", "{outbound}");
}

#[test]
fn traffic_survives_a_controller_outage_and_agents_resync_when_it_returns() {
    if !e2e_gate("traffic_survives_a_controller_outage_and_agents_resync_when_it_returns") {
        return;
    }
    let tb = testbed(2);
    let mut mesh = Mesh::start(&tb, &control_plane()).expect("mesh");
    let (client, other, server) = (tb.pod(0, 0), tb.pod(0, 1), tb.pod(1, 0));
    let _server = tb
        .spawn_server(
            server,
            &[
                "--listen",
                "0.0.0.0:9000=echo",
                "--listen",
                "0.0.0.0:8080=http",
            ],
        )
        .expect("server");
    let mut traffic = Loop::start(&tb, client, server, 8080);
    traffic.wait_path(Path::Hbone, 0);
    let mut hold = Hold::start(&tb, client, &format!("{}:9000", server.ip4));
    hold.ping(16 * 1024);
    assert!(enrolled(&mesh.config_dump(0).expect("dump"), other));

    mesh.stop_controller(Duration::from_secs(10))
        .expect("controller stops");
    for node in 0..2 {
        mesh.wait_config(node, CONVERGE, |d| connected(d) == Some(false))
            .expect("agent notices the controller is gone");
    }
    // Existing and new connections keep working from cached state and certificates.
    let mut seq = traffic.wait_more(Path::Hbone, traffic.last_seq(), 20);
    hold.ping(16 * 1024);

    // A change made while the controller is away reaches nobody yet...
    mesh.set_pod_label(other, MESH_LABEL, Some("disabled"))
        .expect("relabel");
    seq = traffic.wait_more(Path::Hbone, seq, 10);
    let dump = mesh.config_dump(0).expect("dump");
    assert!(enrolled(&dump, other) && holds_certificate(&dump, other));

    // ...and is applied once it is back: the agents resync.
    mesh.start_controller().expect("controller restarts");
    for node in 0..2 {
        mesh.wait_config(node, CONVERGE, |d| connected(d) == Some(true))
            .expect("agent reconnects");
    }
    mesh.wait_config(0, CONVERGE, |d| {
        !enrolled(d, other) && !holds_certificate(d, other) && enrolled(d, client)
    })
    .expect("the change made during the outage is applied");
    traffic.wait_more(Path::Hbone, seq, 20);
    hold.ping(16 * 1024);
    hold.close();
    let events = traffic.stop();
    assert!(events.len() > 50, "{} connections", events.len());
}

/// Asks the controller, from node 0 with node 0's token, for a certificate for `identity`,
/// exactly as an agent does (fresh key, CSR, verification of the answer). Returns the errors,
/// or the serial of the certificate obtained.
fn sign_as_node_0(mesh: &Mesh<'_>, tb: &Testbed, identity: &Identity) -> Result<String, String> {
    let config = ControlPlaneConfig {
        address: mesh.controller_addr().into(),
        server_name: None,
        ca_cert: mesh.ca_dir.join("ca.pem"),
        token_file: mesh.node_token_file(0),
        root_namespace: "trellis-system".into(),
    };
    mesh_tests::mesh::sign_from_node_0(tb, config, TRUST_DOMAIN, identity)
}

#[test]
fn an_agent_is_refused_identities_of_pods_on_other_nodes_and_nothing_is_signed() {
    if !e2e_gate("an_agent_is_refused_identities_of_pods_on_other_nodes_and_nothing_is_signed") {
        return;
    }
    let tb = testbed(1);
    let mesh = Mesh::start(&tb, &control_plane()).expect("mesh");
    let requests = |result: &str| {
        let metrics = mesh.controller_metrics().expect("controller metrics");
        metric_sum(
            &metrics,
            "trellis_controller_certificate_requests_total",
            &[("result", result)],
        )
    };
    let (signed, denied) = (requests("signed"), requests("denied"));
    assert!(signed >= 2.0, "the agents' own certificates were signed");

    let elsewhere: Identity = spiffe_id(tb.pod(1, 0)).parse().expect("identity");
    let refusal = sign_as_node_0(&mesh, &tb, &elsewhere).expect_err("refused");
    assert!(refusal.contains("PermissionDenied"), "{refusal}");
    assert!(refusal.contains("node node-0"), "{refusal}");
    assert!(refusal.contains(&elsewhere.to_string()), "{refusal}");
    assert!(refusal.contains("certificate held: false"), "{refusal}");
    assert_eq!(requests("signed"), signed, "nothing was signed");
    assert_eq!(requests("denied"), denied + 1.0);
    let log = mesh.controller_log_text();
    assert!(
        log.lines().any(|l| l.contains("refused certificate")
            && l.contains("node-0")
            && l.contains(&elsewhere.to_string())),
        "the controller logs the refusal:\n{log}"
    );

    // The same request for a pod of its own node is signed.
    let own: Identity = spiffe_id(tb.pod(0, 0)).parse().expect("identity");
    let serial = sign_as_node_0(&mesh, &tb, &own).expect("signed");
    assert!(!serial.is_empty());
    assert_eq!(requests("signed"), signed + 1.0);
    assert_eq!(requests("denied"), denied + 1.0);
}

#[test]
fn malformed_manifests_are_reported_and_the_rest_is_applied() {
    if !e2e_gate("malformed_manifests_are_reported_and_the_rest_is_applied") {
        return;
    }
    let tb = testbed(2);
    let mut mesh = Mesh::start(
        &tb,
        &MeshOptions {
            absent: vec![(0, 1)],
            ..control_plane()
        },
    )
    .expect("mesh");
    let (client, newcomer, server) = (tb.pod(0, 0), tb.pod(0, 1), tb.pod(1, 0));
    let _server = tb
        .spawn_server(server, &["--listen", "0.0.0.0:8080=http"])
        .expect("server");
    let mut traffic = Loop::start(&tb, client, server, 8080);
    let seq = traffic.wait_path(Path::Hbone, 0);

    // Three broken manifests and one good pod, all at once.
    mesh.write_manifest_text(
        "broken.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: [unclosed\n",
    )
    .expect("write");
    let pod = |name: Option<&str>, service_account: &str, uid: &str, ip: &str| {
        let mut metadata = serde_json::json!({"namespace": NAMESPACE, "uid": uid});
        if let Some(name) = name {
            metadata["name"] = name.into();
        }
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": metadata,
            "spec": {"nodeName": tb.node(0).name, "serviceAccountName": service_account,
                     "containers": [{"name": "app", "image": "pod-app"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        })
        .to_string()
    };
    mesh.write_manifest_text(
        "pod-nameless.json",
        &pod(None, "nameless", "nameless-uid", "10.200.0.98"),
    )
    .expect("write");
    mesh.write_manifest_text(
        "pod-bad-sa.json",
        &pod(
            Some("bad-sa"),
            "Not_A_Service_Account",
            "bad-sa-uid",
            "10.200.0.99",
        ),
    )
    .expect("write");
    mesh.write_pod(newcomer, NAMESPACE, &[]).expect("good pod");

    // The good pod is applied...
    let dump = mesh
        .wait_config(0, CONVERGE, |d| {
            holds_certificate(d, newcomer) && enrolled(d, newcomer)
        })
        .expect("the good pod joins");
    let workloads: Vec<&str> = dump["workloads"]
        .as_array()
        .map(|a| a.iter().filter_map(|w| w["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(!workloads.contains(&"bad-sa"), "{workloads:?}");
    // ...and each broken one is reported with its file or object and the reason.
    let reported = |what: &str, needles: &[&str]| {
        poll(CONVERGE, what, || {
            let log = mesh.controller_log_text();
            log.lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_owned)
        })
    };
    reported("the YAML error", &["broken.yaml", "invalid YAML"]);
    reported(
        "the nameless pod",
        &["pod-nameless.json", "metadata.name is missing"],
    );
    reported(
        "the bad service account",
        &[
            "Pod default/bad-sa",
            "Not_A_Service_Account",
            "left out of the mesh",
        ],
    );

    // Traffic kept flowing, and the good pod is meshed.
    let (_, peer) = get(&tb, newcomer, server);
    assert_eq!(ip_of(&peer), IpAddr::from(tb.node(1).gateway_ip4));
    traffic.wait_more(Path::Hbone, seq, STEADY);
    traffic.stop();
}
