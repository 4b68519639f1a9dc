//! Request bodies that can be sent more than once: for retries and mirrors.
//!
//! The body is never read ahead: each try streams it to the upstream as the client sends it,
//! and what passes is recorded, up to a limit. A retry replays the record and then continues
//! from the client, so a request can be retried whether or not its body was complete when the
//! try failed, as long as no more than the limit had been read. Beyond the limit the record
//! is dropped and the request can no longer be sent again. Waiting for a whole body before
//! sending would stall streaming calls (a gRPC client that waits for an answer before sending
//! its next message) and add latency to every request.
//!
//! One try reads at a time: starting the next one ends the previous one's body with an error,
//! so an abandoned try (a timeout) cannot steal the client's data from its successor.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use parking_lot::{Mutex, MutexGuard};

use super::body::{Body, BodyError};

/// A request body shared by the tries of one request.
#[derive(Clone)]
pub struct Replayable {
    log: Arc<Mutex<Log>>,
}

struct Log {
    /// The client's body, until it ends or fails.
    source: Option<Body>,
    /// Data read so far, in order, while it fits the limit.
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    trailers: Option<HeaderMap>,
    /// The client's body ended cleanly.
    ended: bool,
    /// More than `limit` was read, or the client's body failed: no replay.
    lost: bool,
    /// The try allowed to read.
    current: u64,
    /// `Content-Length` of the client's body, when exact.
    exact_len: Option<u64>,
}

impl Replayable {
    pub fn new(body: Body, limit: usize) -> Self {
        let ended = body.is_end_stream();
        let exact_len = body.size_hint().exact();
        Self {
            log: Arc::new(Mutex::new(Log {
                source: (!ended).then_some(body),
                chunks: Vec::new(),
                len: 0,
                limit,
                trailers: None,
                ended,
                lost: false,
                current: 0,
                exact_len,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        // A poisoned lock only means a panic elsewhere mid-update; the log stays consistent
        // enough to refuse a replay (`lost` is set before anything is dropped).
        self.log.lock()
    }

    /// Whether a next try can still send the whole body.
    pub fn replayable(&self) -> bool {
        !self.lock().lost
    }

    /// The body for the next try, which supersedes every earlier one; `None` when the body
    /// cannot be sent again.
    pub fn next_try(&self) -> Option<Body> {
        let mut log = self.lock();
        if log.lost {
            return None;
        }
        log.current += 1;
        let body = TryBody {
            log: self.log.clone(),
            generation: log.current,
            next_chunk: 0,
            sent: 0,
            trailers_sent: false,
        };
        Some(http_body_util::BodyExt::boxed(body))
    }

    /// The whole body, when the client has sent all of it within the limit (for a mirror).
    pub fn complete(&self) -> Option<(Bytes, Option<HeaderMap>)> {
        let log = self.lock();
        if !log.ended || log.lost {
            return None;
        }
        let mut whole = bytes::BytesMut::with_capacity(log.len);
        for chunk in &log.chunks {
            whole.extend_from_slice(chunk);
        }
        Some((whole.freeze(), log.trailers.clone()))
    }
}

/// One try's view of the body: the record from the start, then the client's body.
struct TryBody {
    log: Arc<Mutex<Log>>,
    generation: u64,
    next_chunk: usize,
    sent: u64,
    trailers_sent: bool,
}

#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error("the request was sent again; this try no longer reads its body")]
    Superseded,
    #[error("the request body could not be kept for another try")]
    Lost,
}

impl HttpBody for TryBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let mut log = this.log.lock();
        if log.current != this.generation {
            return Poll::Ready(Some(Err(Box::new(ReplayError::Superseded))));
        }
        if let Some(chunk) = log.chunks.get(this.next_chunk).cloned() {
            this.next_chunk += 1;
            this.sent += chunk.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if this.next_chunk < log.chunks.len() || (log.lost && this.sent < log.len as u64) {
            // Data this try has not sent was dropped from the record.
            return Poll::Ready(Some(Err(Box::new(ReplayError::Lost))));
        }
        if log.ended {
            if !this.trailers_sent
                && let Some(trailers) = log.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            return Poll::Ready(None);
        }
        let Some(source) = log.source.as_mut() else {
            return Poll::Ready(Some(Err(Box::new(ReplayError::Lost))));
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                log.ended = true;
                log.source = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                log.lost = true;
                log.source = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                    log.len += data.len();
                    if log.lost || log.len > log.limit {
                        log.lost = true;
                        log.chunks = Vec::new();
                    } else {
                        log.chunks.push(data.clone());
                        this.next_chunk = log.chunks.len();
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    log.trailers = Some(trailers.clone());
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let log = self.log.lock();
        log.current == self.generation
            && log.ended
            && self.next_chunk >= log.chunks.len()
            && (self.trailers_sent || log.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let log = self.log.lock();
        match log.exact_len {
            Some(total) => SizeHint::with_exact(total.saturating_sub(self.sent)),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    fn chunks(parts: &[&'static str]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BodyError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    async fn read_all(body: Body) -> Result<Vec<u8>, BodyError> {
        Ok(body.collect().await?.to_bytes().to_vec())
    }

    #[tokio::test]
    async fn a_retry_sends_the_whole_body_again() {
        let body = Replayable::new(chunks(&["hello ", "world"]), 64);
        let first = body.next_try().expect("first try");
        assert_eq!(read_all(first).await.expect("first"), b"hello world");
        let second = body.next_try().expect("replayable");
        assert_eq!(read_all(second).await.expect("second"), b"hello world");
        assert_eq!(
            body.complete().map(|(b, _)| b),
            Some(Bytes::from_static(b"hello world"))
        );
    }

    #[tokio::test]
    async fn a_retry_after_a_partial_read_replays_then_continues_from_the_client() {
        let body = Replayable::new(chunks(&["a", "b", "c"]), 64);
        let mut first = body.next_try().expect("first try");
        let frame = first.frame().await.expect("a frame").expect("data");
        assert_eq!(
            frame.data_ref().map(std::convert::AsRef::as_ref),
            Some(&b"a"[..])
        );
        let second = body.next_try().expect("replayable");
        // The abandoned try may not read on: its successor owns the client's body.
        assert!(first.frame().await.expect("an error").is_err());
        assert_eq!(read_all(second).await.expect("second"), b"abc");
    }

    #[tokio::test]
    async fn a_body_larger_than_the_limit_is_streamed_once_and_never_replayed() {
        let body = Replayable::new(chunks(&["0123456789", "0123456789"]), 15);
        let first = body.next_try().expect("first try");
        assert_eq!(read_all(first).await.expect("first").len(), 20);
        assert!(!body.replayable());
        assert!(body.next_try().is_none());
        assert!(body.complete().is_none());
    }

    #[tokio::test]
    async fn an_empty_body_is_complete_before_any_try() {
        let body = Replayable::new(super::super::body::empty(), 64);
        assert_eq!(body.complete().map(|(b, _)| b.len()), Some(0));
        let first = body.next_try().expect("first try");
        assert!(first.is_end_stream());
    }

    #[tokio::test]
    async fn a_failed_client_body_is_not_replayed() {
        let frames: Vec<Result<Frame<Bytes>, BodyError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"x"))),
            Err("client reset".into()),
        ];
        let body = Replayable::new(
            StreamBody::new(futures_util::stream::iter(frames)).boxed(),
            64,
        );
        let first = body.next_try().expect("first try");
        assert!(read_all(first).await.is_err());
        assert!(body.next_try().is_none());
    }

    #[tokio::test]
    async fn trailers_are_replayed_after_the_data() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames: Vec<Result<Frame<Bytes>, BodyError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"m"))),
            Ok(Frame::trailers(trailers.clone())),
        ];
        let body = Replayable::new(
            StreamBody::new(futures_util::stream::iter(frames)).boxed(),
            64,
        );
        let first = body.next_try().expect("first try");
        let collected = first.collect().await.expect("first");
        assert_eq!(collected.trailers(), Some(&trailers));
        let second = body.next_try().expect("second try");
        let collected = second.collect().await.expect("second");
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes().as_ref(), b"m");
    }
}
