//! Local rate limiting: token buckets of one waypoint replica, per route or per calling
//! identity.
//!
//! A bucket holds up to `burst` tokens and gains `requestsPerSecond` per second; a request
//! takes one token or is denied with the whole seconds until one is back (the caller answers
//! `429 Too Many Requests` with `retry-after`). With `per: route` the caller's route key (the
//! matched route, or the service when none matched) selects the bucket; with `per: source`
//! the caller's verified identity does, and every request without one shares a single bucket.
//! The buckets are `governor`'s (GCRA: one theoretical arrival time per key, in whole
//! nanoseconds), on tokio's clock, in a store of this module that bounds their number.
//!
//! Limits are per replica: a service behind `n` waypoint replicas admits up to `n` times the
//! rate.
//!
//! The number of buckets is bounded ([`DEFAULT_MAX_KEYS`]): a key that finds the table full
//! replaces the bucket that has refilled the most (the earliest arrival time), and the
//! buckets that have refilled completely are then dropped all at once: a full bucket is
//! exactly what a new key would get, so nothing is lost. Only when no bucket has refilled
//! does a key lose part of its state (it comes back with a fresh burst): a bounded leniency,
//! traded for memory that identities cannot grow.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use governor::{
    Quota,
    clock::Clock,
    middleware::NoOpMiddleware,
    nanos::Nanos,
    state::{StateStore, keyed::ShrinkableKeyedStateStore},
};
use parking_lot::Mutex;

/// The most buckets a limiter keeps.
pub const DEFAULT_MAX_KEYS: usize = 10_000;

/// What selects a request's bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RateLimitKey {
    #[default]
    Route,
    Source,
}

/// A compiled `rateLimit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitPolicy {
    pub requests_per_second: u32,
    pub burst: u32,
    pub per: RateLimitKey,
}

/// The verdict on one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateDecision {
    Allow,
    /// Deny; a token is back in this many whole seconds (at least 1).
    Deny {
        retry_after_secs: u64,
    },
}

/// `governor`'s time source: tokio's clock, so that the limiter follows paused time in tests
/// like every other resilience primitive.
#[derive(Clone, Debug)]
struct TokioClock(tokio::time::Instant);

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// The buckets' state, one arrival time per key and at most `max_keys` of them.
///
/// `governor`'s own keyed stores grow with every key they see until swept; this one never
/// holds more than its bound, whatever the keys a caller presents.
#[derive(Debug)]
struct BoundedCells {
    max_keys: usize,
    cells: Mutex<HashMap<String, Nanos>>,
    /// Set when a key had to take another's place: time to drop the refilled buckets.
    full: Arc<AtomicBool>,
}

impl BoundedCells {
    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<String, Nanos>> {
        // A poisoned lock only means another thread panicked between plain map updates.
        self.cells.lock()
    }
}

impl StateStore for BoundedCells {
    type Key = String;

    fn measure_and_replace<T, F, E>(&self, key: &String, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut cells = self.lock();
        let (result, arrival) = f(cells.get(key).copied())?;
        if let Some(cell) = cells.get_mut(key) {
            *cell = arrival;
            return Ok(result);
        }
        if cells.len() >= self.max_keys {
            // The earliest arrival time is the bucket holding the most tokens: replacing it
            // costs the least leniency.
            let fullest = cells
                .iter()
                .min_by_key(|(_, arrival)| **arrival)
                .map(|(key, _)| key.clone());
            if let Some(fullest) = fullest {
                cells.remove(&fullest);
            }
            self.full.store(true, Ordering::Relaxed);
        }
        cells.insert(key.clone(), arrival);
        Ok(result)
    }
}

impl ShrinkableKeyedStateStore<String> for BoundedCells {
    fn retain_recent(&self, drop_below: Nanos) {
        self.lock().retain(|_, arrival| *arrival > drop_below);
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

type Gcra = governor::RateLimiter<String, BoundedCells, TokioClock, NoOpMiddleware<Duration>>;

/// The buckets of one service.
#[derive(Debug)]
pub struct RateLimiter {
    policy: RateLimitPolicy,
    buckets: Gcra,
    /// The store's `full`.
    sweep: Arc<AtomicBool>,
}

impl RateLimiter {
    pub fn new(policy: RateLimitPolicy) -> Self {
        Self::with_max_keys(policy, DEFAULT_MAX_KEYS)
    }

    /// A limiter keeping at most `max_keys` (at least one) buckets.
    pub fn with_max_keys(policy: RateLimitPolicy, max_keys: usize) -> Self {
        // Compilation refuses zero for both; a zero here would otherwise deny everything.
        let nonzero = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(nonzero(policy.requests_per_second))
            .allow_burst(nonzero(policy.burst));
        let sweep = Arc::new(AtomicBool::new(false));
        let cells = BoundedCells {
            max_keys: max_keys.max(1),
            cells: Mutex::new(HashMap::new()),
            full: sweep.clone(),
        };
        let clock = TokioClock(tokio::time::Instant::now());
        Self {
            policy,
            buckets: governor::RateLimiter::new(quota, cells, clock),
            sweep,
        }
    }

    pub fn policy(&self) -> RateLimitPolicy {
        self.policy
    }

    /// Takes a token for a request on `route` from `source` (its verified identity, if any).
    pub fn check(&self, route: &str, source: Option<&str>) -> RateDecision {
        let key = match self.policy.per {
            RateLimitKey::Route => route,
            RateLimitKey::Source => source.unwrap_or(""),
        };
        let decision = self.buckets.check_key(&key.to_owned());
        // The store had to make room: drop every bucket that has refilled, so the next new
        // keys find room without replacing anyone.
        if self.sweep.swap(false, Ordering::Relaxed) {
            self.buckets.retain_recent();
        }
        match decision {
            Ok(()) => RateDecision::Allow,
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.buckets.clock().now());
                RateDecision::Deny {
                    retry_after_secs: (wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
                        .clamp(1, 86_400),
                }
            }
        }
    }

    /// Buckets kept now.
    pub fn keys(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limiter(rps: u32, burst: u32, per: RateLimitKey) -> RateLimiter {
        RateLimiter::new(RateLimitPolicy {
            requests_per_second: rps,
            burst,
            per,
        })
    }

    fn allowed(l: &RateLimiter, route: &str, source: Option<&str>, n: usize) -> usize {
        (0..n)
            .filter(|_| l.check(route, source) == RateDecision::Allow)
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_steady_rate() {
        let l = limiter(10, 20, RateLimitKey::Route);
        assert_eq!(allowed(&l, "r", None, 100), 20, "the burst");
        assert_eq!(
            l.check("r", None),
            RateDecision::Deny {
                retry_after_secs: 1
            }
        );
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(allowed(&l, "r", None, 100), 5, "10/s for half a second");
        for _ in 0..10 {
            tokio::time::advance(Duration::from_secs(1)).await;
            assert_eq!(allowed(&l, "r", None, 100), 10);
        }
        // Idle time refills up to the burst, not beyond.
        tokio::time::advance(Duration::from_mins(1)).await;
        assert_eq!(allowed(&l, "r", None, 100), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_denial_says_when_a_token_is_back() {
        let l = limiter(1, 1, RateLimitKey::Route);
        assert_eq!(l.check("r", None), RateDecision::Allow);
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(
            l.check("r", None),
            RateDecision::Deny {
                retry_after_secs: 1
            }
        );
        tokio::time::advance(Duration::from_millis(800)).await;
        assert_eq!(l.check("r", None), RateDecision::Allow);
    }

    #[tokio::test(start_paused = true)]
    async fn per_source_buckets_are_independent() {
        let l = limiter(1, 3, RateLimitKey::Source);
        let (a, b) = (
            Some("cluster.local/ns/shop/sa/a"),
            Some("cluster.local/ns/shop/sa/b"),
        );
        assert_eq!(allowed(&l, "r1", a, 10), 3);
        assert_eq!(allowed(&l, "r2", a, 10), 0, "the route does not matter");
        assert_eq!(allowed(&l, "r1", b, 10), 3);
        assert_eq!(
            allowed(&l, "r1", None, 10),
            3,
            "anonymous callers share one"
        );
        assert_eq!(allowed(&l, "r1", None, 10), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn per_route_buckets_ignore_the_source() {
        let l = limiter(1, 2, RateLimitKey::Route);
        assert_eq!(allowed(&l, "r1", Some("a"), 1), 1);
        assert_eq!(allowed(&l, "r1", Some("b"), 10), 1);
        assert_eq!(allowed(&l, "r2", Some("b"), 10), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_key_limit_replaces_the_fullest_bucket_then_drops_the_refilled_ones() {
        let policy = RateLimitPolicy {
            requests_per_second: 1,
            burst: 5,
            per: RateLimitKey::Route,
        };
        let l = RateLimiter::with_max_keys(policy, 3);
        assert_eq!(allowed(&l, "a", None, 5), 5);
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(allowed(&l, "b", None, 5), 5);
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(allowed(&l, "c", None, 5), 5);
        // Full table, no bucket refilled: the one holding the most tokens ("a", emptied
        // first) goes.
        assert_eq!(allowed(&l, "d", None, 1), 1);
        assert_eq!(l.keys(), 3);
        assert_eq!(allowed(&l, "b", None, 1), 0, "b kept its empty bucket");
        assert_eq!(allowed(&l, "c", None, 1), 0, "c kept its empty bucket");
        // The evicted key starts over with a full burst (the documented leniency)...
        assert_eq!(allowed(&l, "a", None, 5), 5);
        assert_eq!(l.keys(), 3);
        // ...and once buckets have refilled they are dropped, all at once.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(allowed(&l, "e", None, 1), 1);
        assert_eq!(l.keys(), 1);
    }
}
