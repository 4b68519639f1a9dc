//! Policy status against a fake API server: one read when an object is first seen, one write
//! per change, retries, each kind to its own resource, and no write of a status already right.

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use parking_lot::Mutex;
use serde_json::{Value, json};

use super::*;

type Calls = Arc<Mutex<Vec<(Method, String, Value)>>>;

/// An API server that accepts every request (the first `fail` with a 500) and records it.
fn api_server(fail: usize) -> (Client, Calls) {
    api_server_with(fail, None)
}

/// [`api_server`] whose objects hold `status` when read.
fn api_server_with(fail: usize, stored: Option<Value>) -> (Client, Calls) {
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
                .map(http_body_util::Collected::to_bytes)
                .unwrap_or_default();
            let sent: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let query = parts.uri.query().unwrap_or_default().to_owned();
            recorded.lock().push((
                parts.method.clone(),
                format!("{}?{query}", parts.uri.path()),
                sent.clone(),
            ));
            seen += 1;
            let status = if seen <= fail { 500 } else { 200 };
            // The object as patched (the applied status on a minimal object), or as stored.
            let mut object = sent.clone();
            if parts.method == Method::GET
                && let Some(stored) = &stored
            {
                object["status"] = stored.clone();
            }
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
            Subject::Policy(group, kind) => translation
                .policy_status
                .insert((group, kind, id), condition),
            Subject::TrafficPolicy => translation.traffic_policy_status.insert(id, condition),
            Subject::Istio(kind) => translation.istio_status.insert((kind, id), condition),
        };
    }
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
    .expect("status writes")
}

#[tokio::test(start_paused = true)]
async fn conditions_are_applied_to_the_status_once_per_change_and_retried() {
    let (client, calls) = api_server(1);
    let (tx, rx) = watch::channel(Some(published(
        Subject::Policy(SecurityGroup::Trellis, PolicyKind::Authorization),
        &[("p", "True", "Accepted")],
    )));
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(Some(client), rx, stop.clone()));

    // The first read fails and is retried after the retry delay; then the write.
    let got = wait_calls(&calls, 3).await;
    assert_eq!(got[0].0, Method::GET);
    assert_eq!(got[1].0, Method::GET);
    let (method, path, body) = &got[2];
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
        Subject::Policy(SecurityGroup::Trellis, PolicyKind::Authorization),
        &[("p", "True", "Accepted")],
    )));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(calls.lock().len(), 3);
    tx.send_replace(Some(published(
        Subject::Policy(SecurityGroup::Trellis, PolicyKind::Authorization),
        &[("p", "False", "PartiallyEnforced")],
    )));
    let got = wait_calls(&calls, 4).await;
    assert_eq!(got[3].0, Method::PATCH, "no second read");
    assert_eq!(
        got[3].2["status"]["conditions"][0]["reason"],
        json!("PartiallyEnforced")
    );
    stop.cancel();
    task.await.expect("no panic");
}

#[tokio::test(start_paused = true)]
async fn each_kind_is_written_to_its_own_resource() {
    for (kind, collection) in [
        (
            Subject::Policy(SecurityGroup::Trellis, PolicyKind::PeerAuthentication),
            "security.trellis.dev/v1/namespaces/shop/peerauthentications",
        ),
        (
            Subject::Policy(SecurityGroup::Trellis, PolicyKind::RequestAuthentication),
            "security.trellis.dev/v1/namespaces/shop/requestauthentications",
        ),
        (
            Subject::TrafficPolicy,
            "traffic.trellis.dev/v1/namespaces/shop/trafficpolicies",
        ),
        (
            Subject::Policy(SecurityGroup::Istio, PolicyKind::Authorization),
            "security.istio.io/v1/namespaces/shop/authorizationpolicies",
        ),
        (
            Subject::Policy(SecurityGroup::Istio, PolicyKind::PeerAuthentication),
            "security.istio.io/v1/namespaces/shop/peerauthentications",
        ),
        (
            Subject::Policy(SecurityGroup::Istio, PolicyKind::RequestAuthentication),
            "security.istio.io/v1/namespaces/shop/requestauthentications",
        ),
    ] {
        let (client, calls) = api_server(0);
        let (_tx, rx) = watch::channel(Some(published(kind, &[("p", "True", "Accepted")])));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(Some(client), rx, stop.clone()));
        let got = wait_calls(&calls, 2).await;
        assert_eq!(got[0].0, Method::GET);
        assert!(
            got[0].1.starts_with(&format!("/apis/{collection}/p?")),
            "{}",
            got[0].1
        );
        let (method, path, body) = &got[1];
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

/// A stored `Accepted` condition as the previous run of the controller wrote it.
fn stored(status: &str, reason: &str) -> Value {
    json!({"conditions": [{
        "type": "Accepted", "status": status, "reason": reason, "message": "m",
        "observedGeneration": 4, "lastTransitionTime": "2026-01-02T03:04:05Z",
    }]})
}

#[tokio::test(start_paused = true)]
async fn a_status_already_right_is_read_once_and_never_written() {
    let (client, calls) = api_server_with(0, Some(stored("True", "Accepted")));
    let (tx, rx) = watch::channel(Some(published(
        Subject::Policy(SecurityGroup::Trellis, PolicyKind::Authorization),
        &[("p", "True", "Accepted")],
    )));
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(Some(client), rx, stop.clone()));
    let got = wait_calls(&calls, 1).await;
    assert_eq!(got[0].0, Method::GET);
    // Later snapshots with the same condition neither read nor write again.
    tx.send_replace(Some(published(
        Subject::Policy(SecurityGroup::Trellis, PolicyKind::Authorization),
        &[("p", "True", "Accepted")],
    )));
    tokio::time::sleep(Duration::from_mins(1)).await;
    assert_eq!(calls.lock().len(), 1, "no write");
    stop.cancel();
    task.await.expect("no panic");
}

#[tokio::test(start_paused = true)]
async fn a_changed_reason_keeps_the_stored_transition_time_while_the_status_holds() {
    let (client, calls) = api_server_with(0, Some(stored("True", "Accepted")));
    let (_tx, rx) = watch::channel(Some(published(
        Subject::Policy(SecurityGroup::Trellis, PolicyKind::Authorization),
        &[("p", "True", "AcceptedWithWarnings")],
    )));
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(Some(client), rx, stop.clone()));
    let got = wait_calls(&calls, 2).await;
    let condition = &got[1].2["status"]["conditions"][0];
    assert_eq!(got[1].0, Method::PATCH);
    assert_eq!(condition["reason"], "AcceptedWithWarnings");
    assert_eq!(condition["lastTransitionTime"], "2026-01-02T03:04:05Z");
    stop.cancel();
    task.await.expect("no panic");
}
