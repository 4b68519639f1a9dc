//! Local rate limiting: token buckets of one waypoint replica, per route or per calling
//! identity.
//!
//! A bucket holds up to `burst` tokens and gains `requestsPerSecond` per second; a request
//! takes one token or is denied with the whole seconds until one is back (the caller answers
//! `429 Too Many Requests` with `retry-after`). With `per: route` the caller's route key (the
//! matched route, or the service when none matched) selects the bucket; with `per: source`
//! the caller's verified identity does, and every request without one shares a single bucket.
//!
//! Limits are per replica: a service behind `n` waypoint replicas admits up to `n` times the
//! rate.
//!
//! The number of buckets is bounded ([`DEFAULT_MAX_KEYS`]). When a new key finds the table
//! full, every bucket that has refilled completely is dropped first: a full bucket is exactly
//! what a new key would get, so nothing is lost. Only if none has, the least recently used
//! bucket is dropped, which gives that key a fresh burst when it comes back; a bounded
//! leniency, traded for memory that identities cannot grow.

use std::{collections::HashMap, sync::Mutex};

use tokio::time::Instant;

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

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// The tokens at `now`, without taking any.
    fn level(&self, now: Instant, policy: &RateLimitPolicy) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * f64::from(policy.requests_per_second)).min(f64::from(policy.burst))
    }
}

/// The buckets of one service.
#[derive(Debug)]
pub struct RateLimiter {
    policy: RateLimitPolicy,
    max_keys: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    pub fn new(policy: RateLimitPolicy) -> Self {
        Self::with_max_keys(policy, DEFAULT_MAX_KEYS)
    }

    /// A limiter keeping at most `max_keys` (at least one) buckets.
    pub fn with_max_keys(policy: RateLimitPolicy, max_keys: usize) -> Self {
        Self {
            policy,
            max_keys: max_keys.max(1),
            buckets: Mutex::new(HashMap::new()),
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
        let now = Instant::now();
        let policy = &self.policy;
        // A poisoned lock only means another thread panicked between plain field updates.
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !buckets.contains_key(key) {
            if buckets.len() >= self.max_keys {
                buckets.retain(|_, b| b.level(now, policy) < f64::from(policy.burst));
            }
            if buckets.len() >= self.max_keys {
                let oldest = buckets
                    .iter()
                    .min_by_key(|(_, b)| b.last)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    buckets.remove(&oldest);
                }
            }
            buckets.insert(
                key.to_owned(),
                Bucket {
                    tokens: f64::from(policy.burst),
                    last: now,
                },
            );
        }
        let Some(bucket) = buckets.get_mut(key) else {
            // Just inserted; unreachable, and denying nothing is the harmless answer.
            return RateDecision::Allow;
        };
        let tokens = bucket.level(now, policy);
        bucket.last = now;
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            return RateDecision::Allow;
        }
        bucket.tokens = tokens;
        // With whole requests per second the wait is at most a second; computed anyway so a
        // finer rate would still get an honest answer.
        let wait = (1.0 - tokens) / f64::from(policy.requests_per_second.max(1));
        RateDecision::Deny {
            retry_after_secs: wait.ceil().clamp(1.0, 86_400.0) as u64,
        }
    }

    /// Buckets kept now.
    pub fn keys(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
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
        tokio::time::advance(Duration::from_secs(60)).await;
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
    async fn the_key_limit_evicts_full_buckets_first_then_the_least_recent() {
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
        // Full table, no bucket refilled: the least recently used ("a") goes.
        assert_eq!(allowed(&l, "d", None, 1), 1);
        assert_eq!(l.keys(), 3);
        assert_eq!(allowed(&l, "b", None, 1), 0, "b kept its empty bucket");
        assert_eq!(allowed(&l, "c", None, 1), 0, "c kept its empty bucket");
        // The evicted key starts over with a full burst (the documented leniency)...
        assert_eq!(allowed(&l, "a", None, 5), 5);
        assert_eq!(l.keys(), 3);
        // ...and once buckets have refilled they are dropped first, all at once.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(allowed(&l, "e", None, 1), 1);
        assert_eq!(l.keys(), 1);
    }
}
