//! Waypoints: the L7 proxy of the destinations that opt in with `trellis.dev/use-waypoint`.
//!
//! The client's node agent sends a connection for an opted-in Service to the waypoint's pod
//! over HBONE (the Service's VIP as CONNECT authority); the waypoint parses each HTTP request,
//! picks an endpoint and sends it over HBONE, as its own identity, to the endpoint's node.
//! Everything runs for real: eBPF redirection, the agents, the controller, the waypoint
//! process in a testbed pod, mutual TLS on both legs.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use mesh_tests::{
    mesh::{
        Mesh, MeshOptions, NAMESPACE, metric_sum,
        waypoint::{USE_WAYPOINT_LABEL, Waypoint},
    },
    testbed::{Pod, Server, Testbed, e2e_gate},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const SERVICE: &str = "web";
const SERVICE_HOSTNAME: &str = "web.default.svc.cluster.local";
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
const WAYPOINT: &str = "waypoint";
const N: usize = 20;
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

/// Requests the waypoint counted for the service with `code`.
fn waypoint_requests(waypoint: &Waypoint<'_>, code: &str) -> f64 {
    let metrics = waypoint.metrics().expect("waypoint metrics");
    metric_sum(
        &metrics,
        "istio_requests_total",
        &[
            ("reporter", "waypoint"),
            ("destination_service", SERVICE_HOSTNAME),
            ("response_code", code),
        ],
    )
}

/// Waits (bounded) until node `node` sends Service `web` through `waypoint` (`Some`) or
/// directly (`None`).
fn wait_service_waypoint(mesh: &Mesh<'_>, node: usize, waypoint: Option<&str>) {
    let expected = waypoint.map(|w| format!("{NAMESPACE}/{w}"));
    mesh.wait_config(node, WAIT, |dump| {
        dump["services"].as_array().is_some_and(|services| {
            services.iter().any(|s| {
                s["name"] == SERVICE
                    && s["waypoint"].as_str().map(str::to_owned) == expected
                    && (expected.is_none()
                        || dump["waypoints"]
                            .as_array()
                            .is_some_and(|w| w.iter().any(|w| w["name"] == WAYPOINT)))
            })
        })
    })
    .expect("service waypoint in the config dump");
}

#[test]
fn service_traffic_goes_through_the_waypoint_once_the_namespace_opts_in() {
    if !e2e_gate("service_traffic_goes_through_the_waypoint_once_the_namespace_opts_in") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(3)
        .build()
        .expect("testbed");
    let mut mesh = start(&tb);
    let client = tb.pod(0, 0);
    let backends = [tb.pod(1, 0), tb.pod(1, 1)];
    let _servers: Vec<Server> = backends.iter().map(|p| serve(&tb, p)).collect();
    mesh.write_service(
        SERVICE,
        &[VIP.into()],
        &[(SERVICE_PORT, TARGET_PORT)],
        &backends.map(|p| (p, true)),
        None,
    )
    .expect("service");
    let waypoint = mesh
        .start_waypoint(WAYPOINT, tb.pod(0, 2))
        .expect("waypoint starts");
    let vip = SocketAddr::from((VIP, SERVICE_PORT));

    // Not opted in: straight to the endpoints; the waypoint sees nothing.
    mesh.wait_service(0, SERVICE, 2, WAIT).expect("service");
    for _ in 0..3 {
        tb.get_server_name(client, vip, None).expect("direct GET");
    }
    assert_eq!(waypoint_requests(&waypoint, "200"), 0.0);

    // The namespace opts in: every request now crosses the waypoint and still reaches a
    // backend, over mutual TLS on both legs.
    mesh.set_namespace_label(NAMESPACE, USE_WAYPOINT_LABEL, Some(WAYPOINT))
        .expect("label namespace");
    wait_service_waypoint(&mesh, 0, Some(WAYPOINT));
    let mut answered = std::collections::BTreeSet::new();
    for i in 0..N {
        match tb.get_server_name(client, vip, None) {
            Ok(server) => {
                answered.insert(server);
            }
            Err(e) => panic!(
                "request {i} through the waypoint failed: {e}\nwaypoint log:\n{}\nagent 0 log:\n{}",
                waypoint.log_text(),
                mesh.agent_log_text(0)
            ),
        }
    }
    let expected: std::collections::BTreeSet<String> =
        backends.iter().map(|p| p.name.clone()).collect();
    assert_eq!(
        answered, expected,
        "both endpoints serve through the waypoint"
    );
    assert_eq!(waypoint_requests(&waypoint, "200"), N as f64);

    // The client's agent tunnelled to the waypoint; the endpoints' agent saw the waypoint's
    // identity (it dials as itself), and the waypoint logged each request.
    let waypoint_identity = format!(
        "spiffe://cluster.local/ns/{NAMESPACE}/sa/{}",
        mesh_tests::mesh::service_account(tb.pod(0, 2))
    );
    mesh.wait_access(0, WAIT, |e| {
        e["direction"] == "outbound"
            && e["path"] == "waypoint"
            && e["dst_service"] == SERVICE_HOSTNAME
    })
    .expect("the client's agent logs the waypoint path");
    mesh.wait_access(1, WAIT, |e| {
        e["direction"] == "inbound" && e["src_identity"] == waypoint_identity.as_str()
    })
    .expect("the endpoints' agent sees the waypoint's identity");
    let logged = waypoint
        .access_log()
        .iter()
        .filter(|e| e["status"] == 200 && e["method"] == "GET")
        .count();
    assert!(logged >= N, "waypoint access log has {logged} requests");

    // Opting out again takes the waypoint off the path.
    mesh.set_namespace_label(NAMESPACE, USE_WAYPOINT_LABEL, None)
        .expect("unlabel namespace");
    wait_service_waypoint(&mesh, 0, None);
    for _ in 0..3 {
        tb.get_server_name(client, vip, None).expect("direct GET");
    }
    assert_eq!(waypoint_requests(&waypoint, "200"), N as f64);
}

#[test]
fn a_pod_behind_a_waypoint_takes_connections_through_it_only() {
    if !e2e_gate("a_pod_behind_a_waypoint_takes_connections_through_it_only") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(3)
        .external(true)
        .build()
        .expect("testbed");
    // pod-0-1 is outside the mesh: it can only speak plaintext.
    let mut mesh = Mesh::start(
        &tb,
        &MeshOptions {
            control_plane: true,
            unenrolled: vec![(0, 1)],
            ..Default::default()
        },
    )
    .expect("mesh");
    let (client, plain) = (tb.pod(0, 0), tb.pod(0, 1));
    let backend = tb.pod(1, 0);
    let _server = serve(&tb, backend);
    mesh.write_service(
        SERVICE,
        &[VIP.into()],
        &[(SERVICE_PORT, TARGET_PORT)],
        &[(backend, true)],
        None,
    )
    .expect("service");
    let waypoint = mesh
        .start_waypoint(WAYPOINT, tb.pod(0, 2))
        .expect("waypoint starts");
    let direct = SocketAddr::from((backend.ip4, TARGET_PORT));
    let external = tb.external().expect("external host");
    let short = Some(Duration::from_millis(1500));
    mesh.wait_service(0, SERVICE, 1, WAIT).expect("service");
    assert_eq!(
        tb.get_server_name(plain, direct, short).as_deref(),
        Ok(backend.name.as_str()),
        "without a waypoint, plaintext reaches the PERMISSIVE pod"
    );

    // The Service gets a waypoint: its endpoint now takes connections through it only.
    mesh.set_namespace_label(NAMESPACE, USE_WAYPOINT_LABEL, Some(WAYPOINT))
        .expect("label namespace");
    wait_service_waypoint(&mesh, 1, Some(WAYPOINT));
    let backend_cgroup = backend.cgroup.to_string_lossy().into_owned();
    mesh.wait_config(1, WAIT, |d| {
        d["datapath"]["enrolled_cgroups"]
            .as_array()
            .is_some_and(|a| {
                a.iter()
                    .any(|c| c["path"] == backend_cgroup.as_str() && c["inbound_mtls"] == "STRICT")
            })
    })
    .expect("node 1 refuses plaintext to the waypoint's endpoint");

    // A meshed client dialling the pod's own address is sent through the waypoint too.
    let through_waypoint = |mesh: &Mesh<'_>| {
        mesh.access_log(0)
            .iter()
            .filter(|e| e["direction"] == "outbound" && e["path"] == "waypoint")
            .count()
    };
    let (before, served_before) = (through_waypoint(&mesh), waypoint.access_log().len());
    assert_eq!(
        tb.get_server_name(client, direct, None).as_deref(),
        Ok(backend.name.as_str())
    );
    let deadline = std::time::Instant::now() + WAIT;
    while through_waypoint(&mesh) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the client's agent took the waypoint path for the pod address"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        waypoint.access_log().len() > served_before,
        "the waypoint served the pod-addressed request"
    );

    // Plaintext, from a pod outside the mesh or a host off the mesh, never reaches it.
    for (who, result) in [
        ("unenrolled pod", tb.get_server_name(plain, direct, short)),
        ("external host", tb.get_server_name(external, direct, short)),
    ] {
        let error = result.expect_err(who);
        assert!(
            error.contains("timed out"),
            "{who}: dropped, not answered: {error}"
        );
    }

    // HBONE straight to the pod's node, with a valid mesh identity that is not the waypoint's,
    // is refused before anything is dialled.
    let status = direct_hbone(&mesh, &tb, client, backend).expect("HBONE exchange");
    assert_eq!(status, 401, "a CONNECT that skips the waypoint is refused");
    mesh.wait_access(1, WAIT, |e| {
        e["error"]
            .as_str()
            .is_some_and(|s| s.starts_with("401 waypoint_bypass"))
    })
    .expect("node 1 logs the bypass");

    // explain says so, and names the waypoint; from the waypoint's identity it allows.
    let explain = |from: &str| {
        let to = format!("{NAMESPACE}/{}:{TARGET_PORT}", backend.name);
        mesh.explain(1, from, &to).expect("explain")
    };
    let bypass = explain(&format!("{NAMESPACE}/{}", client.name));
    assert_eq!(bypass["verdict"], "deny", "{bypass:#}");
    assert_eq!(
        bypass["waypoints"],
        serde_json::json!([format!("{NAMESPACE}/{WAYPOINT}")]),
        "{bypass:#}"
    );
    let plaintext = explain(&external.ip4.to_string());
    assert_eq!(plaintext["verdict"], "deny", "{plaintext:#}");

    // The pod opts out explicitly: plaintext gets in again.
    mesh.write_pod(
        backend,
        NAMESPACE,
        &[("trellis.dev/waypoint-enforcement", "disabled")],
    )
    .expect("opt out");
    let deadline = std::time::Instant::now() + WAIT;
    while tb.get_server_name(plain, direct, short).as_deref() != Ok(backend.name.as_str()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the opted-out pod takes plaintext again"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Opens HBONE from node 0's namespace to `target`'s node as `caller`'s identity (a
/// certificate from the mesh's own CA), asks for `target:8080` and returns the status.
fn direct_hbone(mesh: &Mesh<'_>, tb: &Testbed, caller: &Pod, target: &Pod) -> anyhow::Result<u16> {
    use mesh_node::{
        identity::{Identity, LocalCa},
        tls,
    };
    let ca = LocalCa::load(&mesh.ca_dir.join("ca.pem"), &mesh.ca_dir.join("ca-key.pem"))?;
    let trust_domain = mesh_tests::mesh::TRUST_DOMAIN;
    let identity = |pod: &Pod| {
        Identity::new(
            trust_domain,
            NAMESPACE,
            &mesh_tests::mesh::service_account(pod),
        )
    };
    let issued = ca.issue(&identity(caller)?, Duration::from_hours(1))?;
    let roots = Arc::new(tls::root_store(ca.cert_der())?);
    let config = Arc::new(tls::client_config(
        tls::provider(),
        roots,
        trust_domain,
        issued.chain,
        issued.key,
    )?);
    let name = rustls_pki_types::ServerName::try_from(identity(target)?.to_sni())?;
    let hbone = SocketAddr::from((tb.node(target.node).lan_ip4, mesh_tests::mesh::HBONE_PORT));
    let authority = SocketAddr::from((target.ip4, TARGET_PORT)).to_string();
    tb.node(0).netns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let exchange = async move {
            let tcp = tokio::net::TcpStream::connect(hbone).await?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            let (client, connection) = h2::client::handshake(tls).await?;
            tokio::spawn(connection);
            let request = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(authority)
                .body(())?;
            let (response, _send) = client.ready().await?.send_request(request, false)?;
            Ok::<_, anyhow::Error>(response.await?.status().as_u16())
        };
        rt.block_on(async move { tokio::time::timeout(WAIT, exchange).await })?
    })?
}
