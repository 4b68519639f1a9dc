//! The status of the objects only waypoints act on, derived with the conversions the waypoints
//! run themselves, so that what a status says is what the waypoints do:
//!
//! - TrafficPolicy: the `Accepted` condition of [`TrafficPolicy::compile`], or `Conflicted`
//!   when a policy earlier in name order already targets one of its Services
//!   ([`Registry::condition`]).
//!
//! The objects themselves are carried to the waypoints as written; only their status is
//! computed here, and written back by [`crate::controller::policy_status`].

use super::{ClusterObjects, RouteKind, Translation};
use crate::{
    policy::PolicyId,
    waypoint::resilience::{Registry, Resilience, TrafficPolicy, TrafficPolicyError},
};

/// The `Accepted` condition of every TrafficPolicy.
pub(super) fn traffic_policies(objects: &ClusterObjects, out: &mut Translation) {
    type Compiled = (
        PolicyId,
        Option<i64>,
        Result<Resilience, TrafficPolicyError>,
    );
    let compiled: Vec<Compiled> = objects
        .routes(RouteKind::TrafficPolicy)
        .values()
        .filter_map(|object| {
            // The store holds named objects only.
            let namespace = object.metadata.namespace.as_deref()?;
            let name = object.metadata.name.as_deref()?;
            let generation = object.metadata.generation;
            let id = PolicyId {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            };
            let result = TrafficPolicy::compile(namespace, name, generation, &object.spec);
            Some((id, generation, result))
        })
        .collect();
    // Conflicts are decided among the accepted policies only, as the waypoints decide them.
    let registry = Registry::default().rebuild(
        compiled
            .iter()
            .filter_map(|(_, _, result)| result.as_ref().ok().cloned()),
    );
    for (id, generation, result) in &compiled {
        let condition = registry.condition(id, result, *generation);
        out.traffic_policy_status.insert(id.clone(), condition);
    }
}
