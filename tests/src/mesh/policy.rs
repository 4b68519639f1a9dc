//! Policy manifests for the control-plane testbed (`security.trellis.dev/v1`, and Istio's
//! `security.istio.io` at any version it serves), the `Accepted` condition the controller
//! reports for them, and the L4 probes that show what a policy lets through.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde_json::{Value, json};

use super::{Mesh, remove_manifest, write_manifest};
use crate::testbed::{Place, Pod, Server, Testbed};

/// Istio's security API group.
pub const ISTIO_SECURITY: &str = "security.istio.io";

impl Mesh<'_> {
    /// Node `node`'s datapath event counter `event` (`strict_dropped`, `plaintext_accepted`,
    /// ...) from its config dump; 0 when absent.
    pub fn datapath_event(&self, node: usize, event: &str) -> u64 {
        self.config_dump(node)
            .ok()
            .and_then(|d| d["datapath"]["events"][event].as_u64())
            .unwrap_or(0)
    }

    /// `meshctl policy explain --from FROM --to TO -o json`, run on node `node` against its
    /// agent: the verdict the data path enforces there.
    pub fn explain(&self, node: usize, from: &str, to: &str) -> Result<Value> {
        let admin = format!("127.0.0.1:{}", super::ADMIN_PORT);
        let out = self.tb.run(
            self.tb.node(node),
            &[
                "meshctl", "--admin", &admin, "policy", "explain", "--from", from, "--to", to,
                "-o", "json",
            ],
            Duration::from_secs(20),
        )?;
        out.ok_json()
    }

    /// Creates or replaces policy `namespace/name` of `kind` (`AuthorizationPolicy` or
    /// `PeerAuthentication`) with `spec`.
    pub fn write_policy(
        &mut self,
        kind: &str,
        namespace: &str,
        name: &str,
        spec: Value,
    ) -> Result<()> {
        let manifest = json!({
            "apiVersion": "security.trellis.dev/v1", "kind": kind,
            "metadata": {"name": name, "namespace": namespace, "generation": 1},
            "spec": spec,
        });
        write_manifest(
            &self.control()?.manifests,
            &format!("policy-{kind}-{namespace}-{name}.json"),
            &manifest,
        )
    }

    /// Creates or replaces Istio's `security.istio.io/<version>` `kind` `namespace/name`
    /// with `spec`, written as Istio's pages write it. Each write is a new generation, as the
    /// API server would count it.
    pub fn write_istio_policy(
        &mut self,
        version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
        spec: Value,
    ) -> Result<()> {
        let generation = self
            .istio_generation(kind, namespace, name)
            .map_or(1, |g| g + 1);
        let file = istio_file(kind, namespace, name);
        let dir = self.control()?.manifests.clone();
        let manifest = json!({
            "apiVersion": format!("{ISTIO_SECURITY}/{version}"), "kind": kind,
            "metadata": {"name": name, "namespace": namespace, "generation": generation},
            "spec": spec,
        });
        write_manifest(&dir, &file, &manifest)
    }

    /// The generation of the object [`Mesh::write_istio_policy`] last wrote; `None` if
    /// there is none.
    pub fn istio_generation(&self, kind: &str, namespace: &str, name: &str) -> Option<i64> {
        let dir = self.manifests_dir()?;
        let text = std::fs::read(dir.join(istio_file(kind, namespace, name))).ok()?;
        serde_json::from_slice::<Value>(&text).ok()?["metadata"]["generation"].as_i64()
    }

    /// Removes an object written by [`Mesh::write_istio_policy`].
    pub fn delete_istio_policy(&mut self, kind: &str, namespace: &str, name: &str) -> Result<()> {
        remove_manifest(
            &self.control()?.manifests,
            &istio_file(kind, namespace, name),
        )
    }

    /// Waits (bounded) until the controller has logged the `Accepted` condition of policy
    /// `namespace/name` of `kind` in `group` (the status it writes to the object with the
    /// Kubernetes source) and `pred` holds for the latest one; returns that log event.
    pub fn wait_policy_status(
        &self,
        group: &str,
        kind: &str,
        id: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let qualified = format!("{kind}.{group}");
        let deadline = Instant::now() + timeout;
        loop {
            let latest = self
                .controller_log_text()
                .lines()
                .rev()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|e| e["kind"] == qualified.as_str() && e["policy"] == id);
            if let Some(event) = latest.filter(|e| pred(e)) {
                return Ok(event);
            }
            if Instant::now() > deadline {
                bail!(
                    "no status of {qualified} {id} as expected within {timeout:?}; controller log:\n{}",
                    self.controller_log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes a policy written by [`Mesh::write_policy`].
    pub fn delete_policy(&mut self, kind: &str, namespace: &str, name: &str) -> Result<()> {
        remove_manifest(
            &self.control()?.manifests,
            &format!("policy-{kind}-{namespace}-{name}.json"),
        )
    }

    /// Waits (bounded) until node `node`'s agent enforces exactly `names` (`namespace/name`,
    /// any kind, sorted) as its config dump lists them; returns that list.
    pub fn wait_policies(
        &self,
        node: usize,
        names: &[&str],
        timeout: Duration,
    ) -> Result<Vec<Value>> {
        let want: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let dump = self.wait_config(node, timeout, |dump| {
            let got: Vec<String> = dump["policies"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p["id"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            got == want
        })?;
        Ok(dump["policies"].as_array().cloned().unwrap_or_default())
    }
}

fn istio_file(kind: &str, namespace: &str, name: &str) -> String {
    format!("policy-istio-{kind}-{namespace}-{name}.json")
}

/// Whether a controller status event says `Accepted` `True`.
pub fn accepted(event: &Value) -> bool {
    event["message"] == "policy accepted"
}

/// Whether a controller status event describes `generation` of its object.
pub fn observed(event: &Value, generation: i64) -> bool {
    event["generation"] == format!("Some({generation})").as_str()
}

/// The Istio-style principal (no `spiffe://`) of a testbed pod moved to `namespace`.
pub fn principal(pod: &Pod, namespace: &str) -> String {
    super::spiffe_id(pod)
        .trim_start_matches("spiffe://")
        .replace("/ns/default/", &format!("/ns/{namespace}/"))
}

/// An HTTP server on each of `ports` of `pod`, answering with the pod's name.
pub fn serve_http(tb: &Testbed, pod: &Pod, ports: &[u16]) -> Result<Server> {
    let mut args = Vec::new();
    for port in ports {
        args.push("--listen".to_owned());
        args.push(format!("0.0.0.0:{port}=http"));
    }
    args.push("--name".into());
    args.push(pod.name.clone());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    tb.spawn_server(pod, &args)
}

/// A client's bound on one connection: far above a refusal's round trip, far below a
/// test's patience.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(4);

/// One GET from `place` (a pod or a node) to `server:port`: Ok(server name) or the error.
pub fn reach<'a>(
    tb: &Testbed,
    place: impl Into<Place<'a>>,
    server: &Pod,
    port: u16,
) -> Result<String, String> {
    tb.get_server_name(
        place,
        SocketAddr::from((server.ip4, port)),
        Some(CLIENT_TIMEOUT),
    )
}

/// Polls (bounded by `timeout`) until `client`'s GETs to `server:port` succeed
/// (`reachable`) or fail three times in a row: policies reach the nodes asynchronously. A
/// denial must be a prompt refusal, not a client timeout.
pub fn settle(
    tb: &Testbed,
    client: &Pod,
    server: &Pod,
    port: u16,
    reachable: bool,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut streak = 0;
    let mut last = Err(String::new());
    while streak < 3 {
        last = reach(tb, client, server, port);
        if last.is_ok() == reachable {
            streak += 1;
        } else {
            streak = 0;
            if Instant::now() > deadline {
                bail!(
                    "{} -> {}:{port} did not become {} within {timeout:?}; last: {last:?}",
                    client.name,
                    server.name,
                    if reachable { "reachable" } else { "denied" }
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if let Err(error) = &last
        && error.contains("timed out")
    {
        bail!(
            "{} -> {}:{port} was not refused promptly: {error}",
            client.name,
            server.name
        );
    }
    Ok(())
}
