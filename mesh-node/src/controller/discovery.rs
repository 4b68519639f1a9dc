//! The Discovery service: streams the mesh state to each agent and waypoint, incrementally.
//!
//! A caller authenticates (see [`super::auth`]) and says Hello with its role:
//! - `agent` (or empty): the caller must be a node agent, and the Hello must name the node its
//!   credential proves. It receives everything except the routing objects.
//! - `waypoint`: the caller must be a workload whose service account is a waypoint's (checked
//!   against the current state, and again at every new state: a stream whose account stops
//!   being a waypoint's ends with `permission_denied`). It receives everything agents receive
//!   plus the `route/` resources. Its Hello's node is informational.
//!
//! Anything else is refused. The stream then carries a full snapshot of the current state,
//! then a delta (upserts by key, removed keys) each time the state changes. Every update
//! carries the version of the state it brings the caller to; versions increase. The caller's
//! Acks are read alongside; resources it rejected are logged with its reason.
//!
//! Memory per agent is bounded: the stream holds at most [`StreamSettings::capacity`] updates.
//! The next update is computed only when there is room, from what the agent was last sent to
//! whatever is current then, so a slow agent skips intermediate states instead of queueing
//! them; when the accumulated change is larger than the state itself it gets a fresh snapshot
//! instead. An agent that takes no update for [`StreamSettings::stall_timeout`] is cut off
//! with `unavailable` and resynchronises with a snapshot when it reconnects.

use std::{collections::BTreeMap, pin::Pin, sync::Arc, time::Duration};

use futures_util::Stream;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::{
    Published, SharedState,
    auth::{self, Authenticator, Caller},
    metrics::ControllerMetrics,
    proxies::{Proxies, Proxy, Registration},
    translate::{Role, for_role},
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
            stall_timeout: Duration::from_mins(1),
        }
    }
}

pub struct DiscoveryService {
    auth: Arc<dyn Authenticator>,
    state: SharedState,
    metrics: Arc<ControllerMetrics>,
    proxies: Arc<Proxies>,
    shutdown: CancellationToken,
    settings: StreamSettings,
}

impl DiscoveryService {
    /// Streams end when `shutdown` is cancelled, so that the server can stop gracefully.
    pub fn new(
        auth: Arc<dyn Authenticator>,
        state: SharedState,
        metrics: Arc<ControllerMetrics>,
        proxies: Arc<Proxies>,
        shutdown: CancellationToken,
        settings: StreamSettings,
    ) -> Self {
        Self {
            auth,
            state,
            metrics,
            proxies,
            shutdown,
            settings,
        }
    }
}

pub type UpdateStream = Pin<Box<dyn Stream<Item = Result<Update, Status>> + Send>>;

impl DiscoveryService {
    /// The role `caller` streams as, and for a waypoint its `(namespace, service account)`;
    /// or why it may not (see the module docs).
    fn authorize(
        &self,
        caller: &Caller,
        hello: &crate::api::v1::Hello,
    ) -> Result<(Role, Option<(String, String)>), Status> {
        let role = match hello.role.as_str() {
            "" | "agent" => Role::Agent,
            "waypoint" => Role::Waypoint,
            other => {
                return Err(Status::invalid_argument(format!(
                    "Hello role {other:?} is unknown: say \"agent\" or \"waypoint\""
                )));
            }
        };
        match (caller, role) {
            (Caller::Node(node), Role::Agent) if hello.node == *node => Ok((role, None)),
            (Caller::Node(node), Role::Agent) => Err(Status::permission_denied(format!(
                "Hello names node {:?} but the credential belongs to node {node:?}",
                hello.node
            ))),
            (Caller::Node(node), Role::Waypoint) => Err(Status::permission_denied(format!(
                "node {node}'s credential cannot stream as a waypoint: a waypoint authenticates as its own service account"
            ))),
            (Caller::Workload { .. }, Role::Agent) => Err(Status::permission_denied(format!(
                "{caller} is a workload, not a node agent: workloads may only stream as a waypoint"
            ))),
            (
                Caller::Workload {
                    namespace,
                    service_account,
                    ..
                },
                Role::Waypoint,
            ) => {
                let account = (namespace.clone(), service_account.clone());
                match self.state.borrow().as_deref() {
                    None => Err(Status::unavailable(
                        "the controller has not loaded the cluster state yet; retry",
                    )),
                    Some(state) if is_waypoint(state, &account) => Ok((role, Some(account))),
                    Some(_) => Err(Status::permission_denied(format!(
                        "{caller} is not the service account of a waypoint with running pods"
                    ))),
                }
            }
        }
    }
}

fn is_waypoint(state: &Published, (namespace, account): &(String, String)) -> bool {
    state.translation.is_waypoint_account(namespace, account)
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = UpdateStream;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<UpdateStream>, Status> {
        let caller = auth::authenticate(self.auth.as_ref(), request.metadata())
            .await
            .inspect_err(|status| {
                tracing::warn!(peer = ?request.remote_addr(), reason = status.message(), "discovery stream not authenticated");
            })?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.settings.hello_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello received; send Hello first"))??;
        let Some(Message::Hello(hello)) = first.and_then(|m| m.message) else {
            return Err(Status::invalid_argument(
                "the first message must be a Hello",
            ));
        };
        let (role, waypoint_account) = self.authorize(&caller, &hello).inspect_err(|status| {
            tracing::warn!(%caller, role = %hello.role, hello_node = %hello.node, reason = status.message(), "discovery stream refused");
        })?;
        let peer = match role {
            Role::Agent => caller.to_string(),
            Role::Waypoint => format!("waypoint {caller}"),
        };
        tracing::info!(%peer, hello_node = %hello.node, last_version = hello.last_version, "connected");

        let (tx, rx) = mpsc::channel(self.settings.capacity.max(1));
        let final_status = Arc::new(Mutex::new(None));
        // Bounded: a Hello's strings are the caller's, listed by the monitoring surface.
        let build: String = hello.build.chars().take(64).collect();
        let node: String = hello.node.chars().take(253).collect();
        let registration =
            self.proxies
                .register(peer.clone(), caller.to_string(), role, node, build);
        let agent = Agent {
            peer,
            registration,
            role,
            waypoint_account,
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
            if let Some(update) = rx.recv().await {
                Some((Ok(update), Some(rx)))
            } else {
                let status = final_status.lock().take();
                status.map(|s| (Err(s), None))
            }
        }
    })
}

/// One open stream, to an agent or a waypoint.
struct Agent {
    /// Who is at the other end, for log lines.
    peer: String,
    /// Its entry in the connected proxies, removed when the stream ends.
    registration: Registration,
    role: Role,
    /// A waypoint's `(namespace, service account)`: the stream ends once it is no longer one.
    waypoint_account: Option<(String, String)>,
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
            self.peer.clone(),
            self.registration.proxy.clone(),
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
            tracing::info!(peer = %self.peer, reason = status.message(), "ending discovery stream");
            *final_status.lock() = Some(status);
        }
        self.stop.cancel();
        let _ = reader.await;
        self.metrics.agents_connected.dec();
        tracing::info!(peer = %self.peer, "disconnected");
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
            if let (Some(current), Some(account)) = (&current, &self.waypoint_account)
                && !is_waypoint(current, account)
            {
                return Err(Status::permission_denied(format!(
                    "service account {}/{} is no longer a waypoint's",
                    account.0, account.1
                )));
            }
            match (current, &sent) {
                (Some(current), Some(prev)) if prev.version == current.version => drop(permit),
                (Some(current), prev) => {
                    let update = update_between(prev.as_deref(), &current, self.role);
                    self.metrics.updates_sent.inc();
                    if update.snapshot {
                        self.metrics.snapshots_sent.inc();
                    }
                    tracing::debug!(
                        peer = %self.peer,
                        version = update.version,
                        snapshot = update.snapshot,
                        upserts = update.upserts.len(),
                        removes = update.removes.len(),
                        "sending update"
                    );
                    self.registration
                        .proxy
                        .sent
                        .store(update.version, std::sync::atomic::Ordering::Relaxed);
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

/// What brings a `role` stream holding `prev` (nothing, for a new stream) to `current`: a
/// snapshot, or the changed and removed resources when that is smaller. Only resources the
/// role receives ([`for_role`]) are considered, so an agent never sees a route, even removed.
pub fn update_between(prev: Option<&Published>, current: &Published, role: Role) -> Update {
    let visible = |resources: &BTreeMap<String, Resource>| -> usize {
        resources.keys().filter(|k| for_role(k, role)).count()
    };
    let snapshot = || Update {
        version: current.version,
        snapshot: true,
        upserts: current
            .translation
            .resources
            .iter()
            .filter(|(k, _)| for_role(k, role))
            .map(|(_, r)| r.clone())
            .collect(),
        removes: Vec::new(),
    };
    let Some(prev) = prev else {
        return snapshot();
    };
    let (upserts, removes) = delta(
        &prev.translation.resources,
        &current.translation.resources,
        role,
    );
    if upserts.len() + removes.len() > visible(&current.translation.resources) {
        return snapshot();
    }
    Update {
        version: current.version,
        snapshot: false,
        upserts,
        removes,
    }
}

/// Resources `role` receives that are new or changed in `next`, and keys gone from it; both
/// in key order.
fn delta(
    prev: &BTreeMap<String, Resource>,
    next: &BTreeMap<String, Resource>,
    role: Role,
) -> (Vec<Resource>, Vec<String>) {
    let upserts = next
        .iter()
        .filter(|(key, resource)| for_role(key, role) && prev.get(*key) != Some(resource))
        .map(|(_, resource)| resource.clone())
        .collect();
    let removes = prev
        .keys()
        .filter(|key| for_role(key, role) && !next.contains_key(*key))
        .cloned()
        .collect();
    (upserts, removes)
}

async fn read_acks(
    peer: String,
    proxy: Arc<Proxy>,
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
                        %peer,
                        version = ack.version,
                        key = %rejected.key,
                        reason = %rejected.reason,
                        "resource rejected by the receiver; it keeps its last good state for it"
                    );
                }
                proxy
                    .acked
                    .store(ack.version, std::sync::atomic::Ordering::Relaxed);
                proxy.rejected.fetch_add(
                    u64::try_from(ack.rejected.len()).unwrap_or(u64::MAX),
                    std::sync::atomic::Ordering::Relaxed,
                );
                tracing::debug!(%peer, version = ack.version, "acknowledged");
            }
            Ok(Some(AgentMessage {
                message: Some(Message::Hello(_)),
            })) => tracing::debug!(%peer, "ignoring a second Hello"),
            Ok(Some(AgentMessage { message: None })) => {
                tracing::debug!(%peer, "ignoring an empty message");
            }
            Ok(None) => break,
            Err(status) => {
                tracing::debug!(%peer, error = %status, "stream ended with an error");
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

        let first = update_between(None, &v1, Role::Agent);
        assert!(first.snapshot);
        assert_eq!(first.upserts.len(), 3);

        let update = update_between(Some(&v1), &v2, Role::Agent);
        assert!(!update.snapshot);
        assert_eq!(update.version, 2);
        assert_eq!(update.upserts, vec![b2.1, d.1]);
        assert_eq!(update.removes, vec!["node/c".to_owned()]);

        // Everything replaced: a snapshot is smaller than the delta.
        let v3 = published(3, &[node("x", "10.0.0.5:15008")]);
        assert!(update_between(Some(&v2), &v3, Role::Agent).snapshot);
    }

    fn route(name: &str, spec: &str) -> (String, Resource) {
        let key = format!("route/HTTPRoute/shop/{name}");
        (
            key.clone(),
            Resource {
                key,
                kind: Some(api::resource::Kind::Policy(api::Policy {
                    kind: "HTTPRoute".into(),
                    namespace: "shop".into(),
                    name: name.into(),
                    generation: 1,
                    spec_json: spec.into(),
                })),
            },
        )
    }

    #[test]
    fn routes_reach_waypoints_and_never_agents() {
        let a = node("a", "10.0.0.1:15008");
        let b = node("b", "10.0.0.2:15008");
        let r1 = route("r1", "{}");
        let r2 = route("r2", "{}");
        let v1 = published(1, &[a.clone(), b.clone(), r1.clone(), r2.clone()]);
        let keys = |u: &Update| u.upserts.iter().map(|r| r.key.clone()).collect::<Vec<_>>();

        let agent = update_between(None, &v1, Role::Agent);
        assert_eq!(keys(&agent), vec!["node/a", "node/b"]);
        let waypoint = update_between(None, &v1, Role::Waypoint);
        assert_eq!(
            keys(&waypoint),
            vec![
                "node/a",
                "node/b",
                "route/HTTPRoute/shop/r1",
                "route/HTTPRoute/shop/r2"
            ]
        );

        // A route changes and another goes: the agent hears nothing of either.
        let v2 = published(2, &[a.clone(), b.clone(), route("r1", r#"{"rules":[]}"#)]);
        let agent = update_between(Some(&v1), &v2, Role::Agent);
        assert!(!agent.snapshot, "an empty delta, not a snapshot");
        assert_eq!(agent.version, 2);
        assert!(
            agent.upserts.is_empty() && agent.removes.is_empty(),
            "{agent:?}"
        );
        let waypoint = update_between(Some(&v1), &v2, Role::Waypoint);
        assert!(!waypoint.snapshot);
        assert_eq!(keys(&waypoint), vec!["route/HTTPRoute/shop/r1"]);
        assert_eq!(waypoint.removes, vec!["route/HTTPRoute/shop/r2".to_owned()]);
    }
}
