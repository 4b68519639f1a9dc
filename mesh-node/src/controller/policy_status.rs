//! Reports the `Accepted` condition of each policy (`security.trellis.dev` and
//! `security.istio.io`, each written to the object in its own group) and TrafficPolicy
//! (`traffic.trellis.dev`): in the controller's log (both sources) and, with the Kubernetes
//! source, in the object's `status` (server-side apply on the status subresource, field
//! manager [`FIELD_MANAGER`]). Both kinds of status are one `conditions` list holding one
//! condition, which is why they share this writer.
//!
//! The condition is the one [`super::translate`] derived with the same conversion every agent
//! and waypoint runs, so what the status says is what they enforce. A condition is written when it
//! changes (its transition time only when its status does); a failed write is retried on a
//! timer. The first time this process sees an object it reads the object's status first: a
//! condition already there and still right is adopted, not written, so a restarted controller
//! rewrites nothing (and keeps the transition time of a condition whose status holds). Several controller replicas write the same condition under the same field manager,
//! so they converge on one value instead of fighting over it.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    core::{NamespaceResourceScope, object::HasStatus},
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Published, translate::Translation};
pub use crate::k8s::FIELD_MANAGER;
use crate::{
    k8s::{
        ISTIO_NETWORKING_API_VERSION, TRAFFIC_API_VERSION,
        status::{ACCEPTED, PolicyStatus},
    },
    l7::resilience::TrafficPolicy,
    policy::{
        AuthorizationPolicy, PeerAuthentication, PolicyId, PolicyKind, RequestAuthentication,
        SecurityGroup,
        status::{Condition, rfc3339, set_condition},
    },
};
pub(super) const RETRY: Duration = Duration::from_secs(10);

/// A kind whose status is one `Accepted` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Subject {
    Policy(SecurityGroup, PolicyKind),
    TrafficPolicy,
    /// `networking.istio.io` VirtualService or DestinationRule, by kind name.
    Istio(&'static str),
}

impl Subject {
    pub const fn api_version(self) -> &'static str {
        match self {
            Self::Policy(group, _) => group.api_version(),
            Self::TrafficPolicy => TRAFFIC_API_VERSION,
            Self::Istio(_) => ISTIO_NETWORKING_API_VERSION,
        }
    }

    pub const fn kind(self) -> &'static str {
        match self {
            Self::Policy(_, kind) => kind.as_str(),
            Self::TrafficPolicy => "TrafficPolicy",
            Self::Istio(kind) => kind,
        }
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Policy(group, kind) => f.write_str(group.qualified(*kind)),
            Self::TrafficPolicy | Self::Istio(_) => f.write_str(self.kind()),
        }
    }
}

type Key = (Subject, PolicyId);

/// Every condition `translation` derived, by object.
fn conditions(translation: &Translation) -> BTreeMap<Key, &Condition> {
    let policies = translation
        .policy_status
        .iter()
        .map(|((group, kind, id), c)| ((Subject::Policy(*group, *kind), id.clone()), c));
    let traffic = translation
        .traffic_policy_status
        .iter()
        .map(|(id, c)| ((Subject::TrafficPolicy, id.clone()), c));
    let istio = translation
        .istio_status
        .iter()
        .map(|((kind, id), c)| ((Subject::Istio(kind), id.clone()), c));
    policies.chain(traffic).chain(istio).collect()
}

/// Follows the published state until `stop`; `client` is `None` with the directory source.
pub async fn run(
    client: Option<Client>,
    mut state: watch::Receiver<Option<Arc<Published>>>,
    stop: CancellationToken,
) {
    // What each object's status says now (as far as this controller knows), with times.
    let mut reported: BTreeMap<Key, Condition> = BTreeMap::new();
    // Conditions still to write to the API server.
    let mut unwritten: BTreeMap<Key, Condition> = BTreeMap::new();
    // Objects whose status this process has not read or written yet.
    let mut unread: BTreeSet<Key> = BTreeSet::new();
    loop {
        let published = state.borrow_and_update().clone();
        if let Some(published) = published {
            let now = rfc3339(time::OffsetDateTime::now_utc());
            let current = conditions(&published.translation);
            reported.retain(|key, _| current.contains_key(key));
            unwritten.retain(|key, _| current.contains_key(key));
            unread.retain(|key| current.contains_key(key));
            for (key, condition) in current {
                let mut conditions: Vec<Condition> =
                    reported.get(&key).cloned().into_iter().collect();
                if set_condition(&mut conditions, condition.clone(), &now) {
                    let Some(new) = conditions.pop() else {
                        continue;
                    };
                    log(&key, &new);
                    if !reported.contains_key(&key) {
                        unread.insert(key.clone());
                    }
                    reported.insert(key.clone(), new.clone());
                    if client.is_some() {
                        unwritten.insert(key.clone(), new);
                    }
                }
            }
        }
        if let Some(client) = &client {
            let mut failed = BTreeMap::new();
            for (key, mut condition) in std::mem::take(&mut unwritten) {
                if unread.contains(&key) {
                    match live_condition(client, &key).await {
                        Ok(live) => {
                            unread.remove(&key);
                            let mut conditions: Vec<Condition> = live.into_iter().collect();
                            let now = rfc3339(time::OffsetDateTime::now_utc());
                            let changed = set_condition(&mut conditions, condition, &now);
                            let Some(merged) = conditions.pop() else {
                                continue;
                            };
                            reported.insert(key.clone(), merged.clone());
                            if !changed {
                                tracing::debug!(kind = %key.0, policy = %key.1, "the status is already right");
                                continue;
                            }
                            condition = merged;
                        }
                        Err(e) => {
                            tracing::warn!(kind = %key.0, policy = %key.1, error = %e, "cannot read the policy status; retrying");
                            failed.insert(key, condition);
                            continue;
                        }
                    }
                }
                if let Err(e) = write(client, &key, &condition).await {
                    tracing::warn!(kind = %key.0, policy = %key.1, error = %e, "cannot write the policy status; retrying");
                    failed.insert(key, condition);
                }
            }
            unwritten = failed;
        }
        let retry = async {
            if unwritten.is_empty() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(RETRY).await;
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = retry => {}
            changed = state.changed() => if changed.is_err() { return },
        }
    }
}

fn log(key: &Key, condition: &Condition) {
    let (kind, policy) = key;
    if condition.status == "True" {
        tracing::info!(%kind, %policy, generation = ?condition.observed_generation, "policy accepted");
    } else {
        let what = match kind {
            Subject::Policy(..) => "policy not enforced exactly as written",
            Subject::TrafficPolicy => "traffic policy not applied as written",
            Subject::Istio(_) => "Istio object not applied (traffic keeps its previous routing)",
        };
        tracing::warn!(
            %kind, %policy,
            generation = ?condition.observed_generation,
            reason = %condition.reason,
            message = %condition.message,
            "{what}"
        );
    }
}

/// The `Accepted` condition the object's status holds now (`None`: none, or no object).
async fn live_condition(client: &Client, key: &Key) -> Result<Option<Condition>, kube::Error> {
    let (kind, id) = key;
    let status = match kind {
        Subject::Policy(SecurityGroup::Trellis, PolicyKind::Authorization) => {
            read_status::<AuthorizationPolicy>(client, id).await
        }
        Subject::Policy(SecurityGroup::Trellis, PolicyKind::PeerAuthentication) => {
            read_status::<PeerAuthentication>(client, id).await
        }
        Subject::Policy(SecurityGroup::Trellis, PolicyKind::RequestAuthentication) => {
            read_status::<RequestAuthentication>(client, id).await
        }
        Subject::TrafficPolicy => read_status::<TrafficPolicy>(client, id).await,
        Subject::Policy(SecurityGroup::Istio, _) | Subject::Istio(_) => {
            untyped_api(client, *kind, id).get(&id.name).await.map(|o| {
                o.data
                    .get("status")
                    .and_then(|s| serde_json::from_value::<PolicyStatus>(s.clone()).ok())
            })
        }
    };
    match status {
        Ok(status) => {
            Ok(status.and_then(|s| s.conditions.into_iter().find(|c| c.type_ == ACCEPTED)))
        }
        // Deleted meanwhile: the next snapshot drops it; writing would fail the same way.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

async fn read_status<K>(client: &Client, id: &PolicyId) -> Result<Option<PolicyStatus>, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + HasStatus<Status = PolicyStatus>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    // The object itself (its status included): the controller may read the policies, and
    // only write their status subresource.
    let mut object = Api::<K>::namespaced(client.clone(), &id.namespace)
        .get(&id.name)
        .await?;
    Ok(object.status_mut().take())
}

async fn write(client: &Client, key: &Key, condition: &Condition) -> Result<(), kube::Error> {
    let (kind, id) = key;
    let patch = serde_json::json!({
        "apiVersion": kind.api_version(),
        "kind": kind.kind(),
        "status": {"conditions": [condition]},
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match kind {
        // Istio's kinds have no types of their own here (the security kinds are the twins'):
        // untyped.
        Subject::Policy(SecurityGroup::Istio, _) | Subject::Istio(_) => {
            untyped_api(client, *kind, id)
                .patch_status(&id.name, &params, &Patch::Apply(&patch))
                .await?;
        }
        Subject::Policy(SecurityGroup::Trellis, PolicyKind::Authorization) => {
            Api::<AuthorizationPolicy>::namespaced(client.clone(), &id.namespace)
                .patch_status(&id.name, &params, &Patch::Apply(&patch))
                .await?;
        }
        Subject::Policy(SecurityGroup::Trellis, PolicyKind::PeerAuthentication) => {
            Api::<PeerAuthentication>::namespaced(client.clone(), &id.namespace)
                .patch_status(&id.name, &params, &Patch::Apply(&patch))
                .await?;
        }
        Subject::Policy(SecurityGroup::Trellis, PolicyKind::RequestAuthentication) => {
            Api::<RequestAuthentication>::namespaced(client.clone(), &id.namespace)
                .patch_status(&id.name, &params, &Patch::Apply(&patch))
                .await?;
        }
        Subject::TrafficPolicy => {
            Api::<TrafficPolicy>::namespaced(client.clone(), &id.namespace)
                .patch_status(&id.name, &params, &Patch::Apply(&patch))
                .await?;
        }
    }
    Ok(())
}

/// The API of an Istio kind in `id`'s namespace, at the version the controller writes status
/// at (Trellis has no typed client for them).
fn untyped_api(client: &Client, kind: Subject, id: &PolicyId) -> Api<DynamicObject> {
    let plural = match kind {
        Subject::Policy(_, policy_kind) => policy_kind.plural(),
        Subject::TrafficPolicy => "trafficpolicies",
        Subject::Istio(name) if name == crate::l7::istio::VIRTUAL_SERVICE => "virtualservices",
        Subject::Istio(_) => "destinationrules",
    };
    let (group, version) = kind.api_version().split_once('/').unwrap_or_default();
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, kind.kind()),
        plural,
    );
    Api::namespaced_with(client.clone(), &id.namespace, &resource)
}

#[cfg(test)]
mod tests;
