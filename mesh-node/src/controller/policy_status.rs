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
//! timer. Several controller replicas write the same condition under the same field manager,
//! so they converge on one value instead of fighting over it.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Published, translate::Translation};
use crate::{
    k8s::TRAFFIC_API_VERSION,
    l7::resilience::TrafficPolicy,
    policy::{
        AuthorizationPolicy, PeerAuthentication, PolicyId, PolicyKind, RequestAuthentication,
        SecurityGroup,
        status::{Condition, rfc3339, set_condition},
    },
};

pub use crate::k8s::FIELD_MANAGER;
pub(super) const RETRY: Duration = Duration::from_secs(10);

/// A kind whose status is one `Accepted` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Subject {
    Policy(SecurityGroup, PolicyKind),
    TrafficPolicy,
}

impl Subject {
    pub const fn api_version(self) -> &'static str {
        match self {
            Self::Policy(group, _) => group.api_version(),
            Self::TrafficPolicy => TRAFFIC_API_VERSION,
        }
    }

    pub const fn kind(self) -> &'static str {
        match self {
            Self::Policy(_, kind) => kind.as_str(),
            Self::TrafficPolicy => "TrafficPolicy",
        }
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Policy(group, kind) => f.write_str(group.qualified(*kind)),
            Self::TrafficPolicy => f.write_str(self.kind()),
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
    policies.chain(traffic).collect()
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
    loop {
        let published = state.borrow_and_update().clone();
        if let Some(published) = published {
            let now = rfc3339(time::OffsetDateTime::now_utc());
            let current = conditions(&published.translation);
            reported.retain(|key, _| current.contains_key(key));
            unwritten.retain(|key, _| current.contains_key(key));
            for (key, condition) in current {
                let mut conditions: Vec<Condition> =
                    reported.get(&key).cloned().into_iter().collect();
                if set_condition(&mut conditions, condition.clone(), &now) {
                    let Some(new) = conditions.pop() else {
                        continue;
                    };
                    log(&key, &new);
                    reported.insert(key.clone(), new.clone());
                    if client.is_some() {
                        unwritten.insert(key.clone(), new);
                    }
                }
            }
        }
        if let Some(client) = &client {
            let mut failed = BTreeMap::new();
            for (key, condition) in std::mem::take(&mut unwritten) {
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

async fn write(client: &Client, key: &Key, condition: &Condition) -> Result<(), kube::Error> {
    let (kind, id) = key;
    let patch = serde_json::json!({
        "apiVersion": kind.api_version(),
        "kind": kind.kind(),
        "status": {"conditions": [condition]},
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match kind {
        // Istio's kinds have no types of their own here (they are the twins'): untyped.
        Subject::Policy(SecurityGroup::Istio, policy_kind) => {
            let (group, version) = kind.api_version().split_once('/').unwrap_or_default();
            let resource = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, version, policy_kind.as_str()),
                policy_kind.plural(),
            );
            Api::<DynamicObject>::namespaced_with(client.clone(), &id.namespace, &resource)
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

#[cfg(test)]
mod tests;
