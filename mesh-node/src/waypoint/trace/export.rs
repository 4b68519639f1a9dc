//! Span export over OTLP/gRPC: one span per sampled request, batched and sent to a collector.
//!
//! The request path never waits for the collector: it hands a finished span to a bounded
//! queue ([`Spans::record`]) and moves on. One task owns the queue and the gRPC channel; it
//! sends a batch when it is full or when its oldest span has waited `flush_interval_ms`, and
//! each send is bounded by `export_timeout_ms`. A full queue, a failed send or spans the
//! collector refuses are dropped and counted (`trellis_spans_dropped_total{reason}`), never
//! retried: telemetry must not grow the waypoint's memory or delay its traffic when the
//! collector is slow or gone. On shutdown the task sends what is queued, once, within one
//! timeout.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use super::TraceContext;
use crate::config::waypoint::TracingConfig;

/// Longest string attribute kept; longer values (paths and authorities are the client's) are
/// cut at a character boundary, so a span's size is bounded whatever the request carried.
const MAX_ATTRIBUTE_BYTES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("tracing.otlp_endpoint {endpoint:?} is not usable: {source}")]
    Endpoint {
        endpoint: String,
        source: tonic::transport::Error,
    },
}

/// Why spans did not reach the collector.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    /// `queue_full`, `export_failed` or `rejected` (refused by the collector).
    reason: &'static str,
}

#[derive(Clone)]
struct SpanMetrics {
    exported: Counter,
    dropped: Family<DropLabels, Counter>,
}

impl SpanMetrics {
    fn register(registry: &mut Registry) -> Self {
        let exported = Counter::default();
        let dropped = Family::<DropLabels, Counter>::default();
        registry.register(
            "trellis_spans_exported",
            "Spans the OTLP collector accepted",
            exported.clone(),
        );
        registry.register(
            "trellis_spans_dropped",
            "Spans not exported, by reason",
            dropped.clone(),
        );
        Self { exported, dropped }
    }

    fn drop(&self, reason: &'static str, count: u64) {
        self.dropped
            .get_or_create(&DropLabels { reason })
            .inc_by(count);
    }
}

/// One finished request as the waypoint saw it.
#[derive(Debug)]
pub struct RequestSpan {
    pub trace: TraceContext,
    pub name: String,
    pub start: SystemTime,
    pub duration: Duration,
    /// `(key, value)` pairs; values are cut to [`MAX_ATTRIBUTE_BYTES`].
    pub attributes: Vec<(&'static str, Attribute)>,
    /// Set for responses that count as errors (5xx), with the waypoint's reason if it made
    /// the response itself.
    pub error: Option<String>,
}

#[derive(Debug)]
pub enum Attribute {
    Str(String),
    Int(i64),
}

impl From<&str> for Attribute {
    fn from(value: &str) -> Self {
        Self::Str(truncate(value).to_owned())
    }
}

impl From<String> for Attribute {
    fn from(mut value: String) -> Self {
        let keep = truncate(&value).len();
        value.truncate(keep);
        Self::Str(value)
    }
}

impl From<i64> for Attribute {
    fn from(value: i64) -> Self {
        Self::Int(value)
    }
}

fn truncate(value: &str) -> &str {
    if value.len() <= MAX_ATTRIBUTE_BYTES {
        return value;
    }
    let mut end = MAX_ATTRIBUTE_BYTES;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// The request path's handle on the exporter: sampling and hand-off, never blocking.
#[derive(Clone)]
pub struct Spans {
    tx: mpsc::Sender<RequestSpan>,
    sampling_percent: f64,
    metrics: SpanMetrics,
}

impl Spans {
    /// Whether a trace the waypoint starts itself is sampled.
    pub fn sample_new(&self, rng: &mut fastrand::Rng) -> bool {
        rng.f64() * 100.0 < self.sampling_percent
    }

    /// Queues a finished span for export; drops it (counted) when the queue is full.
    pub fn record(&self, span: RequestSpan) {
        match self.tx.try_send(span) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.metrics.drop("queue_full", 1),
            // The exporter has stopped: the waypoint is shutting down.
            Err(TrySendError::Closed(_)) => {}
        }
    }
}

/// Who exports: the resource every span is attributed to.
#[derive(Clone, Debug)]
pub struct Source {
    /// The Gateway's namespace and name.
    pub namespace: String,
    pub gateway: String,
    /// The waypoint's SPIFFE identity.
    pub identity: String,
}

// Ours rather than the OpenTelemetry SDK's batch processor: that one reports its drops only in
// a log line at shutdown, with no count by reason, and reads its limits from OTEL_BSP_* too.
/// The exporter task, ready to be spawned.
pub struct Exporter {
    rx: mpsc::Receiver<RequestSpan>,
    client: TraceServiceClient<Channel>,
    resource: Resource,
    metrics: SpanMetrics,
    max_batch: usize,
    flush_interval: Duration,
    timeout: Duration,
    endpoint: String,
}

/// Builds the request path's handle and the task that exports (to be spawned). The channel
/// to the collector connects lazily: a collector that is not up yet delays nothing.
pub fn exporter(
    config: &TracingConfig,
    source: &Source,
    registry: &mut Registry,
) -> Result<(Spans, Exporter), ExportError> {
    let timeout = Duration::from_millis(config.export_timeout_ms);
    let channel = Endpoint::from_shared(config.otlp_endpoint.clone())
        .map_err(|source| ExportError::Endpoint {
            endpoint: config.otlp_endpoint.clone(),
            source,
        })?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_lazy();
    let metrics = SpanMetrics::register(registry);
    let (tx, rx) = mpsc::channel(config.max_queued_spans);
    let spans = Spans {
        tx,
        sampling_percent: config.sampling_percent,
        metrics: metrics.clone(),
    };
    let exporter = Exporter {
        rx,
        client: TraceServiceClient::new(channel),
        resource: resource(source),
        metrics,
        max_batch: config.max_batch_spans,
        flush_interval: Duration::from_millis(config.flush_interval_ms),
        timeout,
        endpoint: config.otlp_endpoint.clone(),
    };
    Ok((spans, exporter))
}

impl Exporter {
    /// Sends batches until `shutdown`, then what is still queued, once.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut healthy = true;
        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => break,
                span = self.rx.recv() => span,
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            let flush_at = tokio::time::Instant::now() + self.flush_interval;
            while batch.len() < self.max_batch {
                tokio::select! {
                    () = tokio::time::sleep_until(flush_at) => break,
                    () = shutdown.cancelled() => break,
                    span = self.rx.recv() => match span {
                        Some(span) => batch.push(span),
                        None => break,
                    },
                }
            }
            self.send(batch, &mut healthy).await;
        }
        // Shutting down: what is queued goes out in batches, all within one timeout.
        self.rx.close();
        let mut rest = Vec::new();
        while let Ok(span) = self.rx.try_recv() {
            rest.push(span);
        }
        let timeout = self.timeout;
        let flush = async {
            while !rest.is_empty() {
                let tail = rest.split_off(rest.len().saturating_sub(self.max_batch));
                self.send(tail, &mut healthy).await;
            }
        };
        let _ = tokio::time::timeout(timeout, flush).await;
    }

    async fn send(&mut self, batch: Vec<RequestSpan>, healthy: &mut bool) {
        let count = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "trellis-waypoint".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: batch.into_iter().map(to_otlp).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let result = tokio::time::timeout(self.timeout, self.client.export(request)).await;
        let error = match result {
            Ok(Ok(response)) => {
                let rejected = response
                    .into_inner()
                    .partial_success
                    .filter(|p| p.rejected_spans > 0 || !p.error_message.is_empty());
                let refused = rejected.as_ref().map_or(0, |p| {
                    u64::try_from(p.rejected_spans).unwrap_or(0).min(count)
                });
                if let Some(partial) = rejected {
                    tracing::warn!(
                        endpoint = %self.endpoint,
                        rejected = partial.rejected_spans,
                        message = %partial.error_message,
                        "the collector refused some spans"
                    );
                }
                self.metrics.exported.inc_by(count - refused);
                self.metrics.drop("rejected", refused);
                if !*healthy {
                    tracing::info!(endpoint = %self.endpoint, "span export works again");
                    *healthy = true;
                }
                return;
            }
            Ok(Err(status)) => {
                format!("collector answered {}: {}", status.code(), status.message())
            }
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        self.metrics.drop("export_failed", count);
        // One warning when export starts failing, not one per batch while it stays down.
        if *healthy {
            tracing::warn!(
                endpoint = %self.endpoint,
                %error,
                dropped = count,
                "span export failed; spans are dropped until the collector answers"
            );
            *healthy = false;
        } else {
            tracing::debug!(endpoint = %self.endpoint, %error, dropped = count, "span export failed");
        }
    }
}

fn resource(source: &Source) -> Resource {
    Resource {
        attributes: vec![
            key_value(
                "service.name",
                Attribute::Str(format!("{}.{}", source.gateway, source.namespace)),
            ),
            key_value("k8s.namespace.name", source.namespace.as_str().into()),
            key_value("trellis.role", "waypoint".into()),
            key_value("trellis.identity", source.identity.as_str().into()),
        ],
        ..Default::default()
    }
}

fn key_value(key: &str, value: Attribute) -> KeyValue {
    let value = match value {
        Attribute::Str(s) => any_value::Value::StringValue(s),
        Attribute::Int(i) => any_value::Value::IntValue(i),
    };
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn to_otlp(span: RequestSpan) -> Span {
    let start = unix_nanos(span.start);
    let end = start.saturating_add(u64::try_from(span.duration.as_nanos()).unwrap_or(u64::MAX));
    Span {
        trace_id: span.trace.trace_id.to_vec(),
        span_id: span.trace.span_id.to_vec(),
        parent_span_id: span.trace.parent_id.map(|p| p.to_vec()).unwrap_or_default(),
        flags: u32::from(span.trace.flags),
        name: span.name,
        kind: SpanKind::Server as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: end,
        attributes: span
            .attributes
            .into_iter()
            .map(|(k, v)| key_value(k, v))
            .collect(),
        status: Some(match span.error {
            Some(message) => Status {
                message,
                code: StatusCode::Error as i32,
            },
            None => Status {
                message: String::new(),
                code: StatusCode::Unset as i32,
            },
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_attributes_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_ATTRIBUTE_BYTES);
        let Attribute::Str(cut) = Attribute::from(long.as_str()) else {
            panic!("a string stays a string");
        };
        assert!(cut.len() <= MAX_ATTRIBUTE_BYTES && cut.len() >= MAX_ATTRIBUTE_BYTES - 1);
        assert!(cut.chars().all(|c| c == 'é'));
        let Attribute::Str(owned) = Attribute::from("/a".repeat(1000)) else {
            panic!("a string stays a string");
        };
        assert_eq!(owned.len(), MAX_ATTRIBUTE_BYTES);
    }

    #[test]
    fn a_request_span_becomes_an_otlp_server_span_with_its_parent() {
        let trace = TraceContext {
            trace_id: [7; 16],
            span_id: [8; 8],
            parent_id: Some([9; 8]),
            flags: 1,
        };
        let start = UNIX_EPOCH + Duration::from_secs(1_000);
        let span = to_otlp(RequestSpan {
            trace,
            name: "GET web.default.svc.cluster.local".into(),
            start,
            duration: Duration::from_millis(3),
            attributes: vec![("http.response.status_code", 503.into())],
            error: Some("no ready endpoint".into()),
        });
        assert_eq!(span.trace_id, vec![7; 16]);
        assert_eq!(span.parent_span_id, vec![9; 8]);
        assert_eq!(span.kind, SpanKind::Server as i32);
        assert_eq!(
            span.end_time_unix_nano - span.start_time_unix_nano,
            3_000_000
        );
        assert_eq!(span.status.map(|s| s.code), Some(StatusCode::Error as i32));
        assert_eq!(span.attributes[0].key, "http.response.status_code");
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let config = TracingConfig {
            otlp_endpoint: "http://127.0.0.1:9".into(),
            sampling_percent: 100.0,
            max_queued_spans: 2,
            max_batch_spans: 2,
            flush_interval_ms: 1000,
            export_timeout_ms: 1000,
        };
        let source = Source {
            namespace: "default".into(),
            gateway: "waypoint".into(),
            identity: "spiffe://cluster.local/ns/default/sa/waypoint".into(),
        };
        let mut registry = Registry::default();
        let (spans, _exporter) = exporter(&config, &source, &mut registry).expect("exporter");
        assert!(spans.sample_new(&mut fastrand::Rng::new()));
        for _ in 0..5 {
            spans.record(RequestSpan {
                trace: TraceContext {
                    trace_id: [1; 16],
                    span_id: [2; 8],
                    parent_id: None,
                    flags: 1,
                },
                name: "GET x".into(),
                start: SystemTime::now(),
                duration: Duration::ZERO,
                attributes: Vec::new(),
                error: None,
            });
        }
        assert_eq!(
            spans
                .metrics
                .dropped
                .get_or_create(&DropLabels {
                    reason: "queue_full"
                })
                .get(),
            3
        );
    }
}
