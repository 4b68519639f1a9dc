//! The datapath owner: the only task that writes the enrollment map.
//!
//! It follows the published mesh state and makes the map exactly the cgroups of the enrolled
//! local pods, each with its inbound mutual TLS mode, so pods join and leave the mesh and
//! change mode without restarting. Entries are keyed by cgroup
//! id, which belongs to one pod's directory: a new pod reusing an old pod's IP has its own.

use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    ebpf::{EbpfError, Enroller, PodCgroup},
    state::MeshState,
};

/// Something holding the set of redirected pod cgroups.
pub trait Enroll: Send {
    fn enroll(&mut self, pods: &[PodCgroup]) -> Result<(), EbpfError>;
}

impl Enroll for Enroller {
    fn enroll(&mut self, pods: &[PodCgroup]) -> Result<(), EbpfError> {
        Enroller::enroll(self, pods)
    }
}

/// Reconciles the map with every new state until `shutdown`. `synced` fires after the first
/// state was applied (readiness). `None` (no state yet) leaves the map as pinned.
pub async fn run(
    mut enroller: impl Enroll,
    mut states: watch::Receiver<Option<Arc<MeshState>>>,
    synced: oneshot::Sender<()>,
    shutdown: CancellationToken,
) {
    let mut synced = Some(synced);
    let mut last: Vec<PodCgroup> = Vec::new();
    loop {
        let state = states.borrow_and_update().clone();
        if let Some(state) = state {
            let mut wanted: Vec<PodCgroup> = state.local_cgroups().to_vec();
            wanted.sort_unstable_by_key(|c| c.id);
            // The same pods in the same modes (another node's pod changed) need no map traffic.
            if synced.is_some() || wanted != last {
                match enroller.enroll(state.local_cgroups()) {
                    Ok(()) => {
                        tracing::info!(pods = wanted.len(), "enrollment updated");
                        last = wanted;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "enrollment incomplete");
                        // Try the full set again on the next change.
                        last.clear();
                    }
                }
            }
            if let Some(synced) = synced.take() {
                let _ = synced.send(());
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = states.changed() => if changed.is_err() { return },
        }
    }
}
