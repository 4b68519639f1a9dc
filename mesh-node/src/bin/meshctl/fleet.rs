//! What the controller knows of the fleet: `proxy-status`, `version` and the facts `check`
//! judges after installation.

use std::{fmt::Write, net::SocketAddr};

use anyhow::{Context, Result};
use mesh_node::{
    check::{self, cluster::ClusterFacts},
    controller::proxies::{Listing, Sync},
};
use serde_json::Value;

pub fn proxies(text: &str) -> Result<Listing> {
    serde_json::from_str(text).context("the controller's /debug/proxies answer is not a listing")
}

/// One line per connected proxy, and a last line saying how many hold the current state.
pub fn status_table(listing: &Listing) -> String {
    let mut out = String::new();
    let state = listing
        .controller
        .state_version
        .map_or_else(|| "none yet".to_owned(), |v| v.to_string());
    let _ = writeln!(
        out,
        "controller {} serving state version {state}",
        listing.controller.version
    );
    let _ = writeln!(
        out,
        "{:<40} {:<9} {:<16} {:<10} {:>8} {:>8} {:>9}  {:<9}  CERTIFICATES",
        "PROXY", "ROLE", "NODE", "BUILD", "SENT", "ACKED", "REJECTED", "SYNC"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for p in &listing.proxies {
        // How many it holds, and when the first of them expires.
        let certificates = match p.certificates.iter().map(|c| c.expires_unix).min() {
            Some(first) => format!(
                "{} (first expires in {}m)",
                p.certificates.len(),
                first.saturating_sub(now) / 60
            ),
            None => "0".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<40} {:<9} {:<16} {:<10} {:>8} {:>8} {:>9}  {:<9}  {certificates}",
            p.peer,
            p.role,
            p.node,
            if p.build.is_empty() { "-" } else { &p.build },
            p.sent_version,
            p.acked_version,
            p.rejected_resources,
            p.sync.as_str()
        );
    }
    let synced = listing
        .proxies
        .iter()
        .filter(|p| p.sync == Sync::Synced)
        .count();
    let _ = writeln!(
        out,
        "{synced} of {} proxies hold the current state",
        listing.proxies.len()
    );
    out
}

/// meshctl's version, the agent's (its `/version` answer, if it could be read) and the
/// controller's and every connected proxy's.
pub fn versions(agent: Option<&str>, fleet: Option<&Listing>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "meshctl     {}", env!("CARGO_PKG_VERSION"));
    let agent = agent
        .and_then(|t| serde_json::from_str::<Value>(t).ok())
        .and_then(|v| v["version"].as_str().map(str::to_owned));
    let _ = writeln!(
        out,
        "agent       {}",
        agent.as_deref().unwrap_or("unreachable")
    );
    if let Some(fleet) = fleet {
        let _ = writeln!(out, "controller  {}", fleet.controller.version);
        for p in &fleet.proxies {
            let build = if p.build.is_empty() {
                "unknown"
            } else {
                &p.build
            };
            let _ = writeln!(out, "{:<11} {build}  {}", p.role, p.peer);
        }
    }
    out
}

/// What `meshctl check` judges: the CRDs and Nodes from the API server (the kubeconfig's
/// cluster), the controller's readiness and its connected proxies.
pub async fn cluster_facts(controller: SocketAddr) -> Result<ClusterFacts> {
    use k8s_openapi::{
        api::core::v1::Node,
        apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    };
    use kube::{Api, api::ListParams};

    let client = kube::Client::try_default()
        .await
        .context("cannot reach the API server: set KUBECONFIG or run in a pod")?;
    let crd_api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut crds = Vec::new();
    for name in check::cluster::required_crds() {
        let crd = crd_api
            .get_opt(&name)
            .await
            .with_context(|| format!("reading CRD {name}"))?;
        let established = crd.map(|crd| {
            crd.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        crds.push((name, established));
    }
    let nodes = Api::<Node>::all(client)
        .list(&ListParams::default().labels("kubernetes.io/os=linux"))
        .await
        .context("listing Nodes")?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    let controller_ready = match super::call(http::Method::GET, controller, "/healthz/ready").await
    {
        Ok(_) => Ok(true),
        Err(e) if e.to_string().contains("503") => Ok(false),
        Err(e) => Err(format!("{e:#}")),
    };
    let proxies = super::get(controller, "/debug/proxies")
        .await
        .ok()
        .and_then(|text| proxies(&text).ok());
    Ok(ClusterFacts {
        crds,
        nodes,
        controller_ready,
        proxies,
    })
}
