//! One body type for everything the waypoint sends: streamed from a peer, buffered for a
//! retry or a mirror, or written locally (an error status).

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};

pub type BodyError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BodyError>;

/// A peer's body, streamed as it arrives.
pub fn streamed(body: hyper::body::Incoming) -> Body {
    body.map_err(|e| Box::new(e) as BodyError).boxed()
}

/// A body held in memory.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    full(Bytes::new())
}
