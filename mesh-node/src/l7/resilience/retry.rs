//! Retries: which failed tries are retried ([`RetryPolicy`]), how long to wait before the next
//! one ([`RetryPolicy::backoff`]), and the per-service budget that keeps retries from
//! multiplying the load on a service that is already failing ([`RetryBudget`]).
//!
//! ## What is safe to retry
//!
//! A retry sends the request again, so it is only made when sending it twice cannot do
//! harm the client did not ask for:
//!
//! - A **connect failure** means nothing reached the upstream: every request may be retried.
//! - After anything else (a response, a reset, a per-try timeout) the upstream may have acted
//!   on the request. Only idempotent methods (RFC 9110: `GET`, `HEAD`, `OPTIONS`, `TRACE`,
//!   `PUT`, `DELETE`) are retried then; `POST`, `PATCH` and unknown methods are not, whatever
//!   `retryOn` says.
//! - The request body must still be available: the caller buffers bodies up to
//!   [`MAX_RETRY_BODY_BYTES`] and classifies a larger or streamed one as
//!   [`Replay::NotReplayable`], which is never retried.
//!
//! A per-try timeout ends one try ([`Outcome::Timeout`]); the route's overall request timeout
//! ends the whole request and is never retried (the caller simply stops asking).

use std::time::Duration;

use http::{Method, StatusCode};
use parking_lot::Mutex;
use tokio::time::Instant;

/// Request bodies up to this size are buffered by the caller so a retry can send them again;
/// a larger body makes the request [`Replay::NotReplayable`].
pub const MAX_RETRY_BODY_BYTES: usize = 64 * 1024;

/// The first backoff; each later retry doubles it, up to [`MAX_BACKOFF`].
pub const BASE_BACKOFF: Duration = Duration::from_millis(25);
pub const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// The window over which the budget compares retries with requests, in one-second slots.
const BUDGET_WINDOW_SECS: usize = 10;

/// How one try ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status (response headers arrived).
    Status(StatusCode),
    /// No connection to the endpoint could be made: nothing was sent.
    ConnectFailure,
    /// The connection or stream was reset or closed before response headers arrived.
    Reset,
    /// The per-try timeout expired before response headers arrived.
    Timeout,
}

impl Outcome {
    /// The status the waypoint answers with when this is the last try: the upstream's own, or
    /// 503 (connect failure), 502 (reset) or 504 (timeout).
    pub fn status(self) -> StatusCode {
        match self {
            Self::Status(status) => status,
            Self::ConnectFailure => StatusCode::SERVICE_UNAVAILABLE,
            Self::Reset => StatusCode::BAD_GATEWAY,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Whether this counts against the endpoint for outlier detection: a 5xx response or no
    /// response at all.
    pub fn is_endpoint_error(self) -> bool {
        self.status().is_server_error()
    }
}

/// Whether a request can be sent again, decided once per request by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// An idempotent method with a buffered body: retried on any retriable outcome.
    Idempotent,
    /// A buffered body but a method that may not be repeated: retried only when nothing was
    /// sent (connect failure).
    NotIdempotent,
    /// The body was larger than [`MAX_RETRY_BODY_BYTES`] or already streamed: never retried.
    NotReplayable,
}

impl Replay {
    /// Classifies a request; `body_buffered` is false when its body could not be kept whole.
    pub fn of(method: &Method, body_buffered: bool) -> Self {
        if !body_buffered {
            return Self::NotReplayable;
        }
        let idempotent = [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::TRACE,
            Method::PUT,
            Method::DELETE,
        ]
        .contains(method);
        if idempotent {
            Self::Idempotent
        } else {
            Self::NotIdempotent
        }
    }
}

/// The `retryOn` conditions.
#[allow(
    clippy::struct_excessive_bools,
    reason = "one flag per independent retryOn condition, as the field lists them"
)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// `5xx`: any 5xx response, and any try that ended without one.
    pub server_error: bool,
    /// `gateway-error`: 502, 503 and 504 responses, and any try that ended without a response
    /// (which the waypoint would itself report as one of those).
    pub gateway_error: bool,
    /// `connect-failure`.
    pub connect_failure: bool,
    /// `reset`.
    pub reset: bool,
    /// `retriable-status-codes`: the responses listed in `retriableStatusCodes`.
    pub retriable_status_codes: bool,
}

/// The retry budget's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetLimits {
    /// Retries may be at most this percentage of the requests of the last ten seconds...
    pub percent: u32,
    /// ...except that this many retries per second are always allowed.
    pub min_retries_per_second: u32,
}

impl Default for BudgetLimits {
    fn default() -> Self {
        Self {
            percent: 20,
            min_retries_per_second: 10,
        }
    }
}

/// A compiled `retries` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
    /// Sorted, without duplicates.
    pub retriable_status_codes: Vec<StatusCode>,
    pub budget: BudgetLimits,
}

/// Why a failed try is not retried, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoRetry {
    #[error("the outcome is not one the policy retries")]
    NotRetriable,
    #[error("the request cannot safely be sent again")]
    NotReplayable,
    #[error("all retry attempts are used")]
    AttemptsExhausted,
    #[error("the service's retry budget is used up")]
    BudgetExhausted,
}

impl RetryPolicy {
    /// Whether the outcome is one of the `retryOn` conditions (ignoring attempts and replay).
    pub fn is_retriable(&self, outcome: Outcome) -> bool {
        let on = &self.retry_on;
        match outcome {
            Outcome::Status(status) => {
                (on.server_error && status.is_server_error())
                    || (on.gateway_error && matches!(status.as_u16(), 502..=504))
                    || (on.retriable_status_codes
                        && self.retriable_status_codes.binary_search(&status).is_ok())
            }
            Outcome::ConnectFailure => on.connect_failure || on.server_error || on.gateway_error,
            Outcome::Reset => on.reset || on.server_error || on.gateway_error,
            Outcome::Timeout => on.server_error || on.gateway_error,
        }
    }

    /// Whether to retry after try number `tries` (1 for the first) ended with `outcome`,
    /// leaving out the budget (see [`Self::next`]).
    pub fn should_retry(&self, tries: u32, outcome: Outcome, replay: Replay) -> bool {
        self.check(tries, outcome, replay).is_ok()
    }

    fn check(&self, tries: u32, outcome: Outcome, replay: Replay) -> Result<(), NoRetry> {
        if !self.is_retriable(outcome) {
            return Err(NoRetry::NotRetriable);
        }
        let replayable = match replay {
            Replay::Idempotent => true,
            Replay::NotIdempotent => outcome == Outcome::ConnectFailure,
            Replay::NotReplayable => false,
        };
        if !replayable {
            return Err(NoRetry::NotReplayable);
        }
        if tries > self.attempts {
            return Err(NoRetry::AttemptsExhausted);
        }
        Ok(())
    }

    /// The whole decision after a failed try: `Ok(backoff)` to wait and retry (the retry is
    /// charged to `budget`), or why not. The budget is asked last so a request that would not
    /// be retried anyway does not use it up.
    pub fn next(
        &self,
        budget: &RetryBudget,
        tries: u32,
        outcome: Outcome,
        replay: Replay,
        rng: &mut fastrand::Rng,
    ) -> Result<Duration, NoRetry> {
        self.check(tries, outcome, replay)?;
        if !budget.try_retry() {
            return Err(NoRetry::BudgetExhausted);
        }
        Ok(backoff(tries, rng))
    }

    /// The wait before retry number `retry` (1 for the first).
    pub fn backoff(&self, retry: u32, rng: &mut fastrand::Rng) -> Duration {
        backoff(retry, rng)
    }
}

/// Exponential backoff with jitter: the ceiling doubles from [`BASE_BACKOFF`] per retry up
/// to [`MAX_BACKOFF`], and the wait is drawn uniformly from its upper half, so that clients
/// failing together do not retry together, yet no retry is immediate.
fn backoff(retry: u32, rng: &mut fastrand::Rng) -> Duration {
    let doublings = retry.saturating_sub(1).min(16);
    let ceiling = BASE_BACKOFF.saturating_mul(1 << doublings).min(MAX_BACKOFF);
    let ceiling_us = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
    Duration::from_micros(rng.u64(ceiling_us / 2..=ceiling_us))
}

// Ours rather than tower's `TpsBudget`: that one charges a whole number of deposits per retry
// (30% becomes 33%, 60% becomes 100%) and its floor is a reserve for the whole window.
/// Limits retries to a share of the requests a service receives, so that when it fails
/// retries cannot multiply the load on it.
///
/// Over a sliding window of ten one-second slots, a retry is allowed while the retries of
/// the window are fewer than `percent` of its requests, or while fewer than
/// `minRetriesPerSecond` retries were made in the current second (the floor that lets a
/// quiet service retry at all). Memory is the fixed window.
#[derive(Debug)]
pub struct RetryBudget {
    limits: BudgetLimits,
    origin: Instant,
    window: Mutex<[Slot; BUDGET_WINDOW_SECS]>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    /// The second (since `origin`) the counts belong to.
    second: u64,
    requests: u64,
    retries: u64,
}

impl RetryBudget {
    pub fn new(limits: BudgetLimits) -> Self {
        Self {
            limits,
            origin: Instant::now(),
            window: Mutex::new([Slot::default(); BUDGET_WINDOW_SECS]),
        }
    }

    pub fn limits(&self) -> BudgetLimits {
        self.limits
    }

    /// Counts a request's first try (retries are counted by [`Self::try_retry`]).
    pub fn record_request(&self) {
        self.with_current(|slot, _| slot.requests = slot.requests.saturating_add(1));
    }

    /// Whether one more retry fits in the budget; when it does it is counted.
    pub fn try_retry(&self) -> bool {
        let limits = self.limits;
        self.with_current(|current, window| {
            let this_second = current.retries;
            let (requests, retries) = window;
            let share = requests.saturating_mul(u64::from(limits.percent)) / 100;
            let allowed = this_second < u64::from(limits.min_retries_per_second) || retries < share;
            if allowed {
                current.retries = current.retries.saturating_add(1);
            }
            allowed
        })
    }

    /// Runs `f` on the current second's slot (cleared if it held an older second) with the
    /// window's totals of requests and retries.
    fn with_current<T>(&self, f: impl FnOnce(&mut Slot, (u64, u64)) -> T) -> T {
        let now = Instant::now()
            .saturating_duration_since(self.origin)
            .as_secs();
        // A poisoned lock only means another thread panicked mid-update of plain counters.
        let mut window = self.window.lock();
        let mut totals = (0u64, 0u64);
        for slot in window.iter() {
            if now.saturating_sub(slot.second) < BUDGET_WINDOW_SECS as u64 && slot.second <= now {
                totals.0 = totals.0.saturating_add(slot.requests);
                totals.1 = totals.1.saturating_add(slot.retries);
            }
        }
        let index = usize::try_from(now % BUDGET_WINDOW_SECS as u64).unwrap_or(0);
        let slot = &mut window[index];
        if slot.second != now {
            // Totals above only counted slots of the window, and this one held an older
            // second (or is fresh, with zero counts), so nothing needs subtracting.
            *slot = Slot {
                second: now,
                ..Slot::default()
            };
        }
        f(slot, totals)
    }
}

#[cfg(test)]
mod tests;
