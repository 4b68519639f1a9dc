//! Local pods see their clients' addresses: the destination agent opens the pod's connection
//! from the client pod's address (transparent socket), cross-node and same-node, IPv4 and
//! IPv6, and the return path brings the pod's replies back to the agent. With
//! `inbound.source_address: node` every connection comes from the node, as before.
//!
//! Proven here: the peer the server pod sees; the access log's `delivered_from`; an nftables
//! rule inside the server's namespace telling two clients apart; STRICT still dropping a
//! pod's direct plaintext while its mesh traffic (from the same address) passes; short
//! connection churn to one pod with no failure, with and without preservation; 1,000
//! concurrent connections and a large byte-exact transfer.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use mesh_node::config::SourceAddress;
use mesh_tests::{
    mesh::{Mesh, MeshOptions, NAMESPACE, metric_sum},
    testbed::{Place, Pod, Testbed, e2e_gate},
};
use serde_json::{Value, json};

const RUN_TIMEOUT: Duration = Duration::from_mins(3);
const CLIENT_TIMEOUT_MS: &str = "120000";
/// Bound on a connection that must fail (dropped SYNs, or refused by the server's firewall).
const FAIL_TIMEOUT_MS: &str = "4000";
const LOG_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on the return path covering a pod after the agents report ready.
const COVER_TIMEOUT: Duration = Duration::from_secs(15);
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
const SINK_PORT: u16 = 9001;

fn options(source_address: SourceAddress) -> MeshOptions {
    MeshOptions {
        source_address,
        ..MeshOptions::default()
    }
}

fn pod_app<'a>(tb: &Testbed, place: impl Into<Place<'a>>, args: &[&str]) -> Result<Value> {
    let mut cmd = vec!["pod-app", "--timeout-ms", CLIENT_TIMEOUT_MS];
    cmd.extend_from_slice(args);
    tb.run(place, &cmd, RUN_TIMEOUT)?.ok_json()
}

fn servers(tb: &Testbed, pod: &Pod) -> Result<mesh_tests::testbed::Server> {
    tb.spawn_server(
        pod,
        &[
            "--timeout-ms",
            CLIENT_TIMEOUT_MS,
            "--listen",
            &format!("[::]:{HTTP_PORT}=http"),
            "--listen",
            &format!("[::]:{ECHO_PORT}=echo"),
            "--listen",
            &format!("[::]:{SINK_PORT}=sink"),
        ],
    )
}

fn addr(ip: impl Into<IpAddr>, port: u16) -> String {
    SocketAddr::new(ip.into(), port).to_string()
}

/// The peer address the server reported for one HTTP GET from `client` to `to`.
fn peer_seen(tb: &Testbed, client: &Pod, to: &str) -> Result<IpAddr> {
    let v = pod_app(tb, client, &["http-get", "--to", to])?;
    ensure!(v["status"] == 200, "GET {to} from {}: {v}", client.name);
    let peer: SocketAddr = v["body"]["peer"]
        .as_str()
        .context("no peer")?
        .parse()
        .context("peer")?;
    Ok(peer.ip().to_canonical())
}

/// Polls (bounded) until the server sees `want`: right after start the return path may not
/// cover the server's link yet, and such a connection is delivered from the node.
fn wait_peer(tb: &Testbed, client: &Pod, to: &str, want: IpAddr) -> Result<()> {
    let deadline = Instant::now() + COVER_TIMEOUT;
    loop {
        let seen = peer_seen(tb, client, to)?;
        if seen == want {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{} -> {to}: the server still sees {seen}, not {want}",
            client.name
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The `delivered_from` field of the access log event on `node` for the connection from
/// `client_ip` in `direction` (`inbound` over HBONE, `outbound` on the same node).
fn delivered_from(mesh: &Mesh, node: usize, direction: &str, client_ip: IpAddr) -> Result<String> {
    let prefix = match client_ip {
        IpAddr::V4(ip) => format!("{ip}:"),
        IpAddr::V6(ip) => format!("[{ip}]:"),
    };
    let event = mesh.wait_access(node, LOG_TIMEOUT, |e| {
        e["direction"] == direction
            && e["src_addr"]
                .as_str()
                .is_some_and(|s| s.starts_with(&prefix))
            && e["delivered_from"].as_str().is_some_and(|s| !s.is_empty())
    })?;
    Ok(event["delivered_from"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

#[test]
fn pods_see_the_client_pod_address_cross_node_and_same_node_in_both_families() -> Result<()> {
    if !e2e_gate("pods_see_the_client_pod_address_cross_node_and_same_node_in_both_families") {
        return Ok(());
    }
    let tb = Testbed::builder().nodes(2).pods_per_node(2).build()?;
    let mesh = Mesh::start(&tb, &options(SourceAddress::Client))?;
    let server = tb.pod(1, 0);
    let _srv = servers(&tb, server)?;
    let (remote, local) = (tb.pod(0, 0), tb.pod(1, 1));
    for client in [remote, local] {
        wait_peer(
            &tb,
            client,
            &addr(server.ip4, HTTP_PORT),
            IpAddr::from(client.ip4),
        )?;
        wait_peer(
            &tb,
            client,
            &addr(server.ip6, HTTP_PORT),
            IpAddr::from(client.ip6),
        )?;
    }
    assert_eq!(
        delivered_from(&mesh, 1, "inbound", remote.ip4.into())?,
        "client"
    );
    assert_eq!(
        delivered_from(&mesh, 1, "outbound", local.ip6.into())?,
        "client"
    );
    // The kernel admitted them as recorded deliveries and steered the replies.
    let metrics = mesh.metrics(1)?;
    assert!(
        metric_sum(
            &metrics,
            "trellis_datapath_events_total",
            &[("event", "return_steered")]
        ) > 0.0,
        "replies were steered back to the agent"
    );
    Ok(())
}

#[test]
fn with_source_address_node_pods_see_the_node_as_before() -> Result<()> {
    if !e2e_gate("with_source_address_node_pods_see_the_node_as_before") {
        return Ok(());
    }
    let tb = Testbed::builder().nodes(2).pods_per_node(2).build()?;
    let mesh = Mesh::start(&tb, &options(SourceAddress::Node))?;
    let server = tb.pod(1, 0);
    let _srv = servers(&tb, server)?;
    let gateway = IpAddr::from(tb.node(1).gateway_ip4);
    for client in [tb.pod(0, 0), tb.pod(1, 1)] {
        let seen = peer_seen(&tb, client, &addr(server.ip4, HTTP_PORT))?;
        assert_eq!(
            seen, gateway,
            "{} reached the server from the node",
            client.name
        );
    }
    assert_eq!(
        delivered_from(&mesh, 1, "inbound", tb.pod(0, 0).ip4.into())?,
        "node:disabled"
    );
    let counted = metric_sum(
        &mesh.metrics(1)?,
        "trellis_delivered_from_node_total",
        &[("reason", "disabled")],
    );
    assert!(counted >= 2.0, "both deliveries counted: {counted}");
    Ok(())
}

/// `nft` inside `pod`'s namespace: only `allowed` may open connections to `port`.
fn admit_only(pod: &Pod, allowed: IpAddr, port: u16) -> Result<()> {
    let rules = format!(
        "table inet trellis_test {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  tcp dport {port} ct state new ip saddr != {allowed} drop\n }}\n}}\n"
    );
    let file = std::env::temp_dir().join(format!("client-address-{}.nft", std::process::id()));
    std::fs::write(&file, rules)?;
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", pod.netns.name(), "nft", "-f"])
        .arg(&file)
        .output()
        .context("running nft (is nftables installed?)")?;
    let _ = std::fs::remove_file(&file);
    ensure!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn a_firewall_in_the_server_pod_tells_mesh_clients_apart() -> Result<()> {
    if !e2e_gate("a_firewall_in_the_server_pod_tells_mesh_clients_apart") {
        return Ok(());
    }
    let tb = Testbed::builder().nodes(2).pods_per_node(2).build()?;
    let _mesh = Mesh::start(&tb, &options(SourceAddress::Client))?;
    let server = tb.pod(1, 0);
    let _srv = servers(&tb, server)?;
    let (allowed, refused) = (tb.pod(0, 0), tb.pod(0, 1));
    let to = addr(server.ip4, HTTP_PORT);
    wait_peer(&tb, allowed, &to, allowed.ip4.into())?;
    admit_only(server, allowed.ip4.into(), HTTP_PORT)?;
    assert_eq!(peer_seen(&tb, allowed, &to)?, IpAddr::from(allowed.ip4));
    let out = tb.run(
        refused,
        &[
            "pod-app",
            "--timeout-ms",
            FAIL_TIMEOUT_MS,
            "http-get",
            "--to",
            &to,
        ],
        RUN_TIMEOUT,
    )?;
    ensure!(
        out.ok_json().is_err(),
        "the firewall admitted {} through the mesh",
        refused.name
    );
    // The same node's pods are told apart too.
    assert_eq!(peer_seen(&tb, allowed, &to)?, IpAddr::from(allowed.ip4));
    Ok(())
}

#[test]
fn strict_drops_a_pods_direct_plaintext_while_its_mesh_traffic_passes() -> Result<()> {
    if !e2e_gate("strict_drops_a_pods_direct_plaintext_while_its_mesh_traffic_passes") {
        return Ok(());
    }
    let tb = Testbed::builder().nodes(2).pods_per_node(2).build()?;
    let mut mesh = Mesh::start(
        &tb,
        &MeshOptions {
            control_plane: true,
            ..options(SourceAddress::Client)
        },
    )?;
    let server = tb.pod(1, 0);
    let _srv = servers(&tb, server)?;
    mesh.write_policy(
        "PeerAuthentication",
        NAMESPACE,
        "strict",
        json!({"mtls": {"mode": "STRICT"}}),
    )?;
    let server_cgroup = server.cgroup.to_string_lossy().into_owned();
    mesh.wait_config(1, Duration::from_secs(20), |d| {
        d["datapath"]["enrolled_cgroups"]
            .as_array()
            .is_some_and(|a| {
                a.iter()
                    .any(|c| c["path"] == server_cgroup.as_str() && c["inbound_mtls"] == "STRICT")
            })
    })?;
    for client in [tb.pod(0, 0), tb.pod(1, 1)] {
        let to = addr(server.ip4, HTTP_PORT);
        wait_peer(&tb, client, &to, client.ip4.into())?;
        // The same pod's SYN straight to the server (a raw socket, not redirected) is
        // dropped: only the 4-tuples the agent recorded are let in from its address.
        let raw = pod_app(&tb, client, &["raw-syn", "--to", &to])?;
        assert_eq!(raw["answer"], "none", "{}: {raw}", client.name);
        assert_eq!(peer_seen(&tb, client, &to)?, IpAddr::from(client.ip4));
    }
    let metrics = mesh.metrics(1)?;
    let event = |e: &str| metric_sum(&metrics, "trellis_datapath_events_total", &[("event", e)]);
    assert!(event("strict_dropped") >= 2.0);
    assert!(event("delivery_admitted") >= 2.0);
    Ok(())
}

/// Runs `many` from every client at once: (connections, failed, seconds, errors).
fn churn(tb: &Testbed, clients: &[&Pod], to: &str, per_client: usize) -> Result<(u64, u64, f64)> {
    let per_client = per_client.to_string();
    let started = Instant::now();
    let results: Vec<Result<Value>> = std::thread::scope(|scope| {
        let handles: Vec<_> = clients
            .iter()
            .map(|client| {
                let per_client = &per_client;
                scope.spawn(move || {
                    let out = tb.run(
                        *client,
                        &[
                            "pod-app",
                            "--timeout-ms",
                            CLIENT_TIMEOUT_MS,
                            "many",
                            "--to",
                            to,
                            "--connections",
                            per_client,
                            "--concurrency",
                            "48",
                            "--bytes",
                            "64",
                        ],
                        RUN_TIMEOUT,
                    )?;
                    out.json()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))
            })
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let (mut total, mut failed) = (0, 0);
    for result in results {
        let v = result?;
        total += v["connections"].as_u64().context("connections")?;
        let f = v["failed"].as_u64().context("failed")?;
        if f > 0 {
            eprintln!("churn errors: {}", v["errors"]);
        }
        failed += f;
    }
    Ok((total, failed, seconds))
}

fn churn_completes(source_address: SourceAddress) -> Result<()> {
    let tb = Testbed::builder().nodes(2).pods_per_node(4).build()?;
    let mesh = Mesh::start(&tb, &options(source_address))?;
    let server = tb.pod(1, 0);
    let _srv = servers(&tb, server)?;
    let clients = [tb.pod(0, 0), tb.pod(0, 1), tb.pod(0, 2), tb.pod(1, 1)];
    let to = addr(server.ip4, ECHO_PORT);
    if source_address == SourceAddress::Client {
        for client in clients {
            wait_peer(&tb, client, &addr(server.ip4, HTTP_PORT), client.ip4.into())?;
        }
    }
    let per_client: usize = std::env::var("CHURN_PER_CLIENT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6_000);
    let (total, failed, seconds) = churn(&tb, &clients, &to, per_client)?;
    eprintln!(
        "churn ({source_address:?}): {total} connections in {seconds:.1} s = {:.0}/s, {failed} failed",
        total as f64 / seconds
    );
    ensure!(failed == 0, "{failed} of {total} connections failed");
    let metrics = mesh.metrics(1)?;
    let unreachable = metric_sum(
        &metrics,
        "trellis_connection_failures_total",
        &[("reason", "upstream_unreachable")],
    );
    ensure!(
        unreachable == 0.0,
        "{unreachable} pod dials failed on node 1"
    );
    Ok(())
}

#[test]
fn short_connection_churn_to_one_pod_completes_from_client_addresses() -> Result<()> {
    if !e2e_gate("short_connection_churn_to_one_pod_completes_from_client_addresses") {
        return Ok(());
    }
    churn_completes(SourceAddress::Client)
}

#[test]
fn short_connection_churn_to_one_pod_completes_from_the_node_address() -> Result<()> {
    if !e2e_gate("short_connection_churn_to_one_pod_completes_from_the_node_address") {
        return Ok(());
    }
    churn_completes(SourceAddress::Node)
}

#[test]
fn many_concurrent_connections_and_a_large_transfer_arrive_intact() -> Result<()> {
    if !e2e_gate("many_concurrent_connections_and_a_large_transfer_arrive_intact") {
        return Ok(());
    }
    let tb = Testbed::builder().nodes(2).pods_per_node(2).build()?;
    let _mesh = Mesh::start(&tb, &options(SourceAddress::Client))?;
    let server = tb.pod(1, 0);
    let _srv = servers(&tb, server)?;
    let client = tb.pod(0, 0);
    wait_peer(&tb, client, &addr(server.ip4, HTTP_PORT), client.ip4.into())?;
    let v = pod_app(
        &tb,
        client,
        &[
            "many",
            "--to",
            &addr(server.ip4, ECHO_PORT),
            "--connections",
            "1000",
            "--bytes",
            "4K",
        ],
    )?;
    assert_eq!(v["ok"], 1000, "{v}");
    for (from, to) in [(client, server.ip4), (tb.pod(1, 1), server.ip4)] {
        let v = pod_app(
            &tb,
            from,
            &["send", "--to", &addr(to, SINK_PORT), "--bytes", "256M"],
        )?;
        assert_eq!(v["ok"], true, "{v}");
        let peer: SocketAddr = v["reply"]["peer"].as_str().context("sink peer")?.parse()?;
        assert_eq!(peer.ip(), IpAddr::from(from.ip4), "{v}");
    }
    Ok(())
}
