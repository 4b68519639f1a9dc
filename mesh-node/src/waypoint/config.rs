//! The waypoint's configuration file (YAML): who it is, where its controller is, where it
//! listens. Everything about traffic comes from the controller's stream, not from here.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{ConfigError, ControlPlaneConfig, LogFormat},
    identity::Identity,
};

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
    pub listen: WaypointListen,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default = "default_drain")]
    pub drain_timeout_secs: u64,
    #[serde(default)]
    pub log_format: LogFormat,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaypointListen {
    /// HBONE from source agents, conventionally port 15008.
    pub hbone: SocketAddr,
    /// Admin (config dump); loopback by default.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Prometheus metrics, conventionally port 15020.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// `/healthz/ready`, conventionally port 15021.
    #[serde(default)]
    pub readiness: Option<SocketAddr>,
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
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15000))
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl WaypointConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { reason, .. } => ConfigError::Parse {
                path: path.into(),
                reason,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: WaypointConfig =
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
                path: PathBuf::new(),
                reason: e.to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// The identity the waypoint holds.
    pub fn identity(&self) -> Result<Identity, ConfigError> {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
            .map_err(|e| invalid("service_account", e.to_string()))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.identity()?;
        if self.gateway.is_empty() || self.gateway.len() > 253 {
            return Err(invalid("gateway", "must be the Gateway's name"));
        }
        if self.certificate_ttl_secs < 600 {
            return Err(invalid("certificate_ttl_secs", "at least 600"));
        }
        let limits = &self.limits;
        if limits.max_header_bytes < 1024 {
            return Err(invalid("limits.max_header_bytes", "at least 1024"));
        }
        if limits.max_concurrent_requests == 0 || limits.max_tunnels_per_connection == 0 {
            return Err(invalid("limits", "concurrency limits must be positive"));
        }
        if limits.handshake_timeout_ms == 0 || limits.connect_timeout_ms == 0 {
            return Err(invalid("limits", "timeouts must be positive"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
namespace: shop
gateway: waypoint
service_account: waypoint
control_plane:
  address: 10.0.0.1:15012
  ca_cert: /etc/trellis/ca.pem
  token_file: /var/run/secrets/token
listen:
  hbone: 0.0.0.0:15008
";

    #[test]
    fn minimal_file_gets_defaults() {
        let config = WaypointConfig::parse(MINIMAL).expect("valid");
        assert_eq!(
            config.identity().expect("identity").to_string(),
            "spiffe://cluster.local/ns/shop/sa/waypoint"
        );
        assert_eq!(config.limits.max_header_bytes, 16 * 1024);
        assert_eq!(config.listen.admin, default_admin());
    }

    #[test]
    fn refuses_unknown_fields_and_bad_values() {
        let typo = format!("{MINIMAL}limits:\n  max_header_byte: 10\n");
        assert!(matches!(
            WaypointConfig::parse(&typo),
            Err(ConfigError::Parse { .. })
        ));
        let tiny = format!("{MINIMAL}limits:\n  max_header_bytes: 10\n");
        assert!(matches!(
            WaypointConfig::parse(&tiny),
            Err(ConfigError::Invalid { field, .. }) if field == "limits.max_header_bytes"
        ));
    }
}
