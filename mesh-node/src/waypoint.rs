//! `mesh-node waypoint`: the L7 proxy for the services and pods that opt in
//! (`trellis.dev/use-waypoint`).
//!
//! Source agents send the connections of opted-in destinations here over HBONE, with the
//! original destination as the CONNECT authority. The waypoint terminates the tunnel as its
//! own identity, parses HTTP (HTTP/1.1, HTTP/2, gRPC), applies the L7 behaviour the
//! destination asks for, and sends each request over HBONE to the chosen endpoint's node
//! agent, again as itself. Its own pods are not enrolled, so its connections are never
//! redirected back into a node proxy (loop protection by construction).
//!
//! ```text
//! controller stream (role waypoint) -> state task -> ArcSwap<MeshState>
//! HBONE :15008 -> server (tunnel per client connection) -> forward (per request) -> upstream
//! ```

pub mod body;
pub mod forward;
pub mod l7;
pub mod replay;
pub mod response_flags;
pub mod server;
pub mod telemetry;
pub mod trace;
pub mod upstream;

use std::{collections::HashSet, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use l7::{L7, Rejections};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{self, AdminState, Surface},
    config::{
        ConfigError,
        waypoint::{Limits, WaypointConfig},
    },
    control_plane::{
        bootstrap, channel,
        feed::{self, Applied, Resource, Resources},
    },
    identity::{
        CertStore, Identity,
        store::{CertManager, Prefetched, StoreError},
    },
    metrics::{Direction, Metrics},
    policy::{
        Engine, Policy,
        jwt::{FetchSettings, JwksFetcher},
    },
    proxy::{ClientAddr, pool::Pool},
    state::{MeshState, Service, WaypointRef, Workload},
    tls::{self, TlsError},
};

#[derive(Debug, thiserror::Error)]
pub enum WaypointError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot prepare the waypoint certificate store: {0}")]
    Certs(#[from] StoreError),
    #[error(transparent)]
    ControlPlane(#[from] channel::ChannelError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Tracing(#[from] trace::export::ExportError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl From<bootstrap::BootstrapError> for WaypointError {
    fn from(e: bootstrap::BootstrapError) -> Self {
        match e {
            bootstrap::BootstrapError::Channel(e) => Self::ControlPlane(e),
            bootstrap::BootstrapError::Certs(e) => Self::Certs(e),
        }
    }
}

/// Where a tunnel was going: a service (its VIP and port) or one pod, either of which names
/// this waypoint.
#[derive(Clone, Debug)]
pub struct Target {
    /// The CONNECT authority: what the application dialled.
    pub addr: SocketAddr,
    pub service: Option<Arc<Service>>,
    /// Set when the application dialled a pod directly.
    pub workload: Option<Arc<Workload>>,
}

impl Target {
    /// `dst` if it is a service port or a pod that uses waypoint `me`; `None` otherwise.
    pub fn classify(mesh: &MeshState, me: &WaypointRef, dst: SocketAddr) -> Option<Self> {
        if let Some(service) = mesh.service_by_vip(dst.ip()) {
            let served =
                service.waypoint.as_ref() == Some(me) && service.port(dst.port()).is_some();
            return served.then(|| Self {
                addr: dst,
                service: Some(service.clone()),
                workload: None,
            });
        }
        let workload = mesh.workload_by_ip(dst.ip())?;
        (workload.waypoint.as_ref() == Some(me)).then(|| Self {
            addr: dst,
            service: None,
            workload: Some(workload.clone()),
        })
    }
}

/// What every listener and request of the waypoint shares.
pub struct WaypointInputs {
    pub me: WaypointRef,
    pub identity: Identity,
    pub mesh: Arc<ArcSwap<MeshState>>,
    /// Routes, resilience and end-user authentication, compiled with each state.
    pub l7: Arc<ArcSwap<L7>>,
    pub certs: Arc<CertStore>,
    pub server_tls: Arc<rustls::ServerConfig>,
    pub upstreams: upstream::Upstreams,
    pub metrics: Arc<Metrics>,
    pub http: telemetry::HttpMetrics,
    pub limits: Limits,
    /// Access-log events per source (the node defaults: a waypoint has no such setting).
    pub access_log: Arc<crate::log_limit::AccessLogLimit>,
    /// Span export, when a collector is configured.
    pub spans: Option<trace::export::Spans>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

/// Pending connections the HBONE listener may queue.
const LISTEN_BACKLOG: u32 = 1024;

fn bind(what: &'static str, addr: SocketAddr) -> Result<tokio::net::TcpListener, WaypointError> {
    crate::proxy::listen(addr, LISTEN_BACKLOG).map_err(|source| WaypointError::Bind {
        what,
        addr,
        source,
    })
}

/// Runs the waypoint until `shutdown` is cancelled, then drains.
pub async fn run(config: WaypointConfig, shutdown: CancellationToken) -> Result<(), WaypointError> {
    let identity = config.identity()?;
    let me = WaypointRef {
        namespace: config.namespace.clone(),
        name: config.gateway.clone(),
    };
    let provider = tls::provider();
    let cp = &config.control_plane;
    let bootstrap::Remote {
        certs,
        channel,
        token,
        issuer,
    } = bootstrap::connect(cp, &config.trust_domain, &provider)?;
    let cert_manager = CertManager::new(
        certs.clone(),
        issuer,
        Duration::from_secs(config.certificate_ttl_secs),
    );
    let server_tls = Arc::new(tls::server_config(
        provider,
        certs.roots().clone(),
        &config.trust_domain,
        certs.clone(),
    )?);

    let hbone_listener = bind("hbone", config.listen.hbone)?;
    let admin_listener = bind("admin", config.listen.admin)?;
    let metrics_listener = match config.listen.metrics {
        Some(addr) => Some(bind("metrics", addr)?),
        None => None,
    };
    let readiness_listener = match config.listen.readiness {
        Some(addr) => Some(bind("readiness", addr)?),
        None => None,
    };

    let mesh = Arc::new(ArcSwap::from_pointee(MeshState::empty("")));
    let mut metrics = Metrics::new();
    let http = telemetry::HttpMetrics::register(metrics.registry_mut());
    let (spans, exporter) = match &config.tracing {
        Some(tracing) => {
            let source = trace::export::Source {
                namespace: config.namespace.clone(),
                gateway: config.gateway.clone(),
                identity: identity.to_string(),
            };
            let (spans, exporter) =
                trace::export::exporter(tracing, &source, metrics.registry_mut())?;
            (Some(spans), Some(exporter))
        }
        None => (None, None),
    };
    let metrics = Arc::new(metrics);
    let connect_timeout = Duration::from_millis(config.limits.connect_timeout_ms);
    let l7 = Arc::new(ArcSwap::from_pointee(L7::default()));
    let pool = Arc::new(Pool::new(
        connect_timeout,
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
    ));
    let connector = upstream::HboneConnector {
        state: mesh.clone(),
        l7: l7.clone(),
        certs: certs.clone(),
        pool: pool.clone(),
        identity: identity.clone(),
        local: config.listen.hbone,
    };
    let tasks = TaskTracker::new();
    let inputs = Arc::new(WaypointInputs {
        me: me.clone(),
        identity: identity.clone(),
        mesh: mesh.clone(),
        l7: l7.clone(),
        certs: certs.clone(),
        server_tls,
        upstreams: upstream::Upstreams::new(connector),
        metrics: metrics.clone(),
        http,
        limits: config.limits.clone(),
        access_log: Arc::new(crate::log_limit::AccessLogLimit::new(
            crate::config::DEFAULT_ACCESS_LOG_PER_SOURCE_PER_SEC,
            crate::config::DEFAULT_ACCESS_LOG_BURST,
        )),
        spans,
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
    });
    // The exporter outlives the drain, so the spans of requests finishing during it go out.
    let export_stop = CancellationToken::new();
    let export_task = exporter.map(|exporter| tokio::spawn(exporter.run(export_stop.clone())));

    let mut listeners = tokio::task::JoinSet::new();
    listeners.spawn(accept_loop(inputs.clone(), hbone_listener));
    listeners.spawn({
        let (certs, shutdown) = (certs.clone(), shutdown.clone());
        async move { pool.keep_swept(&certs, shutdown).await }
    });

    let status = Arc::new(ArcSwap::from_pointee(feed::FeedStatus {
        address: cp.address.to_string(),
        ..Default::default()
    }));
    let admin = Arc::new(AdminState {
        state: mesh.clone(),
        certs: certs.clone(),
        metrics,
        datapath: None,
        feed: Some(status.clone()),
        ready: false.into(),
        l7: Some(Box::new({
            let l7 = l7.clone();
            move || l7.load().dump()
        })),
    });
    admin::serve_all(
        &admin,
        [
            (Surface::Admin, Some(admin_listener)),
            (Surface::Metrics, metrics_listener),
            (Surface::Readiness, readiness_listener),
        ],
        &mut listeners,
        &shutdown,
    );

    // Its one certificate, whatever the state says.
    let (_keep, wanted) = watch::channel(());
    let (prefetched, first_cert) = oneshot::channel();
    let own: HashSet<Identity> = [identity.clone()].into();
    // Ready only once it is held: a waypoint that answered its readiness probe without its
    // certificate would refuse every handshake (the controller may not list its pods yet).
    listeners.spawn(cert_manager.follow(
        wanted,
        move |(): &()| Some(own.clone()),
        (prefetched, Prefetched::Held),
        shutdown.clone(),
    ));

    let (applied_tx, applied_rx) = mpsc::channel(1);
    let (first_state_tx, first_state) = oneshot::channel();
    listeners.spawn(state_task(
        mesh.clone(),
        l7,
        cp.root_namespace.clone(),
        applied_rx,
        first_state_tx,
        shutdown.clone(),
    ));
    listeners.spawn(
        feed::Feed {
            node: String::new(),
            role: "waypoint",
            trust_domain: config.trust_domain.clone(),
            channel,
            token,
            status,
            applied: applied_tx,
            backoff: feed::default_backoff(),
        }
        .run(shutdown.clone()),
    );
    listeners.spawn({
        let admin = admin.clone();
        let hbone = config.listen.hbone;
        async move {
            if first_state.await.is_ok() && first_cert.await.is_ok() {
                admin
                    .ready
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(waypoint = %me, %hbone, "waypoint ready");
            }
        }
    });

    shutdown.cancelled().await;
    admin
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    listeners.shutdown().await;
    tasks.close();
    let drain = Duration::from_secs(config.drain_timeout_secs);
    if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
        tracing::warn!(
            open = tasks.len(),
            "drain deadline reached; closing remaining connections"
        );
    }
    export_stop.cancel();
    if let (Some(task), Some(tracing)) = (export_task, &config.tracing) {
        // Its final flush is bounded by one export timeout; this only guards against a bug.
        let bound = Duration::from_millis(tracing.export_timeout_ms) + Duration::from_secs(1);
        let _ = tokio::time::timeout(bound, task).await;
    }
    tracing::info!("waypoint stopped");
    Ok(())
}

async fn accept_loop(inputs: Arc<WaypointInputs>, listener: tokio::net::TcpListener) {
    let mut backoff = crate::accept::Backoff::new("hbone");
    loop {
        let accepted = tokio::select! {
            () = inputs.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, client)) => {
                backoff.reset();
                let _ = stream.set_nodelay(true);
                let inputs2 = inputs.clone();
                inputs.tasks.spawn(async move {
                    let _active = inputs2.metrics.active(Direction::Inbound);
                    server::handle(inputs2.clone(), stream, ClientAddr(client)).await;
                });
            }
            Err(e) => backoff.failed(&e).await,
        }
    }
}

/// The single writer of the waypoint's state: every applied update becomes a new snapshot.
async fn state_task(
    mesh: Arc<ArcSwap<MeshState>>,
    l7: Arc<ArcSwap<L7>>,
    root_namespace: String,
    mut applied: mpsc::Receiver<Applied>,
    first: oneshot::Sender<()>,
    shutdown: CancellationToken,
) {
    let mut first = Some(first);
    let fetcher = JwksFetcher::http(FetchSettings::default());
    let mut rejections = Rejections::new();
    loop {
        let update = tokio::select! {
            () = shutdown.cancelled() => return,
            update = applied.recv() => update,
        };
        let Some(update) = update else { return };
        let state = build_state(&update.resources, &root_namespace);
        let next = L7::build(
            &update.resources,
            &state,
            &root_namespace,
            &l7.load(),
            &fetcher,
            &mut rejections,
        );
        mesh.store(Arc::new(state));
        l7.store(Arc::new(next));
        tracing::debug!(version = update.version, "waypoint state published");
        let _ = update.done.send(());
        if let Some(first) = first.take() {
            let _ = first.send(());
        }
    }
}

/// The mesh as the waypoint sees it: no node of its own, every workload remote.
fn build_state(resources: &Resources, root_namespace: &str) -> MeshState {
    let mut workloads = Vec::new();
    let mut nodes = Vec::new();
    let mut services = Vec::new();
    let mut waypoints = Vec::new();
    let mut authorization = Vec::new();
    let mut peer_authentication = Vec::new();
    for resource in resources.values() {
        match resource {
            Resource::Workload(w) => workloads.push(w.clone()),
            Resource::Node(n) => nodes.push(n.clone()),
            Resource::Service(s) => services.push(s.clone()),
            Resource::Waypoint(w) => waypoints.push(w.clone()),
            Resource::Policy(p) => match &**p {
                Policy::Authorization(p) => authorization.push(p.clone()),
                Policy::PeerAuthentication(p) => peer_authentication.push(p.clone()),
                Policy::RequestAuthentication(_) => {}
            },
            Resource::Route(_) => {}
        }
    }
    let mut state = MeshState::build("", workloads, nodes, services, |_| None);
    state.set_waypoints(waypoints);
    state.set_policy(Arc::new(Engine::new(
        root_namespace,
        authorization,
        peer_authentication,
    )));
    state
}
