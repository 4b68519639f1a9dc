//! `cargo xtask bench`: Trellis against the same testbed without a mesh and with a trivial
//! userspace relay, and (HTTP) Trellis at L4 against Trellis through a waypoint, measured in
//! one invocation.
//!
//! The `bench` binary (tests/src/bin/bench.rs) is both the orchestrator and the programs it
//! starts inside the testbed:
//! - [`run`]: builds a 2-node testbed, starts the servers, then for each round brings up each
//!   configuration in turn (no mesh, relay floor, Trellis, Trellis with a waypoint; the order
//!   rotates per round so none always runs first), runs every selected scenario x test that
//!   applies to it and tears it down;
//! - [`catalog`]: the configurations, scenarios and tests, their parameters and `--only`;
//! - [`load`]: the load generator, run in the client pod (bulk both ways, open-loop
//!   request/response and HTTP/1.1 with HDR histograms, closed-loop ping-pong, connection
//!   rate, held idle connections);
//! - [`serve`]: the sink/source/echo/HTTP servers in the server pods and the relay in the node
//!   namespaces;
//! - [`cpu`]: CPU accounting around each run (proxy processes, whole machine, eBPF programs);
//! - [`peer`]: `--peer`, another node proxy measured as one more configuration.
//!
//! [`report`] turns the runs into the JSON report (medians over rounds for rates, merged
//! histograms for latency percentiles, ratios against no mesh and the relay; for HTTP against
//! no mesh and Trellis at L4) and [`table`] that into the terminal tables.
//! Nothing here asserts a speed: the figures are for people and for the issue notes.

pub mod catalog;
pub mod cpu;
pub mod load;
pub mod peer;
pub mod report;
pub mod run;
pub mod serve;
pub mod table;
