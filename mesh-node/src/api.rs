//! The control plane's wire types, generated from `proto/trellis/v1/mesh.proto`.
//!
//! These are converted at the boundary (`TryFrom`) into the internal model; nothing past the
//! conversion sees a protobuf type.
#![allow(clippy::all, clippy::pedantic, reason = "generated code")]
#![allow(
    missing_docs,
    unreachable_pub,
    clippy::allow_attributes_without_reason,
    reason = "generated code"
)]

pub mod v1 {
    tonic::include_proto!("trellis.v1");
}
