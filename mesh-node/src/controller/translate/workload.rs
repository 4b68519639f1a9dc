//! Pods to workloads: which pods are workloads, whether they are enrolled, which pod owns an
//! address two pods claim, the identities each node's agent may obtain, and what telemetry
//! says about each ([`owner`]: the workload a pod belongs to).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::Pod;

use super::{
    ClusterObjects, TranslateSettings, Translation, api, namespace_labels, reject,
    waypoint::{self, Choice, PodWorkload, Waypoints},
    workload_key,
};
use crate::{identity::Identity, state::WorkloadTelemetry};

mod owner;

/// A pod that became a workload, as services see it.
pub(super) struct WorkloadRef {
    pub(super) node: String,
    pub(super) zone: String,
}

/// Translates pods (and with them the waypoints they serve); returns the translated workloads
/// by pod uid.
pub(super) fn translate_pods(
    objects: &ClusterObjects,
    settings: &TranslateSettings,
    waypoints: &Waypoints,
    zone_of: &dyn Fn(&str) -> String,
    out: &mut Translation,
) -> HashMap<String, WorkloadRef> {
    let mut candidates: Vec<(&Pod, api::Workload, Identity)> = Vec::new();
    for (key, pod) in &objects.pods {
        let object = format!("Pod {key}");
        match workload_of(objects, settings, waypoints, pod, zone_of) {
            Ok(Some(candidate)) => candidates.push((pod, candidate.0, candidate.1)),
            Ok(None) => {}
            Err(reason) => reject(out, object, reason),
        }
    }

    // One owner per IP: the pod that is not being deleted, then the newer one, then the
    // larger uid (only so that the outcome never depends on iteration order).
    let rank = |pod: &Pod, uid: &str| {
        (
            pod.metadata.deletion_timestamp.is_none(),
            pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
            uid.to_owned(),
        )
    };
    let mut owner: HashMap<&str, usize> = HashMap::new();
    for (i, (pod, workload, _)) in candidates.iter().enumerate() {
        for ip in &workload.ips {
            match owner.get(ip.as_str()) {
                Some(&j)
                    if rank(candidates[j].0, &candidates[j].1.uid) >= rank(pod, &workload.uid) => {}
                _ => {
                    owner.insert(ip.as_str(), i);
                }
            }
        }
    }
    let mut losers: BTreeMap<usize, (String, usize)> = BTreeMap::new();
    for (i, (_, workload, _)) in candidates.iter().enumerate() {
        for ip in &workload.ips {
            if let Some(&j) = owner.get(ip.as_str()).filter(|&&j| j != i) {
                losers.entry(i).or_insert((ip.clone(), j));
            }
        }
    }

    let mut winners: Vec<PodWorkload<'_>> = Vec::with_capacity(candidates.len());
    for (i, (pod, workload, identity)) in candidates.iter().enumerate() {
        if let Some((ip, j)) = losers.get(&i) {
            let winner = &candidates[*j].1;
            reject(
                out,
                format!("Pod {}/{}", workload.namespace, workload.name),
                format!(
                    "IP {ip} is also claimed by the newer pod {}/{}; the older pod is left out",
                    winner.namespace, winner.name
                ),
            );
            continue;
        }
        winners.push(PodWorkload {
            pod,
            workload: workload.clone(),
            identity: identity.clone(),
        });
    }

    // Waypoints first: which service accounts are theirs decides the other pods' identities.
    waypoint::translate_waypoints(waypoints, &winners, settings.hbone_port, out);

    let mut workloads = HashMap::new();
    for PodWorkload {
        pod,
        mut workload,
        identity,
    } in winners
    {
        let object = || format!("Pod {}/{}", workload.namespace, workload.name);
        if workload.enrolled {
            match waypoints.choose(
                &workload.namespace,
                pod.metadata.labels.as_ref(),
                namespace_labels(objects, &workload.namespace),
            ) {
                Choice::Direct => {}
                Choice::Through(name) => workload.waypoint = name,
                Choice::Missing {
                    waypoint,
                    own_label: true,
                } => reject(out, object(), waypoints.missing(&waypoint)),
                // Reported once, on the namespace.
                Choice::Missing { .. } => {}
            }
            if out.is_waypoint_account(identity.namespace(), identity.service_account()) {
                reject(
                    out,
                    object(),
                    format!(
                        "runs as service account {}, which is a waypoint's: agents are never \
                         given a waypoint's identity, so this pod gets no certificate (give it a \
                         service account of its own)",
                        workload.service_account
                    ),
                );
            } else {
                out.identities_by_node
                    .entry(workload.node.clone())
                    .or_default()
                    .insert(identity);
            }
        }
        workloads.insert(
            workload.uid.clone(),
            WorkloadRef {
                node: workload.node.clone(),
                zone: workload.zone.clone(),
            },
        );
        let key = workload_key(&workload.uid);
        out.resources.insert(
            key.clone(),
            api::Resource {
                key,
                kind: Some(api::resource::Kind::Workload(workload.clone())),
            },
        );
    }
    workloads
}

/// The workload of one pod: `Ok(None)` when the pod is not (yet, or any more) a workload,
/// `Err(reason)` when it should be and cannot. Its waypoint is resolved later, once the
/// waypoints are known.
fn workload_of(
    objects: &ClusterObjects,
    settings: &TranslateSettings,
    waypoints: &Waypoints,
    pod: &Pod,
    zone_of: &dyn Fn(&str) -> String,
) -> Result<Option<(api::Workload, Identity)>, String> {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Ok(None);
    }
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Ok(None);
    }
    let Some(node) = spec
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
    else {
        return Ok(None);
    };
    let mut ip_strings: Vec<&str> = status
        .and_then(|s| s.pod_ips.as_deref())
        .unwrap_or_default()
        .iter()
        .map(|p| p.ip.as_str())
        .collect();
    if ip_strings.is_empty() {
        ip_strings.extend(status.and_then(|s| s.pod_ip.as_deref()));
    }
    ip_strings.retain(|ip| !ip.is_empty());
    if ip_strings.is_empty() {
        return Ok(None);
    }
    let mut ips = Vec::with_capacity(ip_strings.len());
    for ip in ip_strings {
        let parsed: IpAddr = ip
            .parse()
            .map_err(|_| format!("status.podIPs entry {ip:?} is not an IP address"))?;
        let ip = parsed.to_string();
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }

    let meta = &pod.metadata;
    let uid = meta
        .uid
        .as_deref()
        .filter(|u| !u.is_empty())
        .ok_or("metadata.uid is missing: give the pod a unique uid")?;
    let namespace = meta.namespace.as_deref().unwrap_or_default();
    let name = meta.name.as_deref().unwrap_or_default();
    let service_account = spec
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|sa| !sa.is_empty())
        .unwrap_or("default");
    let identity = Identity::new(&settings.trust_domain, namespace, service_account)
        .map_err(|e| format!("no valid SPIFFE identity: {e}"))?;

    let labels = meta.labels.clone().unwrap_or_default();
    let in_mesh = settings
        .labels()
        .pod_enrolled(meta.labels.as_ref(), namespace_labels(objects, namespace));
    // Loop protection: a waypoint's own connections are never redirected (module docs).
    let waypoint_pod = waypoints
        .served_by(namespace, meta.labels.as_ref())
        .is_some();

    let (owner, kind) = owner::workload_of(pod);
    let telemetry = WorkloadTelemetry::derive(&owner, &kind, &labels, &settings.cluster_id);
    let workload = api::Workload {
        uid: uid.to_owned(),
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        node: node.to_owned(),
        ips,
        labels: labels.into_iter().collect(),
        enrolled: in_mesh && !waypoint_pod,
        zone: zone_of(node),
        waypoint: String::new(),
        telemetry: Some(telemetry.into()),
    };
    Ok(Some((workload, identity)))
}
