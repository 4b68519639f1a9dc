//! Temporary smoke test of the control plane mode of the mesh harness.
use std::time::Duration;

use mesh_tests::{
    mesh::{MESH_LABEL, Mesh, MeshOptions},
    testbed::{Testbed, e2e_gate},
};

#[test]
fn control_plane_smoke() {
    if !e2e_gate("control_plane_smoke") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(2)
        .build()
        .expect("testbed");
    let mut mesh = Mesh::start(
        &tb,
        &MeshOptions {
            control_plane: true,
            unenrolled: vec![(0, 1)],
            ..Default::default()
        },
    )
    .expect("mesh");
    let _server = tb
        .spawn_server(
            tb.pod(1, 0),
            &["--listen", "0.0.0.0:8080=http", "--name", "server"],
        )
        .expect("server");
    let get = |pod| {
        tb.run(
            pod,
            &["pod-app", "http-get", "--to", "10.200.1.10:8080"],
            Duration::from_secs(20),
        )
        .expect("run")
        .ok_json()
        .expect("request succeeds")
    };
    let dump = mesh.config_dump(0).expect("dump");
    eprintln!("{}", serde_json::to_string_pretty(&dump).expect("json"));
    let r = get(tb.pod(0, 0));
    let local = r["local"].as_str().expect("local address").to_owned();
    let ev = mesh
        .wait_access(0, Duration::from_secs(5), |e| {
            e["direction"] == "outbound" && e["src_addr"] == local.as_str()
        })
        .expect("meshed");
    assert_eq!(ev["path"], "hbone");
    // pod-0-1 is disabled: not redirected.
    let r = get(tb.pod(0, 1));
    let local1 = r["local"].as_str().expect("local address").to_owned();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        mesh.access_log(0)
            .iter()
            .all(|e| e["src_addr"] != local1.as_str())
    );
    // Enroll pod-0-1 live.
    mesh.set_pod_label(tb.pod(0, 1), MESH_LABEL, None)
        .expect("relabel");
    mesh.wait_config(0, Duration::from_secs(15), |d| {
        d["datapath"]["enrolled_cgroups"]
            .as_array()
            .map(|a| a.len())
            == Some(2)
            && d["certificates"].as_array().map(|a| a.len()) == Some(2)
    })
    .expect("enrolled");
    let r = get(tb.pod(0, 1));
    let local1 = r["local"].as_str().expect("local address").to_owned();
    let ev = mesh
        .wait_access(0, Duration::from_secs(5), |e| {
            e["direction"] == "outbound" && e["src_addr"] == local1.as_str()
        })
        .expect("meshed after enrolling");
    assert_eq!(ev["path"], "hbone");
    // Take pod-0-0 out.
    mesh.set_pod_label(tb.pod(0, 0), MESH_LABEL, Some("disabled"))
        .expect("relabel");
    mesh.wait_config(0, Duration::from_secs(15), |d| {
        d["datapath"]["enrolled_cgroups"]
            .as_array()
            .map(|a| a.len())
            == Some(1)
    })
    .expect("left");
    // Controller stopped: still works.
    mesh.stop_controller(Duration::from_secs(10)).expect("stop");
    let r = get(tb.pod(0, 1));
    let local1 = r["local"].as_str().expect("local address").to_owned();
    mesh.wait_access(0, Duration::from_secs(5), |e| {
        e["src_addr"] == local1.as_str()
    })
    .expect("meshed w/o controller");
    mesh.wait_config(0, Duration::from_secs(15), |d| {
        d["control_plane"]["connected"] == false
    })
    .expect("disconnected");
    mesh.start_controller().expect("restart");
    mesh.wait_config(0, Duration::from_secs(15), |d| {
        d["control_plane"]["connected"] == true
    })
    .expect("reconnected");
    eprintln!(
        "{}",
        serde_json::to_string_pretty(&mesh.config_dump(0).expect("dump")).expect("json")
    );
}
