//! `security.trellis.dev/v1` policy manifests for the control-plane testbed.

use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};

use super::{Mesh, remove_manifest, write_manifest};

impl Mesh<'_> {
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
