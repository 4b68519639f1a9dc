//! The snapshot's indexes, and the policy-derived datapath modes it carries.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use super::{workload::tests::api_workload, *};
use crate::api::v1 as api;

fn arc(w: api::Workload) -> Arc<Workload> {
    Arc::new(Workload::from_resource(w, "cluster.local").expect("valid"))
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
        vec![service::Endpoint {
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
