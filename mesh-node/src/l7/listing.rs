//! What a waypoint lists in its config dump about the routing objects it holds: every
//! HTTPRoute and GRPCRoute with the status entries of its parents, and every TrafficPolicy with
//! its `Accepted` condition (`routes` and `traffic_policies`, which `meshctl routes` and
//! `meshctl traffic-policies` print). Agents hold no routing objects and list none (the keys
//! are `null` in their dump).
//!
//! The waypoint builds it with each L7 snapshot and hands it to the admin surface with the
//! rest of its L7 configuration ([`crate::admin::L7Dump`]), from the results of the functions
//! the controller writes the objects' status with
//! ([`crate::l7::route::route_status`], [`crate::l7::resilience::Registry::condition`]),
//! so what it lists is what the waypoint itself serves, and agrees with the objects' status.

use serde::Serialize;

use crate::{
    k8s::gateway::ParentReference,
    l7::route::{RouteId, RouteStatus},
    policy::{
        PolicyId,
        status::{Condition, Listed},
    },
};

/// A waypoint's routing objects, each sorted by `namespace/name` then kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct L7Listing {
    pub routes: Vec<ListedRoute>,
    pub traffic_policies: Vec<Listed>,
    /// Istio DestinationRules with their `Accepted` condition.
    pub destination_rules: Vec<Listed>,
}

/// One route and how each parent the waypoints serve takes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListedRoute {
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: &'static str,
    /// `namespace/name`.
    pub id: String,
    pub generation: Option<i64>,
    /// Empty when the route names no parent the waypoints serve.
    pub parents: Vec<ListedParent>,
}

/// A `status.parents` entry: the parent as written in the route, and its conditions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListedParent {
    pub parent_ref: ParentReference,
    pub conditions: Vec<Condition>,
}

impl L7Listing {
    /// Every route with its status (see [`crate::l7::route::route_status`]) and every
    /// TrafficPolicy with its condition (see [`crate::l7::resilience::Registry::condition`]).
    pub fn new(
        routes: impl IntoIterator<Item = (RouteId, Option<i64>, RouteStatus)>,
        traffic_policies: impl IntoIterator<Item = (PolicyId, Option<i64>, Condition)>,
    ) -> Self {
        let mut routes: Vec<ListedRoute> = routes
            .into_iter()
            .map(|(id, generation, status)| ListedRoute {
                kind: id.kind.as_str(),
                id: format!("{}/{}", id.namespace, id.name),
                generation,
                parents: status
                    .parents
                    .into_iter()
                    .map(|p| ListedParent {
                        parent_ref: p.parent_ref,
                        conditions: p.conditions,
                    })
                    .collect(),
            })
            .collect();
        routes.sort_by(|a, b| (&a.id, a.kind).cmp(&(&b.id, b.kind)));
        let mut traffic_policies: Vec<Listed> = traffic_policies
            .into_iter()
            .map(|(id, generation, condition)| Listed {
                kind: "TrafficPolicy",
                id: id.to_string(),
                generation,
                condition,
            })
            .collect();
        traffic_policies.sort_by(|a, b| a.id.cmp(&b.id));
        Self {
            routes,
            traffic_policies,
            destination_rules: Vec::new(),
        }
    }

    /// Adds the DestinationRules, each with its condition.
    #[must_use]
    pub fn with_destination_rules(
        mut self,
        rules: impl IntoIterator<Item = (PolicyId, Condition)>,
    ) -> Self {
        self.destination_rules = rules
            .into_iter()
            .map(|(id, condition)| Listed {
                kind: "DestinationRule",
                id: id.to_string(),
                generation: condition.observed_generation,
                condition,
            })
            .collect();
        self.destination_rules.sort_by(|a, b| a.id.cmp(&b.id));
        self
    }
}
