//! Circuit breaking: limits per destination service on the waypoint's concurrent upstream
//! connections, concurrent requests and requests queued for a request slot.
//!
//! A request takes a [`RequestPermit`] for as long as it is in flight upstream. When all
//! `maxRequests` slots are taken it waits in a first-come queue of at most
//! `maxPendingRequests` (the caller bounds the wait with the route's timeout); beyond that it
//! overflows at once. Connections are never waited for: the connection pool takes a
//! [`ConnectionPermit`] per upstream connection it opens and, on overflow, reuses an existing
//! connection or fails the request.
//!
//! On overflow the caller answers `503 Service Unavailable` with the response header
//! [`OVERFLOW_HEADER`] (`trellis-overflow`) set to [`Overflow::as_str`] (`connections` or
//! `pending-requests`), so a client or an operator can tell a local limit from an upstream
//! failure. The name has no `x-` prefix (RFC 6648); it is a response header the waypoint sets
//! itself and never reads.
//!
//! Permits release their slot when dropped, including when a waiting future is cancelled.

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The response header naming which limit refused a request.
pub const OVERFLOW_HEADER: &str = "trellis-overflow";

/// The queue length when `maxPendingRequests` is absent: requests are already bounded by the
/// waypoint's listener limits, this only keeps the queue from being their sum.
pub const DEFAULT_MAX_PENDING_REQUESTS: u32 = 1024;

/// A compiled `connectionPool`; `None` is unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLimits {
    pub max_connections: Option<u32>,
    /// Only matters with `max_requests`: the waiting room for a request slot.
    pub max_pending_requests: u32,
    pub max_requests: Option<u32>,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            max_connections: None,
            max_pending_requests: DEFAULT_MAX_PENDING_REQUESTS,
            max_requests: None,
        }
    }
}

/// Which limit refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Overflow {
    #[error("the service's connection limit (maxConnections) is reached")]
    Connections,
    #[error(
        "the service's request limit (maxRequests) is reached and its queue (maxPendingRequests) is full"
    )]
    PendingRequests,
}

impl Overflow {
    /// The value of [`OVERFLOW_HEADER`].
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::PendingRequests => "pending-requests",
        }
    }
}

/// The limits of one destination service and their current use.
#[derive(Debug)]
pub struct CircuitBreaker {
    limits: PoolLimits,
    connections: Option<Arc<Semaphore>>,
    requests: Option<Arc<Semaphore>>,
    pending: Arc<AtomicU32>,
}

/// One upstream connection's slot; released on drop.
#[derive(Debug)]
pub struct ConnectionPermit {
    _slot: Option<OwnedSemaphorePermit>,
}

/// One in-flight request's slot; released on drop.
#[derive(Debug)]
pub struct RequestPermit {
    _slot: Option<OwnedSemaphorePermit>,
}

/// A place in the queue; leaves it on drop (a cancelled wait included).
struct Pending(Arc<AtomicU32>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn semaphore(limit: Option<u32>) -> Option<Arc<Semaphore>> {
    // Limits are bounded far below `Semaphore::MAX_PERMITS` by the compiler; clamp anyway.
    limit.map(|n| {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS)))
    })
}

impl CircuitBreaker {
    pub fn new(limits: PoolLimits) -> Self {
        Self {
            limits,
            connections: semaphore(limits.max_connections),
            requests: semaphore(limits.max_requests),
            pending: Arc::new(AtomicU32::new(0)),
        }
    }

    pub fn limits(&self) -> PoolLimits {
        self.limits
    }

    /// A slot for a new upstream connection, or [`Overflow::Connections`].
    pub fn try_connection(&self) -> Result<ConnectionPermit, Overflow> {
        let Some(connections) = &self.connections else {
            return Ok(ConnectionPermit { _slot: None });
        };
        match connections.clone().try_acquire_owned() {
            Ok(slot) => Ok(ConnectionPermit { _slot: Some(slot) }),
            Err(_) => Err(Overflow::Connections),
        }
    }

    /// A slot for a request: at once if one is free, after queueing if the queue has room,
    /// otherwise [`Overflow::PendingRequests`]. Cancel-safe.
    pub async fn request(&self) -> Result<RequestPermit, Overflow> {
        let Some(requests) = &self.requests else {
            return Ok(RequestPermit { _slot: None });
        };
        if let Ok(slot) = requests.clone().try_acquire_owned() {
            return Ok(RequestPermit { _slot: Some(slot) });
        }
        let max = self.limits.max_pending_requests;
        let _queued = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| Pending(self.pending.clone()))
            .map_err(|_| Overflow::PendingRequests)?;
        // The semaphore is never closed; were it, refusing is the safe answer.
        let slot = requests
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Overflow::PendingRequests)?;
        Ok(RequestPermit { _slot: Some(slot) })
    }

    /// Requests waiting for a slot now.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use futures_util::FutureExt;

    use super::*;

    fn breaker(connections: Option<u32>, pending: u32, requests: Option<u32>) -> CircuitBreaker {
        CircuitBreaker::new(PoolLimits {
            max_connections: connections,
            max_pending_requests: pending,
            max_requests: requests,
        })
    }

    #[test]
    fn connections_overflow_at_the_limit_and_free_on_drop() {
        let b = breaker(Some(2), 0, None);
        let first = b.try_connection().expect("first connection");
        let _second = b.try_connection().expect("second connection");
        assert_eq!(b.try_connection().err(), Some(Overflow::Connections));
        drop(first);
        assert!(b.try_connection().is_ok());
    }

    #[tokio::test]
    async fn without_limits_nothing_overflows() {
        let b = CircuitBreaker::new(PoolLimits::default());
        let permits: Vec<_> = (0..10_000).map(|_| b.try_connection()).collect();
        assert!(permits.iter().all(Result::is_ok));
        let mut requests = Vec::new();
        for _ in 0..10_000 {
            requests.push(b.request().await.expect("no request limit"));
        }
    }

    #[tokio::test]
    async fn requests_queue_up_to_the_pending_limit_then_overflow() {
        let b = breaker(None, 1, Some(1));
        let in_flight = b.request().await.expect("a free slot");

        let mut queued = pin!(b.request());
        assert!(
            queued.as_mut().now_or_never().is_none(),
            "waits for the slot"
        );
        assert_eq!(b.pending(), 1);
        assert_eq!(b.request().await.err(), Some(Overflow::PendingRequests));

        drop(in_flight);
        let Some(Ok(_next)) = queued.as_mut().now_or_never() else {
            panic!("the queued request gets the freed slot");
        };
        assert_eq!(b.pending(), 0);
    }

    #[tokio::test]
    async fn without_a_queue_a_full_service_overflows_at_once() {
        let b = breaker(None, 0, Some(2));
        let _a = b.request().await.expect("slot 1");
        let _b = b.request().await.expect("slot 2");
        assert_eq!(b.request().await.err(), Some(Overflow::PendingRequests));
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_the_queue() {
        let b = breaker(None, 1, Some(1));
        let _in_flight = b.request().await.expect("a free slot");
        {
            let mut queued = pin!(b.request());
            assert!(queued.as_mut().now_or_never().is_none());
            assert_eq!(b.pending(), 1);
        }
        assert_eq!(b.pending(), 0, "the dropped wait freed its place");
        let mut again = pin!(b.request());
        assert!(
            again.as_mut().now_or_never().is_none(),
            "queues instead of overflowing"
        );
    }

    #[test]
    fn overflow_header_values_are_stable() {
        assert_eq!(OVERFLOW_HEADER, "trellis-overflow");
        assert_eq!(Overflow::Connections.as_str(), "connections");
        assert_eq!(Overflow::PendingRequests.as_str(), "pending-requests");
    }
}
