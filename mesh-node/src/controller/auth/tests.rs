//! Who a caller is: bootstrap tokens, workload keys, bearer metadata and TokenReview.

use super::*;

/// Service account `shop/waypoint`'s bootstrap token in [`tokens`].
pub(crate) const WAYPOINT_TOKEN: &str = "token-for-shop-waypoint-0123456789";
/// Service account `shop/web`'s (not a waypoint's) bootstrap token in [`tokens`].
pub(crate) const WEB_TOKEN: &str = "token-for-shop-web-0123456789";

pub(crate) fn tokens() -> BootstrapTokens {
    BootstrapTokens::new(BTreeMap::from([
        ("node-a".into(), "token-for-node-a-0123456789".into()),
        ("node-b".into(), "token-for-node-b-0123456789".into()),
        ("serviceaccount:shop/waypoint".into(), WAYPOINT_TOKEN.into()),
        ("serviceaccount:shop/web".into(), WEB_TOKEN.into()),
    ]))
    .expect("valid tokens")
}

#[tokio::test]
async fn bootstrap_tokens_name_their_node_or_service_account() {
    let t = tokens();
    assert_eq!(
        t.authenticate("token-for-node-b-0123456789").await.ok(),
        Some(Caller::Node("node-b".into()))
    );
    assert_eq!(
        t.authenticate(WAYPOINT_TOKEN).await.ok(),
        Some(Caller::workload("shop", "waypoint"))
    );
    for bad in [
        "token-for-node-b-012345678",
        "token-for-node-b-01234567890",
        "",
        "x",
    ] {
        assert!(t.authenticate(bad).await.is_err(), "{bad:?}");
    }
}

#[test]
fn workload_keys_must_name_a_service_account() {
    let load = |key: &str| {
        BootstrapTokens::new(BTreeMap::from([(
            key.to_owned(),
            "a-long-enough-token-0123456789".to_owned(),
        )]))
    };
    let ok = load("serviceaccount:shop/waypoint.v2").expect("valid");
    assert_eq!(ok.tokens[0].0, Caller::workload("shop", "waypoint.v2"));
    for bad in [
        "serviceaccount:shop",
        "serviceaccount:/waypoint",
        "serviceaccount:shop/",
        "serviceaccount:shop/a/b",
        "serviceaccount:Shop/waypoint",
        "serviceaccount:",
    ] {
        let err = load(bad).expect_err(bad).to_string();
        assert!(
            err.contains(bad) && err.contains("serviceaccount:<namespace>/<name>"),
            "{bad}: {err}"
        );
    }
    // Anything else is a node name, as before.
    assert_eq!(
        load("serviceaccounts-node").expect("node").tokens[0].0,
        Caller::Node("serviceaccounts-node".into())
    );
}

#[test]
fn weak_or_shared_tokens_are_refused_at_load() {
    let short = BootstrapTokens::new(BTreeMap::from([("n".into(), "short".into())]));
    assert!(short.is_err());
    let shared = BootstrapTokens::new(BTreeMap::from([
        ("a".into(), "the-same-token-0123456789".into()),
        ("b".into(), "the-same-token-0123456789".into()),
    ]));
    assert!(
        shared
            .expect_err("shared")
            .to_string()
            .contains("another node")
    );
}

#[test]
fn bearer_metadata_is_required() {
    let mut md = MetadataMap::new();
    assert!(matches!(bearer_token(&md), Err(AuthError::Missing)));
    md.insert("authorization", "Basic abc".parse().expect("ascii"));
    assert!(matches!(bearer_token(&md), Err(AuthError::Refused(_))));
    md.insert("authorization", "Bearer abc".parse().expect("ascii"));
    assert_eq!(bearer_token(&md).ok(), Some("abc"));
}

type Mock =
    tower_test::mock::Handle<http::Request<kube::client::Body>, http::Response<kube::client::Body>>;

/// Answers one TokenReview with `status`, checking the request carried the token.
async fn answer_review(handle: &mut Mock, status: serde_json::Value) {
    use http_body_util::BodyExt;
    let (request, respond) = handle.next_request().await.expect("a request");
    assert_eq!(request.method(), http::Method::POST);
    assert_eq!(
        request.uri().path(),
        "/apis/authentication.k8s.io/v1/tokenreviews"
    );
    let body = request
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let sent: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(sent["spec"]["token"], "agent-token");
    assert_eq!(sent["spec"]["audiences"], serde_json::json!(["trellis"]));
    let reply = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "metadata": {}, "spec": sent["spec"].clone(), "status": status,
    });
    respond.send_response(
        http::Response::builder()
            .status(201)
            .body(kube::client::Body::from(reply.to_string().into_bytes()))
            .expect("response"),
    );
}

#[tokio::test]
async fn token_review_tells_agents_from_workloads() {
    let (service, mut handle) = tower_test::mock::pair();
    let client = kube::Client::new(service, "default");
    let review = Arc::new(
        TokenReview::new(
            client,
            &["trellis-system/trellis-agent".to_owned()],
            vec!["trellis".into()],
        )
        .expect("config"),
    );
    let user = |name: &str, node: Option<&str>| {
        let extra = node.map_or(
            serde_json::json!({}),
            |n| serde_json::json!({ NODE_NAME_EXTRA: [n] }),
        );
        serde_json::json!({"authenticated": true,
                "user": {"username": name, "extra": extra}})
    };
    let cases = [
        (
            user(
                "system:serviceaccount:trellis-system:trellis-agent",
                Some("node-a"),
            ),
            Some(Caller::Node("node-a".into())),
        ),
        (
            user("system:serviceaccount:shop:web", Some("node-a")),
            Some(Caller::Workload {
                namespace: "shop".into(),
                service_account: "web".into(),
                node: Some("node-a".into()),
            }),
        ),
        (
            user("system:serviceaccount:shop:waypoint", None),
            Some(Caller::workload("shop", "waypoint")),
        ),
        // An agent's token must say which node it is on; a workload's need not.
        (
            user("system:serviceaccount:trellis-system:trellis-agent", None),
            None,
        ),
        (user("alice@example.com", Some("node-a")), None),
        (user("system:serviceaccount:shop", None), None),
        (
            serde_json::json!({"authenticated": false, "error": "expired"}),
            None,
        ),
    ];
    for (status, want) in cases {
        let r = review.clone();
        let call = tokio::spawn(async move { r.authenticate("agent-token").await });
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            answer_review(&mut handle, status),
        )
        .await
        .expect("request within 5 s");
        let got = call.await.expect("no panic");
        assert_eq!(got.as_ref().ok(), want.as_ref(), "{got:?}");
    }
}
