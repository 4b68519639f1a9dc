//! Open inbound connections and what they were authorized on, so that a policy change can
//! re-evaluate them and close the ones it now denies.
//!
//! Each delivered connection registers the facts its decision was made on (destination
//! workload, port, verified source identity and address) and gets a cancellation token; the
//! registration is dropped with the connection. [`Authorized::reevaluate`] runs the engine of a
//! new state over every open connection, with the destination's labels as that state knows
//! them (and the waypoints it must now be reached through), and cancels those now denied,
//! recording why for the access log.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::{
    identity::Identity,
    policy::{Destination, Flow},
    state::MeshState,
};

/// The facts a connection was authorized on.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Uid of the destination workload.
    pub destination_uid: String,
    pub port: u16,
    pub source: Identity,
    pub source_ip: Option<IpAddr>,
}

#[derive(Debug)]
struct Open {
    grant: Grant,
    close: CancellationToken,
    revoked: Arc<OnceLock<String>>,
}

/// The registry of open inbound connections (one per agent).
#[derive(Debug, Default)]
pub struct Authorized {
    next: AtomicU64,
    // Held only for map edits and one pass of re-evaluation, never across an await.
    open: Mutex<HashMap<u64, Open>>,
}

/// A registered connection; dropping it unregisters.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Authorized>,
    id: u64,
    /// Cancelled when a policy change denies the connection.
    pub close: CancellationToken,
    revoked: Arc<OnceLock<String>>,
}

impl Registration {
    /// Why the connection was revoked, once it has been.
    pub fn revoked(&self) -> Option<&str> {
        self.revoked.get().map(String::as_str)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.open.lock().remove(&self.id);
    }
}

impl Authorized {
    pub fn register(self: &Arc<Self>, grant: Grant) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        let revoked = Arc::new(OnceLock::new());
        self.open.lock().insert(
            id,
            Open {
                grant,
                close: close.clone(),
                revoked: revoked.clone(),
            },
        );
        Registration {
            registry: self.clone(),
            id,
            close,
            revoked,
        }
    }

    /// Re-decides every open connection with `state`'s policies; closes the denied ones and
    /// returns how many. A connection whose destination is no longer known is left to end
    /// by itself (the pod is gone or leaving, and its connections with it).
    pub fn reevaluate(&self, state: &MeshState) -> usize {
        let open = self.open.lock();
        let engine = state.policy();
        // Destinations are this node's pods.
        let local: HashMap<&str, &crate::state::workload::Workload> = state
            .workloads()
            .iter()
            .filter(|w| state.is_local(w))
            .map(|w| (w.uid.as_str(), &**w))
            .collect();
        let mut closed = 0;
        for conn in open.values() {
            if conn.close.is_cancelled() {
                continue;
            }
            let Some(destination) = local.get(conn.grant.destination_uid.as_str()) else {
                continue;
            };
            if let Err(bypass) = state.guards(destination).admit(Some(&conn.grant.source)) {
                let _ = conn.revoked.set(bypass.to_string());
                conn.close.cancel();
                closed += 1;
                continue;
            }
            let decision = engine.decide(&Flow {
                destination: Destination::of(destination),
                port: conn.grant.port,
                source: Some(&conn.grant.source),
                source_ip: conn.grant.source_ip,
            });
            if !decision.is_allowed() {
                let _ = conn.revoked.set(decision.to_string());
                conn.close.cancel();
                closed += 1;
            }
        }
        closed
    }
}
