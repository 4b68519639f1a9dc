//! `mesh-node controller`: the control plane.
//!
//! One pipeline: a source ([`files`] or [`kube_source`]) publishes [`ClusterObjects`]
//! snapshots; [`translate`] turns each into mesh state; the result is published (with an
//! increasing version) to the two gRPC services on one TLS port:
//! - [`ca`]: signs agents' certificate requests for the identities of their own node's pods,
//!   and waypoints' requests for their own identity;
//! - [`discovery`]: streams the mesh state to every agent and waypoint, snapshot then deltas
//!   (waypoints also receive the routing objects, agents never do).
//!
//! The status of what the controller reads is reported by [`policy_status`] (the policies'
//! and TrafficPolicies' `Accepted` condition) and [`route_status`] (the routes' parents).
//!
//! The configuration file is [`ControllerConfig`] (`config/controller.rs`). Both services
//! authenticate callers through [`auth`]: a node agent by its node, a waypoint by its
//! service account (see [`translate::waypoint`] for what makes a waypoint). The CA's root is loaded from files, or
//! generated and persisted on first start. The controller serves TLS with a certificate it
//! issues itself from that root (see [`serving_names`]), so agents verify it with the same
//! trust bundle they verify each other with.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    api::v1::{
        certificate_authority_server::CertificateAuthorityServer, discovery_server::DiscoveryServer,
    },
    config::{
        self, ConfigError,
        controller::{CaLocation, SourceConfig},
    },
    identity::{Identity, LocalCa, ca::CaError},
};

pub mod auth;
pub mod ca;
pub mod ca_store;
pub mod discovery;
pub mod files;
pub mod kube_source;
pub mod metrics;
pub mod objects;
pub mod policy_status;
pub mod proxies;
pub mod route_status;
pub mod translate;

// The controller's configuration file lives in `config`, beside the agent's and the waypoint's.
pub use objects::ClusterObjects;
pub use translate::{TranslateSettings, Translation, translate};

use self::{
    auth::{AnyOf, Authenticator, BootstrapTokens, TokenReview},
    metrics::ControllerMetrics,
};
pub use crate::config::controller::ControllerConfig;

/// The namespace and service account the controller's own serving certificate names.
pub const CONTROLLER_NAMESPACE: &str = "trellis-system";
pub const CONTROLLER_SERVICE_ACCOUNT: &str = "controller";
/// The in-cluster DNS name of the controller's Service; always in the serving certificate.
pub const CONTROLLER_DNS_NAME: &str = "trellis-controller.trellis-system.svc";
/// Lifetime of the serving certificate. Its key exists only in memory and it is re-issued at
/// every start; it cannot be rotated while running (tonic's TLS configuration is fixed at
/// start), so it is long-lived. Restart the controller at least this often.
const SERVING_CERT_TTL: Duration = Duration::from_hours(8760);
/// Longest that open streams may keep the server from stopping after shutdown is asked.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    CaStore(#[from] ca_store::CaStoreError),
    #[error(transparent)]
    Auth(#[from] auth::AuthConfigError),
    #[error(transparent)]
    Files(#[from] files::FilesError),
    #[error(
        "cannot connect to Kubernetes: {0} (check the in-cluster service account or KUBECONFIG)"
    )]
    Kube(#[source] kube::Error),
    #[error("cannot listen on {addr}: {source} (is the address local and the port free?)")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the gRPC server: {0}")]
    Serve(#[source] tonic::transport::Error),
    #[error("the object source stopped unexpectedly; see the log lines before this one")]
    SourceEnded,
}

/// A refusal of a configuration value found when the controller starts.
fn invalid(field: &str, reason: impl Into<String>) -> ControllerError {
    ControllerError::Config(config::invalid(field, reason))
}

/// The mesh state as published to the services: a translation and its version.
#[derive(Clone, Debug, PartialEq)]
pub struct Published {
    pub version: u64,
    pub translation: Translation,
}

/// The latest published state; `None` until the source has delivered the cluster once.
pub type SharedState = watch::Receiver<Option<Arc<Published>>>;

/// The names in the controller's serving certificate: [`CONTROLLER_DNS_NAME`], the `listen`
/// IP when it is a specific address (agents usually dial an IP: the testbed has no DNS), and
/// `server_names`. Its URI SAN is `spiffe://<td>/ns/trellis-system/sa/controller`.
pub fn serving_names(listen: SocketAddr, extra: &[String]) -> (Vec<String>, Vec<IpAddr>) {
    let mut dns = vec![CONTROLLER_DNS_NAME.to_owned()];
    let mut ips = Vec::new();
    if !listen.ip().is_unspecified() {
        ips.push(listen.ip());
    }
    for name in extra {
        match name.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) if !dns.contains(name) => dns.push(name.clone()),
            Err(_) => {}
        }
    }
    (dns, ips)
}

/// A controller whose port is bound and whose CA and sources are ready; [`Controller::serve`]
/// runs it.
pub struct Controller {
    config: ControllerConfig,
    ca: Arc<LocalCa>,
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    serving: tonic::transport::Identity,
    source: Source,
    auth: Arc<dyn Authenticator>,
    metrics: Arc<ControllerMetrics>,
    monitoring: Option<tokio::net::TcpListener>,
}

enum Source {
    // Boxed: it holds the whole first load of the directory.
    Files(Box<files::FilesSource>),
    Kubernetes(kube::Client),
}

impl Controller {
    /// Loads or creates the CA, binds the ports, opens the source and the authenticators.
    /// Every configuration error surfaces here, before anything is served.
    pub async fn bind(config: ControllerConfig) -> Result<Self, ControllerError> {
        config.validate()?;
        // tonic builds its TLS configuration with the process default provider; make it the
        // one the rest of Trellis uses. Fails only if already installed, which is fine.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ControllerError::Listen {
                addr: config.listen,
                source,
            })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ControllerError::Listen {
                addr: config.listen,
                source,
            })?;
        let monitoring = match config.monitoring {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| ControllerError::Listen { addr, source })?,
            ),
            None => None,
        };

        let location = config.ca.location()?;
        let publish_root = config.ca.publish_root()?;
        let needs_kube = matches!(config.source, SourceConfig::Kubernetes(_))
            || config.auth.token_review.is_some()
            || matches!(location, CaLocation::Secret(_))
            || publish_root.is_some();
        let kube_client = if needs_kube {
            Some(
                kube::Client::try_default()
                    .await
                    .map_err(ControllerError::Kube)?,
            )
        } else {
            None
        };
        let ca = match (&location, &kube_client) {
            (CaLocation::Files { cert, key }, _) => {
                LocalCa::load_or_generate(cert, key, &config.trust_domain)?
            }
            (CaLocation::Secret(secret), Some(client)) => {
                ca_store::load_or_create_secret(client.clone(), secret, &config.trust_domain)
                    .await?
            }
            (CaLocation::Secret(_), None) => {
                return Err(invalid("ca.secret", "a Secret needs a Kubernetes client"));
            }
        };
        if let (Some(config_map), Some(client)) = (&publish_root, &kube_client) {
            ca_store::publish_root(client.clone(), config_map, &ca).await?;
        }
        let ca = Arc::new(ca);

        let identity = Identity::new(
            &config.trust_domain,
            CONTROLLER_NAMESPACE,
            CONTROLLER_SERVICE_ACCOUNT,
        )
        .map_err(|e| invalid("trust_domain", e.to_string()))?;
        let (dns, ips) = serving_names(local_addr, &config.server_names);
        let issued = ca.issue_serving(&identity, &dns, &ips, SERVING_CERT_TTL)?;
        // The leaf is followed by the root so that clients see the whole chain.
        let serving = tonic::transport::Identity::from_pem(
            format!("{}{}", issued.cert_pem, ca.cert_pem()),
            issued.key_pem,
        );
        tracing::info!(%identity, ?dns, ?ips, "issued the controller's serving certificate");

        let source = match (&config.source, &kube_client) {
            (SourceConfig::Directory(dir), _) => {
                Source::Files(Box::new(files::FilesSource::open(dir)?))
            }
            (SourceConfig::Kubernetes(_), Some(client)) => Source::Kubernetes(client.clone()),
            (SourceConfig::Kubernetes(_), None) => {
                return Err(invalid("source", "kubernetes source without a client"));
            }
        };

        let mut authenticators: Vec<Arc<dyn Authenticator>> = Vec::new();
        if let Some(path) = &config.auth.bootstrap_tokens {
            authenticators.push(Arc::new(BootstrapTokens::load(path)?));
        }
        if let (Some(review), Some(client)) = (&config.auth.token_review, &kube_client) {
            authenticators.push(Arc::new(TokenReview::new(
                client.clone(),
                &review.agent_service_accounts,
                review.audiences.clone(),
            )?));
        }

        Ok(Self {
            config,
            ca,
            listener,
            local_addr,
            serving,
            source,
            auth: Arc::new(AnyOf(authenticators)),
            metrics: Arc::new(ControllerMetrics::new()),
            monitoring,
        })
    }

    /// The gRPC address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The monitoring address actually bound, if enabled.
    pub fn monitoring_addr(&self) -> Option<SocketAddr> {
        self.monitoring.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The PEM trust bundle agents verify the controller (and each other) with.
    pub fn ca_cert_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    pub fn metrics(&self) -> Arc<ControllerMetrics> {
        self.metrics.clone()
    }

    /// Serves until `shutdown`, then stops accepting, ends the agents' streams and returns.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), ControllerError> {
        let Self {
            config,
            ca,
            listener,
            local_addr,
            serving,
            source,
            auth,
            metrics,
            monitoring,
        } = self;
        // Everything below stops with `stop`: on shutdown, or if a part fails.
        let stop = shutdown.child_token();
        let tasks = tokio_util::task::TaskTracker::new();

        let (objects_tx, objects_rx) = watch::channel(None);
        let status_client = match &source {
            Source::Kubernetes(client) => Some(client.clone()),
            Source::Files(_) => None,
        };
        let source_run: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            match source {
                Source::Files(source) => Box::pin((*source).run(objects_tx, stop.clone())),
                Source::Kubernetes(client) => {
                    Box::pin(kube_source::run(client, objects_tx, stop.clone()))
                }
            };
        // Cancelled when the source ends for any reason, a panic included.
        let source_ended = CancellationToken::new();
        let ended = source_ended.clone().drop_guard();
        tasks.spawn(async move {
            let _ended = ended;
            source_run.await;
        });
        let (state_tx, state_rx) = watch::channel(None);
        let settings = TranslateSettings {
            trust_domain: config.trust_domain.clone(),
            hbone_port: config.hbone_port,
            cluster_id: config.cluster_id.clone(),
            istio_labels: config.compatibility.istio_labels,
        };
        tasks.spawn(translate_loop(
            objects_rx,
            settings,
            state_tx,
            metrics.clone(),
            stop.clone(),
        ));
        tasks.spawn(policy_status::run(
            status_client.clone(),
            state_rx.clone(),
            stop.clone(),
        ));
        tasks.spawn(route_status::run(
            status_client,
            state_rx.clone(),
            stop.clone(),
        ));
        let proxies = Arc::new(proxies::Proxies::default());
        if let Some(listener) = monitoring {
            tasks.spawn(metrics::serve(
                metrics::Monitored {
                    metrics: metrics.clone(),
                    proxies: proxies.clone(),
                    state: state_rx.clone(),
                },
                listener,
                stop.clone(),
            ));
        }

        let ca_service = ca::CaService::new(
            ca,
            auth.clone(),
            state_rx.clone(),
            metrics.clone(),
            proxies.clone(),
            config.trust_domain.clone(),
            ca::Ttl {
                default: Duration::from_secs(config.certificate_ttl_secs),
                max: Duration::from_secs(config.max_certificate_ttl_secs),
            },
        );
        let discovery_service = discovery::DiscoveryService::new(
            auth,
            state_rx,
            metrics,
            proxies,
            stop.clone(),
            discovery::StreamSettings::default(),
        );
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(serving)
            .timeout(Duration::from_secs(10));
        let router = tonic::transport::Server::builder()
            .tls_config(tls)
            .map_err(ControllerError::Serve)?
            // Finds agents that vanished without closing their streams.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .tcp_keepalive(Some(Duration::from_mins(1)))
            .add_service(CertificateAuthorityServer::new(ca_service))
            .add_service(DiscoveryServer::new(discovery_service));
        tracing::info!(addr = %local_addr, trust_domain = %config.trust_domain, "controller serving");

        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let server_stop = stop.clone();
        let server = router.serve_with_incoming_shutdown(incoming, async move {
            server_stop.cancelled().await;
        });
        tokio::pin!(server);
        let result = tokio::select! {
            served = &mut server => served.map_err(ControllerError::Serve),
            () = source_ended.cancelled() => {
                // Sources run until stopped; one that ends by itself would leave the mesh state
                // frozen, so stop rather than serve stale state forever.
                stop.cancel();
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await;
                if shutdown.is_cancelled() {
                    Ok(())
                } else {
                    Err(ControllerError::SourceEnded)
                }
            }
        };
        stop.cancel();
        tasks.close();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait()).await;
        tracing::info!("controller stopped");
        result
    }
}

/// Runs the controller until `shutdown`.
pub async fn run(
    config: ControllerConfig,
    shutdown: CancellationToken,
) -> Result<(), ControllerError> {
    Controller::bind(config).await?.serve(shutdown).await
}

/// The first version number: milliseconds since the epoch at start, so versions keep
/// increasing across controller restarts (agents only treat them as informational, but
/// monotonic numbers keep logs and Acks unambiguous).
fn initial_version() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2))
}

/// Translates every new snapshot of objects and publishes the result when it differs.
async fn translate_loop(
    mut objects: watch::Receiver<Option<Arc<ClusterObjects>>>,
    settings: TranslateSettings,
    state: watch::Sender<Option<Arc<Published>>>,
    metrics: Arc<ControllerMetrics>,
    stop: CancellationToken,
) {
    let mut version = initial_version();
    let mut last: Option<Arc<Published>> = None;
    loop {
        let snapshot = objects.borrow_and_update().clone();
        if let Some(snapshot) = snapshot {
            let translation = translate(&snapshot, &settings);
            if last.as_ref().is_none_or(|l| l.translation != translation) {
                log_rejections(last.as_deref().map(|l| &l.translation), &translation);
                version += 1;
                metrics.translations.inc();
                metrics
                    .objects_rejected
                    .set(i64::try_from(translation.rejected.len()).unwrap_or(i64::MAX));
                metrics
                    .resources
                    .set(i64::try_from(translation.resources.len()).unwrap_or(i64::MAX));
                tracing::info!(
                    version,
                    resources = translation.resources.len(),
                    rejected = translation.rejected.len(),
                    "published mesh state"
                );
                let published = Arc::new(Published {
                    version,
                    translation,
                });
                state.send_replace(Some(published.clone()));
                metrics.ready.store(true, Ordering::Relaxed);
                last = Some(published);
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = objects.changed() => if changed.is_err() { return },
        }
    }
}

/// Logs rejections that are new since the last state (so a standing problem is reported
/// once, not on every change).
fn log_rejections(previous: Option<&Translation>, current: &Translation) {
    for (object, reason) in &current.rejected {
        let known =
            previous.is_some_and(|p| p.rejected.iter().any(|(o, r)| o == object && r == reason));
        if !known {
            tracing::warn!(%object, %reason, "object left out of the mesh");
        }
    }
}

#[cfg(test)]
mod tests;
