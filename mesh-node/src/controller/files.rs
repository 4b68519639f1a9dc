//! The directory source: Kubernetes manifests on disk, for the testbed, the demo and anyone
//! without a cluster.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory (not in
//! subdirectories; hidden files are skipped so editors' and atomic writers' temporary files
//! never count) is read in name order. YAML files may hold several documents separated by
//! `---`; a `kind: List` document contributes its `items`. Each document is dispatched on
//! `apiVersion`/`kind`; kinds the mesh does not read are ignored (Gateway API kinds are read at
//! `gateway.networking.k8s.io/v1` only, TrafficPolicy at `traffic.trellis.dev/v1`, Istio's
//! security kinds at `security.istio.io/v1` and `v1beta1`, VirtualService and DestinationRule
//! at `networking.istio.io` `v1`, `v1beta1` and `v1alpha3`). A malformed document is
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
use crate::{
    k8s::GATEWAY_API_VERSION,
    policy::{PolicyKind, SecurityGroup},
};

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
        (version, policy) if SecurityGroup::from_api_version(version).is_some() => {
            match (
                SecurityGroup::from_api_version(version),
                PolicyKind::from_kind(policy),
            ) {
                (Some(group), Some(kind)) => Object::Policy(
                    group,
                    kind,
                    PolicyObject::from_manifest(kind, &value).map_err(typed)?,
                ),
                _ => return ignore(&api_version, &kind),
            }
        }
        // Kept as written: the controller reads only the class, the waypoints the routes.
        (GATEWAY_API_VERSION, "Gateway") => {
            Object::Gateway(PolicyObject::untyped(&value).map_err(typed)?)
        }
        (version, kind) => match RouteKind::from_kind(kind).filter(|k| k.reads(version)) {
            Some(route) => Object::Route(route, PolicyObject::untyped(&value).map_err(typed)?),
            None => return ignore(&api_version, kind),
        },
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
#[allow(
    clippy::unnecessary_wraps,
    reason = "one signature for every kind's handler"
)]
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
pub(crate) mod tests;
