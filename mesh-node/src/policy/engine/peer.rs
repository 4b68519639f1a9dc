//! `PeerAuthentication` resolved: the mutual TLS mode of each port of a workload
//! ([`PeerAuthSet::resolve`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use crate::policy::{
    facts::Destination,
    model::{MtlsMode, PeerPolicy},
};

/// The mode a port of a workload runs in, and what decided it.
#[derive(Debug, Clone)]
pub struct MtlsResolution {
    pub mode: MtlsMode,
    /// `None`: no policy applies, the default (`PERMISSIVE`).
    pub policy: Option<Arc<PeerPolicy>>,
    /// The mode came from the policy's `portLevelMtls`.
    pub port_level: bool,
}

#[derive(Debug, Default)]
struct PeerScope {
    wide: Vec<Arc<PeerPolicy>>,
    selected: Vec<Arc<PeerPolicy>>,
}

/// All peer authentication policies, indexed by namespace.
///
/// Precedence: policies selecting the workload, then its namespace's policies without a
/// selector, then those of the root namespace without a selector (a root-namespace policy
/// with a selector applies to that namespace's workloads only, as in Istio). Within a policy a
/// port-level mode wins over the policy's mode; `UNSET` inherits from the next level. When
/// several policies of the same level apply (a conflict Istio settles by age, which a
/// snapshot may not know), the strictest wins: a conflict never opens a port to plaintext.
#[derive(Debug)]
pub struct PeerAuthSet {
    root_namespace: String,
    namespaces: HashMap<String, PeerScope>,
}

impl PeerAuthSet {
    pub fn new(root_namespace: &str, policies: impl IntoIterator<Item = PeerPolicy>) -> Self {
        let mut namespaces: HashMap<String, PeerScope> = HashMap::new();
        for policy in policies {
            let scope = namespaces.entry(policy.id.namespace.clone()).or_default();
            if policy.selector.is_some() {
                scope.selected.push(Arc::new(policy));
            } else {
                scope.wide.push(Arc::new(policy));
            }
        }
        for scope in namespaces.values_mut() {
            scope.wide.sort_by(|x, y| x.id.cmp(&y.id));
            scope.selected.sort_by(|x, y| x.id.cmp(&y.id));
        }
        Self {
            root_namespace: root_namespace.into(),
            namespaces,
        }
    }

    /// The effective mode of every port of a workload: the mode of the ports no policy names,
    /// and the ports whose mode differs from it. This is what the datapath enforces per pod.
    pub fn resolve_workload(&self, dest: &Destination<'_>) -> (MtlsMode, BTreeMap<u16, MtlsMode>) {
        // Port-level modes only exist for ports a policy names, and 0 is never one.
        let default = self.resolve(dest, 0).mode;
        let ports = self
            .named_ports(dest)
            .into_iter()
            .filter_map(|port| {
                let mode = self.resolve(dest, port).mode;
                (mode != default).then_some((port, mode))
            })
            .collect();
        (default, ports)
    }

    /// Every port a policy in a workload's scopes names at port level.
    pub fn named_ports(&self, dest: &Destination<'_>) -> BTreeSet<u16> {
        [dest.namespace, self.root_namespace.as_str()]
            .into_iter()
            .filter_map(|ns| self.namespaces.get(ns))
            .flat_map(|scope| scope.wide.iter().chain(&scope.selected))
            .flat_map(|p| p.ports.keys().copied())
            .collect()
    }

    /// The effective mode of a workload's port.
    pub fn resolve(&self, dest: &Destination<'_>, port: u16) -> MtlsResolution {
        let own = self.namespaces.get(dest.namespace);
        let root = (dest.namespace != self.root_namespace)
            .then(|| self.namespaces.get(&self.root_namespace))
            .flatten();
        let none: &[Arc<PeerPolicy>] = &[];
        let selects = |p: &&Arc<PeerPolicy>| {
            p.selector
                .as_ref()
                .is_some_and(|sel| sel.iter().all(|(k, v)| dest.labels.get(k) == Some(v)))
        };
        // Most general level first, so each level can inherit the one below it.
        let levels: [Vec<&Arc<PeerPolicy>>; 3] = [
            root.map_or(none, |s| s.wide.as_slice()).iter().collect(),
            own.map_or(none, |s| s.wide.as_slice()).iter().collect(),
            own.map_or(none, |s| s.selected.as_slice())
                .iter()
                .filter(selects)
                .collect(),
        ];
        let mut current = MtlsResolution {
            mode: MtlsMode::Permissive,
            policy: None,
            port_level: false,
        };
        for level in levels {
            let mut best: Option<MtlsResolution> = None;
            for p in level {
                let candidate = match p.mode_for(port) {
                    Some((mode, port_level)) => MtlsResolution {
                        mode,
                        policy: Some(p.clone()),
                        port_level,
                    },
                    None => current.clone(),
                };
                if best.as_ref().is_none_or(|b| candidate.mode > b.mode) {
                    best = Some(candidate);
                }
            }
            if let Some(best) = best {
                current = best;
            }
        }
        current
    }
}
