//! The client side of the control plane, shared by the agent and the waypoint (and read by
//! the admin surface and the certificate manager): the TLS channel to the controller and the
//! node's bearer token ([`channel`]), the discovery feed that turns the controller's stream
//! into converted resources for the role's state task ([`feed`]), and the start-up both roles
//! share (roots, certificate store, channel, token, CA client: [`bootstrap`]).
//!
//! ```text
//! channel (TLS, lazily connected) --+--> feed: Discovery.Stream -> Resources -> state task
//!            bearer token ----------+--> CA client (identity::store::RemoteCa)
//! ```

pub mod bootstrap;
pub mod channel;
pub mod feed;
