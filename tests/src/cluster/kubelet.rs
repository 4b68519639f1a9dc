//! The testbed as the cluster's kubelet: testbed nodes are `Node` objects, and a testbed pod
//! runs as a real `Pod` created through the API server.
//!
//! As a kubelet does, [`Kubelet::run_pod`] takes a pod bound to its node (`spec.nodeName`),
//! makes its cgroup the way kubelet's systemd driver names it
//! (`kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice`, the uid's
//! dashes as underscores, a `cri-containerd-<id>.scope` below it for the container) and reports
//! it through the status subresource: phase Running, its addresses, Ready. Owners, when a test
//! asks for them, form the chain a Deployment makes (Deployment -> ReplicaSet -> Pod), created
//! by hand since no Deployment controller runs. Deleting goes the kubelet's way too: a graceful
//! delete, the processes stopped, then the final delete with no grace.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use sha2::Digest;

use super::Cluster;
use crate::testbed::{Pod, Testbed};

/// What a test asks of a pod's object.
#[derive(Debug, Clone, Default)]
pub struct PodSpec {
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// Own the pod by a ReplicaSet of this Deployment (both created when missing).
    pub deployment: Option<String>,
}

impl PodSpec {
    /// A pod in `namespace` running as `service_account`, with no labels and no owner.
    pub fn new(namespace: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            ..Self::default()
        }
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    pub fn deployment(mut self, name: &str) -> Self {
        self.deployment = Some(name.to_owned());
        self
    }
}

/// A testbed pod running as a Pod object.
#[derive(Debug, Clone)]
pub struct KubePod {
    /// The testbed pod, with the object's uid and the container's cgroup: spawn in it.
    pub pod: Pod,
    pub namespace: String,
    /// The pod-level cgroup (`...-pod<uid>.slice`), the one the agent enrolls.
    pub slice: PathBuf,
}

impl KubePod {
    pub fn name(&self) -> &str {
        &self.pod.name
    }
}

/// Plays the kubelet of every testbed node against `cluster`.
pub struct Kubelet<'a> {
    pub cluster: &'a Cluster,
    pub tb: &'a Testbed,
}

impl<'a> Kubelet<'a> {
    pub fn new(cluster: &'a Cluster, tb: &'a Testbed) -> Self {
        Self { cluster, tb }
    }

    /// Creates a Node per testbed node, Ready, its LAN address its InternalIP.
    pub fn register_nodes(&self) -> Result<()> {
        for node in self.tb.nodes() {
            let object = json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node.name, "labels": {
                    "kubernetes.io/hostname": node.name,
                    "kubernetes.io/os": "linux",
                }},
            });
            self.cluster.apply(&object.to_string())?;
            let status = json!({"status": {
                "addresses": [
                    {"type": "InternalIP", "address": node.lan_ip4.to_string()},
                    {"type": "InternalIP", "address": node.lan_ip6.to_string()},
                    {"type": "Hostname", "address": node.name},
                ],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "message": "the testbed runs this node"}],
            }});
            self.patch_status("node", &node.name, None, &status)?;
        }
        Ok(())
    }

    /// Creates `spec`'s Pod for testbed pod `pod` (named after it) on its node, makes its
    /// cgroup and reports it Running and Ready with the pod's addresses.
    pub fn run_pod(&self, pod: &Pod, spec: &PodSpec) -> Result<KubePod> {
        self.ensure_namespace(&spec.namespace)?;
        self.ensure_service_account(&spec.namespace, &spec.service_account)?;
        let mut labels = spec.labels.clone();
        let mut metadata = json!({"name": pod.name, "namespace": spec.namespace});
        if let Some(deployment) = &spec.deployment {
            let (hash, owner) = self.replica_set(&spec.namespace, deployment)?;
            labels.insert("app".to_owned(), deployment.clone());
            labels.insert("pod-template-hash".to_owned(), hash);
            metadata["ownerReferences"] = json!([owner]);
        }
        metadata["labels"] = json!(labels);
        let node = self.tb.node(pod.node);
        let object = json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": {
                "nodeName": node.name,
                "serviceAccountName": spec.service_account,
                "automountServiceAccountToken": false,
                "containers": [{"name": "app", "image": "pod-app"}],
            },
        });
        let created: Value = serde_json::from_str(
            &self
                .cluster
                .kubectl_stdin(&["create", "-o", "json", "-f", "-"], &object.to_string())?,
        )
        .context("kubectl create printed no JSON")?;
        let uid = created["metadata"]["uid"]
            .as_str()
            .context("the created pod has no uid")?
            .to_owned();
        let qos = created["status"]["qosClass"]
            .as_str()
            .unwrap_or("BestEffort")
            .to_ascii_lowercase();
        let slice = node
            .pod_cgroup_root
            .join("kubepods.slice")
            .join(format!("kubepods-{qos}.slice"))
            .join(format!("kubepods-{qos}-pod{}.slice", uid.replace('-', "_")));
        let container: String = sha2::Sha256::digest(uid.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let scope = slice.join(format!("cri-containerd-{container}.scope"));
        std::fs::create_dir_all(&scope)
            .with_context(|| format!("creating cgroup {}", scope.display()))?;
        let status = json!({"status": {
            "phase": "Running",
            "hostIP": node.lan_ip4.to_string(),
            "hostIPs": [{"ip": node.lan_ip4.to_string()}],
            "podIP": pod.ip4.to_string(),
            "podIPs": [{"ip": pod.ip4.to_string()}, {"ip": pod.ip6.to_string()}],
            "conditions": conditions(true),
            "containerStatuses": [{
                "name": "app", "image": "pod-app", "imageID": "", "ready": true,
                "started": true, "restartCount": 0,
                "containerID": format!("containerd://{container}"),
                "state": {"running": {}},
            }],
        }});
        self.patch_status("pod", &pod.name, Some(&spec.namespace), &status)?;
        let mut running = pod.clone();
        running.uid = uid;
        running.cgroup = scope;
        Ok(KubePod {
            pod: running,
            namespace: spec.namespace.clone(),
            slice,
        })
    }

    /// Reports the pod Ready or not (as a failing readiness probe would).
    pub fn set_ready(&self, pod: &KubePod, ready: bool) -> Result<()> {
        let status = json!({"status": {"conditions": conditions(ready)}});
        self.patch_status("pod", pod.name(), Some(&pod.namespace), &status)
    }

    /// Deletes the pod as its kubelet would: graceful delete (the object is Terminating), its
    /// processes stopped, then the final delete.
    pub fn delete_pod(&self, pod: &KubePod) -> Result<()> {
        let ns = pod.namespace.as_str();
        self.cluster
            .kubectl(&["delete", "pod", pod.name(), "-n", ns, "--wait=false"])?;
        kill_cgroup(&pod.slice)?;
        self.cluster.kubectl(&[
            "delete",
            "pod",
            pod.name(),
            "-n",
            ns,
            "--grace-period=0",
            "--force",
            "--ignore-not-found",
        ])?;
        Ok(())
    }

    /// Creates Namespace `namespace` unless it exists (never touching one that does: its labels
    /// are the test's).
    fn ensure_namespace(&self, namespace: &str) -> Result<()> {
        self.create_missing(
            &["namespace", namespace],
            &["create", "namespace", namespace],
        )
    }

    fn ensure_service_account(&self, namespace: &str, name: &str) -> Result<()> {
        self.create_missing(
            &["serviceaccount", name, "-n", namespace],
            &["create", "serviceaccount", name, "-n", namespace],
        )
    }

    fn create_missing(&self, get: &[&str], create: &[&str]) -> Result<()> {
        let mut args = vec!["get"];
        args.extend(get);
        if self.cluster.kubectl_output(&args)?.status.success() {
            return Ok(());
        }
        match self.cluster.kubectl(create) {
            Ok(_) => Ok(()),
            // Made meanwhile by someone else: what was wanted.
            Err(e) if e.to_string().contains("AlreadyExists") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The Deployment and its ReplicaSet (created when missing): the pod-template-hash and
    /// the owner reference a pod of the ReplicaSet carries.
    fn replica_set(&self, namespace: &str, deployment: &str) -> Result<(String, Value)> {
        let hash: String = sha2::Sha256::digest(format!("{namespace}/{deployment}").as_bytes())
            .iter()
            .take(5)
            .map(|b| format!("{b:02x}"))
            .collect();
        let template = |labels: Value| {
            json!({
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "app", "image": "pod-app"}]},
            })
        };
        let object = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": deployment, "namespace": namespace},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": deployment}},
                "template": template(json!({"app": deployment})),
            },
        });
        self.cluster.apply(&object.to_string())?;
        let owner = self
            .cluster
            .get_json(&["deployment", deployment, "-n", namespace])?;
        let rs_name = format!("{deployment}-{hash}");
        let labels = json!({"app": deployment, "pod-template-hash": hash});
        let object = json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": rs_name, "namespace": namespace, "labels": labels,
                         "ownerReferences": [owner_reference(&owner, "Deployment")?]},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": template(labels.clone()),
            },
        });
        self.cluster.apply(&object.to_string())?;
        let rs = self
            .cluster
            .get_json(&["replicaset", &rs_name, "-n", namespace])?;
        Ok((hash, owner_reference(&rs, "ReplicaSet")?))
    }

    pub fn patch_status(
        &self,
        kind: &str,
        name: &str,
        namespace: Option<&str>,
        patch: &Value,
    ) -> Result<()> {
        let patch = patch.to_string();
        let mut args = vec![
            "patch",
            kind,
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ];
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        self.cluster.kubectl(&args).map(drop)
    }
}

fn conditions(ready: bool) -> Value {
    let ready = if ready { "True" } else { "False" };
    json!([
        {"type": "PodScheduled", "status": "True"},
        {"type": "Initialized", "status": "True"},
        {"type": "ContainersReady", "status": ready},
        {"type": "Ready", "status": ready},
    ])
}

fn owner_reference(object: &Value, kind: &str) -> Result<Value> {
    Ok(json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "name": object["metadata"]["name"].as_str().context("owner has no name")?,
        "uid": object["metadata"]["uid"].as_str().context("owner has no uid")?,
        "controller": true,
        "blockOwnerDeletion": true,
    }))
}

/// Kills every process in `dir`'s cgroup tree and waits (bounded) until it is empty.
fn kill_cgroup(dir: &std::path::Path) -> Result<()> {
    std::fs::write(dir.join("cgroup.kill"), "1")
        .with_context(|| format!("killing cgroup {}", dir.display()))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let events = std::fs::read_to_string(dir.join("cgroup.events")).unwrap_or_default();
        if events.lines().any(|l| l == "populated 0") {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    anyhow::bail!(
        "cgroup {} still has processes after cgroup.kill",
        dir.display()
    )
}
