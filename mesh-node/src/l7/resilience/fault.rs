//! Fault injection: a configured percentage of requests is delayed, aborted, or both, to test
//! how callers cope with a slow or failing service.
//!
//! The two faults are drawn independently from the caller's random number generator (a seeded
//! one in tests). The caller applies the delay first, then the abort: a request drawn for both
//! waits and then fails, as a slow failing service would. An aborted request is answered by
//! the waypoint with the status and never reaches the service.

use std::time::Duration;

use http::StatusCode;

/// Delay a share of requests by a fixed time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DelayFault {
    pub delay: Duration,
    /// 0 to 100.
    pub percent: u32,
}

/// Answer a share of requests with a status instead of forwarding them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbortFault {
    pub status: StatusCode,
    /// 0 to 100.
    pub percent: u32,
}

/// A compiled `fault`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultPolicy {
    pub delay: Option<DelayFault>,
    pub abort: Option<AbortFault>,
}

/// What to do to one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultDecision {
    pub delay: Option<Duration>,
    pub abort: Option<StatusCode>,
}

impl FaultPolicy {
    pub fn decide(&self, rng: &mut fastrand::Rng) -> FaultDecision {
        FaultDecision {
            delay: self.delay.filter(|d| hit(d.percent, rng)).map(|d| d.delay),
            abort: self.abort.filter(|a| hit(a.percent, rng)).map(|a| a.status),
        }
    }
}

/// True for `percent` out of 100 draws; 0 never, 100 (or more) always.
fn hit(percent: u32, rng: &mut fastrand::Rng) -> bool {
    rng.u32(0..100) < percent
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRAWS: u32 = 10_000;

    fn policy(delay_percent: u32, abort_percent: u32) -> FaultPolicy {
        FaultPolicy {
            delay: Some(DelayFault {
                delay: Duration::from_secs(2),
                percent: delay_percent,
            }),
            abort: Some(AbortFault {
                status: StatusCode::SERVICE_UNAVAILABLE,
                percent: abort_percent,
            }),
        }
    }

    /// Counts (delayed, aborted, both) over [`DRAWS`] deterministic draws.
    fn tally(policy: FaultPolicy, seed: u64) -> (u32, u32, u32) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut counts = (0, 0, 0);
        for _ in 0..DRAWS {
            let d = policy.decide(&mut rng);
            if let Some(delay) = d.delay {
                assert_eq!(delay, Duration::from_secs(2));
                counts.0 += 1;
            }
            if let Some(status) = d.abort {
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
                counts.1 += 1;
            }
            if d.delay.is_some() && d.abort.is_some() {
                counts.2 += 1;
            }
        }
        counts
    }

    #[test]
    fn faults_hit_their_percentage_of_requests() {
        for seed in [1, 2, 3] {
            let (delayed, aborted, both) = tally(policy(10, 5), seed);
            // Binomial standard deviations: 30 for 10%, 22 for 5%; allow about four.
            assert!((880..=1120).contains(&delayed), "delayed {delayed}");
            assert!((410..=590).contains(&aborted), "aborted {aborted}");
            // Independent draws: both faults together about 0.5% of the time.
            assert!((20..=90).contains(&both), "both {both}");
        }
    }

    #[test]
    fn zero_and_hundred_percent_are_exact() {
        assert_eq!(tally(policy(0, 100), 9), (0, DRAWS, 0));
        assert_eq!(tally(policy(100, 0), 9), (DRAWS, 0, 0));
        let none = FaultPolicy::default().decide(&mut fastrand::Rng::with_seed(1));
        assert_eq!(none, FaultDecision::default());
    }
}
