//! Gateway API durations (GEP-2257): one to four components, each one to five decimal digits
//! followed by `h`, `m`, `s` or `ms`, summed as Go's `time.ParseDuration` would (`1h30m`,
//! `500ms`, `1s1s` is two seconds). No sign, no fractions, no spaces, no other units.

use std::time::Duration;

/// Why a string is not a Gateway API duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("is empty")]
    Empty,
    #[error("has more than 4 components")]
    TooManyComponents,
    #[error("has a component without digits (expected a number, then h, m, s or ms)")]
    MissingNumber,
    #[error("has a number of more than 5 digits")]
    TooManyDigits,
    #[error("has a number without a unit, or a unit other than h, m, s and ms")]
    BadUnit,
}

const MAX_COMPONENTS: usize = 4;
const MAX_DIGITS: usize = 5;

/// Parses a duration. Zero (`0s`, `0ms`, ...) is a valid duration; what it means is up to the
/// field (for timeouts: no timeout).
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let bytes = text.as_bytes();
    let mut total = Duration::ZERO;
    let mut at = 0;
    let mut components = 0;
    // Each pass consumes one component; `components` bounds the loop at five passes.
    while at < bytes.len() {
        components += 1;
        if components > MAX_COMPONENTS {
            return Err(DurationError::TooManyComponents);
        }
        let digits = bytes[at..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 {
            return Err(DurationError::MissingNumber);
        }
        if digits > MAX_DIGITS {
            return Err(DurationError::TooManyDigits);
        }
        let value = bytes[at..at + digits]
            .iter()
            .fold(0u64, |n, b| n * 10 + u64::from(b - b'0'));
        at += digits;
        let rest = &bytes[at..];
        let (unit, len) = if rest.starts_with(b"ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with(b"h") {
            (Duration::from_hours(1), 1)
        } else if rest.starts_with(b"m") {
            (Duration::from_mins(1), 1)
        } else if rest.starts_with(b"s") {
            (Duration::from_secs(1), 1)
        } else {
            return Err(DurationError::BadUnit);
        };
        at += len;
        // At most 4 x 99999 h: far from overflowing.
        total += unit * u32::try_from(value).unwrap_or(u32::MAX);
    }
    Ok(total)
}
