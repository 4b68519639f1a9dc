//! Why a connection to a local pod was opened from the node's address rather than its
//! client's: the `reason` label of `trellis_delivered_from_node_total` and the access log's
//! `delivered_from` (`proxy/transparent.rs` decides).

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// Why a connection to a pod was delivered from the node's address (the `reason` label of
/// `trellis_delivered_from_node_total`, and the access log's `node:<reason>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeReason {
    /// `inbound.source_address` is `node`.
    Disabled,
    /// No workload of the mesh holds the source address with the verified identity on the
    /// node the connection came from (a waypoint, a source outside the mesh, an address the
    /// peer only claims).
    UnverifiedSource,
    /// The source's address is of the other family than the pod's.
    FamilyMismatch,
    /// The return path does not cover the pod's link yet (just created), or is not installed.
    ReturnPathNotReady,
}

impl NodeReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::UnverifiedSource => "unverified_source",
            Self::FamilyMismatch => "family_mismatch",
            Self::ReturnPathNotReady => "return_path_not_ready",
        }
    }
}

impl EncodeLabelValue for NodeReason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}
