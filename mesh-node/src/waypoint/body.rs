//! One body type for everything the waypoint sends: streamed from a peer, buffered for a
//! retry or a mirror, or written locally (an error status).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};

pub type BodyError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BodyError>;

/// An upstream's body, streamed as it arrives.
pub fn streamed(body: hyper::body::Incoming) -> Body {
    body.map_err(|e| Box::new(e) as BodyError).boxed()
}

/// A client's request body failed while the waypoint forwarded it (malformed chunked
/// framing, or the client went away): the request's fault, never the endpoint's.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed: {0}")]
pub struct ClientBodyError(#[source] hyper::Error);

/// The bytes of a request body read so far (shared with the body as it streams).
#[derive(Clone, Debug, Default)]
pub struct BodyBytes(Arc<AtomicU64>);

impl BodyBytes {
    pub fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A client's request body, streamed as it arrives; its errors are [`ClientBodyError`]s. The
/// bytes read are added to `count` (the request's size in its metrics), when given.
pub fn from_client(body: hyper::body::Incoming, count: Option<BodyBytes>) -> Body {
    body.map_frame(move |frame| {
        if let (Some(count), Some(data)) = (&count, frame.data_ref()) {
            count.add(data.len());
        }
        frame
    })
    .map_err(|e| Box::new(ClientBodyError(e)) as BodyError)
    .boxed()
}

/// Whether `e` (or one of its sources) is a [`ClientBodyError`].
pub fn is_client_body_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    let mut depth = 0;
    while let Some(err) = next
        && depth < 16
    {
        if err.is::<ClientBodyError>() {
            return true;
        }
        next = err.source();
        depth += 1;
    }
    false
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
