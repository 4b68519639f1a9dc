//! One row per way a configuration file can be wrong: each is refused, and the refusal names
//! the field and the line it is written on.

use std::fmt::Write as _;

use super::{GOOD, LIVE};
use crate::{
    config::{AgentConfig, ConfigError, Lines, bounds},
    identity::LocalCa,
};

/// Line numbers in [`GOOD`] (its text starts with a newline, so `node:` is on line 2).
const LINE_NODE: u64 = 2;
const LINE_CA: u64 = 3;
const LINE_LISTEN: u64 = 4;
const LINE_DATAPATH: u64 = 5;
const LINE_WORKLOAD_0: u64 = 10;
/// The first line after [`GOOD`], where appended fields go.
const LINE_APPENDED: u64 = 12;

const DATAPATH: &str =
    r#"datapath: { cgroup_root: /sys/fs/cgroup/pods, excluded_cidrs: ["10.96.0.1/32"] }"#;

/// [`GOOD`] with its `datapath:` line replaced by one with `fields`.
fn datapath(fields: &str) -> String {
    GOOD.replace(
        DATAPATH,
        &format!("datapath: {{ cgroup_root: /sys/fs/cgroup/pods, {fields} }}"),
    )
}

fn list(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

#[derive(Debug, PartialEq)]
enum Kind {
    /// serde refused it: syntax, type, unknown or missing field.
    Parse,
    /// It deserialized, and a check refused it.
    Invalid,
}

#[test]
fn every_bad_value_is_refused_naming_its_field_and_line() {
    let too_many_ports = datapath(&format!(
        "excluded_ports: [{}]",
        list((1..=bounds_u16(mesh_common::MAX_EXCLUDED_PORTS) + 1).map(|p| p.to_string()))
    ));
    let too_many_nets = datapath(&format!(
        "excluded_cidrs: [{}]",
        list((0..=mesh_common::MAX_EXCLUDED_NETS).map(|i| format!(
            "10.{}.{}.0/24",
            i / 256,
            i % 256
        )))
    ));
    let append = |yaml: &str| format!("{GOOD}{yaml}\n");
    let block_datapath = GOOD.replace(
        DATAPATH,
        "datapath:\n  cgroup_root: /sys/fs/cgroup/pods\n  excluded_cidrs:\n    - 10.96.0.1/32\n    - 0.0.0.0/0",
    );
    let rows: Vec<(&str, String, Kind, &str, Option<u64>)> = vec![
        // Map capacities: refused before a single entry is written.
        (
            "257 excluded ports",
            too_many_ports,
            Kind::Invalid,
            "datapath.excluded_ports",
            Some(LINE_DATAPATH),
        ),
        (
            "257 excluded networks",
            too_many_nets,
            Kind::Invalid,
            "datapath.excluded_cidrs",
            Some(LINE_DATAPATH),
        ),
        (
            "port 0",
            datapath("excluded_ports: [443, 0]"),
            Kind::Invalid,
            "datapath.excluded_ports[1]",
            Some(LINE_DATAPATH),
        ),
        (
            "port beyond u16",
            datapath("excluded_ports: [70000]"),
            Kind::Parse,
            "datapath.excluded_ports[0]",
            Some(LINE_DATAPATH),
        ),
        (
            "negative port",
            datapath("excluded_ports: [-1]"),
            Kind::Parse,
            "datapath.excluded_ports[0]",
            Some(LINE_DATAPATH),
        ),
        // Catch-all exclusions switch the mesh off.
        (
            "IPv4 catch-all",
            datapath("excluded_cidrs: [0.0.0.0/0]"),
            Kind::Invalid,
            "datapath.excluded_cidrs[0]",
            Some(LINE_DATAPATH),
        ),
        (
            "IPv6 catch-all",
            datapath(r#"excluded_cidrs: ["10.96.0.1/32", "::/0"]"#),
            Kind::Invalid,
            "datapath.excluded_cidrs[1]",
            Some(LINE_DATAPATH),
        ),
        (
            "IPv4 in two halves",
            datapath("excluded_cidrs: [0.0.0.0/1, 128.0.0.0/1]"),
            Kind::Invalid,
            "datapath.excluded_cidrs[0]",
            Some(LINE_DATAPATH),
        ),
        (
            "IPv6 /15",
            datapath(r#"excluded_cidrs: ["2000::/15"]"#),
            Kind::Invalid,
            "datapath.excluded_cidrs[0]",
            Some(LINE_DATAPATH),
        ),
        (
            "catch-all in a block list",
            block_datapath,
            Kind::Invalid,
            "datapath.excluded_cidrs[1]",
            Some(LINE_DATAPATH + 4),
        ),
        (
            "prefix too long",
            datapath("excluded_cidrs: [10.0.0.0/33]"),
            Kind::Invalid,
            "datapath.excluded_cidrs[0]",
            Some(LINE_DATAPATH),
        ),
        (
            "not a CIDR",
            datapath("excluded_cidrs: [10.0.0.0]"),
            Kind::Invalid,
            "datapath.excluded_cidrs[0]",
            Some(LINE_DATAPATH),
        ),
        (
            "force flag not a bool",
            datapath("allow_catch_all_exclusions: maybe"),
            Kind::Parse,
            "datapath.allow_catch_all_exclusions",
            Some(LINE_DATAPATH),
        ),
        // Streams.
        (
            "zero streams",
            append("inbound: { max_streams_per_connection: 0 }"),
            Kind::Invalid,
            "inbound.max_streams_per_connection",
            Some(LINE_APPENDED),
        ),
        (
            "too many streams",
            append("inbound: { max_streams_per_connection: 10001 }"),
            Kind::Invalid,
            "inbound.max_streams_per_connection",
            Some(LINE_APPENDED),
        ),
        (
            "negative streams",
            append("inbound: { max_streams_per_connection: -1 }"),
            Kind::Parse,
            "inbound.max_streams_per_connection",
            Some(LINE_APPENDED),
        ),
        (
            "streams not a number",
            append("inbound: { max_streams_per_connection: many }"),
            Kind::Parse,
            "inbound.max_streams_per_connection",
            Some(LINE_APPENDED),
        ),
        // Certificate lifetime.
        (
            "u64::MAX lifetime",
            append("certificate_ttl_secs: 18446744073709551615"),
            Kind::Invalid,
            "certificate_ttl_secs",
            Some(LINE_APPENDED),
        ),
        (
            "lifetime past u64",
            append("certificate_ttl_secs: 18446744073709551616"),
            Kind::Parse,
            "certificate_ttl_secs",
            Some(LINE_APPENDED),
        ),
        (
            "lifetime over a year",
            append("certificate_ttl_secs: 31536001"),
            Kind::Invalid,
            "certificate_ttl_secs",
            Some(LINE_APPENDED),
        ),
        (
            "lifetime under a minute",
            append("certificate_ttl_secs: 59"),
            Kind::Invalid,
            "certificate_ttl_secs",
            Some(LINE_APPENDED),
        ),
        (
            "zero lifetime",
            append("certificate_ttl_secs: 0"),
            Kind::Invalid,
            "certificate_ttl_secs",
            Some(LINE_APPENDED),
        ),
        (
            "lifetime as text",
            append("certificate_ttl_secs: 1d"),
            Kind::Parse,
            "certificate_ttl_secs",
            Some(LINE_APPENDED),
        ),
        // Timeouts and counts.
        (
            "drain over an hour",
            append("drain_timeout_secs: 3601"),
            Kind::Invalid,
            "drain_timeout_secs",
            Some(LINE_APPENDED),
        ),
        (
            "negative drain",
            append("drain_timeout_secs: -5"),
            Kind::Parse,
            "drain_timeout_secs",
            Some(LINE_APPENDED),
        ),
        (
            "zero connect timeout",
            append("outbound: { connect_timeout_ms: 0 }"),
            Kind::Invalid,
            "outbound.connect_timeout_ms",
            Some(LINE_APPENDED),
        ),
        (
            "huge connect timeout",
            append("outbound: { connect_timeout_ms: 18446744073709551615 }"),
            Kind::Invalid,
            "outbound.connect_timeout_ms",
            Some(LINE_APPENDED),
        ),
        (
            "zero handshake timeout",
            append("inbound:\n  handshake_timeout_ms: 0"),
            Kind::Invalid,
            "inbound.handshake_timeout_ms",
            Some(LINE_APPENDED + 1),
        ),
        (
            "zero connections per peer",
            append("outbound: { hbone_connections_per_peer: 0 }"),
            Kind::Parse,
            "outbound.hbone_connections_per_peer",
            Some(LINE_APPENDED),
        ),
        (
            "257 connections per peer",
            append("outbound: { hbone_connections_per_peer: 257 }"),
            Kind::Invalid,
            "outbound.hbone_connections_per_peer",
            Some(LINE_APPENDED),
        ),
        // Structure: unknown, missing, wrongly typed.
        (
            "unknown top-level field",
            GOOD.replace("node: node-a\n", "node: node-a\nnode_name: typo\n"),
            Kind::Parse,
            "node_name",
            Some(LINE_NODE + 1),
        ),
        (
            "unknown nested field",
            GOOD.replace(
                "hbone: \"10.1.0.1:15008\" }\ndatapath",
                "hbone: \"10.1.0.1:15008\", admn: \"127.0.0.1:1\" }\ndatapath",
            ),
            Kind::Parse,
            "listen.admn",
            Some(LINE_LISTEN),
        ),
        (
            "unknown field of an item",
            GOOD.replace("node: node-b, ips", "nod: node-b, ips"),
            Kind::Parse,
            "workloads[1].nod",
            Some(LINE_WORKLOAD_0 + 1),
        ),
        (
            "missing field",
            GOOD.replace(", hbone: \"10.1.0.1:15008\" }\ndatapath", " }\ndatapath"),
            Kind::Parse,
            "listen.hbone",
            Some(LINE_LISTEN),
        ),
        (
            "missing CA key",
            GOOD.replace(", key: /ca.key", ""),
            Kind::Parse,
            "ca.key",
            Some(LINE_CA),
        ),
        (
            "unknown enum value",
            append("log_format: xml"),
            Kind::Parse,
            "log_format",
            Some(LINE_APPENDED),
        ),
        (
            "list where a map belongs",
            append("outbound: [1, 2]"),
            Kind::Parse,
            "outbound",
            Some(LINE_APPENDED),
        ),
        (
            "text where a list belongs",
            GOOD.replace("ips: [10.0.1.10]", "ips: 10.0.1.10"),
            Kind::Parse,
            "workloads[1].ips",
            Some(LINE_WORKLOAD_0 + 1),
        ),
        (
            "not an address",
            GOOD.replace("\"10.0.0.1:15001\"", "\"10.0.0.1\""),
            Kind::Parse,
            "listen.outbound",
            Some(LINE_LISTEN),
        ),
        // Checks across fields still name theirs.
        (
            "workload without cgroup",
            GOOD.replace(", cgroup: /sys/fs/cgroup/pods/web", ""),
            Kind::Invalid,
            "workloads[0].cgroup",
            Some(LINE_WORKLOAD_0),
        ),
        (
            "no mode",
            GOOD.replace("ca: { cert: /ca.pem, key: /ca.key }\n", ""),
            Kind::Invalid,
            "ca",
            None,
        ),
        (
            "live mode, zero streams",
            format!("{LIVE}inbound: {{ max_streams_per_connection: 0 }}\n"),
            Kind::Invalid,
            "inbound.max_streams_per_connection",
            Some(6),
        ),
        (
            "live mode, catch-all",
            LIVE.replace(
                "kubepods.slice }",
                "kubepods.slice, excluded_cidrs: [\"::/0\"] }",
            ),
            Kind::Invalid,
            "datapath.excluded_cidrs[0]",
            Some(5),
        ),
    ];
    let mut failures = String::new();
    for (case, text, kind, field, line) in rows {
        let Err(err) = AgentConfig::parse(&text) else {
            let _ = writeln!(failures, "{case}: accepted");
            continue;
        };
        let got_kind = match err {
            ConfigError::Parse { .. } => Kind::Parse,
            ConfigError::Invalid { .. } => Kind::Invalid,
            ConfigError::Read { .. } => {
                let _ = writeln!(failures, "{case}: {err}");
                continue;
            }
        };
        let message = err.to_string();
        if got_kind != kind || err.field() != Some(field) || err.line() != line {
            let _ = writeln!(
                failures,
                "{case}: want {kind:?} {field} line {line:?}, got {got_kind:?} {:?} line {:?}: {message}",
                err.field(),
                err.line()
            );
        } else if !message.contains(field)
            || line.is_some_and(|l| !message.contains(&format!("(line {l})")))
        {
            let _ = writeln!(failures, "{case}: message lacks field or line: {message}");
        }
    }
    assert!(failures.is_empty(), "\n{failures}");
}

fn bounds_u16(n: u32) -> u16 {
    u16::try_from(n).expect("the port map holds fewer than 65536 entries")
}

#[test]
fn the_limits_themselves_are_accepted() {
    let ports = datapath(&format!(
        "excluded_ports: [{}]",
        list((1..=bounds_u16(mesh_common::MAX_EXCLUDED_PORTS)).map(|p| p.to_string()))
    ));
    let nets = datapath(&format!(
        "excluded_cidrs: [{}]",
        list((0..mesh_common::MAX_EXCLUDED_NETS).map(|i| format!(
            "10.{}.{}.0/24",
            i / 256,
            i % 256
        )))
    ));
    let max_ttl = bounds::AGENT_CERT_TTL_SECS.end();
    for text in [
        ports,
        nets,
        datapath("excluded_cidrs: [10.0.0.0/8, \"fd00::/16\"]"),
        format!("{GOOD}certificate_ttl_secs: {max_ttl}\n"),
        format!("{GOOD}inbound: {{ max_streams_per_connection: 1 }}\n"),
        format!("{GOOD}inbound: {{ max_streams_per_connection: 10000 }}\n"),
        format!("{GOOD}drain_timeout_secs: 0\n"),
    ] {
        if let Err(e) = AgentConfig::parse(&text) {
            panic!("refused at the limit: {e}");
        }
    }
}

#[test]
fn catch_all_exclusions_pass_only_when_forced() {
    let forced =
        datapath(r#"excluded_cidrs: ["0.0.0.0/0", "::/0"], allow_catch_all_exclusions: true"#);
    let config = AgentConfig::parse(&forced).expect("forced");
    assert!(config.datapath.allow_catch_all_exclusions);
    assert!(
        config
            .to_yaml()
            .contains("allow_catch_all_exclusions: true"),
        "a dumped config keeps the force flag"
    );
    assert!(
        !AgentConfig::parse(GOOD)
            .expect("valid")
            .to_yaml()
            .contains("allow_catch_all_exclusions"),
        "left out when off, so agents that predate it read the file"
    );
}

#[test]
fn lines_map_field_paths_and_fall_back_to_the_enclosing_field() {
    let lines = Lines::of(GOOD);
    assert_eq!(lines.line("node"), Some(LINE_NODE));
    assert_eq!(
        lines.line("datapath.excluded_cidrs[0]"),
        Some(LINE_DATAPATH)
    );
    assert_eq!(lines.line("workloads[1].ips[0]"), Some(LINE_WORKLOAD_0 + 1));
    assert_eq!(
        lines.line("workloads[0].cgroup_missing"),
        Some(LINE_WORKLOAD_0)
    );
    assert_eq!(
        lines.line("workloads[0].namespace/service_account"),
        Some(LINE_WORKLOAD_0)
    );
    assert_eq!(lines.line("inbound.max_streams_per_connection"), None);
    assert_eq!(Lines::of("{ not yaml").line("node"), None);
}

#[test]
fn yaml_syntax_errors_carry_the_parsers_line() {
    let err = AgentConfig::parse(&GOOD.replace("listen: {", "listen: {{")).expect_err("syntax");
    assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    // The parser notices the broken flow mapping where it starts: a mapping where a key belongs.
    assert_eq!(err.line(), Some(LINE_LISTEN), "{err}");
    assert_eq!(err.field(), Some("listen"), "{err}");
}

#[test]
fn environment_references_are_refused_at_their_line() {
    let err =
        crate::config::expand_env("a: 1\nb: ${UNSET_VARIABLE}\n", |_| None).expect_err("unset");
    assert_eq!(err.line(), Some(2), "{err}");
    assert!(err.to_string().contains("(line 2)"), "{err}");
}

#[test]
fn a_ca_that_cannot_sign_is_refused_at_load_naming_its_field() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
    let dir = std::env::temp_dir().join(format!("trellis-config-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };
    let root = LocalCa::generate("cluster.local").expect("root");
    let other = LocalCa::generate("cluster.local").expect("other root");
    let (root_cert, root_key) = (
        write("ca.pem", root.cert_pem()),
        write("ca.key", &root.key_pem()),
    );
    let other_key = write("other.key", &other.key_pem());
    let self_signed = |name: &str, ca: bool| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["leaf.example".into()]).expect("params");
        if ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        }
        let cert = params.self_signed(&key).expect("cert");
        (
            write(&format!("{name}.pem"), &cert.pem()),
            write(&format!("{name}.key"), &key.serialize_pem()),
        )
    };
    let (leaf_cert, leaf_key) = self_signed("leaf", false);
    let (nosign_cert, nosign_key) = self_signed("nosign", true);
    let missing = dir.join("missing.key").display().to_string();
    let load = |cert: &str, key: &str| {
        let text = GOOD.replace(
            "ca: { cert: /ca.pem, key: /ca.key }",
            &format!("ca: {{ cert: {cert}, key: {key} }}"),
        );
        let file = dir.join("agent.yaml");
        std::fs::write(&file, text).expect("write config");
        AgentConfig::load(&file)
    };
    assert!(
        load(&root_cert, &root_key).is_ok(),
        "a matching CA pair loads"
    );
    for (case, cert, key, field, needle) in [
        (
            "another CA's key",
            &root_cert,
            &other_key,
            "ca.key",
            "does not match",
        ),
        (
            "a leaf as the CA",
            &leaf_cert,
            &leaf_key,
            "ca.cert",
            "CA=true",
        ),
        (
            "a CA without keyCertSign",
            &nosign_cert,
            &nosign_key,
            "ca.cert",
            "keyCertSign",
        ),
        (
            "a missing key file",
            &root_cert,
            &missing,
            "ca.key",
            "cannot read",
        ),
    ] {
        match load(cert, key) {
            Err(err @ ConfigError::Invalid { .. }) => {
                assert_eq!(err.field(), Some(field), "{case}: {err}");
                assert_eq!(err.line(), Some(LINE_CA), "{case}: {err}");
                assert!(err.to_string().contains(needle), "{case}: {err}");
            }
            other => panic!("{case}: {other:?}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
