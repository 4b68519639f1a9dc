//! Outlier ejection: endpoints of a service that keep failing are taken out of load
//! balancing for a while.
//!
//! - An endpoint's **consecutive errors** (5xx responses, connect failures, resets, per-try
//!   timeouts: [`Outcome::is_endpoint_error`]) are counted; any other response resets the
//!   count. At `consecutiveErrors` the endpoint is ejected.
//! - The ejection lasts `baseEjectionTime` times the endpoint's ejection count, so an
//!   endpoint that comes back and fails again stays out twice as long, then three times; the
//!   time is capped at the longer of `baseEjectionTime` and [`MAX_EJECTION_TIME`].
//! - Every `interval` an endpoint spends back in service lowers its ejection count by one, so
//!   an endpoint that recovered for good is eventually treated as new.
//! - At most `maxEjectionPercent` of the service's endpoints (rounded down) are out at once,
//!   and never all of them: an endpoint that would exceed this stays in. [`OutlierDetector::
//!   choose`] also returns every candidate when all of them are ejected, so a list that
//!   differs from the tracked set cannot leave a request without an endpoint.
//!
//! State is computed lazily from [`Instant::now`] when it is read or written: no timers, and
//! paused time in tests. Memory is one entry per endpoint of the last
//! [`OutlierDetector::set_endpoints`]; results for other addresses are ignored.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use parking_lot::Mutex;
use tokio::time::Instant;

use super::retry::Outcome;

/// Ejections longer than this (unless `baseEjectionTime` itself is) are cut to it.
pub const MAX_EJECTION_TIME: Duration = Duration::from_mins(5);

/// A compiled `outlierDetection`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierPolicy {
    pub consecutive_errors: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        Self {
            consecutive_errors: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
        }
    }
}

/// The ejection state of one service's endpoints.
#[derive(Debug)]
pub struct OutlierDetector {
    policy: OutlierPolicy,
    endpoints: Mutex<HashMap<SocketAddr, Endpoint>>,
}

#[derive(Clone, Copy, Debug)]
struct Endpoint {
    consecutive_errors: u32,
    /// Ejections not yet forgiven; the multiplier of the next ejection's length.
    ejections: u32,
    ejected_until: Option<Instant>,
    /// When the ejection count was last lowered or the endpoint last came back.
    forgiven_at: Instant,
}

impl Endpoint {
    fn new(now: Instant) -> Self {
        Self {
            consecutive_errors: 0,
            ejections: 0,
            ejected_until: None,
            forgiven_at: now,
        }
    }

    /// Brings the entry up to `now`: ends an expired ejection, forgives ejections.
    fn refresh(&mut self, now: Instant, interval: Duration) {
        if let Some(until) = self.ejected_until {
            if until > now {
                return;
            }
            self.ejected_until = None;
            self.consecutive_errors = 0;
            self.forgiven_at = until;
        }
        if self.ejections == 0 || interval.is_zero() {
            self.forgiven_at = now;
            return;
        }
        let healthy = now.saturating_duration_since(self.forgiven_at);
        let intervals = healthy.as_nanos() / interval.as_nanos();
        let forgiven = u32::try_from(intervals)
            .unwrap_or(u32::MAX)
            .min(self.ejections);
        self.ejections -= forgiven;
        self.forgiven_at += interval.saturating_mul(forgiven);
    }

    fn is_ejected(&self) -> bool {
        self.ejected_until.is_some()
    }
}

impl OutlierDetector {
    pub fn new(policy: OutlierPolicy) -> Self {
        Self {
            policy,
            endpoints: Mutex::new(HashMap::new()),
        }
    }

    pub fn policy(&self) -> OutlierPolicy {
        self.policy
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<SocketAddr, Endpoint>> {
        // A poisoned lock only means another thread panicked between plain field updates.
        self.endpoints.lock()
    }

    /// Sets the service's endpoints: new ones start healthy, state of the ones still present
    /// is kept, the others are forgotten.
    pub fn set_endpoints(&self, endpoints: impl IntoIterator<Item = SocketAddr>) {
        let now = Instant::now();
        let mut map = self.lock();
        let mut next = HashMap::new();
        for addr in endpoints {
            let entry = map.remove(&addr).unwrap_or_else(|| Endpoint::new(now));
            next.insert(addr, entry);
        }
        *map = next;
    }

    /// Records how a try to `endpoint` ended; may eject it.
    pub fn record(&self, endpoint: SocketAddr, outcome: Outcome) {
        let now = Instant::now();
        let policy = self.policy;
        let mut map = self.lock();
        let total = map.len();
        let Some(entry) = map.get_mut(&endpoint) else {
            return;
        };
        entry.refresh(now, policy.interval);
        if entry.is_ejected() {
            // A try that started before the ejection: the endpoint is already out.
            return;
        }
        if !outcome.is_endpoint_error() {
            entry.consecutive_errors = 0;
            return;
        }
        entry.consecutive_errors = entry.consecutive_errors.saturating_add(1);
        if entry.consecutive_errors < policy.consecutive_errors {
            return;
        }
        let allowed = max_ejected(total, policy.max_ejection_percent);
        let ejected = count_ejected(&mut map, now, policy.interval);
        if ejected >= allowed {
            // Stays in; the next error tries again.
            return;
        }
        let Some(entry) = map.get_mut(&endpoint) else {
            return;
        };
        entry.ejections = entry.ejections.saturating_add(1);
        entry.consecutive_errors = 0;
        entry.ejected_until = Some(now + ejection_time(&policy, entry.ejections));
    }

    /// Whether `endpoint` is out of load balancing now.
    pub fn is_ejected(&self, endpoint: SocketAddr) -> bool {
        let now = Instant::now();
        let mut map = self.lock();
        map.get_mut(&endpoint).is_some_and(|e| {
            e.refresh(now, self.policy.interval);
            e.is_ejected()
        })
    }

    /// The candidates whose endpoint (`addr_of`) is not ejected, in their order; all of them
    /// when every one is ejected.
    pub fn choose<'a, T>(
        &self,
        candidates: &'a [T],
        addr_of: impl Fn(&T) -> SocketAddr,
    ) -> Vec<&'a T> {
        let now = Instant::now();
        let mut map = self.lock();
        let chosen: Vec<&T> = candidates
            .iter()
            .filter(|c| {
                !map.get_mut(&addr_of(c)).is_some_and(|e| {
                    e.refresh(now, self.policy.interval);
                    e.is_ejected()
                })
            })
            .collect();
        if chosen.is_empty() {
            candidates.iter().collect()
        } else {
            chosen
        }
    }

    /// Endpoints out of load balancing now.
    pub fn ejected_count(&self) -> usize {
        count_ejected(&mut self.lock(), Instant::now(), self.policy.interval)
    }
}

/// Endpoints out of load balancing at `now` (bringing each entry up to it).
fn count_ejected(
    map: &mut HashMap<SocketAddr, Endpoint>,
    now: Instant,
    interval: Duration,
) -> usize {
    let mut ejected = 0;
    for endpoint in map.values_mut() {
        endpoint.refresh(now, interval);
        ejected += usize::from(endpoint.is_ejected());
    }
    ejected
}

/// How many of `total` endpoints may be out at once: the percentage rounded down, and never
/// all of them.
fn max_ejected(total: usize, percent: u32) -> usize {
    let share = total.saturating_mul(usize::try_from(percent).unwrap_or(0)) / 100;
    share.min(total.saturating_sub(1))
}

fn ejection_time(policy: &OutlierPolicy, ejections: u32) -> Duration {
    let cap = policy.base_ejection_time.max(MAX_EJECTION_TIME);
    policy.base_ejection_time.saturating_mul(ejections).min(cap)
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 8080))
    }

    fn detector(endpoints: u8, max_percent: u32) -> OutlierDetector {
        let d = OutlierDetector::new(OutlierPolicy {
            consecutive_errors: 3,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: max_percent,
        });
        d.set_endpoints((1..=endpoints).map(addr));
        d
    }

    fn fail(d: &OutlierDetector, endpoint: SocketAddr, times: u32) {
        for _ in 0..times {
            d.record(endpoint, Outcome::Status(StatusCode::INTERNAL_SERVER_ERROR));
        }
    }

    async fn advance(secs: u64) {
        tokio::time::advance(Duration::from_secs(secs)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_is_ejected_after_n_consecutive_errors() {
        let d = detector(4, 50);
        fail(&d, addr(1), 2);
        assert!(!d.is_ejected(addr(1)));
        d.record(addr(1), Outcome::ConnectFailure);
        assert!(d.is_ejected(addr(1)));
        let all: Vec<_> = (1..=4).map(addr).collect();
        assert_eq!(d.choose(&all, |a| *a), [&addr(2), &addr(3), &addr(4)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count_and_4xx_is_not_an_error() {
        let d = detector(4, 50);
        fail(&d, addr(1), 2);
        d.record(addr(1), Outcome::Status(StatusCode::NOT_FOUND));
        fail(&d, addr(1), 2);
        assert!(!d.is_ejected(addr(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_endpoint_returns_after_the_base_time() {
        let d = detector(4, 50);
        fail(&d, addr(1), 3);
        advance(29).await;
        assert!(d.is_ejected(addr(1)));
        advance(1).await;
        assert!(!d.is_ejected(addr(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_ejection_lasts_twice_as_long_and_is_forgiven_over_time() {
        let d = detector(4, 50);
        fail(&d, addr(1), 3);
        advance(30).await;
        fail(&d, addr(1), 3);
        advance(59).await;
        assert!(d.is_ejected(addr(1)), "second ejection: 60 s");
        advance(1).await;
        assert!(!d.is_ejected(addr(1)));
        // Two intervals (20 s) healthy forgive both ejections: the next one is 30 s again.
        advance(20).await;
        fail(&d, addr(1), 3);
        advance(30).await;
        assert!(!d.is_ejected(addr(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_is_capped() {
        let d = detector(4, 50);
        for _ in 0..20 {
            fail(&d, addr(1), 3);
            let mut waited = 0;
            while d.is_ejected(addr(1)) {
                advance(1).await;
                waited += 1;
                assert!(waited <= 300, "an ejection lasts at most 300 s");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejection_percent_is_respected() {
        let d = detector(4, 50);
        for i in 1..=4 {
            fail(&d, addr(i), 3);
        }
        assert_eq!(d.ejected_count(), 2, "50% of 4");
        assert!(!d.is_ejected(addr(3)) && !d.is_ejected(addr(4)));
        // Once one returns, the next failing endpoint can take its place.
        advance(30).await;
        fail(&d, addr(3), 1);
        assert!(d.is_ejected(addr(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn never_all_endpoints_even_at_100_percent() {
        let d = detector(2, 100);
        fail(&d, addr(1), 3);
        fail(&d, addr(2), 3);
        assert_eq!(d.ejected_count(), 1);
        let single = detector(1, 100);
        fail(&single, addr(1), 10);
        assert!(!single.is_ejected(addr(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn choose_returns_everything_when_every_candidate_is_ejected() {
        let d = detector(4, 50);
        fail(&d, addr(1), 3);
        let only_ejected = [addr(1)];
        assert_eq!(d.choose(&only_ejected, |a| *a), [&addr(1)]);
        let unknown = [addr(9)];
        assert_eq!(d.choose(&unknown, |a| *a), [&addr(9)]);
    }

    #[tokio::test(start_paused = true)]
    async fn endpoints_no_longer_present_are_forgotten() {
        let d = detector(4, 50);
        fail(&d, addr(1), 3);
        d.set_endpoints([addr(2), addr(3)]);
        assert_eq!(d.lock().len(), 2);
        // Results for addresses outside the set allocate nothing.
        fail(&d, addr(1), 3);
        d.record(addr(7), Outcome::Reset);
        assert_eq!(d.lock().len(), 2);
        // Kept endpoints keep their state.
        fail(&d, addr(2), 2);
        d.set_endpoints([addr(2), addr(3), addr(4)]);
        fail(&d, addr(2), 1);
        assert!(d.is_ejected(addr(2)));
    }
}
