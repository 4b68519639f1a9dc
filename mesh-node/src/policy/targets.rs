//! Items bound to waypoints (authorization policies, request authentications), indexed by
//! target, and found by the target of a request: a waypoint's `Gateway`, the destination
//! `Service`s, the waypoint `GatewayClass` from the root namespace, and the stand-ins covering
//! every waypoint of a namespace (see [`Binding`]).

use std::collections::HashMap;

use super::{
    facts::WaypointTarget,
    model::{Binding, TargetRef},
};
use crate::k8s::WAYPOINT_CLASS;

/// Items bound to waypoints (policies), found by the target of a request.
#[derive(Debug)]
pub(super) struct TargetIndex<T> {
    root_namespace: String,
    /// By namespace, then gateway name (nested, so lookups borrow the request's names).
    gateways: HashMap<String, HashMap<String, Vec<T>>>,
    /// By namespace, then service name.
    services: HashMap<String, HashMap<String, Vec<T>>>,
    /// `GatewayClass` targets naming the waypoint class, from the root namespace.
    class: Vec<T>,
    /// Stand-ins covering every waypoint of a namespace (the root namespace: of all).
    namespaces: HashMap<String, Vec<T>>,
}

impl<T: Clone> TargetIndex<T> {
    pub(super) fn new(root_namespace: &str) -> Self {
        Self {
            root_namespace: root_namespace.into(),
            gateways: HashMap::new(),
            services: HashMap::new(),
            class: Vec::new(),
            namespaces: HashMap::new(),
        }
    }

    /// Files `item` of `namespace` under its binding; nothing for a workload binding.
    pub(super) fn insert(&mut self, namespace: &str, binding: &Binding, item: T) {
        let targets = match binding {
            Binding::Workloads => return,
            Binding::NamespaceWaypoints | Binding::Everywhere => {
                self.namespaces
                    .entry(namespace.to_owned())
                    .or_default()
                    .push(item);
                return;
            }
            Binding::Targets(targets) => targets,
        };
        for target in targets {
            let list = match target {
                TargetRef::Gateway(name) => self
                    .gateways
                    .entry(namespace.to_owned())
                    .or_default()
                    .entry(name.clone())
                    .or_default(),
                TargetRef::Service(name) => self
                    .services
                    .entry(namespace.to_owned())
                    .or_default()
                    .entry(name.clone())
                    .or_default(),
                // Istio honours class targets from the root namespace only.
                TargetRef::GatewayClass(class)
                    if namespace == self.root_namespace && class == WAYPOINT_CLASS =>
                {
                    &mut self.class
                }
                TargetRef::GatewayClass(_) => continue,
            };
            list.push(item.clone());
        }
    }

    /// The items applying at `target`; one attached several ways appears once per way.
    pub(super) fn find<'s>(&'s self, target: &WaypointTarget<'_>) -> Vec<&'s T> {
        let named = |map: &'s HashMap<String, HashMap<String, Vec<T>>>, ns: &str, name: &str| {
            map.get(ns).and_then(|names| names.get(name))
        };
        let mut lists: Vec<&Vec<T>> = Vec::with_capacity(6);
        lists.extend(named(
            &self.gateways,
            target.gateway_namespace,
            target.gateway_name,
        ));
        let mut namespaces = vec![target.gateway_namespace, self.root_namespace.as_str()];
        for &(ns, name) in target.services {
            lists.extend(named(&self.services, ns, name));
            namespaces.push(ns);
        }
        namespaces.sort_unstable();
        namespaces.dedup();
        lists.extend(namespaces.iter().filter_map(|ns| self.namespaces.get(*ns)));
        lists.push(&self.class);
        lists.into_iter().flatten().collect()
    }
}
