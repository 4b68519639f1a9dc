//! Waypoints on the control-plane testbed: a Gateway of class `trellis-waypoint`, one testbed
//! pod labelled as its pod, and `mesh-node waypoint` running in that pod's namespace and
//! cgroup (not enrolled, so its own connections are not redirected).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::{
    CONTROLLER_PORT, HBONE_PORT, Mesh, NAMESPACE, TRUST_DOMAIN, http_get, remove_manifest,
    service_account, write_manifest, write_private,
};
use crate::testbed::{Pod, Proc, SpawnOptions};

/// The label that routes a namespace's, service's or pod's traffic through a waypoint.
pub const USE_WAYPOINT_LABEL: &str = "trellis.dev/use-waypoint";
/// The Gateway API label on a waypoint's pods.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
pub const WAYPOINT_ADMIN_PORT: u16 = 15000;
pub const WAYPOINT_METRICS_PORT: u16 = 15020;
pub const WAYPOINT_READY_PORT: u16 = 15021;
const WAYPOINT_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running waypoint.
pub struct Waypoint<'a> {
    pub name: String,
    pub pod: &'a Pod,
    pub process: Proc,
}

impl Waypoint<'_> {
    /// Its `/metrics` text, read from inside its pod.
    pub fn metrics(&self) -> Result<String> {
        let addr = SocketAddr::new(self.pod.ip4.into(), WAYPOINT_METRICS_PORT);
        let (status, body) = self.pod.netns.run(move || http_get(addr, "/metrics"))??;
        if status != 200 {
            bail!("waypoint metrics returned {status}");
        }
        Ok(body)
    }

    /// Its access log events (JSON lines with target `access`).
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.process
            .stderr_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .collect()
    }

    pub fn log_text(&self) -> String {
        self.process.stderr_text()
    }

    /// Its `/config_dump`, read from inside its pod (the admin port listens on loopback).
    pub fn config_dump(&self) -> Result<serde_json::Value> {
        let addr = SocketAddr::from(([127, 0, 0, 1], WAYPOINT_ADMIN_PORT));
        let (status, body) = self
            .pod
            .netns
            .run(move || http_get(addr, "/config_dump"))??;
        if status != 200 {
            bail!("waypoint config dump returned {status}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Waits (bounded) until its config dump satisfies `ready`; returns it.
    pub fn wait_dump(
        &self,
        timeout: Duration,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let dump = self.config_dump()?;
            if ready(&dump) {
                return Ok(dump);
            }
            if Instant::now() > deadline {
                bail!(
                    "waypoint config dump not as expected after {timeout:?}: routes {} traffic_policies {} l7 {}",
                    dump["routes"],
                    dump["traffic_policies"],
                    dump["l7"]
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (bounded) until the `l7` part of its config dump satisfies `ready`.
    pub fn wait_l7(
        &self,
        timeout: Duration,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        Ok(self.wait_dump(timeout, |dump| ready(&dump["l7"]))?["l7"].clone())
    }

    /// Waits (bounded) until the waypoint holds exactly `routes` (`Kind ns/name`) and
    /// `traffic_policies` (`ns/name`), as its config dump lists them.
    pub fn wait_programmed(
        &self,
        routes: &[&str],
        traffic_policies: &[&str],
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let mut routes: Vec<String> = routes.iter().map(|r| (*r).to_owned()).collect();
        routes.sort();
        let mut policies: Vec<String> = traffic_policies.iter().map(|p| (*p).to_owned()).collect();
        policies.sort();
        self.wait_dump(timeout, |dump| {
            let mut got_routes: Vec<String> = dump["routes"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|r| {
                            format!(
                                "{} {}",
                                r["kind"].as_str().unwrap_or_default(),
                                r["id"].as_str().unwrap_or_default()
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            got_routes.sort();
            let mut got_policies: Vec<String> = dump["traffic_policies"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p["id"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            got_policies.sort();
            got_routes == routes && got_policies == policies
        })
    }
}

impl Mesh<'_> {
    /// Creates or replaces an `HTTPRoute` or `GRPCRoute` in [`NAMESPACE`].
    pub fn write_route(&mut self, kind: &str, name: &str, spec: serde_json::Value) -> Result<()> {
        self.write_l7_object("gateway.networking.k8s.io/v1", kind, name, spec)
    }

    /// Creates or replaces a `TrafficPolicy` in [`NAMESPACE`].
    pub fn write_traffic_policy(&mut self, name: &str, spec: serde_json::Value) -> Result<()> {
        self.write_l7_object("traffic.trellis.dev/v1", "TrafficPolicy", name, spec)
    }

    /// Creates or replaces an object of any L7 kind and `apiVersion` (Istio's
    /// `networking.istio.io` kinds, at any served version) in [`NAMESPACE`].
    pub fn write_l7(
        &mut self,
        api_version: &str,
        kind: &str,
        name: &str,
        spec: serde_json::Value,
    ) -> Result<()> {
        self.write_l7_object(api_version, kind, name, spec)
    }

    /// Removes an object written by [`Mesh::write_route`] or [`Mesh::write_traffic_policy`].
    pub fn delete_l7_object(&mut self, kind: &str, name: &str) -> Result<()> {
        remove_manifest(
            &self.control()?.manifests,
            &format!("l7-{kind}-{name}.json"),
        )
    }

    fn write_l7_object(
        &mut self,
        api_version: &str,
        kind: &str,
        name: &str,
        spec: serde_json::Value,
    ) -> Result<()> {
        let manifest = json!({
            "apiVersion": api_version, "kind": kind,
            "metadata": {"name": name, "namespace": NAMESPACE, "generation": 1},
            "spec": spec,
        });
        write_manifest(
            &self.control()?.manifests,
            &format!("l7-{kind}-{name}.json"),
            &manifest,
        )
    }
}

impl<'tb> Mesh<'tb> {
    /// Declares Gateway `name` (class `trellis-waypoint`) in [`NAMESPACE`], makes `pod` its
    /// pod (label [`GATEWAY_NAME_LABEL`]), starts `mesh-node waypoint` in it and waits until it
    /// is ready. The pod's service account is the waypoint's identity.
    pub fn start_waypoint(&mut self, name: &str, pod: &'tb Pod) -> Result<Waypoint<'tb>> {
        self.start_waypoint_with(name, pod, "")
    }

    /// [`Mesh::start_waypoint`] with `extra` appended to its configuration file (top-level
    /// YAML keys, such as `tracing:`).
    pub fn start_waypoint_with(
        &mut self,
        name: &str,
        pod: &'tb Pod,
        extra: &str,
    ) -> Result<Waypoint<'tb>> {
        self.start_waypoint_of_class(name, pod, "trellis-waypoint", extra)
    }

    /// [`Mesh::start_waypoint_with`] for a Gateway of `class` (Istio's `istio-waypoint`).
    pub fn start_waypoint_of_class(
        &mut self,
        name: &str,
        pod: &'tb Pod,
        class: &str,
        extra: &str,
    ) -> Result<Waypoint<'tb>> {
        let gateway = json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "gatewayClassName": class,
                "listeners": [{"name": "mesh", "port": HBONE_PORT, "protocol": "HBONE"}],
            },
        });
        write_manifest(
            &self.control()?.manifests,
            &format!("gateway-{name}.json"),
            &gateway,
        )?;
        self.write_pod(pod, NAMESPACE, &[(GATEWAY_NAME_LABEL, name)])?;

        let tb = self.tb;
        let scratch = tb.scratch_dir();
        let token_file = scratch.join(format!("token-waypoint-{name}"));
        write_private(&token_file, &self.service_account_token(pod)?)?;
        let controller = SocketAddr::new(tb.node(0).lan_ip4.into(), CONTROLLER_PORT);
        let config = format!(
            "namespace: {NAMESPACE}\n\
             gateway: {name}\n\
             service_account: {sa}\n\
             trust_domain: {TRUST_DOMAIN}\n\
             control_plane:\n  address: \"{controller}\"\n  ca_cert: {ca}\n  token_file: {token}\n\
             listen:\n  hbone: \"[::]:{HBONE_PORT}\"\n  metrics: \"0.0.0.0:{WAYPOINT_METRICS_PORT}\"\n  readiness: \"0.0.0.0:{WAYPOINT_READY_PORT}\"\n\
             log_format: json\n{extra}",
            sa = service_account(pod),
            ca = self.ca_dir.join("ca.pem").display(),
            token = token_file.display(),
        );
        self.launch_waypoint(name, pod, &config)
    }

    /// Writes `config` as waypoint `name`'s configuration file, starts `mesh-node waypoint`
    /// in `pod` and waits until it is ready.
    pub(super) fn launch_waypoint<'p>(
        &self,
        name: &str,
        pod: &'p Pod,
        config: &str,
    ) -> Result<Waypoint<'p>> {
        let tb = self.tb;
        let path = tb.scratch_dir().join(format!("waypoint-{name}.yaml"));
        std::fs::write(&path, config)?;
        mesh_node::config::waypoint::WaypointConfig::load(&path)
            .context("generated waypoint config")?;
        let path = path.to_string_lossy().into_owned();
        let mut process = tb.spawn(
            pod,
            &["mesh-node", "waypoint", "--config", &path],
            SpawnOptions::new()
                .name(format!("waypoint-{name}"))
                .env("RUST_LOG", "info"),
        )?;
        let ready = SocketAddr::new(pod.ip4.into(), WAYPOINT_READY_PORT);
        let deadline = Instant::now() + WAYPOINT_READY_TIMEOUT;
        loop {
            if !process.is_running() {
                bail!(
                    "waypoint exited during start-up:\n{}",
                    process.stderr_text()
                );
            }
            if let Ok(Ok((200, _))) = pod.netns.run(move || http_get(ready, "/healthz/ready")) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "waypoint not ready after {WAYPOINT_READY_TIMEOUT:?}:\n{}\ncontroller log:\n{}",
                    process.stderr_text(),
                    self.controller_log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Waypoint {
            name: name.to_owned(),
            pod,
            process,
        })
    }
}
