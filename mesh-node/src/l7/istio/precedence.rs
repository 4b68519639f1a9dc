//! Which VirtualServices apply when objects compete for one Service (see the module
//! documentation of [`super`] for the rule and why).

use std::collections::BTreeMap;

use super::VIRTUAL_SERVICE;
use crate::l7::route::{self, CompiledRoute, RouteError, RouteKind};

/// Which converted VirtualServices are applied, by [the rule](super#choices): `routes` are
/// every converted route (Gateway API kinds and VirtualServices); a VirtualService that loses
/// is turned into a rejection saying which object wins.
pub fn precedence(routes: &mut [CompiledRoute]) {
    // Services with a programmed Gateway API route.
    let mut gateway_api: BTreeMap<(String, String), String> = BTreeMap::new();
    for r in routes
        .iter()
        .filter(|r| r.id.kind != RouteKind::Virtual && r.outcome.is_ok())
    {
        for p in r
            .parents
            .iter()
            .filter(|p| p.refusal.is_none() && p.kind == Some(route::compile::ParentKind::Service))
        {
            gateway_api
                .entry((p.namespace.clone(), p.name.clone()))
                .or_insert_with(|| r.id.to_string());
        }
    }
    let mut order: Vec<usize> = (0..routes.len())
        .filter(|&i| routes[i].id.kind == RouteKind::Virtual)
        .collect();
    order.sort_by(|&a, &b| routes[a].id.cmp(&routes[b].id));
    let mut claimed: BTreeMap<(String, String), String> = BTreeMap::new();
    for i in order {
        let route = &routes[i];
        if route.outcome.is_err() {
            continue;
        }
        let services: Vec<(String, String)> = route
            .parents
            .iter()
            .map(|p| (p.namespace.clone(), p.name.clone()))
            .collect();
        let conflict = services.iter().find_map(|s| {
            gateway_api
                .get(s)
                .map(|winner| format!("Service {}/{} has {winner} attached, which takes precedence over VirtualServices", s.0, s.1))
                .or_else(|| claimed.get(s).map(|winner| format!("Service {}/{} is already routed by {winner} (the first in namespace/name order applies)", s.0, s.1)))
        });
        match conflict {
            Some(why) => {
                routes[i].outcome = Err(RouteError::Conflicted {
                    path: "spec.hosts".into(),
                    why,
                });
            }
            None => {
                let id = format!("{VIRTUAL_SERVICE} {}/{}", route.id.namespace, route.id.name);
                for s in services {
                    claimed.insert(s, id.clone());
                }
            }
        }
    }
}
