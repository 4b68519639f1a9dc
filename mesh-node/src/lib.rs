//! Trellis's node-side roles. The `mesh-node` binary runs them; `meshctl` reads them.
//!
//! - [`agent`]: the per-node proxy and datapath owner.
//! - [`controller`]: the control plane: CA service and config distribution to agents.
//! - [`config`], [`identity`], [`tls`], [`ebpf`], [`proxy`], [`metrics`], [`admin`]: its parts.
//! - [`policy`]: L4 authorization policies and the per-connection decision.
//! - [`waypoint`]: the L7 proxy per namespace or service.
//! - [`accept`], [`log_limit`]: what every listener does with failed accepts and floods of
//!   refusals.
//! - [`crds`]: the CustomResourceDefinitions of the mesh's own kinds, as the chart ships them.
pub mod accept;
pub mod admin;
pub mod agent;
pub mod api;
pub mod check;
pub mod config;
pub mod controller;
pub mod crds;
pub mod ebpf;
pub mod hbone;
pub mod identity;
pub mod log_limit;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod service;
pub mod sock_diag;
pub mod tls;
pub mod waypoint;
pub mod workload;
