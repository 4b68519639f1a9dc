//! The mesh as this node sees it: workloads, their identities and nodes.
//!
//! Built from configuration into an immutable snapshot; readers hold an `Arc` to a consistent
//! view while updates swap in a new one.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use crate::{
    config::{AgentConfig, ConfigError},
    ebpf::PodCgroup,
    identity::Identity,
};

/// A pod of the mesh.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    #[serde(serialize_with = "serialize_display")]
    pub identity: Identity,
}

fn serialize_display<S: serde::Serializer>(v: &Identity, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeInfo {
    pub name: String,
    pub hbone: SocketAddr,
}

/// An immutable view of the mesh.
#[derive(Debug, Default)]
pub struct MeshState {
    local_node: String,
    workloads: Vec<Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    by_cgroup: HashMap<u64, Arc<Workload>>,
    local_cgroups: Vec<PodCgroup>,
    nodes: HashMap<String, NodeInfo>,
}

impl MeshState {
    /// Builds the view from a validated configuration. A local workload whose cgroup cannot be
    /// found is kept out of the enrollment (its connections are not meshed, and logged), without
    /// affecting anyone else.
    pub fn from_config(config: &AgentConfig) -> Result<Self, ConfigError> {
        let mut state = MeshState {
            local_node: config.node.clone(),
            ..Default::default()
        };
        for node in &config.nodes {
            state.nodes.insert(
                node.name.clone(),
                NodeInfo {
                    name: node.name.clone(),
                    hbone: node.hbone,
                },
            );
        }
        for (i, w) in config.workloads.iter().enumerate() {
            let identity = Identity::new(&config.trust_domain, &w.namespace, &w.service_account)
                .map_err(|e| ConfigError::Invalid {
                    field: format!("workloads[{i}]"),
                    reason: e.to_string(),
                })?;
            let workload = Arc::new(Workload {
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                service_account: w.service_account.clone(),
                node: w.node.clone(),
                ips: w.ips.clone(),
                cgroup: w.cgroup.clone(),
                identity,
            });
            for ip in &w.ips {
                state.by_ip.insert(*ip, workload.clone());
            }
            if w.node == config.node
                && let Some(path) = &w.cgroup
            {
                match PodCgroup::from_path(path) {
                    Ok(cgroup) => {
                        state.by_cgroup.insert(cgroup.id, workload.clone());
                        state.local_cgroups.push(cgroup);
                    }
                    Err(e) => {
                        tracing::error!(workload = %w.name, namespace = %w.namespace, error = %e, "pod cgroup not found; pod not enrolled")
                    }
                }
            }
            state.workloads.push(workload);
        }
        Ok(state)
    }

    pub fn local_node(&self) -> &str {
        &self.local_node
    }

    pub fn workloads(&self) -> &[Arc<Workload>] {
        &self.workloads
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&canonical(ip))
    }

    pub fn workload_by_cgroup(&self, cgroup_id: u64) -> Option<&Arc<Workload>> {
        self.by_cgroup.get(&cgroup_id)
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }

    pub fn is_local(&self, workload: &Workload) -> bool {
        workload.node == self.local_node
    }

    /// Cgroups of the local pods that are enrolled in the datapath.
    pub fn local_cgroups(&self) -> &[PodCgroup] {
        &self.local_cgroups
    }

    /// Identities of the workloads on this node: the only ones it may hold certificates for.
    pub fn local_identities(&self) -> HashSet<Identity> {
        self.workloads
            .iter()
            .filter(|w| self.is_local(w))
            .map(|w| w.identity.clone())
            .collect()
    }
}

/// IPv4-mapped IPv6 addresses name the IPv4 workload.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
