use super::*;

mod refusals;

const GOOD: &str = r#"
node: node-a
ca: { cert: /ca.pem, key: /ca.key }
listen: { outbound: "10.0.0.1:15001", hbone: "10.1.0.1:15008" }
datapath: { cgroup_root: /sys/fs/cgroup/pods, excluded_cidrs: ["10.96.0.1/32"] }
nodes:
  - { name: node-a, hbone: "10.1.0.1:15008" }
  - { name: node-b, hbone: "10.1.0.2:15008" }
workloads:
  - { name: web, namespace: shop, service_account: web, node: node-a, ips: [10.0.0.10], cgroup: /sys/fs/cgroup/pods/web }
  - { name: db, namespace: shop, node: node-b, ips: [10.0.1.10] }
"#;

fn error_field(text: &str) -> String {
    match AgentConfig::parse(text) {
        Err(ConfigError::Invalid { field, .. }) => field,
        other => panic!("expected a validation error, got {other:?}"),
    }
}

#[test]
fn a_valid_file_loads_with_defaults() {
    let config = AgentConfig::parse(GOOD).expect("valid");
    assert_eq!(config.trust_domain, "cluster.local");
    assert_eq!(config.workloads[1].service_account, "default");
    assert_eq!(
        config.listen.admin,
        SocketAddr::from(([127, 0, 0, 1], 15000))
    );
    assert_eq!(
        config.outbound.unknown_destination,
        UnknownDestination::Passthrough
    );
    let again = AgentConfig::parse(&config.to_yaml()).expect("round trip");
    assert_eq!(again.workloads.len(), 2);
}

#[test]
fn hbone_connections_per_peer_is_optional_and_never_zero() {
    let config = AgentConfig::parse(GOOD).expect("valid");
    assert_eq!(config.outbound.hbone_connections_per_peer, None);
    assert!(
        !config.to_yaml().contains("hbone_connections_per_peer"),
        "left out when unset, so agents that predate it read the file"
    );
    let with = |n: &str| format!("{GOOD}outbound: {{ hbone_connections_per_peer: {n} }}\n");
    let four = AgentConfig::parse(&with("4")).expect("valid");
    assert_eq!(
        four.outbound
            .hbone_connections_per_peer
            .map(std::num::NonZeroUsize::get),
        Some(4)
    );
    assert!(AgentConfig::parse(&with("0")).is_err(), "0 is refused");
}

#[test]
fn hbone_single_use_is_off_unless_set() {
    let config = AgentConfig::parse(GOOD).expect("valid");
    assert!(!config.outbound.hbone_single_use);
    assert!(
        !config.to_yaml().contains("hbone_single_use"),
        "left out when off, so agents that predate it read the file"
    );
    let on = AgentConfig::parse(&format!("{GOOD}outbound: {{ hbone_single_use: true }}\n"))
        .expect("valid");
    assert!(on.outbound.hbone_single_use);
}

#[test]
fn errors_name_the_field() {
    assert_eq!(
        error_field(&GOOD.replace("node: node-b, ips", "node: node-x, ips")),
        "workloads[1].node"
    );
    assert_eq!(
        error_field(&GOOD.replace("ips: [10.0.1.10]", "ips: [10.0.0.10]")),
        "workloads[1].ips[0]"
    );
    assert_eq!(
        error_field(&GOOD.replace(", cgroup: /sys/fs/cgroup/pods/web", "")),
        "workloads[0].cgroup"
    );
    assert_eq!(
        error_field(&GOOD.replace("10.96.0.1/32", "10.96.0.1/33")),
        "datapath.excluded_cidrs[0]"
    );
    assert_eq!(
        error_field(&GOOD.replace(
            "outbound: \"10.0.0.1:15001\"",
            "outbound: \"0.0.0.0:15001\""
        )),
        "listen.outbound"
    );
    assert_eq!(
        error_field(&GOOD.replace("node: node-a\nca", "node: node-z\nca")),
        "node"
    );
    assert_eq!(
        error_field(&GOOD.replace(
            "namespace: shop, service_account: web",
            "namespace: Shop, service_account: web"
        )),
        "workloads[0].namespace/service_account"
    );
}

#[test]
fn omitted_sections_get_the_field_defaults() {
    let config = AgentConfig::parse(GOOD).expect("valid");
    assert_eq!(config.inbound.max_streams_per_connection, 512);
    assert_eq!(config.inbound.handshake_timeout_ms, 10_000);
    assert_eq!(config.outbound.connect_timeout_ms, 5_000);
}

#[test]
fn unknown_fields_are_rejected() {
    let text = GOOD.replace("node: node-a\n", "node: node-a\nnode_name: typo\n");
    assert!(matches!(
        AgentConfig::parse(&text),
        Err(ConfigError::Parse { .. })
    ));
}

const LIVE: &str = r#"
node: node-a
control_plane: { address: "10.1.0.1:15012", ca_cert: /etc/trellis/ca.pem, token_file: /var/run/token }
listen: { outbound: "10.0.0.1:15001", hbone: "10.1.0.1:15008" }
datapath: { cgroup_root: /sys/fs/cgroup/kubepods.slice }
"#;

#[test]
fn live_mode_needs_only_the_control_plane() {
    let config = AgentConfig::parse(LIVE).expect("valid");
    let cp = config.control_plane.as_ref().expect("control plane");
    assert!(config.ca.is_none());
    assert_eq!(cp.server_name(), "10.1.0.1", "defaults to the address's IP");
    let named = AgentConfig::parse(&LIVE.replace(
        "ca_cert:",
        "server_name: trellis-controller.trellis-system.svc, ca_cert:",
    ))
    .expect("valid");
    assert_eq!(
        named.control_plane.expect("cp").server_name(),
        "trellis-controller.trellis-system.svc"
    );
    let again = AgentConfig::parse(&config.to_yaml()).expect("round trip");
    assert!(again.control_plane.is_some() && again.ca.is_none());
}

#[test]
fn one_file_serves_every_node_through_the_environment() {
    let env = |name: &str| match name {
        "NODE_NAME" => Some("ip-10-1-0-1.ec2.internal".to_owned()),
        "HOST_IP" => Some("10.1.0.1".to_owned()),
        _ => None,
    };
    let text = LIVE
        .replace("node: node-a", "node: ${NODE_NAME}")
        .replace("hbone: \"10.1.0.1:15008\"", "hbone: \"${HOST_IP}:15008\"")
        .replace(
            "address: \"10.1.0.1:15012\"",
            "address: trellis-controller.trellis-system.svc:15012",
        );
    let config = AgentConfig::parse(&expand_env(&text, env).expect("expands")).expect("valid");
    assert_eq!(config.node, "ip-10-1-0-1.ec2.internal");
    assert_eq!(config.listen.hbone, "10.1.0.1:15008".parse().expect("addr"));
    let cp = config.control_plane.expect("cp");
    assert_eq!(cp.server_name(), "trellis-controller.trellis-system.svc");

    for (text, needle) in [
        ("node: ${POD_IP}", "POD_IP is not set"),
        ("node: ${node}", "not an environment variable reference"),
        ("node: ${NODE_NAME", "unterminated"),
    ] {
        let err = expand_env(text, env).expect_err(text).to_string();
        assert!(err.contains(needle), "{text}: {err}");
    }
    assert_eq!(expand_env("cost: $5", env).expect("plain $"), "cost: $5");
}

#[test]
fn controller_addresses_are_ip_or_dns_with_a_port() {
    for good in [
        "10.1.0.1:15012",
        "[fd00::1]:15012",
        "trellis-controller.trellis-system.svc:15012",
    ] {
        assert!(ControllerAddress(good.into()).check().is_ok(), "{good}");
    }
    assert_eq!(
        ControllerAddress("[fd00::1]:15012".into()).host(),
        "fd00::1"
    );
    for bad in [
        "10.1.0.1",
        "0.0.0.0:15012",
        "fd00::1:15012",
        "host:0",
        "bad host!:1",
        "x:y",
    ] {
        assert!(ControllerAddress(bad.into()).check().is_err(), "{bad}");
    }
}

#[test]
fn exactly_one_mode_is_required() {
    let both = LIVE.replace(
        "node: node-a\n",
        "node: node-a\nca: { cert: /ca.pem, key: /ca.key }\n",
    );
    assert_eq!(error_field(&both), "control_plane");
    let neither = GOOD.replace("ca: { cert: /ca.pem, key: /ca.key }\n", "");
    assert_eq!(error_field(&neither), "ca");
}

#[test]
fn live_mode_refuses_a_static_mesh_description() {
    let with_nodes = format!("{LIVE}nodes: [{{ name: node-a, hbone: \"10.1.0.1:15008\" }}]\n");
    assert_eq!(error_field(&with_nodes), "nodes");
    let with_workloads = format!(
        "{LIVE}workloads: [{{ name: web, namespace: shop, node: node-a, ips: [10.0.0.10], cgroup: /x }}]\n"
    );
    assert_eq!(error_field(&with_workloads), "workloads");
    assert_eq!(
        error_field(&LIVE.replace("10.1.0.1:15012", "0.0.0.0:15012")),
        "control_plane.address"
    );
    assert_eq!(
        error_field(&LIVE.replace("ca_cert:", "server_name: \"bad name!\", ca_cert:")),
        "control_plane.server_name"
    );
    assert_eq!(
        error_field(&LIVE.replace("token_file: /var/run/token", "token_file: \"\"")),
        "control_plane.token_file"
    );
    // The shared checks apply in live mode too.
    assert_eq!(
        error_field(&LIVE.replace("10.0.0.1:15001", "0.0.0.0:15001")),
        "listen.outbound"
    );
}
