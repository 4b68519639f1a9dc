//! `meshctl` against an installed mesh: `check` finds the CRDs, the controller and an agent on
//! every node (and names a node whose agent is gone), `proxy-status` lists every agent
//! connected to the controller and whether it holds the controller's current state, `version`
//! names the build of meshctl, the controller and each proxy, and `log-level` turns one agent's
//! debug logs on and off while it keeps running.
//!
//! meshctl runs where an operator's would: in node 0's namespace, reaching the controller's
//! monitoring port on loopback (as through `kubectl port-forward`) and each agent's admin port
//! on its node's loopback.

use std::{collections::BTreeSet, time::Duration};

use mesh_node::controller::proxies::{Listing, Sync};
use mesh_tests::{
    cluster::{
        Cluster,
        kubelet::{Kubelet, PodSpec},
    },
    mesh::{ADMIN_PORT, CONTROLLER_MONITORING_PORT, Mesh, MeshOptions},
    testbed::{CmdOutput, SpawnOptions, Testbed},
};

use super::{CONVERGE, assert_no_refused_calls, cluster_on, gate, poll, testbed};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `meshctl --admin <node's agent> args...` in `node`'s namespace.
fn meshctl(tb: &Testbed, node: usize, args: &[&str]) -> CmdOutput {
    let admin = format!("127.0.0.1:{ADMIN_PORT}");
    let mut all = vec!["meshctl", "--admin", &admin];
    all.extend(args);
    tb.run(tb.node(node), &all, Duration::from_secs(20))
        .expect("meshctl runs")
}

/// `meshctl check -o json` in node 0's namespace with the admin's kubeconfig: whether it
/// passed, and each check's code and level.
fn check(tb: &Testbed, cluster: &Cluster) -> (bool, Vec<(String, String)>, String) {
    let controller = format!("127.0.0.1:{CONTROLLER_MONITORING_PORT}");
    let out = tb
        .run_with(
            tb.node(0),
            &[
                "meshctl",
                "check",
                "--controller",
                &controller,
                "-o",
                "json",
            ],
            SpawnOptions::new().env("KUBECONFIG", cluster.kubeconfig()),
            Duration::from_secs(30),
        )
        .expect("meshctl check runs");
    let report: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("a report ({e}): {} {}", out.stdout, out.stderr));
    let findings = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| {
            (
                f["code"].as_str().unwrap_or_default().to_owned(),
                f["level"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    (out.success(), findings, out.stdout)
}

fn proxy_status(tb: &Testbed) -> Listing {
    let controller = format!("127.0.0.1:{CONTROLLER_MONITORING_PORT}");
    let out = meshctl(
        tb,
        0,
        &["proxy-status", "--controller", &controller, "-o", "json"],
    );
    assert!(out.success(), "{}", out.stderr);
    serde_json::from_str(&out.stdout).expect("a listing")
}

/// The agent's debug lines (JSON logs) that say it published state `version`.
fn published_debug(mesh: &Mesh<'_>, node: usize) -> usize {
    mesh.agent_log_text(node)
        .lines()
        .filter(|l| l.contains("\"level\":\"DEBUG\"") && l.contains("mesh state published"))
        .count()
}

/// A new Service: a change of the state every agent receives.
fn new_service(cluster: &Cluster, name: &str) {
    cluster
        .apply(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{ports: [{{port: 80}}]}}\n"
        ))
        .expect("service");
}

#[test]
fn meshctl_checks_the_install_lists_the_fleet_names_versions_and_changes_a_log_level() {
    let Some(tools) =
        gate("meshctl_checks_the_install_lists_the_fleet_names_versions_and_changes_a_log_level")
    else {
        return;
    };
    let tb = testbed(1);
    let cluster = cluster_on(&tb, tools);
    let mut mesh = Mesh::start_kubernetes(&tb, &cluster, &MeshOptions::default()).expect("mesh");
    // One meshed pod on node 0: its agent holds a certificate for it.
    cluster
        .apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: apps, labels: {trellis.dev/mesh: enabled}}\n")
        .expect("namespace");
    let _client = Kubelet::new(&cluster, &tb)
        .run_pod(tb.pod(0, 0), &PodSpec::new("apps", "client"))
        .expect("client pod");

    // proxy-status: both agents, each acknowledging the controller's current state.
    let listing = poll(
        CONVERGE,
        "both agents to hold the current state and node 0's a certificate",
        || {
            let listing = proxy_status(&tb);
            (listing.proxies.len() == 2
                && listing.proxies.iter().all(|p| p.sync == Sync::Synced)
                && listing.proxies.iter().any(|p| !p.certificates.is_empty()))
            .then_some(listing)
        },
    );
    // The certificates each agent holds, with their expiry: node 0's for its pod only.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for proxy in &listing.proxies {
        let identities: Vec<&str> = proxy
            .certificates
            .iter()
            .map(|c| c.identity.as_str())
            .collect();
        if proxy.node == tb.node(0).name {
            assert_eq!(identities, ["spiffe://cluster.local/ns/apps/sa/client"]);
            assert!(
                proxy.certificates[0].expires_unix > now + 3600,
                "a day's certificate"
            );
        } else {
            assert!(identities.is_empty(), "node 1 runs no pod: {identities:?}");
        }
    }
    let nodes: BTreeSet<&str> = listing.proxies.iter().map(|p| p.node.as_str()).collect();
    let expected: BTreeSet<&str> = tb.nodes().iter().map(|n| n.name.as_str()).collect();
    assert_eq!(nodes, expected, "one agent per node");
    let current = listing.controller.state_version.expect("a state");
    for proxy in &listing.proxies {
        assert_eq!(proxy.role, "agent");
        assert_eq!(proxy.build, VERSION);
        assert_eq!(proxy.acked_version, current);
        assert_eq!(proxy.rejected_resources, 0);
    }
    // check: the CRDs, the controller, an agent on every node, all in sync.
    let (passed, findings, report) = check(&tb, &cluster);
    assert!(passed, "{report}");
    let codes: Vec<&str> = findings.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(codes, ["TRL101", "TRL102", "TRL103", "TRL104"]);
    assert!(
        findings.iter().all(|(_, level)| level == "pass"),
        "{report}"
    );

    let controller = format!("127.0.0.1:{CONTROLLER_MONITORING_PORT}");
    let table = meshctl(&tb, 0, &["proxy-status", "--controller", &controller]);
    assert!(
        table.stdout.contains("1 (first expires in "),
        "{}",
        table.stdout
    );
    assert!(
        table
            .stdout
            .contains("2 of 2 proxies hold the current state"),
        "{}",
        table.stdout
    );

    // version: meshctl, this node's agent, the controller and both agents it serves.
    let versions = meshctl(&tb, 0, &["version", "--controller", &controller]);
    assert!(versions.success(), "{}", versions.stderr);
    assert!(versions.stdout.contains(&format!("meshctl     {VERSION}")));
    assert!(versions.stdout.contains(&format!("agent       {VERSION}")));
    assert!(versions.stdout.contains(&format!("controller  {VERSION}")));
    assert_eq!(
        versions
            .stdout
            .matches(&format!("agent       {VERSION}  "))
            .count(),
        2,
        "{}",
        versions.stdout
    );

    // log-level: node 1's agent to debug, node 0's left at info.
    let pid = mesh.agent_pid(1);
    let level = meshctl(&tb, 1, &["log-level"]);
    assert!(
        level.stdout.trim().starts_with("info"),
        "the filter the agent started with: {} {}",
        level.stdout,
        level.stderr
    );
    let bad = meshctl(&tb, 1, &["log-level", "info,=??"]);
    assert!(!bad.success(), "an invalid filter is refused");
    assert!(bad.stderr.contains("400"), "{}", bad.stderr);
    let set = meshctl(&tb, 1, &["log-level", "info,mesh_node=debug"]);
    assert!(set.success(), "{}", set.stderr);
    assert_eq!(
        meshctl(&tb, 1, &["log-level"]).stdout.trim(),
        "info,mesh_node=debug"
    );
    let (before0, before1) = (published_debug(&mesh, 0), published_debug(&mesh, 1));
    new_service(&cluster, "debugged");
    poll(
        CONVERGE,
        "node 1's agent to log the new state at debug",
        || (published_debug(&mesh, 1) > before1).then_some(()),
    );
    // Both agents got the update (they are synced again); only node 1 logged it at debug.
    poll(CONVERGE, "both agents to hold the new state", || {
        let listing = proxy_status(&tb);
        (listing.proxies.len() == 2 && listing.proxies.iter().all(|p| p.sync == Sync::Synced))
            .then_some(())
    });
    assert_eq!(published_debug(&mesh, 0), before0, "node 0 stays at info");

    // Back to info: the next state is not logged at debug.
    assert!(meshctl(&tb, 1, &["log-level", "info"]).success());
    let after = published_debug(&mesh, 1);
    let version_before = proxy_status(&tb).controller.state_version;
    new_service(&cluster, "quiet");
    poll(CONVERGE, "both agents to hold the next state", || {
        let listing = proxy_status(&tb);
        (listing.controller.state_version != version_before
            && listing.proxies.len() == 2
            && listing.proxies.iter().all(|p| p.sync == Sync::Synced))
        .then_some(())
    });
    assert_eq!(published_debug(&mesh, 1), after, "back at info");
    assert_eq!(mesh.agent_pid(1), pid, "the agent was not restarted");

    // An agent gone: check fails, naming its node.
    assert!(mesh.stop_agent(1, Duration::from_secs(20)).expect("stop"));
    let (passed, findings, report) = poll(CONVERGE, "check to see node 1 without an agent", || {
        let (passed, findings, report) = check(&tb, &cluster);
        findings
            .iter()
            .any(|(code, level)| code == "TRL103" && level == "fail")
            .then_some((passed, findings, report))
    });
    assert!(!passed, "a failed check exits non-zero");
    assert!(report.contains(&tb.node(1).name), "{report}");
    assert!(
        findings.iter().filter(|(_, level)| level == "fail").count() == 1,
        "only the agents check fails: {report}"
    );
    assert_no_refused_calls(&mesh);
}
