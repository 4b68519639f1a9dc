//! Enrollment follows the pod, not the process's exact cgroup: in Kubernetes a pod's processes
//! run in container cgroups below the pod cgroup the agent enrolls, and must be meshed as that
//! pod.

use std::time::Duration;

use mesh_tests::{
    mesh::{Mesh, MeshOptions, spiffe_id},
    testbed::{Testbed, bin_path, e2e_gate},
};

#[test]
fn a_process_in_a_container_cgroup_below_the_pod_is_meshed_as_the_pod() {
    if !e2e_gate("a_process_in_a_container_cgroup_below_the_pod_is_meshed_as_the_pod") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(1)
        .build()
        .expect("testbed");
    let mesh = Mesh::start(&tb, &MeshOptions::default()).expect("mesh");
    let _server = tb
        .spawn_server(
            tb.pod(1, 0),
            &["--listen", "0.0.0.0:8080=http", "--name", "server"],
        )
        .expect("server");

    let client = tb.pod(0, 0);
    let container = client.cgroup.join("container-1");
    std::fs::create_dir(&container).expect("container cgroup");
    let netns = client.netns.path().to_string_lossy().into_owned();
    let pod_app = bin_path("pod-app")
        .expect("pod-app")
        .to_string_lossy()
        .into_owned();
    let container_arg = container.to_string_lossy().into_owned();
    let out = tb
        .run(
            client,
            &[
                "podexec",
                "--netns",
                &netns,
                "--cgroup",
                &container_arg,
                "--",
                &pod_app,
                "http-get",
                "--to",
                "10.200.1.10:8080",
            ],
            Duration::from_secs(20),
        )
        .expect("run");
    let result = out.ok_json().expect("request through the mesh succeeds");
    let local = result["local"].as_str().expect("local address").to_owned();

    let outbound = mesh
        .wait_access(0, Duration::from_secs(5), |e| {
            e["direction"] == "outbound" && e["src_addr"] == local.as_str()
        })
        .expect("the source agent handled the connection");
    assert_eq!(outbound["path"], "hbone");
    assert_eq!(outbound["src_workload"], "default/pod-0-0");
    let inbound = mesh
        .wait_access(1, Duration::from_secs(5), |e| {
            e["direction"] == "inbound" && e["src_addr"] == local.as_str()
        })
        .expect("the destination agent handled the connection");
    assert_eq!(inbound["src_identity"], spiffe_id(client).as_str());
}
