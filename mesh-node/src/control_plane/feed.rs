//! A node's end of `Discovery.Stream` (agent or waypoint, by `role`): the live feed of mesh
//! state from the controller.
//!
//! One task owns the stream and the [`ResourceStore`]. For each update it converts the
//! resources at the boundary (a malformed one is rejected alone and the last good version of
//! its key kept), hands the new set to the role's state task, waits until the new
//! [`MeshState`] is swapped in, then acknowledges, listing what it rejected. When the stream fails it
//! reconnects with bounded, jittered exponential backoff; meanwhile the last state keeps
//! serving. A reconnecting agent gets a fresh snapshot.
//!
//! [`MeshState`]: crate::state::MeshState

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use backon::{BackoffBuilder, ExponentialBuilder};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::channel::{BearerToken, ChannelError};
use crate::{
    api::v1::{
        self as api, AgentMessage, Hello, Rejected, Update, agent_message,
        discovery_client::DiscoveryClient, resource,
    },
    policy::{Policy, SecurityGroup},
    state::{NodeInfo, ResourceError, Service, Waypoint, Workload},
};

/// One converted resource.
#[derive(Clone, Debug)]
pub enum Resource {
    Workload(Arc<Workload>),
    Node(NodeInfo),
    /// Shared so that an update that does not touch a service keeps it, with its round-robin
    /// cursor, in the next state.
    Service(Arc<Service>),
    /// An authorization or peer authentication policy, converted (a spec that does not
    /// convert is already its fail-closed stand-in).
    Policy(Arc<Policy>),
    Waypoint(Arc<Waypoint>),
    /// A routing object for waypoints (HTTPRoute, GRPCRoute, TrafficPolicy), as written: the
    /// waypoint compiles it, so a bad one rejects only itself there and reports why.
    Route(Arc<RouteObject>),
}

/// A routing object as the controller sends it.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteObject {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    /// `Value::Null` when the spec is not JSON (the waypoint then reports it invalid).
    pub spec: serde_json::Value,
}

/// Every resource the agent holds, by key.
pub type Resources = BTreeMap<String, Resource>;

/// The resources as last applied. Copy-on-write: the state task keeps the previous map while
/// the next update is applied.
#[derive(Debug, Default)]
pub struct ResourceStore {
    resources: Arc<Resources>,
    version: Option<u64>,
}

/// A resource that could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct Rejection {
    pub key: String,
    pub reason: String,
}

impl From<Rejection> for Rejected {
    fn from(r: Rejection) -> Self {
        Rejected {
            key: r.key,
            reason: r.reason,
        }
    }
}

/// Converts one protobuf resource, checking that its key names it.
fn convert(r: api::Resource, trust_domain: &str) -> Result<(String, Resource), Rejection> {
    let key = r.key;
    let reject = |e: ResourceError, kind: &str| Rejection {
        key: key.clone(),
        reason: format!("{kind} {e}"),
    };
    let mismatch = |expected: String| Rejection {
        key: key.clone(),
        reason: format!("key does not name the resource: expected {expected:?}"),
    };
    let resource = match r.kind {
        Some(resource::Kind::Workload(w)) => {
            let w = Workload::from_resource(w, trust_domain).map_err(|e| reject(e, "workload"))?;
            let expected = format!("workload/{}", w.uid);
            if key != expected {
                return Err(mismatch(expected));
            }
            Resource::Workload(Arc::new(w))
        }
        Some(resource::Kind::Node(n)) => {
            let n = NodeInfo::try_from(n).map_err(|e| reject(e, "node"))?;
            let expected = format!("node/{}", n.name);
            if key != expected {
                return Err(mismatch(expected));
            }
            Resource::Node(n)
        }
        Some(resource::Kind::Service(s)) => {
            let s = Service::try_from(&s).map_err(|e| reject(e, "service"))?;
            let expected = format!("service/{}/{}", s.namespace, s.name);
            if key != expected {
                return Err(mismatch(expected));
            }
            Resource::Service(Arc::new(s))
        }
        Some(resource::Kind::Waypoint(w)) => {
            let w = Waypoint::from_resource(w, trust_domain).map_err(|e| reject(e, "waypoint"))?;
            let expected = format!("waypoint/{}", w.id);
            if key != expected {
                return Err(mismatch(expected));
            }
            Resource::Waypoint(Arc::new(w))
        }
        Some(resource::Kind::Policy(p)) if key.starts_with("route/") => {
            let expected = format!("route/{}/{}/{}", p.kind, p.namespace, p.name);
            if key != expected {
                return Err(mismatch(expected));
            }
            Resource::Route(Arc::new(RouteObject {
                spec: serde_json::from_str(&p.spec_json).unwrap_or(serde_json::Value::Null),
                kind: p.kind,
                namespace: p.namespace,
                name: p.name,
                generation: (p.generation != 0).then_some(p.generation),
            }))
        }
        Some(resource::Kind::Policy(p)) => {
            let Some((group, kind)) = SecurityGroup::parse_qualified(&p.kind) else {
                return Err(Rejection {
                    key,
                    reason: format!(
                        "policy kind {:?} is unknown (sent by a newer controller?)",
                        p.kind
                    ),
                });
            };
            // Unparseable JSON is treated like a spec of the wrong shape: the stand-in.
            let spec = serde_json::from_str(&p.spec_json).unwrap_or(serde_json::Value::Bool(false));
            let metadata = ObjectMeta {
                namespace: Some(p.namespace),
                name: Some(p.name),
                generation: Some(p.generation),
                ..ObjectMeta::default()
            };
            let policy =
                Policy::compile_in(group, kind, &metadata, &spec).map_err(|e| Rejection {
                    key: key.clone(),
                    reason: format!("policy {e}"),
                })?;
            let id = policy.id();
            let expected = format!("policy/{}/{}/{}", p.kind, id.namespace, id.name);
            if key != expected {
                return Err(mismatch(expected));
            }
            Resource::Policy(Arc::new(policy))
        }
        None => {
            return Err(Rejection {
                key,
                reason: "resource has no kind (sent by a newer controller?)".into(),
            });
        }
    };
    Ok((key, resource))
}

impl ResourceStore {
    pub fn resources(&self) -> Arc<Resources> {
        self.resources.clone()
    }

    pub fn version(&self) -> Option<u64> {
        self.version
    }

    /// Applies an update: a snapshot replaces everything, a delta upserts and removes by key.
    /// A resource that does not convert is rejected alone; its key keeps the last good
    /// version (if any), and everything else is applied.
    pub fn apply(&mut self, update: Update, trust_domain: &str) -> Vec<Rejection> {
        let mut rejected = Vec::new();
        let previous = self.resources.clone();
        let resources = Arc::make_mut(&mut self.resources);
        if update.snapshot {
            resources.clear();
        }
        for r in update.upserts {
            match convert(r, trust_domain) {
                Ok((key, resource)) => {
                    resources.insert(key, resource);
                }
                Err(rejection) => {
                    if update.snapshot
                        && let Some(last_good) = previous.get(&rejection.key)
                    {
                        resources.insert(rejection.key.clone(), last_good.clone());
                    }
                    tracing::warn!(key = %rejection.key, reason = %rejection.reason, version = update.version, "rejected resource from the controller; keeping its last good state");
                    rejected.push(rejection);
                }
            }
        }
        if !update.snapshot {
            for key in &update.removes {
                resources.remove(key);
            }
        }
        self.version = Some(update.version);
        rejected
    }
}

/// Connection status and progress, for the config dump.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FeedStatus {
    pub address: String,
    pub connected: bool,
    /// Version of the last update applied (and acknowledged).
    pub last_version: Option<u64>,
    /// Unix seconds of the last update applied.
    pub last_update: Option<u64>,
    pub last_error: Option<String>,
    /// Resources rejected by the last update.
    pub rejected: Vec<RejectedStatus>,
    /// Streams opened since start.
    pub streams: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RejectedStatus {
    pub key: String,
    pub reason: String,
}

/// What the feed hands the state task: the resources to build the next state from, and a
/// way to tell the feed it is in place.
#[derive(Debug)]
pub struct Applied {
    pub resources: Arc<Resources>,
    pub version: u64,
    pub done: oneshot::Sender<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error(transparent)]
    Credential(#[from] ChannelError),
    #[error("controller did not answer within {0:?}")]
    Timeout(Duration),
    #[error("controller refused the stream: {code:?}: {message}")]
    Status { code: tonic::Code, message: String },
    #[error("controller closed the stream")]
    Closed,
    #[error("controller sent a delta (version {0}) before the snapshot")]
    DeltaFirst(u64),
    #[error("agent is stopping")]
    Stopping,
}

impl From<tonic::Status> for FeedError {
    fn from(status: tonic::Status) -> Self {
        FeedError::Status {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// Time allowed for the controller to answer the stream request.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The feed task's inputs.
pub struct Feed {
    pub node: String,
    /// `agent` or `waypoint`: what the controller sends depends on it.
    pub role: &'static str,
    pub trust_domain: String,
    pub channel: Channel,
    pub token: BearerToken,
    pub status: Arc<ArcSwap<FeedStatus>>,
    pub applied: mpsc::Sender<Applied>,
    pub backoff: ExponentialBuilder,
}

/// Reconnect delays: from a quarter second up to half a minute, jittered so agents that lost
/// the same controller do not come back in lockstep.
pub fn default_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
}

impl Feed {
    /// Streams until `shutdown`, reconnecting after every failure.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut store = ResourceStore::default();
        let mut backoff = self.backoff.build();
        loop {
            let mut synced = false;
            let result = self.session(&mut store, &mut synced, &shutdown).await;
            if shutdown.is_cancelled() {
                return;
            }
            let error = match result {
                Ok(()) | Err(FeedError::Stopping) => return,
                Err(e) => e,
            };
            if synced {
                // The connection worked: start the next series of retries from the bottom.
                backoff = self.backoff.build();
            }
            let delay = backoff.next().unwrap_or(Duration::from_secs(30));
            tracing::warn!(error = %error, retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), version = ?store.version(), "control plane stream lost; serving the last known state");
            self.set_status(|s| {
                s.connected = false;
                s.last_error = Some(error.to_string());
            });
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn set_status(&self, edit: impl FnOnce(&mut FeedStatus)) {
        let mut status = FeedStatus::clone(&self.status.load());
        edit(&mut status);
        self.status.store(Arc::new(status));
    }

    /// One stream: hello, then updates until it fails.
    async fn session(
        &self,
        store: &mut ResourceStore,
        synced: &mut bool,
        shutdown: &CancellationToken,
    ) -> Result<(), FeedError> {
        let (to_controller, outbox) = mpsc::channel::<AgentMessage>(4);
        let hello = AgentMessage {
            message: Some(agent_message::Message::Hello(Hello {
                node: self.node.clone(),
                last_version: store.version().unwrap_or(0),
                role: self.role.into(),
                build: env!("CARGO_PKG_VERSION").into(),
            })),
        };
        to_controller
            .send(hello)
            .await
            .map_err(|_| FeedError::Closed)?;
        let outbound = futures_util::stream::unfold(outbox, |mut rx| async move {
            rx.recv().await.map(|m| (m, rx))
        });
        let mut request = tonic::Request::new(outbound);
        self.token.authorize(&mut request).await?;
        let mut client = DiscoveryClient::new(self.channel.clone());
        let opened = tokio::select! {
            () = shutdown.cancelled() => return Err(FeedError::Stopping),
            opened = tokio::time::timeout(OPEN_TIMEOUT, client.stream(request)) => opened,
        };
        let mut updates = opened
            .map_err(|_| FeedError::Timeout(OPEN_TIMEOUT))??
            .into_inner();
        self.set_status(|s| {
            s.connected = true;
            s.streams += 1;
        });
        tracing::info!("control plane stream open");
        let mut have_snapshot = false;
        loop {
            let update = tokio::select! {
                () = shutdown.cancelled() => return Err(FeedError::Stopping),
                update = updates.message() => update?,
            };
            let Some(update) = update else {
                return Err(FeedError::Closed);
            };
            if !update.snapshot && !have_snapshot {
                return Err(FeedError::DeltaFirst(update.version));
            }
            have_snapshot = true;
            let version = update.version;
            let (upserts, removes, snapshot) =
                (update.upserts.len(), update.removes.len(), update.snapshot);
            let rejected = store.apply(update, &self.trust_domain);

            // The state must be in place before the controller hears it was applied.
            let (done, applied) = oneshot::channel();
            self.applied
                .send(Applied {
                    resources: store.resources(),
                    version,
                    done,
                })
                .await
                .map_err(|_| FeedError::Stopping)?;
            applied.await.map_err(|_| FeedError::Stopping)?;
            tracing::info!(
                version,
                snapshot,
                upserts,
                removes,
                rejected = rejected.len(),
                "applied control plane update"
            );
            *synced = true;
            self.set_status(|s| {
                s.last_version = Some(version);
                s.last_update = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs());
                s.last_error = None;
                s.rejected = rejected
                    .iter()
                    .map(|r| RejectedStatus {
                        key: r.key.clone(),
                        reason: r.reason.clone(),
                    })
                    .collect();
            });
            let ack = AgentMessage {
                message: Some(agent_message::Message::Ack(api::Ack {
                    version,
                    rejected: rejected.into_iter().map(Rejected::from).collect(),
                })),
            };
            to_controller
                .send(ack)
                .await
                .map_err(|_| FeedError::Closed)?;
        }
    }
}

#[cfg(test)]
mod tests;
