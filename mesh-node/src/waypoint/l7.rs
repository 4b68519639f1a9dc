//! The L7 configuration a waypoint serves with: its routes ([`RouteTable`]), the resilience of
//! the Services behind it ([`Registry`]) and the end-user authentication that applies at it
//! ([`JwtAuthenticator`]).
//!
//! Built by the state task from the controller's resources on every update, next to the
//! [`MeshState`], and published as one immutable snapshot that each request loads once. The
//! objects arrive as written and are compiled here, so a bad one rejects only itself: it is
//! left out, and the reason is logged once per generation (the controller writes the same
//! reason into the object's status).

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use crate::{
    admin::L7Dump,
    control_plane::feed::{Resource, Resources},
    l7::{
        L7Listing,
        istio::{self, DESTINATION_RULE, VIRTUAL_SERVICE, destination_rule},
        resilience::{Registry, TrafficPolicy},
        route::{self, RouteKind, RouteTable},
    },
    policy::{
        Policy, PolicyId,
        jwt::{JwksFetcher, JwtAuthenticator, JwtPolicy},
    },
    state::{MeshState, WaypointRef},
};

/// The kind of the resilience objects among the `route/` resources.
const TRAFFIC_POLICY_KIND: &str = "TrafficPolicy";

/// One snapshot of the waypoint's L7 configuration.
#[derive(Debug, Default)]
pub struct L7 {
    pub routes: RouteTable,
    pub resilience: Registry,
    /// The DestinationRule subsets of each Service.
    pub subsets: Subsets,
    pub jwt: Option<JwtAuthenticator>,
    /// `namespace/name` of the `RequestAuthentication`s in force.
    pub request_authentications: Vec<String>,
    /// The objects left out, and why.
    pub rejected: Rejections,
    /// Routes and traffic policies with their status, for the config dump; `None` until the
    /// first state is built.
    pub listing: Option<Arc<L7Listing>>,
}

/// `(namespace, Service)` -> subset name -> the labels its endpoints' workloads carry.
pub type Subsets =
    std::collections::HashMap<(String, String), BTreeMap<String, BTreeMap<String, String>>>;

/// Why an object is not applied, by `Kind namespace/name`; kept between builds so that each
/// rejection is logged once per generation.
pub type Rejections = BTreeMap<String, (Option<i64>, String)>;

impl L7 {
    /// Compiles the routes, traffic policies and request authentications among `resources`.
    /// `previous` keeps the runtime state (budgets, breakers, ejections, buckets) of the
    /// Services whose policy did not change; `mesh` gives outlier detection its endpoints.
    pub fn build(
        resources: &Resources,
        mesh: &MeshState,
        root_namespace: &str,
        previous: &L7,
        fetcher: &JwksFetcher,
        rejections: &mut Rejections,
    ) -> Self {
        let mut routes = Vec::new();
        let mut traffic = Vec::new();
        let mut jwt = Vec::<JwtPolicy>::new();
        let mut traffic_compiled = Vec::new();
        let mut rejected = Rejections::new();
        let mut destination_rules = Vec::new();
        for resource in resources.values() {
            match resource {
                Resource::Route(object) if object.kind == VIRTUAL_SERVICE => {
                    routes.push(istio::virtual_service::convert(
                        &object.namespace,
                        &object.name,
                        object.generation,
                        &object.spec,
                    ));
                }
                Resource::Route(object) if object.kind == DESTINATION_RULE => {
                    let id = PolicyId {
                        namespace: object.namespace.clone(),
                        name: object.name.clone(),
                    };
                    let result = destination_rule::convert(
                        &object.namespace,
                        &object.name,
                        object.generation,
                        &object.spec,
                    );
                    destination_rules.push((id, object.generation, result));
                }
                Resource::Route(object) if object.kind == TRAFFIC_POLICY_KIND => {
                    let compiled = TrafficPolicy::compile(
                        &object.namespace,
                        &object.name,
                        object.generation,
                        &object.spec,
                    );
                    match &compiled {
                        Ok(policy) => traffic.push(policy.clone()),
                        Err(e) => {
                            rejected.insert(
                                format!("TrafficPolicy {}/{}", object.namespace, object.name),
                                (object.generation, e.to_string()),
                            );
                        }
                    }
                    let id = PolicyId {
                        namespace: object.namespace.clone(),
                        name: object.name.clone(),
                    };
                    traffic_compiled.push((id, object.generation, compiled));
                }
                Resource::Route(object) => {
                    let Ok(kind) = object.kind.parse::<RouteKind>() else {
                        rejected.insert(
                            format!("{} {}/{}", object.kind, object.namespace, object.name),
                            (object.generation, "not a kind the waypoint serves".into()),
                        );
                        continue;
                    };
                    let compiled = route::compile(
                        kind,
                        &object.namespace,
                        &object.name,
                        object.generation,
                        &object.spec,
                    );
                    if let Err(e) = &compiled.outcome {
                        rejected
                            .insert(compiled.id.to_string(), (object.generation, e.to_string()));
                    }
                    routes.push(compiled);
                }
                Resource::Policy(policy) => {
                    if let Policy::RequestAuthentication(p) = &**policy {
                        jwt.push(p.clone());
                    }
                }
                Resource::Workload(_)
                | Resource::Node(_)
                | Resource::Service(_)
                | Resource::Waypoint(_) => {}
            }
        }
        // Istio precedence, as the controller reports it; losers are rejections like any.
        let istio_conditions = istio::conditions(&mut routes, &destination_rules);
        for r in routes.iter().filter(|r| r.id.kind == RouteKind::Virtual) {
            if let Err(e) = &r.outcome {
                rejected.insert(r.id.to_string(), (r.generation, e.to_string()));
            }
        }
        let mut subsets = Subsets::new();
        let mut destination_listing = Vec::new();
        for (kind, id, condition) in istio_conditions {
            if kind != DESTINATION_RULE {
                continue;
            }
            let applied = destination_rules
                .iter()
                .find(|(rule, _, _)| *rule == id)
                .and_then(|(_, _, result)| result.as_ref().ok())
                .filter(|_| condition.status == "True");
            match applied {
                Some(rule) => {
                    subsets.insert(
                        (rule.id.namespace.clone(), rule.service.clone()),
                        rule.subsets.clone(),
                    );
                    if let Some(policy) = &rule.resilience {
                        traffic.push(policy.clone());
                    }
                }
                None => {
                    rejected.insert(
                        format!("{DESTINATION_RULE} {id}"),
                        (condition.observed_generation, condition.message.clone()),
                    );
                }
            }
            destination_listing.push((id, condition));
        }
        let request_authentications = jwt.iter().map(|p| p.id.to_string()).collect();
        for (object, (generation, reason)) in &rejected {
            if rejections.get(object) != Some(&(*generation, reason.clone())) {
                tracing::warn!(%object, reason, "not applied at this waypoint");
            }
        }
        *rejections = rejected.clone();

        let resilience = previous.resilience.rebuild(traffic);
        track_endpoints(&resilience, mesh);
        // What the config dump lists: each object with the status the controller writes.
        let service_exists = |namespace: &str, name: &str| mesh.service(namespace, name).is_some();
        let is_waypoint = |namespace: &str, name: &str| {
            mesh.waypoint(&WaypointRef {
                namespace: namespace.into(),
                name: name.into(),
            })
            .is_some()
        };
        let listing = Some(Arc::new(
            L7Listing::new(
                routes.iter().map(|r| {
                    (
                        r.id.clone(),
                        r.generation,
                        route::route_status(r, &service_exists, &is_waypoint),
                    )
                }),
                traffic_compiled.iter().map(|(id, generation, compiled)| {
                    (
                        id.clone(),
                        *generation,
                        resilience.condition(id, compiled, *generation),
                    )
                }),
            )
            .with_destination_rules(destination_listing),
        ));
        let jwt = (!jwt.is_empty())
            .then(|| JwtAuthenticator::new(root_namespace, jwt, Some(fetcher.clone())));
        if jwt.is_none() {
            // No rule reads a JWKS URI any more: stop fetching.
            fetcher.watch([]);
        }
        Self {
            routes: RouteTable::new(routes),
            resilience,
            subsets,
            jwt,
            request_authentications,
            rejected,
            listing,
        }
    }

    /// What the waypoint's config dump shows: the `routes` and `traffic_policies` listing
    /// ([`L7Listing`]) and, under `l7`, its request authentications and rejected objects.
    pub fn dump(&self) -> L7Dump {
        let details = serde_json::json!({
            "request_authentications": self.request_authentications,
            "rejected": self.rejected.iter().map(|(object, (generation, reason))| serde_json::json!({
                "object": object,
                "generation": generation,
                "reason": reason,
            })).collect::<Vec<_>>(),
        });
        L7Dump {
            listing: self.listing.clone(),
            details,
        }
    }
}

/// Gives each outlier detector the current endpoints of its Service (on every target port),
/// so endpoints that left are forgotten and new ones start clean.
fn track_endpoints(registry: &Registry, mesh: &MeshState) {
    for service in mesh.services() {
        let Some(state) = registry.get(&service.namespace, &service.name) else {
            continue;
        };
        let Some(outliers) = state.outliers() else {
            continue;
        };
        let endpoints = service.endpoints.iter().flat_map(|e| {
            service
                .ports
                .iter()
                .filter_map(|p| p.target_port)
                .map(move |port| SocketAddr::new(e.ip, port))
        });
        outliers.set_endpoints(endpoints);
    }
}
