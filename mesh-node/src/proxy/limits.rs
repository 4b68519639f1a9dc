//! How much of the node one party may take: proxied connections in all, per source pod, and
//! unauthenticated handshakes on the HBONE port.
//!
//! Every proxied connection holds descriptors of the agent's, which all of the node's pods
//! share: without a cap, one pod opening connections as fast as it can (or a peer opening
//! handshakes it never finishes) uses them up, and every other pod's connections fail with it.
//! A connection over a limit is reset at once, counted by reason and logged (at most once per
//! interval per limit, so a flood cannot fill the log instead). The node-wide cap leaves room
//! under the descriptor limit for the admin, readiness and metrics listeners, HBONE
//! connections and the control plane.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{log_limit::LogLimit, metrics::FailureReason};

/// The caps, from the agent's `limits` configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Proxied connections held at once, both directions together.
    pub connections: usize,
    /// Outbound connections one source pod may hold at once.
    pub per_pod: usize,
    /// HBONE handshakes in progress at once (connections not yet authenticated).
    pub handshakes: usize,
}

/// Why a connection was refused; the variants render the metric reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "the node proxy holds {max} connections (limits.max_connections); check for a pod \
         leaking connections with `trellis_connection_failures_total{{reason=\"pod_connection_limit\"}}`"
    )]
    Node { max: usize },
    #[error("the source pod holds {max} connections (limits.max_connections_per_pod)")]
    Pod { max: usize },
    #[error(
        "{max} HBONE handshakes are in progress (limits.max_pending_handshakes); a peer may be \
         opening connections it never authenticates"
    )]
    Handshakes { max: usize },
}

impl LimitError {
    /// The `reason` label of `trellis_connection_failures_total`.
    pub fn reason(&self) -> FailureReason {
        match self {
            Self::Node { .. } => FailureReason::ConnectionLimit,
            Self::Pod { .. } => FailureReason::PodConnectionLimit,
            Self::Handshakes { .. } => FailureReason::HandshakeLimit,
        }
    }
}

/// The counts behind the caps (one per agent).
#[derive(Debug)]
pub struct Limits {
    caps: Caps,
    total: AtomicUsize,
    // Held only to adjust one count, never across an await.
    per_pod: Mutex<HashMap<u64, usize>>,
    handshakes: Arc<Semaphore>,
    /// One refusal log line per interval and limit.
    logs: [LogLimit; 3],
}

/// One held connection; dropping it gives the slot back.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<Limits>,
    pod: Option<u64>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
        if let Some(pod) = self.pod {
            let mut per_pod = self.limits.per_pod.lock();
            if let Some(count) = per_pod.get_mut(&pod) {
                *count -= 1;
                if *count == 0 {
                    per_pod.remove(&pod);
                }
            }
        }
    }
}

/// How often a refusal is logged, at most, per limit.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

impl Limits {
    pub fn new(caps: Caps) -> Arc<Self> {
        Arc::new(Self {
            caps,
            total: AtomicUsize::new(0),
            per_pod: Mutex::new(HashMap::new()),
            handshakes: Arc::new(Semaphore::new(caps.handshakes)),
            logs: std::array::from_fn(|_| LogLimit::new(LOG_INTERVAL)),
        })
    }

    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// A slot for one proxied connection, counted against `pod` (the source pod's cgroup id)
    /// as well when given.
    pub fn connection(self: &Arc<Self>, pod: Option<u64>) -> Result<Permit, LimitError> {
        let max = self.caps.connections;
        if self
            .total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            return Err(self.refused(LimitError::Node { max }));
        }
        // From here on, dropping the permit undoes the total.
        let mut permit = Permit {
            limits: self.clone(),
            pod: None,
        };
        if let Some(pod) = pod {
            let max = self.caps.per_pod;
            let mut per_pod = self.per_pod.lock();
            let count = per_pod.entry(pod).or_insert(0);
            if *count >= max {
                drop(per_pod);
                return Err(self.refused(LimitError::Pod { max }));
            }
            *count += 1;
            permit.pod = Some(pod);
        }
        Ok(permit)
    }

    /// A slot for one HBONE handshake, held until the peer is authenticated.
    pub fn handshake(&self) -> Result<OwnedSemaphorePermit, LimitError> {
        self.handshakes.clone().try_acquire_owned().map_err(|_| {
            self.refused(LimitError::Handshakes {
                max: self.caps.handshakes,
            })
        })
    }

    /// Proxied connections held now.
    pub fn connections(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    fn refused(&self, error: LimitError) -> LimitError {
        let log = match error {
            LimitError::Node { .. } => &self.logs[0],
            LimitError::Pod { .. } => &self.logs[1],
            LimitError::Handshakes { .. } => &self.logs[2],
        };
        if let Some(suppressed) = log.allow() {
            tracing::warn!(
                reason = error.reason().as_str(),
                suppressed,
                "connection refused: {error}"
            );
        }
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(connections: usize, per_pod: usize) -> Arc<Limits> {
        Limits::new(Caps {
            connections,
            per_pod,
            handshakes: 2,
        })
    }

    #[test]
    fn a_pod_at_its_cap_is_refused_while_others_still_connect() {
        let limits = limits(10, 2);
        let held: Vec<Permit> = (0..2)
            .map(|_| limits.connection(Some(1)).expect("under the pod cap"))
            .collect();
        assert_eq!(
            limits.connection(Some(1)).map(drop),
            Err(LimitError::Pod { max: 2 })
        );
        let other = limits.connection(Some(2)).expect("another pod connects");
        assert_eq!(limits.connections(), 3, "the refused one holds no slot");
        drop(held);
        limits.connection(Some(1)).expect("slots come back");
        drop(other);
    }

    #[test]
    fn the_node_cap_counts_every_connection() {
        let limits = limits(3, 3);
        let a = limits.connection(Some(1)).expect("1");
        let b = limits.connection(Some(2)).expect("2");
        let c = limits.connection(None).expect("3");
        assert_eq!(
            limits.connection(Some(3)).map(drop),
            Err(LimitError::Node { max: 3 })
        );
        drop((a, b, c));
        assert_eq!(limits.connections(), 0);
        assert!(
            limits.per_pod.lock().is_empty(),
            "pods without connections take no room"
        );
    }

    #[test]
    fn handshakes_beyond_the_cap_are_refused_until_one_finishes() {
        let limits = limits(10, 10);
        let first = limits.handshake().expect("1");
        let _second = limits.handshake().expect("2");
        assert_eq!(
            limits.handshake().map(drop),
            Err(LimitError::Handshakes { max: 2 })
        );
        drop(first);
        drop(
            limits
                .handshake()
                .expect("a finished handshake frees its slot"),
        );
    }
}
