//! Route status against a fake API server: entries applied beside other controllers', retries,
//! conflicts, and routes that need no write.

use std::time::Duration;

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use parking_lot::Mutex;

use super::*;
use crate::{
    controller::translate::Translation, k8s::WAYPOINT_CONTROLLER_NAME, policy::status::Condition,
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
                .map(http_body_util::Collected::to_bytes)
                .unwrap_or_default();
            let sent: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let query = parts.uri.query().unwrap_or_default().to_owned();
            recorded.lock().push((
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
                        object["metadata"]["resourceVersion"] = json!((version + 1).to_string());
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
    tokio::time::timeout(Duration::from_mins(1), async {
        loop {
            let got = calls.lock().clone();
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
    assert_eq!(calls.lock().len(), 4);

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
    let got = calls.lock().clone();
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
    let got = calls.lock().clone();
    assert_eq!(methods(&got[4..]), ["GET"]);
    assert_eq!(got[4].1, format!("{ROUTE_PATH}?"));
    stop.cancel();
    task.await.expect("no panic");
}
