//! Service and EndpointSlice manifests for the control-plane testbed.
//!
//! A Service and its one EndpointSlice (IPv4 pod addresses) are written together, as one
//! `List` in one file, so the controller never sees one without the other. Virtual IPs should
//! come from 10.96.0.0/16 and fd00:96::/64, which nothing else on the testbed uses: an enrolled
//! pod's connect to them is redirected by the datapath before any route lookup, so they need no
//! route, and a connect that escaped the mesh would fail rather than reach something.

use std::{net::IpAddr, time::Duration};

use anyhow::{Result, bail};
use serde_json::json;

use super::{Mesh, NAMESPACE, remove_manifest, write_manifest};
use crate::testbed::Pod;

impl Mesh<'_> {
    /// Creates or replaces Service `name` in [`NAMESPACE`]: `vips` as its cluster IPs, `ports`
    /// as `(port, targetPort)` TCP pairs, and an EndpointSlice listing each `(pod, ready)` of
    /// `endpoints` by its IPv4 address, node and uid. `traffic_distribution` sets
    /// `spec.trafficDistribution` (e.g. `PreferClose`).
    pub fn write_service(
        &mut self,
        name: &str,
        vips: &[IpAddr],
        ports: &[(u16, u16)],
        endpoints: &[(&Pod, bool)],
        traffic_distribution: Option<&str>,
    ) -> Result<()> {
        let port_name = |port: u16| format!("tcp-{port}");
        let mut spec = json!({
            "type": "ClusterIP",
            "clusterIP": vips.first().map(ToString::to_string),
            "clusterIPs": vips.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "ports": ports.iter().map(|(port, target)| json!({
                "name": port_name(*port), "protocol": "TCP", "port": port, "targetPort": target,
            })).collect::<Vec<_>>(),
        });
        if let Some(distribution) = traffic_distribution {
            spec["trafficDistribution"] = distribution.into();
        }
        let service = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": spec,
        });
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{name}-ipv4"), "namespace": NAMESPACE,
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "ports": ports.iter().map(|(port, target)| json!({
                "name": port_name(*port), "protocol": "TCP", "port": target,
            })).collect::<Vec<_>>(),
            "endpoints": endpoints.iter().map(|(pod, ready)| json!({
                "addresses": [pod.ip4.to_string()],
                "conditions": {"ready": ready},
                "nodeName": self.tb.node(pod.node).name,
                "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": pod.name, "uid": pod.uid},
            })).collect::<Vec<_>>(),
        });
        let list = json!({"apiVersion": "v1", "kind": "List", "items": [service, slice]});
        write_manifest(
            &self.control()?.manifests,
            &format!("service-{name}.json"),
            &list,
        )
    }

    /// Removes Service `name` and its EndpointSlice from the manifests.
    pub fn delete_service(&mut self, name: &str) -> Result<()> {
        remove_manifest(&self.control()?.manifests, &format!("service-{name}.json"))
    }

    /// Waits (bounded) until node `node`'s agent holds Service `name` with exactly `ready`
    /// ready endpoints; returns the service as the config dump shows it.
    pub fn wait_service(
        &self,
        node: usize,
        name: &str,
        ready: usize,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let find = |dump: &serde_json::Value| {
            dump["services"].as_array().and_then(|services| {
                services
                    .iter()
                    .find(|s| s["name"] == name && s["namespace"] == NAMESPACE)
                    .cloned()
            })
        };
        let ready_count = |service: &serde_json::Value| {
            service["endpoints"]
                .as_array()
                .map(|e| e.iter().filter(|e| e["ready"] == true).count())
        };
        let dump = self.wait_config(node, timeout, |dump| {
            find(dump).and_then(|s| ready_count(&s)) == Some(ready)
        })?;
        let Some(service) = find(&dump) else {
            bail!("service {name} vanished from node {node}'s config dump");
        };
        Ok(service)
    }
}
