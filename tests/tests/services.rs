//! Service virtual IPs, resolved by the source pod's agent (no kube-proxy on the path).
//!
//! A client pod dials a Service's VIP; its node's agent picks a ready endpoint (round robin,
//! or this node first when the Service asks for `PreferClose`) and reaches it like any pod: a
//! local pod directly, a pod on the other node over HBONE. When an endpoint's server dies
//! before Kubernetes marks it unready (here: the manifests keep it `ready`), a connect to it
//! fails and the agent moves to the next endpoint, so new connections still succeed.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use mesh_tests::{
    mesh::{Mesh, MeshOptions, metric_sum},
    testbed::{Pod, Server, Testbed, e2e_gate},
};

/// Virtual IPs from a range nothing else on the testbed uses.
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const SERVICE: &str = "web";
/// How Istio (and Trellis's telemetry) names the service.
const SERVICE_HOSTNAME: &str = "web.default.svc.cluster.local";
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
/// Connections per round.
const N: usize = 40;
const WAIT: Duration = Duration::from_secs(20);

fn start(tb: &Testbed) -> Mesh<'_> {
    Mesh::start(
        tb,
        &MeshOptions {
            control_plane: true,
            ..Default::default()
        },
    )
    .expect("mesh")
}

/// An HTTP server on `pod:8080` that answers with the pod's name.
fn serve(tb: &Testbed, pod: &Pod) -> Server {
    tb.spawn_server(
        pod,
        &[
            "--listen",
            &format!("0.0.0.0:{TARGET_PORT}=http"),
            "--name",
            &pod.name,
        ],
    )
    .expect("server")
}

/// One GET from `client` to `to`: the name of the server that answered, or the failure.
fn get(tb: &Testbed, client: &Pod, to: SocketAddr) -> Result<String, String> {
    tb.get_server_name(client, to, None)
}

/// `n` GETs to `to`, each of which must succeed; how many each server answered.
fn round(tb: &Testbed, client: &Pod, to: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut answered = BTreeMap::new();
    for i in 0..n {
        match get(tb, client, to) {
            Ok(server) => *answered.entry(server).or_insert(0) += 1,
            Err(e) => panic!("connection {i} of {n} to {to} failed: {e}"),
        }
    }
    eprintln!("{n} connections to {to} answered by {answered:?}");
    answered
}

/// Agent log lines of `node` saying a service endpoint failed and a later one was used.
fn retries_via(mesh: &Mesh<'_>, node: usize, endpoint: SocketAddr) -> usize {
    mesh.agent_log_text(node)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["message"] == "service endpoint did not connect; a later one did"
                && v["service"] == SERVICE_HOSTNAME
                && v["endpoint"] == endpoint.to_string().as_str()
        })
        .count()
}

#[test]
fn service_traffic_spreads_over_both_nodes_and_survives_dead_endpoints() {
    if !e2e_gate("service_traffic_spreads_over_both_nodes_and_survives_dead_endpoints") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(3)
        .build()
        .expect("testbed");
    let mut mesh = start(&tb);
    let client = tb.pod(0, 0);
    let backends = [tb.pod(0, 1), tb.pod(0, 2), tb.pod(1, 0), tb.pod(1, 1)];
    let mut servers: BTreeMap<String, Server> = backends
        .iter()
        .map(|pod| (pod.name.clone(), serve(&tb, pod)))
        .collect();
    let endpoints: Vec<(&Pod, bool)> = backends.iter().map(|p| (*p, true)).collect();
    mesh.write_service(
        SERVICE,
        &[VIP4.into(), VIP6.into()],
        &[(SERVICE_PORT, TARGET_PORT)],
        &endpoints,
        None,
    )
    .expect("service manifest");
    let dumped = mesh
        .wait_service(0, SERVICE, backends.len(), WAIT)
        .expect("node 0 has the service");
    assert_eq!(dumped["ports"][0]["target_port"], TARGET_PORT);

    // Every connection succeeds, and round robin gives every endpoint, on both nodes, a share.
    let vip = SocketAddr::from((VIP4, SERVICE_PORT));
    let answered = round(&tb, client, vip, N);
    for pod in backends {
        let got = answered.get(&pod.name).copied().unwrap_or(0);
        assert!(
            got >= N / backends.len() / 2,
            "{} answered {got} of {N}: not spread ({answered:?})",
            pod.name
        );
    }

    // The access log and the metrics name the service and the endpoint.
    let event = mesh
        .wait_access(0, WAIT, |e| {
            e["direction"] == "outbound" && e["dst_service"] == SERVICE_HOSTNAME
        })
        .expect("access log names the service");
    let remote = SocketAddr::new(tb.pod(1, 0).ip4.into(), TARGET_PORT);
    assert!(
        mesh.access_log(0)
            .iter()
            .any(|e| e["dst_service"] == SERVICE_HOSTNAME
                && e["dst_addr"] == remote.to_string().as_str()
                && e["path"] == "hbone"
                && e["dst_workload"] == format!("default/{}", tb.pod(1, 0).name).as_str()),
        "no access log event for the remote endpoint {remote}; e.g. {event}"
    );
    let metrics = mesh.metrics(0).expect("metrics");
    let opened = metric_sum(
        &metrics,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("destination_service", SERVICE_HOSTNAME),
        ],
    );
    assert!(opened >= N as f64, "opened {opened}:\n{metrics}");

    // An endpoint on the other node dies; Kubernetes has not noticed (still ready). Its agent
    // answers the CONNECT with 503 and the client's agent moves on.
    let dead_remote = tb.pod(1, 0);
    servers
        .get_mut(&dead_remote.name)
        .expect("server")
        .kill()
        .expect("kill remote server");
    let answered = round(&tb, client, vip, N);
    assert!(!answered.contains_key(&dead_remote.name), "{answered:?}");
    assert!(
        retries_via(
            &mesh,
            0,
            SocketAddr::new(dead_remote.ip4.into(), TARGET_PORT)
        ) > 0,
        "the dead endpoint was never tried, so nothing was retried:\n{}",
        mesh.agent_log_text(0)
    );

    // A local one dies too: its connect is refused, and again the next endpoint serves.
    let dead_local = tb.pod(0, 1);
    servers
        .get_mut(&dead_local.name)
        .expect("server")
        .kill()
        .expect("kill local server");
    let answered = round(&tb, client, vip, N);
    assert!(!answered.contains_key(&dead_local.name), "{answered:?}");
    assert!(
        answered.contains_key(&tb.pod(0, 2).name) && answered.contains_key(&tb.pod(1, 1).name),
        "both live endpoints serve: {answered:?}"
    );
    assert!(
        retries_via(
            &mesh,
            0,
            SocketAddr::new(dead_local.ip4.into(), TARGET_PORT)
        ) > 0,
        "the dead local endpoint was never tried:\n{}",
        mesh.agent_log_text(0)
    );
    let failures = metric_sum(
        &mesh.metrics(0).expect("metrics"),
        "trellis_connection_failures_total",
        &[("reason", "endpoints_unreachable")],
    );
    assert_eq!(failures, 0.0, "no connection ran out of endpoints");

    // The IPv6 VIP names the same service.
    let server = get(&tb, client, SocketAddr::from((VIP6, SERVICE_PORT))).expect("IPv6 VIP");
    assert!(
        [tb.pod(0, 2).name.as_str(), tb.pod(1, 1).name.as_str()].contains(&server.as_str()),
        "{server}"
    );

    // A port the service does not define is reset, logged and counted.
    let undefined = SocketAddr::from((VIP4, 81));
    let refused = get(&tb, client, undefined);
    assert!(refused.is_err(), "port 81 answered: {refused:?}");
    mesh.wait_access(0, WAIT, |e| {
        e["dst_service"] == SERVICE_HOSTNAME
            && e["dst_addr"] == undefined.to_string().as_str()
            && e["error"]
                .as_str()
                .is_some_and(|m| m.contains("defines no TCP port 81"))
    })
    .expect("access log explains the reset");
    let counted = metric_sum(
        &mesh.metrics(0).expect("metrics"),
        "trellis_connection_failures_total",
        &[
            ("direction", "outbound"),
            ("reason", "unknown_service_port"),
        ],
    );
    assert_eq!(counted, 1.0);

    // The service leaves: its VIP is no longer served by anyone.
    mesh.delete_service(SERVICE).expect("delete service");
    mesh.wait_config(0, WAIT, |d| {
        d["services"]
            .as_array()
            .is_some_and(std::vec::Vec::is_empty)
    })
    .expect("service removed");
    assert!(get(&tb, client, vip).is_err());
}

#[test]
fn prefer_close_keeps_service_traffic_on_the_node_until_its_endpoint_fails() {
    if !e2e_gate("prefer_close_keeps_service_traffic_on_the_node_until_its_endpoint_fails") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(2)
        .build()
        .expect("testbed");
    let mut mesh = start(&tb);
    let client = tb.pod(0, 0);
    let local = tb.pod(0, 1);
    let remotes = [tb.pod(1, 0), tb.pod(1, 1)];
    let mut local_server = serve(&tb, local);
    let _remote_servers: Vec<Server> = remotes.iter().map(|p| serve(&tb, p)).collect();
    mesh.write_service(
        SERVICE,
        &[IpAddr::V4(VIP4)],
        &[(SERVICE_PORT, TARGET_PORT)],
        &[(local, true), (remotes[0], true), (remotes[1], true)],
        Some("PreferClose"),
    )
    .expect("service manifest");
    let dumped = mesh
        .wait_service(0, SERVICE, 3, WAIT)
        .expect("node 0 has the service");
    assert_eq!(dumped["prefer_close"], true);

    let vip = SocketAddr::from((VIP4, SERVICE_PORT));
    let answered = round(&tb, client, vip, N / 4);
    assert_eq!(
        answered.keys().collect::<Vec<_>>(),
        [&local.name],
        "only the endpoint on the client's node serves"
    );

    // The local endpoint dies: the other node's endpoints take over, both of them.
    local_server.kill().expect("kill local server");
    let answered = round(&tb, client, vip, N / 4);
    let mut expected: Vec<&String> = remotes.iter().map(|p| &p.name).collect();
    expected.sort();
    assert_eq!(
        answered.keys().collect::<Vec<_>>(),
        expected,
        "{answered:?}"
    );
}
