//! What the controller knows of the fleet: `proxy-status` and `version`.

use std::fmt::Write;

use anyhow::{Context, Result};
use mesh_node::controller::proxies::{Listing, Sync};
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
        "{:<40} {:<9} {:<16} {:<10} {:>8} {:>8} {:>9}  SYNC",
        "PROXY", "ROLE", "NODE", "BUILD", "SENT", "ACKED", "REJECTED"
    );
    for p in &listing.proxies {
        let _ = writeln!(
            out,
            "{:<40} {:<9} {:<16} {:<10} {:>8} {:>8} {:>9}  {}",
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
