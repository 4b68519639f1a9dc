//! Services and their EndpointSlices to services: addresses, ports (named target ports
//! resolved from the slices), endpoints with their node and zone, the waypoint and
//! `trafficDistribution`.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use k8s_openapi::{
    api::discovery::v1::EndpointSlice, apimachinery::pkg::util::intstr::IntOrString,
};

use super::{
    ClusterObjects, Translation, api, namespace_labels, reject, service_key,
    waypoint::{Choice, Waypoints},
    workload::WorkloadRef,
};
use crate::k8s::SERVICE_NAME_LABEL;

pub(super) fn translate_services(
    objects: &ClusterObjects,
    waypoints: &Waypoints,
    workloads: &HashMap<String, WorkloadRef>,
    zone_of: &dyn Fn(&str) -> String,
    out: &mut Translation,
) {
    // Slices by the service they belong to; BTreeMap iteration keeps slice order stable.
    let mut slices: HashMap<(&str, &str), Vec<(&str, &EndpointSlice)>> = HashMap::new();
    for (key, slice) in &objects.endpoint_slices {
        let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
        if let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        {
            slices
                .entry((ns, service.as_str()))
                .or_default()
                .push((key.as_str(), slice));
        }
    }

    for (key, svc) in &objects.services {
        let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let my_slices = slices
            .get(&(ns, name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        match service_of(ns, name, svc, my_slices, workloads, zone_of, out) {
            Ok(mut resource) => {
                let namespace_labels = namespace_labels(objects, ns);
                let own = svc.metadata.labels.as_ref();
                // A waypoint's own Service never routes through a waypoint (loop protection).
                if waypoints.labels().namespace_enrolled(namespace_labels)
                    && waypoints.served_by(ns, own).is_none()
                {
                    match waypoints.choose(ns, own, namespace_labels) {
                        Choice::Direct => {}
                        Choice::Through(waypoint) => resource.waypoint = waypoint,
                        Choice::Missing {
                            waypoint,
                            own_label: true,
                        } => reject(out, format!("Service {key}"), waypoints.missing(&waypoint)),
                        Choice::Missing { .. } => {}
                    }
                }
                let key = service_key(ns, name);
                out.resources.insert(
                    key.clone(),
                    api::Resource {
                        key,
                        kind: Some(api::resource::Kind::Service(resource)),
                    },
                );
            }
            Err(reason) => reject(out, format!("Service {key}"), reason),
        }
    }
}

fn service_of(
    namespace: &str,
    name: &str,
    svc: &k8s_openapi::api::core::v1::Service,
    slices: &[(&str, &EndpointSlice)],
    workloads: &HashMap<String, WorkloadRef>,
    zone_of: &dyn Fn(&str) -> String,
    out: &mut Translation,
) -> Result<api::Service, String> {
    let spec = svc.spec.as_ref();
    let mut vip_strings: Vec<&str> = spec
        .and_then(|s| s.cluster_ips.as_deref())
        .unwrap_or_default()
        .iter()
        .map(String::as_str)
        .collect();
    if vip_strings.is_empty() {
        vip_strings.extend(spec.and_then(|s| s.cluster_ip.as_deref()));
    }
    let mut vips = Vec::new();
    // Headless services ("None") have endpoints but no VIP.
    for vip in vip_strings
        .into_iter()
        .filter(|v| !v.is_empty() && *v != "None")
    {
        let ip: IpAddr = vip
            .parse()
            .map_err(|_| format!("spec.clusterIPs entry {vip:?} is not an IP address"))?;
        vips.push(ip.to_string());
    }

    let mut ports = Vec::new();
    for port in spec.and_then(|s| s.ports.as_deref()).unwrap_or_default() {
        let port_name = port.name.clone().unwrap_or_default();
        let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
        let number = u16::try_from(port.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {} is out of range", port.port))?;
        let target_port = match &port.target_port {
            None => u32::from(number),
            Some(IntOrString::Int(n)) => u16::try_from(*n)
                .ok()
                .filter(|p| *p != 0)
                .map(u32::from)
                .ok_or_else(|| format!("targetPort {n} is out of range"))?,
            // A named target port resolves per pod; EndpointSlices carry the resolved number
            // under the service port's name. 0 until a slice says (no endpoints yet).
            Some(IntOrString::String(_)) => slices
                .iter()
                .flat_map(|(_, s)| s.ports.as_deref().unwrap_or_default())
                .find(|p| {
                    p.name.as_deref().unwrap_or_default() == port_name
                        && p.protocol.as_deref().unwrap_or("TCP") == protocol
                })
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
                .map_or(0, u32::from),
        };
        ports.push(api::ServicePort {
            name: port_name,
            port: u32::from(number),
            target_port,
            protocol,
        });
    }

    let mut endpoints: BTreeMap<String, api::Endpoint> = BTreeMap::new();
    for (slice_key, slice) in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        for endpoint in &slice.endpoints {
            let pod_uid = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.uid.as_deref())
                .filter(|uid| workloads.contains_key(*uid));
            let workload = pod_uid.and_then(|uid| workloads.get(uid));
            let node = endpoint
                .node_name
                .clone()
                .or_else(|| workload.map(|w| w.node.clone()))
                .unwrap_or_default();
            let zone = endpoint
                .zone
                .clone()
                .or_else(|| workload.map(|w| w.zone.clone()))
                .unwrap_or_else(|| zone_of(&node));
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            for address in &endpoint.addresses {
                let Ok(ip) = address.parse::<IpAddr>() else {
                    reject(
                        out,
                        format!("EndpointSlice {slice_key}"),
                        format!(
                            "endpoint address {address:?} is not an IP address; endpoint left out of Service {namespace}/{name}"
                        ),
                    );
                    continue;
                };
                // The same address in two slices (while slices are rebalanced): first wins.
                endpoints
                    .entry(ip.to_string())
                    .or_insert_with(|| api::Endpoint {
                        workload_uid: pod_uid.unwrap_or_default().to_owned(),
                        ip: ip.to_string(),
                        node: node.clone(),
                        zone: zone.clone(),
                        ready,
                    });
            }
        }
    }

    Ok(api::Service {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        vips,
        ports,
        endpoints: endpoints.into_values().collect(),
        waypoint: String::new(),
        prefer_close: prefer_close(spec.and_then(|s| s.traffic_distribution.as_deref())),
    })
}

/// Whether `spec.trafficDistribution` asks for close endpoints. `PreferClose` is the stable
/// value; `PreferSameZone` (its newer name) and `PreferSameNode` ask for at least as much
/// locality, which the agent's node-then-zone order gives. Unknown values mean the default
/// spreading, as Kubernetes specifies for implementations that do not recognise them.
fn prefer_close(traffic_distribution: Option<&str>) -> bool {
    matches!(
        traffic_distribution,
        Some("PreferClose" | "PreferSameZone" | "PreferSameNode")
    )
}
