//! The directory source: document splitting, every kind it reads, rejections one document at a
//! time, and publishing on change.

use super::*;

/// A fresh directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "trellis-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }

    /// Writes `name` atomically (hidden temporary file, then rename), as writers should.
    pub(crate) fn write(&self, name: &str, contents: &str) {
        let target = self.0.join(name);
        let file_name = target.file_name().expect("a file name").to_string_lossy();
        let tmp = target.with_file_name(format!(".{file_name}.tmp"));
        std::fs::write(&tmp, contents).expect("write");
        std::fs::rename(&tmp, &target).expect("rename");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const GOOD: &str = r"
# the shop
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: { trellis.dev/mesh: enabled }
---
apiVersion: v1
kind: Pod
metadata: { name: web, namespace: shop, uid: u-web }
spec: { nodeName: node-a, serviceAccountName: web, containers: [] }
status: { podIP: 10.0.0.1 }
--- # a kind the mesh ignores
apiVersion: apps/v1
kind: Deployment
metadata: { name: web, namespace: shop }
---
";

#[test]
fn splits_documents_at_markers_only() {
    let docs = split_documents("---\na: 1\n---\nb: '---'\n--- c: 3\n...\n");
    assert_eq!(
        docs,
        vec![(2, "a: 1\n"), (4, "b: '---'\n"), (5, "c: 3\n"), (7, "")]
    );
    assert_eq!(split_documents("a: 1"), vec![(1, "a: 1")]);
}

#[test]
fn loads_yaml_json_and_lists() {
    let dir = TempDir::new("files-load");
    dir.write("a.yaml", GOOD);
    dir.write(
        "b.json",
        r#"{"apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}},
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}}]}"#,
    );
    dir.write("notes.txt", "not a manifest");
    dir.write(
        ".hidden.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: hidden}\n",
    );
    std::fs::create_dir(dir.0.join("sub.yaml")).expect("subdir");
    let loaded = load_dir(&dir.0).expect("load");
    assert_eq!(loaded.errors, vec![]);
    let o = &loaded.objects;
    assert_eq!(o.namespaces.keys().collect::<Vec<_>>(), vec!["shop"]);
    assert_eq!(o.pods.keys().collect::<Vec<_>>(), vec!["shop/web"]);
    assert_eq!(o.nodes.keys().collect::<Vec<_>>(), vec!["node-a"]);
    assert_eq!(
        o.services.keys().collect::<Vec<_>>(),
        vec!["default/web"],
        "namespaced objects default to the default namespace"
    );
}

#[test]
fn loads_gateways_and_routing_objects_untyped() {
    let dir = TempDir::new("files-routes");
    dir.write(
        "routes.yaml",
        r"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: { name: waypoint, namespace: shop, generation: 2 }
spec: { gatewayClassName: trellis-waypoint }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: web, namespace: shop }
spec: { rules: [ { notAFieldYet: 1 } ] }
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: { name: rpc }
---
apiVersion: traffic.trellis.dev/v1
kind: TrafficPolicy
metadata: { name: retries, namespace: shop }
spec: { retries: { attempts: 3 } }
--- # an older version of the Gateway API is not read
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata: { name: old, namespace: shop }
--- # nor a kind of another group that happens to share a name
apiVersion: example.com/v1
kind: TrafficPolicy
metadata: { name: other, namespace: shop }
",
    );
    let loaded = load_dir(&dir.0).expect("load");
    assert_eq!(loaded.errors, vec![]);
    let o = &loaded.objects;
    let gateway = &o.gateways["shop/waypoint"];
    assert_eq!(gateway.spec["gatewayClassName"], "trellis-waypoint");
    assert_eq!(gateway.metadata.generation, Some(2));
    assert_eq!(o.http_routes.keys().collect::<Vec<_>>(), vec!["shop/web"]);
    assert_eq!(
        o.http_routes["shop/web"].spec["rules"][0]["notAFieldYet"], 1,
        "specs are kept as written"
    );
    assert_eq!(
        o.grpc_routes.keys().collect::<Vec<_>>(),
        vec!["default/rpc"],
        "namespaced like every kind"
    );
    assert_eq!(o.grpc_routes["default/rpc"].spec, serde_json::Value::Null);
    assert_eq!(
        o.traffic_policies.keys().collect::<Vec<_>>(),
        vec!["shop/retries"]
    );
}

#[test]
fn loads_every_policy_kind_and_keeps_specs_that_do_not_convert() {
    let dir = TempDir::new("files-policies");
    dir.write(
        "policies.yaml",
        r#"
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: { name: deny-ssh, namespace: shop }
spec: { action: DENY, rules: [ { to: [ { operation: { ports: ["22"] } } ] } ] }
---
apiVersion: security.trellis.dev/v1
kind: PeerAuthentication
metadata: { name: strict, namespace: shop }
spec: { mtls: { mode: STRICT } }
---
apiVersion: security.trellis.dev/v1
kind: RequestAuthentication
metadata: { name: tokens, namespace: shop, generation: 4 }
spec:
  targetRefs: [ { kind: Gateway, group: gateway.networking.k8s.io, name: waypoint } ]
  jwtRules: [ { issuer: "https://issuer.example", jwksUri: "https://issuer.example/keys" } ]
--- # not the kind's shape: kept, for the waypoints to enforce as its stand-in
apiVersion: security.trellis.dev/v1
kind: RequestAuthentication
metadata: { name: broken, namespace: shop }
spec: { jwtRules: "everyone" }
--- # a kind of the group the mesh does not read
apiVersion: security.trellis.dev/v1
kind: Sidecar
metadata: { name: other, namespace: shop }
"#,
    );
    let loaded = load_dir(&dir.0).expect("load");
    assert_eq!(loaded.errors, vec![]);
    let o = &loaded.objects;
    assert_eq!(
        o.policies(PolicyKind::Authorization)
            .keys()
            .collect::<Vec<_>>(),
        vec!["shop/deny-ssh"]
    );
    assert_eq!(
        o.policies(PolicyKind::PeerAuthentication)
            .keys()
            .collect::<Vec<_>>(),
        vec!["shop/strict"]
    );
    let tokens = o.policies(PolicyKind::RequestAuthentication);
    assert_eq!(
        tokens.keys().collect::<Vec<_>>(),
        vec!["shop/broken", "shop/tokens"]
    );
    assert_eq!(tokens["shop/tokens"].metadata.generation, Some(4));
    assert_eq!(
        tokens["shop/tokens"].spec["jwtRules"][0]["issuer"],
        "https://issuer.example"
    );
    assert_eq!(tokens["shop/broken"].spec["jwtRules"], "everyone");
    assert_eq!(o.len(), 4, "the Sidecar is not read");
}

#[test]
fn a_malformed_document_is_rejected_alone() {
    let dir = TempDir::new("files-bad");
    let broken = format!(
        "{GOOD}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{ name: [oops\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: typed, namespace: shop}}\nspec: {{containers: 7}}\n---\n\
             kind: Pod\nmetadata: {{name: noversion}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: api, namespace: shop, uid: u-api}}\n"
    );
    dir.write("a.yaml", &broken);
    dir.write("b.json", "{ not json");
    let loaded = load_dir(&dir.0).expect("load");
    let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 4, "{errors:#?}");
    let a = dir.0.join("a.yaml").display().to_string();
    // GOOD ends with a marker, so document 3 is the empty one before the next marker.
    assert!(
        errors[0].starts_with(&format!("{a} document 4 (from line 21): invalid YAML")),
        "{errors:#?}"
    );
    assert!(
        errors[1].starts_with(&format!(
            "{a} document 5 (from line 25): not a valid v1 Pod"
        )),
        "{errors:#?}"
    );
    assert_eq!(
        errors[2],
        format!("{a} document 6 (from line 30): apiVersion is missing")
    );
    assert!(
        errors[3].contains("b.json document 0 (from line 1): invalid JSON"),
        "{errors:#?}"
    );
    assert_eq!(
        loaded.objects.pods.keys().collect::<Vec<_>>(),
        vec!["shop/api", "shop/web"],
        "the good documents around the bad ones are applied"
    );
}

#[test]
fn a_missing_directory_is_an_error() {
    let err = load_dir(Path::new("/nonexistent/trellis-manifests")).expect_err("missing");
    assert!(err.to_string().contains("/nonexistent/trellis-manifests"));
}

async fn next_snapshot(
    rx: &mut watch::Receiver<Option<Arc<ClusterObjects>>>,
    want: impl Fn(&ClusterObjects) -> bool,
) -> Arc<ClusterObjects> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(o) = rx.borrow_and_update().clone().filter(|o| want(o)) {
                return o;
            }
            rx.changed().await.expect("source alive");
        }
    })
    .await
    .expect("snapshot within 10 s")
}

#[tokio::test]
async fn publishes_changes() {
    let dir = TempDir::new("files-watch");
    dir.write("a.yaml", GOOD);
    let (tx, mut rx) = watch::channel(None);
    let shutdown = CancellationToken::new();
    let source = FilesSource::open(&dir.0).expect("readable");
    let task = tokio::spawn(source.run(tx, shutdown.clone()));
    next_snapshot(&mut rx, |o| o.pods.len() == 1).await;

    dir.write(
        "b.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: api, namespace: shop, uid: u-api}\n",
    );
    next_snapshot(&mut rx, |o| o.pods.contains_key("shop/api")).await;

    // Relabel: the namespace opts out; the pods stay.
    dir.write("a.yaml", &GOOD.replace("enabled", "paused"));
    let o = next_snapshot(&mut rx, |o| {
        o.namespaces["shop"]
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("trellis.dev/mesh"))
            == Some(&"paused".to_owned())
    })
    .await;
    assert_eq!(o.pods.len(), 2);

    std::fs::remove_file(dir.0.join("b.yaml")).expect("remove");
    next_snapshot(&mut rx, |o| !o.pods.contains_key("shop/api")).await;

    // A broken edit of one document keeps the others.
    dir.write(
        "a.yaml",
        &GOOD.replace("kind: Pod", "kind: Pod\nspec: [broken"),
    );
    let o = next_snapshot(&mut rx, |o| o.pods.is_empty()).await;
    assert_eq!(o.namespaces.len(), 1);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stops")
        .expect("no panic");
}

#[test]
fn loads_istios_security_kinds_beside_the_twins() {
    let dir = TempDir::new("files-istio");
    dir.write(
        "istio.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: deny-ssh, namespace: shop }
spec: { action: DENY, rules: [ { to: [ { operation: { ports: ["22"] } } ] } ] }
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: { name: strict }
spec: { mtls: { mode: STRICT } }
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: { name: tokens, namespace: shop }
spec:
  targetRefs: [ { kind: Gateway, group: gateway.networking.k8s.io, name: waypoint } ]
  jwtRules: [ { issuer: "https://issuer.example", jwksUri: "https://issuer.example/keys" } ]
--- # the same name in Trellis's group: another object
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: { name: deny-ssh, namespace: shop }
spec: { action: DENY, rules: [ { to: [ { operation: { ports: ["2222"] } } ] } ] }
--- # a version of the group the mesh does not read
apiVersion: security.istio.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: old, namespace: shop }
--- # a kind of the group the mesh does not read
apiVersion: security.istio.io/v1
kind: Sidecar
metadata: { name: other, namespace: shop }
"#,
    );
    let loaded = load_dir(&dir.0).expect("load");
    assert_eq!(loaded.errors, vec![]);
    let o = &loaded.objects;
    let istio = |kind| {
        o.policies_in(SecurityGroup::Istio, kind)
            .keys()
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(istio(PolicyKind::Authorization), vec!["shop/deny-ssh"]);
    assert_eq!(
        istio(PolicyKind::PeerAuthentication),
        vec!["default/strict"]
    );
    assert_eq!(
        istio(PolicyKind::RequestAuthentication),
        vec!["shop/tokens"]
    );
    assert_eq!(
        o.policies(PolicyKind::Authorization)["shop/deny-ssh"].spec["rules"][0]["to"][0]["operation"]
            ["ports"][0],
        "2222"
    );
    assert_eq!(o.len(), 4);
}
