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
//! - [`load`]: the load generator, run in the client pod (bulk, open-loop request/response
//!   and HTTP/1.1 with HDR histograms, connection rate);
//! - [`serve`]: the sink/echo/HTTP servers in the server pods and the relay in the node
//!   namespaces.
//!
//! [`report`] turns the runs into the terminal table and the JSON file: medians over rounds
//! for rates, merged histograms for latency percentiles, ratios against no mesh and the relay
//! (for HTTP: against no mesh and Trellis at L4).
//! Nothing here asserts a speed: the figures are for people and for the issue notes.

pub mod load;
pub mod report;
pub mod run;
pub mod serve;
