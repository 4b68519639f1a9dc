//! Trellis's node-side roles. The `mesh-node` binary runs them; `meshctl` reads them.
//!
//! Code map, one line per module on what it owns (roles first, then what they share):
//!
//! - [`agent`]: the per-node proxy and datapath owner: cgroups, enrollment, the state task.
//! - [`controller`]: the control plane: CA service and config distribution to agents.
//! - [`waypoint`]: the L7 proxy per namespace or service (its runtime).
//! - [`l7`]: the L7 model the controller, the waypoint, the admin surface and `meshctl` share:
//!   routes and traffic policies, compiled from the objects as written, with their status.
//! - [`control_plane`]: the client side of the control plane that the agent and the waypoint
//!   share: the channel to the controller, the bearer token, the discovery feed, start-up.
//! - [`state`]: the mesh as a node sees it: the [`state::MeshState`] snapshot every listener
//!   reads, and its parts (workloads, services, waypoints, nodes) converted at the boundary.
//! - [`policy`]: authorization policies and the per-connection decision.
//! - [`proxy`]: the node proxy's listeners: inbound, outbound, the HBONE pool, copying, the
//!   address local pods' connections are opened from.
//! - [`hbone`]: the HBONE wire both ends agree on, driven on `h2`: handshakes, CONNECT
//!   streams (resets stay resets), keepalive, the control-frame flood guard.
//! - [`identity`], [`tls`]: SPIFFE identities, certificates and their store, TLS for HBONE.
//! - [`config`]: the configuration files of the agent, the waypoint and the controller.
//! - [`ebpf`]: the kernel datapath: loading and pinning it, enrollment, connection tracking,
//!   the client-address return path, probes of the node.
//! - [`sock_diag`]: aborting sockets through sock_diag.
//! - [`admin`], [`metrics`]: the admin surfaces (health, readiness, metrics, config dump) and
//!   the metrics they serve, with [`metrics::FailureReason`], the failure reason label set.
//! - [`accept`], [`log_limit`]: what every listener does with failed accepts and floods of
//!   refusals.
//! - [`k8s`]: the Kubernetes contract: every label, class name, API group and field manager the
//!   mesh reads or writes, the custom resources and route specs as written, and the CRDs.
//! - [`api`]: the control plane's wire types.
//! - [`check`]: pre-flight checks of the node.
pub mod accept;
pub mod admin;
pub mod agent;
pub mod api;
pub mod check;
pub mod config;
pub mod control_plane;
pub mod controller;
pub mod ebpf;
pub mod hbone;
pub mod identity;
pub mod k8s;
pub mod l7;
pub mod log_level;
pub mod log_limit;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod sock_diag;
pub mod state;
pub mod tls;
pub mod waypoint;
