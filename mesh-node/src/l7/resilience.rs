//! Resilience of the Services behind a waypoint: the `TrafficPolicy` custom resource, its
//! compilation, and the runtime primitives the waypoint's request pipeline calls.
//!
//! ## Contract: `traffic.trellis.dev/v1` `TrafficPolicy`
//!
//! A namespaced custom resource with a status subresource carrying `conditions` (the shape of
//! the policy CRDs': one `Accepted` condition with `observedGeneration`). Generated from
//! [`crate::k8s::traffic_policy`] by [`crd_yaml`]. Spec fields, camelCase, every section optional except
//! `targetRefs`:
//!
//! ```yaml
//! targetRefs: [{group: "", kind: Service, name: reviews}]  # 1 to 16 Services of this namespace
//! retries:
//!   attempts: 3                 # retries after the first try, 0 to 10; required
//!   perTryTimeout: 500ms        # absent: each try bounded only by the route's timeout
//!   retryOn: [5xx, gateway-error, connect-failure, reset, retriable-status-codes]
//!                               # absent: [connect-failure, reset, gateway-error]
//!   retriableStatusCodes: [409] # 400 to 599; exactly when retryOn has retriable-status-codes
//!   budget: {percent: 20, minRetriesPerSecond: 10}   # these are the defaults
//! connectionPool: {maxConnections: 100, maxPendingRequests: 64, maxRequests: 1024}
//!                               # absent limits are unlimited; maxPendingRequests defaults to 1024
//! outlierDetection: {consecutiveErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 10}
//!                               # these are the defaults
//! fault: {delay: {fixedDelay: 2s, percent: 10}, abort: {httpStatus: 503, percent: 5}}
//!                               # percent required; httpStatus 400 to 599
//! rateLimit: {requestsPerSecond: 100, burst: 200, per: route}
//!                               # burst defaults to requestsPerSecond; per: route (default) or source
//! ```
//!
//! Durations use the Gateway API syntax (`500ms`, `2s`, `1m`, `1h30m`), above zero and at
//! most one hour; percentages are integers 0 to 100. Unknown fields are kept by the API server
//! and reject the object, like every other bad value: [`TrafficPolicy::compile`] returns a
//! [`TrafficPolicyError`] whose message starts with the field's path, and the object is
//! rejected alone and has no effect (its Services are proxied as if it did not exist;
//! resilience settings only ever restrict or delay traffic, so none of this opens access).
//! Two policies on one Service: the first in `namespace/name` order applies
//! ([`Registry::condition`] reports `Conflicted` on the other).
//!
//! ## Parts
//!
//! - [`crate::k8s::traffic_policy`] (`crd` here): the resource's types and generated CRD; [`compile`]: validation into
//!   [`Resilience`] and the `Accepted` condition.
//! - [`retry`]: which failed tries are retried (only where repeating is safe), backoff, and
//!   the per-Service retry budget.
//! - [`breaker`]: connection, request and queue limits, as RAII permits.
//! - [`outlier`]: ejection of endpoints that keep failing.
//! - [`fault`]: delay and abort injection.
//! - [`rate_limit`]: local token buckets per route or per source identity.
//! - [`registry`]: each Service's policy and state ([`ServiceResilience`]), rebuilt on
//!   config updates without losing the state of unchanged sections.
//!
//! ## Per request (the waypoint's pipeline)
//!
//! 1. [`ServiceResilience::check_rate`]: on `Deny`, answer 429 with `retry-after`.
//! 2. [`ServiceResilience::fault`]: sleep the delay, then answer the abort status, if drawn.
//! 3. [`ServiceResilience::admit`]: hold the permit until the response; on overflow answer
//!    503 with [`breaker::OVERFLOW_HEADER`].
//! 4. Classify the request once with [`retry::Replay::of`] (bodies buffered up to
//!    [`retry::MAX_RETRY_BODY_BYTES`]); per try: pick an endpoint among
//!    [`ServiceResilience::choose`], take [`ServiceResilience::connection`] for a new
//!    upstream connection, bound the try by [`ServiceResilience::per_try_timeout`], then
//!    [`ServiceResilience::after_try`] records the outcome and says whether (and after which
//!    backoff) to retry.
//!
//! All time is [`tokio::time::Instant`], read when a primitive is used (no timers), so tests
//! run on paused time; randomness comes from the caller's [`fastrand::Rng`].

pub mod breaker;
pub mod compile;
pub mod fault;
pub mod outlier;
pub mod rate_limit;
pub mod registry;
pub mod retry;

pub use breaker::{
    CircuitBreaker, ConnectionPermit, OVERFLOW_HEADER, Overflow, PoolLimits, RequestPermit,
};
pub use compile::{TrafficPolicyError, condition};
pub use crd::{TrafficPolicy, TrafficPolicySpec, crd_yaml};
pub use fault::{FaultDecision, FaultPolicy};
pub use outlier::{OutlierDetector, OutlierPolicy};
pub use rate_limit::{RateDecision, RateLimitKey, RateLimitPolicy, RateLimiter};
pub use registry::{Conflict, Registry, ServiceResilience};
pub use retry::{NoRetry, Outcome, Replay, RetryBudget, RetryPolicy};

// The resource as written, as this module's files name it.
use crate::k8s::traffic_policy as crd;
use crate::policy::PolicyId;

/// A compiled `TrafficPolicy`: what it applies to and each section it sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resilience {
    pub id: PolicyId,
    pub generation: Option<i64>,
    /// Service names in `id.namespace`, sorted, without duplicates.
    pub targets: Vec<String>,
    pub retries: Option<RetryPolicy>,
    pub connection_pool: Option<PoolLimits>,
    pub outlier_detection: Option<OutlierPolicy>,
    pub fault: Option<FaultPolicy>,
    pub rate_limit: Option<RateLimitPolicy>,
}
