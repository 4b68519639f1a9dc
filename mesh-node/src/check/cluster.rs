//! Post-installation checks: is the mesh up on this cluster? `meshctl check` gathers the facts
//! (the API server's CRDs and Nodes, the controller's monitoring port) and judges them here.
//!
//! | code   | check      | fails when |
//! |--------|------------|------------|
//! | TRL101 | CRDs       | a CRD of the chart is missing, or not established (not served) |
//! | TRL102 | controller | its monitoring port does not answer, or it is not ready |
//! | TRL103 | agents     | a Linux node has no agent connected to the controller. An agent connects only once its datapath is attached and pinned (it installs the programs before it starts its feed), so a connected agent is a node whose datapath is in place |
//! | TRL104 | sync       | a connected agent or waypoint does not hold the controller's current state (it acknowledged an older one, or none) |

use std::collections::BTreeSet;

use super::{Finding, Level, Report, finding};
use crate::{
    controller::proxies::{Listing, Sync},
    k8s::crds,
};

/// What `meshctl check` found on the cluster.
#[derive(Debug)]
pub struct ClusterFacts {
    /// Each CRD the chart ships, by name: `None` if the API server has none by that name,
    /// else whether it is established (served).
    pub crds: Vec<(String, Option<bool>)>,
    /// The cluster's Linux nodes.
    pub nodes: Vec<String>,
    /// The controller's readiness, or why it could not be read.
    pub controller_ready: Result<bool, String>,
    /// What the controller says of the connected proxies (`None`: could not be read).
    pub proxies: Option<Listing>,
}

/// The names of the CRDs the chart always installs.
pub fn required_crds() -> Vec<String> {
    crds::GROUPS
        .iter()
        .filter_map(|g| crds::yaml(g).ok())
        .flat_map(|yaml| {
            serde_saphyr::from_multiple::<serde_json::Value>(&yaml).unwrap_or_default()
        })
        .filter_map(|crd| crd["metadata"]["name"].as_str().map(str::to_owned))
        .collect()
}

pub fn judge(facts: &ClusterFacts) -> Report {
    Report {
        findings: vec![
            crds(&facts.crds),
            controller(&facts.controller_ready),
            agents(&facts.nodes, facts.proxies.as_ref()),
            sync(facts.proxies.as_ref()),
        ],
    }
}

fn crds(crds: &[(String, Option<bool>)]) -> Finding {
    let missing: Vec<&str> = crds
        .iter()
        .filter(|(_, state)| state.is_none())
        .map(|(n, _)| n.as_str())
        .collect();
    let unserved: Vec<&str> = crds
        .iter()
        .filter(|(_, state)| *state == Some(false))
        .map(|(n, _)| n.as_str())
        .collect();
    match (missing.is_empty(), unserved.is_empty()) {
        (true, true) => finding(
            "TRL101",
            "CRDs",
            Level::Pass,
            format!("{} CRDs established", crds.len()),
        ),
        _ => finding(
            "TRL101",
            "CRDs",
            Level::Fail,
            format!("missing: {missing:?}; not established: {unserved:?}"),
        )
        .hint("install the chart's crds/ (helm install applies them; with --skip-crds, kubectl apply -f charts/trellis/crds/)"),
    }
}

fn controller(ready: &Result<bool, String>) -> Finding {
    match ready {
        Ok(true) => finding("TRL102", "controller", Level::Pass, "ready".into()),
        Ok(false) => finding(
            "TRL102",
            "controller",
            Level::Fail,
            "reachable but not ready".into(),
        )
        .hint("kubectl -n trellis-system logs deploy/trellis-controller: it has not loaded the cluster state"),
        Err(e) => finding("TRL102", "controller", Level::Fail, format!("unreachable: {e}"))
            .hint("kubectl -n trellis-system port-forward deploy/trellis-controller 15014, then pass --controller 127.0.0.1:15014"),
    }
}

fn agents(nodes: &[String], proxies: Option<&Listing>) -> Finding {
    let Some(proxies) = proxies else {
        return finding(
            "TRL103",
            "agents",
            Level::Fail,
            "the controller's list of agents could not be read".into(),
        );
    };
    let connected: BTreeSet<&str> = proxies
        .proxies
        .iter()
        .filter(|p| p.role == "agent")
        .map(|p| p.node.as_str())
        .collect();
    let missing: Vec<&str> = nodes
        .iter()
        .map(String::as_str)
        .filter(|n| !connected.contains(n))
        .collect();
    if missing.is_empty() {
        finding(
            "TRL103",
            "agents",
            Level::Pass,
            format!(
                "{} of {} nodes have an agent with its datapath attached",
                nodes.len(),
                nodes.len()
            ),
        )
    } else {
        finding(
            "TRL103",
            "agents",
            Level::Fail,
            format!("no agent connected on {missing:?}"),
        )
        .hint("kubectl -n trellis-system get pods -l app.kubernetes.io/name=trellis-agent -o wide; an agent that cannot attach its datapath says why in its log (meshctl check --pre on the node)")
    }
}

fn sync(proxies: Option<&Listing>) -> Finding {
    let Some(proxies) = proxies else {
        return finding(
            "TRL104",
            "sync",
            Level::Fail,
            "the controller's list of proxies could not be read".into(),
        );
    };
    let behind: Vec<String> = proxies
        .proxies
        .iter()
        .filter(|p| p.sync != Sync::Synced)
        .map(|p| format!("{} ({})", p.peer, p.sync.as_str()))
        .collect();
    if behind.is_empty() {
        finding(
            "TRL104",
            "sync",
            Level::Pass,
            format!("{} proxies hold the current state", proxies.proxies.len()),
        )
    } else {
        finding(
            "TRL104",
            "sync",
            Level::Fail,
            format!("behind: {}", behind.join(", ")),
        )
        .hint("meshctl proxy-status; a proxy that rejected resources logs why")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::proxies::{ControllerInfo, Listed};

    fn agent(node: &str, sync: Sync) -> Listed {
        Listed {
            peer: format!("node {node}"),
            role: "agent".into(),
            node: node.into(),
            build: String::new(),
            connected_at_unix: 0,
            sent_version: 2,
            acked_version: 2,
            rejected_resources: 0,
            sync,
            certificates: Vec::new(),
        }
    }

    fn facts(proxies: Vec<Listed>) -> ClusterFacts {
        ClusterFacts {
            crds: required_crds()
                .into_iter()
                .map(|n| (n, Some(true)))
                .collect(),
            nodes: vec!["n1".into(), "n2".into()],
            controller_ready: Ok(true),
            proxies: Some(Listing {
                controller: ControllerInfo {
                    version: "x".into(),
                    state_version: Some(2),
                },
                proxies,
            }),
        }
    }

    fn levels(report: &Report) -> Vec<(&'static str, Level)> {
        report.findings.iter().map(|f| (f.code, f.level)).collect()
    }

    #[test]
    fn the_chart_crds_are_required() {
        let names = required_crds();
        assert!(names.contains(&"authorizationpolicies.security.trellis.dev".to_owned()));
        assert!(names.contains(&"trafficpolicies.traffic.trellis.dev".to_owned()));
    }

    #[test]
    fn a_healthy_mesh_passes_every_check() {
        let report = judge(&facts(vec![
            agent("n1", Sync::Synced),
            agent("n2", Sync::Synced),
        ]));
        assert!(!report.failed(), "{}", report.text());
    }

    #[test]
    fn each_broken_part_fails_its_own_check_only() {
        let mut f = facts(vec![agent("n1", Sync::Synced)]);
        assert_eq!(
            levels(&judge(&f))[2],
            ("TRL103", Level::Fail),
            "node n2 has no agent"
        );
        f.crds[0].1 = None;
        f.crds[1].1 = Some(false);
        let report = judge(&f);
        assert_eq!(levels(&report)[0], ("TRL101", Level::Fail));
        assert!(report.findings[0].detail.contains(&f.crds[0].0));
        let stale = judge(&facts(vec![
            agent("n1", Sync::Synced),
            agent("n2", Sync::Stale),
        ]));
        assert_eq!(
            levels(&stale),
            [
                ("TRL101", Level::Pass),
                ("TRL102", Level::Pass),
                ("TRL103", Level::Pass),
                ("TRL104", Level::Fail)
            ]
        );
        let mut down = facts(vec![]);
        down.controller_ready = Err("connection refused".into());
        down.proxies = None;
        let report = judge(&down);
        assert_eq!(levels(&report)[1], ("TRL102", Level::Fail));
        assert!(report.failed());
    }
}
