//! The agent's `limits:` section: how much of the node one pod, or one peer, may take (see
//! `proxy::limits` for the caps and `proxy::copy` for the timeouts).

use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use super::{ConfigError, within};

/// Caps and timeouts that keep one pod, or one peer, from taking the node proxy down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Proxied connections the agent holds at once, both directions together. Default, and
    /// upper bound: what the descriptor limit allows after `reserved_descriptors` (two
    /// descriptors per connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Outbound connections one pod may hold at once.
    #[serde(default = "default_max_connections_per_pod")]
    pub max_connections_per_pod: usize,
    /// HBONE handshakes in progress at once (peers not yet authenticated).
    #[serde(default = "default_max_pending_handshakes")]
    pub max_pending_handshakes: usize,
    /// A proxied connection on which no byte moves either way for this long is reset.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// Once one side of a connection finished sending, the other may stay silent this long.
    #[serde(default = "default_half_close_timeout")]
    pub half_close_timeout_secs: u64,
    /// Descriptors kept out of the connection budget: listeners, admin and readiness
    /// requests, HBONE connections, the control plane.
    #[serde(default = "default_reserved_descriptors")]
    pub reserved_descriptors: usize,
    /// Access-log events written per second for one source (the pod's address outbound, the
    /// peer's identity inbound); events past it are counted, not written.
    #[serde(default = "default_access_log_per_source_per_sec")]
    pub access_log_per_source_per_sec: u32,
    /// Access-log events one source may write at once before its rate applies.
    #[serde(default = "default_access_log_burst")]
    pub access_log_burst: u32,
}

/// A hundred connections a second from one pod is busy but honest traffic; past that the log
/// is noise that costs disk and the node's other pods their log lines.
pub const DEFAULT_ACCESS_LOG_PER_SOURCE_PER_SEC: u32 = 100;
/// Two seconds' worth, so a burst of short connections after a quiet spell is logged whole.
pub const DEFAULT_ACCESS_LOG_BURST: u32 = 200;

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: None,
            max_connections_per_pod: default_max_connections_per_pod(),
            max_pending_handshakes: default_max_pending_handshakes(),
            idle_timeout_secs: default_idle_timeout(),
            half_close_timeout_secs: default_half_close_timeout(),
            reserved_descriptors: default_reserved_descriptors(),
            access_log_per_source_per_sec: DEFAULT_ACCESS_LOG_PER_SOURCE_PER_SEC,
            access_log_burst: DEFAULT_ACCESS_LOG_BURST,
        }
    }
}

fn default_max_connections_per_pod() -> usize {
    1_024
}
fn default_max_pending_handshakes() -> usize {
    256
}
fn default_idle_timeout() -> u64 {
    3_600
}
fn default_half_close_timeout() -> u64 {
    300
}
fn default_reserved_descriptors() -> usize {
    256
}
fn default_access_log_per_source_per_sec() -> u32 {
    DEFAULT_ACCESS_LOG_PER_SOURCE_PER_SEC
}
fn default_access_log_burst() -> u32 {
    DEFAULT_ACCESS_LOG_BURST
}

/// Connections in all: at least one; ten million is beyond any node's descriptors.
const MAX_CONNECTIONS: RangeInclusive<usize> = 1..=10_000_000;
/// Per pod: zero would cut every pod off; a million is beyond any node's descriptors.
const MAX_CONNECTIONS_PER_POD: RangeInclusive<usize> = 1..=1_000_000;
/// Handshakes in progress: zero refuses every peer; beyond 65,536 the cap protects nothing.
const MAX_PENDING_HANDSHAKES: RangeInclusive<usize> = 1..=65_536;
/// Idle: at least a second; beyond a week the timeout protects nothing.
const IDLE_TIMEOUT_SECS: RangeInclusive<u64> = 1..=7 * 24 * 3600;
/// The reserve: the listeners, a few admin requests and the control plane need a few dozen.
const RESERVED_DESCRIPTORS: RangeInclusive<usize> = 32..=1_000_000;
/// Access-log rate and burst per source: zero would log nothing; past a million a second the
/// limit protects nothing.
const ACCESS_LOG_RATE: RangeInclusive<u32> = 1..=1_000_000;

impl LimitsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(max) = self.max_connections {
            within("limits.max_connections", max, MAX_CONNECTIONS)?;
        }
        within(
            "limits.max_connections_per_pod",
            self.max_connections_per_pod,
            MAX_CONNECTIONS_PER_POD,
        )?;
        within(
            "limits.max_pending_handshakes",
            self.max_pending_handshakes,
            MAX_PENDING_HANDSHAKES,
        )?;
        within(
            "limits.idle_timeout_secs",
            self.idle_timeout_secs,
            IDLE_TIMEOUT_SECS,
        )?;
        // A half-closed connection never waits longer than an open one.
        within(
            "limits.half_close_timeout_secs",
            self.half_close_timeout_secs,
            1..=self.idle_timeout_secs,
        )?;
        within(
            "limits.reserved_descriptors",
            self.reserved_descriptors,
            RESERVED_DESCRIPTORS,
        )?;
        within(
            "limits.access_log_per_source_per_sec",
            self.access_log_per_source_per_sec,
            ACCESS_LOG_RATE,
        )?;
        within(
            "limits.access_log_burst",
            self.access_log_burst,
            ACCESS_LOG_RATE,
        )
    }

    /// The node-wide connection cap under a descriptor limit of `nofile`: the configured
    /// one, but never more than the descriptors left after the reserve allow.
    pub fn effective_max_connections(&self, nofile: u64) -> usize {
        let reserve = u64::try_from(self.reserved_descriptors).unwrap_or(u64::MAX);
        let budget = usize::try_from(nofile.saturating_sub(reserve) / 2)
            .unwrap_or(usize::MAX)
            .max(1);
        self.max_connections.map_or(budget, |max| max.min(budget))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_cap_fits_under_the_descriptor_limit_after_the_reserve() {
        let limits = LimitsConfig::default();
        assert_eq!(limits.effective_max_connections(20_000), (20_000 - 256) / 2);
        let capped = LimitsConfig {
            max_connections: Some(100),
            ..LimitsConfig::default()
        };
        assert_eq!(capped.effective_max_connections(20_000), 100);
        assert_eq!(capped.effective_max_connections(100), 1, "never zero");
    }

    #[test]
    fn each_bound_names_its_field() {
        let cases = [
            (
                LimitsConfig {
                    max_connections_per_pod: 0,
                    ..LimitsConfig::default()
                },
                "limits.max_connections_per_pod",
            ),
            (
                LimitsConfig {
                    half_close_timeout_secs: 7200,
                    ..LimitsConfig::default()
                },
                "limits.half_close_timeout_secs",
            ),
            (
                LimitsConfig {
                    reserved_descriptors: 0,
                    ..LimitsConfig::default()
                },
                "limits.reserved_descriptors",
            ),
            (
                LimitsConfig {
                    max_pending_handshakes: 0,
                    ..LimitsConfig::default()
                },
                "limits.max_pending_handshakes",
            ),
        ];
        for (limits, field) in cases {
            let error = limits.validate().expect_err(field).to_string();
            assert!(error.contains(field), "{error}");
        }
        LimitsConfig::default()
            .validate()
            .expect("defaults are valid");
    }
}
