//! The waypoint's configuration file (YAML): who it is, where its controller is, where it
//! listens. Everything about traffic comes from the controller's stream, not from here.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{
    ConfigError, ControlPlaneConfig, ListenConfig, LogFormat, bounds, invalid, load_file,
    parse_yaml, within,
};
use crate::identity::Identity;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaypointConfig {
    /// The Gateway this waypoint serves (`metadata.namespace`).
    pub namespace: String,
    /// The Gateway's name (`metadata.name`).
    pub gateway: String,
    /// The service account its pods run as: the identity it presents and dials with.
    pub service_account: String,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    pub control_plane: ControlPlaneConfig,
    /// Lifetime of its certificate; renewed at half life.
    #[serde(default = "default_cert_ttl")]
    pub certificate_ttl_secs: u64,
    /// `hbone` is required; the agent's outbound listeners are refused.
    pub listen: ListenConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default = "default_drain")]
    pub drain_timeout_secs: u64,
    #[serde(default)]
    pub log_format: LogFormat,
    /// Span export over OTLP; without it, trace context is still propagated and logged.
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
}

/// Where and how the waypoint exports one span per sampled request (OTLP over gRPC).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP/gRPC endpoint, `http://host:port` (conventionally port 4317).
    pub otlp_endpoint: String,
    /// Share of the traces the waypoint starts itself (requests without a valid
    /// `traceparent`) that are sampled, in percent. A request that arrives with a trace
    /// context keeps its caller's sampling decision.
    #[serde(default = "default_sampling_percent")]
    pub sampling_percent: f64,
    /// Spans waiting for export; beyond that, new spans are dropped and counted, so a slow or
    /// absent collector costs the waypoint a bounded amount of memory and nothing else.
    #[serde(default = "default_max_queued_spans")]
    pub max_queued_spans: usize,
    /// Spans per export request.
    #[serde(default = "default_max_batch_spans")]
    pub max_batch_spans: usize,
    /// Longest a span waits for its batch to fill, in milliseconds.
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// One export request, connection included, in milliseconds.
    #[serde(default = "default_export_timeout_ms")]
    pub export_timeout_ms: u64,
}

fn default_sampling_percent() -> f64 {
    1.0
}
fn default_max_queued_spans() -> usize {
    4096
}
fn default_max_batch_spans() -> usize {
    512
}
fn default_flush_interval_ms() -> u64 {
    1000
}
fn default_export_timeout_ms() -> u64 {
    5000
}

impl TracingConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let uri: http::Uri = self
            .otlp_endpoint
            .parse()
            .map_err(|e| invalid("tracing.otlp_endpoint", format!("not a URI: {e}")))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(invalid(
                "tracing.otlp_endpoint",
                "must be http://host:port (OTLP over gRPC in plaintext, as to a collector \
                 beside the waypoint)",
            ));
        }
        if !(0.0..=100.0).contains(&self.sampling_percent) {
            return Err(invalid(
                "tracing.sampling_percent",
                "must be within 0..=100",
            ));
        }
        if self.max_queued_spans == 0 || self.max_queued_spans > 1 << 20 {
            return Err(invalid(
                "tracing.max_queued_spans",
                "must be within 1..=1048576",
            ));
        }
        if self.max_batch_spans == 0 || self.max_batch_spans > self.max_queued_spans {
            return Err(invalid(
                "tracing.max_batch_spans",
                "must be positive and at most max_queued_spans",
            ));
        }
        // A batch waits at most a minute: longer only holds spans in memory.
        within(
            "tracing.flush_interval_ms",
            self.flush_interval_ms,
            10..=60_000,
        )?;
        within(
            "tracing.export_timeout_ms",
            self.export_timeout_ms,
            bounds::TIMEOUT_MS,
        )
    }
}

/// Bounds on what one client can make the waypoint hold.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// TLS handshake plus the first CONNECT, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// Upstream connect (HBONE to the endpoint's node), in milliseconds.
    pub connect_timeout_ms: u64,
    /// Concurrent CONNECT streams per HBONE connection from a source agent.
    pub max_tunnels_per_connection: u32,
    /// Largest request head (HTTP/1.1 request line and headers, HTTP/2 decoded header list).
    pub max_header_bytes: u32,
    /// Concurrent HTTP/2 requests per tunnelled client connection.
    pub max_concurrent_requests: u32,
    /// Request bodies up to this size are buffered so that they can be retried and mirrored;
    /// larger ones stream once and are never retried.
    pub max_buffered_body_bytes: usize,
}

/// The most a request head may take: far above any real header set (16 KiB by default), low
/// enough that one client cannot make the waypoint buffer megabytes per request.
const MAX_HEADER_BYTES: std::ops::RangeInclusive<u32> = 1024..=1024 * 1024;
/// Buffered request bodies (for retries and mirrors), per request: zero disables buffering;
/// 64 MiB times the concurrent requests is already more memory than a waypoint should hold.
const MAX_BUFFERED_BODY_BYTES: std::ops::RangeInclusive<usize> = 0..=64 * 1024 * 1024;

impl Limits {
    fn validate(&self) -> Result<(), ConfigError> {
        within(
            "limits.handshake_timeout_ms",
            self.handshake_timeout_ms,
            bounds::TIMEOUT_MS,
        )?;
        within(
            "limits.connect_timeout_ms",
            self.connect_timeout_ms,
            bounds::TIMEOUT_MS,
        )?;
        within(
            "limits.max_tunnels_per_connection",
            self.max_tunnels_per_connection,
            bounds::STREAMS_PER_CONNECTION,
        )?;
        within(
            "limits.max_header_bytes",
            self.max_header_bytes,
            MAX_HEADER_BYTES,
        )?;
        within(
            "limits.max_concurrent_requests",
            self.max_concurrent_requests,
            bounds::STREAMS_PER_CONNECTION,
        )?;
        within(
            "limits.max_buffered_body_bytes",
            self.max_buffered_body_bytes,
            MAX_BUFFERED_BODY_BYTES,
        )
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            max_tunnels_per_connection: 512,
            max_header_bytes: 16 * 1024,
            max_concurrent_requests: 256,
            max_buffered_body_bytes: 64 * 1024,
        }
    }
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}
fn default_cert_ttl() -> u64 {
    24 * 3600
}
fn default_drain() -> u64 {
    30
}

impl WaypointConfig {
    /// Reads, parses and checks the file; a refusal names the file, the field and its line.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_file(path, Self::parse)
    }

    /// Parses and checks a configuration; a refusal names the field and its line.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        parse_yaml(text, Self::validate)
    }

    /// The identity the waypoint holds.
    pub fn identity(&self) -> Result<Identity, ConfigError> {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
            .map_err(|e| invalid("service_account", e.to_string()))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.identity()?;
        self.control_plane.validate()?;
        self.listen.validate_waypoint()?;
        if self.gateway.is_empty() || self.gateway.len() > 253 {
            return Err(invalid("gateway", "must be the Gateway's name"));
        }
        within(
            "certificate_ttl_secs",
            self.certificate_ttl_secs,
            bounds::WAYPOINT_CERT_TTL_SECS,
        )?;
        within(
            "drain_timeout_secs",
            self.drain_timeout_secs,
            bounds::DRAIN_TIMEOUT_SECS,
        )?;
        self.limits.validate()?;
        if let Some(tracing) = &self.tracing {
            tracing.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
