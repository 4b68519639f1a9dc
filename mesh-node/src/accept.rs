//! What every accept loop does when `accept()` fails: back off, and say so without flooding.
//!
//! Failures come in bursts (out of descriptors, out of memory) and retrying at once only spins
//! a core: each consecutive failure doubles the pause, from 5 ms up to 1 s, and a success
//! resets it. Failures are logged at most once per interval (with how many were left out).

use std::time::Duration;

use crate::log_limit::LogLimit;

const FIRST_PAUSE: Duration = Duration::from_millis(5);
const MAX_PAUSE: Duration = Duration::from_secs(1);
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One accept loop's backoff state.
#[derive(Debug)]
pub struct Backoff {
    listener: &'static str,
    pause: Duration,
    log: LogLimit,
}

impl Backoff {
    /// For the listener named `listener` (in log lines).
    pub fn new(listener: &'static str) -> Self {
        Self {
            listener,
            pause: FIRST_PAUSE,
            log: LogLimit::new(LOG_INTERVAL),
        }
    }

    /// An accept succeeded.
    pub fn reset(&mut self) {
        self.pause = FIRST_PAUSE;
    }

    /// An accept failed: logs (rate-limited) and waits before the next try.
    pub async fn failed(&mut self, error: &std::io::Error) {
        if let Some(suppressed) = self.log.allow() {
            tracing::warn!(listener = self.listener, %error, suppressed, pause_ms = u64::try_from(self.pause.as_millis()).unwrap_or(u64::MAX), "accept failed; backing off");
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_pause_doubles_up_to_a_second_and_a_success_resets_it() {
        let mut backoff = Backoff::new("test");
        let error = std::io::Error::from_raw_os_error(24);
        let mut pauses = Vec::new();
        for _ in 0..10 {
            let started = tokio::time::Instant::now();
            backoff.failed(&error).await;
            pauses.push(started.elapsed().as_millis());
        }
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        backoff.reset();
        let started = tokio::time::Instant::now();
        backoff.failed(&error).await;
        assert_eq!(started.elapsed().as_millis(), 5);
    }
}
