//! The configuration files of the three roles: the agent's (here), the waypoint's
//! ([`waypoint`]) and the controller's ([`controller`]). Each is typed, defaulted, and
//! validated on load; all three share one error type ([`ConfigError`]), whose refusals name
//! the file, the field and its line. The agent and the waypoint also share the listener
//! section ([`ListenConfig`]), the control plane section ([`ControlPlaneConfig`]) and the
//! bounds of their numbers ([`bounds`]).
//!
//! The agent's file selects one of two modes:
//! - static (`ca`): the file lists the nodes and workloads and holds the CA key; the agent signs
//!   its own workload certificates. Used by tests and setups without a controller.
//! - live (`control_plane`): nodes and workloads stream from `mesh-node controller`, which also
//!   signs certificates; the file only says how to reach and trust it.
//!
//! Both share the node, trust domain, listener and datapath settings. Every value is checked
//! here, before the agent touches the kernel or the network; a refusal names the offending
//! field and, where the file spells it out, its line.

pub mod controller;
mod error;
mod limits;
mod lines;
#[cfg(test)]
mod tests;
mod validate;
pub mod waypoint;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

pub use error::{ConfigError, invalid};
use ipnet::IpNet;
pub use limits::{DEFAULT_ACCESS_LOG_BURST, DEFAULT_ACCESS_LOG_PER_SOURCE_PER_SEC, LimitsConfig};
pub use lines::Lines;
use serde::{Deserialize, Serialize};
pub use validate::bounds;
pub(crate) use validate::within;

/// Reads the configuration file at `path` and hands its text to `parse`; every refusal,
/// unreadable file included, names the file.
pub(crate) fn load_file<T>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    parse(&text).map_err(|e| e.in_file(path))
}

/// Deserializes a configuration file (agent, waypoint or controller), then runs its checks;
/// every refusal names the field and its line.
pub(crate) fn parse_yaml<T: serde::de::DeserializeOwned>(
    text: &str,
    validate: impl FnOnce(&T) -> Result<(), ConfigError>,
) -> Result<T, ConfigError> {
    let config = lines::from_yaml::<T>(text)?;
    validate(&config).map_err(|e| e.located(text))?;
    Ok(config)
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
        // The YAML is not parsed yet, so the refusal points at the reference's line.
        let line = text[..text.len() - rest.len() + start]
            .matches('\n')
            .count() as u64
            + 1;
        let refuse = |reason: String| ConfigError::at_line(line, reason);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| {
            refuse("unterminated ${ (write ${NAME} to use an environment variable)".into())
        })?;
        let name = &after[..end];
        let valid = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(refuse(format!(
                "${{{name}}} is not an environment variable reference (A-Z, 0-9, _)"
            )));
        }
        let value = lookup(name).ok_or_else(|| {
            refuse(format!(
                "${{{name}}} is used but the environment variable {name} is not set"
            ))
        })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Where an agent or a waypoint listens. The controller's file names its two addresses at its
/// top level instead (`listen` and `monitoring`, see [`controller::ControllerConfig`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Agent only: the outbound listener for redirected IPv4 connections; a concrete address
    /// the pods can reach (the eBPF programs rewrite destinations to it), conventionally port
    /// 15001. Required by the agent: left out, it reads as `0.0.0.0:0`, which the agent
    /// refuses; a waypoint refuses any value (it takes no redirected connections).
    #[serde(default = "unset_address", skip_serializing_if = "is_unset")]
    pub outbound: SocketAddr,
    /// Agent only: the outbound listener for native IPv6 connections; without it, enrolled
    /// pods cannot open IPv6 connections (they are refused rather than leaving the mesh).
    #[serde(default)]
    pub outbound6: Option<SocketAddr>,
    /// HBONE listener, conventionally port 15008.
    pub hbone: SocketAddr,
    /// Admin listener (config dump, health, metrics); loopback by default.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Prometheus listener (a waypoint's conventionally on port 15020).
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// Readiness listener serving `/healthz/ready` (a waypoint's conventionally on port 15021).
    #[serde(default)]
    pub readiness: Option<SocketAddr>,
}

/// What a listener left out of the file reads as: no address anyone can reach.
fn unset_address() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

fn is_unset(addr: &SocketAddr) -> bool {
    *addr == unset_address()
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
    /// Accept exclusions wide enough to take most or all traffic out of the mesh (an IPv4
    /// prefix shorter than /8, an IPv6 prefix shorter than /16, such as `0.0.0.0/0`). Off by
    /// default: such an entry is almost always a mistake that silently turns the mesh off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_catch_all_exclusions: bool,
    /// Has the kernel count each eBPF program's runs and run time while the agent runs
    /// (`trellis_datapath_program_runs_total`, `trellis_datapath_program_run_seconds_total`).
    /// Costs two clock reads per program run; on by default.
    #[serde(default = "default_true")]
    pub program_stats: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, Serialize, Deserialize)]
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

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// Time allowed for a TLS handshake plus the first CONNECT request.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_ms: u64,
    /// Maximum concurrent HBONE streams per TLS connection.
    #[serde(default = "default_max_streams")]
    pub max_streams_per_connection: u32,
    /// Which address local pods see their mesh connections come from.
    #[serde(default)]
    pub source_address: SourceAddress,
}

/// The address the node proxy opens a local pod's connection from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceAddress {
    /// The client pod's own address, when the mesh state says the verified source owns it
    /// (else the node's, logged and counted): network policies, logs and address-based
    /// checks in the pod see the real client.
    #[default]
    Client,
    /// Always the node's address (the client travels in telemetry only).
    Node,
}

// Written out rather than derived: an omitted `outbound:` or `inbound:` section must get the
// same defaults as an omitted field, not zero timeouts and zero streams.
impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            unknown_destination: UnknownDestination::default(),
            connect_timeout_ms: default_connect_timeout(),
            hbone_connections_per_peer: None,
            hbone_single_use: false,
        }
    }
}

impl Default for InboundConfig {
    fn default() -> Self {
        Self {
            handshake_timeout_ms: default_handshake_timeout(),
            max_streams_per_connection: default_max_streams(),
            source_address: SourceAddress::default(),
        }
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
    /// Reads, checks and, in static mode, opens the CA files: a key that does not match its
    /// certificate, or a certificate that is not a CA, is refused here rather than giving an
    /// agent whose certificates no peer accepts.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_file(path, |text| {
            let text = expand_env(text, |name| std::env::var(name).ok())?;
            let config = Self::parse(&text)?;
            if let Some(ca) = &config.ca {
                ca.load().map_err(|e| e.located(&text))?;
            }
            Ok(config)
        })
    }

    /// Parses and checks a configuration; files it names are not opened.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        parse_yaml(text, Self::validate)
    }

    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).unwrap_or_default()
    }
}

/// Parses a network in CIDR notation, `a.b.c.d/n` or `x::y/n`, as written (host bits may be
/// set: the datapath's longest-prefix match ignores them).
pub fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let net: IpNet = text.parse().map_err(|_| {
        format!(
            "{text:?} is not a network in CIDR notation (ADDRESS/PREFIX, such as 10.96.0.0/12 \
             or fd00::/108, with a prefix of at most 32 for IPv4 and 128 for IPv6)"
        )
    })?;
    Ok((net.addr(), net.prefix_len()))
}

/// Kubernetes node names are DNS subdomains (`ip-10-0-0-1.ec2.internal`).
fn check_node_name(field: &str, value: &str) -> Result<(), ConfigError> {
    if crate::identity::is_dns_subdomain(value) {
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
