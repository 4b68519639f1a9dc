//! `meshctl policy explain`: the decision for one pod-to-pod flow, made by the engine the
//! agent enforces ([`super::engine::Engine::decide`]) over the state it holds, with what decided it.
//!
//! The flow is evaluated as the destination's node would see it: an enrolled source arrives
//! over HBONE (or, on the same node, through the node proxy) with its verified identity and
//! its own address; a source outside the mesh (an unenrolled pod, or any other address)
//! arrives as plaintext, which the kernel judges by destination port alone: it has no
//! identity, and its address is not weighed, so `ipBlocks` conditions fail closed for it.
//!
//! When the destination uses a waypoint, the explanation also names the waypoint and the
//! policies attached there that its HTTP requests are judged by: those of the waypoint's
//! `Gateway` and class, and those of every Service that has the pod as an endpoint, whether
//! the client dials the Service's address or the pod's (request facts decide those, so no
//! verdict is given for them here).

use serde::Serialize;

use super::{
    engine::Reason,
    facts::{Destination, Flow, WaypointTarget},
};
use crate::state::{MeshState, Workload};

/// Why a flow cannot be explained.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("{0:?} is not namespace/name (or, for a caller outside the mesh, an IP address)")]
    BadPod(String),
    #[error("{0:?} is not namespace/name:port (port 1-65535)")]
    BadDestination(String),
    #[error(
        "no pod {0} is known to this agent (check the namespace and name with `meshctl workloads`)"
    )]
    UnknownPod(String),
}

/// One side of the flow.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Party {
    pub pod: String,
    pub identity: String,
    pub enrolled: bool,
    pub ip: Option<String>,
}

impl Party {
    fn of(w: &Workload) -> Self {
        Self {
            pod: format!("{}/{}", w.namespace, w.name),
            identity: w.identity.to_string(),
            enrolled: w.enrolled,
            ip: w.ips.first().map(ToString::to_string),
        }
    }
}

/// The verdict and what decided it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Explanation {
    pub source: Party,
    pub destination: Party,
    pub port: u16,
    /// `mutual_tls` (over HBONE) or `plaintext` (the source is not in the mesh).
    pub connection: &'static str,
    /// `allow` or `deny`.
    pub verdict: String,
    /// The deciding policy, `namespace/name`, if one decided.
    pub policy: Option<String>,
    /// The index of the deciding rule in that policy.
    pub rule: Option<usize>,
    /// The decision in words, as access logs print it.
    pub reason: String,
    /// The waypoints the destination takes connections from (none: any source).
    pub waypoints: Vec<String>,
    /// The destination port's mutual TLS mode and the PeerAuthentication that set it.
    pub mtls_mode: String,
    pub mtls_policy: Option<String>,
    /// The destination's waypoint (`namespace/name`), when it uses one.
    pub waypoint: Option<String>,
    /// The AuthorizationPolicies that waypoint applies to requests for the destination,
    /// `DENY` first (see the module documentation).
    pub waypoint_policies: Vec<String>,
}

fn find<'a>(state: &'a MeshState, pod: &str) -> Result<&'a Workload, ExplainError> {
    let (namespace, name) = pod
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        .ok_or_else(|| ExplainError::BadPod(pod.to_owned()))?;
    state
        .workloads()
        .iter()
        .find(|w| w.namespace == namespace && w.name == name)
        .map(|w| &**w)
        .ok_or_else(|| ExplainError::UnknownPod(pod.to_owned()))
}

/// Explains the flow from `from` (a pod, `namespace/name`, or the IP address of a caller
/// outside the mesh) to `to` (`namespace/name:port`).
pub fn explain(state: &MeshState, from: &str, to: &str) -> Result<Explanation, ExplainError> {
    let bad_to = || ExplainError::BadDestination(to.to_owned());
    let (pod, port) = to.rsplit_once(':').ok_or_else(bad_to)?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad_to)?;
    // What the enforcing side knows of the source: a meshed pod's identity and own address;
    // nothing of a plaintext caller.
    let (source, identity, source_ip) = if let Ok(ip) = from.parse::<std::net::IpAddr>() {
        let party = Party {
            pod: String::new(),
            identity: String::new(),
            enrolled: false,
            ip: Some(ip.to_string()),
        };
        (party, None, None)
    } else {
        let w = find(state, from)?;
        let enrolled = w.enrolled;
        let ip = w.ips.first().copied().filter(|_| enrolled);
        (Party::of(w), enrolled.then_some(&w.identity), ip)
    };
    let destination = find(state, pod)?;
    let engine = state.policy();
    let dest = Destination::of(destination);
    let decision = engine.decide(&Flow {
        destination: dest,
        port,
        source: identity,
        source_ip,
    });
    let rule = match &decision.reason {
        Reason::Allowed { rule, .. } | Reason::Denied { rule, .. } => Some(*rule),
        _ => None,
    };
    let guards = state.guards(destination);
    let waypoints: Vec<String> = guards
        .waypoints()
        .iter()
        .map(|w| w.id.to_string())
        .collect();
    // Behind a waypoint, a connection that did not come from it is refused before any policy.
    let (verdict, policy, rule, reason) = match guards.admit(identity) {
        Err(bypass) => ("deny".to_owned(), None, None, format!("deny: {bypass}")),
        Ok(()) => (
            decision.verdict.to_string(),
            decision.policy().map(|p| p.id.to_string()),
            rule,
            decision.to_string(),
        ),
    };
    let mtls = engine.peer_authentication.resolve(&dest, port);
    let waypoint_policies = match &destination.waypoint {
        Some(waypoint) => {
            let mut services: Vec<(&str, &str)> = Vec::new();
            for ip in &destination.ips {
                for s in state.services_by_endpoint(*ip) {
                    let id = (s.namespace.as_str(), s.name.as_str());
                    if !services.contains(&id) {
                        services.push(id);
                    }
                }
            }
            let target = WaypointTarget {
                gateway_namespace: &waypoint.namespace,
                gateway_name: &waypoint.name,
                services: &services,
            };
            engine
                .waypoint
                .applicable(&target)
                .iter()
                .map(|p| p.id.to_string())
                .collect()
        }
        None => Vec::new(),
    };
    Ok(Explanation {
        waypoint: destination
            .waypoint
            .as_ref()
            .map(|w| format!("{}/{}", w.namespace, w.name)),
        waypoint_policies,
        destination: Party::of(destination),
        port,
        connection: if source.enrolled {
            "mutual_tls"
        } else {
            "plaintext"
        },
        source,
        verdict,
        policy,
        rule,
        reason,
        waypoints,
        mtls_mode: mtls.mode.to_string(),
        mtls_policy: mtls.policy.map(|p| p.id.to_string()),
    })
}
