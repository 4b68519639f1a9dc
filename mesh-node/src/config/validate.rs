//! The checks serde cannot make: ranges, references between sections, map capacities, and
//! the CA files of static mode. All of them run before the agent binds a socket or writes a
//! pinned map, so a refused file leaves the running datapath exactly as it was.

use std::{collections::HashSet, fmt::Display, ops::RangeInclusive};

use mesh_common::{MAX_ENROLLED_CGROUPS, MAX_EXCLUDED_NETS, MAX_EXCLUDED_PORTS};

use super::{
    AgentConfig, CaConfig, ConfigError, ControlPlaneConfig, DatapathConfig, ListenConfig,
    check_dns_label, check_node_name, invalid, is_unset, parse_cidr,
};
use crate::identity::{Identity, LocalCa, ca::CaError};

/// The accepted range of every bounded number, shared by the agent's and the waypoint's files.
pub mod bounds {
    use std::ops::RangeInclusive;

    /// Workload certificates: at least a minute (renewal at half life must not spin), at most
    /// a year. Longer-lived workload credentials defeat rotation, and a bound keeps validity
    /// arithmetic far from overflow.
    pub const AGENT_CERT_TTL_SECS: RangeInclusive<u64> = 60..=365 * 24 * 3600;
    /// The waypoint's own certificate: it serves many clients, so it is never shorter-lived
    /// than ten minutes; at most a year, as for workloads.
    pub const WAYPOINT_CERT_TTL_SECS: RangeInclusive<u64> = 600..=365 * 24 * 3600;
    /// Draining after SIGTERM: zero closes connections at once; beyond an hour a rollout
    /// stalls on one long-lived connection (and Kubernetes kills the pod anyway).
    pub const DRAIN_TIMEOUT_SECS: RangeInclusive<u64> = 0..=3600;
    /// Connect and handshake timeouts, in milliseconds: below 100 ms a TLS handshake on a busy
    /// node fails spuriously (zero fails every one); beyond two minutes a dead peer holds a
    /// connection slot longer than the kernel's own SYN retries would.
    pub const TIMEOUT_MS: RangeInclusive<u64> = 100..=120_000;
    /// Concurrent HBONE streams per connection: zero admits no stream at all; each stream is a
    /// proxied TCP connection with its own buffers, so one peer connection holds at most 10,000.
    pub const STREAMS_PER_CONNECTION: RangeInclusive<u32> = 1..=10_000;
    /// HBONE connections per peer: each is a full TLS session; more than 256 only adds
    /// handshakes, as no node has that many cores to encrypt them in parallel.
    pub const HBONE_CONNECTIONS_PER_PEER: RangeInclusive<usize> = 1..=256;
    /// Prefix lengths below these make an exclusion "catch-all": wider than any pod or service
    /// range, so it takes most of the traffic out of the mesh.
    pub const NARROWEST_CATCH_ALL_V4: u8 = 8;
    pub const NARROWEST_CATCH_ALL_V6: u8 = 16;
}

/// Refuses `value` outside `range`, naming the field and the range.
pub(crate) fn within<T: PartialOrd + Display>(
    field: &str,
    value: T,
    range: RangeInclusive<T>,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{value} is out of range: allowed {}..={}",
                range.start(),
                range.end()
            ),
        ))
    }
}

impl AgentConfig {
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
        // Enrollment writes every local pod into a pinned map; more than it holds would fail
        // half-way through, with the map already changed.
        let local = self
            .workloads
            .iter()
            .filter(|w| w.node == self.node)
            .count();
        if local > MAX_ENROLLED_CGROUPS as usize {
            return Err(invalid(
                "workloads",
                format!(
                    "{local} workloads on node {:?}; the datapath enrolls at most {MAX_ENROLLED_CGROUPS} pods per node",
                    self.node
                ),
            ));
        }
        Ok(())
    }

    /// The settings both modes share.
    fn validate_common(&self) -> Result<(), ConfigError> {
        self.limits.validate()?;
        Identity::new(&self.trust_domain, "default", "default")
            .map_err(|e| invalid("trust_domain", e.to_string()))?;
        within(
            "certificate_ttl_secs",
            self.certificate_ttl_secs,
            bounds::AGENT_CERT_TTL_SECS,
        )?;
        within(
            "drain_timeout_secs",
            self.drain_timeout_secs,
            bounds::DRAIN_TIMEOUT_SECS,
        )?;
        within(
            "outbound.connect_timeout_ms",
            self.outbound.connect_timeout_ms,
            bounds::TIMEOUT_MS,
        )?;
        if let Some(n) = self.outbound.hbone_connections_per_peer {
            within(
                "outbound.hbone_connections_per_peer",
                n.get(),
                bounds::HBONE_CONNECTIONS_PER_PEER,
            )?;
        }
        within(
            "inbound.handshake_timeout_ms",
            self.inbound.handshake_timeout_ms,
            bounds::TIMEOUT_MS,
        )?;
        within(
            "inbound.max_streams_per_connection",
            self.inbound.max_streams_per_connection,
            bounds::STREAMS_PER_CONNECTION,
        )?;
        self.listen.validate_agent()?;
        self.datapath.validate()
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

impl ListenConfig {
    /// The agent's listeners: the outbound ones are where pods' connections are redirected.
    fn validate_agent(&self) -> Result<(), ConfigError> {
        if is_unset(&self.outbound) {
            return Err(invalid(
                "listen.outbound",
                "required: the concrete IPv4 address and port that pods' connections are \
                 redirected to",
            ));
        }
        if self.outbound.ip().is_unspecified() || !self.outbound.is_ipv4() {
            return Err(invalid(
                "listen.outbound",
                "must be a concrete IPv4 address that pods can reach",
            ));
        }
        if let Some(addr) = self.outbound6 {
            if addr.ip().is_unspecified() || !addr.is_ipv6() {
                return Err(invalid(
                    "listen.outbound6",
                    "must be a concrete IPv6 address",
                ));
            }
            if addr.port() != self.outbound.port() {
                return Err(invalid(
                    "listen.outbound6",
                    "must use the same port as listen.outbound",
                ));
            }
        }
        Ok(())
    }

    /// A waypoint's listeners: it takes no redirected connections, so the agent's outbound
    /// listeners are refused rather than silently ignored.
    pub(super) fn validate_waypoint(&self) -> Result<(), ConfigError> {
        let refuse = |field: &str| {
            invalid(
                field,
                "a waypoint has no outbound listener (only node agents take redirected \
                 connections): remove it",
            )
        };
        if !is_unset(&self.outbound) {
            return Err(refuse("listen.outbound"));
        }
        if self.outbound6.is_some() {
            return Err(refuse("listen.outbound6"));
        }
        Ok(())
    }
}

impl DatapathConfig {
    /// Exclusions: what the pinned maps can hold, and nothing that switches the mesh off.
    fn validate(&self) -> Result<(), ConfigError> {
        // The maps keep enforcing the previous agent's exclusions until this agent rewrites
        // them; a list they cannot hold must be refused before the first entry is written.
        if self.excluded_ports.len() > MAX_EXCLUDED_PORTS as usize {
            return Err(invalid(
                "datapath.excluded_ports",
                format!(
                    "{} entries; the datapath holds at most {MAX_EXCLUDED_PORTS}",
                    self.excluded_ports.len()
                ),
            ));
        }
        if let Some(i) = self.excluded_ports.iter().position(|p| *p == 0) {
            return Err(invalid(
                format!("datapath.excluded_ports[{i}]"),
                "0 is not a destination port",
            ));
        }
        if self.excluded_cidrs.len() > MAX_EXCLUDED_NETS as usize {
            return Err(invalid(
                "datapath.excluded_cidrs",
                format!(
                    "{} entries; the datapath holds at most {MAX_EXCLUDED_NETS}",
                    self.excluded_cidrs.len()
                ),
            ));
        }
        for (i, cidr) in self.excluded_cidrs.iter().enumerate() {
            let field = || format!("datapath.excluded_cidrs[{i}]");
            let (ip, len) = parse_cidr(cidr).map_err(|r| invalid(field(), r))?;
            let narrowest = if ip.is_ipv4() {
                bounds::NARROWEST_CATCH_ALL_V4
            } else {
                bounds::NARROWEST_CATCH_ALL_V6
            };
            if len < narrowest && !self.allow_catch_all_exclusions {
                return Err(invalid(
                    field(),
                    format!(
                        "{cidr} is a catch-all exclusion (prefix shorter than /{narrowest}) and \
                         would take most traffic out of the mesh; list narrower networks, or set \
                         datapath.allow_catch_all_exclusions: true if that is the intent"
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl CaConfig {
    /// Opens the static-mode CA: the key must be the certificate's, and the certificate a
    /// CA that may sign. Refusals name `ca.cert` or `ca.key`.
    pub fn load(&self) -> Result<LocalCa, ConfigError> {
        LocalCa::load(&self.cert, &self.key).map_err(|e| {
            let field = match &e {
                CaError::Read { path, .. } if *path == self.key.display().to_string() => "ca.key",
                CaError::Invalid {
                    what: "private key",
                    ..
                }
                | CaError::KeyMismatch => "ca.key",
                _ => "ca.cert",
            };
            invalid(field, e.to_string())
        })
    }
}
