//! The mesh as this node sees it: workloads, their identities, nodes and services.
//!
//! The snapshot is immutable: readers hold an `Arc` to a consistent view while the owner of
//! the state (the agent's state task, or start-up in static mode) swaps in a new one. It is
//! built either from the static configuration or from the resources the controller streams;
//! the protobuf types are converted here, at the boundary, and nothing past it sees them.
//!
//! Workloads are keyed by pod uid, never by address: a new pod that reuses an old pod's IP is
//! a different workload, and an address claimed by two workloads at once names neither. The
//! same holds for service virtual IPs: a VIP two services claim names neither.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

pub mod waypoint;

use crate::{
    admin::l7::L7Listing,
    api::v1 as api,
    config::{AgentConfig, ConfigError},
    ebpf::{InboundMtls, PodCgroup},
    identity::Identity,
    policy::{Destination, Engine},
    service::Service,
    workload::waypoint::{Waypoint, WaypointMap, WaypointRef},
};

/// A pod known to the mesh: enrolled pods are mesh sources and destinations; the others are
/// known for telemetry only.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    /// The pod's uid: the stable key of the workload, and how its cgroup is found.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// In the mesh: traffic is redirected, it holds a certificate, it is an HBONE destination.
    pub enrolled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The pod's cgroup v2 directory, once known (configured, or discovered from the uid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    #[serde(serialize_with = "serialize_display")]
    pub identity: Identity,
    /// The waypoint traffic addressed to this pod's own IPs goes through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
}

fn serialize_display<S: serde::Serializer>(v: &Identity, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NodeInfo {
    pub name: String,
    pub hbone: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// Why a resource from the controller cannot be used. The message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ResourceError {
    pub field: String,
    pub reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> ResourceError {
    ResourceError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Kubernetes object names: lowercase DNS subdomains.
fn check_subdomain(field: &str, value: &str) -> Result<(), ResourceError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(bad(field, format!("{value:?} is not a DNS subdomain")))
    }
}

/// Pod uids are UUIDs. They end up in cgroup directory names we match on, so anything that
/// could act as a path component (`/`, `.`) or a pattern is refused outright.
fn check_uid(value: &str) -> Result<(), ResourceError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(bad(
            "uid",
            format!("{value:?} is not a pod uid (letters, digits, '-' and '_')"),
        ))
    }
}

fn zone(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

impl Workload {
    /// Converts a streamed workload. The protobuf carries no trust domain (it is the mesh's,
    /// not the pod's), so it is a parameter rather than a `TryFrom`.
    pub fn from_resource(w: api::Workload, trust_domain: &str) -> Result<Self, ResourceError> {
        check_uid(&w.uid)?;
        check_subdomain("name", &w.name)?;
        check_subdomain("node", &w.node)?;
        let identity = Identity::new(trust_domain, &w.namespace, &w.service_account)
            .map_err(|e| bad("namespace/service_account", e.to_string()))?;
        let mut ips = Vec::with_capacity(w.ips.len());
        for (i, text) in w.ips.iter().enumerate() {
            let ip: IpAddr = text.parse().map_err(|_| {
                bad(
                    format!("ips[{i}]"),
                    format!("{text:?} is not an IP address"),
                )
            })?;
            let ip = canonical(ip);
            if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                return Err(bad(
                    format!("ips[{i}]"),
                    format!("{ip} is not a pod address"),
                ));
            }
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        for (key, value) in &w.labels {
            if key.is_empty() || key.len() > 317 || value.len() > 63 {
                return Err(bad(
                    format!("labels[{key:?}]"),
                    "not a Kubernetes label (key 1..=317 bytes, value at most 63)",
                ));
            }
        }
        Ok(Self {
            uid: w.uid,
            name: w.name,
            namespace: w.namespace,
            service_account: w.service_account,
            node: w.node,
            ips,
            labels: w.labels.into_iter().collect(),
            enrolled: w.enrolled,
            zone: zone(w.zone),
            cgroup: None,
            identity,
            waypoint: waypoint::optional_ref(&w.waypoint)?,
        })
    }
}

impl TryFrom<api::Node> for NodeInfo {
    type Error = ResourceError;

    fn try_from(n: api::Node) -> Result<Self, ResourceError> {
        check_subdomain("name", &n.name)?;
        let hbone: SocketAddr = n
            .hbone
            .parse()
            .map_err(|_| bad("hbone", format!("{:?} is not an IP:port address", n.hbone)))?;
        if hbone.ip().is_unspecified() || hbone.port() == 0 {
            return Err(bad("hbone", format!("{hbone} is not a concrete address")));
        }
        Ok(Self {
            name: n.name,
            hbone,
            zone: zone(n.zone),
        })
    }
}

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
    /// A waypoint's routing objects and their status, for its config dump; agents have none.
    l7: Option<Arc<L7Listing>>,
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

    /// The policies in force.
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
                    w.labels
                        .get(waypoint::ENFORCEMENT_LABEL)
                        .map(String::as_str)
                        != Some("disabled")
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

    pub fn policy(&self) -> &Arc<Engine> {
        &self.policy
    }

    /// Lists a waypoint's routing objects in its config dump (see [`L7Listing`]).
    pub fn set_l7(&mut self, listing: L7Listing) {
        self.l7 = Some(Arc::new(listing));
    }

    /// The routing objects a waypoint listed; `None` on agents.
    pub fn l7(&self) -> Option<&L7Listing> {
        self.l7.as_deref()
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

/// IPv4-mapped IPv6 addresses name the IPv4 workload.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn api_workload(uid: &str, name: &str, node: &str, ip: &str) -> api::Workload {
        api::Workload {
            uid: uid.into(),
            name: name.into(),
            namespace: "shop".into(),
            service_account: name.into(),
            node: node.into(),
            ips: vec![ip.into()],
            labels: [("app".to_owned(), name.to_owned())].into(),
            enrolled: true,
            zone: "zone-a".into(),
            waypoint: String::new(),
        }
    }

    fn convert(w: api::Workload) -> Result<Workload, ResourceError> {
        Workload::from_resource(w, "cluster.local")
    }

    #[test]
    fn streamed_workloads_convert_with_their_identity() {
        let mut w = api_workload("0b1c-2d", "web", "node-a", "::ffff:10.0.0.1");
        w.ips.push("10.0.0.1".into());
        let w = convert(w).expect("valid");
        assert_eq!(
            w.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(w.ips, vec!["10.0.0.1".parse::<IpAddr>().expect("ip")]);
        assert_eq!(w.zone.as_deref(), Some("zone-a"));
        assert_eq!(w.labels["app"], "web");
    }

    #[test]
    fn malformed_workloads_name_the_field() {
        let field = |edit: &dyn Fn(&mut api::Workload)| {
            let mut w = api_workload("u1", "web", "node-a", "10.0.0.1");
            edit(&mut w);
            convert(w).expect_err("must be rejected").field
        };
        assert_eq!(field(&|w| w.uid = "../../etc".into()), "uid");
        assert_eq!(field(&|w| w.uid.clear()), "uid");
        assert_eq!(field(&|w| w.name = "Web".into()), "name");
        assert_eq!(field(&|w| w.node.clear()), "node");
        assert_eq!(field(&|w| w.ips.push("10.0.0.300".into())), "ips[1]");
        assert_eq!(field(&|w| w.ips = vec!["127.0.0.1".into()]), "ips[0]");
        assert_eq!(
            field(&|w| w.service_account = "a/b".into()),
            "namespace/service_account"
        );
    }

    #[test]
    fn nodes_convert_and_malformed_ones_are_refused() {
        let node = |hbone: &str| api::Node {
            name: "node-a".into(),
            hbone: hbone.into(),
            zone: String::new(),
        };
        let ok = NodeInfo::try_from(node("10.1.0.1:15008")).expect("valid");
        assert_eq!(ok.zone, None);
        for bad in ["10.1.0.1", "0.0.0.0:15008", "10.1.0.1:0", "node-a:15008"] {
            assert_eq!(NodeInfo::try_from(node(bad)).expect_err(bad).field, "hbone");
        }
    }

    fn arc(w: api::Workload) -> Arc<Workload> {
        Arc::new(convert(w).expect("valid"))
    }

    #[test]
    fn non_enrolled_workloads_are_known_but_not_destinations() {
        let mut out = api_workload("u2", "legacy", "node-a", "10.0.0.2");
        out.enrolled = false;
        let state = MeshState::build(
            "node-a",
            [
                arc(api_workload("u1", "web", "node-a", "10.0.0.1")),
                arc(out),
            ],
            [],
            [],
            |w| {
                Some(PodCgroup {
                    path: format!("/cg/{}", w.uid).into(),
                    id: w.uid.len() as u64,
                    inbound: Default::default(),
                })
            },
        );
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(state.workload_by_ip(ip("10.0.0.1")).is_some());
        assert!(state.workload_by_ip(ip("10.0.0.2")).is_none());
        assert_eq!(
            state
                .known_workload_by_ip(ip("10.0.0.2"))
                .map(|w| w.name.as_str()),
            Some("legacy")
        );
        assert_eq!(
            state.local_cgroups().len(),
            1,
            "only enrolled pods are redirected"
        );
        assert_eq!(state.local_identities().len(), 1);
        assert_eq!(state.workloads().len(), 2);
    }

    #[test]
    fn an_address_claimed_twice_names_neither_workload() {
        let state = MeshState::build(
            "node-a",
            [
                arc(api_workload("old", "old", "node-b", "10.0.0.1")),
                arc(api_workload("new", "new", "node-b", "10.0.0.1")),
            ],
            [],
            [],
            |_| None,
        );
        assert!(
            state
                .workload_by_ip("10.0.0.1".parse().expect("ip"))
                .is_none()
        );
        assert!(
            state
                .known_workload_by_ip("10.0.0.1".parse().expect("ip"))
                .is_none()
        );
    }

    fn service(name: &str, vips: &[&str]) -> Arc<Service> {
        Arc::new(Service::new(
            name.into(),
            "shop".into(),
            vips.iter().map(|v| v.parse().expect("ip")).collect(),
            Vec::new(),
            Vec::new(),
            false,
        ))
    }

    #[test]
    fn services_are_found_by_each_vip_and_a_shared_vip_names_neither() {
        let state = MeshState::build(
            "node-a",
            [],
            [NodeInfo {
                name: "node-a".into(),
                hbone: "10.1.0.1:15008".parse().expect("addr"),
                zone: Some("z1".into()),
            }],
            [
                service("web", &["10.96.0.10", "fd00:96::10"]),
                service("db", &["10.96.0.20", "10.96.0.99"]),
                service("cache", &["10.96.0.99"]),
            ],
            |_| None,
        );
        let name = |ip: &str| {
            state
                .service_by_vip(ip.parse().expect("ip"))
                .map(|s| s.name.clone())
        };
        assert_eq!(name("10.96.0.10").as_deref(), Some("web"));
        assert_eq!(name("::ffff:10.96.0.10").as_deref(), Some("web"));
        assert_eq!(name("fd00:96::10").as_deref(), Some("web"));
        assert_eq!(name("10.96.0.20").as_deref(), Some("db"));
        assert_eq!(name("10.96.0.99"), None, "claimed twice");
        assert_eq!(name("10.96.0.11"), None);
        let names: Vec<_> = state.services().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["cache", "db", "web"]);
        assert_eq!(state.local_zone(), Some("z1"));
    }

    #[test]
    fn local_workloads_without_a_cgroup_are_pending_but_keep_their_identity() {
        let state = MeshState::build(
            "node-a",
            [arc(api_workload("u1", "web", "node-a", "10.0.0.1"))],
            [],
            [],
            |_| None,
        );
        assert!(state.local_cgroups().is_empty());
        assert_eq!(state.pending_cgroups().len(), 1);
        assert_eq!(
            state.local_identities().len(),
            1,
            "certificates are prefetched"
        );
    }

    #[test]
    fn policies_set_each_local_pods_inbound_mode_and_explain_reads_the_same_engine() {
        use crate::policy::{Policy, PolicyKind, explain::explain};
        let compile = |kind, name: &str, spec: serde_json::Value| {
            let meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                namespace: Some("shop".into()),
                name: Some(name.into()),
                ..Default::default()
            };
            Policy::compile(kind, &meta, &spec).expect("named")
        };
        let Policy::PeerAuthentication(strict_db) = compile(
            PolicyKind::PeerAuthentication,
            "db",
            serde_json::json!({"selector": {"matchLabels": {"app": "db"}},
                "mtls": {"mode": "STRICT"}, "portLevelMtls": {"9102": {"mode": "PERMISSIVE"}}}),
        ) else {
            panic!("peer authentication");
        };
        let Policy::Authorization(deny_web) = compile(
            PolicyKind::Authorization,
            "no-web",
            serde_json::json!({"action": "DENY",
                "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}]}]}),
        ) else {
            panic!("authorization policy");
        };
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let Policy::Authorization(deny_on_db_service) = compile(
            PolicyKind::Authorization,
            "db-service",
            serde_json::json!({"action": "DENY", "targetRefs": [{"kind": "Service", "name": "db"}],
                "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}),
        ) else {
            panic!("authorization policy");
        };
        // db crosses a waypoint, and Service db has it as an endpoint.
        let mut db = (*arc(api_workload("u2", "db", "node-a", "10.0.0.2"))).clone();
        db.waypoint = Some(waypoint::WaypointRef {
            namespace: "shop".into(),
            name: "wp".into(),
        });
        let db_service = Arc::new(Service::new(
            "db".into(),
            "shop".into(),
            vec![ip("10.96.0.2")],
            Vec::new(),
            vec![crate::service::Endpoint {
                ip: ip("10.0.0.2"),
                node: "node-a".into(),
                zone: String::new(),
                ready: true,
                workload_uid: Some("u2".into()),
            }],
            false,
        ));
        let mut state = MeshState::build(
            "node-a",
            [
                arc(api_workload("u1", "web", "node-a", "10.0.0.1")),
                Arc::new(db),
            ],
            [],
            [db_service],
            |w| {
                Some(PodCgroup {
                    path: format!("/cg/{}", w.uid).into(),
                    id: w.uid.len() as u64 + u64::from(w.name == "db"),
                    inbound: Default::default(),
                })
            },
        );
        state.set_policy(Arc::new(Engine::new(
            crate::policy::DEFAULT_ROOT_NAMESPACE,
            [deny_web, deny_on_db_service],
            [strict_db],
        )));
        let mode = |path: &str| {
            state
                .local_cgroups()
                .iter()
                .find(|c| c.path == std::path::Path::new(path))
                .map(|c| c.inbound.clone())
                .expect("enrolled")
        };
        assert_eq!(
            mode("/cg/u1"),
            InboundMtls::default(),
            "web stays PERMISSIVE"
        );
        assert_eq!(
            mode("/cg/u2"),
            InboundMtls {
                strict: true,
                ports: BTreeMap::from([(9102, false)]),
            }
        );

        let e = explain(&state, "shop/web", "shop/db:5432").expect("explained");
        assert_eq!(e.verdict, "deny");
        assert_eq!(e.policy.as_deref(), Some("shop/no-web"));
        assert_eq!(e.rule, Some(0));
        assert_eq!(e.mtls_mode, "STRICT");
        assert_eq!(e.mtls_policy.as_deref(), Some("shop/db"));
        // The Service's waypoint policy is named for its pod, however it is addressed.
        assert_eq!(e.waypoint.as_deref(), Some("shop/wp"));
        assert_eq!(e.waypoint_policies, ["shop/db-service"]);
        assert_eq!(
            state
                .services_by_endpoint(ip("10.0.0.2"))
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["db"]
        );
        let e = explain(&state, "shop/db", "shop/web:80").expect("explained");
        assert_eq!((e.verdict.as_str(), e.policy), ("allow", None));
        assert_eq!(e.waypoint, None);
        assert!(e.waypoint_policies.is_empty());
        assert!(explain(&state, "shop/nope", "shop/web:80").is_err());
        assert!(explain(&state, "shop/db", "shop/web:0").is_err());
        assert!(explain(&state, "shop/db", "shop/web").is_err());
    }
}
