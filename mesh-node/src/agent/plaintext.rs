//! Aborts open plaintext connections to local pods once a policy change refuses plaintext on
//! their port.
//!
//! The kernel judges plaintext at the SYN only (see ARCHITECTURE.md, "Plaintext in the
//! kernel"), so connections it let in before the change would live on. This task follows the
//! published states; when a local pod's plaintext refusals change, it lists the pod's
//! connections (in its network namespace, through sock_diag) and aborts those that came
//! straight to a listening port that now refuses plaintext: not from an address of the node
//! (the proxy delivering mesh traffic, kubelet probes), not one the proxy delivered from the
//! client's address (its exact 4-tuple is in the datapath's `DELIVERIES`), not from the pod
//! itself. Both ends see a reset, as with a connection the proxy closes.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    ebpf::{Deliveries, InboundMtls, PodCgroup},
    metrics::{Direction, FailureReason, Metrics},
    sock_diag::{self, SockDiagError, TCP_LISTEN},
    state::{MeshState, canonical},
};

/// Connection states worth aborting: open, being opened, or half-closed by the peer.
const OPEN_STATES: u32 = (1 << 1) | (1 << 3) | (1 << 8);

pub async fn run(
    mut states: watch::Receiver<Option<Arc<MeshState>>>,
    metrics: Arc<Metrics>,
    deliveries: Option<Arc<Deliveries>>,
    shutdown: CancellationToken,
) {
    let mut last: Option<HashMap<u64, InboundMtls>> = None;
    loop {
        let state = states.borrow_and_update().clone();
        if let Some(state) = state {
            let now: HashMap<u64, InboundMtls> = state
                .local_cgroups()
                .iter()
                .map(|c| (c.id, c.inbound.clone()))
                .collect();
            // Pods whose refusals changed; the first state has nothing to compare with.
            let changed: Vec<PodCgroup> = match &last {
                Some(last) => state
                    .local_cgroups()
                    .iter()
                    .filter(|c| last.get(&c.id).is_some_and(|before| *before != c.inbound))
                    .cloned()
                    .collect(),
                None => Vec::new(),
            };
            last = Some(now);
            for pod in changed {
                let path = pod.path.display().to_string();
                let deliveries = deliveries.clone();
                match tokio::task::spawn_blocking(move || abort_refused(&pod, deliveries)).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(aborted)) => {
                        for _ in 0..aborted {
                            metrics.fail(Direction::Inbound, FailureReason::PlaintextRevoked);
                        }
                        tracing::info!(
                            cgroup = path,
                            aborted,
                            "aborted open plaintext connections the new policies refuse"
                        );
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(cgroup = path, error = %e, "cannot abort plaintext connections the new policies refuse");
                    }
                    Err(e) => {
                        tracing::warn!(cgroup = path, error = %e, "plaintext abort task failed");
                    }
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = states.changed() => if changed.is_err() { return },
        }
    }
}

/// Aborts the pod's plaintext connections on listening ports that now refuse plaintext;
/// returns how many.
fn abort_refused(
    pod: &PodCgroup,
    deliveries: Option<Arc<Deliveries>>,
) -> Result<usize, SockDiagError> {
    let node = node_addresses();
    let inbound = pod.inbound.clone();
    sock_diag::in_pod_netns(&pod.path, move |session| {
        let listening: std::collections::HashSet<u16> = session
            .list(1 << TCP_LISTEN)?
            .iter()
            .map(|s| s.local.1)
            .collect();
        let mut aborted = 0;
        for socket in session.list(OPEN_STATES)? {
            let (local, port) = socket.local;
            let remote = canonical(socket.remote.0);
            let plaintext_in = listening.contains(&port)
                && !remote.is_loopback()
                && remote != canonical(local)
                && !node.contains(&remote)
                && !deliveries.as_ref().is_some_and(|d| {
                    d.contains(
                        SocketAddr::new(remote, socket.remote.1),
                        SocketAddr::new(canonical(local), port),
                    )
                });
            if plaintext_in && inbound.is_strict(port) && session.destroy(&socket).is_ok() {
                aborted += 1;
            }
        }
        Ok(aborted)
    })
}

/// The addresses of the agent's own (the node's) network namespace.
fn node_addresses() -> Vec<IpAddr> {
    nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| {
                    let addr = a.address?;
                    addr.as_sockaddr_in()
                        .map(|s| IpAddr::V4(s.ip()))
                        .or_else(|| addr.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
                })
                .map(canonical)
                .collect()
        })
        .unwrap_or_default()
}
