//! The waypoint: an L7 proxy per namespace or service (routing, resilience, L7 policy, telemetry).
pub mod resilience;
pub mod route;
