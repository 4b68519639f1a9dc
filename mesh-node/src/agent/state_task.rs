//! The state task: the single writer of the mesh state in live mode.
//!
//! It turns each set of resources from the feed (workloads, nodes, services) into an immutable
//! [`MeshState`], with the cgroups of local pods found from their uids and the policies in
//! force (and from them each local pod's plaintext mode), swaps it in for the
//! proxy, and publishes it to the tasks that follow the state (enrollment, certificates). Pods
//! whose cgroup is not found are retried on a timer (the discovery rate-limits walks), so they
//! never hold up the others.

use std::{collections::HashSet, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::cgroups::CgroupDiscovery;
use crate::{
    control_plane::feed::{Applied, Resource, Resources},
    policy::{Engine, Policy},
    state::MeshState,
};

/// Longest wait between two looks for missing pod cgroups.
const MAX_RETRY: Duration = Duration::from_secs(30);

pub struct StateTask {
    pub local_node: String,
    /// Namespace whose policies apply mesh-wide.
    pub root_namespace: String,
    pub state: Arc<ArcSwap<MeshState>>,
    pub publish: watch::Sender<Option<Arc<MeshState>>>,
    pub cgroups: CgroupDiscovery,
    pub applied: mpsc::Receiver<Applied>,
}

impl StateTask {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut resources: Option<Arc<Resources>> = None;
        let mut pending: HashSet<String> = HashSet::new();
        let mut retry = super::cgroups::MIN_RESCAN;
        loop {
            let retry_at = self
                .cgroups
                .next_rescan()
                .max(tokio::time::Instant::now() + retry);
            tokio::select! {
                () = shutdown.cancelled() => return,
                applied = self.applied.recv() => {
                    let Some(applied) = applied else { return };
                    resources = Some(applied.resources);
                    pending = self.rebuild(resources.as_deref(), &pending);
                    retry = super::cgroups::MIN_RESCAN;
                    tracing::debug!(version = applied.version, "mesh state published");
                    let _ = applied.done.send(());
                }
                () = tokio::time::sleep_until(retry_at), if !pending.is_empty() => {
                    let before = pending.len();
                    pending = self.rebuild(resources.as_deref(), &pending);
                    retry = if pending.len() < before {
                        super::cgroups::MIN_RESCAN
                    } else {
                        (retry * 2).min(MAX_RETRY)
                    };
                }
            }
        }
    }

    /// Builds and publishes the state; returns the uids of local pods still without cgroup.
    fn rebuild(
        &mut self,
        resources: Option<&Resources>,
        was_pending: &HashSet<String>,
    ) -> HashSet<String> {
        let Some(resources) = resources else {
            return HashSet::new();
        };
        let workloads = resources.values().filter_map(|r| match r {
            Resource::Workload(w) => Some(w.clone()),
            _ => None,
        });
        let nodes = resources.values().filter_map(|r| match r {
            Resource::Node(n) => Some(n.clone()),
            _ => None,
        });
        let services = resources.values().filter_map(|r| match r {
            Resource::Service(s) => Some(s.clone()),
            _ => None,
        });
        let waypoints = resources.values().filter_map(|r| match r {
            Resource::Waypoint(w) => Some(w.clone()),
            _ => None,
        });
        let mut authorization = Vec::new();
        let mut peer_authentication = Vec::new();
        for resource in resources.values() {
            match resource {
                Resource::Policy(p) => match &**p {
                    Policy::Authorization(p) => authorization.push(p.clone()),
                    Policy::PeerAuthentication(p) => peer_authentication.push(p.clone()),
                    // Read by waypoints only: node agents do not see requests.
                    Policy::RequestAuthentication(_) => {}
                },
                Resource::Workload(_)
                | Resource::Node(_)
                | Resource::Service(_)
                | Resource::Waypoint(_)
                | Resource::Route(_) => {}
            }
        }
        let cgroups = &mut self.cgroups;
        let mut state = MeshState::build(&self.local_node, workloads, nodes, services, |w| {
            cgroups.find(&w.uid)
        });
        state.set_waypoints(waypoints);
        // Same snapshot, same swap: a pod and the policies that protect it appear together.
        let policy = Engine::new(&self.root_namespace, authorization, peer_authentication);
        state.set_policy(Arc::new(policy));
        let pending: HashSet<String> = state
            .pending_cgroups()
            .iter()
            .map(|w| w.uid.clone())
            .collect();
        for w in state.pending_cgroups() {
            if !was_pending.contains(&w.uid) {
                tracing::warn!(uid = %w.uid, namespace = %w.namespace, workload = %w.name, "pod cgroup not found; pod not redirected until it appears (retrying)");
            }
        }
        for w in state.workloads() {
            if was_pending.contains(&w.uid) && w.cgroup.is_some() && !pending.contains(&w.uid) {
                tracing::info!(uid = %w.uid, namespace = %w.namespace, workload = %w.name, "pod cgroup found");
            }
        }
        let state = Arc::new(state);
        self.state.store(state.clone());
        self.publish.send_replace(Some(state));
        pending
    }
}
