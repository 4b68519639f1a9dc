//! What telemetry says about a workload ([`WorkloadTelemetry`]): the values of Istio's
//! `source_*` and `destination_*` metric labels, derived the way Istio derives them.
//!
//! The controller computes them once per pod, from the pod's owner and labels, and ships them
//! with the workload. A workload streamed without them (by an older controller) or configured
//! statically gets the same derivation from its own name and labels, so a value is never
//! empty: `unknown` stands for what cannot be known.

use std::collections::BTreeMap;

use super::super::resource::{ResourceError, bad};
use crate::{
    api::v1 as api,
    k8s::{
        APP_LABEL, APP_NAME_LABEL, APP_VERSION_LABEL, CANONICAL_NAME_LABEL,
        CANONICAL_REVISION_LABEL, VERSION_LABEL,
    },
};

/// The cluster id when none is configured: Istio's default.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// A label value that is not known.
pub const UNKNOWN: &str = "unknown";
/// The canonical revision of a workload that names none: Istio's default.
pub const LATEST: &str = "latest";
/// The kind of a pod that no controller owns: its own workload.
pub const POD_KIND: &str = "Pod";

/// A workload's telemetry metadata.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct WorkloadTelemetry {
    /// The owning controller's name (`reviews-v2`, not `reviews-v2-7f4669bdd9-x8k2p`): every
    /// pod of a Deployment shares it, so a rollout creates no new series.
    pub workload_name: String,
    /// The owner's kind (`Deployment`, `StatefulSet`, ..., `Pod` for a bare pod).
    pub workload_kind: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    /// The `app` label, or [`UNKNOWN`].
    pub app: String,
    /// The `version` label, or [`UNKNOWN`].
    pub version: String,
    pub cluster: String,
}

impl WorkloadTelemetry {
    /// Istio's derivation for a pod of workload `workload_name` (of `workload_kind`) with
    /// `labels`, in `cluster`.
    pub fn derive(
        workload_name: &str,
        workload_kind: &str,
        labels: &BTreeMap<String, String>,
        cluster: &str,
    ) -> Self {
        let label = |key: &str| {
            labels
                .get(key)
                .map(String::as_str)
                .filter(|v| !v.is_empty())
        };
        let first = |keys: [&str; 3]| keys.into_iter().find_map(label);
        Self {
            workload_name: workload_name.to_owned(),
            workload_kind: workload_kind.to_owned(),
            canonical_service: first([CANONICAL_NAME_LABEL, APP_NAME_LABEL, APP_LABEL])
                .unwrap_or(workload_name)
                .to_owned(),
            canonical_revision: first([CANONICAL_REVISION_LABEL, APP_VERSION_LABEL, VERSION_LABEL])
                .unwrap_or(LATEST)
                .to_owned(),
            app: label(APP_LABEL).unwrap_or(UNKNOWN).to_owned(),
            version: label(VERSION_LABEL).unwrap_or(UNKNOWN).to_owned(),
            cluster: if cluster.is_empty() {
                DEFAULT_CLUSTER_ID
            } else {
                cluster
            }
            .to_owned(),
        }
    }

    /// What a workload known only by its pod `name` and `labels` gets: the pod is its own
    /// workload, in the default cluster.
    pub fn of_pod(name: &str, labels: &BTreeMap<String, String>) -> Self {
        Self::derive(name, POD_KIND, labels, DEFAULT_CLUSTER_ID)
    }

    /// Converts the streamed metadata of pod `name` with `labels`; `None` (an older
    /// controller) is derived as [`Self::of_pod`]. An empty field takes its derived value.
    pub fn from_resource(
        t: Option<api::WorkloadTelemetry>,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Self, ResourceError> {
        let derived = Self::of_pod(name, labels);
        let Some(t) = t else {
            return Ok(derived);
        };
        let field = |field: &str, value: String, fallback: String| {
            check_value(field, &value)?;
            Ok::<_, ResourceError>(if value.is_empty() { fallback } else { value })
        };
        Ok(Self {
            workload_name: field(
                "telemetry.workload_name",
                t.workload_name,
                derived.workload_name,
            )?,
            workload_kind: field(
                "telemetry.workload_kind",
                t.workload_kind,
                derived.workload_kind,
            )?,
            canonical_service: field(
                "telemetry.canonical_service",
                t.canonical_service,
                derived.canonical_service,
            )?,
            canonical_revision: field(
                "telemetry.canonical_revision",
                t.canonical_revision,
                derived.canonical_revision,
            )?,
            app: field("telemetry.app", t.app, derived.app)?,
            version: field("telemetry.version", t.version, derived.version)?,
            cluster: field("telemetry.cluster_id", t.cluster_id, derived.cluster)?,
        })
    }
}

impl WorkloadTelemetry {
    /// Whether `id` can name the cluster (a non-empty label value).
    pub fn check_cluster_id(id: &str) -> Result<(), ResourceError> {
        if id.is_empty() {
            return Err(bad("cluster_id", "must not be empty"));
        }
        check_value("cluster_id", id)
    }
}

impl From<WorkloadTelemetry> for api::WorkloadTelemetry {
    fn from(t: WorkloadTelemetry) -> Self {
        Self {
            workload_name: t.workload_name,
            workload_kind: t.workload_kind,
            canonical_service: t.canonical_service,
            canonical_revision: t.canonical_revision,
            app: t.app,
            version: t.version,
            cluster_id: t.cluster,
        }
    }
}

/// Longest value accepted: an object name (the workload) is at most 253 bytes.
const MAX_VALUE: usize = 253;

/// Values become metric label values: bounded, and printable without control characters
/// (names, label values and a cluster id are all plain ASCII words).
fn check_value(field: &str, value: &str) -> Result<(), ResourceError> {
    let ok = value.len() <= MAX_VALUE
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(bad(
            field,
            format!(
                "{value:?} is not a workload name, kind, label value or cluster id (at most \
                 {MAX_VALUE} letters, digits, '-', '_' and '.')"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn canonical_names_follow_istios_order() {
        let all = labels(&[
            (CANONICAL_NAME_LABEL, "shop"),
            (CANONICAL_REVISION_LABEL, "r7"),
            (APP_NAME_LABEL, "shop-k8s"),
            (APP_VERSION_LABEL, "2.0"),
            (APP_LABEL, "shop-app"),
            (VERSION_LABEL, "v2"),
        ]);
        let t = WorkloadTelemetry::derive("shop-v2", "Deployment", &all, "east");
        assert_eq!(
            (t.canonical_service.as_str(), t.canonical_revision.as_str()),
            ("shop", "r7")
        );
        assert_eq!((t.app.as_str(), t.version.as_str()), ("shop-app", "v2"));
        assert_eq!(t.cluster, "east");

        let k8s = labels(&[
            (APP_NAME_LABEL, "shop-k8s"),
            (APP_VERSION_LABEL, "2.0"),
            (APP_LABEL, "shop-app"),
            (VERSION_LABEL, "v2"),
        ]);
        let t = WorkloadTelemetry::derive("shop-v2", "Deployment", &k8s, "");
        assert_eq!(
            (t.canonical_service.as_str(), t.canonical_revision.as_str()),
            ("shop-k8s", "2.0")
        );
        assert_eq!(t.cluster, DEFAULT_CLUSTER_ID);

        let plain = labels(&[(APP_LABEL, "shop-app"), (VERSION_LABEL, "v2")]);
        let t = WorkloadTelemetry::derive("shop-v2", "Deployment", &plain, "c");
        assert_eq!(
            (t.canonical_service.as_str(), t.canonical_revision.as_str()),
            ("shop-app", "v2")
        );

        // Nothing: the workload's name, `latest`, and `unknown` app and version; an empty
        // label counts as absent.
        let none = labels(&[(APP_LABEL, "")]);
        let t = WorkloadTelemetry::derive("shop-v2", "Deployment", &none, "c");
        assert_eq!(
            (
                t.canonical_service.as_str(),
                t.canonical_revision.as_str(),
                t.app.as_str(),
                t.version.as_str()
            ),
            ("shop-v2", LATEST, UNKNOWN, UNKNOWN)
        );
    }

    #[test]
    fn workloads_streamed_without_metadata_derive_it_from_the_pod() {
        let pod_labels = labels(&[(APP_LABEL, "web")]);
        let t = WorkloadTelemetry::from_resource(None, "web-0", &pod_labels).expect("derived");
        assert_eq!(t, WorkloadTelemetry::of_pod("web-0", &pod_labels));
        assert_eq!(
            (t.workload_name.as_str(), t.workload_kind.as_str()),
            ("web-0", POD_KIND)
        );
        assert_eq!(t.canonical_service, "web");

        // Fields an older controller left empty are derived; the others are taken as sent.
        let sent = api::WorkloadTelemetry {
            workload_name: "web".into(),
            workload_kind: "StatefulSet".into(),
            cluster_id: "east".into(),
            ..Default::default()
        };
        let t = WorkloadTelemetry::from_resource(Some(sent), "web-0", &pod_labels).expect("ok");
        assert_eq!(t.workload_name, "web");
        assert_eq!(t.workload_kind, "StatefulSet");
        assert_eq!(t.cluster, "east");
        assert_eq!(t.canonical_revision, LATEST);
        assert_eq!(t.version, UNKNOWN);
    }

    #[test]
    fn hostile_metadata_is_refused_by_field() {
        let refused = |edit: fn(&mut api::WorkloadTelemetry)| {
            let mut t = api::WorkloadTelemetry::default();
            edit(&mut t);
            WorkloadTelemetry::from_resource(Some(t), "web-0", &BTreeMap::new())
                .expect_err("refused")
                .field
        };
        assert_eq!(
            refused(|t| t.workload_name = "a\"} 1\nfake_metric".into()),
            "telemetry.workload_name"
        );
        assert_eq!(
            refused(|t| t.cluster_id = "x".repeat(MAX_VALUE + 1)),
            "telemetry.cluster_id"
        );
        assert_eq!(refused(|t| t.app = "a b".into()), "telemetry.app");
    }
}
