//! The controller's own metrics and its monitoring endpoint (`/metrics`, `/healthz/ready`).
//!
//! Ready means: the first translation of the cluster's objects has been published, so the
//! CA can authorize and agents get a real snapshot.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Outcome of a certificate request, as counted.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SignResult {
    Signed,
    Unauthenticated,
    Denied,
    Invalid,
    Unavailable,
    Error,
}

impl SignResult {
    pub const fn as_str(self) -> &'static str {
        match self {
            SignResult::Signed => "signed",
            SignResult::Unauthenticated => "unauthenticated",
            SignResult::Denied => "denied",
            SignResult::Invalid => "invalid",
            SignResult::Unavailable => "unavailable",
            SignResult::Error => "error",
        }
    }
}

impl prometheus_client::encoding::EncodeLabelValue for SignResult {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignLabels {
    result: SignResult,
}

pub struct ControllerMetrics {
    registry: Registry,
    sign: Family<SignLabels, Counter>,
    pub agents_connected: Gauge,
    pub updates_sent: Counter,
    pub snapshots_sent: Counter,
    pub resources_rejected_by_agents: Counter,
    pub translations: Counter,
    pub objects_rejected: Gauge,
    pub resources: Gauge,
    pub ready: AtomicBool,
}

impl ControllerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let sign = Family::default();
        let agents_connected = Gauge::default();
        let updates_sent = Counter::default();
        let snapshots_sent = Counter::default();
        let resources_rejected_by_agents = Counter::default();
        let translations = Counter::default();
        let objects_rejected = Gauge::default();
        let resources = Gauge::default();
        registry.register(
            "trellis_controller_certificate_requests",
            "Certificate signing requests, by result",
            sign.clone(),
        );
        registry.register(
            "trellis_controller_agents_connected",
            "Agents and waypoints streaming configuration now",
            agents_connected.clone(),
        );
        registry.register(
            "trellis_controller_updates_sent",
            "Configuration updates sent to agents (snapshots and deltas)",
            updates_sent.clone(),
        );
        registry.register(
            "trellis_controller_snapshots_sent",
            "Full snapshots sent to agents",
            snapshots_sent.clone(),
        );
        registry.register(
            "trellis_controller_agent_rejected_resources",
            "Resources agents reported they could not apply",
            resources_rejected_by_agents.clone(),
        );
        registry.register(
            "trellis_controller_translations",
            "New mesh states published",
            translations.clone(),
        );
        registry.register(
            "trellis_controller_rejected_objects",
            "Kubernetes objects left out of the current mesh state",
            objects_rejected.clone(),
        );
        registry.register(
            "trellis_controller_resources",
            "Resources in the current mesh state",
            resources.clone(),
        );
        Self {
            registry,
            sign,
            agents_connected,
            updates_sent,
            snapshots_sent,
            resources_rejected_by_agents,
            translations,
            objects_rejected,
            resources,
            ready: AtomicBool::new(false),
        }
    }

    pub fn sign(&self, result: SignResult) {
        self.sign.get_or_create(&SignLabels { result }).inc();
    }

    pub fn sign_count(&self, result: SignResult) -> u64 {
        self.sign.get_or_create(&SignLabels { result }).get()
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ControllerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerMetrics").finish_non_exhaustive()
    }
}

/// What the monitoring surface reports on.
#[derive(Clone)]
pub struct Monitored {
    pub metrics: Arc<ControllerMetrics>,
    /// The connected agents and waypoints (`/debug/proxies`).
    pub proxies: Arc<super::proxies::Proxies>,
    /// The published state, for the version proxies are judged against.
    pub state: super::SharedState,
}

/// Serves `/metrics`, `/healthz/ready`, `/version` and `/debug/proxies` until `shutdown`.
pub async fn serve(monitored: Monitored, listener: TcpListener, shutdown: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "monitoring accept failed");
                    // Typically out of descriptors: do not spin.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let monitored = monitored.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let monitored = monitored.clone();
                async move { Ok::<_, Infallible>(route(&monitored, peer, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `/debug/` paths answer loopback clients only (`kubectl port-forward`, `kubectl exec`):
/// they name every node and waypoint, which the scrapers of `/metrics` need not know.
fn route<B>(
    monitored: &Monitored,
    peer: std::net::SocketAddr,
    req: &Request<B>,
) -> Response<Full<Bytes>> {
    let metrics = &monitored.metrics;
    match req.uri().path() {
        "/healthz/ready" if metrics.ready.load(Ordering::Relaxed) => {
            text(StatusCode::OK, "ready\n")
        }
        "/healthz/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => {
            let mut response = text(StatusCode::OK, metrics.encode());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        "/version" => crate::admin::json_response(&crate::admin::version()),
        "/debug/proxies" if !crate::state::canonical(peer.ip()).is_loopback() => text(
            StatusCode::FORBIDDEN,
            "/debug/ answers loopback clients only\n",
        ),
        "/debug/proxies" => {
            let version = monitored.state.borrow().as_ref().map(|s| s.version);
            let listing = super::proxies::Listing {
                controller: super::proxies::ControllerInfo {
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    state_version: version,
                },
                proxies: monitored.proxies.list(version),
            };
            crate::admin::json_response(&serde_json::to_value(listing).unwrap_or_default())
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}
