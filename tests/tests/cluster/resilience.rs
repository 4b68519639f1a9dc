//! Resilience against the real API server beyond a restart: etcd compacted under the API
//! server (the controller's watches are answered 410 Gone and relist), and a controller
//! restart that rewrites no status already right (counted in the API server's audit log).

use mesh_tests::{
    cluster::{
        Cluster,
        audit::{self, service_account_user},
    },
    mesh::{MESH_LABEL, Mesh, kubernetes::RELEASE_NAMESPACE},
};
use serde_json::Value;

use super::{
    APPS, CONVERGE, Path, assert_no_refused_calls, assert_no_refused_calls_since, cluster_on, gate,
    kubectl_label, meshed_client_and_server, poll, testbed, wait_path,
};

#[test]
fn a_compaction_that_expires_the_controllers_watches_is_survived_by_relisting() {
    let test = "a_compaction_that_expires_the_controllers_watches_is_survived_by_relisting";
    let Some(tools) = gate(test) else {
        return;
    };
    let tb = testbed(1);
    let mut cluster = cluster_on(&tb, tools);
    let mesh = Mesh::start_kubernetes(&tb, &cluster, &super::by_node_address()).expect("mesh");
    let (client, _server, to) = meshed_client_and_server(&tb, &cluster);
    assert_no_refused_calls(&mesh);

    // With the API server down, etcd's history is compacted past every resource version the
    // controller's watches have seen: when they resume, the API server can only answer
    // 410 Gone.
    let before = mesh.controller_log_text().lines().count();
    cluster.stop_apiserver().expect("stop the API server");
    let revision = cluster.compact_etcd().expect("compact etcd");
    cluster.start_apiserver().expect("start the API server");
    let ready_at = mesh.controller_log_text().lines().count();

    let since = |first: usize| -> Vec<Value> {
        mesh.controller_log_text()
            .lines()
            .skip(first)
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    };
    let text = |e: &Value| e.to_string();
    poll(
        CONVERGE,
        "the controller's watches to be expired and relist",
        || {
            let events = since(before);
            let expired = events.iter().any(|e| {
                let t = text(e);
                t.contains("watch failed") && (t.contains("Expired") || t.contains("too old"))
            });
            let relisted = events
                .iter()
                .any(|e| e["message"] == "relisted" && e["kind"] == "Namespace");
            (expired && relisted).then_some(())
        },
    );
    // The mesh kept serving, and still follows changes made after the relist.
    assert_eq!(super::get(&tb, &client, &to).0, Path::Hbone);
    kubectl_label(
        &cluster,
        &["namespace", "default", &format!("{MESH_LABEL}-")],
    );
    wait_path(
        &tb,
        &client,
        &to,
        Path::Direct,
        "a change after the relist to apply",
    );
    kubectl_label(
        &cluster,
        &["namespace", "default", &format!("{MESH_LABEL}=enabled")],
    );
    wait_path(&tb, &client, &to, Path::Hbone, "and the next one");
    // The resource versions the controller holds now are past the compaction.
    let version: u64 = cluster
        .kubectl(&[
            "get",
            "namespace",
            "default",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])
        .expect("namespace")
        .trim()
        .parse()
        .expect("a resource version");
    assert!(version > revision, "{version} > {revision}");
    assert_no_refused_calls_since(&mesh, ready_at);
}

/// A DENY policy named `name` in [`APPS`].
fn deny(name: &str, principal: &str) -> String {
    format!(
        "apiVersion: security.trellis.dev/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: {APPS}}}\n\
         spec:\n  action: DENY\n  rules:\n  - from:\n    - source: {{principals: [\"{principal}\"]}}\n"
    )
}

/// Policy `name`'s `Accepted` condition and its resourceVersion, once the condition is there.
fn accepted(cluster: &Cluster, name: &str) -> Option<(Value, String)> {
    let policy = cluster
        .get_json(&["authorizationpolicy", name, "-n", APPS])
        .ok()?;
    let version = policy["metadata"]["resourceVersion"].as_str()?.to_owned();
    policy["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")
        .map(|c| (c.clone(), version))
}

/// How many times the controller read policy `name` by name (its watches list, not get).
fn policy_reads(cluster: &Cluster, name: &str) -> usize {
    let controller = service_account_user(RELEASE_NAMESPACE, "trellis-controller");
    cluster
        .audit()
        .expect("audit log")
        .iter()
        .filter(|r| {
            r.user == controller
                && r.verb == "get"
                && r.resource == "authorizationpolicies"
                && r.name.as_deref() == Some(name)
        })
        .count()
}

/// How many times the controller called `verb` on policy `name`'s status.
fn status_calls(cluster: &Cluster, verb: &str, name: &str) -> usize {
    let controller = service_account_user(RELEASE_NAMESPACE, "trellis-controller");
    cluster
        .audit()
        .expect("audit log")
        .iter()
        .filter(|r: &&audit::Request| {
            r.user == controller
                && r.verb == verb
                && r.resource == "authorizationpolicies/status"
                && r.name.as_deref() == Some(name)
        })
        .count()
}

#[test]
fn a_restarted_controller_rewrites_no_status_that_is_already_right() {
    let test = "a_restarted_controller_rewrites_no_status_that_is_already_right";
    let Some(tools) = gate(test) else {
        return;
    };
    let tb = testbed(1);
    let cluster = cluster_on(&tb, tools);
    let mut mesh = Mesh::start_kubernetes(&tb, &cluster, &super::by_node_address()).expect("mesh");
    cluster
        .apply(&format!(
            "{{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{{\"name\":\"{APPS}\"}}}}"
        ))
        .expect("namespace");
    cluster
        .kubectl_stdin(
            &["apply", "-f", "-"],
            &deny("first", "cluster.local/ns/x/sa/a"),
        )
        .expect("kubectl apply");
    let (condition, version) = poll(CONVERGE, "the first policy's status", || {
        accepted(&cluster, "first")
    });
    assert_eq!(condition["status"], "True", "{condition}");
    assert_eq!(
        status_calls(&cluster, "patch", "first"),
        1,
        "one write for a new condition"
    );

    mesh.stop_controller(std::time::Duration::from_secs(10))
        .expect("stop the controller");
    mesh.start_controller().expect("start the controller");
    // The status writer goes over the objects in the order it sees them: once the policy
    // applied after the restart has its status, the first one has been considered too.
    cluster
        .kubectl_stdin(
            &["apply", "-f", "-"],
            &deny("second", "cluster.local/ns/y/sa/b"),
        )
        .expect("kubectl apply");
    poll(CONVERGE, "the second policy's status", || {
        accepted(&cluster, "second")
    });
    assert_eq!(status_calls(&cluster, "patch", "second"), 1);
    assert!(
        policy_reads(&cluster, "first") >= 1,
        "the restarted controller read the first policy's status"
    );
    assert_eq!(
        status_calls(&cluster, "patch", "first"),
        1,
        "the restarted controller wrote the first policy's status again"
    );
    let (after, version_after) = accepted(&cluster, "first").expect("still accepted");
    assert_eq!(after, condition, "the condition, transition time included");
    assert_eq!(version_after, version, "the object was not written");
    assert_no_refused_calls(&mesh);
}
