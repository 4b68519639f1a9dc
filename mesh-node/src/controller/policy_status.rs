//! Reports the `Accepted` condition of each policy (`security.trellis.dev`) and TrafficPolicy
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
    api::{Patch, PatchParams},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Published, translate::Translation};
use crate::{
    k8s::TRAFFIC_API_VERSION,
    l7::resilience::TrafficPolicy,
    policy::{
        AuthorizationPolicy, PeerAuthentication, PolicyId, PolicyKind, RequestAuthentication,
        status::{Condition, rfc3339, set_condition},
    },
};

pub use crate::k8s::FIELD_MANAGER;
pub(super) const RETRY: Duration = Duration::from_secs(10);

/// A kind whose status is one `Accepted` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Subject {
    Policy(PolicyKind),
    TrafficPolicy,
}

impl Subject {
    pub const fn api_version(self) -> &'static str {
        match self {
            Self::Policy(_) => PolicyKind::API_VERSION,
            Self::TrafficPolicy => TRAFFIC_API_VERSION,
        }
    }

    pub const fn kind(self) -> &'static str {
        match self {
            Self::Policy(kind) => kind.as_str(),
            Self::TrafficPolicy => "TrafficPolicy",
        }
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

type Key = (Subject, PolicyId);

/// Every condition `translation` derived, by object.
fn conditions(translation: &Translation) -> BTreeMap<Key, &Condition> {
    let policies = translation
        .policy_status
        .iter()
        .map(|((kind, id), c)| ((Subject::Policy(*kind), id.clone()), c));
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
            Subject::Policy(_) => "policy not enforced exactly as written",
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
        Subject::Policy(PolicyKind::Authorization) => {
            Api::<AuthorizationPolicy>::namespaced(client.clone(), &id.namespace)
                .patch_status(&id.name, &params, &Patch::Apply(&patch))
                .await?;
        }
        Subject::Policy(PolicyKind::PeerAuthentication) => {
            Api::<PeerAuthentication>::namespaced(client.clone(), &id.namespace)
                .patch_status(&id.name, &params, &Patch::Apply(&patch))
                .await?;
        }
        Subject::Policy(PolicyKind::RequestAuthentication) => {
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
mod tests {
    use std::sync::Mutex;

    use http::{Method, Request, Response};
    use http_body_util::BodyExt;
    use kube::client::Body;
    use serde_json::{Value, json};

    use super::*;

    type Calls = Arc<Mutex<Vec<(Method, String, Value)>>>;

    /// An API server that accepts every request (the first `fail` with a 500) and records it.
    fn api_server(fail: usize) -> (Client, Calls) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let calls: Calls = Arc::default();
        let recorded = calls.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            while let Some((request, respond)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let sent: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let query = parts.uri.query().unwrap_or_default().to_owned();
                recorded.lock().expect("calls").push((
                    parts.method,
                    format!("{}?{query}", parts.uri.path()),
                    sent.clone(),
                ));
                seen += 1;
                let status = if seen <= fail { 500 } else { 200 };
                // The object as patched: the applied status on a minimal object.
                let mut object = sent.clone();
                object["metadata"] = json!({"name": "p", "namespace": "shop"});
                object["spec"] = json!({});
                let response = Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&object).expect("json")))
                    .expect("response");
                respond.send_response(response);
            }
        });
        (Client::new(service, "default"), calls)
    }

    fn published(kind: Subject, conditions: &[(&str, &str, &str)]) -> Arc<Published> {
        let mut translation = Translation::default();
        for (name, status, reason) in conditions {
            let id = PolicyId {
                namespace: "shop".into(),
                name: (*name).into(),
            };
            let condition = Condition {
                type_: "Accepted".into(),
                status: (*status).into(),
                reason: (*reason).into(),
                message: "m".into(),
                observed_generation: Some(4),
                last_transition_time: String::new(),
            };
            match kind {
                Subject::Policy(kind) => translation.policy_status.insert((kind, id), condition),
                Subject::TrafficPolicy => translation.traffic_policy_status.insert(id, condition),
            };
        }
        Arc::new(Published {
            version: 1,
            translation,
        })
    }

    async fn wait_calls(calls: &Calls, n: usize) -> Vec<(Method, String, Value)> {
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let got = calls.lock().expect("calls").clone();
                if got.len() >= n {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("status writes")
    }

    #[tokio::test(start_paused = true)]
    async fn conditions_are_applied_to_the_status_once_per_change_and_retried() {
        let (client, calls) = api_server(1);
        let (tx, rx) = watch::channel(Some(published(
            Subject::Policy(PolicyKind::Authorization),
            &[("p", "True", "Accepted")],
        )));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(Some(client), rx, stop.clone()));

        // The first write fails and is retried after the retry delay.
        let got = wait_calls(&calls, 2).await;
        let (method, path, body) = &got[1];
        assert_eq!(method, Method::PATCH);
        assert!(
            path.starts_with(
                "/apis/security.trellis.dev/v1/namespaces/shop/authorizationpolicies/p/status?"
            ),
            "{path}"
        );
        assert!(
            path.contains("fieldManager=trellis-controller") && path.contains("force=true"),
            "server-side apply under the controller's field manager: {path}"
        );
        assert_eq!(body["kind"], "AuthorizationPolicy");
        let condition = &body["status"]["conditions"][0];
        assert_eq!(condition["observedGeneration"], 4);
        assert_eq!(condition["reason"], "Accepted");
        let first_time = condition["lastTransitionTime"].clone();
        assert!(first_time.as_str().is_some_and(|t| t.ends_with('Z')));

        // The same condition again writes nothing; a changed one writes once.
        tx.send_replace(Some(published(
            Subject::Policy(PolicyKind::Authorization),
            &[("p", "True", "Accepted")],
        )));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(calls.lock().expect("calls").len(), 2);
        tx.send_replace(Some(published(
            Subject::Policy(PolicyKind::Authorization),
            &[("p", "False", "PartiallyEnforced")],
        )));
        let got = wait_calls(&calls, 3).await;
        assert_eq!(
            got[2].2["status"]["conditions"][0]["reason"],
            json!("PartiallyEnforced")
        );
        stop.cancel();
        task.await.expect("no panic");
    }

    #[tokio::test(start_paused = true)]
    async fn each_kind_is_written_to_its_own_resource() {
        for (kind, collection) in [
            (
                Subject::Policy(PolicyKind::PeerAuthentication),
                "security.trellis.dev/v1/namespaces/shop/peerauthentications",
            ),
            (
                Subject::Policy(PolicyKind::RequestAuthentication),
                "security.trellis.dev/v1/namespaces/shop/requestauthentications",
            ),
            (
                Subject::TrafficPolicy,
                "traffic.trellis.dev/v1/namespaces/shop/trafficpolicies",
            ),
        ] {
            let (client, calls) = api_server(0);
            let (_tx, rx) = watch::channel(Some(published(kind, &[("p", "True", "Accepted")])));
            let stop = CancellationToken::new();
            let task = tokio::spawn(run(Some(client), rx, stop.clone()));
            let got = wait_calls(&calls, 1).await;
            let (method, path, body) = &got[0];
            assert_eq!(method, Method::PATCH);
            assert!(
                path.starts_with(&format!("/apis/{collection}/p/status?")),
                "{path}"
            );
            assert_eq!(body["kind"], kind.kind());
            assert!(
                collection.starts_with(body["apiVersion"].as_str().unwrap_or("?")),
                "{collection}: {body}"
            );
            stop.cancel();
            task.await.expect("no panic");
        }
    }
}
