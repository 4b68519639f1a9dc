//! The L7 model the controller, the waypoint, the admin surface and `meshctl` share: routes
//! (HTTPRoute, GRPCRoute) and traffic policies (TrafficPolicy), each compiled from the object
//! as written, with the status the controller writes back and the waypoint lists.
//!
//! - [`route`]: Gateway API routing: compile, the route table, filters, status.
//! - [`resilience`]: TrafficPolicy: compile and status, and the runtime primitives (retry
//!   budgets, breakers, outlier detection, token buckets) the waypoint's pipeline calls.
//! - [`istio`]: Istio's VirtualService and DestinationRule, translated into the two above.
//! - [`listing`]: what a waypoint lists about them in its config dump.
//!
//! The waypoint's runtime (tunnels, the request pipeline, upstreams) stays in
//! [`crate::waypoint`]; nothing here imports it.

pub mod istio;
pub mod listing;
pub mod resilience;
pub mod route;

pub use listing::L7Listing;
