//! Log lines that a peer can trigger at will, at most once per interval.
//!
//! A refused connection or a failed accept is worth a line, but a flood of them must not turn
//! into a flood of log (a connect loop once wrote hundreds of MB in under a minute): the first
//! event of an interval is logged with how many were left out before it; metrics count every
//! one.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

#[derive(Debug)]
pub struct LogLimit {
    interval: Duration,
    // Held only to compare and set one instant, never across an await.
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl LogLimit {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(events left out since the last logged one)` if this event may be logged.
    pub fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let Ok(mut last) = self.last.lock() else {
            return None;
        };
        if last.is_some_and(|t| now.duration_since(t) < self.interval) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_left_out() {
        let limit = LogLimit::new(Duration::from_secs(3600));
        assert_eq!(limit.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(limit.allow(), None);
        }
        // Past the interval, the next line says how many were left out.
        *limit.last.lock().expect("lock") = Instant::now().checked_sub(Duration::from_secs(3601));
        assert_eq!(limit.allow(), Some(5));
        assert_eq!(limit.allow(), None);
    }
}
