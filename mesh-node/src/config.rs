//! The agent's configuration file: typed, defaulted, and validated on load.
//!
//! Two modes, exactly one of which a file selects:
//! - static (`ca`): the file lists the nodes and workloads and holds the CA key; the agent signs
//!   its own workload certificates. Used by tests and setups without a controller.
//! - live (`control_plane`): nodes and workloads stream from `mesh-node controller`, which also
//!   signs certificates; the file only says how to reach and trust it.
//!
//! Both share the node, trust domain, listener and datapath settings. Validation errors name
//! the offending field.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::identity::Identity;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid YAML for the agent: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("invalid config: {field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The agent configuration file (YAML).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Name of the node this agent runs on; workloads with this `node` are local.
    pub node: String,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Static mode: a CA held by the agent itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaConfig>,
    /// Live mode: the controller that streams the mesh state and signs certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<ControlPlaneConfig>,
    /// Lifetime of issued workload certificates; they are renewed at half life.
    #[serde(default = "default_cert_ttl")]
    pub certificate_ttl_secs: u64,
    pub listen: ListenConfig,
    pub datapath: DatapathConfig,
    #[serde(default)]
    pub outbound: OutboundConfig,
    #[serde(default)]
    pub inbound: InboundConfig,
    /// How much of the node one pod or peer may take.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// How long open connections may drain after SIGTERM.
    #[serde(default = "default_drain")]
    pub drain_timeout_secs: u64,
    #[serde(default)]
    pub log_format: LogFormat,
    /// Static mode: every node of the mesh, this one included.
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
    /// Static mode: every workload of the mesh.
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    /// PEM certificate of the signing CA; also the trust bundle.
    pub cert: PathBuf,
    /// PEM PKCS#8 private key of the signing CA.
    pub key: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// The controller's gRPC address (TLS), `host:port`, conventionally port 15012: an IP
    /// address or a DNS name such as `trellis-controller.trellis-system.svc`.
    pub address: ControllerAddress,
    /// The name the controller's certificate must carry; by default the address's IP (as an
    /// IP SAN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// PEM root of the mesh: verifies the controller and is the trust bundle for workloads.
    pub ca_cert: PathBuf,
    /// Bearer credential proving which node this agent runs on: a Kubernetes service account
    /// token (re-read on every use, as kubelet rotates it) or a bootstrap token.
    pub token_file: PathBuf,
    /// Namespace whose policies apply mesh-wide: the one the mesh is installed in.
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
}

fn default_root_namespace() -> String {
    crate::policy::DEFAULT_ROOT_NAMESPACE.to_owned()
}

impl ControlPlaneConfig {
    /// Checks what an agent or a waypoint needs to reach and trust its controller.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.address
            .check()
            .map_err(|reason| invalid("control_plane.address", reason))?;
        if let Some(name) = &self.server_name
            && rustls_pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            return Err(invalid(
                "control_plane.server_name",
                format!("{name:?} is not a DNS name or IP address"),
            ));
        }
        if self.ca_cert.as_os_str().is_empty() {
            return Err(invalid("control_plane.ca_cert", "a PEM file is required"));
        }
        if self.token_file.as_os_str().is_empty() {
            return Err(invalid("control_plane.token_file", "a file is required"));
        }
        check_dns_label("control_plane.root_namespace", &self.root_namespace)
    }

    /// The TLS server name to verify the controller's certificate against.
    pub fn server_name(&self) -> String {
        self.server_name
            .clone()
            .unwrap_or_else(|| self.address.host().to_owned())
    }
}

/// `host:port` of the controller, as written in the config (a DNS name is resolved at each
/// connect, so a controller Service that moves is followed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ControllerAddress(String);

impl ControllerAddress {
    /// The host part, without the brackets of an IPv6 literal.
    pub fn host(&self) -> &str {
        let host = self.0.rsplit_once(':').map_or(self.0.as_str(), |(h, _)| h);
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
    }

    fn check(&self) -> Result<(), String> {
        let (host, port) = self
            .0
            .rsplit_once(':')
            .ok_or_else(|| format!("{:?} is not host:port", self.0))?;
        match port.parse::<u16>() {
            Ok(p) if p != 0 => {}
            _ => return Err(format!("{port:?} is not a port")),
        }
        if let Ok(ip) = self.host().parse::<IpAddr>() {
            if ip.is_unspecified() {
                return Err("must be a concrete address and port".into());
            }
            if ip.is_ipv6() && !host.starts_with('[') {
                return Err("write IPv6 addresses as [address]:port".into());
            }
            return Ok(());
        }
        match rustls_pki_types::DnsName::try_from(host) {
            Ok(_) => Ok(()),
            Err(_) => Err(format!("{host:?} is neither an IP address nor a DNS name")),
        }
    }
}

impl From<SocketAddr> for ControllerAddress {
    fn from(addr: SocketAddr) -> Self {
        Self(addr.to_string())
    }
}

impl std::fmt::Display for ControllerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Replaces `${NAME}` with the environment variable `NAME`, so one file serves every node
/// of a DaemonSet (`node: ${NODE_NAME}`, `hbone: ${HOST_IP}:15008`). Only `${` starts a
/// reference; an unset or malformed one is an error naming it, never an empty string.
pub fn expand_env(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| {
            invalid(
                "config",
                "unterminated ${ (write ${NAME} to use an environment variable)",
            )
        })?;
        let name = &after[..end];
        let valid = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(invalid(
                "config",
                format!("${{{name}}} is not an environment variable reference (A-Z, 0-9, _)"),
            ));
        }
        let value = lookup(name).ok_or_else(|| {
            invalid(
                "config",
                format!("${{{name}}} is used but the environment variable {name} is not set"),
            )
        })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Outbound listener for redirected IPv4 connections; a concrete address the pods can reach
    /// (the eBPF programs rewrite destinations to it), conventionally port 15001.
    pub outbound: SocketAddr,
    /// Outbound listener for native IPv6 connections; without it, enrolled pods cannot open
    /// IPv6 connections (they are refused rather than leaving the mesh).
    #[serde(default)]
    pub outbound6: Option<SocketAddr>,
    /// HBONE listener, conventionally port 15008.
    pub hbone: SocketAddr,
    /// Admin listener (config dump, health, metrics); loopback by default.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Prometheus listener.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// Readiness listener serving `/healthz/ready`.
    #[serde(default)]
    pub readiness: Option<SocketAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatapathConfig {
    /// The cgroup v2 directory above every pod of this node; the programs attach here.
    pub cgroup_root: PathBuf,
    /// bpffs directory for pinned maps and links; a layout-versioned subdirectory is used.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Destination ports never redirected (for example the API server's).
    #[serde(default)]
    pub excluded_ports: Vec<u16>,
    /// Destination networks never redirected, in CIDR notation.
    #[serde(default)]
    pub excluded_cidrs: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// What to do with connections to addresses outside the mesh.
    #[serde(default)]
    pub unknown_destination: UnknownDestination,
    /// Connect timeout for upstream dials, in milliseconds.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// How many HBONE connections to one peer (per source and destination identity) streams
    /// are spread over; default: the number of cores the agent may use. One connection is
    /// encrypted by one core at a time, so fewer caps a node's throughput to one peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hbone_connections_per_peer: Option<std::num::NonZeroUsize>,
    /// Every outbound stream dials its own HBONE connection (a full mutual-TLS handshake),
    /// which closes when the stream ends. For measuring the cost of cold connections (the
    /// benchmark's `connect-cold` test); never useful in production. Left out when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hbone_single_use: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// Time allowed for a TLS handshake plus the first CONNECT request.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_ms: u64,
    /// Maximum concurrent HBONE streams per TLS connection.
    #[serde(default = "default_max_streams")]
    pub max_streams_per_connection: u32,
}

/// Caps and timeouts that keep one pod, or one peer, from taking the node proxy down (see
/// `proxy::limits` and `proxy::copy`).
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
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: None,
            max_connections_per_pod: default_max_connections_per_pod(),
            max_pending_handshakes: default_max_pending_handshakes(),
            idle_timeout_secs: default_idle_timeout(),
            half_close_timeout_secs: default_half_close_timeout(),
            reserved_descriptors: default_reserved_descriptors(),
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

/// A week: longer idle or half-close timeouts protect nothing.
const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

impl LimitsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let range = |field: &str, value: u64, min: u64, max: u64| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(invalid(
                    format!("limits.{field}"),
                    format!("{value} is outside {min}..={max}"),
                ))
            }
        };
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        if let Some(max) = self.max_connections {
            range("max_connections", count(max), 1, 10_000_000)?;
        }
        range(
            "max_connections_per_pod",
            count(self.max_connections_per_pod),
            1,
            1_000_000,
        )?;
        range(
            "max_pending_handshakes",
            count(self.max_pending_handshakes),
            1,
            65_536,
        )?;
        range(
            "idle_timeout_secs",
            self.idle_timeout_secs,
            1,
            MAX_TIMEOUT_SECS,
        )?;
        range(
            "half_close_timeout_secs",
            self.half_close_timeout_secs,
            1,
            self.idle_timeout_secs,
        )?;
        range(
            "reserved_descriptors",
            count(self.reserved_descriptors),
            32,
            1_000_000,
        )?;
        Ok(())
    }

    /// The node-wide connection cap under a descriptor limit of `nofile`: the configured
    /// one, but never more than the descriptors left after the reserve allow.
    pub fn effective_max_connections(&self, nofile: u64) -> usize {
        let budget =
            nofile.saturating_sub(u64::try_from(self.reserved_descriptors).unwrap_or(u64::MAX)) / 2;
        let budget = usize::try_from(budget).unwrap_or(usize::MAX).max(1);
        self.max_connections.map_or(budget, |max| max.min(budget))
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownDestination {
    /// Forward as plain TCP.
    #[default]
    Passthrough,
    /// Refuse the connection.
    Deny,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    /// Where this node's agent accepts HBONE.
    pub hbone: SocketAddr,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_sa")]
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    /// The pod's cgroup v2 directory; required for workloads on this node.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}
fn default_cert_ttl() -> u64 {
    24 * 3600
}
fn default_drain() -> u64 {
    10
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15000))
}
fn default_pin_dir() -> PathBuf {
    "/sys/fs/bpf/trellis".into()
}
fn default_connect_timeout() -> u64 {
    5_000
}
fn default_handshake_timeout() -> u64 {
    10_000
}
fn default_max_streams() -> u32 {
    512
}
fn default_sa() -> String {
    "default".into()
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let text = expand_env(&text, |name| std::env::var(name).ok())?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { reason, .. } => ConfigError::Parse {
                path: path.into(),
                reason,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: AgentConfig = serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            reason: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).unwrap_or_default()
    }

    /// Checks everything serde cannot: references between sections, addresses, names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_node_name("node", &self.node)?;
        match (&self.ca, &self.control_plane) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "control_plane",
                    "set either ca (static mode) or control_plane, not both",
                ));
            }
            (None, None) => {
                return Err(invalid(
                    "ca",
                    "one of ca (static mode) or control_plane is required",
                ));
            }
            (None, Some(cp)) => return self.validate_live(cp),
            (Some(_), None) => {}
        }
        self.validate_common()?;
        let mut node_names = HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            check_node_name(&format!("nodes[{i}].name"), &node.name)?;
            if !node_names.insert(node.name.as_str()) {
                return Err(invalid(format!("nodes[{i}].name"), "duplicate node"));
            }
            if node.hbone.ip().is_unspecified() || node.hbone.port() == 0 {
                return Err(invalid(
                    format!("nodes[{i}].hbone"),
                    "must be a concrete address",
                ));
            }
        }
        if !node_names.contains(self.node.as_str()) {
            return Err(invalid(
                "node",
                format!("{:?} is not listed under nodes", self.node),
            ));
        }
        let mut ips = HashSet::new();
        let mut names = HashSet::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let field = |f: &str| format!("workloads[{i}].{f}");
            check_dns_label(&field("name"), &w.name)?;
            Identity::new(&self.trust_domain, &w.namespace, &w.service_account)
                .map_err(|e| invalid(field("namespace/service_account"), e.to_string()))?;
            if !names.insert((w.namespace.as_str(), w.name.as_str())) {
                return Err(invalid(
                    field("name"),
                    "duplicate workload in its namespace",
                ));
            }
            if !node_names.contains(w.node.as_str()) {
                return Err(invalid(field("node"), format!("unknown node {:?}", w.node)));
            }
            if w.ips.is_empty() {
                return Err(invalid(field("ips"), "at least one address is required"));
            }
            for (j, ip) in w.ips.iter().enumerate() {
                if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                    return Err(invalid(
                        format!("workloads[{i}].ips[{j}]"),
                        "not a pod address",
                    ));
                }
                if !ips.insert(*ip) {
                    return Err(invalid(
                        format!("workloads[{i}].ips[{j}]"),
                        "address used twice",
                    ));
                }
            }
            if w.node == self.node && w.cgroup.is_none() {
                return Err(invalid(
                    field("cgroup"),
                    "required for workloads on this node",
                ));
            }
        }
        Ok(())
    }

    /// The settings both modes share.
    fn validate_common(&self) -> Result<(), ConfigError> {
        self.limits.validate()?;
        Identity::new(&self.trust_domain, "default", "default")
            .map_err(|e| invalid("trust_domain", e.to_string()))?;
        if self.certificate_ttl_secs < 60 {
            return Err(invalid("certificate_ttl_secs", "must be at least 60"));
        }
        if self.listen.outbound.ip().is_unspecified() || !self.listen.outbound.is_ipv4() {
            return Err(invalid(
                "listen.outbound",
                "must be a concrete IPv4 address that pods can reach",
            ));
        }
        if let Some(addr) = self.listen.outbound6 {
            if addr.ip().is_unspecified() || !addr.is_ipv6() {
                return Err(invalid(
                    "listen.outbound6",
                    "must be a concrete IPv6 address",
                ));
            }
            if addr.port() != self.listen.outbound.port() {
                return Err(invalid(
                    "listen.outbound6",
                    "must use the same port as listen.outbound",
                ));
            }
        }
        for (i, cidr) in self.datapath.excluded_cidrs.iter().enumerate() {
            parse_cidr(cidr).map_err(|r| invalid(format!("datapath.excluded_cidrs[{i}]"), r))?;
        }
        Ok(())
    }

    /// Live mode: the mesh comes from the controller, so the file must not describe it.
    fn validate_live(&self, cp: &ControlPlaneConfig) -> Result<(), ConfigError> {
        self.validate_common()?;
        cp.validate()?;
        if !self.nodes.is_empty() {
            return Err(invalid(
                "nodes",
                "must be empty with control_plane: nodes come from the controller",
            ));
        }
        if !self.workloads.is_empty() {
            return Err(invalid(
                "workloads",
                "must be empty with control_plane: workloads come from the controller",
            ));
        }
        Ok(())
    }
}

/// Parses `a.b.c.d/n` or `x::y/n`.
pub fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let (ip, len) = text.split_once('/').ok_or("expected ADDRESS/PREFIX")?;
    let ip: IpAddr = ip.parse().map_err(|e| format!("bad address: {e}"))?;
    let len: u8 = len.parse().map_err(|e| format!("bad prefix length: {e}"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("prefix length {len} exceeds {max}"));
    }
    Ok((ip, len))
}

/// Kubernetes node names are DNS subdomains (`ip-10-0-0-1.ec2.internal`).
fn check_node_name(field: &str, value: &str) -> Result<(), ConfigError> {
    let ok = value.len() <= 253
        && value
            .split('.')
            .all(|label| check_dns_label(field, label).is_ok());
    if ok {
        Ok(())
    } else {
        Err(invalid(field, format!("{value:?} is not a DNS subdomain")))
    }
}

fn check_dns_label(field: &str, value: &str) -> Result<(), ConfigError> {
    if crate::identity::is_dns_label(value) {
        Ok(())
    } else {
        Err(invalid(field, format!("{value:?} is not a DNS label")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node: node-a
ca: { cert: /ca.pem, key: /ca.key }
listen: { outbound: "10.0.0.1:15001", hbone: "10.1.0.1:15008" }
datapath: { cgroup_root: /sys/fs/cgroup/pods, excluded_cidrs: ["10.96.0.1/32"] }
nodes:
  - { name: node-a, hbone: "10.1.0.1:15008" }
  - { name: node-b, hbone: "10.1.0.2:15008" }
workloads:
  - { name: web, namespace: shop, service_account: web, node: node-a, ips: [10.0.0.10], cgroup: /sys/fs/cgroup/pods/web }
  - { name: db, namespace: shop, node: node-b, ips: [10.0.1.10] }
"#;

    fn error_field(text: &str) -> String {
        match AgentConfig::parse(text) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_file_loads_with_defaults() {
        let config = AgentConfig::parse(GOOD).expect("valid");
        assert_eq!(config.trust_domain, "cluster.local");
        assert_eq!(config.workloads[1].service_account, "default");
        assert_eq!(
            config.listen.admin,
            SocketAddr::from(([127, 0, 0, 1], 15000))
        );
        assert_eq!(
            config.outbound.unknown_destination,
            UnknownDestination::Passthrough
        );
        let again = AgentConfig::parse(&config.to_yaml()).expect("round trip");
        assert_eq!(again.workloads.len(), 2);
    }

    #[test]
    fn hbone_connections_per_peer_is_optional_and_never_zero() {
        let config = AgentConfig::parse(GOOD).expect("valid");
        assert_eq!(config.outbound.hbone_connections_per_peer, None);
        assert!(
            !config.to_yaml().contains("hbone_connections_per_peer"),
            "left out when unset, so agents that predate it read the file"
        );
        let with = |n: &str| format!("{GOOD}outbound: {{ hbone_connections_per_peer: {n} }}\n");
        let four = AgentConfig::parse(&with("4")).expect("valid");
        assert_eq!(
            four.outbound
                .hbone_connections_per_peer
                .map(std::num::NonZeroUsize::get),
            Some(4)
        );
        assert!(AgentConfig::parse(&with("0")).is_err(), "0 is refused");
    }

    #[test]
    fn hbone_single_use_is_off_unless_set() {
        let config = AgentConfig::parse(GOOD).expect("valid");
        assert!(!config.outbound.hbone_single_use);
        assert!(
            !config.to_yaml().contains("hbone_single_use"),
            "left out when off, so agents that predate it read the file"
        );
        let on = AgentConfig::parse(&format!("{GOOD}outbound: {{ hbone_single_use: true }}\n"))
            .expect("valid");
        assert!(on.outbound.hbone_single_use);
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            error_field(&GOOD.replace("node: node-b, ips", "node: node-x, ips")),
            "workloads[1].node"
        );
        assert_eq!(
            error_field(&GOOD.replace("ips: [10.0.1.10]", "ips: [10.0.0.10]")),
            "workloads[1].ips[0]"
        );
        assert_eq!(
            error_field(&GOOD.replace(", cgroup: /sys/fs/cgroup/pods/web", "")),
            "workloads[0].cgroup"
        );
        assert_eq!(
            error_field(&GOOD.replace("10.96.0.1/32", "10.96.0.1/33")),
            "datapath.excluded_cidrs[0]"
        );
        assert_eq!(
            error_field(&GOOD.replace(
                "outbound: \"10.0.0.1:15001\"",
                "outbound: \"0.0.0.0:15001\""
            )),
            "listen.outbound"
        );
        assert_eq!(
            error_field(&GOOD.replace("node: node-a\nca", "node: node-z\nca")),
            "node"
        );
        assert_eq!(
            error_field(&GOOD.replace(
                "namespace: shop, service_account: web",
                "namespace: Shop, service_account: web"
            )),
            "workloads[0].namespace/service_account"
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let text = GOOD.replace("node: node-a\n", "node: node-a\nnode_name: typo\n");
        assert!(matches!(
            AgentConfig::parse(&text),
            Err(ConfigError::Parse { .. })
        ));
    }

    const LIVE: &str = r#"
node: node-a
control_plane: { address: "10.1.0.1:15012", ca_cert: /etc/trellis/ca.pem, token_file: /var/run/token }
listen: { outbound: "10.0.0.1:15001", hbone: "10.1.0.1:15008" }
datapath: { cgroup_root: /sys/fs/cgroup/kubepods.slice }
"#;

    #[test]
    fn live_mode_needs_only_the_control_plane() {
        let config = AgentConfig::parse(LIVE).expect("valid");
        let cp = config.control_plane.as_ref().expect("control plane");
        assert!(config.ca.is_none());
        assert_eq!(cp.server_name(), "10.1.0.1", "defaults to the address's IP");
        let named = AgentConfig::parse(&LIVE.replace(
            "ca_cert:",
            "server_name: trellis-controller.trellis-system.svc, ca_cert:",
        ))
        .expect("valid");
        assert_eq!(
            named.control_plane.expect("cp").server_name(),
            "trellis-controller.trellis-system.svc"
        );
        let again = AgentConfig::parse(&config.to_yaml()).expect("round trip");
        assert!(again.control_plane.is_some() && again.ca.is_none());
    }

    #[test]
    fn one_file_serves_every_node_through_the_environment() {
        let env = |name: &str| match name {
            "NODE_NAME" => Some("ip-10-1-0-1.ec2.internal".to_owned()),
            "HOST_IP" => Some("10.1.0.1".to_owned()),
            _ => None,
        };
        let text = LIVE
            .replace("node: node-a", "node: ${NODE_NAME}")
            .replace("hbone: \"10.1.0.1:15008\"", "hbone: \"${HOST_IP}:15008\"")
            .replace(
                "address: \"10.1.0.1:15012\"",
                "address: trellis-controller.trellis-system.svc:15012",
            );
        let config = AgentConfig::parse(&expand_env(&text, env).expect("expands")).expect("valid");
        assert_eq!(config.node, "ip-10-1-0-1.ec2.internal");
        assert_eq!(config.listen.hbone, "10.1.0.1:15008".parse().expect("addr"));
        let cp = config.control_plane.expect("cp");
        assert_eq!(cp.server_name(), "trellis-controller.trellis-system.svc");

        for (text, needle) in [
            ("node: ${POD_IP}", "POD_IP is not set"),
            ("node: ${node}", "not an environment variable reference"),
            ("node: ${NODE_NAME", "unterminated"),
        ] {
            let err = expand_env(text, env).expect_err(text).to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        assert_eq!(expand_env("cost: $5", env).expect("plain $"), "cost: $5");
    }

    #[test]
    fn controller_addresses_are_ip_or_dns_with_a_port() {
        for good in [
            "10.1.0.1:15012",
            "[fd00::1]:15012",
            "trellis-controller.trellis-system.svc:15012",
        ] {
            assert!(ControllerAddress(good.into()).check().is_ok(), "{good}");
        }
        assert_eq!(
            ControllerAddress("[fd00::1]:15012".into()).host(),
            "fd00::1"
        );
        for bad in [
            "10.1.0.1",
            "0.0.0.0:15012",
            "fd00::1:15012",
            "host:0",
            "bad host!:1",
            "x:y",
        ] {
            assert!(ControllerAddress(bad.into()).check().is_err(), "{bad}");
        }
    }

    #[test]
    fn exactly_one_mode_is_required() {
        let both = LIVE.replace(
            "node: node-a\n",
            "node: node-a\nca: { cert: /ca.pem, key: /ca.key }\n",
        );
        assert_eq!(error_field(&both), "control_plane");
        let neither = GOOD.replace("ca: { cert: /ca.pem, key: /ca.key }\n", "");
        assert_eq!(error_field(&neither), "ca");
    }

    #[test]
    fn live_mode_refuses_a_static_mesh_description() {
        let with_nodes = format!("{LIVE}nodes: [{{ name: node-a, hbone: \"10.1.0.1:15008\" }}]\n");
        assert_eq!(error_field(&with_nodes), "nodes");
        let with_workloads = format!(
            "{LIVE}workloads: [{{ name: web, namespace: shop, node: node-a, ips: [10.0.0.10], cgroup: /x }}]\n"
        );
        assert_eq!(error_field(&with_workloads), "workloads");
        assert_eq!(
            error_field(&LIVE.replace("10.1.0.1:15012", "0.0.0.0:15012")),
            "control_plane.address"
        );
        assert_eq!(
            error_field(&LIVE.replace("ca_cert:", "server_name: \"bad name!\", ca_cert:")),
            "control_plane.server_name"
        );
        assert_eq!(
            error_field(&LIVE.replace("token_file: /var/run/token", "token_file: \"\"")),
            "control_plane.token_file"
        );
        // The shared checks apply in live mode too.
        assert_eq!(
            error_field(&LIVE.replace("10.0.0.1:15001", "0.0.0.0:15001")),
            "listen.outbound"
        );
    }
}
