//! Why a connection failed: the `reason` label of `trellis_connection_failures_total`, one
//! variant per value. The agents' proxies and the waypoint's HBONE listener share it; each
//! access log error starts with the same text.

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// One failure reason; renders the label value (see [`FailureReason::as_str`]).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum FailureReason {
    /// An accept loop could not take a connection (out of descriptors or memory).
    Accept,
    // Inbound HBONE: the connection.
    TlsHandshake,
    HandshakeTimeout,
    HandshakeLimit,
    IdleConnection,
    Http2Flood,
    // Inbound HBONE: a CONNECT stream.
    BadMethod,
    BadAuthority,
    NotLocal,
    NotServed,
    IdentityMismatch,
    WaypointBypass,
    PolicyDenied,
    UpstreamUnreachable,
    // Outbound: classify and resolve.
    NoOriginalDestination,
    UnknownSource,
    UnknownServicePort,
    NoReadyEndpoint,
    NoReadyWaypoint,
    UnknownNode,
    OutsideMeshDenied,
    // Outbound: the HBONE tunnel.
    NoCertificate,
    HboneConnect,
    HboneTls,
    HboneProtocol,
    HboneStatus,
    Denied,
    EndpointsUnreachable,
    // Caps on what one pod or the node may hold.
    ConnectionLimit,
    PodConnectionLimit,
    // An open connection ended by the mesh.
    IdleTimeout,
    PolicyRevoked,
    PlaintextRevoked,
    /// The waypoint's HTTP layer on a tunnel failed.
    HttpProtocol,
}

label_values!(FailureReason {
    Accept => "accept",
    TlsHandshake => "tls_handshake",
    HandshakeTimeout => "handshake_timeout",
    HandshakeLimit => "handshake_limit",
    IdleConnection => "idle_connection",
    Http2Flood => "http2_flood",
    BadMethod => "bad_method",
    BadAuthority => "bad_authority",
    NotLocal => "not_local",
    NotServed => "not_served",
    IdentityMismatch => "identity_mismatch",
    WaypointBypass => "waypoint_bypass",
    PolicyDenied => "policy_denied",
    UpstreamUnreachable => "upstream_unreachable",
    NoOriginalDestination => "no_original_destination",
    UnknownSource => "unknown_source",
    UnknownServicePort => "unknown_service_port",
    NoReadyEndpoint => "no_ready_endpoint",
    NoReadyWaypoint => "no_ready_waypoint",
    UnknownNode => "unknown_node",
    OutsideMeshDenied => "outside_mesh_denied",
    NoCertificate => "no_certificate",
    HboneConnect => "hbone_connect",
    HboneTls => "hbone_tls",
    HboneProtocol => "hbone_protocol",
    HboneStatus => "hbone_status",
    Denied => "denied",
    EndpointsUnreachable => "endpoints_unreachable",
    ConnectionLimit => "connection_limit",
    PodConnectionLimit => "pod_connection_limit",
    IdleTimeout => "idle_timeout",
    PolicyRevoked => "policy_revoked",
    PlaintextRevoked => "plaintext_revoked",
    HttpProtocol => "http_protocol",
});

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::FailureReason::{self, *};

    /// The label values dashboards and alerts already use: renaming one is a breaking change.
    #[test]
    fn every_reason_renders_its_label_value() {
        let expected: [(FailureReason, &str); 34] = [
            (Accept, "accept"),
            (TlsHandshake, "tls_handshake"),
            (HandshakeTimeout, "handshake_timeout"),
            (HandshakeLimit, "handshake_limit"),
            (IdleConnection, "idle_connection"),
            (Http2Flood, "http2_flood"),
            (BadMethod, "bad_method"),
            (BadAuthority, "bad_authority"),
            (NotLocal, "not_local"),
            (NotServed, "not_served"),
            (IdentityMismatch, "identity_mismatch"),
            (WaypointBypass, "waypoint_bypass"),
            (PolicyDenied, "policy_denied"),
            (UpstreamUnreachable, "upstream_unreachable"),
            (NoOriginalDestination, "no_original_destination"),
            (UnknownSource, "unknown_source"),
            (UnknownServicePort, "unknown_service_port"),
            (NoReadyEndpoint, "no_ready_endpoint"),
            (NoReadyWaypoint, "no_ready_waypoint"),
            (UnknownNode, "unknown_node"),
            (OutsideMeshDenied, "outside_mesh_denied"),
            (NoCertificate, "no_certificate"),
            (HboneConnect, "hbone_connect"),
            (HboneTls, "hbone_tls"),
            (HboneProtocol, "hbone_protocol"),
            (HboneStatus, "hbone_status"),
            (Denied, "denied"),
            (EndpointsUnreachable, "endpoints_unreachable"),
            (ConnectionLimit, "connection_limit"),
            (PodConnectionLimit, "pod_connection_limit"),
            (IdleTimeout, "idle_timeout"),
            (PolicyRevoked, "policy_revoked"),
            (PlaintextRevoked, "plaintext_revoked"),
            (HttpProtocol, "http_protocol"),
        ];
        for (reason, value) in expected {
            assert_eq!(reason.as_str(), value);
            assert_eq!(reason.to_string(), value);
        }
    }
}
