//! Services: endpoint order (node, zone, rotation) and conversion at the boundary.

use super::*;

fn endpoint(ip: &str, node: &str, zone: &str, ready: bool) -> Endpoint {
    Endpoint {
        ip: ip.parse().expect("ip"),
        node: node.into(),
        zone: zone.into(),
        ready,
        workload_uid: None,
    }
}

fn service(endpoints: Vec<Endpoint>, prefer_close: bool) -> Service {
    Service::new(
        "web".into(),
        "shop".into(),
        vec!["10.96.0.10".parse().expect("ip")],
        vec![ServicePort {
            name: "http".into(),
            port: 80,
            target_port: Some(8080),
        }],
        endpoints,
        prefer_close,
    )
}

fn order(svc: &Service, node: &str, zone: Option<&str>) -> Vec<String> {
    svc.candidates(node, zone)
        .iter()
        .map(|e| e.ip.to_string())
        .collect()
}

/// How many times each address came first over `calls` calls.
fn firsts(svc: &Service, calls: usize, node: &str, zone: Option<&str>) -> Vec<(String, usize)> {
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..calls {
        if let Some(first) = order(svc, node, zone).into_iter().next() {
            *counts.entry(first).or_insert(0) += 1;
        }
    }
    counts.into_iter().collect()
}

#[test]
fn prefer_close_orders_this_node_then_this_zone_and_skips_unready() {
    let svc = service(
        vec![
            endpoint("10.0.2.1", "far", "b", true),
            endpoint("10.0.1.1", "near", "a", true),
            endpoint("10.0.0.1", "here", "a", true),
            endpoint("10.0.0.2", "here", "a", false),
        ],
        true,
    );
    assert_eq!(
        order(&svc, "here", Some("a")),
        ["10.0.0.1", "10.0.1.1", "10.0.2.1"]
    );
    // Without a zone, only the node counts: the rest form one tier.
    let o = order(&svc, "near", None);
    assert_eq!(o[0], "10.0.1.1");
    let mut rest = o[1..].to_vec();
    rest.sort();
    assert_eq!(rest, ["10.0.0.1", "10.0.2.1"]);
    assert_eq!(svc.port(80).and_then(|p| p.target_port), Some(8080));
    assert!(svc.port(81).is_none());
}

#[test]
fn prefer_close_rotates_within_each_tier() {
    let svc = service(
        vec![
            endpoint("10.0.0.1", "here", "a", true),
            endpoint("10.0.0.2", "here", "a", true),
            endpoint("10.0.1.1", "far", "b", true),
            endpoint("10.0.1.2", "far", "b", true),
        ],
        true,
    );
    assert_eq!(
        firsts(&svc, 10, "here", Some("a")),
        [("10.0.0.1".to_owned(), 5), ("10.0.0.2".to_owned(), 5)],
        "load spreads over this node's endpoints, and only them"
    );
    for _ in 0..4 {
        let o = order(&svc, "here", Some("a"));
        let mut near = o[..2].to_vec();
        near.sort();
        assert_eq!(near, ["10.0.0.1", "10.0.0.2"], "{o:?}");
    }
    // The fallback tier rotates too, so retries spread.
    let fallbacks: std::collections::BTreeSet<String> = (0..4)
        .map(|_| order(&svc, "other", Some("b"))[2].clone())
        .collect();
    assert_eq!(
        fallbacks.into_iter().collect::<Vec<_>>(),
        ["10.0.0.1", "10.0.0.2"]
    );
}

#[test]
fn without_prefer_close_every_ready_endpoint_takes_its_turn() {
    let svc = service(
        vec![
            endpoint("10.0.0.1", "here", "a", true),
            endpoint("10.0.1.1", "far", "b", true),
            endpoint("10.0.2.1", "farther", "c", true),
            endpoint("10.0.0.9", "here", "a", false),
        ],
        false,
    );
    assert_eq!(
        firsts(&svc, 9, "here", Some("a")),
        [
            ("10.0.0.1".to_owned(), 3),
            ("10.0.1.1".to_owned(), 3),
            ("10.0.2.1".to_owned(), 3)
        ],
        "locality is ignored unless the service asks for it"
    );
    let o = order(&svc, "here", Some("a"));
    assert_eq!(o.len(), 3, "unready endpoints are never candidates");
    assert!(
        service(vec![endpoint("10.0.0.1", "n1", "", false)], false)
            .candidates("n1", None)
            .is_empty()
    );
}

fn wire() -> api::Service {
    api::Service {
        name: "web".into(),
        namespace: "shop".into(),
        vips: vec!["10.96.0.10".into(), "fd00:96::10".into()],
        ports: vec![
            api::ServicePort {
                name: "http".into(),
                port: 80,
                target_port: 8080,
                protocol: "TCP".into(),
            },
            api::ServicePort {
                name: "dns".into(),
                port: 53,
                target_port: 53,
                protocol: "UDP".into(),
            },
            api::ServicePort {
                name: "grpc".into(),
                port: 9000,
                target_port: 0,
                protocol: String::new(),
            },
        ],
        endpoints: vec![api::Endpoint {
            workload_uid: "u1".into(),
            ip: "::ffff:10.0.0.1".into(),
            node: "n1".into(),
            zone: String::new(),
            ready: true,
        }],
        prefer_close: true,
        waypoint: String::new(),
    }
}

#[test]
fn wire_services_convert() {
    let svc = Service::try_from(&wire()).expect("valid");
    assert_eq!(svc.hostname, "web.shop.svc.cluster.local");
    assert_eq!(
        svc.vips,
        vec![
            "10.96.0.10".parse::<IpAddr>().expect("ip"),
            "fd00:96::10".parse::<IpAddr>().expect("ip")
        ]
    );
    let ports: Vec<_> = svc.ports.iter().map(|p| (p.port, p.target_port)).collect();
    assert_eq!(
        ports,
        [(80, Some(8080)), (9000, None)],
        "UDP is dropped; an unresolved named port is kept unresolved"
    );
    assert_eq!(svc.endpoints[0].ip.to_string(), "10.0.0.1");
    assert_eq!(svc.endpoints[0].workload_uid.as_deref(), Some("u1"));
    assert!(svc.prefer_close);
}

#[test]
fn malformed_services_name_the_field() {
    let field = |edit: &dyn Fn(&mut api::Service)| {
        let mut s = wire();
        edit(&mut s);
        Service::try_from(&s).expect_err("must be rejected").field
    };
    assert_eq!(field(&|s| s.name = "web.v2".into()), "name");
    assert_eq!(field(&|s| s.namespace.clear()), "namespace");
    assert_eq!(field(&|s| s.vips.push("web.shop".into())), "vips[2]");
    assert_eq!(field(&|s| s.vips[0] = "0.0.0.0".into()), "vips[0]");
    assert_eq!(field(&|s| s.ports[0].port = 0), "ports[0].port");
    assert_eq!(
        field(&|s| s.ports[0].target_port = 70000),
        "ports[0].target_port"
    );
    for ip in [
        "127.0.0.1",
        "::1",
        "169.254.169.254",
        "fe80::1",
        "not-an-ip",
    ] {
        assert_eq!(
            field(&|s| s.endpoints[0].ip = ip.into()),
            "endpoints[0].ip",
            "{ip}"
        );
    }
}
