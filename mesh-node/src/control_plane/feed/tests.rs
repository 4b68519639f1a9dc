//! The discovery feed: snapshots and deltas, and conversion at the boundary (a bad resource is
//! rejected alone, its last good state kept).

use super::*;
use crate::state::workload::tests::api_workload;

fn workload(uid: &str, name: &str, ip: &str) -> api::Resource {
    api::Resource {
        key: format!("workload/{uid}"),
        kind: Some(resource::Kind::Workload(api_workload(
            uid, name, "node-a", ip,
        ))),
    }
}

fn node(name: &str, hbone: &str) -> api::Resource {
    api::Resource {
        key: format!("node/{name}"),
        kind: Some(resource::Kind::Node(api::Node {
            name: name.into(),
            hbone: hbone.into(),
            zone: String::new(),
        })),
    }
}

fn update(version: u64, snapshot: bool, upserts: Vec<api::Resource>, removes: &[&str]) -> Update {
    Update {
        version,
        snapshot,
        upserts,
        removes: removes.iter().map(|r| (*r).to_owned()).collect(),
    }
}

fn ip_of(store: &ResourceStore, key: &str) -> Option<String> {
    match store.resources().get(key)? {
        Resource::Workload(w) => Some(w.ips[0].to_string()),
        _ => None,
    }
}

#[test]
fn snapshots_replace_and_deltas_upsert_and_remove() {
    let mut store = ResourceStore::default();
    let rejected = store.apply(
        update(
            1,
            true,
            vec![
                workload("a", "web", "10.0.0.1"),
                workload("b", "db", "10.0.0.2"),
                node("node-a", "10.1.0.1:15008"),
            ],
            &[],
        ),
        "cluster.local",
    );
    assert!(rejected.is_empty());
    assert_eq!(store.resources().len(), 3);

    store.apply(
        update(
            2,
            false,
            vec![workload("c", "cache", "10.0.0.3")],
            &["workload/b", "workload/unknown"],
        ),
        "cluster.local",
    );
    assert_eq!(store.version(), Some(2));
    let keys: Vec<_> = store.resources().keys().cloned().collect();
    assert_eq!(keys, ["node/node-a", "workload/a", "workload/c"]);

    store.apply(
        update(3, true, vec![workload("a", "web", "10.0.0.9")], &[]),
        "cluster.local",
    );
    let keys: Vec<_> = store.resources().keys().cloned().collect();
    assert_eq!(
        keys,
        ["workload/a"],
        "a snapshot drops what it does not list"
    );
    assert_eq!(ip_of(&store, "workload/a").as_deref(), Some("10.0.0.9"));
}

#[test]
fn a_bad_resource_is_rejected_alone_and_its_last_good_state_kept() {
    let mut store = ResourceStore::default();
    store.apply(
        update(
            1,
            true,
            vec![
                workload("a", "web", "10.0.0.1"),
                workload("b", "db", "10.0.0.2"),
            ],
            &[],
        ),
        "cluster.local",
    );
    let held = store.resources();

    // A delta with one malformed workload and one good change.
    let rejected = store.apply(
        update(
            2,
            false,
            vec![
                workload("a", "web", "not-an-ip"),
                workload("b", "db", "10.0.0.20"),
            ],
            &[],
        ),
        "cluster.local",
    );
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].key, "workload/a");
    assert!(
        rejected[0].reason.contains("ips[0]"),
        "{}",
        rejected[0].reason
    );
    assert_eq!(
        ip_of(&store, "workload/a").as_deref(),
        Some("10.0.0.1"),
        "last good kept"
    );
    assert_eq!(
        ip_of(&store, "workload/b").as_deref(),
        Some("10.0.0.20"),
        "the rest applied"
    );
    assert_eq!(
        ip_of_map(&held, "workload/b").as_deref(),
        Some("10.0.0.2"),
        "copy on write"
    );

    // In a snapshot too, and a key that names another object is refused.
    let mut wrong_key = workload("c", "cache", "10.0.0.3");
    wrong_key.key = "workload/someone-else".into();
    let no_kind = api::Resource {
        key: "policy/x".into(),
        kind: None,
    };
    let rejected = store.apply(
        update(
            3,
            true,
            vec![workload("a", "web", "10.0.0.1/8"), wrong_key, no_kind],
            &[],
        ),
        "cluster.local",
    );
    let keys: Vec<_> = rejected.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["workload/a", "workload/someone-else", "policy/x"]);
    assert_eq!(ip_of(&store, "workload/a").as_deref(), Some("10.0.0.1"));
    assert!(
        store.resources().get("workload/b").is_none(),
        "the snapshot dropped b"
    );
    assert!(store.resources().get("workload/someone-else").is_none());
}

fn service(name: &str, endpoint_ip: &str) -> api::Resource {
    api::Resource {
        key: format!("service/shop/{name}"),
        kind: Some(resource::Kind::Service(api::Service {
            name: name.into(),
            namespace: "shop".into(),
            vips: vec!["10.96.0.10".into()],
            ports: vec![api::ServicePort {
                name: "http".into(),
                port: 80,
                target_port: 8080,
                protocol: "TCP".into(),
            }],
            endpoints: vec![api::Endpoint {
                workload_uid: String::new(),
                ip: endpoint_ip.into(),
                node: "node-a".into(),
                zone: String::new(),
                ready: true,
            }],
            prefer_close: false,
            waypoint: String::new(),
        })),
    }
}

fn endpoint_of(store: &ResourceStore, key: &str) -> Option<String> {
    match store.resources().get(key)? {
        Resource::Service(s) => Some(s.endpoints[0].ip.to_string()),
        _ => None,
    }
}

#[test]
fn services_convert_at_the_boundary_and_a_bad_one_is_rejected_alone() {
    let mut store = ResourceStore::default();
    let rejected = store.apply(
        update(
            1,
            true,
            vec![service("web", "10.0.0.1"), service("db", "10.0.0.2")],
            &[],
        ),
        "cluster.local",
    );
    assert!(rejected.is_empty(), "{rejected:?}");
    assert_eq!(
        endpoint_of(&store, "service/shop/web").as_deref(),
        Some("10.0.0.1")
    );

    // An endpoint on the node's loopback would hand pods the node's local services.
    let rejected = store.apply(
        update(
            2,
            false,
            vec![service("web", "127.0.0.1"), service("db", "10.0.0.20")],
            &[],
        ),
        "cluster.local",
    );
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].key, "service/shop/web");
    assert!(
        rejected[0].reason.starts_with("service endpoints[0].ip"),
        "{}",
        rejected[0].reason
    );
    assert_eq!(
        endpoint_of(&store, "service/shop/web").as_deref(),
        Some("10.0.0.1"),
        "last good kept"
    );
    assert_eq!(
        endpoint_of(&store, "service/shop/db").as_deref(),
        Some("10.0.0.20")
    );

    let mut wrong_key = service("web", "10.0.0.1");
    wrong_key.key = "service/other/web".into();
    let rejected = store.apply(update(3, false, vec![wrong_key], &[]), "cluster.local");
    assert_eq!(rejected.len(), 1);
    assert!(rejected[0].reason.contains("key does not name"));
}

fn ip_of_map(resources: &Resources, key: &str) -> Option<String> {
    match resources.get(key)? {
        Resource::Workload(w) => Some(w.ips[0].to_string()),
        _ => None,
    }
}

fn policy(kind: &str, name: &str, spec: &serde_json::Value) -> api::Resource {
    api::Resource {
        key: format!("policy/{kind}/shop/{name}"),
        kind: Some(resource::Kind::Policy(api::Policy {
            kind: kind.into(),
            namespace: "shop".into(),
            name: name.into(),
            generation: 1,
            spec_json: spec.to_string(),
        })),
    }
}

#[test]
fn istio_policies_are_compiled_in_their_own_group() {
    use crate::policy::{model::Enforcement, stored::Policy};

    let spec = serde_json::json!({
        "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
        "jwtRules": [{"issuer": "https://issuer.example", "jwksFile": "/keys.json"}],
    });
    let mut store = ResourceStore::default();
    let mut renamed = policy("RequestAuthentication.security.istio.io", "tokens", &spec);
    // A key that hides the group from the agent is refused.
    renamed.key = "policy/RequestAuthentication/shop/tokens".into();
    let rejected = store.apply(
        update(
            1,
            true,
            vec![
                policy("RequestAuthentication", "tokens", &spec),
                policy("RequestAuthentication.security.istio.io", "tokens", &spec),
                policy("AuthorizationPolicy.security.example", "other", &spec),
                renamed,
            ],
            &[],
        ),
        "cluster.local",
    );
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert!(rejected[0].reason.contains("unknown"), "{rejected:?}");
    assert!(rejected[1].reason.contains("expected"), "{rejected:?}");
    let resources = store.resources();
    let enforcement = |key: &str| match resources.get(key) {
        Some(Resource::Policy(p)) => match &**p {
            Policy::RequestAuthentication(p) => p.enforcement.clone(),
            other => panic!("{key}: {other:?}"),
        },
        _ => panic!("{key} missing"),
    };
    // The same spec: Trellis's own group may name a key file, Istio's may not.
    assert_eq!(
        enforcement("policy/RequestAuthentication/shop/tokens"),
        Enforcement::Full
    );
    assert!(matches!(
        enforcement("policy/RequestAuthentication.security.istio.io/shop/tokens"),
        Enforcement::Rejected { .. }
    ));
}
