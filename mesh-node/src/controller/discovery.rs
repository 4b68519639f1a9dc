//! The Discovery service: streams the mesh state to each agent, incrementally.
//!
//! An agent authenticates (see [`super::auth`]), says Hello with its node name (which must be
//! the node its credential proves), and receives a full snapshot of the current state, then a
//! delta (upserts by key, removed keys) each time the state changes. Every update carries the
//! version of the state it brings the agent to; versions increase. The agent's Acks are read
//! alongside; resources it rejected are logged with its reason.
//!
//! Memory per agent is bounded: the stream holds at most [`StreamSettings::capacity`] updates.
//! The next update is computed only when there is room, from what the agent was last sent to
//! whatever is current then, so a slow agent skips intermediate states instead of queueing
//! them; when the accumulated change is larger than the state itself it gets a fresh snapshot
//! instead. An agent that takes no update for [`StreamSettings::stall_timeout`] is cut off
//! with `unavailable` and resynchronises with a snapshot when it reconnects.

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::{
    Published, SharedState,
    auth::{self, Authenticator},
    metrics::ControllerMetrics,
};
use crate::api::v1::{
    AgentMessage, Resource, Update, agent_message::Message, discovery_server::Discovery,
};

#[derive(Clone, Copy, Debug)]
pub struct StreamSettings {
    /// How long an agent has to send its Hello after opening the stream.
    pub hello_timeout: Duration,
    /// Updates buffered per agent.
    pub capacity: usize,
    /// How long an agent may leave an update unread before it is disconnected.
    pub stall_timeout: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(10),
            capacity: 4,
            stall_timeout: Duration::from_secs(60),
        }
    }
}

pub struct DiscoveryService {
    auth: Arc<dyn Authenticator>,
    state: SharedState,
    metrics: Arc<ControllerMetrics>,
    shutdown: CancellationToken,
    settings: StreamSettings,
}

impl DiscoveryService {
    /// Streams end when `shutdown` is cancelled, so that the server can stop gracefully.
    pub fn new(
        auth: Arc<dyn Authenticator>,
        state: SharedState,
        metrics: Arc<ControllerMetrics>,
        shutdown: CancellationToken,
        settings: StreamSettings,
    ) -> Self {
        Self {
            auth,
            state,
            metrics,
            shutdown,
            settings,
        }
    }
}

pub type UpdateStream = Pin<Box<dyn Stream<Item = Result<Update, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = UpdateStream;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<UpdateStream>, Status> {
        let node = auth::authenticate(self.auth.as_ref(), request.metadata())
            .await
            .inspect_err(|status| {
                tracing::warn!(peer = ?request.remote_addr(), reason = status.message(), "discovery stream not authenticated");
            })?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.settings.hello_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello received; send Hello first"))??;
        let hello = match first.and_then(|m| m.message) {
            Some(Message::Hello(hello)) => hello,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be a Hello",
                ));
            }
        };
        if hello.node != node {
            tracing::warn!(credential = %node, hello = %hello.node, "discovery Hello names another node");
            return Err(Status::permission_denied(format!(
                "Hello names node {:?} but the credential belongs to node {node:?}",
                hello.node
            )));
        }
        tracing::info!(%node, last_version = hello.last_version, "agent connected");

        let (tx, rx) = mpsc::channel(self.settings.capacity.max(1));
        let final_status = Arc::new(Mutex::new(None));
        let agent = Agent {
            node,
            state: self.state.clone(),
            metrics: self.metrics.clone(),
            stop: self.shutdown.child_token(),
            shutdown: self.shutdown.clone(),
            settings: self.settings,
        };
        tokio::spawn(agent.run(inbound, tx, final_status.clone()));
        Ok(Response::new(Box::pin(updates(rx, final_status))))
    }
}

/// The response stream: updates as the agent task produces them, then (if the task ended the
/// stream with an error) that error.
fn updates(
    rx: mpsc::Receiver<Update>,
    final_status: Arc<Mutex<Option<Status>>>,
) -> impl Stream<Item = Result<Update, Status>> + Send {
    futures_util::stream::unfold(Some(rx), move |rx| {
        let final_status = final_status.clone();
        async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(update) => Some((Ok(update), Some(rx))),
                None => {
                    let status = final_status.lock().ok().and_then(|mut s| s.take());
                    status.map(|s| (Err(s), None))
                }
            }
        }
    })
}

struct Agent {
    node: String,
    state: SharedState,
    metrics: Arc<ControllerMetrics>,
    /// Ends this stream: on shutdown, or when the agent goes away.
    stop: CancellationToken,
    /// The controller's shutdown, to tell the agent why its stream ends.
    shutdown: CancellationToken,
    settings: StreamSettings,
}

impl Agent {
    async fn run(
        mut self,
        inbound: Streaming<AgentMessage>,
        tx: mpsc::Sender<Update>,
        final_status: Arc<Mutex<Option<Status>>>,
    ) {
        self.metrics.agents_connected.inc();
        // Reading Acks ends the stream when the agent goes away, and vice versa.
        let reader = tokio::spawn(read_acks(
            self.node.clone(),
            inbound,
            self.metrics.clone(),
            self.stop.clone(),
        ));
        let mut result = self.send_updates(&tx).await;
        if result.is_ok() && self.shutdown.is_cancelled() {
            // Says "come back later" rather than a clean end, so agents reconnect with backoff.
            result = Err(Status::unavailable("the controller is shutting down"));
        }
        if let Err(status) = result {
            tracing::info!(node = %self.node, reason = status.message(), "ending discovery stream");
            if let Ok(mut slot) = final_status.lock() {
                *slot = Some(status);
            }
        }
        self.stop.cancel();
        let _ = reader.await;
        self.metrics.agents_connected.dec();
        tracing::info!(node = %self.node, "agent disconnected");
    }

    /// Sends the snapshot, then deltas, until the agent or the controller goes away.
    async fn send_updates(&mut self, tx: &mpsc::Sender<Update>) -> Result<(), Status> {
        let mut sent: Option<Arc<Published>> = None;
        loop {
            let permit = tokio::select! {
                () = self.stop.cancelled() => return Ok(()),
                permit = tokio::time::timeout(self.settings.stall_timeout, tx.reserve()) => match permit {
                    Ok(Ok(permit)) => permit,
                    // The response stream is gone: the agent disconnected.
                    Ok(Err(_)) => return Ok(()),
                    Err(_) => return Err(Status::unavailable(format!(
                        "the agent left updates unread for {}s; reconnect to resynchronise",
                        self.settings.stall_timeout.as_secs()
                    ))),
                },
            };
            let current = self.state.borrow_and_update().clone();
            match (current, &sent) {
                (Some(current), Some(prev)) if prev.version == current.version => drop(permit),
                (Some(current), prev) => {
                    let update = update_between(prev.as_deref(), &current);
                    self.metrics.updates_sent.inc();
                    if update.snapshot {
                        self.metrics.snapshots_sent.inc();
                    }
                    tracing::debug!(
                        node = %self.node,
                        version = update.version,
                        snapshot = update.snapshot,
                        upserts = update.upserts.len(),
                        removes = update.removes.len(),
                        "sending update"
                    );
                    permit.send(update);
                    sent = Some(current);
                }
                // Not loaded yet: the first snapshot goes out when the state arrives.
                (None, _) => drop(permit),
            }
            tokio::select! {
                () = self.stop.cancelled() => return Ok(()),
                changed = self.state.changed() => if changed.is_err() {
                    return Err(Status::unavailable("the controller is shutting down"));
                },
            }
        }
    }
}

/// What brings an agent holding `prev` (nothing, for a new stream) to `current`: a snapshot,
/// or the changed and removed resources when that is smaller.
pub fn update_between(prev: Option<&Published>, current: &Published) -> Update {
    let snapshot = || Update {
        version: current.version,
        snapshot: true,
        upserts: current.translation.resources.values().cloned().collect(),
        removes: Vec::new(),
    };
    let Some(prev) = prev else {
        return snapshot();
    };
    let (upserts, removes) = delta(&prev.translation.resources, &current.translation.resources);
    if upserts.len() + removes.len() > current.translation.resources.len() {
        return snapshot();
    }
    Update {
        version: current.version,
        snapshot: false,
        upserts,
        removes,
    }
}

/// Resources new or changed in `next`, and keys gone from it; both in key order.
fn delta(
    prev: &BTreeMap<String, Resource>,
    next: &BTreeMap<String, Resource>,
) -> (Vec<Resource>, Vec<String>) {
    let upserts = next
        .iter()
        .filter(|(key, resource)| prev.get(*key) != Some(resource))
        .map(|(_, resource)| resource.clone())
        .collect();
    let removes = prev
        .keys()
        .filter(|key| !next.contains_key(*key))
        .cloned()
        .collect();
    (upserts, removes)
}

async fn read_acks(
    node: String,
    mut inbound: Streaming<AgentMessage>,
    metrics: Arc<ControllerMetrics>,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return,
            message = inbound.message() => message,
        };
        match message {
            Ok(Some(AgentMessage {
                message: Some(Message::Ack(ack)),
            })) => {
                for rejected in &ack.rejected {
                    metrics.resources_rejected_by_agents.inc();
                    tracing::warn!(
                        %node,
                        version = ack.version,
                        key = %rejected.key,
                        reason = %rejected.reason,
                        "agent rejected a resource; it keeps its last good state for it"
                    );
                }
                tracing::debug!(%node, version = ack.version, "agent acknowledged");
            }
            Ok(Some(AgentMessage {
                message: Some(Message::Hello(_)),
            })) => tracing::debug!(%node, "ignoring a second Hello"),
            Ok(Some(AgentMessage { message: None })) => {
                tracing::debug!(%node, "ignoring an empty message");
            }
            Ok(None) => break,
            Err(status) => {
                tracing::debug!(%node, error = %status, "agent stream ended with an error");
                break;
            }
        }
    }
    stop.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{api::v1 as api, controller::translate::Translation};

    fn node(name: &str, hbone: &str) -> (String, Resource) {
        let key = format!("node/{name}");
        (
            key.clone(),
            Resource {
                key,
                kind: Some(api::resource::Kind::Node(api::Node {
                    name: name.into(),
                    hbone: hbone.into(),
                    zone: String::new(),
                })),
            },
        )
    }

    fn published(version: u64, resources: &[(String, Resource)]) -> Published {
        Published {
            version,
            translation: Translation {
                resources: resources.iter().cloned().collect(),
                ..Translation::default()
            },
        }
    }

    #[test]
    fn deltas_carry_changes_and_removals_only() {
        let a = node("a", "10.0.0.1:15008");
        let b = node("b", "10.0.0.2:15008");
        let b2 = node("b", "10.0.0.9:15008");
        let c = node("c", "10.0.0.3:15008");
        let d = node("d", "10.0.0.4:15008");
        let v1 = published(1, &[a.clone(), b, c.clone()]);
        let v2 = published(2, &[a.clone(), b2.clone(), d.clone()]);

        let first = update_between(None, &v1);
        assert!(first.snapshot);
        assert_eq!(first.upserts.len(), 3);

        let update = update_between(Some(&v1), &v2);
        assert!(!update.snapshot);
        assert_eq!(update.version, 2);
        assert_eq!(update.upserts, vec![b2.1, d.1]);
        assert_eq!(update.removes, vec!["node/c".to_owned()]);

        // Everything replaced: a snapshot is smaller than the delta.
        let v3 = published(3, &[node("x", "10.0.0.5:15008")]);
        assert!(update_between(Some(&v2), &v3).snapshot);
    }
}
