//! HTTP telemetry of the waypoint: Istio's request metrics, recorded when a response's body
//! ends, and one access log event per request (written by the pipeline).
//!
//! Series: `istio_requests_total`, `istio_request_duration_milliseconds` (from the request's
//! arrival to the response's last byte; Envoy's default buckets, as Istio's),
//! `istio_request_bytes` and `istio_response_bytes` (body sizes; Istio's buckets, powers of
//! ten from 1 to 10^9). Every series carries the same labels ([`RequestLabels`]): the L4 set
//! of `crate::metrics` with `reporter="waypoint"`, `request_protocol` `http` or `grpc`, plus
//! `response_code` and `grpc_response_status` (`unknown` for plain HTTP, and for a gRPC
//! response that ended without a status). `response_flags` is [`ResponseFlags`]. None names a
//! pod, a path or a connection, so cardinality is bounded by the workloads and services that
//! talk, and by the status codes.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::{
    encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use super::{
    body::{Body, BodyBytes, BodyError},
    response_flags::ResponseFlags,
};
use crate::{
    identity::Identity,
    metrics::{PeerLabels, Reporter, SecurityPolicy, ServiceLabels},
    state::{Workload, workload::UNKNOWN},
};

/// Istio's request labels (module docs).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RequestLabels {
    pub source: PeerLabels,
    pub destination: PeerLabels,
    pub service: ServiceLabels,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// The `grpc-status` of a gRPC response, from its trailers (or its headers, for a
    /// trailers-only response).
    pub grpc_response_status: Option<u32>,
    /// Envoy-style short flags for responses the waypoint made itself; `-` for an upstream's
    /// response ([`ResponseFlags`]).
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
}

impl RequestLabels {
    /// A request from `source` (its workload, when known) proven as `source_principal`.
    pub fn new(source: Option<&Workload>, source_principal: &Identity) -> Self {
        Self {
            source: PeerLabels::of(source, Some(source_principal)),
            destination: PeerLabels::default(),
            service: ServiceLabels::default(),
            request_protocol: "http",
            response_code: 0,
            grpc_response_status: None,
            response_flags: ResponseFlags::Upstream,
            connection_security_policy: SecurityPolicy::MutualTls,
        }
    }

    pub fn with_destination(mut self, workload: Option<&Workload>) -> Self {
        self.destination = PeerLabels::of(workload, None);
        self
    }
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        crate::metrics::encode_standard(
            encoder,
            Reporter::Waypoint,
            &self.source,
            &self.destination,
            &self.service,
            self.request_protocol,
            self.response_flags.as_str(),
            self.connection_security_policy,
        )?;
        ("response_code", u64::from(self.response_code)).encode(encoder.encode_label())?;
        match self.grpc_response_status {
            Some(status) => {
                ("grpc_response_status", u64::from(status)).encode(encoder.encode_label())
            }
            None => ("grpc_response_status", UNKNOWN).encode(encoder.encode_label()),
        }
    }
}

#[derive(Clone)]
pub struct HttpMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration_ms: Family<RequestLabels, Histogram>,
    pub request_bytes: Family<RequestLabels, Histogram>,
    pub response_bytes: Family<RequestLabels, Histogram>,
}

/// Request duration buckets, in milliseconds: Envoy's defaults, which Istio's use.
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Body size buckets, in bytes: Istio's, powers of ten from 1 to 10^9.
const BYTES_BUCKETS: [f64; 10] = [1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

fn bytes_histogram() -> Histogram {
    Histogram::new(BYTES_BUCKETS)
}

impl HttpMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let duration_ms = Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        let request_bytes = Family::new_with_constructor(bytes_histogram as fn() -> Histogram);
        let response_bytes = Family::new_with_constructor(bytes_histogram as fn() -> Histogram);
        registry.register(
            "istio_requests",
            "Requests handled by the waypoint",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration at the waypoint, from the request's arrival to the response's end",
            duration_ms.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes at the waypoint",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes at the waypoint",
            response_bytes.clone(),
        );
        Self {
            requests,
            duration_ms,
            request_bytes,
            response_bytes,
        }
    }

    /// Records one finished request.
    fn record(&self, labels: &RequestLabels, duration_ms: f64, request: u64, response: u64) {
        self.requests.get_or_create(labels).inc();
        self.duration_ms.get_or_create(labels).observe(duration_ms);
        #[allow(clippy::cast_precision_loss, reason = "a histogram sample")]
        {
            self.request_bytes
                .get_or_create(labels)
                .observe(request as f64);
            self.response_bytes
                .get_or_create(labels)
                .observe(response as f64);
        }
    }

    /// `response`, recorded when its body ends (or is dropped, when the client goes away
    /// first) under `labels`, counting from `started`. `request_bytes` is the request body's
    /// count, read then.
    pub fn record_on_end(
        &self,
        labels: RequestLabels,
        started: Instant,
        request_bytes: BodyBytes,
        response: http::Response<Body>,
    ) -> http::Response<Body> {
        let grpc = labels.request_protocol == "grpc";
        let mut pending = Pending {
            metrics: self.clone(),
            labels,
            started,
            request_bytes,
            response_bytes: 0,
        };
        if grpc {
            // A trailers-only response carries its status in the head.
            pending.labels.grpc_response_status = grpc_status(response.headers());
        }
        let (parts, body) = response.into_parts();
        if body.is_end_stream() {
            // Nothing to wait for: a body already at its end may never be polled.
            pending.finish(None);
            return http::Response::from_parts(parts, body);
        }
        let recorded = Recorded {
            inner: body,
            pending: Some(pending),
            grpc,
        };
        http::Response::from_parts(parts, http_body_util::BodyExt::boxed(recorded))
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A request whose response is still streaming.
struct Pending {
    metrics: HttpMetrics,
    labels: RequestLabels,
    started: Instant,
    request_bytes: BodyBytes,
    response_bytes: u64,
}

impl Pending {
    fn finish(mut self, trailers: Option<&HeaderMap>) {
        if let Some(status) = trailers.and_then(grpc_status) {
            self.labels.grpc_response_status = Some(status);
        }
        let duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        self.metrics.record(
            &self.labels,
            duration_ms,
            self.request_bytes.get(),
            self.response_bytes,
        );
    }
}

/// A response body that records its request once it ends: at its trailers, at its last data
/// frame, at its end, at an error, or when dropped unfinished.
struct Recorded {
    inner: Body,
    pending: Option<Pending>,
    grpc: bool,
}

impl HttpBody for Recorded {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(p) = this.pending.as_mut() {
                        p.response_bytes += data.len() as u64;
                    }
                    // A gRPC response's status comes in its trailers, after the data.
                    if !this.grpc && this.inner.is_end_stream() {
                        this.finish(None);
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    this.finish(Some(trailers));
                }
            }
            Poll::Ready(Some(Err(_)) | None) => this.finish(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Recorded {
    fn finish(&mut self, trailers: Option<&HeaderMap>) {
        if let Some(pending) = self.pending.take() {
            pending.finish(trailers);
        }
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        self.finish(None);
    }
}
