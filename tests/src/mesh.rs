//! Runs Trellis on a [`Testbed`]: a CA, one agent per node, and ways to look inside them.
//!
//! Each node's agent gets a configuration generated from the testbed's topology (its pods'
//! cgroups, the nodes' LAN addresses) using the agent's own config types, runs in the node's
//! namespace (outside every pod cgroup), logs JSON, and is reached through its admin port from
//! a thread inside the node's namespace.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_node::{
    config::{
        AgentConfig, CaConfig, DatapathConfig, InboundConfig, ListenConfig, LogFormat, NodeConfig,
        OutboundConfig, UnknownDestination, WorkloadConfig,
    },
    identity::LocalCa,
};

use crate::testbed::{Pod, Proc, SpawnOptions, Testbed};

pub const OUTBOUND_PORT: u16 = 15001;
pub const HBONE_PORT: u16 = 15008;
pub const ADMIN_PORT: u16 = 15000;
pub const TRUST_DOMAIN: &str = "cluster.local";
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How the mesh is laid over the testbed.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    /// Pods (node, index) that are not part of the mesh.
    pub unenrolled: Vec<(usize, usize)>,
    pub unknown_destination: UnknownDestination,
    pub drain_timeout_secs: u64,
    pub certificate_ttl_secs: u64,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            unenrolled: Vec::new(),
            unknown_destination: UnknownDestination::Passthrough,
            drain_timeout_secs: 5,
            certificate_ttl_secs: 24 * 3600,
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
        let mut configs = Vec::new();
        for node in tb.nodes() {
            let config = AgentConfig {
                node: node.name.clone(),
                trust_domain: TRUST_DOMAIN.into(),
                ca: CaConfig {
                    cert: ca_dir.join("ca.pem"),
                    key: ca_dir.join("ca-key.pem"),
                },
                certificate_ttl_secs: options.certificate_ttl_secs,
                listen: ListenConfig {
                    outbound: SocketAddr::new(node.gateway_ip4.into(), OUTBOUND_PORT),
                    outbound6: Some(SocketAddr::new(node.gateway_ip6.into(), OUTBOUND_PORT)),
                    hbone: SocketAddr::new(node.lan_ip4.into(), HBONE_PORT),
                    admin: SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)),
                    metrics: None,
                    readiness: None,
                },
                datapath: DatapathConfig {
                    cgroup_root: node.pod_cgroup_root.clone(),
                    pin_dir: node.bpf_pin_dir.clone(),
                    excluded_ports: Vec::new(),
                    excluded_cidrs: Vec::new(),
                },
                outbound: OutboundConfig {
                    unknown_destination: options.unknown_destination,
                    connect_timeout_ms: 3_000,
                },
                inbound: InboundConfig {
                    handshake_timeout_ms: 5_000,
                    max_streams_per_connection: 512,
                },
                drain_timeout_secs: options.drain_timeout_secs,
                log_format: LogFormat::Json,
                nodes: nodes.clone(),
                workloads: workloads.clone(),
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
        };
        for i in 0..tb.nodes().len() {
            mesh.start_agent(i)?;
        }
        Ok(mesh)
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

    pub fn agent_pid(&self, node: usize) -> Option<u32> {
        self.agents[node].as_ref().map(|a| a.pid())
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
            .collect::<Vec<_>>()
            .join("")
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
