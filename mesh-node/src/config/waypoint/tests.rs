use super::*;

const MINIMAL: &str = "
namespace: shop
gateway: waypoint
service_account: waypoint
control_plane:
  address: 10.0.0.1:15012
  ca_cert: /etc/trellis/ca.pem
  token_file: /var/run/secrets/token
listen:
  hbone: 0.0.0.0:15008
";

#[test]
fn minimal_file_gets_defaults() {
    let config = WaypointConfig::parse(MINIMAL).expect("valid");
    assert_eq!(
        config.identity().expect("identity").to_string(),
        "spiffe://cluster.local/ns/shop/sa/waypoint"
    );
    assert_eq!(config.limits.max_header_bytes, 16 * 1024);
    assert_eq!(config.listen.admin, crate::config::default_admin());
}

#[test]
fn refuses_unknown_fields_and_bad_values() {
    let typo = format!("{MINIMAL}limits:\n  max_header_byte: 10\n");
    assert!(matches!(
        WaypointConfig::parse(&typo),
        Err(ConfigError::Parse { .. })
    ));
    let tiny = format!("{MINIMAL}limits:\n  max_header_bytes: 10\n");
    assert!(matches!(
        WaypointConfig::parse(&tiny),
        Err(ConfigError::Invalid { field, .. }) if field == "limits.max_header_bytes"
    ));
}

#[test]
fn the_agents_outbound_listeners_are_refused() {
    // MINIMAL ends inside `listen:`; the appended field is on line 11.
    for (bad, field) in [
        ("  outbound: 10.0.0.1:15001", "listen.outbound"),
        ("  outbound6: \"[fd00::1]:15001\"", "listen.outbound6"),
    ] {
        let text = format!("{MINIMAL}{bad}\n");
        match WaypointConfig::parse(&text) {
            Err(err @ ConfigError::Invalid { .. }) => {
                assert_eq!(err.field(), Some(field), "{err}");
                assert_eq!(err.line(), Some(11), "{err}");
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[test]
fn every_duration_and_count_is_bounded() {
    // MINIMAL ends on line 10; appended fields start on line 11.
    for (bad, field, line) in [
        ("certificate_ttl_secs: 599", "certificate_ttl_secs", 11),
        (
            "certificate_ttl_secs: 18446744073709551615",
            "certificate_ttl_secs",
            11,
        ),
        ("drain_timeout_secs: 3601", "drain_timeout_secs", 11),
        (
            "limits:\n  handshake_timeout_ms: 0",
            "limits.handshake_timeout_ms",
            12,
        ),
        (
            "limits:\n  connect_timeout_ms: 120001",
            "limits.connect_timeout_ms",
            12,
        ),
        (
            "limits:\n  max_tunnels_per_connection: 0",
            "limits.max_tunnels_per_connection",
            12,
        ),
        (
            "limits:\n  max_concurrent_requests: 10001",
            "limits.max_concurrent_requests",
            12,
        ),
        (
            "limits:\n  max_header_bytes: 1048577",
            "limits.max_header_bytes",
            12,
        ),
        (
            "limits:\n  max_buffered_body_bytes: 67108865",
            "limits.max_buffered_body_bytes",
            12,
        ),
        (
            "tracing:\n  otlp_endpoint: http://c:4317\n  flush_interval_ms: 0",
            "tracing.flush_interval_ms",
            13,
        ),
        (
            "tracing:\n  otlp_endpoint: http://c:4317\n  export_timeout_ms: 0",
            "tracing.export_timeout_ms",
            13,
        ),
        ("drain_timeout_secs: -1", "drain_timeout_secs", 11),
        (
            "limits:\n  max_header_byte: 10",
            "limits.max_header_byte",
            12,
        ),
    ] {
        let text = format!("{MINIMAL}{bad}\n");
        let err = WaypointConfig::parse(&text).expect_err(bad);
        assert_eq!(err.field(), Some(field), "{bad}: {err}");
        assert_eq!(err.line(), Some(line), "{bad}: {err}");
    }
}

#[test]
fn tracing_takes_a_plaintext_collector_and_gets_bounded_defaults() {
    let with = format!("{MINIMAL}tracing:\n  otlp_endpoint: http://10.0.0.9:4317\n");
    let tracing = WaypointConfig::parse(&with)
        .expect("valid")
        .tracing
        .expect("tracing");
    assert_eq!(tracing.sampling_percent, 1.0);
    assert_eq!(tracing.max_queued_spans, 4096);
    assert!(
        WaypointConfig::parse(MINIMAL)
            .expect("valid")
            .tracing
            .is_none()
    );

    for (bad, field) in [
        ("otlp_endpoint: 10.0.0.9:4317", "tracing.otlp_endpoint"),
        (
            "otlp_endpoint: https://collector:4317",
            "tracing.otlp_endpoint",
        ),
        (
            "otlp_endpoint: http://c:4317\n  sampling_percent: 101",
            "tracing.sampling_percent",
        ),
        (
            "otlp_endpoint: http://c:4317\n  max_queued_spans: 0",
            "tracing.max_queued_spans",
        ),
        (
            "otlp_endpoint: http://c:4317\n  max_queued_spans: 10\n  max_batch_spans: 11",
            "tracing.max_batch_spans",
        ),
    ] {
        let text = format!("{MINIMAL}tracing:\n  {bad}\n");
        match WaypointConfig::parse(&text) {
            Err(ConfigError::Invalid { field: got, .. }) => assert_eq!(got, field, "{bad}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
}
