//! The directory source: Kubernetes manifests on disk, for the testbed, the demo and anyone
//! without a cluster.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory (not in
//! subdirectories; hidden files are skipped so editors' and atomic writers' temporary files
//! never count) is read in name order. YAML files may hold several documents separated by
//! `---`; a `kind: List` document contributes its `items`. Each document is dispatched on
//! `apiVersion`/`kind`; kinds the mesh does not read are ignored (Gateway API kinds are read at
//! `gateway.networking.k8s.io/v1` only, TrafficPolicy at `traffic.trellis.dev/v1`). A malformed document is
//! rejected alone, with an error naming the file and the document's index; everything else is
//! applied. Writers should replace files atomically (write a hidden temporary file, then
//! rename it): a half-written file is read as whatever it holds at that instant.
//!
//! [`FilesSource::run`] publishes a new snapshot whenever the directory's objects change: inotify
//! (through `notify`) says when to look, and a rescan every two seconds catches anything it
//! missed (a full inotify queue, filesystems without events).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::objects::{ClusterObjects, Object, PolicyObject, RouteKind};
use crate::k8s::GATEWAY_API_VERSION;
use crate::policy::PolicyKind;

/// How often the directory is rescanned even without change events.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(2);
/// After a change event, wait this long for the writer to finish before reading.
const SETTLE: Duration = Duration::from_millis(50);
/// Manifests larger than this are refused rather than parsed (a misplaced file, not config).
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error(
        "cannot read manifest directory {path}: {source} (check that it exists and is readable)"
    )]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One file or document that could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("{file}: cannot read: {reason}")]
    File { file: PathBuf, reason: String },
    #[error("{file} document {index} (from line {line}): {reason}")]
    Document {
        file: PathBuf,
        /// Zero-based position of the document in the file.
        index: usize,
        /// The document's first line in the file (1-based).
        line: usize,
        reason: String,
    },
}

/// The objects of a directory, and what could not be read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Loaded {
    pub objects: ClusterObjects,
    pub errors: Vec<DocumentError>,
}

/// Reads every manifest in `dir` (see the module docs).
pub fn load_dir(dir: &Path) -> Result<Loaded, FilesError> {
    let entries = std::fs::read_dir(dir).map_err(|source| FilesError::Directory {
        path: dir.to_owned(),
        source,
    })?;
    let mut files = BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(|source| FilesError::Directory {
            path: dir.to_owned(),
            source,
        })?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let wanted = !name.starts_with('.')
            && [".yaml", ".yml", ".json"]
                .iter()
                .any(|ext| name.ends_with(ext));
        // Follows symlinks on purpose: mounted ConfigMaps are symlinks to the data.
        if wanted && path.is_file() {
            files.insert(path);
        }
    }
    let mut loaded = Loaded::default();
    for file in files {
        load_file(&file, &mut loaded);
    }
    Ok(loaded)
}

fn load_file(file: &Path, loaded: &mut Loaded) {
    let file_error = |reason: String| DocumentError::File {
        file: file.to_owned(),
        reason,
    };
    match std::fs::metadata(file) {
        Ok(meta) if meta.len() > MAX_FILE_BYTES => {
            loaded.errors.push(file_error(format!(
                "{} bytes is more than the {MAX_FILE_BYTES} bytes a manifest may have",
                meta.len()
            )));
            return;
        }
        Ok(_) => {}
        Err(e) => {
            loaded.errors.push(file_error(e.to_string()));
            return;
        }
    }
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) => {
            loaded.errors.push(file_error(e.to_string()));
            return;
        }
    };
    let is_json = file.extension().is_some_and(|e| e == "json");
    let documents: Vec<(usize, &str)> = if is_json {
        vec![(1, text.as_str())]
    } else {
        split_documents(&text)
    };
    for (index, (line, document)) in documents.into_iter().enumerate() {
        let doc_error = |reason: String| DocumentError::Document {
            file: file.to_owned(),
            index,
            line,
            reason,
        };
        let value: serde_json::Value = if is_json {
            match serde_json::from_str(document) {
                Ok(v) => v,
                Err(e) => {
                    loaded.errors.push(doc_error(format!("invalid JSON: {e}")));
                    continue;
                }
            }
        } else {
            if is_blank(document) {
                continue;
            }
            match serde_saphyr::from_str(document) {
                Ok(v) => v,
                Err(e) => {
                    loaded.errors.push(doc_error(format!("invalid YAML: {e}")));
                    continue;
                }
            }
        };
        if let Err(reason) = apply_value(value, &mut loaded.objects, 0) {
            loaded.errors.push(doc_error(reason));
        }
    }
}

/// Splits a YAML stream at its `---` document markers (a line of `---`, possibly followed by
/// content or a comment), giving each document with its first line (1-based). Splitting
/// before parsing is what lets one broken document be rejected alone; a line starting with
/// `---` inside a document can only occur in a zero-indented block scalar, which manifests do
/// not use.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut documents = Vec::new();
    let (mut start, mut start_line) = (0, 1);
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end_matches(['\n', '\r']);
        let inline = trimmed.starts_with("--- ") || trimmed.starts_with("---\t");
        if trimmed == "---" || trimmed == "..." || inline {
            documents.push((start_line, &text[start..offset]));
            // Content after `--- ` on the marker line belongs to the next document.
            (start, start_line) = if inline {
                (offset + 4, i + 1)
            } else {
                (offset + line.len(), i + 2)
            };
        }
        offset += line.len();
    }
    documents.push((start_line, &text[start..]));
    // A stream that starts with a marker has nothing before it: that is not a document, and
    // users count the first real document as 0.
    if documents.len() > 1 && documents.first().is_some_and(|(_, d)| is_blank(d)) {
        documents.remove(0);
    }
    documents
}

fn is_blank(document: &str) -> bool {
    document.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#')
    })
}

/// Dispatches one document on its `apiVersion` and `kind`.
fn apply_value(
    value: serde_json::Value,
    objects: &mut ClusterObjects,
    depth: usize,
) -> Result<(), String> {
    if value.is_null() {
        return Ok(());
    }
    let api_version = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .ok_or("apiVersion is missing")?
        .to_owned();
    let kind = value
        .get("kind")
        .and_then(|v| v.as_str())
        .ok_or("kind is missing")?
        .to_owned();
    let typed = |e: serde_json::Error| format!("not a valid {api_version} {kind}: {e}");
    let object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") if depth == 0 => {
            let items = match value.get("items") {
                Some(serde_json::Value::Array(items)) => items.clone(),
                None | Some(serde_json::Value::Null) => Vec::new(),
                Some(_) => return Err("List items is not a list".into()),
            };
            let mut errors = Vec::new();
            for (i, item) in items.into_iter().enumerate() {
                if let Err(e) = apply_value(item, objects, depth + 1) {
                    errors.push(format!("item {i}: {e}"));
                }
            }
            return if errors.is_empty() {
                Ok(())
            } else {
                Err(errors.join("; "))
            };
        }
        ("v1", "Namespace") => Object::Namespace(serde_json::from_value(value).map_err(typed)?),
        ("v1", "Pod") => Object::Pod(serde_json::from_value(value).map_err(typed)?),
        ("v1", "Service") => Object::Service(serde_json::from_value(value).map_err(typed)?),
        ("v1", "Node") => Object::Node(serde_json::from_value(value).map_err(typed)?),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            Object::EndpointSlice(serde_json::from_value(value).map_err(typed)?)
        }
        // The spec stays untyped: one that does not convert is enforced fail closed, never
        // dropped here (see `policy::stored`).
        (PolicyKind::API_VERSION, policy) => match PolicyKind::from_kind(policy) {
            Some(kind) => Object::policy(
                kind,
                PolicyObject::from_manifest(kind, &value).map_err(typed)?,
            ),
            None => return ignore(&api_version, &kind),
        },
        // Kept as written: the controller reads only the class, the waypoints the routes.
        (GATEWAY_API_VERSION, "Gateway") => {
            Object::Gateway(PolicyObject::untyped(&value).map_err(typed)?)
        }
        (version, kind) => {
            match RouteKind::from_kind(kind).filter(|k| k.api_version() == version) {
                Some(route) => Object::Route(route, PolicyObject::untyped(&value).map_err(typed)?),
                None => return ignore(&api_version, kind),
            }
        }
    };
    let object = default_namespace(object);
    let described = object.describe();
    match objects.apply(object) {
        Ok(false) => Ok(()),
        // Name order decides, so the outcome is stable; say so, since it is surely a mistake.
        Ok(true) => {
            tracing::warn!(object = %described, "defined more than once; the last definition wins");
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// A document of a kind the mesh does not read: not an error.
fn ignore(api_version: &str, kind: &str) -> Result<(), String> {
    tracing::debug!(%api_version, %kind, "ignoring a kind the mesh does not read");
    Ok(())
}

/// Like `kubectl apply`, a namespaced manifest without a namespace lands in `default`.
fn default_namespace(mut object: Object) -> Object {
    if matches!(object, Object::Namespace(_) | Object::Node(_)) {
        return object;
    }
    let meta = object.metadata_mut();
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some("default".into());
    }
    object
}

/// A watched manifest directory (see the module docs).
pub struct FilesSource {
    dir: PathBuf,
    initial: Loaded,
}

impl FilesSource {
    /// Loads `dir` once: an unreadable directory is an error here, at start.
    pub fn open(dir: &Path) -> Result<Self, FilesError> {
        let initial = load_dir(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            initial,
        })
    }

    /// Publishes the directory's objects, then a new snapshot whenever they change, until
    /// `shutdown`. Document errors are logged when they change, not on every rescan. If the
    /// directory becomes unreadable the last snapshot stays: an empty mesh is never published
    /// by accident.
    pub async fn run(
        self,
        tx: watch::Sender<Option<Arc<ClusterObjects>>>,
        shutdown: CancellationToken,
    ) {
        let Self { dir, initial } = self;
        log_errors(&initial.errors);
        tracing::info!(dir = %dir.display(), objects = initial.objects.len(), "loaded manifests");
        tx.send_replace(Some(Arc::new(initial.objects.clone())));
        let mut last = initial;

        let changed = Arc::new(Notify::new());
        // Kept alive for the loop's lifetime; dropping it stops the events.
        let _watcher = start_notify(&dir, changed.clone());
        let mut rescan = tokio::time::interval(RESCAN_INTERVAL);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = changed.notified() => tokio::time::sleep(SETTLE).await,
                _ = rescan.tick() => {}
            }
            let loaded = match load_blocking(dir.clone()).await {
                Ok(loaded) => loaded,
                Err(e) => {
                    tracing::error!(error = %e, "keeping the last manifests");
                    continue;
                }
            };
            if loaded.errors != last.errors {
                log_errors(&loaded.errors);
            }
            if loaded.objects != last.objects {
                tracing::info!(objects = loaded.objects.len(), "manifests changed");
                tx.send_replace(Some(Arc::new(loaded.objects.clone())));
            }
            last = loaded;
        }
    }
}

async fn load_blocking(dir: PathBuf) -> Result<Loaded, FilesError> {
    match tokio::task::spawn_blocking(move || load_dir(&dir)).await {
        Ok(result) => result,
        // Only a panic in the loader gets here; treat it like an unreadable directory.
        Err(e) => Err(FilesError::Directory {
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

fn log_errors(errors: &[DocumentError]) {
    for error in errors {
        tracing::warn!(%error, "manifest rejected; the rest of the directory is applied");
    }
}

fn start_notify(dir: &Path, changed: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let handler = move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            changed.notify_one();
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "no change notifications; relying on periodic rescans");
            return None;
        }
    };
    if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch directory; relying on periodic rescans");
        return None;
    }
    Some(watcher)
}

#[cfg(test)]
pub(crate) mod tests {
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

    const GOOD: &str = r#"
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
"#;

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
            r#"
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
"#,
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
}
