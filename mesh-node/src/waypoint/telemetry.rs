//! HTTP telemetry of the waypoint: Istio's request metrics and one access log event per
//! request.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use super::response_flags::ResponseFlags;
use crate::{
    identity::Identity,
    metrics::{Reporter, SecurityPolicy},
    state::Workload,
};

/// Istio's request labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// Envoy-style short flags for responses the waypoint made itself; `-` for an upstream's
    /// response ([`ResponseFlags`]).
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
}

impl RequestLabels {
    pub fn new(source: Option<&Workload>, source_principal: &Identity) -> Self {
        Self {
            reporter: Reporter::Waypoint,
            source_workload: source.map(|w| w.name.clone()).unwrap_or_default(),
            source_workload_namespace: source.map(|w| w.namespace.clone()).unwrap_or_default(),
            source_principal: source_principal.to_string(),
            destination_workload: String::new(),
            destination_workload_namespace: String::new(),
            destination_principal: String::new(),
            destination_service: String::new(),
            destination_service_name: String::new(),
            destination_service_namespace: String::new(),
            request_protocol: "http",
            response_code: 0,
            response_flags: ResponseFlags::Upstream,
            connection_security_policy: SecurityPolicy::MutualTls,
        }
    }

    /// The destination Service's hostname, else `fallback` (what the client addressed).
    pub fn destination_service_or<'a>(&'a self, fallback: &'a str) -> &'a str {
        if self.destination_service.is_empty() {
            fallback
        } else {
            &self.destination_service
        }
    }

    pub fn with_destination(mut self, workload: Option<&Workload>) -> Self {
        if let Some(w) = workload {
            self.destination_workload = w.name.clone();
            self.destination_workload_namespace = w.namespace.clone();
            self.destination_principal = w.identity.to_string();
        }
        self
    }
}

#[derive(Clone)]
pub struct HttpMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration_ms: Family<RequestLabels, Histogram>,
}

/// Request duration buckets, in milliseconds (Istio's defaults).
const DURATION_BUCKETS_MS: [f64; 14] = [
    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0,
];

impl HttpMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let duration_ms =
            Family::<RequestLabels, Histogram>::new_with_constructor(|| -> Histogram {
                Histogram::new(DURATION_BUCKETS_MS)
            });
        registry.register(
            "istio_requests",
            "Requests handled by the waypoint",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration at the waypoint, until the response head",
            duration_ms.clone(),
        );
        Self {
            requests,
            duration_ms,
        }
    }

    pub fn record(&self, labels: &RequestLabels, duration_ms: f64) {
        self.requests.get_or_create(labels).inc();
        self.duration_ms.get_or_create(labels).observe(duration_ms);
    }
}
