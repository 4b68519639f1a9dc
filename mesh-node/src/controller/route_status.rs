//! Reports how the waypoints take each HTTPRoute and GRPCRoute: in the controller's log (both
//! sources) and, with the Kubernetes source, in the route's `status.parents`, one entry per
//! parent the waypoints serve (`controllerName: trellis.dev/waypoint`, conditions `Accepted`
//! and `ResolvedRefs`; see [`crate::l7::route::status`]). The entries are the ones
//! [`super::translate`] derived with the waypoints' own route conversion.
//!
//! **Why a read before each write.** The Gateway API declares `status.parents` an atomic list
//! (`+listType=atomic`): the API server keeps it as one value with one owner, so a server-side
//! apply of only this controller's entries would replace the whole list and delete the
//! entries of every other controller serving the same route (a route may name a waypoint and
//! another implementation's Gateway). So each write reads the route, keeps the other
//! controllers' entries (and the transition times of our conditions whose status holds), and
//! applies the whole list with server-side apply (field manager [`FIELD_MANAGER`]) and the
//! route's `resourceVersion` as a precondition: if anyone wrote in between, the API server
//! answers 409 Conflict and the write is retried later on a fresh read, never over their
//! entry. A route whose status already holds exactly these entries is not written, so a
//! restarted controller rewrites nothing.
//!
//! A route's entries are written when they change (and once when the controller first sees
//! the route, to remove entries a previous run left for parents it no longer serves); failed
//! writes are retried on a timer.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    Published,
    policy_status::{FIELD_MANAGER, RETRY},
};
use crate::k8s::GATEWAY_API_VERSION;
use crate::{
    k8s::gateway::ParentReference,
    l7::route::{ParentStatus, RouteId, RouteKind, RouteStatus},
    policy::status::rfc3339,
};

/// Follows the published state until `stop`; `client` is `None` with the directory source.
pub async fn run(
    client: Option<Client>,
    mut state: watch::Receiver<Option<Arc<Published>>>,
    stop: CancellationToken,
) {
    // Each route's entries as last derived (and logged), without transition times.
    let mut reported: BTreeMap<RouteId, Vec<ParentStatus>> = BTreeMap::new();
    // Routes whose entries are still to be written to the API server.
    let mut unwritten: BTreeSet<RouteId> = BTreeSet::new();
    loop {
        let published = state.borrow_and_update().clone();
        if let Some(published) = published {
            let current = &published.translation.route_status;
            reported.retain(|id, _| current.contains_key(id));
            unwritten.retain(|id| current.contains_key(id));
            for (id, parents) in current {
                if reported.get(id) == Some(parents) {
                    continue;
                }
                log(id, parents);
                reported.insert(id.clone(), parents.clone());
                if client.is_some() {
                    unwritten.insert(id.clone());
                }
            }
        }
        if let Some(client) = &client {
            let mut failed = BTreeSet::new();
            for id in std::mem::take(&mut unwritten) {
                let Some(parents) = reported.get(&id) else {
                    continue;
                };
                if let Err(e) = write(client, &id, parents).await {
                    tracing::warn!(route = %id, error = %e, "cannot write the route status; retrying");
                    failed.insert(id);
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

/// `Gateway shop/waypoint`, `Service shop/web:8080`: a parent reference for log lines.
fn describe(parent: &ParentReference, route_namespace: &str) -> String {
    let kind = parent.kind.as_deref().unwrap_or("Gateway");
    let namespace = parent.namespace.as_deref().unwrap_or(route_namespace);
    let mut out = format!("{kind} {namespace}/{}", parent.name);
    if let Some(section) = &parent.section_name {
        out.push('/');
        out.push_str(section);
    }
    if let Some(port) = parent.port {
        out.push_str(&format!(":{port}"));
    }
    out
}

fn log(id: &RouteId, parents: &[ParentStatus]) {
    if parents.is_empty() {
        tracing::debug!(route = %id, "no parent of this route is served by a waypoint");
    }
    for parent in parents {
        let name = describe(&parent.parent_ref, &id.namespace);
        let problems: Vec<_> = parent
            .conditions
            .iter()
            .filter(|c| c.status != "True")
            .collect();
        let generation = parent
            .conditions
            .first()
            .and_then(|c| c.observed_generation);
        if problems.is_empty() {
            tracing::info!(route = %id, parent = %name, ?generation, "route accepted");
        }
        for c in problems {
            tracing::warn!(
                route = %id, parent = %name, ?generation,
                condition = %c.type_, reason = %c.reason, message = %c.message,
                "route not served as written"
            );
        }
    }
}

fn api(client: &Client, id: &RouteId) -> Api<DynamicObject> {
    let (group, version) = GATEWAY_API_VERSION
        .split_once('/')
        .unwrap_or(("", GATEWAY_API_VERSION));
    let plural = match id.kind {
        RouteKind::Http => "httproutes",
        RouteKind::Grpc => "grpcroutes",
    };
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, id.kind.as_str()),
        plural,
    );
    Api::namespaced_with(client.clone(), &id.namespace, &resource)
}

/// The `parents` of a route's `status` (`[]` when it has none).
fn parents_of(status: Option<&Value>) -> Value {
    status
        .and_then(|s| s.get("parents"))
        .cloned()
        .unwrap_or_else(|| json!([]))
}

/// Reads the route and applies its `status` with `parents` as our entries, unless it already
/// says exactly that. A route that no longer exists needs nothing.
async fn write(client: &Client, id: &RouteId, parents: &[ParentStatus]) -> Result<(), kube::Error> {
    let api = api(client, id);
    let Some(route) = api.get_opt(&id.name).await? else {
        return Ok(());
    };
    let previous = route.data.get("status");
    let now = rfc3339(time::OffsetDateTime::now_utc());
    let status = RouteStatus {
        parents: parents.to_vec(),
    }
    .to_status_json(previous, &now);
    if parents_of(previous) == parents_of(Some(&status)) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": GATEWAY_API_VERSION,
        "kind": id.kind.as_str(),
        "metadata": {
            "name": id.name,
            "namespace": id.namespace,
            // A precondition: the list is replaced whole, so it must be the one just read.
            "resourceVersion": route.metadata.resource_version,
        },
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&id.name, &params, &Patch::Apply(&patch))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{sync::Mutex, time::Duration};

    use http::{Method, Request, Response};
    use http_body_util::BodyExt;
    use kube::client::Body;

    use super::*;
    use crate::{
        controller::translate::Translation, k8s::WAYPOINT_CONTROLLER_NAME,
        policy::status::Condition,
    };

    /// What the API server answers a request it refuses with `code`.
    fn failure(code: u16, reason: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": reason, "reason": reason, "code": code})
    }

    type Calls = Arc<Mutex<Vec<(Method, String, Value)>>>;

    const ROUTE_PATH: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/web";

    /// An API server holding one object at `path`: answers reads with it (404 for any other
    /// path), and applies status patches to it while they carry its current resourceVersion
    /// (409 otherwise), bumping the version; the first patches get the statuses in `fail`.
    fn api_server(path: &str, object: Value, fail: Vec<u16>) -> (Client, Calls) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let calls: Calls = Arc::default();
        let recorded = calls.clone();
        let path = path.to_owned();
        tokio::spawn(async move {
            let mut object = object;
            let mut fail = std::collections::VecDeque::from(fail);
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
                    parts.method.clone(),
                    format!("{}?{query}", parts.uri.path()),
                    sent.clone(),
                ));
                let status_path = format!("{path}/status");
                let (code, reply) = match (&parts.method, parts.uri.path()) {
                    (&Method::GET, p) if p == path => (200, object.clone()),
                    (&Method::PATCH, p) if p == status_path => match fail.pop_front() {
                        Some(409) => (409, failure(409, "Conflict")),
                        Some(code) => (code, failure(code, "InternalError")),
                        None if sent["metadata"]["resourceVersion"]
                            != object["metadata"]["resourceVersion"] =>
                        {
                            (409, failure(409, "Conflict"))
                        }
                        None => {
                            let version: u64 = object["metadata"]["resourceVersion"]
                                .as_str()
                                .and_then(|v| v.parse().ok())
                                .unwrap_or_default();
                            object["status"] = sent["status"].clone();
                            object["metadata"]["resourceVersion"] =
                                json!((version + 1).to_string());
                            (200, object.clone())
                        }
                    },
                    _ => (404, failure(404, "NotFound")),
                };
                let response = Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&reply).expect("json")))
                    .expect("response");
                respond.send_response(response);
            }
        });
        (Client::new(service, "default"), calls)
    }

    fn route(kind: &str, status: Value) -> Value {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": kind,
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "7",
                         "generation": 3},
            "spec": {"parentRefs": [{"name": "edge"}, {"name": "waypoint"}]},
            "status": status})
    }

    fn condition(type_: &str, ok: bool, reason: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: if ok { "True" } else { "False" }.into(),
            reason: reason.into(),
            message: "m".into(),
            observed_generation: Some(3),
            last_transition_time: String::new(),
        }
    }

    /// The waypoint `waypoint` accepts (or not) the route `kind shop/web`.
    fn published(kind: RouteKind, accepted: bool) -> Arc<Published> {
        let mut translation = Translation::default();
        translation.route_status.insert(
            RouteId {
                kind,
                namespace: "shop".into(),
                name: "web".into(),
            },
            vec![ParentStatus {
                parent_ref: ParentReference {
                    name: "waypoint".into(),
                    ..ParentReference::default()
                },
                conditions: vec![
                    condition(
                        "Accepted",
                        accepted,
                        if accepted {
                            "Accepted"
                        } else {
                            "UnsupportedValue"
                        },
                    ),
                    condition("ResolvedRefs", true, "ResolvedRefs"),
                ],
            }],
        );
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
        .expect("API calls")
    }

    fn methods(calls: &[(Method, String, Value)]) -> Vec<&str> {
        calls.iter().map(|(m, _, _)| m.as_str()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn entries_are_applied_beside_other_controllers_and_retried_after_a_500() {
        let theirs = json!({"parentRef": {"name": "edge"}, "controllerName": "example.com/gateway",
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                            "message": "", "lastTransitionTime": "2024-01-01T00:00:00Z"}]});
        // Left by an earlier run for a parent the waypoints no longer serve.
        let stale = json!({"parentRef": {"name": "old"}, "controllerName": WAYPOINT_CONTROLLER_NAME,
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                            "message": "", "lastTransitionTime": "2024-01-01T00:00:00Z"}]});
        let (client, calls) = api_server(
            ROUTE_PATH,
            route("HTTPRoute", json!({"parents": [theirs.clone(), stale]})),
            vec![500],
        );
        let (tx, rx) = watch::channel(Some(published(RouteKind::Http, true)));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(Some(client), rx, stop.clone()));

        // Read, apply (500), and after the retry delay read and apply again.
        let got = wait_calls(&calls, 4).await;
        assert_eq!(methods(&got), ["GET", "PATCH", "GET", "PATCH"]);
        let (_, path, body) = &got[3];
        assert!(path.starts_with(&format!("{ROUTE_PATH}/status?")), "{path}");
        assert!(
            path.contains("fieldManager=trellis-controller") && path.contains("force=true"),
            "server-side apply under the controller's field manager: {path}"
        );
        assert_eq!(body["kind"], "HTTPRoute");
        assert_eq!(body["apiVersion"], "gateway.networking.k8s.io/v1");
        assert_eq!(
            body["metadata"]["resourceVersion"], "7",
            "the version read is a precondition of the write"
        );
        let parents = body["status"]["parents"].as_array().expect("parents");
        assert_eq!(parents.len(), 2, "{parents:?}");
        assert_eq!(
            parents[0], theirs,
            "another controller's entry is kept as it was"
        );
        let ours = &parents[1];
        assert_eq!(ours["controllerName"], WAYPOINT_CONTROLLER_NAME);
        assert_eq!(ours["parentRef"], json!({"name": "waypoint"}));
        let conditions = ours["conditions"].as_array().expect("conditions");
        assert_eq!(conditions.len(), 2);
        assert_eq!(conditions[0]["type"], "Accepted");
        assert_eq!(conditions[0]["observedGeneration"], 3);
        let accepted_at = conditions[0]["lastTransitionTime"].clone();
        assert!(accepted_at.as_str().is_some_and(|t| t.ends_with('Z')));

        // The same entries again: nothing is read or written.
        tx.send_replace(Some(published(RouteKind::Http, true)));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(calls.lock().expect("calls").len(), 4);

        // A change is written once, on the version the last write left.
        tx.send_replace(Some(published(RouteKind::Http, false)));
        let got = wait_calls(&calls, 6).await;
        assert_eq!(methods(&got[4..]), ["GET", "PATCH"]);
        let body = &got[5].2;
        assert_eq!(body["metadata"]["resourceVersion"], "8");
        assert_eq!(
            body["status"]["parents"][1]["conditions"][0]["reason"],
            "UnsupportedValue"
        );
        assert_eq!(
            body["status"]["parents"][1]["conditions"][1]["lastTransitionTime"], accepted_at,
            "a condition whose status holds keeps its transition time"
        );
        stop.cancel();
        task.await.expect("no panic");
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_already_showing_its_entries_is_only_read() {
        let (client, calls) = api_server(ROUTE_PATH, route("HTTPRoute", Value::Null), vec![]);
        let (tx, rx) = watch::channel(Some(published(RouteKind::Http, true)));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(Some(client.clone()), rx, stop.clone()));
        wait_calls(&calls, 2).await;
        stop.cancel();
        task.await.expect("no panic");

        // A restarted controller reads the route once and finds nothing to change.
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(Some(client), tx.subscribe(), stop.clone()));
        tokio::time::sleep(Duration::from_secs(30)).await;
        let got = calls.lock().expect("calls").clone();
        assert_eq!(methods(&got), ["GET", "PATCH", "GET"]);
        stop.cancel();
        task.await.expect("no panic");
    }

    #[tokio::test(start_paused = true)]
    async fn a_conflict_is_retried_on_a_fresh_read_and_a_deleted_route_is_left_alone() {
        let grpc = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/grpcroutes/web";
        let (client, calls) = api_server(grpc, route("GRPCRoute", Value::Null), vec![409]);
        let (tx, rx) = watch::channel(Some(published(RouteKind::Grpc, true)));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(Some(client), rx, stop.clone()));
        let got = wait_calls(&calls, 4).await;
        assert_eq!(methods(&got), ["GET", "PATCH", "GET", "PATCH"]);
        assert!(
            got[3].1.starts_with(&format!("{grpc}/status?")),
            "{}",
            got[3].1
        );
        assert_eq!(got[3].2["kind"], "GRPCRoute");

        // An HTTPRoute the API server no longer has: read once, never written or retried.
        tx.send_replace(Some(published(RouteKind::Http, true)));
        tokio::time::sleep(Duration::from_secs(30)).await;
        let got = calls.lock().expect("calls").clone();
        assert_eq!(methods(&got[4..]), ["GET"]);
        assert_eq!(got[4].1, format!("{ROUTE_PATH}?"));
        stop.cancel();
        task.await.expect("no panic");
    }
}
