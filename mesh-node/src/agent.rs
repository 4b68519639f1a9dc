//! `mesh-node agent`: the per-node proxy and owner of the datapath.
//!
//! Start-up order matters: certificates for local workloads are issued and every listener is
//! bound before the datapath is (re)attached, so redirected connections always find a proxy
//! ready for them. On shutdown the listeners stop, open connections drain up to a deadline, and
//! the pinned datapath stays in place for the next agent.
//!
//! In live mode (`control_plane`) the state starts empty and the tasks below keep it:
//!
//! ```text
//! feed (stream, resources) -> state_task (MeshState, cgroups) -> ArcSwap (proxy reads)
//!                                                            -> watch -> enrollment (eBPF map)
//!                                                                     -> certificates (CA service)
//! ```
//!
//! Each task is the only writer of what it owns. The agent is ready once the first snapshot is
//! applied and enrolled; until then the pinned enrollment of a previous agent stays, and its
//! redirected connections are refused rather than let out of the mesh.

pub mod cgroups;
pub mod enrollment;
pub mod plaintext;
pub mod return_path;
pub mod state_task;
#[cfg(test)]
mod tests;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{self, AdminState, Surface},
    config::{AgentConfig, ConfigError, SourceAddress, parse_cidr},
    control_plane::{bootstrap, channel, feed},
    ebpf::{Datapath, DatapathSpec, EbpfError, ReturnPath},
    identity::{
        CertStore, Identity,
        ca::CaError,
        store::{CertManager, IssueError, Issuer, StoreError},
    },
    log_limit::AccessLogLimit,
    metrics::{DatapathStats, Direction, Metrics},
    proxy::{
        self, ProxyInputs, Settings,
        copy::Timeouts,
        limits::{Caps, Limits},
        pool::Pool,
        transparent::SourcePolicy,
    },
    state::MeshState,
    tls::{self, TlsError},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("cannot prepare workload certificates: {0}")]
    Certs(#[from] StoreError),
    #[error("cannot issue the certificate of {identity}: {source}")]
    Issue {
        identity: Identity,
        source: IssueError,
    },
    #[error(transparent)]
    ControlPlane(#[from] channel::ChannelError),
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
    #[error("this node cannot run the datapath: {0} (run `meshctl check --pre` for details)")]
    Preflight(String),
}

impl From<bootstrap::BootstrapError> for AgentError {
    fn from(e: bootstrap::BootstrapError) -> Self {
        match e {
            bootstrap::BootstrapError::Channel(e) => Self::ControlPlane(e),
            bootstrap::BootstrapError::Certs(e) => Self::Certs(e),
        }
    }
}

impl DatapathStats for Datapath {
    fn stats(&self) -> Vec<(&'static str, u64)> {
        Datapath::stats(self)
    }

    fn program_runs(&self) -> Vec<crate::metrics::ProgramRuns> {
        Datapath::program_runs(self)
    }
}

/// Pending connections each listener may queue. Every pod of the node connects through one
/// outbound listener, so bursts of connects are normal; the kernel caps it at somaxconn.
const LISTEN_BACKLOG: u32 = 4096;

/// Connections per HBONE peer: as configured, else one per core the agent may use (the
/// runtime has as many worker threads), so one peer's traffic can use every core.
fn hbone_spread(outbound: &crate::config::OutboundConfig) -> usize {
    outbound
        .hbone_connections_per_peer
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(1, std::num::NonZeroUsize::get)
}

#[allow(
    clippy::result_large_err,
    reason = "once per listener at startup; the error carries the address for the operator"
)]
fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AgentError> {
    proxy::listen(addr, LISTEN_BACKLOG).map_err(|source| AgentError::Bind { what, addr, source })
}

/// How the state and certificates are sourced.
enum Source {
    /// Everything from the file, signed by a local CA.
    Static,
    /// The controller's feed.
    Live {
        channel: tonic::transport::Channel,
        token: channel::BearerToken,
        address: crate::config::ControllerAddress,
        root_namespace: String,
    },
}

/// Runs the agent until `shutdown` is cancelled, then drains.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    // First of all: a value the datapath cannot take (more exclusions than its maps hold)
    // must be refused before a pinned map that the previous agent's programs still read is
    // rewritten, whoever built this configuration.
    config.validate()?;
    let provider = tls::provider();
    let ttl = Duration::from_secs(config.certificate_ttl_secs);
    let (source, certs, issuer, initial) = match (&config.ca, &config.control_plane) {
        (Some(ca), _) => {
            // Checked again here (the file may have changed since it was loaded), and still
            // before any listener or pinned map is touched.
            let ca = ca.load()?;
            let certs = Arc::new(CertStore::new(
                provider.clone(),
                std::slice::from_ref(ca.cert_der()),
                &config.trust_domain,
            )?);
            let state = Arc::new(MeshState::from_config(&config)?);
            (Source::Static, certs, Issuer::Local(ca), Some(state))
        }
        (None, Some(cp)) => {
            let bootstrap::Remote {
                certs,
                channel,
                token,
                issuer,
            } = bootstrap::connect(cp, &config.trust_domain, &provider)?;
            let source = Source::Live {
                channel,
                token,
                address: cp.address.clone(),
                root_namespace: cp.root_namespace.clone(),
            };
            (source, certs, issuer, None)
        }
        (None, None) => {
            return Err(AgentError::Config(crate::config::invalid(
                "ca",
                "one of ca or control_plane is required",
            )));
        }
    };
    let mut cert_manager = CertManager::new(certs.clone(), issuer, ttl);
    if let Some(state) = &initial {
        // Static mode: every local certificate exists before the first pod is redirected.
        if let Some((identity, source)) = cert_manager
            .reconcile(&state.local_identities())
            .await
            .into_iter()
            .next()
        {
            return Err(AgentError::Issue { identity, source });
        }
    }
    let state = Arc::new(ArcSwap::new(
        initial
            .clone()
            .unwrap_or_else(|| Arc::new(MeshState::empty(&config.node))),
    ));
    let (publish, states) = watch::channel(initial.clone());
    let server_tls = Arc::new(tls::server_config(
        provider,
        certs.roots().clone(),
        &config.trust_domain,
        certs.clone(),
    )?);

    // Listeners before the datapath: once programs redirect, someone must be there.
    let outbound4 = bind("outbound", config.listen.outbound)?;
    let outbound6 = match config.listen.outbound6 {
        Some(addr) => Some(bind("outbound6", addr)?),
        None => None,
    };
    let hbone = bind("hbone", config.listen.hbone)?;
    let admin_listener = bind("admin", config.listen.admin)?;
    let metrics_listener = match config.listen.metrics {
        Some(addr) => Some(bind("metrics", addr)?),
        None => None,
    };
    let readiness_listener = match config.listen.readiness {
        Some(addr) => Some(bind("readiness", addr)?),
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
        program_stats: config.datapath.program_stats,
    };
    // Refuse to start, before touching the kernel, where the datapath cannot work.
    let preflight = crate::check::run(&crate::check::Environment {
        cgroup_root: spec.cgroup_root.clone(),
        pin_dir: spec.pin_dir.clone(),
        proc_root: "/proc".into(),
        // Datapath::install verifies every program before it attaches any.
        probe_programs: false,
    });
    for finding in preflight
        .findings
        .iter()
        .filter(|f| f.level == crate::check::Level::Warn)
    {
        tracing::warn!(code = finding.code, check = finding.check, detail = %finding.detail, hint = finding.hint.as_deref().unwrap_or_default(), "pre-flight warning");
    }
    if preflight.failed() {
        return Err(AgentError::Preflight(preflight.failures()));
    }
    let (datapath, enroller) =
        Datapath::install(&spec, initial.as_deref().map(MeshState::local_cgroups))?;
    let datapath = Arc::new(datapath);

    // Pods see their clients' addresses only where replies can come back (see
    // `proxy::transparent`); without the return path every connection comes from the node.
    let return_path = match config.inbound.source_address {
        SourceAddress::Node => None,
        SourceAddress::Client => {
            match ReturnPath::install(&datapath.pin_dir().join("maps")).await {
                Ok(mut return_path) => {
                    // The pods known at start are covered before the agent serves them.
                    if let Some(initial) = initial.as_deref() {
                        return_path
                            .sync(&return_path::local_pod_ips(initial), true)
                            .await;
                    }
                    Some(return_path)
                }
                Err(e) => {
                    tracing::error!(error = %e, "client addresses cannot be kept: pods see connections from the node");
                    None
                }
            }
        }
    };
    let pod_source = SourcePolicy {
        return_path: return_path
            .as_ref()
            .map(|r| r.deliveries() as Arc<dyn crate::proxy::transparent::ReturnPath>),
    };

    let mut metrics = Metrics::new();
    metrics.register_datapath(datapath.clone());
    let metrics = Arc::new(metrics);
    let tasks = TaskTracker::new();
    let inputs = Arc::new(ProxyInputs {
        state: state.clone(),
        certs: certs.clone(),
        original_dst: datapath.conntrack(),
        metrics: metrics.clone(),
        pool: Pool::new(
            Duration::from_millis(config.outbound.connect_timeout_ms),
            hbone_spread(&config.outbound),
        )
        .single_use(config.outbound.hbone_single_use),
        server_tls,
        settings: Settings {
            connect_timeout: Duration::from_millis(config.outbound.connect_timeout_ms),
            handshake_timeout: Duration::from_millis(config.inbound.handshake_timeout_ms),
            unknown_destination: config.outbound.unknown_destination,
            max_streams_per_connection: config.inbound.max_streams_per_connection,
            timeouts: Timeouts {
                idle: Duration::from_secs(config.limits.idle_timeout_secs),
                half_close: Duration::from_secs(config.limits.half_close_timeout_secs),
            },
        },
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
        authorized: Arc::default(),
        limits: Limits::new(caps(&config.limits)),
        access_log: Arc::new(AccessLogLimit::new(
            config.limits.access_log_per_source_per_sec,
            config.limits.access_log_burst,
        )),
        source: pod_source,
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

    let feed_status = match &source {
        Source::Static => None,
        Source::Live { address, .. } => Some(Arc::new(ArcSwap::from_pointee(feed::FeedStatus {
            address: address.to_string(),
            ..Default::default()
        }))),
    };
    let admin = Arc::new(AdminState {
        state: state.clone(),
        certs: certs.clone(),
        metrics,
        datapath: Some(datapath.clone()),
        feed: feed_status.clone(),
        ready: false.into(),
        l7: None,
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
    let (prefetched, first_certs) = oneshot::channel();
    listeners.spawn(cert_manager.run(states.clone(), prefetched, shutdown.clone()));
    listeners.spawn(crate::proxy::inbound::reauthorize(
        inputs.clone(),
        states.clone(),
        shutdown.clone(),
    ));
    listeners.spawn({
        let (inputs, shutdown) = (inputs.clone(), shutdown.clone());
        async move { inputs.pool.keep_swept(&inputs.certs, shutdown).await }
    });
    let deliveries = return_path.as_ref().map(ReturnPath::deliveries);
    if let Some(return_path) = return_path {
        listeners.spawn(return_path::run(
            return_path,
            states.clone(),
            shutdown.clone(),
        ));
    }
    listeners.spawn(plaintext::run(
        states.clone(),
        inputs.metrics.clone(),
        deliveries,
        shutdown.clone(),
    ));
    let (synced, first_sync) = oneshot::channel();
    listeners.spawn(enrollment::run(
        enroller,
        states.clone(),
        synced,
        shutdown.clone(),
    ));
    if let (
        Source::Live {
            channel,
            token,
            root_namespace,
            ..
        },
        Some(status),
    ) = (source, feed_status)
    {
        let (applied_tx, applied_rx) = mpsc::channel(1);
        let state_task = state_task::StateTask {
            local_node: config.node.clone(),
            root_namespace,
            state: state.clone(),
            publish,
            cgroups: cgroups::CgroupDiscovery::new(config.datapath.cgroup_root.clone()),
            applied: applied_rx,
        };
        listeners.spawn(state_task.run(shutdown.clone()));
        let feed = feed::Feed {
            node: config.node.clone(),
            role: "agent",
            trust_domain: config.trust_domain.clone(),
            channel,
            token,
            status,
            applied: applied_tx,
            backoff: feed::default_backoff(),
        };
        listeners.spawn(feed.run(shutdown.clone()));
        tracing::info!(node = %config.node, "waiting for the first state from the control plane");
    } else {
        // Static mode: the state never changes, but its followers must keep their receiver.
        listeners.spawn({
            let shutdown = shutdown.clone();
            async move {
                shutdown.cancelled().await;
                drop(publish);
            }
        });
    }
    listeners.spawn({
        let admin = admin.clone();
        let node = config.node.clone();
        let (outbound, hbone) = (config.listen.outbound, config.listen.hbone);
        async move {
            // Ready once the first state is enrolled and its certificates were requested.
            if first_sync.await.is_ok() && first_certs.await.is_ok() {
                admin
                    .ready
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(%node, %outbound, %hbone, "agent ready");
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

/// The connection caps, the node-wide one fitted under this process's descriptor limit.
fn caps(limits: &crate::config::LimitsConfig) -> Caps {
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1_024, |(soft, _)| soft);
    let caps = Caps {
        connections: limits.effective_max_connections(nofile),
        per_pod: limits.max_connections_per_pod,
        handshakes: limits.max_pending_handshakes,
    };
    tracing::info!(
        max_connections = caps.connections,
        max_connections_per_pod = caps.per_pod,
        max_pending_handshakes = caps.handshakes,
        nofile,
        "connection limits"
    );
    caps
}
