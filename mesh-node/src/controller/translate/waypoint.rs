//! Waypoints: which Gateways are waypoints, which pods serve them, and what routes through them.
//!
//! Rules (all label values are compared exactly):
//! - A **waypoint** is a Gateway (`gateway.networking.k8s.io/v1`) whose `spec.gatewayClassName`
//!   is [`WAYPOINT_CLASS`](crate::k8s::WAYPOINT_CLASS) (or Istio's `istio-waypoint` with
//!   Istio's labels read, see [`super::labels`]); it is published as
//!   `waypoint/<ns>/<name>`. Gateways of other classes are not the mesh's business and are
//!   ignored.
//! - Its **pods** are the pods of its namespace labelled [`GATEWAY_NAME_LABEL`]`=<name>`. They
//!   are workloads (their identity is known, so peers can verify them) but are never enrolled,
//!   even in an enabled namespace: a waypoint's own connections must not be redirected into the
//!   node proxy, which would send them back to a waypoint (loop protection).
//! - Its **endpoints** are its running pods (phase `Running`, with an IP; one endpoint per IP),
//!   ready unless being deleted; its **port** is the HBONE port. A waypoint without running pods
//!   is still published, with no endpoints: traffic meant for it then fails at the source rather
//!   than skipping it.
//! - Its **service account** is that of its pods. Pods that disagree are a mistake: the most
//!   common account wins (ties: the first by name, so the result never depends on order), and
//!   the other pods are left out of the endpoints with a rejection naming both accounts.
//!   [`super::Translation::waypoint_accounts`] lists the winning accounts: the only workload
//!   credentials the CA signs for and the discovery service streams to; and agents are never
//!   given those identities, so an enrolled pod sharing a waypoint's service account is
//!   rejected (no certificate) rather than letting its node impersonate the waypoint.
//! - [`USE_WAYPOINT_LABEL`](crate::k8s::USE_WAYPOINT_LABEL)`=<name>` sends traffic through
//!   waypoint `<name>` of the object's own namespace: on a Service (`Service.waypoint`,
//!   traffic to its VIPs), on a pod (`Workload.waypoint`, traffic to its own IPs), or on a
//!   Namespace (both, for each of its Services and pods without a label of their own); with
//!   Istio's labels read, `istio.io/use-waypoint` where no Trellis label is set on the object.
//!   [`NO_WAYPOINT`] on a Service or pod opts it out of its namespace's waypoint. Only enrolled pods and Services of enrolled namespaces
//!   get a waypoint; never a waypoint's own pods, nor a Service labelled as a waypoint's
//!   ([`GATEWAY_NAME_LABEL`]), which would send the waypoint's traffic to itself.
//! - A label naming a waypoint that does not exist leaves the field empty (traffic goes
//!   directly, as in Istio) and rejects the labelled object with the reason. Failing open is
//!   deliberate: the destination node still enforces every policy, and its engine already fails
//!   closed on the HTTP fields only a waypoint could evaluate, so a missing waypoint loses
//!   routing features, never protection; failing closed would instead black-hole a namespace
//!   whenever its label is applied before its Gateway exists, or a Gateway is recreated.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;

use super::{ClusterObjects, Translation, api, labels::LabelReader, reject};
use crate::{
    identity::Identity,
    k8s::{GATEWAY_NAME_LABEL, NO_WAYPOINT},
};

pub fn waypoint_key(namespace: &str, name: &str) -> String {
    format!("waypoint/{namespace}/{name}")
}

/// The waypoints that exist: Gateways of a waypoint class, by namespace and name, and the
/// labels that choose them.
#[derive(Debug, Default)]
pub(super) struct Waypoints {
    gateways: BTreeSet<(String, String)>,
    labels: LabelReader,
}

/// Where an object's traffic goes, by its use-waypoint labels.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Choice {
    /// No waypoint: not asked for, opted out, or not eligible.
    Direct,
    /// Through this waypoint (`<ns>/<name>`).
    Through(String),
    /// The label names a waypoint (`<ns>/<name>`) that does not exist. `own_label` says whether
    /// the object's own label named it (else its namespace's did).
    Missing { waypoint: String, own_label: bool },
}

impl Waypoints {
    pub(super) fn of(objects: &ClusterObjects, labels: LabelReader) -> Self {
        let gateways = objects
            .gateways
            .values()
            .filter(|g| {
                labels.is_waypoint_class(
                    g.spec
                        .get("gatewayClassName")
                        .and_then(serde_json::Value::as_str),
                )
            })
            .filter_map(|g| {
                Some((
                    g.metadata.namespace.clone()?,
                    g.metadata.name.clone().filter(|n| !n.is_empty())?,
                ))
            })
            .collect();
        Self { gateways, labels }
    }

    /// The labels these waypoints are chosen by.
    pub(super) fn labels(&self) -> LabelReader {
        self.labels
    }

    pub(super) fn exists(&self, namespace: &str, name: &str) -> bool {
        self.gateways
            .contains(&(namespace.to_owned(), name.to_owned()))
    }

    /// The waypoint a pod of `namespace` with `labels` serves, if any.
    pub(super) fn served_by<'a>(
        &self,
        namespace: &str,
        labels: Option<&'a BTreeMap<String, String>>,
    ) -> Option<&'a str> {
        labels?
            .get(GATEWAY_NAME_LABEL)
            .map(String::as_str)
            .filter(|name| self.exists(namespace, name))
    }

    /// The waypoint of an eligible object of `namespace`, from its own label and then its
    /// namespace's (see the module docs).
    pub(super) fn choose(
        &self,
        namespace: &str,
        own: Option<&BTreeMap<String, String>>,
        namespace_labels: Option<&BTreeMap<String, String>>,
    ) -> Choice {
        let label = |labels| self.labels.use_waypoint(labels);
        let (name, own_label) = match (label(own), label(namespace_labels)) {
            (Some(name), _) => (name, true),
            (None, Some(name)) => (name, false),
            (None, None) => return Choice::Direct,
        };
        if name == NO_WAYPOINT {
            return Choice::Direct;
        }
        let waypoint = format!("{namespace}/{name}");
        if self.exists(namespace, &name) {
            Choice::Through(waypoint)
        } else {
            Choice::Missing {
                waypoint,
                own_label,
            }
        }
    }

    /// Rejects enrolled namespaces whose label names a missing waypoint, once each (their
    /// Services and pods inherit the label; they are not rejected one by one).
    pub(super) fn check_namespaces(&self, objects: &ClusterObjects, out: &mut Translation) {
        for (name, namespace) in &objects.namespaces {
            let labels = namespace.metadata.labels.as_ref();
            if !self.labels.namespace_enrolled(labels) {
                continue;
            }
            if let Choice::Missing { waypoint, .. } = self.choose(name, None, labels) {
                reject(out, format!("Namespace {name}"), self.missing(&waypoint));
            }
        }
    }

    /// The rejection reason for a label naming a waypoint that does not exist.
    pub(super) fn missing(&self, waypoint: &str) -> String {
        format!(
            "waypoint {waypoint} does not exist (no Gateway of class {} by that name): {} is \
             ignored and traffic goes directly, without a waypoint",
            self.labels.waypoint_classes(),
            self.labels.use_waypoint_labels()
        )
    }
}

/// A pod that became a workload, as the waypoints see it.
pub(super) struct PodWorkload<'a> {
    pub pod: &'a Pod,
    pub workload: api::Workload,
    pub identity: Identity,
}

/// Publishes every waypoint with its service account and endpoints, from the pods that won
/// their IPs; fills [`Translation::waypoint_accounts`].
pub(super) fn translate_waypoints(
    waypoints: &Waypoints,
    pods: &[PodWorkload<'_>],
    hbone_port: u16,
    out: &mut Translation,
) {
    // Each waypoint's running pods, in pod order.
    let mut serving: BTreeMap<(&str, &str), Vec<&PodWorkload<'_>>> = BTreeMap::new();
    for (namespace, name) in &waypoints.gateways {
        serving.insert((namespace.as_str(), name.as_str()), Vec::new());
    }
    for pod in pods {
        let namespace = pod.workload.namespace.as_str();
        let running = pod.pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        if let Some(name) = waypoints.served_by(namespace, pod.pod.metadata.labels.as_ref())
            && running
            && let Some(list) = serving.get_mut(&(namespace, name))
        {
            list.push(pod);
        }
    }

    for ((namespace, name), pods) in serving {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for pod in &pods {
            *counts
                .entry(pod.workload.service_account.as_str())
                .or_default() += 1;
        }
        // Most pods, then the first name: `max_by_key` keeps the last maximum, so iterate
        // names in reverse.
        let account = counts
            .iter()
            .rev()
            .max_by_key(|(_, count)| **count)
            .map(|(account, _)| (*account).to_owned())
            .unwrap_or_default();

        let mut endpoints: BTreeMap<String, api::Endpoint> = BTreeMap::new();
        for pod in &pods {
            let workload = &pod.workload;
            if workload.service_account != account {
                reject(
                    out,
                    format!("Pod {namespace}/{}", workload.name),
                    format!(
                        "serves waypoint {namespace}/{name} as service account {}, but most of its \
                         pods run as {account}: left out of the waypoint's endpoints (give every \
                         pod of a waypoint the same service account)",
                        workload.service_account
                    ),
                );
                continue;
            }
            // Draining pods stay known (their connections finish) but take no new ones.
            let ready = pod.pod.metadata.deletion_timestamp.is_none();
            for ip in &workload.ips {
                endpoints.insert(
                    ip.clone(),
                    api::Endpoint {
                        workload_uid: workload.uid.clone(),
                        ip: ip.clone(),
                        node: workload.node.clone(),
                        zone: workload.zone.clone(),
                        ready,
                    },
                );
            }
        }
        if !account.is_empty() {
            out.waypoint_accounts
                .insert((namespace.to_owned(), account.clone()));
        }
        let key = waypoint_key(namespace, name);
        out.resources.insert(
            key.clone(),
            api::Resource {
                key,
                kind: Some(api::resource::Kind::Waypoint(api::Waypoint {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    service_account: account,
                    port: u32::from(hbone_port),
                    endpoints: endpoints.into_values().collect(),
                })),
            },
        );
    }
}
