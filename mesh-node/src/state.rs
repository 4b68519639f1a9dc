//! The mesh as this node sees it: the immutable snapshot every listener reads ([`MeshState`])
//! and its parts: workloads ([`workload`]), services ([`service`]), waypoints ([`waypoint`]) and
//! nodes ([`node`]).
//!
//! The snapshot is immutable: readers hold an `Arc` to a consistent view while the owner of
//! the state (the agent's state task, the waypoint's, or start-up in static mode) swaps in a
//! new one. It is built either from the static configuration or from the resources the
//! controller streams; the protobuf types are converted in the parts, at the boundary
//! ([`resource`]), and nothing past it sees them.
//!
//! An address claimed by two workloads at once names neither. The same holds for service
//! virtual IPs: a VIP two services claim names neither.

pub mod node;
pub mod resource;
pub mod service;
pub mod waypoint;
pub mod workload;

#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

pub use node::NodeInfo;
pub use resource::{ResourceError, canonical};
pub use service::Service;
pub use waypoint::{Waypoint, WaypointMap, WaypointRef};
pub use workload::{Workload, WorkloadTelemetry};

use crate::{
    config::{AgentConfig, ConfigError},
    ebpf::{InboundMtls, PodCgroup},
    identity::Identity,
    k8s::{WAYPOINT_ENFORCEMENT_DISABLED, WAYPOINT_ENFORCEMENT_LABEL},
    policy::{Destination, Engine},
};

/// An immutable view of the mesh.
#[derive(Debug, Default)]
pub struct MeshState {
    local_node: String,
    /// Every known workload, enrolled or not, ordered by (namespace, name, uid).
    workloads: Vec<Arc<Workload>>,
    /// Mesh destinations: enrolled workloads, by each address only they claim.
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// Any workload by address, for telemetry.
    known_by_ip: HashMap<IpAddr, Arc<Workload>>,
    by_cgroup: HashMap<u64, Arc<Workload>>,
    local_cgroups: Vec<PodCgroup>,
    /// Enrolled local workloads whose cgroup is not (yet) found: not redirected.
    pending_cgroups: Vec<Arc<Workload>>,
    nodes: HashMap<String, NodeInfo>,
    /// Every service, ordered by (namespace, name).
    services: Vec<Arc<Service>>,
    /// Services by each virtual IP only they claim (canonical).
    by_vip: HashMap<IpAddr, Arc<Service>>,
    /// Services by the address of each of their endpoints (canonical), ordered by
    /// (namespace, name): the services a pod-addressed request is also for.
    by_endpoint: HashMap<IpAddr, Vec<Arc<Service>>>,
    /// The authorization and peer authentication policies in force.
    policy: Arc<Engine>,
    waypoints: WaypointMap,
    /// The waypoints each enrolled workload (by uid) must be reached through.
    guards: HashMap<String, waypoint::Guards>,
}

impl MeshState {
    /// Nothing known yet (live mode before the first snapshot).
    pub fn empty(local_node: &str) -> Self {
        Self {
            local_node: local_node.to_owned(),
            ..Default::default()
        }
    }

    /// Builds the view from a validated static configuration. Every configured workload is
    /// enrolled. A local workload whose cgroup cannot be found is kept out of the enrollment
    /// (its connections are not meshed, and logged), without affecting anyone else. Static
    /// configurations describe no services.
    pub fn from_config(config: &AgentConfig) -> Result<Self, ConfigError> {
        let nodes = config.nodes.iter().map(|node| NodeInfo {
            name: node.name.clone(),
            hbone: node.hbone,
            zone: None,
        });
        let mut workloads = Vec::with_capacity(config.workloads.len());
        for (i, w) in config.workloads.iter().enumerate() {
            let identity = Identity::new(&config.trust_domain, &w.namespace, &w.service_account)
                .map_err(|e| crate::config::invalid(format!("workloads[{i}]"), e.to_string()))?;
            workloads.push(Arc::new(Workload {
                // Static workloads have no pod object; their name is unique per namespace.
                uid: format!("static.{}.{}", w.namespace, w.name),
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                service_account: w.service_account.clone(),
                node: w.node.clone(),
                ips: w.ips.iter().map(|ip| canonical(*ip)).collect(),
                labels: BTreeMap::new(),
                enrolled: true,
                zone: None,
                cgroup: w.cgroup.clone(),
                identity,
                waypoint: None,
                telemetry: WorkloadTelemetry::of_pod(&w.name, &BTreeMap::new()),
            }));
        }
        Ok(Self::build(&config.node, workloads, nodes, [], |w| {
            let path = w.cgroup.as_ref()?;
            PodCgroup::from_path(path)
                .map_err(|e| {
                    tracing::error!(workload = %w.name, namespace = %w.namespace, error = %e, "pod cgroup not found; pod not enrolled");
                })
                .ok()
        }))
    }

    /// Builds the view from converted resources. `cgroup_of` finds the cgroup of an enrolled
    /// local workload (the only ones the datapath redirects); `None` leaves it pending.
    pub fn build(
        local_node: &str,
        workloads: impl IntoIterator<Item = Arc<Workload>>,
        nodes: impl IntoIterator<Item = NodeInfo>,
        services: impl IntoIterator<Item = Arc<Service>>,
        mut cgroup_of: impl FnMut(&Workload) -> Option<PodCgroup>,
    ) -> Self {
        let mut state = MeshState {
            local_node: local_node.to_owned(),
            nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
            ..Default::default()
        };
        let mut workloads: Vec<Arc<Workload>> = workloads.into_iter().collect();
        workloads
            .sort_by(|a, b| (&a.namespace, &a.name, &a.uid).cmp(&(&b.namespace, &b.name, &b.uid)));
        let mut ambiguous = HashSet::new();
        let mut ambiguous_known = HashSet::new();
        for workload in &workloads {
            let mut workload = workload.clone();
            if workload.node == state.local_node && workload.enrolled {
                match cgroup_of(&workload) {
                    Some(cgroup) => {
                        if workload.cgroup.as_ref() != Some(&cgroup.path) {
                            let mut found = (*workload).clone();
                            found.cgroup = Some(cgroup.path.clone());
                            workload = Arc::new(found);
                        }
                        match state.by_cgroup.entry(cgroup.id) {
                            std::collections::hash_map::Entry::Occupied(other) => {
                                tracing::error!(cgroup = %cgroup.path.display(), workload = %workload.name, other = %other.get().name, "two workloads resolve to one cgroup; keeping the first");
                            }
                            std::collections::hash_map::Entry::Vacant(slot) => {
                                slot.insert(workload.clone());
                                state.local_cgroups.push(cgroup);
                            }
                        }
                    }
                    None => state.pending_cgroups.push(workload.clone()),
                }
            }
            for ip in &workload.ips {
                let ip = canonical(*ip);
                insert_unique(&mut state.known_by_ip, &mut ambiguous_known, ip, &workload);
                if workload.enrolled {
                    insert_unique(&mut state.by_ip, &mut ambiguous, ip, &workload);
                }
            }
            state.workloads.push(workload);
        }
        for ip in &ambiguous {
            tracing::warn!(%ip, "address claimed by several workloads; it names none of them until that resolves");
        }
        state.index_services(services);
        state
    }

    fn index_services(&mut self, services: impl IntoIterator<Item = Arc<Service>>) {
        let mut services: Vec<Arc<Service>> = services.into_iter().collect();
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut ambiguous = HashSet::new();
        for service in &services {
            for endpoint in &service.endpoints {
                let list = self.by_endpoint.entry(canonical(endpoint.ip)).or_default();
                if !list.iter().any(|s| Arc::ptr_eq(s, service)) {
                    list.push(service.clone());
                }
            }
            for vip in &service.vips {
                let vip = canonical(*vip);
                if ambiguous.contains(&vip) {
                    continue;
                }
                match self.by_vip.get(&vip) {
                    Some(other) if !Arc::ptr_eq(other, service) => {
                        tracing::warn!(%vip, service = %service.hostname, other = %other.hostname, "virtual IP claimed by several services; it names none of them until that resolves");
                        self.by_vip.remove(&vip);
                        ambiguous.insert(vip);
                    }
                    Some(_) => {}
                    None => {
                        self.by_vip.insert(vip, service.clone());
                    }
                }
            }
        }
        self.services = services;
    }

    /// Puts the policies in force, and derives from them what the datapath enforces for
    /// plaintext to each enrolled local pod (see [`crate::ebpf::InboundMtls`] and
    /// [`Engine::plaintext_refusals`]).
    pub fn set_policy(&mut self, policy: Arc<Engine>) {
        for cgroup in &mut self.local_cgroups {
            let Some(workload) = self.by_cgroup.get(&cgroup.id) else {
                continue;
            };
            // A workload behind a waypoint takes no plaintext at all: it could not have
            // crossed the waypoint.
            cgroup.inbound = if self.guards.contains_key(&workload.uid) {
                InboundMtls::strict()
            } else {
                let (strict, ports) = policy.plaintext_refusals(&Destination::of(workload));
                InboundMtls { strict, ports }
            };
        }
        self.policy = policy;
    }

    /// Puts the known waypoints in place (live mode; static configurations have none).
    pub fn set_waypoints(&mut self, waypoints: impl IntoIterator<Item = Arc<Waypoint>>) {
        self.waypoints = waypoints.into_iter().map(|w| (w.id.clone(), w)).collect();
        self.guards = self.index_guards();
    }

    /// The waypoints of each enrolled workload: its own and its Services' (see
    /// [`waypoint::Guards`]). A waypoint that is named but not known guards nothing: its
    /// traffic goes direct until it exists.
    fn index_guards(&self) -> HashMap<String, waypoint::Guards> {
        // One pass over the workloads, then one lookup per endpoint: rebuilt on every state.
        let enrolled: HashMap<&str, &Arc<Workload>> = self
            .workloads
            .iter()
            .filter(|w| w.enrolled)
            .map(|w| (w.uid.as_str(), w))
            .collect();
        let mut by_uid: HashMap<&str, Vec<Arc<Waypoint>>> = HashMap::new();
        for w in enrolled.values() {
            if let Some(waypoint) = w.waypoint.as_ref().and_then(|id| self.waypoints.get(id)) {
                by_uid.entry(&w.uid).or_default().push(waypoint.clone());
            }
        }
        for service in &self.services {
            let Some(waypoint) = service
                .waypoint
                .as_ref()
                .and_then(|id| self.waypoints.get(id))
            else {
                continue;
            };
            for endpoint in &service.endpoints {
                let workload = match endpoint.workload_uid.as_deref() {
                    Some(uid) => enrolled.get(uid).copied(),
                    None => self.by_ip.get(&canonical(endpoint.ip)),
                };
                if let Some(w) = workload.filter(|w| w.enrolled) {
                    by_uid.entry(&w.uid).or_default().push(waypoint.clone());
                }
            }
        }
        by_uid
            .into_iter()
            .filter(|(uid, _)| {
                enrolled.get(uid).is_none_or(|w| {
                    w.labels.get(WAYPOINT_ENFORCEMENT_LABEL).map(String::as_str)
                        != Some(WAYPOINT_ENFORCEMENT_DISABLED)
                })
            })
            .map(|(uid, waypoints)| (uid.to_owned(), waypoint::Guards::new(waypoints)))
            .collect()
    }

    /// Whether `other` requires the same waypoints of every workload.
    pub fn same_guards(&self, other: &MeshState) -> bool {
        self.guards == other.guards
    }

    /// The waypoints `workload`'s connections must come through (empty: none).
    pub fn guards(&self, workload: &Workload) -> &waypoint::Guards {
        static NONE: std::sync::LazyLock<waypoint::Guards> =
            std::sync::LazyLock::new(waypoint::Guards::default);
        self.guards.get(&workload.uid).unwrap_or(&NONE)
    }

    pub fn waypoint(&self, id: &WaypointRef) -> Option<&Arc<Waypoint>> {
        self.waypoints.get(id)
    }

    /// Every waypoint, ordered by namespace and name.
    pub fn waypoints(&self) -> Vec<&Arc<Waypoint>> {
        let mut all: Vec<_> = self.waypoints.values().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// The policies in force.
    pub fn policy(&self) -> &Arc<Engine> {
        &self.policy
    }

    pub fn local_node(&self) -> &str {
        &self.local_node
    }

    /// Every known workload, enrolled or not.
    pub fn workloads(&self) -> &[Arc<Workload>] {
        &self.workloads
    }

    /// The mesh destination at `ip`: an enrolled workload that alone claims the address.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&canonical(ip))
    }

    /// Any workload at `ip`, enrolled or not: for telemetry, never for routing or trust.
    pub fn known_workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.known_by_ip.get(&canonical(ip))
    }

    /// The enrolled local workload whose cgroup has this id.
    pub fn workload_by_cgroup(&self, cgroup_id: u64) -> Option<&Arc<Workload>> {
        self.by_cgroup.get(&cgroup_id)
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }

    /// The zone of this node, when the controller knows it.
    pub fn local_zone(&self) -> Option<&str> {
        self.nodes.get(&self.local_node)?.zone.as_deref()
    }

    /// Every service, ordered by (namespace, name).
    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }

    /// The service `namespace/name`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<Service>> {
        self.services
            .binary_search_by(|s| (s.namespace.as_str(), s.name.as_str()).cmp(&(namespace, name)))
            .ok()
            .and_then(|i| self.services.get(i))
    }

    /// The services with an endpoint at `ip`, ordered by (namespace, name).
    pub fn services_by_endpoint(&self, ip: IpAddr) -> &[Arc<Service>] {
        self.by_endpoint
            .get(&canonical(ip))
            .map_or(&[], Vec::as_slice)
    }

    /// The service whose virtual IP is `ip`, if exactly one claims it.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&canonical(ip))
    }

    pub fn is_local(&self, workload: &Workload) -> bool {
        workload.node == self.local_node
    }

    /// Cgroups of the local pods that are enrolled in the datapath.
    pub fn local_cgroups(&self) -> &[PodCgroup] {
        &self.local_cgroups
    }

    /// Enrolled local workloads whose cgroup was not found: not redirected until it is.
    pub fn pending_cgroups(&self) -> &[Arc<Workload>] {
        &self.pending_cgroups
    }

    /// Identities of the enrolled workloads on this node: the only ones it may hold
    /// certificates for.
    pub fn local_identities(&self) -> HashSet<Identity> {
        self.workloads
            .iter()
            .filter(|w| w.enrolled && self.is_local(w))
            .map(|w| w.identity.clone())
            .collect()
    }

    /// Whether an enrolled workload on this node has `identity`.
    pub fn has_local_identity(&self, identity: &Identity) -> bool {
        self.workloads
            .iter()
            .any(|w| w.enrolled && self.is_local(w) && &w.identity == identity)
    }
}

/// Inserts `ip -> workload` unless another workload already claims `ip`, in which case the
/// address is removed and remembered as ambiguous, whatever the order of insertion.
fn insert_unique(
    map: &mut HashMap<IpAddr, Arc<Workload>>,
    ambiguous: &mut HashSet<IpAddr>,
    ip: IpAddr,
    workload: &Arc<Workload>,
) {
    if ambiguous.contains(&ip) {
        return;
    }
    match map.get(&ip) {
        Some(other) if other.uid != workload.uid => {
            map.remove(&ip);
            ambiguous.insert(ip);
        }
        Some(_) => {}
        None => {
            map.insert(ip, workload.clone());
        }
    }
}
