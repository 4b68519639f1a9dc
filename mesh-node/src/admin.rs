//! The agent's HTTP admin surface: health, readiness, metrics and the config dump.
//!
//! One router, served on up to three listeners: the admin port (loopback; everything), the
//! metrics port (`/metrics`) and the readiness port (`/healthz/ready`). Waypoints serve the
//! same surface; their dump also lists their routing objects ([`L7Dump`]).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    control_plane::feed::FeedStatus, ebpf::Datapath, identity::CertStore, l7::L7Listing,
    metrics::Metrics, state::MeshState,
};

/// What the admin endpoints report on.
pub struct AdminState {
    pub state: Arc<ArcSwap<MeshState>>,
    pub certs: Arc<CertStore>,
    pub metrics: Arc<Metrics>,
    pub datapath: Option<Arc<Datapath>>,
    /// The control plane feed's status, in live mode.
    pub feed: Option<Arc<ArcSwap<FeedStatus>>>,
    pub ready: AtomicBool,
    /// What a waypoint adds to the config dump about its L7 configuration ([`L7Dump`]);
    /// agents have none.
    pub l7: Option<Box<dyn Fn() -> L7Dump + Send + Sync>>,
}

/// What a waypoint adds to its config dump, from one L7 snapshot: its routing objects with
/// their status (`routes` and `traffic_policies`) and the rest of its L7 configuration (`l7`).
#[derive(Debug, Clone)]
pub struct L7Dump {
    /// `None` until the waypoint has built its first state.
    pub listing: Option<Arc<L7Listing>>,
    pub details: serde_json::Value,
}

/// Connections one admin surface serves at once; more are closed on accept. Probes and scrapes
/// need a handful.
const MAX_OPEN_PER_SURFACE: usize = 64;

/// Which routes a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Surface {
    Admin,
    Metrics,
    Readiness,
}

impl Surface {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Metrics => "metrics",
            Self::Readiness => "readiness",
        }
    }
}

/// Serves each surface that has a listener, as tasks of `tasks`, until `shutdown`.
pub fn serve_all(
    admin: &Arc<AdminState>,
    surfaces: [(Surface, Option<TcpListener>); 3],
    tasks: &mut tokio::task::JoinSet<()>,
    shutdown: &CancellationToken,
) {
    for (surface, listener) in surfaces {
        if let Some(listener) = listener {
            tasks.spawn(serve(admin.clone(), listener, surface, shutdown.clone()));
        }
    }
}

pub async fn serve(
    admin: Arc<AdminState>,
    listener: TcpListener,
    surface: Surface,
    shutdown: CancellationToken,
) {
    let mut backoff = crate::accept::Backoff::new(surface.as_str());
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_OPEN_PER_SURFACE));
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            },
        };
        backoff.reset();
        // A flood of requests to one surface cannot take descriptors the others need.
        let Ok(permit) = open.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, surface, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(admin: &AdminState, surface: Surface, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (surface, path) {
        (Surface::Admin, "/healthz") => text(StatusCode::OK, "ok\n"),
        (Surface::Admin, "/ready") | (Surface::Admin | Surface::Readiness, "/healthz/ready") => {
            if admin.ready.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (Surface::Admin | Surface::Metrics, "/metrics") => {
            let mut response = text(StatusCode::OK, admin.metrics.encode());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        (Surface::Admin, "/policy/explain") => {
            explain(admin, req.uri().query().unwrap_or_default())
        }
        (Surface::Admin, "/config_dump") => {
            let body = serde_json::to_string_pretty(&config_dump(admin)).unwrap_or_default();
            let mut response = text(StatusCode::OK, body);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        (Surface::Admin, "/logging") => logging(req),
        (Surface::Admin, "/version") => json_response(&version()),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// This build's version, as `/version` reports it (agents and waypoints; the controller
/// serves the same document).
pub fn version() -> serde_json::Value {
    serde_json::json!({"version": env!("CARGO_PKG_VERSION")})
}

/// `value` as a JSON response (the agents' and waypoints' admin surface, and the controller's
/// monitoring surface).
pub fn json_response(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::OK, format!("{value}\n"));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// `GET /logging`: the log filter in force. `POST /logging?level=<filter>`: replaces it (the
/// `RUST_LOG` syntax), with no restart. Served on the loopback admin port only.
fn logging<B>(req: &Request<B>) -> Response<Full<Bytes>> {
    use crate::log_level::{self, LogLevelError};
    let answer = |result: Result<String, LogLevelError>| match result {
        Ok(filter) => json_response(&serde_json::json!({"level": filter})),
        Err(e @ LogLevelError::NotInstalled) => text(StatusCode::NOT_IMPLEMENTED, format!("{e}\n")),
        Err(e @ LogLevelError::Reload(_)) => {
            text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
        }
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    match *req.method() {
        http::Method::GET => answer(log_level::current()),
        http::Method::POST => {
            let level = req.uri().query().and_then(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .find(|(k, _)| k == "level")
                    .map(|(_, v)| v.into_owned())
            });
            let Some(level) = level else {
                return text(StatusCode::BAD_REQUEST, "missing ?level=<filter>\n");
            };
            answer(log_level::set(&level).map(|()| {
                tracing::info!(level, "log filter changed");
                level
            }))
        }
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET or POST\n"),
    }
}

fn config_dump(admin: &AdminState) -> serde_json::Value {
    let state = admin.state.load_full();
    let now = SystemTime::now();
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut certificates: Vec<_> = admin
        .certs
        .snapshot()
        .values()
        .map(|c| {
            serde_json::json!({
                "identity": c.identity.to_string(),
                "serial": c.serial,
                "not_before": secs(c.not_before),
                "not_after": secs(c.not_after),
                "expires_in_secs": c.not_after.duration_since(now).map_or(0, |d| d.as_secs()),
                "renew_at": secs(c.renew_at()),
            })
        })
        .collect();
    certificates.sort_by(|a, b| a["identity"].as_str().cmp(&b["identity"].as_str()));
    let mut nodes: Vec<_> = state.nodes().cloned().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let datapath = admin.datapath.as_ref().map(|d| {
        serde_json::json!({
            "pin_dir": d.pin_dir().display().to_string(),
            "maps": d.map_ids().into_iter().map(|(name, id)| serde_json::json!({"name": name, "id": id})).collect::<Vec<_>>(),
            "enrolled_cgroups": state.local_cgroups().iter().map(|c| serde_json::json!({
                "path": c.path.display().to_string(),
                "id": c.id,
                "inbound_mtls": if c.inbound.strict { "STRICT" } else { "PERMISSIVE" },
                "inbound_mtls_ports": c.inbound.ports.iter().map(|(port, strict)| (port.to_string(), if *strict { "STRICT" } else { "PERMISSIVE" })).collect::<std::collections::BTreeMap<_, _>>(),
            })).collect::<Vec<_>>(),
            "pending_cgroups": state.pending_cgroups().iter().map(|w| serde_json::json!({"uid": w.uid, "namespace": w.namespace, "name": w.name})).collect::<Vec<_>>(),
            "events": d.stats().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            // Counted entry by entry: a tracking map near its capacity evicts live entries.
            "tracked": d.conntrack().tracked(),
            "tracked_capacity": mesh_common::MAX_TRACKED_CONNECTIONS,
        })
    });
    let control_plane = admin.feed.as_ref().map(|f| FeedStatus::clone(&f.load()));
    let l7 = admin.l7.as_ref().map(|dump| dump());
    let listing = l7.as_ref().and_then(|l| l.listing.as_deref());
    serde_json::json!({
        "node": state.local_node(),
        "trust_domain": admin.certs.trust_domain(),
        "mode": if admin.feed.is_some() { "control_plane" } else { "static" },
        "ready": admin.ready.load(Ordering::Relaxed),
        "control_plane": control_plane,
        "nodes": nodes,
        "workloads": state.workloads().iter().map(std::convert::AsRef::as_ref).collect::<Vec<_>>(),
        "services": state.services().iter().map(std::convert::AsRef::as_ref).collect::<Vec<_>>(),
        "waypoints": state.waypoints().into_iter().map(std::convert::AsRef::as_ref).collect::<Vec<_>>(),
        "policies": state.policy().listing,
        "routes": listing.map(|l| &l.routes),
        "traffic_policies": listing.map(|l| &l.traffic_policies),
        "destination_rules": listing.map(|l| &l.destination_rules),
        "certificates": certificates,
        "certificate_errors": admin.certs.failures().as_ref(),
        "datapath": datapath,
        "l7": l7.as_ref().map(|l| &l.details),
    })
}

/// `/policy/explain?from=NS/POD&to=NS/POD:PORT`: see [`crate::policy::explain`].
fn explain(admin: &AdminState, query: &str) -> Response<Full<Bytes>> {
    let mut from = None;
    let mut to = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "from" => from = Some(value.into_owned()),
            "to" => to = Some(value.into_owned()),
            _ => {}
        }
    }
    let (Some(from), Some(to)) = (from, to) else {
        return text(
            StatusCode::BAD_REQUEST,
            "both from=NAMESPACE/POD and to=NAMESPACE/POD:PORT are required\n",
        );
    };
    match crate::policy::explain::explain(&admin.state.load(), &from, &to) {
        Ok(explanation) => {
            let mut response = text(
                StatusCode::OK,
                serde_json::to_string_pretty(&explanation).unwrap_or_default(),
            );
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

/// Binds an admin listener, naming it in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
