//! The translation's rules, object by object: membership, pods, nodes, services, policies and
//! routes; waypoints in [`waypoint`].

use super::*;
use crate::{
    controller::objects::{Object, PolicyObject},
    k8s::{
        GATEWAY_NAME_LABEL, MESH_DISABLED, MESH_LABEL, NO_WAYPOINT, SERVICE_NAME_LABEL,
        USE_WAYPOINT_LABEL, WAYPOINT_CLASS,
    },
};

mod istio_labels;
mod waypoint;

fn settings() -> TranslateSettings {
    TranslateSettings {
        trust_domain: "cluster.local".into(),
        hbone_port: 15008,
        cluster_id: "Kubernetes".into(),
        istio_labels: false,
    }
}

fn apply(objects: &mut ClusterObjects, value: serde_json::Value) {
    let kind = value["kind"].as_str().expect("kind").to_owned();
    let object = match kind.as_str() {
        "Namespace" => Object::Namespace(serde_json::from_value(value).expect("namespace")),
        "Pod" => Object::Pod(serde_json::from_value(value).expect("pod")),
        "Service" => Object::Service(serde_json::from_value(value).expect("service")),
        "EndpointSlice" => {
            Object::EndpointSlice(serde_json::from_value(value).expect("endpointslice"))
        }
        "Node" => Object::Node(serde_json::from_value(value).expect("node")),
        "Gateway" => Object::Gateway(PolicyObject::untyped(&value).expect("gateway")),
        other => match (PolicyKind::from_kind(other), RouteKind::from_kind(other)) {
            (Some(kind), _) => Object::Policy(
                value["apiVersion"]
                    .as_str()
                    .and_then(SecurityGroup::from_api_version)
                    .expect("a security group"),
                kind,
                PolicyObject::from_manifest(kind, &value).expect("policy"),
            ),
            (None, Some(kind)) => {
                Object::Route(kind, PolicyObject::untyped(&value).expect("route"))
            }
            (None, None) => panic!("unexpected kind {other}"),
        },
    };
    objects.apply(object).expect("named");
}

fn namespace(name: &str, mesh: Option<&str>) -> serde_json::Value {
    let labels = mesh.map_or(
        serde_json::json!({}),
        |v| serde_json::json!({MESH_LABEL: v}),
    );
    serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, node: Option<&str>, ip: Option<&str>) -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"),
                         "labels": {"app": name}},
            "spec": {"serviceAccountName": name, "nodeName": node, "containers": []},
            "status": {"phase": "Running", "podIP": ip,
                       "podIPs": ip.map(|ip| vec![serde_json::json!({"ip": ip})])}})
}

fn node(name: &str, ip: &str, zone: &str) -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {ZONE_LABEL: zone}},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
}

fn workload<'a>(t: &'a Translation, uid: &str) -> Option<&'a api::Workload> {
    match t.resources.get(&workload_key(uid))?.kind.as_ref()? {
        api::resource::Kind::Workload(w) => Some(w),
        _ => None,
    }
}

fn base() -> ClusterObjects {
    let mut o = ClusterObjects::default();
    apply(&mut o, namespace("shop", Some("enabled")));
    apply(&mut o, namespace("plain", None));
    apply(&mut o, node("node-a", "192.168.0.1", "z1"));
    apply(&mut o, node("node-b", "fd00::2", "z2"));
    o
}

#[test]
fn membership_decision_table() {
    let mut o = base();
    apply(&mut o, namespace("almost", Some("Enabled")));
    apply(&mut o, namespace("regexy", Some("enab.ed")));
    apply(&mut o, pod("shop", "web", Some("node-a"), Some("10.0.0.1")));
    let mut opted_out = pod("shop", "batch", Some("node-a"), Some("10.0.0.2"));
    opted_out["metadata"]["labels"][MESH_LABEL] = "disabled".into();
    apply(&mut o, opted_out);
    let mut not_quite = pod("shop", "odd", Some("node-a"), Some("10.0.0.3"));
    not_quite["metadata"]["labels"][MESH_LABEL] = "Disabled".into();
    apply(&mut o, not_quite);
    apply(
        &mut o,
        pod("plain", "api", Some("node-b"), Some("10.0.1.1")),
    );
    apply(&mut o, pod("almost", "x", Some("node-b"), Some("10.0.1.2")));
    apply(&mut o, pod("regexy", "y", Some("node-b"), Some("10.0.1.3")));
    apply(
        &mut o,
        pod("nowhere", "z", Some("node-b"), Some("10.0.1.4")),
    );

    let t = translate(&o, &settings());
    let enrolled = |uid: &str| workload(&t, uid).map(|w| w.enrolled);
    assert_eq!(enrolled("uid-shop-web"), Some(true));
    assert_eq!(enrolled("uid-shop-batch"), Some(false), "opted out");
    assert_eq!(
        enrolled("uid-shop-odd"),
        Some(true),
        "label values are exact"
    );
    assert_eq!(
        enrolled("uid-plain-api"),
        Some(false),
        "namespace not labelled"
    );
    assert_eq!(
        enrolled("uid-almost-x"),
        Some(false),
        "label values are exact"
    );
    assert_eq!(enrolled("uid-regexy-y"), Some(false), "no pattern matching");
    assert_eq!(enrolled("uid-nowhere-z"), Some(false), "namespace unknown");
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);

    let web = workload(&t, "uid-shop-web").expect("web");
    assert_eq!(web.zone, "z1");
    assert_eq!(web.node, "node-a");
    assert_eq!(web.service_account, "web");
    assert_eq!(web.ips, vec!["10.0.0.1".to_owned()]);
    assert_eq!(web.labels.get("app").map(String::as_str), Some("web"));

    let ids: Vec<String> = t.identities_by_node["node-a"]
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        ids,
        vec![
            "spiffe://cluster.local/ns/shop/sa/odd".to_owned(),
            "spiffe://cluster.local/ns/shop/sa/web".to_owned()
        ]
    );
    assert!(
        !t.identities_by_node.contains_key("node-b"),
        "no enrolled pods there"
    );
}

#[test]
fn relabelling_enrolls_and_removes_without_touching_the_pod() {
    let mut o = base();
    apply(
        &mut o,
        pod("plain", "api", Some("node-b"), Some("10.0.1.1")),
    );
    let before = translate(&o, &settings());
    assert_eq!(
        workload(&before, "uid-plain-api").map(|w| w.enrolled),
        Some(false)
    );

    apply(&mut o, namespace("plain", Some("enabled")));
    let after = translate(&o, &settings());
    assert_eq!(
        workload(&after, "uid-plain-api").map(|w| w.enrolled),
        Some(true)
    );
    assert!(after.node_may_hold(
        "node-b",
        &Identity::new("cluster.local", "plain", "api").expect("id")
    ));

    let mut opted_out = pod("plain", "api", Some("node-b"), Some("10.0.1.1"));
    opted_out["metadata"]["labels"][MESH_LABEL] = "disabled".into();
    apply(&mut o, opted_out);
    let out = translate(&o, &settings());
    assert_eq!(
        workload(&out, "uid-plain-api").map(|w| w.enrolled),
        Some(false)
    );
    assert!(out.identities_by_node.is_empty());
}

#[test]
fn pending_finished_and_host_network_pods_are_skipped_not_rejected() {
    let mut o = base();
    apply(&mut o, pod("shop", "unscheduled", None, None));
    apply(&mut o, pod("shop", "no-ip-yet", Some("node-a"), None));
    let mut done = pod("shop", "done", Some("node-a"), Some("10.0.0.9"));
    done["status"]["phase"] = "Succeeded".into();
    apply(&mut o, done);
    let mut host = pod("shop", "host", Some("node-a"), Some("192.168.0.1"));
    host["spec"]["hostNetwork"] = true.into();
    apply(&mut o, host);
    let t = translate(&o, &settings());
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
    assert_eq!(
        t.resources.keys().collect::<Vec<_>>(),
        vec!["node/node-a", "node/node-b"]
    );
}

#[test]
fn a_bad_identity_is_rejected_alone() {
    let mut o = base();
    apply(&mut o, pod("shop", "web", Some("node-a"), Some("10.0.0.1")));
    let mut bad = pod("shop", "bad", Some("node-a"), Some("10.0.0.2"));
    bad["spec"]["serviceAccountName"] = "Not_A_Name".into();
    apply(&mut o, bad);
    let mut bad_ip = pod("shop", "badip", Some("node-a"), Some("10.0.0.300"));
    bad_ip["metadata"]["uid"] = "uid-badip".into();
    apply(&mut o, bad_ip);
    let mut no_uid = pod("shop", "nouid", Some("node-a"), Some("10.0.0.4"));
    no_uid["metadata"]["uid"] = serde_json::Value::Null;
    apply(&mut o, no_uid);

    let t = translate(&o, &settings());
    assert!(workload(&t, "uid-shop-web").is_some());
    assert!(workload(&t, "uid-shop-bad").is_none());
    let rejected: BTreeMap<_, _> = t.rejected.iter().cloned().collect();
    assert_eq!(rejected.len(), 3, "{rejected:?}");
    assert!(
        rejected["Pod shop/bad"].contains("Not_A_Name"),
        "{rejected:?}"
    );
    assert!(
        rejected["Pod shop/badip"].contains("10.0.0.300"),
        "{rejected:?}"
    );
    assert!(
        rejected["Pod shop/nouid"].contains("metadata.uid"),
        "{rejected:?}"
    );
}

#[test]
fn dots_in_service_accounts_are_literal() {
    let mut o = base();
    let mut dotted = pod("shop", "web", Some("node-a"), Some("10.0.0.1"));
    dotted["spec"]["serviceAccountName"] = "web.v2".into();
    apply(&mut o, dotted);
    let t = translate(&o, &settings());
    let td = "cluster.local";
    assert!(t.node_may_hold("node-a", &Identity::new(td, "shop", "web.v2").expect("id")));
    assert!(!t.node_may_hold("node-a", &Identity::new(td, "shop", "webxv2").expect("id")));
    assert!(!t.node_may_hold("node-a", &Identity::new(td, "shop", "web").expect("id")));
    assert!(!t.node_may_hold("node-b", &Identity::new(td, "shop", "web.v2").expect("id")));
}

#[test]
fn a_reused_ip_belongs_to_the_newer_pod() {
    let mut o = base();
    let mut old = pod("shop", "old", Some("node-a"), Some("10.0.0.1"));
    old["metadata"]["creationTimestamp"] = "2024-01-01T00:00:00Z".into();
    apply(&mut o, old);
    let mut new = pod("shop", "new", Some("node-a"), Some("10.0.0.1"));
    new["metadata"]["creationTimestamp"] = "2024-01-02T00:00:00Z".into();
    apply(&mut o, new);
    let t = translate(&o, &settings());
    assert!(workload(&t, "uid-shop-new").is_some());
    assert!(workload(&t, "uid-shop-old").is_none());
    assert_eq!(t.rejected.len(), 1);
    assert_eq!(t.rejected[0].0, "Pod shop/old");
    let ids = &t.identities_by_node["node-a"];
    assert!(!ids.contains(&Identity::new("cluster.local", "shop", "old").expect("id")));
}

#[test]
fn nodes_get_their_internal_ip_and_hbone_port() {
    let mut o = base();
    apply(
        &mut o,
        serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "bare"},
                "status": {"addresses": [{"type": "Hostname", "address": "bare"}]}}),
    );
    let t = translate(&o, &settings());
    let hbone = |name: &str| match t
        .resources
        .get(&node_key(name))
        .and_then(|r| r.kind.clone())
    {
        Some(api::resource::Kind::Node(n)) => Some((n.hbone, n.zone)),
        _ => None,
    };
    assert_eq!(
        hbone("node-a"),
        Some(("192.168.0.1:15008".into(), "z1".into()))
    );
    assert_eq!(
        hbone("node-b"),
        Some(("[fd00::2]:15008".into(), "z2".into()))
    );
    assert_eq!(hbone("bare"), None);
    assert_eq!(t.rejected.len(), 1);
    assert!(t.rejected[0].1.contains("InternalIP"));
}

#[test]
fn services_join_endpoint_slices_and_pods() {
    let mut o = base();
    apply(
        &mut o,
        pod("shop", "web-1", Some("node-a"), Some("10.0.0.1")),
    );
    apply(
        &mut o,
        pod("shop", "web-2", Some("node-b"), Some("10.0.1.1")),
    );
    apply(
        &mut o,
        serde_json::json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                         "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                                   {"name": "metrics", "port": 9090, "targetPort": 9091},
                                   {"name": "admin", "port": 8000}]}}),
    );
    apply(
        &mut o,
        serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "web-abc", "namespace": "shop",
                             "labels": {SERVICE_NAME_LABEL: "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [
                    {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "nodeName": "node-a",
                     "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop", "uid": "uid-shop-web-1"}},
                    {"addresses": ["10.0.1.1"], "conditions": {"ready": false},
                     "targetRef": {"kind": "Pod", "name": "web-2", "namespace": "shop", "uid": "uid-shop-web-2"}},
                    {"addresses": ["10.0.9.9"], "zone": "z9"},
                    {"addresses": ["not-an-ip"]}]}),
    );
    // A slice of another service, and one without the label: neither joins.
    apply(
        &mut o,
        serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "other-x", "namespace": "shop",
                             "labels": {SERVICE_NAME_LABEL: "other"}},
                "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.5.5"]}]}),
    );
    apply(
        &mut o,
        serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "orphan", "namespace": "shop"},
                "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.6.6"]}]}),
    );

    let t = translate(&o, &settings());
    let Some(api::resource::Kind::Service(svc)) = t
        .resources
        .get(&service_key("shop", "web"))
        .and_then(|r| r.kind.clone())
    else {
        panic!("service missing: {:?}", t.resources.keys());
    };
    assert_eq!(
        svc.vips,
        vec!["10.96.0.10".to_owned(), "fd00:96::10".to_owned()]
    );
    let ports: Vec<_> = svc
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.port, p.target_port))
        .collect();
    assert_eq!(
        ports,
        vec![
            ("http", 80, 8080),
            ("metrics", 9090, 9091),
            ("admin", 8000, 8000)
        ]
    );
    assert!(svc.ports.iter().all(|p| p.protocol == "TCP"));
    let eps: Vec<_> = svc
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
        eps,
        vec![
            ("10.0.0.1", "uid-shop-web-1", "node-a", "z1", true),
            ("10.0.1.1", "uid-shop-web-2", "node-b", "z2", false),
            ("10.0.9.9", "", "", "z9", true),
        ]
    );
    assert_eq!(t.rejected.len(), 1, "{:?}", t.rejected);
    assert_eq!(t.rejected[0].0, "EndpointSlice shop/web-abc");
    assert!(t.rejected[0].1.contains("not-an-ip"));
    assert!(!svc.prefer_close, "no trafficDistribution: spread");
}

#[test]
fn traffic_distribution_asks_for_close_endpoints() {
    let prefer_close = |distribution: Option<&str>| {
        let mut o = base();
        let mut svc = serde_json::json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}});
        if let Some(d) = distribution {
            svc["spec"]["trafficDistribution"] = d.into();
        }
        // Through the store, so stripping must keep the field.
        apply(&mut o, svc);
        match translate(&o, &settings())
            .resources
            .get(&service_key("shop", "web"))
            .and_then(|r| r.kind.clone())
        {
            Some(api::resource::Kind::Service(s)) => s.prefer_close,
            other => panic!("service missing: {other:?}"),
        }
    };
    assert!(prefer_close(Some("PreferClose")));
    assert!(prefer_close(Some("PreferSameZone")));
    assert!(prefer_close(Some("PreferSameNode")));
    assert!(!prefer_close(None));
    assert!(!prefer_close(Some("preferclose")), "values are exact");
    assert!(!prefer_close(Some("SomethingNew")));
}

#[test]
fn output_is_deterministic() {
    let mut o = base();
    for i in 0..20 {
        apply(
            &mut o,
            pod(
                "shop",
                &format!("p{i}"),
                Some("node-a"),
                Some(&format!("10.0.0.{i}")),
            ),
        );
    }
    let a = translate(&o, &settings());
    let b = translate(&o.clone(), &settings());
    assert_eq!(a, b);
}

#[test]
fn policies_are_sent_as_written_and_report_what_the_agents_enforce() {
    let mut objects = base();
    let policy = |name: &str, spec: serde_json::Value| {
        serde_json::json!({"apiVersion": "security.trellis.dev/v1", "kind": "AuthorizationPolicy",
                "metadata": {"namespace": "shop", "name": name, "generation": 7}, "spec": spec})
    };
    apply(
        &mut objects,
        policy(
            "deny-ssh",
            serde_json::json!({"action": "DENY",
                "rules": [{"to": [{"operation": {"ports": ["22"]}}]}]}),
        ),
    );
    // `rules` is not a list: the agents enforce the strictest stand-in, and say so.
    apply(
        &mut objects,
        policy("broken", serde_json::json!({"rules": 3})),
    );
    let t = translate(&objects, &settings());

    let key = policy_key(
        SecurityGroup::Trellis,
        PolicyKind::Authorization,
        "shop",
        "deny-ssh",
    );
    let Some(api::resource::Kind::Policy(sent)) = t.resources[&key].kind.clone() else {
        panic!("{key} is a policy resource");
    };
    assert_eq!(sent.kind, "AuthorizationPolicy");
    assert_eq!(sent.generation, 7);
    let spec: serde_json::Value = serde_json::from_str(&sent.spec_json).expect("json");
    assert_eq!(spec["rules"][0]["to"][0]["operation"]["ports"][0], "22");

    let status = |name: &str| {
        t.policy_status[&(
            SecurityGroup::Trellis,
            PolicyKind::Authorization,
            PolicyId {
                namespace: "shop".into(),
                name: name.into(),
            },
        )]
            .clone()
    };
    assert_eq!(status("deny-ssh").status, "True");
    assert_eq!(status("deny-ssh").observed_generation, Some(7));
    let broken = status("broken");
    assert_eq!(
        (broken.status.as_str(), broken.reason.as_str()),
        ("False", "Invalid")
    );
    assert!(
        broken.message.contains("spec: cannot be read"),
        "{}",
        broken.message
    );
    assert!(
        t.resources.contains_key(&policy_key(
            SecurityGroup::Trellis,
            PolicyKind::Authorization,
            "shop",
            "broken"
        )),
        "a broken policy still reaches the agents, as its stand-in"
    );
}

#[test]
fn request_authentications_are_sent_as_written_with_their_status() {
    let mut objects = base();
    let request_authentication = |name: &str, spec: serde_json::Value| {
        serde_json::json!({"apiVersion": "security.trellis.dev/v1",
                "kind": "RequestAuthentication",
                "metadata": {"namespace": "shop", "name": name, "generation": 2}, "spec": spec})
    };
    let at_waypoint = serde_json::json!({
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                            "name": "waypoint"}],
            "jwtRules": [{"issuer": "https://issuer.example",
                          "jwksUri": "https://issuer.example/keys"}]});
    apply(
        &mut objects,
        request_authentication("at-waypoint", at_waypoint),
    );
    // Bound to workloads, whose nodes never see a request: accepted, but it does nothing.
    apply(
        &mut objects,
        request_authentication(
            "on-pods",
            serde_json::json!({"selector": {"matchLabels": {"app": "web"}},
                    "jwtRules": [{"issuer": "https://issuer.example",
                                  "jwksUri": "https://issuer.example/keys"}]}),
        ),
    );
    let t = translate(&objects, &settings());

    let key = policy_key(
        SecurityGroup::Trellis,
        PolicyKind::RequestAuthentication,
        "shop",
        "at-waypoint",
    );
    assert_eq!(key, "policy/RequestAuthentication/shop/at-waypoint");
    let Some(api::resource::Kind::Policy(sent)) = t.resources[&key].kind.clone() else {
        panic!("{key} is a policy resource");
    };
    assert_eq!(sent.kind, "RequestAuthentication");
    assert_eq!(sent.generation, 2);
    let spec: serde_json::Value = serde_json::from_str(&sent.spec_json).expect("json");
    assert_eq!(spec["jwtRules"][0]["issuer"], "https://issuer.example");
    assert!(
        for_role(&key, Role::Agent) && for_role(&key, Role::Waypoint),
        "agents ignore the kind themselves; the policy path is the same for both"
    );

    let status = |name: &str| {
        t.policy_status[&(
            SecurityGroup::Trellis,
            PolicyKind::RequestAuthentication,
            PolicyId {
                namespace: "shop".into(),
                name: name.into(),
            },
        )]
            .clone()
    };
    let accepted = status("at-waypoint");
    assert_eq!(
        (accepted.status.as_str(), accepted.observed_generation),
        ("True", Some(2)),
        "{accepted:?}"
    );
    let on_pods = status("on-pods");
    assert_eq!(
        (on_pods.status.as_str(), on_pods.reason.as_str()),
        ("False", "NoEffect"),
        "{on_pods:?}"
    );
}

#[test]
fn traffic_policies_report_what_the_waypoints_apply() {
    let mut o = base();
    let policy = |name: &str, spec: serde_json::Value| {
        serde_json::json!({"apiVersion": "traffic.trellis.dev/v1", "kind": "TrafficPolicy",
                "metadata": {"namespace": "shop", "name": name, "generation": 5}, "spec": spec})
    };
    let service = |name: &str| serde_json::json!({"kind": "Service", "name": name});
    apply(
        &mut o,
        policy(
            "a-retries",
            serde_json::json!({"targetRefs": [service("reviews")],
                    "retries": {"attempts": 2}}),
        ),
    );
    // Later in name order and also on `reviews`: applied to `ratings` only.
    apply(
        &mut o,
        policy(
            "b-limits",
            serde_json::json!({"targetRefs": [service("reviews"), service("ratings")],
                    "rateLimit": {"requestsPerSecond": 10}}),
        ),
    );
    // Rejected, so it takes no Service from anyone.
    apply(
        &mut o,
        policy(
            "c-typo",
            serde_json::json!({"targetRefs": [service("ratings")],
                    "retries": {"attempts": 2, "perTryTimout": "1s"}}),
        ),
    );
    let t = translate(&o, &settings());
    let status = |name: &str| {
        t.traffic_policy_status[&PolicyId {
            namespace: "shop".into(),
            name: name.into(),
        }]
            .clone()
    };

    let a = status("a-retries");
    assert_eq!(
        (a.status.as_str(), a.reason.as_str(), a.observed_generation),
        ("True", "Accepted", Some(5))
    );
    let b = status("b-limits");
    assert_eq!(
        (b.status.as_str(), b.reason.as_str()),
        ("False", "Conflicted")
    );
    assert!(
        b.message.contains("reviews (taken by a-retries)")
            && b.message.contains("applied to its other targets"),
        "{}",
        b.message
    );
    let c = status("c-typo");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "Unsupported")
    );
    assert!(
        c.message.contains("spec.retries.perTryTimout"),
        "{}",
        c.message
    );
    assert!(
        t.resources
            .contains_key(&route_key(RouteKind::TrafficPolicy, "shop", "c-typo")),
        "a rejected policy is still carried as written; the waypoints ignore it the same way"
    );
    assert!(t.policy_status.is_empty(), "not a security policy");
}

#[test]
fn routes_are_carried_as_written_for_waypoints_only() {
    let mut o = base();
    let spec = serde_json::json!({
            "parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}],
            "rules": [{"backendRefs": [{"name": "web", "port": 80}], "someFutureField": true}]});
    for (kind, api_version) in [
        ("HTTPRoute", "gateway.networking.k8s.io/v1"),
        ("GRPCRoute", "gateway.networking.k8s.io/v1"),
        ("TrafficPolicy", "traffic.trellis.dev/v1"),
        ("VirtualService", "networking.istio.io/v1alpha3"),
        ("DestinationRule", "networking.istio.io/v1beta1"),
    ] {
        apply(
            &mut o,
            serde_json::json!({"apiVersion": api_version, "kind": kind,
                    "metadata": {"name": "web", "namespace": "shop", "generation": 3},
                    "spec": spec}),
        );
    }
    let t = translate(&o, &settings());
    for kind in RouteKind::ALL {
        let key = route_key(kind, "shop", "web");
        assert_eq!(key, format!("route/{}/shop/web", kind.as_str()));
        let Some(api::resource::Kind::Policy(route)) =
            t.resources.get(&key).and_then(|r| r.kind.clone())
        else {
            panic!("{key} missing: {:?}", t.resources.keys());
        };
        assert_eq!(route.kind, kind.as_str());
        assert_eq!(
            (route.namespace.as_str(), route.name.as_str()),
            ("shop", "web")
        );
        assert_eq!(route.generation, 3);
        let sent: serde_json::Value = serde_json::from_str(&route.spec_json).expect("json");
        assert_eq!(sent, spec, "as written, unknown fields included");
        assert!(for_role(&key, Role::Waypoint));
        assert!(!for_role(&key, Role::Agent));
    }
    assert!(
        t.policy_status.is_empty(),
        "routing objects are not policies"
    );
    assert!(for_role("waypoint/shop/waypoint", Role::Agent));
    assert!(for_role("workload/u", Role::Agent));
}

#[test]
fn istio_policies_are_sent_in_their_group_beside_the_twins() {
    let mut objects = base();
    let policy = |api_version: &str, spec: serde_json::Value| {
        serde_json::json!({"apiVersion": api_version, "kind": "AuthorizationPolicy",
                "metadata": {"namespace": "shop", "name": "p", "generation": 5}, "spec": spec})
    };
    apply(
        &mut objects,
        policy(
            "security.trellis.dev/v1",
            serde_json::json!({"action": "DENY", "rules": [{}]}),
        ),
    );
    apply(
        &mut objects,
        policy(
            "security.istio.io/v1beta1",
            serde_json::json!({"rules": [{"from": [{"source": {"serviceAccounts": ["shop/*"]}}]}]}),
        ),
    );
    let t = translate(&objects, &settings());
    let key = policy_key(SecurityGroup::Istio, PolicyKind::Authorization, "shop", "p");
    assert_eq!(key, "policy/AuthorizationPolicy.security.istio.io/shop/p");
    let Some(api::resource::Kind::Policy(sent)) = t.resources[&key].kind.clone() else {
        panic!("{key} is a policy resource");
    };
    assert_eq!(sent.kind, "AuthorizationPolicy.security.istio.io");
    assert!(
        t.resources
            .contains_key("policy/AuthorizationPolicy/shop/p")
    );
    let id = PolicyId {
        namespace: "shop".into(),
        name: "p".into(),
    };
    let trellis = &t.policy_status[&(
        SecurityGroup::Trellis,
        PolicyKind::Authorization,
        id.clone(),
    )];
    let istio = &t.policy_status[&(SecurityGroup::Istio, PolicyKind::Authorization, id)];
    assert_eq!(trellis.status, "True");
    assert_eq!(istio.status, "False");
    assert!(
        istio
            .message
            .contains("spec.rules[0].from[0].source.serviceAccounts[0]"),
        "{}",
        istio.message
    );
}
