//! Which workload a pod belongs to, the way Istio names it in telemetry: its controlling
//! owner, walked up to the object users write.
//!
//! - a ReplicaSet named `<deployment>-<pod-template-hash>` (the pod carrying that hash label)
//!   is its Deployment's;
//! - a Job named `<cronjob>-<8 to 11 digits>` is a CronJob's (the schedule time a CronJob
//!   suffixes its Jobs with; Jobs themselves are not watched, so their name is the evidence, as
//!   in Istio);
//! - any other controller (StatefulSet, DaemonSet, Job, a ReplicaSet of its own, a custom
//!   kind) is the workload under its own name and kind;
//! - a pod without a controlling owner is its own workload (kind `Pod`).

use k8s_openapi::api::core::v1::Pod;

use crate::{k8s::POD_TEMPLATE_HASH_LABEL, state::workload::POD_KIND};

/// `(name, kind)` of `pod`'s workload.
pub(in crate::controller::translate) fn workload_of(pod: &Pod) -> (String, String) {
    let meta = &pod.metadata;
    let pod_name = meta.name.clone().unwrap_or_default();
    let Some(owner) = meta
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true) && !r.name.is_empty() && !r.kind.is_empty())
    else {
        return (pod_name, POD_KIND.to_owned());
    };
    let hash = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(POD_TEMPLATE_HASH_LABEL))
        .filter(|h| !h.is_empty());
    match owner.kind.as_str() {
        "ReplicaSet" => {
            if let Some(deployment) = hash.and_then(|h| strip_suffix(&owner.name, h)) {
                return (deployment.to_owned(), "Deployment".to_owned());
            }
        }
        "Job" => {
            if let Some(cronjob) = cronjob_of(&owner.name) {
                return (cronjob.to_owned(), "CronJob".to_owned());
            }
        }
        _ => {}
    }
    (owner.name.clone(), owner.kind.clone())
}

/// `name` without `-<suffix>`, when that is how it ends and something is left.
fn strip_suffix<'a>(name: &'a str, suffix: &str) -> Option<&'a str> {
    name.strip_suffix(suffix)?
        .strip_suffix('-')
        .filter(|rest| !rest.is_empty())
}

/// The CronJob a Job named `<cronjob>-<8 to 11 digits>` was created by.
fn cronjob_of(job: &str) -> Option<&str> {
    let (cronjob, digits) = job.rsplit_once('-')?;
    let timestamp = (8..=11).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit());
    (timestamp && !cronjob.is_empty()).then_some(cronjob)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    use super::*;

    fn pod(owners: &[(&str, &str, bool)], hash: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("reviews-v2-7f4669bdd9-x8k2p".into()),
                labels: hash.map(|h| [(POD_TEMPLATE_HASH_LABEL.to_owned(), h.to_owned())].into()),
                owner_references: Some(
                    owners
                        .iter()
                        .map(|(kind, name, controller)| OwnerReference {
                            kind: (*kind).into(),
                            name: (*name).into(),
                            controller: Some(*controller),
                            ..OwnerReference::default()
                        })
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    fn of(owners: &[(&str, &str, bool)], hash: Option<&str>) -> (String, String) {
        workload_of(&pod(owners, hash))
    }

    fn pair(name: &str, kind: &str) -> (String, String) {
        (name.to_owned(), kind.to_owned())
    }

    #[test]
    fn a_deployments_pods_are_the_deployment() {
        let rs = [("ReplicaSet", "reviews-v2-7f4669bdd9", true)];
        assert_eq!(
            of(&rs, Some("7f4669bdd9")),
            pair("reviews-v2", "Deployment")
        );
        // Without the hash label, or with another hash, the ReplicaSet is the workload.
        assert_eq!(of(&rs, None), pair("reviews-v2-7f4669bdd9", "ReplicaSet"));
        assert_eq!(
            of(&rs, Some("0000000000")),
            pair("reviews-v2-7f4669bdd9", "ReplicaSet")
        );
        // A ReplicaSet named by the hash alone keeps its name.
        let bare = [("ReplicaSet", "7f4669bdd9", true)];
        assert_eq!(
            of(&bare, Some("7f4669bdd9")),
            pair("7f4669bdd9", "ReplicaSet")
        );
    }

    #[test]
    fn other_controllers_are_the_workload_by_name() {
        for kind in ["StatefulSet", "DaemonSet", "Job", "Rollout"] {
            assert_eq!(of(&[(kind, "db", true)], None), pair("db", kind));
        }
        // The controlling reference decides, not the first one.
        assert_eq!(
            of(
                &[("ConfigMap", "cfg", false), ("StatefulSet", "db", true)],
                None
            ),
            pair("db", "StatefulSet")
        );
    }

    #[test]
    fn a_cronjobs_jobs_are_the_cronjob() {
        assert_eq!(
            of(&[("Job", "backup-28930140", true)], None),
            pair("backup", "CronJob")
        );
        assert_eq!(
            of(&[("Job", "nightly-report-28930140123", true)], None),
            pair("nightly-report", "CronJob")
        );
        // Too few or too many digits, or no name before them: a Job of its own.
        for job in [
            "backup-1234567",
            "backup-123456789012",
            "backup-2893014x",
            "-28930140",
        ] {
            assert_eq!(of(&[("Job", job, true)], None), pair(job, "Job"));
        }
    }

    #[test]
    fn a_pod_without_a_controller_is_its_own_workload() {
        let name = "reviews-v2-7f4669bdd9-x8k2p";
        assert_eq!(of(&[], None), pair(name, POD_KIND));
        assert_eq!(
            of(&[("ReplicaSet", "rs", false)], None),
            pair(name, POD_KIND)
        );
        assert_eq!(of(&[("", "rs", true)], None), pair(name, POD_KIND));
    }
}
