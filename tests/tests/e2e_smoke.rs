//! Quick end-to-end check while developing.
use std::time::Duration;

use mesh_tests::{
    mesh::{Mesh, MeshOptions},
    testbed::{Testbed, e2e_gate},
};

#[test]
fn smoke() {
    if !e2e_gate("smoke") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(2)
        .external(true)
        .build()
        .expect("testbed");
    let mesh = Mesh::start(&tb, &MeshOptions::default()).expect("mesh");
    let server = tb
        .spawn_server(
            tb.pod(1, 0),
            &["--listen", "0.0.0.0:8080=http", "--name", "b"],
        )
        .expect("server");
    let _ = server;
    let out = tb
        .run(
            tb.pod(0, 0),
            &["pod-app", "http-get", "--to", "10.200.1.10:8080"],
            Duration::from_secs(20),
        )
        .expect("run");
    println!("{}\n{}", out.stdout, out.stderr);
    println!("{}", mesh.agent_log_text(0));
    println!("{}", mesh.agent_log_text(1));
    assert!(out.status.success());
}
