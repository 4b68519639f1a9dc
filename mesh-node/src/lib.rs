//! Trellis's node-side roles. The `mesh-node` binary runs them; `meshctl` reads them.
//!
//! - [`agent`]: the per-node proxy and datapath owner.
//! - [`config`], [`identity`], [`tls`], [`ebpf`], [`proxy`], [`metrics`], [`admin`]: its parts.
pub mod config;
pub mod identity;
pub mod tls;
