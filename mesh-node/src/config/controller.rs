//! The controller's configuration file (YAML): where it serves, where its root CA is kept,
//! where the cluster's objects come from and how agents and waypoints prove who they are.
//!
//! ```yaml
//! listen: 0.0.0.0:15012              # CA and discovery gRPC, TLS
//! trust_domain: cluster.local
//! ca: { cert: /var/lib/trellis/ca.pem, key: /var/lib/trellis/ca-key.pem }  # generated if both absent
//! # or: ca: { secret: trellis-system/trellis-ca, publish_root: trellis-system/trellis-ca-root }
//! source: { directory: /etc/trellis/manifests }                           # or: { kubernetes: {} }
//! auth:
//!   # node-name: token, and "serviceaccount:<namespace>/<name>": token for waypoints
//!   bootstrap_tokens: /etc/trellis/node-tokens.yaml
//!   token_review: { agent_service_accounts: [trellis-system/trellis-agent], audiences: [] }
//! hbone_port: 15008
//! certificate_ttl_secs: 86400        # when the agent asks for 0
//! max_certificate_ttl_secs: 86400    # cap on what agents ask for
//! server_names: [10.0.0.5]           # extra DNS names / IPs for the serving certificate
//! monitoring: 0.0.0.0:15014          # /metrics and /healthz/ready; null to disable
//! log_format: text
//! cluster_id: Kubernetes             # source_cluster / destination_cluster in metrics
//! compatibility:
//!   istio_labels: false              # also read istio.io/dataplane-mode, istio.io/use-waypoint
//!                                    # and the istio-waypoint class (off beside Istio)
//! ```

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{ConfigError, LogFormat, bounds, invalid, load_file, parse_yaml};
use crate::identity::Identity;

/// The controller configuration file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    pub ca: CaConfig,
    pub source: SourceConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default = "default_hbone_port")]
    pub hbone_port: u16,
    #[serde(default = "default_ttl")]
    pub certificate_ttl_secs: u64,
    #[serde(default = "default_ttl")]
    pub max_certificate_ttl_secs: u64,
    /// DNS names and IP addresses agents may dial the controller by, besides
    /// [`crate::controller::CONTROLLER_DNS_NAME`] and a specific `listen` IP.
    #[serde(default)]
    pub server_names: Vec<String>,
    #[serde(default = "default_monitoring")]
    pub monitoring: Option<SocketAddr>,
    #[serde(default)]
    pub log_format: LogFormat,
    /// The cluster's name in telemetry (`source_cluster`, `destination_cluster`); Istio's
    /// default, `Kubernetes`, unless set.
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
    #[serde(default)]
    pub compatibility: CompatibilityConfig,
}

/// What the controller reads of other meshes' conventions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompatibilityConfig {
    /// Read Istio's `istio.io/dataplane-mode` and `istio.io/use-waypoint` labels and treat
    /// `istio-waypoint` Gateways as waypoints, besides Trellis's own (which win on an object
    /// carrying both). Off by default, so that Trellis beside Istio never takes Istio's pods.
    #[serde(default)]
    pub istio_labels: bool,
}

/// Where the root CA is kept: `cert` and `key` files, or a Kubernetes `secret`. Either is
/// generated and persisted on first start when absent.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    /// PEM root (or intermediate) certificate; also the trust bundle handed to agents.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its PEM PKCS#8 private key.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// `<namespace>/<name>` of a `kubernetes.io/tls` Secret holding the root.
    #[serde(default)]
    pub secret: Option<String>,
    /// `<namespace>/<name>` of a ConfigMap to publish the trust bundle (`root-cert.pem`) to,
    /// for the agents to mount.
    #[serde(default)]
    pub publish_root: Option<String>,
}

/// The checked form of [`CaConfig`]: where the root is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaLocation {
    Files { cert: PathBuf, key: PathBuf },
    Secret(ObjectRef),
}

impl CaConfig {
    /// Files or a Secret, never half of each.
    pub fn location(&self) -> Result<CaLocation, ConfigError> {
        match (&self.cert, &self.key, &self.secret) {
            (Some(cert), Some(key), None) => Ok(CaLocation::Files {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None, Some(secret)) => Ok(CaLocation::Secret(
                secret.parse().map_err(|e| invalid("ca.secret", e))?,
            )),
            _ => Err(invalid(
                "ca",
                "give either cert and key (files) or secret (<namespace>/<name>)",
            )),
        }
    }

    /// The ConfigMap the trust bundle is published to, if any.
    pub fn publish_root(&self) -> Result<Option<ObjectRef>, ConfigError> {
        self.publish_root
            .as_deref()
            .map(|r| r.parse().map_err(|e| invalid("ca.publish_root", e)))
            .transpose()
    }
}

/// A namespaced object's `<namespace>/<name>`, parsed from configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for ObjectRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid = |part: &str| {
            !part.is_empty()
                && part.len() <= 253
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        match s.split_once('/') {
            Some((namespace, name)) if valid(namespace) && valid(name) => Ok(Self {
                namespace: namespace.into(),
                name: name.into(),
            }),
            _ => Err(format!(
                "{s:?} is not <namespace>/<name> with lowercase DNS-style parts"
            )),
        }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where the cluster's objects come from.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// A directory of manifests, watched for changes.
    Directory(PathBuf),
    /// The cluster the controller runs in (or `KUBECONFIG`'s).
    Kubernetes(KubernetesSource),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSource {}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// YAML map of node name to that node's agent token, and of
    /// `serviceaccount:<namespace>/<name>` to the token of the workloads running as that
    /// service account (waypoints; see [`crate::controller::auth`]).
    #[serde(default)]
    pub bootstrap_tokens: Option<PathBuf>,
    #[serde(default)]
    pub token_review: Option<TokenReviewConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenReviewConfig {
    /// `<namespace>/<service-account>` of the agents; other accounts' tokens authenticate
    /// workloads, which may only act as waypoints (and only a waypoint's service account).
    #[serde(default = "default_agent_accounts")]
    pub agent_service_accounts: Vec<String>,
    /// Audiences the agent's token must carry (empty: the API server's default audience).
    #[serde(default)]
    pub audiences: Vec<String>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15012))
}
fn default_cluster_id() -> String {
    crate::state::workload::DEFAULT_CLUSTER_ID.into()
}
fn default_trust_domain() -> String {
    "cluster.local".into()
}
fn default_hbone_port() -> u16 {
    15008
}
fn default_ttl() -> u64 {
    24 * 3600
}
#[allow(
    clippy::unnecessary_wraps,
    reason = "serde default for an optional field"
)]
fn default_monitoring() -> Option<SocketAddr> {
    Some(SocketAddr::from(([0, 0, 0, 0], 15014)))
}
fn default_agent_accounts() -> Vec<String> {
    vec!["trellis-system/trellis-agent".into()]
}

impl ControllerConfig {
    /// Reads, parses and checks the file; a refusal names the file, the field and its line.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_file(path, Self::parse)
    }

    /// Parses and checks a configuration; a refusal names the field and its line.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        parse_yaml(text, Self::validate)
    }

    /// Checks everything serde cannot: the CA's location, names, ranges, and that agents
    /// have a way to prove their node.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.ca.location()?;
        self.ca.publish_root()?;
        Identity::new(&self.trust_domain, "a", "b")
            .map_err(|e| invalid("trust_domain", e.to_string()))?;
        if self.hbone_port == 0 {
            return Err(invalid("hbone_port", "must not be 0"));
        }
        crate::state::WorkloadTelemetry::check_cluster_id(&self.cluster_id)
            .map_err(|e| invalid("cluster_id", e.reason))?;
        if self.certificate_ttl_secs == 0 {
            return Err(invalid("certificate_ttl_secs", "must be positive"));
        }
        // The same ceiling as the agents' own: a year, far from any time arithmetic overflow.
        let ceiling = *bounds::AGENT_CERT_TTL_SECS.end();
        if self.max_certificate_ttl_secs > ceiling {
            return Err(invalid(
                "max_certificate_ttl_secs",
                format!(
                    "{} is out of range: allowed up to {ceiling} (one year)",
                    self.max_certificate_ttl_secs
                ),
            ));
        }
        if self.max_certificate_ttl_secs < self.certificate_ttl_secs {
            return Err(invalid(
                "max_certificate_ttl_secs",
                "must be at least certificate_ttl_secs",
            ));
        }
        if self.auth.bootstrap_tokens.is_none() && self.auth.token_review.is_none() {
            return Err(invalid(
                "auth",
                "configure bootstrap_tokens, token_review or both: agents must prove their node",
            ));
        }
        for (i, name) in self.server_names.iter().enumerate() {
            if name.parse::<IpAddr>().is_err() && !crate::identity::is_dns_subdomain(name) {
                return Err(invalid(
                    format!("server_names[{i}]"),
                    format!("{name:?} is neither an IP address nor a DNS name"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
ca: { cert: /c, key: /k }
source: { directory: /m }
auth: { bootstrap_tokens: /t }
";

    #[test]
    fn a_minimal_file_gets_the_defaults() {
        let config = ControllerConfig::parse(MINIMAL).expect("valid");
        assert_eq!(config.listen, default_listen());
        assert_eq!(config.monitoring, default_monitoring());
        assert_eq!(config.max_certificate_ttl_secs, 24 * 3600);
        assert_eq!(
            config.ca.location().expect("files"),
            CaLocation::Files {
                cert: "/c".into(),
                key: "/k".into()
            }
        );
        let null = ControllerConfig::parse(&format!("{MINIMAL}monitoring: null\n")).expect("valid");
        assert_eq!(null.monitoring, None, "null turns monitoring off");
        assert!(
            !config.compatibility.istio_labels,
            "Istio's labels are not read by default"
        );
    }

    #[test]
    fn istio_labels_is_a_switch() {
        let on = ControllerConfig::parse(&format!(
            "{MINIMAL}compatibility: {{ istio_labels: true }}\n"
        ))
        .expect("valid");
        assert!(on.compatibility.istio_labels);
        let empty =
            ControllerConfig::parse(&format!("{MINIMAL}compatibility: {{}}\n")).expect("valid");
        assert!(!empty.compatibility.istio_labels);
        for bad in [
            "compatibility: { istio_labels: yes please }",
            "compatibility: { istio: true }",
        ] {
            let err = ControllerConfig::parse(&format!("{MINIMAL}{bad}\n")).expect_err(bad);
            assert!(err.to_string().contains("compatibility"), "{err}");
        }
    }

    #[test]
    fn refusals_name_the_field_and_its_line() {
        // MINIMAL starts with a newline: `ca:` is on line 2, appended fields on line 5.
        for (text, kind_is_parse, field, line) in [
            (format!("{MINIMAL}listen_port: 1\n"), true, "listen_port", 5),
            (format!("{MINIMAL}hbone_port: -1\n"), true, "hbone_port", 5),
            (
                MINIMAL.replace("key: /k", "key: /k, pem: /x"),
                true,
                "ca.pem",
                2,
            ),
            (format!("{MINIMAL}hbone_port: 0\n"), false, "hbone_port", 5),
            (
                format!("{MINIMAL}server_names: [a.example, \"not a name\"]\n"),
                false,
                "server_names[1]",
                5,
            ),
            (
                MINIMAL.replace("cert: /c, key: /k", "secret: no-namespace"),
                false,
                "ca.secret",
                2,
            ),
            (
                MINIMAL.replace("auth: { bootstrap_tokens: /t }\n", ""),
                false,
                "auth",
                0,
            ),
        ] {
            let err = ControllerConfig::parse(&text).expect_err(field);
            assert_eq!(
                matches!(err, ConfigError::Parse { .. }),
                kind_is_parse,
                "{err}"
            );
            assert_eq!(err.field(), Some(field), "{err}");
            assert_eq!(err.line(), (line > 0).then_some(line), "{err}");
        }
    }

    #[test]
    fn a_refusal_at_load_names_the_file() {
        let dir =
            std::env::temp_dir().join(format!("trellis-controller-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("controller.yaml");
        std::fs::write(&path, format!("{MINIMAL}hbone_port: 0\n")).expect("write");
        let invalid = ControllerConfig::load(&path).expect_err("hbone_port 0");
        std::fs::write(&path, format!("{MINIMAL}hbone_prt: 1\n")).expect("write");
        let unknown = ControllerConfig::load(&path).expect_err("unknown field");
        let missing = ControllerConfig::load(&dir.join("absent.yaml")).expect_err("no file");
        let _ = std::fs::remove_dir_all(&dir);
        let file = path.display().to_string();
        for (err, needle) in [
            (invalid, "hbone_port (line 5)"),
            (unknown, "hbone_prt (line 5)"),
        ] {
            let message = err.to_string();
            assert!(
                message.contains(&file) && message.contains(needle),
                "{message}"
            );
        }
        assert!(matches!(missing, ConfigError::Read { .. }), "{missing}");
        assert!(missing.to_string().contains("absent.yaml"), "{missing}");
    }

    #[test]
    fn object_refs_need_namespace_and_name() {
        assert!("trellis-system/trellis-ca".parse::<ObjectRef>().is_ok());
        for bad in ["trellis-ca", "/x", "x/", "a/b/c", "Upper/x"] {
            assert!(bad.parse::<ObjectRef>().is_err(), "{bad}");
        }
    }
}
