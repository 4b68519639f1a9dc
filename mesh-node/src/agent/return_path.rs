//! Keeps the client-address return path on the links of the node's pods (see
//! [`crate::ebpf::ReturnPath`]): on every new state, and every second for links that appear
//! after their pod is known (a CNI plugs a pod in after the API server lists it).

use std::{net::IpAddr, sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{ebpf::ReturnPath, state::MeshState};

/// How often links are checked between states.
const TICK: Duration = Duration::from_secs(1);
/// Every this many ticks, every pod's route is asked again (a pod's link may change under the
/// same address).
const FULL_EVERY: u32 = 30;

pub async fn run(
    mut return_path: ReturnPath,
    mut states: watch::Receiver<Option<Arc<MeshState>>>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u32 = 0;
    loop {
        let pods = states
            .borrow_and_update()
            .as_deref()
            .map(local_pod_ips)
            .unwrap_or_default();
        return_path
            .sync(&pods, ticks.is_multiple_of(FULL_EVERY))
            .await;
        ticks = ticks.wrapping_add(1);
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = states.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
    }
}

/// The addresses of the pods on this node.
pub fn local_pod_ips(state: &MeshState) -> Vec<IpAddr> {
    state
        .workloads()
        .iter()
        .filter(|w| state.is_local(w))
        .flat_map(|w| w.ips.iter().copied())
        .collect()
}
