//! Istio's labels on the control-plane testbed: with the controller's
//! `compatibility.istio_labels` switch on, `istio.io/dataplane-mode=ambient` meshes a namespace
//! (traffic proven to travel HBONE with the client's identity), `=none` takes a pod out, a
//! Trellis label on the same pod wins, and `istio.io/use-waypoint` sends a Service's traffic
//! through a Gateway of class `istio-waypoint`. With the switch off, the same labels mean
//! nothing to Trellis (the pods stay out, as they would beside Istio).
//!
//! How a connection travelled is read from the peer the server saw (see `control_plane.rs`):
//! through HBONE the destination agent dials the pod from its node's pod gateway address;
//! outside the mesh the client's own address arrives.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use mesh_tests::{
    mesh::{MESH_LABEL, Mesh, MeshOptions, NAMESPACE, metric_sum, spiffe_id},
    testbed::{Pod, Testbed, e2e_gate},
};
use serde_json::Value;

const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
const ISTIO_USE_WAYPOINT: &str = "istio.io/use-waypoint";
const CONVERGE: Duration = Duration::from_secs(20);

fn testbed(pods_per_node: usize) -> Testbed {
    Testbed::builder()
        .nodes(2)
        .pods_per_node(pods_per_node)
        .build()
        .expect("testbed")
}

fn mesh(tb: &Testbed, istio_labels: bool) -> Mesh<'_> {
    Mesh::start(
        tb,
        &MeshOptions {
            control_plane: true,
            istio_labels,
            // The tests tell a mesh connection by the node's address at the server.
            source_address: mesh_node::config::SourceAddress::Node,
            ..MeshOptions::default()
        },
    )
    .expect("mesh")
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

/// One GET from `client` to `server:8080`: the local address and the peer the server saw.
fn get(tb: &Testbed, client: &Pod, server: &Pod) -> (String, IpAddr) {
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
    let peer = r["body"]["peer"]
        .as_str()
        .and_then(|p| p.parse::<SocketAddr>().ok())
        .expect("peer")
        .ip();
    (r["local"].as_str().expect("local").to_owned(), peer)
}

/// A GET that the server received over HBONE, from the client's identity (mutual TLS).
fn assert_meshed(tb: &Testbed, mesh: &Mesh<'_>, client: &Pod, server: &Pod) {
    let (local, peer) = get(tb, client, server);
    assert_eq!(
        peer,
        IpAddr::from(tb.node(server.node).gateway_ip4),
        "delivered by the destination agent"
    );
    let inbound = mesh
        .wait_access(server.node, CONVERGE, |e| {
            e["direction"] == "inbound" && e["src_addr"] == local.as_str()
        })
        .expect("the destination agent handled the connection");
    assert_eq!(inbound["src_identity"], spiffe_id(client).as_str());
}

/// A GET that reached the server straight from the client pod, outside the mesh.
fn assert_direct(tb: &Testbed, client: &Pod, server: &Pod) {
    let (_, peer) = get(tb, client, server);
    assert_eq!(peer, IpAddr::from(client.ip4), "not redirected");
}

#[test]
fn istio_dataplane_mode_meshes_a_namespace_when_the_switch_is_on() {
    if !e2e_gate("istio_dataplane_mode_meshes_a_namespace_when_the_switch_is_on") {
        return;
    }
    let tb = testbed(1);
    let mut mesh = mesh(&tb, true);
    let (client, server) = (tb.pod(0, 0), tb.pod(1, 0));
    let _server = tb
        .spawn_server(server, &["--listen", "0.0.0.0:8080=http"])
        .expect("server");

    // Istio's `none` alone on the namespace: out (and the agents have followed the feed).
    mesh.set_namespace(NAMESPACE, &[(DATAPLANE_MODE, "none")])
        .expect("namespace");
    for node in 0..2 {
        mesh.wait_config(node, CONVERGE, |d| enrolled_count(d) == 0)
            .expect("nothing enrolled");
    }
    assert_direct(&tb, client, server);

    // Istio's `ambient` alone: in, over mutual TLS.
    mesh.set_namespace(NAMESPACE, &[(DATAPLANE_MODE, "ambient")])
        .expect("namespace");
    mesh.wait_config(0, CONVERGE, |d| enrolled(d, client))
        .expect("client enrolled");
    mesh.wait_config(1, CONVERGE, |d| enrolled(d, server))
        .expect("server enrolled");
    assert_meshed(&tb, &mesh, client, server);

    // The pod's own `none` beats its namespace's `ambient`.
    mesh.set_pod_label(client, DATAPLANE_MODE, Some("none"))
        .expect("pod label");
    mesh.wait_config(0, CONVERGE, |d| !enrolled(d, client))
        .expect("client out");
    assert_direct(&tb, client, server);

    // A Trellis label on the same pod wins over Istio's.
    mesh.set_pod_label(client, MESH_LABEL, Some("enabled"))
        .expect("pod label");
    mesh.wait_config(0, CONVERGE, |d| enrolled(d, client))
        .expect("client back in");
    assert_meshed(&tb, &mesh, client, server);

    // And on the namespace too: Trellis's `disabled` beats Istio's `ambient`.
    mesh.set_namespace(
        NAMESPACE,
        &[(DATAPLANE_MODE, "ambient"), (MESH_LABEL, "disabled")],
    )
    .expect("namespace");
    for node in 0..2 {
        mesh.wait_config(node, CONVERGE, |d| enrolled_count(d) == 0)
            .expect("nothing enrolled");
    }
    assert_direct(&tb, client, server);
}

#[test]
fn istio_labels_mean_nothing_when_the_switch_is_off() {
    if !e2e_gate("istio_labels_mean_nothing_when_the_switch_is_off") {
        return;
    }
    let tb = testbed(1);
    let mut mesh = mesh(&tb, false);
    let (client, server) = (tb.pod(0, 0), tb.pod(1, 0));
    let _server = tb
        .spawn_server(server, &["--listen", "0.0.0.0:8080=http"])
        .expect("server");
    // Meshed by Trellis's label first, so the change below is seen to arrive.
    mesh.wait_config(0, CONVERGE, |d| enrolled(d, client))
        .expect("client enrolled");
    assert_meshed(&tb, &mesh, client, server);

    mesh.set_namespace(NAMESPACE, &[(DATAPLANE_MODE, "ambient")])
        .expect("namespace");
    mesh.set_pod_label(client, DATAPLANE_MODE, Some("ambient"))
        .expect("pod label");
    for node in 0..2 {
        mesh.wait_config(node, CONVERGE, |d| enrolled_count(d) == 0)
            .expect("Istio's ambient pods are left to Istio");
    }
    assert_direct(&tb, client, server);
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const SERVICE: &str = "web";
const SERVICE_HOSTNAME: &str = "web.default.svc.cluster.local";
const WAYPOINT: &str = "istio-wp";

#[test]
fn istio_use_waypoint_sends_a_service_through_an_istio_waypoint() {
    if !e2e_gate("istio_use_waypoint_sends_a_service_through_an_istio_waypoint") {
        return;
    }
    let tb = testbed(2);
    let mut mesh = mesh(&tb, true);
    let client = tb.pod(0, 0);
    let backend = tb.pod(1, 0);
    let _server = tb
        .spawn_server(
            backend,
            &["--listen", "0.0.0.0:8080=http", "--name", &backend.name],
        )
        .expect("server");
    mesh.set_namespace(NAMESPACE, &[(DATAPLANE_MODE, "ambient")])
        .expect("namespace");
    mesh.write_service(
        SERVICE,
        &[VIP.into()],
        &[(80, 8080)],
        &[(backend, true)],
        None,
    )
    .expect("service");
    let waypoint = mesh
        .start_waypoint_of_class(WAYPOINT, tb.pod(0, 1), "istio-waypoint", "")
        .expect("waypoint starts");
    mesh.set_namespace(
        NAMESPACE,
        &[(DATAPLANE_MODE, "ambient"), (ISTIO_USE_WAYPOINT, WAYPOINT)],
    )
    .expect("namespace");
    let expected = format!("{NAMESPACE}/{WAYPOINT}");
    mesh.wait_config(0, CONVERGE, |dump| {
        dump["services"].as_array().is_some_and(|services| {
            services
                .iter()
                .any(|s| s["name"] == SERVICE && s["waypoint"] == expected.as_str())
        })
    })
    .expect("the Service goes through the istio-waypoint Gateway");

    let vip = SocketAddr::from((VIP, 80));
    const N: usize = 5;
    for i in 0..N {
        let answered = tb.get_server_name(client, vip, None).unwrap_or_else(|e| {
            panic!(
                "request {i} through the waypoint failed: {e}\nwaypoint log:\n{}",
                waypoint.log_text()
            )
        });
        assert_eq!(answered, backend.name);
    }
    mesh.wait_access(0, CONVERGE, |e| {
        e["direction"] == "outbound"
            && e["path"] == "waypoint"
            && e["dst_service"] == SERVICE_HOSTNAME
    })
    .expect("the client's agent logs the waypoint path");
    let metrics = waypoint.metrics().expect("waypoint metrics");
    let counted = metric_sum(
        &metrics,
        "istio_requests_total",
        &[
            ("reporter", "waypoint"),
            ("destination_service", SERVICE_HOSTNAME),
            ("response_code", "200"),
        ],
    );
    assert_eq!(counted, N as f64, "every request crossed the waypoint");
}
