//! Runs Trellis on a [`Testbed`]: a CA, one agent per node, and ways to look inside them.
//!
//! Two modes:
//! - static (default): each node's agent gets a configuration generated from the testbed's
//!   topology (its pods' cgroups, the nodes' LAN addresses) and a copy of the CA key;
//! - control plane ([`MeshOptions::control_plane`]): the testbed is described as Kubernetes
//!   manifests (a Namespace labelled `trellis.dev/mesh=enabled`, Nodes, Pods with their uid,
//!   node, service account and addresses) in a directory tests can edit while traffic runs
//!   ([`Mesh::set_pod_label`], [`Mesh::delete_pod`], ...); `mesh-node controller` watches it
//!   from node 0's namespace on `<node 0 LAN IP>:15012`, and the agents follow its feed, each
//!   proving its node with a bootstrap token.
//!
//! Agents run in their node's namespace (outside every pod cgroup), log JSON, and are reached
//! through their admin port from a thread inside the node's namespace.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_node::{
    config::{
        AgentConfig, CaConfig, ControlPlaneConfig, DatapathConfig, InboundConfig, LimitsConfig,
        ListenConfig, LogFormat, NodeConfig, OutboundConfig, SourceAddress, UnknownDestination,
        WorkloadConfig,
    },
    identity::LocalCa,
};
use serde_json::json;

use crate::testbed::{Pod, Proc, SpawnOptions, Testbed};

pub mod kubernetes;
pub mod policy;
mod service;
pub mod waypoint;

pub const OUTBOUND_PORT: u16 = 15001;
pub const HBONE_PORT: u16 = 15008;
pub const ADMIN_PORT: u16 = 15000;
/// The agents' Prometheus port ([`MeshOptions::metrics_on_lan`]).
pub const METRICS_PORT: u16 = 15020;
pub const CONTROLLER_PORT: u16 = 15012;
pub const CONTROLLER_MONITORING_PORT: u16 = 15014;
/// The namespace testbed pods are in.
pub const NAMESPACE: &str = "default";
/// The membership label (on namespaces, and `disabled` on pods).
pub const MESH_LABEL: &str = "trellis.dev/mesh";
pub const TRUST_DOMAIN: &str = "cluster.local";
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How the mesh is laid over the testbed.
#[derive(Clone, Debug)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent switches of the test mesh"
)]
pub struct MeshOptions {
    /// Pods (node, index) that are not part of the mesh.
    pub unenrolled: Vec<(usize, usize)>,
    pub unknown_destination: UnknownDestination,
    pub drain_timeout_secs: u64,
    pub certificate_ttl_secs: u64,
    /// Run `mesh-node controller` and put the agents on its feed instead of static configs.
    pub control_plane: bool,
    /// Control plane mode: pods (node, index) that get no manifest at all (a test can add one
    /// later with [`Mesh::write_pod`]).
    pub absent: Vec<(usize, usize)>,
    /// Agents pool no HBONE connection (`outbound.hbone_single_use`): every connection is a
    /// full handshake.
    pub hbone_single_use: bool,
    /// The agents' connection caps and timeouts.
    pub limits: LimitsConfig,
    /// Agents also serve `/metrics` on `<node LAN IP>:`[`METRICS_PORT`], where a scraper in
    /// another node's namespace reaches them (the admin port is loopback only).
    pub metrics_on_lan: bool,
    /// Control plane mode: the controller also reads Istio's labels and waypoint class
    /// (`compatibility.istio_labels`).
    pub istio_labels: bool,
    /// Which address local pods see their mesh connections come from.
    pub source_address: SourceAddress,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            unenrolled: Vec::new(),
            unknown_destination: UnknownDestination::Passthrough,
            drain_timeout_secs: 5,
            certificate_ttl_secs: 24 * 3600,
            control_plane: false,
            absent: Vec::new(),
            hbone_single_use: false,
            limits: LimitsConfig::default(),
            metrics_on_lan: false,
            istio_labels: false,
            source_address: SourceAddress::default(),
        }
    }
}

/// The workload identity a testbed pod gets: namespace `default`, service account = pod name.
pub fn service_account(pod: &Pod) -> String {
    pod.name.clone()
}

pub fn spiffe_id(pod: &Pod) -> String {
    format!(
        "spiffe://{TRUST_DOMAIN}/ns/default/sa/{}",
        service_account(pod)
    )
}

pub struct Mesh<'tb> {
    tb: &'tb Testbed,
    configs: Vec<PathBuf>,
    agents: Vec<Option<Proc>>,
    /// Every log file each node's agents have written, oldest first.
    logs: Vec<Vec<PathBuf>>,
    pub ca_dir: PathBuf,
    /// Control plane mode: the controller and the manifests it watches.
    control: Option<ControlPlane>,
}

/// The controller of a pod ([`Mesh::write_owned_pod`]): its kind and name, and the service
/// account its pods share (a Deployment's pods run as one account; testbed pods otherwise run
/// as their own, [`service_account`]).
#[derive(Clone, Debug)]
pub struct PodOwner {
    pub kind: String,
    pub name: String,
    pub service_account: Option<String>,
}

/// The controller of a control plane mode mesh and the objects it is shown.
struct ControlPlane {
    config: PathBuf,
    manifests: PathBuf,
    process: Option<Proc>,
    logs: Vec<PathBuf>,
    /// Namespace name -> labels.
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Pod name -> (namespace, labels) of the pods currently in the manifests.
    pods: BTreeMap<String, (String, BTreeMap<String, String>)>,
    /// The kubeconfig the controller reads a Kubernetes API server with (`KUBECONFIG`).
    kubeconfig: Option<PathBuf>,
    /// Pod name -> its controlling owner, for pods given one.
    owners: BTreeMap<String, PodOwner>,
}

impl<'tb> Mesh<'tb> {
    /// Writes the CA and the agents' configurations, starts every agent and waits until each
    /// reports ready.
    pub fn start(tb: &'tb Testbed, options: &MeshOptions) -> Result<Self> {
        let ca_dir = tb.scratch_dir().join("ca");
        std::fs::create_dir_all(&ca_dir)?;
        let ca = LocalCa::generate(TRUST_DOMAIN)?;
        std::fs::write(ca_dir.join("ca.pem"), ca.cert_pem())?;
        std::fs::write(ca_dir.join("ca-key.pem"), ca.key_pem())?;

        let nodes: Vec<NodeConfig> = tb
            .nodes()
            .iter()
            .map(|n| NodeConfig {
                name: n.name.clone(),
                hbone: SocketAddr::new(n.lan_ip4.into(), HBONE_PORT),
            })
            .collect();
        let workloads: Vec<WorkloadConfig> = tb
            .pods()
            .filter(|p| !options.unenrolled.contains(&(p.node, p.index)))
            .map(|p| WorkloadConfig {
                name: p.name.clone(),
                namespace: "default".into(),
                service_account: service_account(p),
                node: tb.node(p.node).name.clone(),
                ips: vec![p.ip4.into(), p.ip6.into()],
                cgroup: Some(p.cgroup.clone()),
            })
            .collect();
        if options.control_plane {
            return Self::start_control_plane(tb, options, &ca_dir);
        }
        let mut configs = Vec::new();
        for node in tb.nodes() {
            let config = AgentConfig {
                node: node.name.clone(),
                trust_domain: TRUST_DOMAIN.into(),
                ca: Some(CaConfig {
                    cert: ca_dir.join("ca.pem"),
                    key: ca_dir.join("ca-key.pem"),
                }),
                control_plane: None,
                nodes: nodes.clone(),
                workloads: workloads.clone(),
                ..agent_defaults(node, options)
            };
            config.validate().context("generated agent config")?;
            let path = tb.scratch_dir().join(format!("agent-{}.yaml", node.name));
            std::fs::write(&path, config.to_yaml())?;
            configs.push(path);
        }
        let mut mesh = Self {
            tb,
            agents: (0..configs.len()).map(|_| None).collect(),
            logs: vec![Vec::new(); configs.len()],
            configs,
            ca_dir,
            control: None,
        };
        for i in 0..tb.nodes().len() {
            mesh.start_agent(i)?;
        }
        Ok(mesh)
    }

    /// Control plane mode: manifests, tokens, the controller, then agents on its feed.
    fn start_control_plane(
        tb: &'tb Testbed,
        options: &MeshOptions,
        ca_dir: &std::path::Path,
    ) -> Result<Self> {
        let scratch = tb.scratch_dir();
        let manifests = scratch.join("manifests");
        std::fs::create_dir_all(&manifests)?;

        // One secret per node, and one per pod service account (what a waypoint started in
        // that pod authenticates with), derived from the testbed's unique prefix.
        let mut tokens = String::new();
        for node in tb.nodes() {
            let secret = secret(tb, &node.name);
            tokens.push_str(&format!("{}: \"{secret}\"\n", node.name));
            write_private(&scratch.join(format!("token-{}", node.name)), &secret)?;
        }
        for pod in tb.pods() {
            let name = service_account_credential(pod);
            tokens.push_str(&format!("\"{name}\": \"{}\"\n", secret(tb, &name)));
        }
        let tokens_file = scratch.join("node-tokens.yaml");
        write_private(&tokens_file, &tokens)?;

        let node0 = tb.node(0);
        let controller_addr = SocketAddr::new(node0.lan_ip4.into(), CONTROLLER_PORT);
        let controller_config = scratch.join("controller.yaml");
        let yaml = format!(
            "listen: \"{controller_addr}\"\n\
             trust_domain: {TRUST_DOMAIN}\n\
             ca: {{ cert: {cert}, key: {key} }}\n\
             source: {{ directory: {manifests} }}\n\
             auth: {{ bootstrap_tokens: {tokens} }}\n\
             hbone_port: {HBONE_PORT}\n\
             certificate_ttl_secs: {ttl}\n\
             max_certificate_ttl_secs: {ttl}\n\
             monitoring: \"{monitoring}\"\n\
             log_format: json\n\
             compatibility: {{ istio_labels: {istio_labels} }}\n",
            cert = ca_dir.join("ca.pem").display(),
            key = ca_dir.join("ca-key.pem").display(),
            manifests = manifests.display(),
            tokens = tokens_file.display(),
            ttl = options.certificate_ttl_secs,
            istio_labels = options.istio_labels,
            monitoring = SocketAddr::new(node0.lan_ip4.into(), CONTROLLER_MONITORING_PORT),
        );
        std::fs::write(&controller_config, yaml)?;
        mesh_node::controller::ControllerConfig::load(&controller_config)
            .context("generated controller config")?;

        let mut configs = Vec::new();
        for node in tb.nodes() {
            let config = AgentConfig {
                node: node.name.clone(),
                trust_domain: TRUST_DOMAIN.into(),
                ca: None,
                control_plane: Some(ControlPlaneConfig {
                    address: controller_addr.into(),
                    server_name: None,
                    ca_cert: ca_dir.join("ca.pem"),
                    token_file: scratch.join(format!("token-{}", node.name)),
                    root_namespace: "trellis-system".into(),
                }),
                ..agent_defaults(node, options)
            };
            config.validate().context("generated agent config")?;
            let path = scratch.join(format!("agent-{}.yaml", node.name));
            std::fs::write(&path, config.to_yaml())?;
            configs.push(path);
        }

        let mut mesh = Self {
            tb,
            agents: (0..configs.len()).map(|_| None).collect(),
            logs: vec![Vec::new(); configs.len()],
            configs,
            ca_dir: ca_dir.to_path_buf(),
            control: Some(ControlPlane {
                config: controller_config,
                manifests,
                process: None,
                logs: Vec::new(),
                namespaces: BTreeMap::new(),
                pods: BTreeMap::new(),
                kubeconfig: None,
                owners: BTreeMap::new(),
            }),
        };
        mesh.write_nodes()?;
        mesh.set_namespace(NAMESPACE, &[(MESH_LABEL, "enabled")])?;
        for pod in tb
            .pods()
            .filter(|p| !options.absent.contains(&(p.node, p.index)))
        {
            let labels: Vec<(&str, &str)> = if options.unenrolled.contains(&(pod.node, pod.index)) {
                vec![(MESH_LABEL, "disabled")]
            } else {
                Vec::new()
            };
            mesh.write_pod(pod, NAMESPACE, &labels)?;
        }
        mesh.start_controller()?;
        for i in 0..tb.nodes().len() {
            mesh.start_agent(i)?;
        }
        Ok(mesh)
    }

    fn control(&mut self) -> Result<&mut ControlPlane> {
        self.control
            .as_mut()
            .context("not a control plane mesh (MeshOptions::control_plane)")
    }

    /// The manifest directory the controller watches (control plane mode).
    pub fn manifests_dir(&self) -> Option<&std::path::Path> {
        self.control.as_ref().map(|c| c.manifests.as_path())
    }

    /// Starts the controller in node 0's namespace and waits until it serves.
    pub fn start_controller(&mut self) -> Result<()> {
        let tb = self.tb;
        let node0 = tb.node(0);
        let control = self.control()?;
        let config = control.config.to_string_lossy().into_owned();
        let mut options = SpawnOptions::new()
            .name("controller")
            .env("RUST_LOG", "info");
        if let Some(kubeconfig) = &control.kubeconfig {
            options = options.env("KUBECONFIG", kubeconfig);
        }
        let proc = tb.spawn(
            node0,
            &["mesh-node", "controller", "--config", &config],
            options,
        )?;
        if let Some(path) = proc.stderr_path() {
            control.logs.push(path.to_path_buf());
        }
        control.process = Some(proc);
        let monitoring = SocketAddr::new(node0.lan_ip4.into(), CONTROLLER_MONITORING_PORT);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(proc) = self.control()?.process.as_mut()
                && !proc.is_running()
            {
                bail!("controller exited during start-up:\n{}", proc.stderr_text());
            }
            if let Ok(Ok((200, _))) = node0
                .netns
                .run(move || http_get(monitoring, "/healthz/ready"))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "controller not ready after {READY_TIMEOUT:?}:\n{}",
                    self.controller_log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM to the controller, waiting (bounded) for it to exit.
    pub fn stop_controller(&mut self, timeout: Duration) -> Result<()> {
        let Some(mut proc) = self.control()?.process.take() else {
            return Ok(());
        };
        proc.terminate()?;
        if proc.wait_timeout(timeout)?.is_none() {
            let _ = proc.kill();
            bail!("controller did not exit within {timeout:?} of SIGTERM");
        }
        Ok(())
    }

    /// The controller's gRPC address (in node 0's namespace).
    pub fn controller_addr(&self) -> SocketAddr {
        SocketAddr::new(self.tb.node(0).lan_ip4.into(), CONTROLLER_PORT)
    }

    /// The file holding node `node`'s bootstrap token (control plane mode).
    pub fn node_token_file(&self, node: usize) -> PathBuf {
        self.tb
            .scratch_dir()
            .join(format!("token-{}", self.tb.node(node).name))
    }

    /// The controller's `/metrics` text, read from node 0's namespace.
    pub fn controller_metrics(&self) -> Result<String> {
        let monitoring =
            SocketAddr::new(self.tb.node(0).lan_ip4.into(), CONTROLLER_MONITORING_PORT);
        let (status, body) = self
            .tb
            .node(0)
            .netns
            .run(move || http_get(monitoring, "/metrics"))??;
        if status != 200 {
            bail!("controller metrics returned {status}");
        }
        Ok(body)
    }

    /// Writes `text` as manifest file `name` (atomically), as it is: for manifests the typed
    /// helpers cannot express, such as broken ones.
    pub fn write_manifest_text(&mut self, name: &str, text: &str) -> Result<()> {
        let dir = self.control()?.manifests.clone();
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("renaming to {name}"))?;
        Ok(())
    }

    /// Every log line the controller wrote (all restarts).
    pub fn controller_log_text(&self) -> String {
        self.control
            .as_ref()
            .map(|c| {
                c.logs
                    .iter()
                    .filter_map(|p| std::fs::read_to_string(p).ok())
                    .collect::<String>()
            })
            .unwrap_or_default()
    }

    /// Writes the Node objects (InternalIP = LAN address).
    fn write_nodes(&mut self) -> Result<()> {
        let items: Vec<_> = self
            .tb
            .nodes()
            .iter()
            .map(|n| {
                json!({
                    "apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": n.name},
                    "status": {"addresses": [
                        {"type": "InternalIP", "address": n.lan_ip4.to_string()},
                        {"type": "Hostname", "address": n.name},
                    ]},
                })
            })
            .collect();
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        write_manifest(&self.control()?.manifests, "nodes.json", &list)
    }

    /// Creates or replaces a Namespace with exactly `labels`.
    pub fn set_namespace(&mut self, namespace: &str, labels: &[(&str, &str)]) -> Result<()> {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let manifest = json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": namespace, "labels": labels},
        });
        let control = self.control()?;
        write_manifest(
            &control.manifests,
            &format!("namespace-{namespace}.json"),
            &manifest,
        )?;
        control.namespaces.insert(namespace.to_owned(), labels);
        Ok(())
    }

    /// Sets (`Some`) or removes (`None`) one label of a Namespace.
    pub fn set_namespace_label(
        &mut self,
        namespace: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<()> {
        let mut labels = self
            .control()?
            .namespaces
            .get(namespace)
            .cloned()
            .with_context(|| format!("no namespace {namespace} in the manifests"))?;
        match value {
            Some(v) => labels.insert(key.to_owned(), v.to_owned()),
            None => labels.remove(key),
        };
        let labels: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.set_namespace(namespace, &labels)
    }

    /// Removes a Namespace object (its pods' manifests stay; see [`Mesh::delete_pod`]).
    pub fn delete_namespace(&mut self, namespace: &str) -> Result<()> {
        let control = self.control()?;
        remove_manifest(&control.manifests, &format!("namespace-{namespace}.json"))?;
        control.namespaces.remove(namespace);
        Ok(())
    }

    /// Creates or replaces `pod`'s Pod object in `namespace` with exactly `labels`: its uid,
    /// node, service account ([`service_account`]) and addresses come from the testbed.
    pub fn write_pod(&mut self, pod: &Pod, namespace: &str, labels: &[(&str, &str)]) -> Result<()> {
        let node = self.tb.node(pod.node);
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let owner = self.control()?.owners.get(&pod.name).cloned();
        let account = owner
            .as_ref()
            .and_then(|o| o.service_account.clone())
            .unwrap_or_else(|| service_account(pod));
        let owners: Vec<serde_json::Value> = owner
            .iter()
            .map(|o| {
                json!({"apiVersion": "apps/v1", "kind": o.kind, "name": o.name,
                       "uid": format!("{}-{}", o.kind, o.name), "controller": true})
            })
            .collect();
        let manifest = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": namespace, "uid": pod.uid, "labels": labels,
                         "ownerReferences": owners},
            "spec": {
                "nodeName": node.name,
                "serviceAccountName": account,
                "containers": [{"name": "app", "image": "pod-app"}],
            },
            "status": {
                "phase": "Running",
                "hostIP": node.lan_ip4.to_string(),
                "podIP": pod.ip4.to_string(),
                "podIPs": [{"ip": pod.ip4.to_string()}, {"ip": pod.ip6.to_string()}],
            },
        });
        let control = self.control()?;
        write_manifest(
            &control.manifests,
            &format!("pod-{}.json", pod.name),
            &manifest,
        )?;
        control
            .pods
            .insert(pod.name.clone(), (namespace.to_owned(), labels));
        Ok(())
    }

    /// [`Mesh::write_pod`] for a pod controlled by `owner`, which it keeps when its labels
    /// change later.
    pub fn write_owned_pod(
        &mut self,
        pod: &Pod,
        namespace: &str,
        labels: &[(&str, &str)],
        owner: PodOwner,
    ) -> Result<()> {
        self.control()?.owners.insert(pod.name.clone(), owner);
        self.write_pod(pod, namespace, labels)
    }

    /// Sets (`Some`) or removes (`None`) one label of a pod that is in the manifests, e.g.
    /// `set_pod_label(pod, MESH_LABEL, Some("disabled"))` to take it out of the mesh.
    pub fn set_pod_label(&mut self, pod: &Pod, key: &str, value: Option<&str>) -> Result<()> {
        let (namespace, mut labels) = self
            .control()?
            .pods
            .get(&pod.name)
            .cloned()
            .with_context(|| format!("no pod {} in the manifests", pod.name))?;
        match value {
            Some(v) => labels.insert(key.to_owned(), v.to_owned()),
            None => labels.remove(key),
        };
        let labels: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.write_pod(pod, &namespace, &labels)
    }

    /// Removes `pod`'s Pod object (the testbed pod itself keeps running).
    pub fn delete_pod(&mut self, pod: &Pod) -> Result<()> {
        let control = self.control()?;
        remove_manifest(&control.manifests, &format!("pod-{}.json", pod.name))?;
        control.pods.remove(&pod.name);
        control.owners.remove(&pod.name);
        Ok(())
    }

    /// Polls the node's config dump (bounded) until `pred` holds; returns that dump.
    pub fn wait_config(
        &self,
        node: usize,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let dump = self.config_dump(node);
            if let Ok(dump) = &dump
                && pred(dump)
            {
                return Ok(dump.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {node}'s config dump did not match within {timeout:?}; last: {dump:?}\nagent log:\n{}\ncontroller log:\n{}",
                    self.agent_log_text(node),
                    self.controller_log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn config_path(&self, node: usize) -> &PathBuf {
        &self.configs[node]
    }

    /// Starts node `node`'s agent and waits for it to be ready.
    pub fn start_agent(&mut self, node: usize) -> Result<()> {
        let n = self.tb.node(node);
        let config = self.configs[node].to_string_lossy().into_owned();
        let proc = self.tb.spawn(
            n,
            &["mesh-node", "agent", "--config", &config],
            SpawnOptions::new()
                .name(format!("agent-{}", n.name))
                .env("RUST_LOG", "info,access=info"),
        )?;
        if let Some(path) = proc.stderr_path() {
            self.logs[node].push(path.to_path_buf());
        }
        self.agents[node] = Some(proc);
        self.wait_ready(node)
    }

    /// Polls the agent's readiness (bounded); fails with its log if it exits first.
    pub fn wait_ready(&mut self, node: usize) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(agent) = self.agents[node].as_mut()
                && !agent.is_running()
            {
                bail!(
                    "agent on node {node} exited during start-up:\n{}",
                    agent.stderr_text()
                );
            }
            if let Ok((200, _)) = self.admin_get(node, "/ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "agent on node {node} not ready after {READY_TIMEOUT:?}:\n{}",
                    self.agent_log_text(node)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the agent gets no chance to clean up (as in a crash).
    pub fn kill_agent(&mut self, node: usize) {
        if let Some(mut agent) = self.agents[node].take()
            && let Err(e) = agent.kill()
        {
            eprintln!("killing agent on node {node}: {e:#}");
        }
    }

    /// SIGTERM, then waits (bounded) for the agent to exit; returns its exit status success.
    pub fn stop_agent(&mut self, node: usize, timeout: Duration) -> Result<bool> {
        let Some(mut agent) = self.agents[node].take() else {
            return Ok(true);
        };
        agent.terminate()?;
        match agent.wait_timeout(timeout)? {
            Some(status) => Ok(status.success()),
            None => {
                let _ = agent.kill();
                bail!("agent on node {node} did not exit within {timeout:?} of SIGTERM")
            }
        }
    }

    /// Sends SIGTERM without waiting; see [`Mesh::wait_agent_exit`].
    pub fn signal_agent_stop(&mut self, node: usize) -> Result<()> {
        match self.agents[node].as_mut() {
            Some(agent) => agent.terminate(),
            None => bail!("no agent running on node {node}"),
        }
    }

    /// Waits (bounded) for the node's agent to exit and returns whether it exited cleanly.
    pub fn wait_agent_exit(&mut self, node: usize, timeout: Duration) -> Result<bool> {
        let Some(mut agent) = self.agents[node].take() else {
            bail!("no agent on node {node}")
        };
        match agent.wait_timeout(timeout)? {
            Some(status) => Ok(status.success()),
            None => {
                let _ = agent.kill();
                bail!("agent on node {node} still running after {timeout:?}")
            }
        }
    }

    /// The running controller's process id (control plane mode).
    pub fn controller_pid(&self) -> Option<u32> {
        self.control.as_ref()?.process.as_ref().map(Proc::pid)
    }

    pub fn agent_pid(&self, node: usize) -> Option<u32> {
        self.agents[node].as_ref().map(Proc::pid)
    }

    /// `GET path` on the node's admin port: (status, body).
    pub fn admin_get(&self, node: usize, path: &str) -> Result<(u16, String)> {
        let path = path.to_owned();
        self.tb
            .node(node)
            .netns
            .run(move || http_get(SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)), &path))?
    }

    pub fn metrics(&self, node: usize) -> Result<String> {
        let (status, body) = self.admin_get(node, "/metrics")?;
        if status != 200 {
            bail!("metrics returned {status}");
        }
        Ok(body)
    }

    pub fn config_dump(&self, node: usize) -> Result<serde_json::Value> {
        let (_, body) = self.admin_get(node, "/config_dump")?;
        Ok(serde_json::from_str(&body)?)
    }

    /// Every log line of the node's agents (all restarts), as text.
    pub fn agent_log_text(&self, node: usize) -> String {
        self.logs[node]
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .collect::<String>()
    }

    /// The node's access log events (one per connection), oldest first.
    pub fn access_log(&self, node: usize) -> Vec<serde_json::Value> {
        self.agent_log_text(node)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .collect()
    }

    /// Waits (bounded) for an access log event matching `pred` on `node`.
    pub fn wait_access(
        &self,
        node: usize,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(event) = self.access_log(node).into_iter().find(|e| pred(e)) {
                return Ok(event);
            }
            if Instant::now() > deadline {
                bail!(
                    "no matching access log event on node {node} within {timeout:?}; log:\n{}",
                    self.agent_log_text(node)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The agent settings both modes share: listeners on the node's addresses, the node's pod
/// cgroup root and pin directory, the test's timeouts; no CA, no control plane, no mesh.
fn agent_defaults(node: &crate::testbed::Node, options: &MeshOptions) -> AgentConfig {
    AgentConfig {
        node: node.name.clone(),
        trust_domain: TRUST_DOMAIN.into(),
        ca: None,
        control_plane: None,
        certificate_ttl_secs: options.certificate_ttl_secs,
        listen: ListenConfig {
            outbound: SocketAddr::new(node.gateway_ip4.into(), OUTBOUND_PORT),
            outbound6: Some(SocketAddr::new(node.gateway_ip6.into(), OUTBOUND_PORT)),
            hbone: SocketAddr::new(node.lan_ip4.into(), HBONE_PORT),
            admin: SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)),
            metrics: options
                .metrics_on_lan
                .then(|| SocketAddr::new(node.lan_ip4.into(), METRICS_PORT)),
            readiness: None,
        },
        datapath: DatapathConfig {
            cgroup_root: node.pod_cgroup_root.clone(),
            pin_dir: node.bpf_pin_dir.clone(),
            excluded_ports: Vec::new(),
            excluded_cidrs: Vec::new(),
            allow_catch_all_exclusions: false,
            program_stats: true,
        },
        outbound: OutboundConfig {
            unknown_destination: options.unknown_destination,
            connect_timeout_ms: 3_000,
            hbone_connections_per_peer: None,
            hbone_single_use: options.hbone_single_use,
        },
        inbound: InboundConfig {
            handshake_timeout_ms: 5_000,
            max_streams_per_connection: 512,
            source_address: options.source_address,
        },
        limits: options.limits.clone(),
        drain_timeout_secs: options.drain_timeout_secs,
        log_format: LogFormat::Json,
        nodes: Vec::new(),
        workloads: Vec::new(),
    }
}

/// A testbed-unique bootstrap secret for `name`.
fn secret(tb: &Testbed, name: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{}/{name}/{}", tb.prefix(), std::process::id()));
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bootstrap token name of `pod`'s service account (a workload credential).
fn service_account_credential(pod: &Pod) -> String {
    format!("serviceaccount:{NAMESPACE}/{}", service_account(pod))
}

impl Mesh<'_> {
    /// The bootstrap token of `pod`'s service account.
    fn service_account_token(&self, pod: &Pod) -> Result<String> {
        self.control.as_ref().context("not a control plane mesh")?;
        Ok(secret(self.tb, &service_account_credential(pod)))
    }
}

/// Writes a manifest atomically (hidden temporary file, then rename), as the controller's
/// directory source expects.
fn write_manifest(dir: &std::path::Path, name: &str, value: &serde_json::Value) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("renaming to {name}"))?;
    Ok(())
}

fn remove_manifest(dir: &std::path::Path, name: &str) -> Result<()> {
    match std::fs::remove_file(dir.join(name)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing manifest {name}")),
    }
}

/// Writes a secret readable only by its owner.
fn write_private(path: &std::path::Path, contents: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

/// Sum of a counter's samples whose labels contain every `label="value"` pair given.
pub fn metric_sum(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// A minimal blocking HTTP/1.1 GET for admin endpoints (bounded by timeouts).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.take(16 * 1024 * 1024).read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    Ok((status, body.to_owned()))
}

/// Asks the controller's CA for a certificate for `identity` from inside node 0's namespace,
/// exactly as an agent does (fresh key, CSR, verification of the answer), with the token and
/// trust settings in `config`. Returns the serial of the certificate obtained, or the refusals.
pub fn sign_from_node_0(
    tb: &Testbed,
    config: mesh_node::config::ControlPlaneConfig,
    trust_domain: &'static str,
    identity: &mesh_node::identity::Identity,
) -> Result<String, String> {
    use std::{collections::HashSet, sync::Arc};

    use mesh_node::{
        control_plane::channel::{self, BearerToken},
        identity::store::{CertManager, CertStore, Issuer, RemoteCa},
        tls,
    };

    let identity = identity.clone();
    tb.node(0)
        .netns
        .run(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let roots = channel::read_roots(&config).expect("roots");
                let store =
                    Arc::new(CertStore::new(tls::provider(), &roots, trust_domain).expect("store"));
                let remote = RemoteCa::new(
                    channel::channel(&config).expect("channel"),
                    BearerToken::new(config.token_file.clone()),
                    store.roots().clone(),
                    tls::provider(),
                );
                let mut manager = CertManager::new(
                    store.clone(),
                    Issuer::Remote(remote),
                    Duration::from_hours(1),
                );
                let failures = manager.reconcile(&HashSet::from([identity.clone()])).await;
                match store.get(&identity) {
                    Some(cert) if failures.is_empty() => Ok(cert.serial.clone()),
                    held => Err(format!(
                        "{} (certificate held: {})",
                        failures
                            .iter()
                            .map(|(_, e)| e.to_string())
                            .collect::<Vec<_>>()
                            .join("; "),
                        held.is_some()
                    )),
                }
            })
        })
        .expect("node 0 namespace")
}
