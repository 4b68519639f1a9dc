//! Waypoints: which Gateways are waypoints, their pods and identities, and the
//! `trellis.dev/use-waypoint` labels on namespaces, services and pods.

use super::*;

pub(super) fn gateway(ns: &str, name: &str, class: &str) -> serde_json::Value {
    serde_json::json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"gatewayClassName": class,
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})
}

/// A running pod of waypoint `waypoint` (label only; the Gateway is separate).
pub(super) fn waypoint_pod(
    ns: &str,
    name: &str,
    waypoint: &str,
    account: &str,
    node: &str,
    ip: &str,
) -> serde_json::Value {
    let mut p = pod(ns, name, Some(node), Some(ip));
    p["metadata"]["labels"][GATEWAY_NAME_LABEL] = waypoint.into();
    p["spec"]["serviceAccountName"] = account.into();
    p
}

pub(super) fn service(ns: &str, name: &str, labels: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}})
}

pub(super) fn waypoint_of(t: &Translation, ns: &str, name: &str) -> Option<api::Waypoint> {
    match t.resources.get(&waypoint_key(ns, name))?.kind.clone()? {
        api::resource::Kind::Waypoint(w) => Some(w),
        _ => None,
    }
}

pub(super) fn service_waypoint(t: &Translation, ns: &str, name: &str) -> Option<String> {
    match t.resources.get(&service_key(ns, name))?.kind.clone()? {
        api::resource::Kind::Service(s) => Some(s.waypoint),
        _ => None,
    }
}

pub(super) fn rejections(t: &Translation) -> BTreeMap<String, String> {
    t.rejected.iter().cloned().collect()
}

#[test]
fn waypoints_are_gateways_of_their_class_served_by_their_running_pods() {
    let mut o = base();
    apply(&mut o, gateway("shop", "waypoint", WAYPOINT_CLASS));
    apply(&mut o, gateway("shop", "idle", WAYPOINT_CLASS));
    apply(&mut o, gateway("shop", "ingress", "some-other-class"));
    apply(&mut o, gateway("shop", "almost", "Trellis-Waypoint"));
    for (name, account, node, ip) in [
        ("wp-1", "waypoint", "node-a", "10.0.0.10"),
        ("wp-2", "waypoint", "node-b", "10.0.1.10"),
        ("wp-odd", "intruder", "node-b", "10.0.1.11"),
    ] {
        apply(
            &mut o,
            waypoint_pod("shop", name, "waypoint", account, node, ip),
        );
    }
    let mut pending = waypoint_pod(
        "shop",
        "wp-new",
        "waypoint",
        "waypoint",
        "node-a",
        "10.0.0.11",
    );
    pending["status"]["phase"] = "Pending".into();
    apply(&mut o, pending);
    let mut draining = waypoint_pod(
        "shop",
        "wp-old",
        "waypoint",
        "waypoint",
        "node-a",
        "10.0.0.12",
    );
    draining["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z".into();
    apply(&mut o, draining);
    // Pods of a Gateway of another class, and pods naming a Gateway of another namespace,
    // are ordinary workloads.
    apply(
        &mut o,
        waypoint_pod(
            "shop",
            "ingress-1",
            "ingress",
            "ingress",
            "node-a",
            "10.0.0.20",
        ),
    );
    apply(&mut o, namespace("other", Some("enabled")));
    apply(
        &mut o,
        waypoint_pod(
            "other",
            "stray",
            "waypoint",
            "waypoint",
            "node-a",
            "10.0.0.30",
        ),
    );

    let t = translate(&o, &settings());
    let wp = waypoint_of(&t, "shop", "waypoint").expect("published");
    assert_eq!(
        (wp.namespace.as_str(), wp.name.as_str()),
        ("shop", "waypoint")
    );
    assert_eq!(wp.service_account, "waypoint", "the most common account");
    assert_eq!(wp.port, 15008);
    let endpoints: Vec<_> = wp
        .endpoints
        .iter()
        .map(|e| {
            (
                e.ip.as_str(),
                e.workload_uid.as_str(),
                e.node.as_str(),
                e.zone.as_str(),
                e.ready,
            )
        })
        .collect();
    assert_eq!(
        endpoints,
        vec![
            ("10.0.0.10", "uid-shop-wp-1", "node-a", "z1", true),
            ("10.0.0.12", "uid-shop-wp-old", "node-a", "z1", false),
            ("10.0.1.10", "uid-shop-wp-2", "node-b", "z2", true),
        ],
        "running pods only; a draining one takes no new connections"
    );
    let idle = waypoint_of(&t, "shop", "idle").expect("a waypoint without pods still exists");
    assert!(idle.endpoints.is_empty());
    assert_eq!(idle.service_account, "");
    assert!(waypoint_of(&t, "shop", "ingress").is_none(), "other class");
    assert!(
        waypoint_of(&t, "shop", "almost").is_none(),
        "class names are exact"
    );

    // Waypoint pods are workloads, never enrolled; the others are.
    let enrolled = |uid: &str| workload(&t, uid).map(|w| w.enrolled);
    for uid in [
        "uid-shop-wp-1",
        "uid-shop-wp-2",
        "uid-shop-wp-odd",
        "uid-shop-wp-new",
    ] {
        assert_eq!(enrolled(uid), Some(false), "{uid}");
    }
    assert_eq!(enrolled("uid-shop-ingress-1"), Some(true));
    assert_eq!(enrolled("uid-other-stray"), Some(true));

    // The waypoint's identity is its own: no agent may hold it.
    assert_eq!(
        t.waypoint_accounts,
        BTreeSet::from([("shop".to_owned(), "waypoint".to_owned())])
    );
    let id = Identity::new("cluster.local", "shop", "waypoint").expect("id");
    assert!(!t.node_may_hold("node-a", &id));
    assert!(!t.node_may_hold("node-b", &id));
    assert!(
        !t.is_waypoint_account("shop", "intruder"),
        "the minority account is not the waypoint's"
    );
    // The other namespace's pod runs as "waypoint" too, but that is another identity.
    assert!(t.node_may_hold(
        "node-a",
        &Identity::new("cluster.local", "other", "waypoint").expect("id")
    ));

    let rejected = rejections(&t);
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    let odd = &rejected["Pod shop/wp-odd"];
    assert!(
        odd.contains("waypoint shop/waypoint")
            && odd.contains("intruder")
            && odd.contains("run as waypoint"),
        "{odd}"
    );
}

#[test]
fn a_tie_between_accounts_is_decided_by_name_not_by_order() {
    let mut o = base();
    apply(&mut o, gateway("shop", "waypoint", WAYPOINT_CLASS));
    apply(
        &mut o,
        waypoint_pod("shop", "a", "waypoint", "zeta", "node-a", "10.0.0.1"),
    );
    apply(
        &mut o,
        waypoint_pod("shop", "b", "waypoint", "alpha", "node-a", "10.0.0.2"),
    );
    let t = translate(&o, &settings());
    let wp = waypoint_of(&t, "shop", "waypoint").expect("published");
    assert_eq!(wp.service_account, "alpha");
    assert_eq!(wp.endpoints.len(), 1);
    assert!(rejections(&t).contains_key("Pod shop/a"));
}

#[test]
fn an_enrolled_pod_sharing_a_waypoints_account_gets_no_identity() {
    let mut o = base();
    apply(&mut o, gateway("shop", "waypoint", WAYPOINT_CLASS));
    apply(
        &mut o,
        waypoint_pod("shop", "wp", "waypoint", "shared", "node-a", "10.0.0.1"),
    );
    let mut app = pod("shop", "app", Some("node-b"), Some("10.0.1.1"));
    app["spec"]["serviceAccountName"] = "shared".into();
    apply(&mut o, app);
    let t = translate(&o, &settings());
    assert_eq!(
        workload(&t, "uid-shop-app").map(|w| w.enrolled),
        Some(true),
        "still a workload"
    );
    let id = Identity::new("cluster.local", "shop", "shared").expect("id");
    assert!(!t.node_may_hold("node-b", &id));
    assert!(
        t.identities_by_node.values().all(|ids| !ids.contains(&id)),
        "{:?}",
        t.identities_by_node
    );
    let rejected = rejections(&t);
    assert!(
        rejected["Pod shop/app"].contains("waypoint's"),
        "{rejected:?}"
    );
}

#[test]
fn use_waypoint_labels_on_namespaces_services_and_pods() {
    let mut o = base();
    let mut shop = namespace("shop", Some("enabled"));
    shop["metadata"]["labels"][USE_WAYPOINT_LABEL] = "waypoint".into();
    apply(&mut o, shop);
    apply(&mut o, gateway("shop", "waypoint", WAYPOINT_CLASS));
    apply(&mut o, gateway("shop", "special", WAYPOINT_CLASS));
    apply(
        &mut o,
        waypoint_pod("shop", "wp", "waypoint", "waypoint", "node-a", "10.0.0.100"),
    );
    let labelled = |name: &str, ip: &str, key: &str, value: &str| {
        let mut p = pod("shop", name, Some("node-a"), Some(ip));
        p["metadata"]["labels"][key] = value.into();
        p
    };
    apply(&mut o, pod("shop", "web", Some("node-a"), Some("10.0.0.1")));
    apply(
        &mut o,
        labelled("api", "10.0.0.2", USE_WAYPOINT_LABEL, "special"),
    );
    apply(
        &mut o,
        labelled("batch", "10.0.0.3", USE_WAYPOINT_LABEL, NO_WAYPOINT),
    );
    apply(
        &mut o,
        labelled("ghost", "10.0.0.4", USE_WAYPOINT_LABEL, "nope"),
    );
    apply(
        &mut o,
        labelled("legacy", "10.0.0.5", MESH_LABEL, MESH_DISABLED),
    );

    apply(&mut o, service("shop", "web", serde_json::json!({})));
    apply(
        &mut o,
        service(
            "shop",
            "api",
            serde_json::json!({USE_WAYPOINT_LABEL: "special"}),
        ),
    );
    apply(
        &mut o,
        service(
            "shop",
            "batch",
            serde_json::json!({USE_WAYPOINT_LABEL: NO_WAYPOINT}),
        ),
    );
    apply(
        &mut o,
        service(
            "shop",
            "ghost",
            serde_json::json!({USE_WAYPOINT_LABEL: "nope"}),
        ),
    );
    apply(
        &mut o,
        service(
            "shop",
            "waypoint",
            serde_json::json!({GATEWAY_NAME_LABEL: "waypoint"}),
        ),
    );

    // Not in the mesh: the label means nothing there.
    let mut plain = namespace("plain", None);
    plain["metadata"]["labels"][USE_WAYPOINT_LABEL] = "waypoint".into();
    apply(&mut o, plain);
    apply(&mut o, gateway("plain", "waypoint", WAYPOINT_CLASS));
    apply(
        &mut o,
        pod("plain", "api", Some("node-b"), Some("10.0.1.1")),
    );
    apply(&mut o, service("plain", "api", serde_json::json!({})));

    // In the mesh, its label naming a waypoint that does not exist.
    let mut typo = namespace("typo", Some("enabled"));
    typo["metadata"]["labels"][USE_WAYPOINT_LABEL] = "waypiont".into();
    apply(&mut o, typo);
    apply(&mut o, pod("typo", "a", Some("node-b"), Some("10.0.1.2")));
    apply(&mut o, pod("typo", "b", Some("node-b"), Some("10.0.1.3")));
    apply(&mut o, service("typo", "a", serde_json::json!({})));

    let t = translate(&o, &settings());
    let of_pod = |uid: &str| workload(&t, uid).map(|w| w.waypoint.clone());
    let some = |s: &str| Some(s.to_owned());
    assert_eq!(
        of_pod("uid-shop-web"),
        some("shop/waypoint"),
        "from the namespace"
    );
    assert_eq!(
        of_pod("uid-shop-api"),
        some("shop/special"),
        "its own label first"
    );
    assert_eq!(of_pod("uid-shop-batch"), some(""), "opted out");
    assert_eq!(of_pod("uid-shop-ghost"), some(""), "missing: direct");
    assert_eq!(of_pod("uid-shop-legacy"), some(""), "not enrolled");
    assert_eq!(of_pod("uid-shop-wp"), some(""), "a waypoint never uses one");
    assert_eq!(
        of_pod("uid-plain-api"),
        some(""),
        "namespace not in the mesh"
    );
    assert_eq!(of_pod("uid-typo-a"), some(""));

    let of_service = |ns: &str, name: &str| service_waypoint(&t, ns, name);
    assert_eq!(of_service("shop", "web"), some("shop/waypoint"));
    assert_eq!(of_service("shop", "api"), some("shop/special"));
    assert_eq!(of_service("shop", "batch"), some(""));
    assert_eq!(of_service("shop", "ghost"), some(""));
    assert_eq!(
        of_service("shop", "waypoint"),
        some(""),
        "the waypoint's own Service"
    );
    assert_eq!(of_service("plain", "api"), some(""));
    assert_eq!(of_service("typo", "a"), some(""));

    let rejected = rejections(&t);
    assert_eq!(
        rejected.keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["Namespace typo", "Pod shop/ghost", "Service shop/ghost"],
        "each label naming a missing waypoint once, on the object carrying it"
    );
    assert!(
        rejected["Pod shop/ghost"].starts_with("waypoint shop/nope does not exist"),
        "{rejected:?}"
    );
    assert!(
        rejected["Namespace typo"].starts_with("waypoint typo/waypiont does not exist"),
        "{rejected:?}"
    );
}
