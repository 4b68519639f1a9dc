//! The status of the objects only waypoints act on, derived with the conversions the waypoints
//! run themselves, so that what a status says is what the waypoints do:
//!
//! - TrafficPolicy: the `Accepted` condition of [`TrafficPolicy::compile`], or `Conflicted`
//!   when a policy earlier in name order already targets one of its Services
//!   ([`Registry::condition`]); written back by [`crate::controller::policy_status`].
//! - HTTPRoute and GRPCRoute: [`route_status`] of the [`compile`]d route, an entry per parent
//!   the waypoints serve: a waypoint (a Gateway of the waypoint class, see [`super::waypoint`])
//!   or a Service. Whether a parent or a backend Service exists is read from the cluster's
//!   objects, in every namespace, enrolled or not. Written back by
//!   [`crate::controller::route_status`].
//!
//! The objects themselves are carried to the waypoints as written; only their status is
//! computed here. Every route is converted again at every translation; conversion is bounded
//! by the route limits ([`crate::l7::route::limits`]), like the waypoints' own.

use super::{ClusterObjects, RouteKind, Translation, waypoint::Waypoints};
use crate::{
    l7::{
        istio,
        resilience::{Registry, Resilience, TrafficPolicy, TrafficPolicyError},
        route::{self, compile, route_status},
    },
    policy::PolicyId,
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

/// The `Accepted` condition of every VirtualService and DestinationRule, with the precedence
/// the waypoints apply (over the Gateway API routes and between each other).
pub(super) fn istio(objects: &ClusterObjects, out: &mut Translation) {
    let named = |object: &crate::controller::objects::PolicyObject| {
        Some((
            object.metadata.namespace.clone()?,
            object.metadata.name.clone()?,
            object.metadata.generation,
        ))
    };
    let mut routes = Vec::new();
    for (kind, route_kind) in [
        (RouteKind::Http, route::RouteKind::Http),
        (RouteKind::Grpc, route::RouteKind::Grpc),
    ] {
        for object in objects.routes(kind).values() {
            if let Some((namespace, name, generation)) = named(object) {
                routes.push(compile(
                    route_kind,
                    &namespace,
                    &name,
                    generation,
                    &object.spec,
                ));
            }
        }
    }
    for object in objects.routes(RouteKind::VirtualService).values() {
        if let Some((namespace, name, generation)) = named(object) {
            routes.push(istio::virtual_service::convert(
                &namespace,
                &name,
                generation,
                &object.spec,
            ));
        }
    }
    let rules: Vec<_> = objects
        .routes(RouteKind::DestinationRule)
        .values()
        .filter_map(|object| {
            let (namespace, name, generation) = named(object)?;
            let result =
                istio::destination_rule::convert(&namespace, &name, generation, &object.spec);
            Some((PolicyId { namespace, name }, generation, result))
        })
        .collect();
    for (kind, id, condition) in istio::conditions(&mut routes, &rules) {
        out.istio_status.insert((kind, id), condition);
    }
}

/// The `status.parents` entries of every HTTPRoute and GRPCRoute.
pub(super) fn routes(objects: &ClusterObjects, waypoints: &Waypoints, out: &mut Translation) {
    let service_exists = |namespace: &str, name: &str| {
        objects
            .services
            .contains_key(&format!("{namespace}/{name}"))
    };
    let is_waypoint = |namespace: &str, name: &str| waypoints.exists(namespace, name);
    for (kind, route_kind) in [
        (RouteKind::Http, route::RouteKind::Http),
        (RouteKind::Grpc, route::RouteKind::Grpc),
    ] {
        for object in objects.routes(kind).values() {
            // The store holds named objects only.
            let (Some(namespace), Some(name)) = (&object.metadata.namespace, &object.metadata.name)
            else {
                continue;
            };
            let compiled = compile(
                route_kind,
                namespace,
                name,
                object.metadata.generation,
                &object.spec,
            );
            let status = route_status(&compiled, &service_exists, &is_waypoint);
            out.route_status.insert(compiled.id, status.parents);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::controller::{
        objects::{Object, PolicyObject},
        translate::{TranslateSettings, translate},
    };

    fn objects(manifests: &[Value]) -> ClusterObjects {
        let mut objects = ClusterObjects::default();
        for m in manifests {
            let object = match m["kind"].as_str() {
                Some("Service") => Object::Service(serde_json::from_value(m.clone()).expect("svc")),
                Some("Gateway") => Object::Gateway(PolicyObject::untyped(m).expect("gateway")),
                Some(kind) => Object::Route(
                    RouteKind::from_kind(kind).expect("a route kind"),
                    PolicyObject::untyped(m).expect("route"),
                ),
                None => panic!("no kind: {m}"),
            };
            objects.apply(object).expect("named");
        }
        objects
    }

    fn gateway(name: &str, class: &str) -> Value {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"gatewayClassName": class}})
    }

    fn service(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop"}, "spec": {"ports": [{"port": 80}]}})
    }

    fn route(kind: &str, name: &str, spec: Value) -> Value {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": kind,
            "metadata": {"name": name, "namespace": "shop", "generation": 6}, "spec": spec})
    }

    /// `name`, then `type=status/reason` of each condition, for each entry of the route.
    fn summary(t: &Translation, kind: route::RouteKind, name: &str) -> Vec<Vec<String>> {
        let id = route::RouteId {
            kind,
            namespace: "shop".into(),
            name: name.into(),
        };
        let Some(parents) = t.route_status.get(&id) else {
            panic!("no status for {id}: {:?}", t.route_status.keys());
        };
        parents
            .iter()
            .map(|p| {
                std::iter::once(p.parent_ref.name.clone())
                    .chain(p.conditions.iter().map(|c| {
                        assert_eq!(c.observed_generation, Some(6));
                        format!("{}={}/{}", c.type_, c.status, c.reason)
                    }))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn routes_report_on_the_parents_the_waypoints_serve_and_only_those() {
        let settings = TranslateSettings {
            trust_domain: "cluster.local".into(),
            hbone_port: 15008,
            cluster_id: "Kubernetes".into(),
            istio_labels: false,
        };
        let web = route(
            "HTTPRoute",
            "web",
            json!({
                "parentRefs": [
                    {"name": "waypoint"},
                    {"name": "edge"},
                    {"group": "", "kind": "Service", "name": "web"},
                    {"group": "", "kind": "Service", "name": "gone"}],
                "rules": [{"backendRefs": [{"name": "web", "port": 80},
                                           {"name": "missing", "port": 80}]}]}),
        );
        let rpc = route(
            "GRPCRoute",
            "rpc",
            json!({"parentRefs": [{"name": "edge"}]}),
        );
        let cluster = [
            gateway("waypoint", "trellis-waypoint"),
            gateway("edge", "another-implementation"),
            service("web"),
            web,
            rpc,
        ];
        let t = translate(&objects(&cluster), &settings);
        let not_found = "ResolvedRefs=False/BackendNotFound";
        assert_eq!(
            summary(&t, route::RouteKind::Http, "web"),
            [
                vec!["waypoint", "Accepted=True/Accepted", not_found],
                // Another implementation's Gateway: its controller reports, not this one.
                vec!["web", "Accepted=True/Accepted", not_found],
                vec!["gone", "Accepted=False/NoMatchingParent", not_found],
            ]
        );
        let message = &t.route_status.values().next().expect("a route")[0].conditions[1].message;
        assert!(
            message.contains("Service shop/missing does not exist"),
            "{message}"
        );
        assert_eq!(
            summary(&t, route::RouteKind::Grpc, "rpc"),
            Vec::<Vec<String>>::new(),
            "listed with no entries, so entries an earlier run wrote are removed"
        );

        // Without the waypoint, and with the missing Service created, the entries follow.
        let mut cluster = cluster.to_vec();
        cluster.remove(0);
        cluster.push(service("missing"));
        let t = translate(&objects(&cluster), &settings);
        assert_eq!(
            summary(&t, route::RouteKind::Http, "web"),
            [
                vec![
                    "web",
                    "Accepted=True/Accepted",
                    "ResolvedRefs=True/ResolvedRefs"
                ],
                vec![
                    "gone",
                    "Accepted=False/NoMatchingParent",
                    "ResolvedRefs=True/ResolvedRefs"
                ],
            ]
        );
    }
}
