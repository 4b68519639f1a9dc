//! `mesh-node agent`: the per-node proxy and owner of the datapath.
//!
//! Start-up order matters: certificates for local workloads are issued and every listener is
//! bound before the datapath is (re)attached, so redirected connections always find a proxy
//! ready for them. On shutdown the listeners stop, open connections drain up to a deadline, and
//! the pinned datapath stays in place for the next agent.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{self, AdminState, Surface},
    config::{AgentConfig, ConfigError, parse_cidr},
    ebpf::{Datapath, DatapathSpec, EbpfError},
    identity::{CertStore, LocalCa, ca::CaError, store::StoreError},
    metrics::{DatapathStats, Direction, Metrics},
    proxy::{self, ProxyInputs, Settings, pool::Pool},
    tls::{self, TlsError},
    workload::MeshState,
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("cannot prepare workload certificates: {0}")]
    Certs(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("datapath: {0}")]
    Datapath(#[from] EbpfError),
}

impl DatapathStats for Datapath {
    fn stats(&self) -> Vec<(&'static str, u64)> {
        Datapath::stats(self)
    }
}

/// Pending connections each listener may queue. Every pod of the node connects through one
/// outbound listener, so bursts of connects are normal; the kernel caps it at somaxconn.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AgentError> {
    let bind = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }?;
        // As TcpListener::bind does: a restarted agent must rebind while old connections linger.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bind().map_err(|source| AgentError::Bind { what, addr, source })
}

/// Runs the agent until `shutdown` is cancelled, then drains.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let provider = tls::provider();
    let ca = LocalCa::load(&config.ca.cert, &config.ca.key)?;
    let certs = Arc::new(CertStore::new(
        ca,
        provider.clone(),
        &config.trust_domain,
        Duration::from_secs(config.certificate_ttl_secs),
    )?);
    let state = MeshState::from_config(&config)?;
    certs.reconcile(&state.local_identities())?;
    let state = Arc::new(ArcSwap::from_pointee(state));
    let server_tls = Arc::new(tls::server_config(
        provider,
        certs.roots().clone(),
        &config.trust_domain,
        certs.clone(),
    )?);

    // Listeners before the datapath: once programs redirect, someone must be there.
    let outbound4 = bind("outbound", config.listen.outbound).await?;
    let outbound6 = match config.listen.outbound6 {
        Some(addr) => Some(bind("outbound6", addr).await?),
        None => None,
    };
    let hbone = bind("hbone", config.listen.hbone).await?;
    let admin_listener = bind("admin", config.listen.admin).await?;
    let metrics_listener = match config.listen.metrics {
        Some(addr) => Some(bind("metrics", addr).await?),
        None => None,
    };
    let readiness_listener = match config.listen.readiness {
        Some(addr) => Some(bind("readiness", addr).await?),
        None => None,
    };

    let spec = DatapathSpec {
        cgroup_root: config.datapath.cgroup_root.clone(),
        pin_dir: config.datapath.pin_dir.clone(),
        outbound4: config.listen.outbound,
        outbound6: config.listen.outbound6,
        excluded_ports: config.datapath.excluded_ports.clone(),
        excluded_nets: config
            .datapath
            .excluded_cidrs
            .iter()
            .filter_map(|c| parse_cidr(c).ok())
            .collect(),
    };
    let datapath = Arc::new(Datapath::install(&spec, state.load().local_cgroups())?);

    let mut metrics = Metrics::new();
    metrics.register_datapath(datapath.clone());
    let metrics = Arc::new(metrics);
    let tasks = TaskTracker::new();
    let inputs = Arc::new(ProxyInputs {
        state: state.clone(),
        certs: certs.clone(),
        original_dst: datapath.conntrack(),
        metrics: metrics.clone(),
        pool: Pool::new(Duration::from_millis(config.outbound.connect_timeout_ms)),
        server_tls,
        settings: Settings {
            connect_timeout: Duration::from_millis(config.outbound.connect_timeout_ms),
            handshake_timeout: Duration::from_millis(config.inbound.handshake_timeout_ms),
            unknown_destination: config.outbound.unknown_destination,
            max_streams_per_connection: config.inbound.max_streams_per_connection,
        },
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
    });

    let mut listeners = tokio::task::JoinSet::new();
    listeners.spawn(proxy::accept_loop(
        inputs.clone(),
        outbound4,
        Direction::Outbound,
        proxy::outbound::handle,
    ));
    if let Some(listener) = outbound6 {
        listeners.spawn(proxy::accept_loop(
            inputs.clone(),
            listener,
            Direction::Outbound,
            proxy::outbound::handle,
        ));
    }
    listeners.spawn(proxy::accept_loop(
        inputs.clone(),
        hbone,
        Direction::Inbound,
        proxy::inbound::handle,
    ));

    let admin = Arc::new(AdminState {
        state: state.clone(),
        certs: certs.clone(),
        metrics,
        datapath: Some(datapath.clone()),
        ready: false.into(),
    });
    listeners.spawn(admin::serve(
        admin.clone(),
        admin_listener,
        Surface::Admin,
        shutdown.clone(),
    ));
    if let Some(listener) = metrics_listener {
        listeners.spawn(admin::serve(
            admin.clone(),
            listener,
            Surface::Metrics,
            shutdown.clone(),
        ));
    }
    if let Some(listener) = readiness_listener {
        listeners.spawn(admin::serve(
            admin.clone(),
            listener,
            Surface::Readiness,
            shutdown.clone(),
        ));
    }
    listeners.spawn(renew_certificates(certs, state, shutdown.clone()));

    admin
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(node = %config.node, outbound = %config.listen.outbound, hbone = %config.listen.hbone, "agent ready");

    shutdown.cancelled().await;
    admin
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    listeners.shutdown().await;
    tasks.close();
    let drain = Duration::from_secs(config.drain_timeout_secs);
    tracing::info!(
        open = tasks.len(),
        deadline_secs = drain.as_secs(),
        "draining connections"
    );
    if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
        tracing::warn!(
            open = tasks.len(),
            "drain deadline reached; closing remaining connections"
        );
    }
    tracing::info!("agent stopped; datapath left pinned for the next agent");
    Ok(())
}

/// Renews certificates at half life. On failure, keeps the current ones (still valid) and
/// retries with a bounded backoff.
async fn renew_certificates(
    certs: Arc<CertStore>,
    state: Arc<ArcSwap<MeshState>>,
    shutdown: CancellationToken,
) {
    const MIN_WAIT: Duration = Duration::from_secs(1);
    const MAX_WAIT: Duration = Duration::from_secs(3600);
    let mut backoff = MIN_WAIT;
    loop {
        let wait = match certs.next_renewal() {
            Some(at) => at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default()
                .clamp(MIN_WAIT, MAX_WAIT),
            None => MAX_WAIT,
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait.max(backoff)) => {}
        }
        match certs.reconcile(&state.load().local_identities()) {
            Ok(()) => backoff = MIN_WAIT,
            Err(e) => {
                backoff = (backoff * 2).min(Duration::from_secs(60));
                tracing::error!(error = %e, retry_in_secs = backoff.as_secs(), "certificate renewal failed; keeping current certificates");
            }
        }
    }
}
