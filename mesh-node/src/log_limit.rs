//! Log lines that a peer can trigger at will, and how many of them are written.
//!
//! A refused connection, a failed accept or a finished connection is worth a line, but a flood
//! of them must not turn into a flood of log (a connect loop once wrote 290 MB of access log in
//! 45 s). Two shapes: [`LogLimit`], one line per interval for one kind of event, and
//! [`AccessLogLimit`], a token bucket per source for access-log events. Either way a line that
//! is written says how many were left out before it, and metrics count every event.

use std::{
    collections::HashMap,
    hash::BuildHasher,
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use crate::identity::Identity;

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
        let mut last = self.last.lock();
        if last.is_some_and(|t| now.duration_since(t) < self.interval) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// Sources the access-log limiter tracks one by one. Past this, sources it has not seen share
/// one bucket until idle ones are pruned, so a flood of distinct sources cannot grow the table.
const MAX_SOURCES: usize = 4_096;
/// How often a full table may be swept for idle sources: a sweep walks the whole table.
const PRUNE_INTERVAL: Duration = Duration::from_secs(1);

/// Whose budget an access-log event draws on: the pod's address for outbound connections, the
/// authenticated peer identity for inbound ones (the peer's address before authentication).
#[derive(Clone, Copy, Debug)]
pub enum LogSource<'a> {
    Addr(IpAddr),
    Identity(&'a Identity),
}

/// The key a source is tracked by. Identities are hashed with the table's random keys so an
/// event allocates nothing; a peer cannot choose names that collide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    Addr(IpAddr),
    Identity(u64),
}

/// One source's token bucket, and the events it left out since its last written one.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    suppressed: u64,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            at: now,
            suppressed: 0,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = self.at.max(now);
    }

    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Option<u64> {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// Nothing to remember: full again and nothing left out.
    fn idle(&self, rate: f64, burst: f64, now: Instant) -> bool {
        let mut b = *self;
        b.refill(rate, burst, now);
        b.suppressed == 0 && b.tokens >= burst
    }
}

#[derive(Debug)]
struct Table {
    sources: HashMap<Key, Bucket>,
    /// Shared by sources that arrive while the table is full of active ones.
    overflow: Bucket,
    last_prune: Option<Instant>,
}

/// Access-log events per source: `rate` per second with bursts of `burst`.
#[derive(Debug)]
pub struct AccessLogLimit {
    rate: f64,
    burst: f64,
    max_sources: usize,
    hasher: std::collections::hash_map::RandomState,
    // Held only to update one bucket (or sweep a full table), never across an await.
    table: Mutex<Table>,
}

impl AccessLogLimit {
    pub fn new(rate: u32, burst: u32) -> Self {
        Self::with_capacity(rate, burst, MAX_SOURCES)
    }

    fn with_capacity(rate: u32, burst: u32, max_sources: usize) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate),
            burst,
            max_sources,
            hasher: Default::default(),
            table: Mutex::new(Table {
                sources: HashMap::new(),
                overflow: Bucket::full(burst, Instant::now()),
                last_prune: None,
            }),
        }
    }

    /// `Some(events of this source left out since its last written one)` if this event may be
    /// written, `None` if it is left out (and counted towards the next one).
    pub fn admit(&self, source: LogSource<'_>, now: Instant) -> Option<u64> {
        let key = match source {
            LogSource::Addr(ip) => Key::Addr(crate::state::canonical(ip)),
            LogSource::Identity(id) => Key::Identity(self.hasher.hash_one(id)),
        };
        let (rate, burst) = (self.rate, self.burst);
        let mut table = self.table.lock();
        let table = &mut *table;
        if let Some(bucket) = table.sources.get_mut(&key) {
            return bucket.take(rate, burst, now);
        }
        if table.sources.len() >= self.max_sources
            && table
                .last_prune
                .is_none_or(|t| now.saturating_duration_since(t) >= PRUNE_INTERVAL)
        {
            table.last_prune = Some(now);
            table.sources.retain(|_, b| !b.idle(rate, burst, now));
        }
        if table.sources.len() >= self.max_sources {
            return table.overflow.take(rate, burst, now);
        }
        let mut bucket = Bucket::full(burst, now);
        let verdict = bucket.take(rate, burst, now);
        table.sources.insert(key, bucket);
        verdict
    }

    #[cfg(test)]
    fn sources(&self) -> usize {
        self.table.lock().sources.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: LogSource<'static> = LogSource::Addr(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)));
    fn id() -> Identity {
        Identity::new("td", "b", "b").expect("identity")
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate_and_the_next_line_counts_the_rest() {
        let limit = AccessLogLimit::new(10, 5);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(limit.admit(A, t0), Some(0));
        }
        for _ in 0..7 {
            assert_eq!(limit.admit(A, t0), None);
        }
        // Another source has its own budget.
        assert_eq!(limit.admit(LogSource::Identity(&id()), t0), Some(0));
        // A tenth of a second later one token is back: the line reports the seven left out.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(limit.admit(A, t1), Some(7));
        assert_eq!(limit.admit(A, t1), None);
        // Over a long run, written events stay within rate x time + burst, and every event
        // left out is reported by exactly one later line.
        let (mut written, mut reported) = (0u64, 0u64);
        for ms in 0..10_000u64 {
            let now = t1 + Duration::from_millis(ms);
            for _ in 0..3 {
                if let Some(n) = limit.admit(A, now) {
                    written += 1;
                    reported += n;
                }
            }
        }
        assert!((99..=101).contains(&written), "{written}");
        let pending = limit
            .admit(A, t1 + Duration::from_secs(20))
            .expect("refilled");
        // The one left out at t1 was reported inside the run too.
        assert_eq!(written + reported + pending, 30_000 + 1);
    }

    #[test]
    fn a_flood_of_distinct_sources_is_bounded_and_shares_one_bucket() {
        let limit = AccessLogLimit::with_capacity(1, 2, 8);
        let t0 = Instant::now();
        let ip = |i: u32| LogSource::Addr(IpAddr::V4(std::net::Ipv4Addr::from(i)));
        // Eight sources fill the table; each has spent one token, so none is idle.
        for i in 0..8 {
            assert_eq!(limit.admit(ip(i), t0), Some(0));
        }
        // Newcomers share the overflow bucket (burst 2), however many there are.
        let written = (100..1_100)
            .filter(|&i| limit.admit(ip(i), t0).is_some())
            .count();
        assert_eq!(written, 2);
        assert_eq!(limit.sources(), 8);
        // Once the tracked sources are idle again, a sweep makes room.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(limit.admit(ip(5_000), later), Some(0));
        assert_eq!(limit.sources(), 1);
    }

    #[test]
    fn a_tracked_source_that_left_events_out_is_not_pruned() {
        let limit = AccessLogLimit::with_capacity(1, 1, 1);
        let t0 = Instant::now();
        assert_eq!(limit.admit(A, t0), Some(0));
        assert_eq!(limit.admit(A, t0), None);
        // Long after, the table is full and A still owes a count: B goes to the overflow.
        let later = t0 + Duration::from_mins(1);
        assert_eq!(limit.admit(LogSource::Identity(&id()), later), Some(0));
        assert_eq!(limit.sources(), 1);
        assert_eq!(limit.admit(A, later), Some(1));
    }

    #[test]
    fn one_line_per_interval_with_the_count_left_out() {
        let limit = LogLimit::new(Duration::from_hours(1));
        assert_eq!(limit.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(limit.allow(), None);
        }
        // Past the interval, the next line says how many were left out.
        *limit.last.lock() = Instant::now().checked_sub(Duration::from_secs(3601));
        assert_eq!(limit.allow(), Some(5));
        assert_eq!(limit.allow(), None);
    }
}
