//! The agent's life cycle: SIGTERM drains open connections up to the deadline while refusing
//! new ones, and `--uninstall` detaches the datapath and removes every pin.

use std::time::{Duration, Instant};

use mesh_tests::{
    mesh::{Mesh, MeshOptions, metric_sum},
    testbed::{SpawnOptions, Testbed, e2e_gate},
};

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
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_drains_open_connections_and_refuses_new_ones() {
    if !e2e_gate("sigterm_drains_open_connections_and_refuses_new_ones") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(1)
        .build()
        .expect("testbed");
    let options = MeshOptions {
        drain_timeout_secs: 60,
        ..MeshOptions::default()
    };
    let mut mesh = Mesh::start(&tb, &options).expect("mesh");
    let _server = tb
        .spawn_server(tb.pod(1, 0), &["--listen", "0.0.0.0:9100=source"])
        .expect("server");

    // A long transfer through node 0's agent.
    let mut transfer = tb
        .spawn(
            tb.pod(0, 0),
            &[
                "pod-app",
                "--timeout-ms",
                "120000",
                "fetch",
                "--to",
                "10.200.1.10:9100",
                "--bytes",
                "2G",
            ],
            SpawnOptions::new().name("long-transfer"),
        )
        .expect("client");
    poll(
        Duration::from_secs(10),
        "the transfer to be proxied",
        || {
            let metrics = mesh.metrics(0).ok()?;
            (metric_sum(
                &metrics,
                "trellis_connections_active",
                &[("direction", "outbound")],
            ) >= 1.0)
                .then_some(())
        },
    );

    mesh.signal_agent_stop(0).expect("SIGTERM");
    poll(
        Duration::from_secs(10),
        "the agent to start draining",
        || {
            mesh.agent_log_text(0)
                .contains("draining connections")
                .then_some(())
        },
    );

    // New connections are refused while draining (and never bypass the mesh).
    let refused = tb
        .run(
            tb.pod(0, 0),
            &[
                "pod-app",
                "--timeout-ms",
                "5000",
                "peername",
                "--to",
                "10.200.1.10:9100",
            ],
            Duration::from_secs(10),
        )
        .expect("run");
    assert!(
        !refused.success(),
        "a new connection succeeded during drain: {}",
        refused.stdout
    );

    // The open transfer completes intact.
    let status = transfer
        .wait_timeout(Duration::from_secs(100))
        .expect("wait")
        .expect("transfer finished");
    let result: serde_json::Value =
        serde_json::from_str(transfer.stdout_text().trim()).expect("client output");
    assert!(status.success(), "transfer failed: {result}");
    assert_eq!(result["received"], 2u64 << 30);
    assert_eq!(result["sha256"], result["expected_sha256"]);
    assert!(
        mesh.wait_agent_exit(0, Duration::from_secs(30))
            .expect("agent exits after the drain"),
        "agent exited with an error:\n{}",
        mesh.agent_log_text(0)
    );
    assert!(
        !mesh.agent_log_text(0).contains("drain deadline reached"),
        "the transfer was cut by the deadline"
    );
}

#[test]
fn uninstall_detaches_the_datapath_and_removes_every_pin() {
    if !e2e_gate("uninstall_detaches_the_datapath_and_removes_every_pin") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(1)
        .build()
        .expect("testbed");
    // The test tells a mesh connection by the node's address at the server.
    let options = MeshOptions {
        source_address: mesh_node::config::SourceAddress::Node,
        ..MeshOptions::default()
    };
    let mut mesh = Mesh::start(&tb, &options).expect("mesh");
    let _server = tb
        .spawn_server(tb.pod(1, 0), &["--listen", "0.0.0.0:8080=http"])
        .expect("server");
    let get = || {
        tb.run(
            tb.pod(0, 0),
            &["pod-app", "http-get", "--to", "10.200.1.10:8080"],
            Duration::from_secs(20),
        )
        .expect("run")
        .ok_json()
        .expect("request succeeds")
    };
    // Meshed: the destination agent dials the pod, from node 1's gateway address.
    assert_eq!(
        get()["body"]["peer"]
            .as_str()
            .and_then(|p| p.split(':').next()),
        Some("10.200.1.1")
    );

    mesh.kill_agent(0);
    let config = mesh.config_path(0).to_string_lossy().into_owned();
    tb.run(
        tb.node(0),
        &["mesh-node", "agent", "--config", &config, "--uninstall"],
        Duration::from_secs(20),
    )
    .expect("run")
    .check()
    .expect("uninstall succeeds");
    // Whatever the layout version, nothing may be left under the pin directory.
    let pins = tb.node(0).bpf_pin_dir();
    let left: Vec<_> = std::fs::read_dir(pins)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "pins left behind: {left:?}");

    // No program is attached any more: the pod reaches the server directly, from its own address.
    assert_eq!(
        get()["body"]["peer"]
            .as_str()
            .and_then(|p| p.split(':').next()),
        Some("10.200.0.10")
    );
}
