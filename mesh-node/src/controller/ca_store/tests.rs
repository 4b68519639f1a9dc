//! The root CA's stores against a fake API server: loading, generating, the creation race,
//! damaged Secrets, RBAC errors and the trust bundle.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use parking_lot::Mutex;
use serde_json::{Value, json};

use super::*;

type Calls = Arc<Mutex<Vec<(Method, String, Value)>>>;

/// A recorded API server: answers each request with the next scripted response and
/// records what was asked.
fn api_server(script: Vec<(StatusCode, Value)>) -> (Client, Calls) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let calls: Calls = Arc::default();
    let recorded = calls.clone();
    tokio::spawn(async move {
        for (status, body) in script {
            let Some((request, respond)) = handle.next_request().await else {
                return;
            };
            let (parts, request_body) = request.into_parts();
            let bytes = request_body
                .collect()
                .await
                .map(http_body_util::Collected::to_bytes)
                .unwrap_or_default();
            let sent = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            recorded
                .lock()
                .push((parts.method, parts.uri.path().to_owned(), sent));
            let response = Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&body).expect("json")))
                .expect("response");
            respond.send_response(response);
        }
    });
    (Client::new(service, "default"), calls)
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": reason, "reason": reason, "code": code})
}

fn secret_body(ca: &LocalCa) -> Value {
    let data = BTreeMap::from([
        (SECRET_CERT.to_owned(), ByteString(ca.cert_pem().into())),
        (SECRET_KEY.to_owned(), ByteString(ca.key_pem().into())),
    ]);
    let mut body = serde_json::to_value(Secret {
        metadata: ObjectMeta {
            name: Some("trellis-ca".into()),
            namespace: Some("trellis-system".into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    })
    .expect("json");
    body["apiVersion"] = "v1".into();
    body["kind"] = "Secret".into();
    body
}

fn at() -> ObjectRef {
    "trellis-system/trellis-ca".parse().expect("ref")
}

const SECRET_PATH: &str = "/api/v1/namespaces/trellis-system/secrets/trellis-ca";
const SECRETS_PATH: &str = "/api/v1/namespaces/trellis-system/secrets";

#[tokio::test]
async fn an_existing_root_is_loaded_and_nothing_is_created() {
    let root = LocalCa::generate("cluster.local").expect("root");
    let (client, calls) = api_server(vec![(StatusCode::OK, secret_body(&root))]);
    let ca = load_or_create_secret(client, &at(), "cluster.local")
        .await
        .expect("loaded");
    assert_eq!(ca.cert_pem(), root.cert_pem());
    let calls = calls.lock();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (&calls[0].0, calls[0].1.as_str()),
        (&Method::GET, SECRET_PATH)
    );
}

#[tokio::test]
async fn a_missing_root_is_generated_and_stored_as_a_tls_secret() {
    let (client, calls) = api_server(vec![
        (StatusCode::NOT_FOUND, status(404, "NotFound")),
        // The API server echoes the created object; its content is not read back.
        (
            StatusCode::CREATED,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {}}),
        ),
    ]);
    let ca = load_or_create_secret(client, &at(), "cluster.local")
        .await
        .expect("created");
    let calls = calls.lock();
    assert_eq!(calls.len(), 2);
    let (method, path, sent) = &calls[1];
    assert_eq!((method, path.as_str()), (&Method::POST, SECRETS_PATH));
    assert_eq!(sent["type"], "kubernetes.io/tls");
    // What was stored is exactly the root now in use: a restart signs with the same one.
    let stored = Secret {
        data: serde_json::from_value(sent["data"].clone()).expect("data"),
        ..Default::default()
    };
    let reloaded = from_secret(&at(), &stored).expect("stored root loads");
    assert_eq!(reloaded.cert_pem(), ca.cert_pem());
}

#[tokio::test]
async fn losing_the_creation_race_uses_the_winners_root() {
    let winner = LocalCa::generate("cluster.local").expect("root");
    let (client, calls) = api_server(vec![
        (StatusCode::NOT_FOUND, status(404, "NotFound")),
        (StatusCode::CONFLICT, status(409, "AlreadyExists")),
        (StatusCode::OK, secret_body(&winner)),
    ]);
    let ca = load_or_create_secret(client, &at(), "cluster.local")
        .await
        .expect("loaded the winner's");
    assert_eq!(ca.cert_pem(), winner.cert_pem());
    assert_eq!(calls.lock().len(), 3);
}

#[tokio::test]
async fn a_damaged_secret_is_an_error_not_a_new_root() {
    let mut body = secret_body(&LocalCa::generate("cluster.local").expect("root"));
    body["data"]
        .as_object_mut()
        .expect("data")
        .remove("tls.key");
    let (client, calls) = api_server(vec![(StatusCode::OK, body)]);
    let error = load_or_create_secret(client, &at(), "cluster.local")
        .await
        .err()
        .expect("refused");
    assert!(
        error.to_string().contains("has no tls.key"),
        "names the missing key: {error}"
    );
    // Nothing was overwritten.
    assert_eq!(calls.lock().len(), 1);
}

#[tokio::test]
async fn forbidden_reads_tell_the_operator_to_check_rbac() {
    let (client, _) = api_server(vec![(StatusCode::FORBIDDEN, status(403, "Forbidden"))]);
    let error = load_or_create_secret(client, &at(), "cluster.local")
        .await
        .err()
        .expect("refused");
    assert!(error.to_string().contains("RBAC"), "{error}");
}

#[tokio::test]
async fn the_trust_bundle_is_applied_with_the_root_only() {
    let root = LocalCa::generate("cluster.local").expect("root");
    let (client, calls) = api_server(vec![(
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}),
    )]);
    let at: ObjectRef = "trellis-system/trellis-ca-root".parse().expect("ref");
    publish_root(client, &at, &root).await.expect("published");
    let calls = calls.lock();
    let (method, path, sent) = &calls[0];
    assert_eq!(method, Method::PATCH);
    assert_eq!(
        path,
        "/api/v1/namespaces/trellis-system/configmaps/trellis-ca-root"
    );
    assert_eq!(sent["kind"], "ConfigMap");
    assert_eq!(sent["data"][ROOT_CERT_KEY], root.cert_pem());
    assert!(
        !sent.to_string().contains("PRIVATE KEY"),
        "the key never leaves the Secret"
    );
}
