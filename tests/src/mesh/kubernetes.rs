//! Trellis installed on a real API server ([`crate::cluster::Cluster`]) as a user installs it:
//! the chart rendered by `helm template` and applied with kubectl (CRDs, RBAC, service
//! accounts, config), the controller running the chart's `controller.yaml` with a token of the
//! chart's controller service account (so it has exactly the chart's grants), and one agent per
//! testbed node running the chart's `agent.yaml` with a token of the agent service account
//! bound to an agent Pod object on its node (made from the chart's DaemonSet template).
//!
//! What differs from a cluster is only where things are: the controller is reached at node 0's
//! LAN address (no cluster DNS; the name in its certificate is still the Service's), and the
//! agents' listeners, cgroup root and pin directory are the testbed node's.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use mesh_node::{
    config::{AgentConfig, ControlPlaneConfig, LogFormat, expand_env},
    k8s::{GATEWAY_API_VERSION, WAYPOINT_CLASS},
};
use serde_json::{Value, json};

use super::{
    CONTROLLER_PORT, ControlPlane, HBONE_PORT, Mesh, MeshOptions, TRUST_DOMAIN, agent_defaults,
    waypoint::{WAYPOINT_METRICS_PORT, WAYPOINT_READY_PORT, Waypoint},
    write_private,
};
use crate::{
    cluster::{
        Cluster,
        kubelet::{KubePod, Kubelet},
    },
    testbed::Testbed,
};

/// The namespace the chart is installed in.
pub const RELEASE_NAMESPACE: &str = "trellis-system";
/// The Service name agents dial, as the controller's certificate names it.
pub const CONTROLLER_HOST: &str = "trellis-controller.trellis-system.svc";

/// The chart as `helm template` renders it (CRDs included), one object per document.
pub fn render_chart(cluster: &Cluster, extra: &[&str]) -> Result<Vec<Value>> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/trellis");
    let out = std::process::Command::new(&cluster.tools().helm)
        .args(["template", "trellis"])
        .arg(&chart)
        .args(["--namespace", RELEASE_NAMESPACE, "--include-crds"])
        .args(extra)
        .output()
        .context("cannot run helm")?;
    if !out.status.success() {
        bail!(
            "helm template failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout).context("helm printed invalid UTF-8")?;
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&text).context("helm template printed invalid YAML")?;
    Ok(docs
        .into_iter()
        .filter(serde_json::Value::is_object)
        .collect())
}

/// Applies the chart's objects: the CRDs first (until Established), then the release
/// namespace's objects, except the workloads the testbed runs itself (the agent DaemonSet and
/// the controller Deployment: nothing here schedules pods).
pub fn install_chart(cluster: &Cluster, objects: &[Value]) -> Result<()> {
    let stream = |pred: &dyn Fn(&Value) -> bool| -> String {
        objects
            .iter()
            .filter(|o| pred(o))
            .map(|o| format!("---\n{o}\n"))
            .collect()
    };
    let crds = stream(&|o| o["kind"] == "CustomResourceDefinition");
    cluster.apply(&crds).context("applying the chart's CRDs")?;
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd",
        "--all",
        "--timeout=60s",
    ])?;
    cluster.apply(
        &json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": RELEASE_NAMESPACE}})
        .to_string(),
    )?;
    let rest = stream(&|o| {
        !matches!(
            o["kind"].as_str(),
            Some("CustomResourceDefinition" | "DaemonSet" | "Deployment")
        )
    });
    cluster
        .apply(&rest)
        .context("applying the chart's objects")?;
    Ok(())
}

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .with_context(|| format!("the chart renders no {kind} {name}"))
}

impl<'tb> Mesh<'tb> {
    /// Installs the chart on `cluster`, registers the testbed's nodes, starts the controller
    /// (kube source, token review) and one agent per node, and waits until all are ready.
    /// Workload pods are the test's to run ([`Kubelet::run_pod`]).
    pub fn start_kubernetes(
        tb: &'tb Testbed,
        cluster: &Cluster,
        options: &MeshOptions,
    ) -> Result<Self> {
        let scratch = tb.scratch_dir();
        // The chart as a user installs it, but for the address pods see their mesh
        // connections come from, which the test chooses.
        let source_address = match options.source_address {
            mesh_node::config::SourceAddress::Client => "agent.sourceAddress=client",
            mesh_node::config::SourceAddress::Node => "agent.sourceAddress=node",
        };
        let objects = render_chart(cluster, &["--set", source_address])?;
        install_chart(cluster, &objects)?;
        let kubelet = Kubelet::new(cluster, tb);
        kubelet.register_nodes()?;

        // The controller: the chart's config file, a token of the chart's service account.
        let controller_config = scratch.join("controller.yaml");
        let text = object(&objects, "ConfigMap", "trellis-controller")?["data"]["controller.yaml"]
            .as_str()
            .context("no controller.yaml in the chart's ConfigMap")?;
        std::fs::write(&controller_config, text)?;
        let token = cluster.token(RELEASE_NAMESPACE, "trellis-controller", None, None)?;
        let kubeconfig = scratch.join("controller.kubeconfig");
        cluster.write_token_kubeconfig(&kubeconfig, &token)?;

        // The agents: a Pod object per node from the DaemonSet's template, a token bound to it.
        let daemonset = object(&objects, "DaemonSet", "trellis-agent")?;
        let agent_text = object(&objects, "ConfigMap", "trellis-agent")?["data"]["agent.yaml"]
            .as_str()
            .context("no agent.yaml in the chart's ConfigMap")?
            .to_owned();
        let ca_dir = scratch.join("ca");
        std::fs::create_dir_all(&ca_dir)?;
        let controller_addr = SocketAddr::new(tb.node(0).lan_ip4.into(), CONTROLLER_PORT);
        let mut configs = Vec::new();
        for node in tb.nodes() {
            let pod_name = format!("trellis-agent-{}", node.name);
            let mut pod = daemonset["spec"]["template"].clone();
            pod["apiVersion"] = json!("v1");
            pod["kind"] = json!("Pod");
            pod["metadata"]["name"] = json!(pod_name);
            pod["metadata"]["namespace"] = json!(RELEASE_NAMESPACE);
            pod["spec"]["nodeName"] = json!(node.name);
            cluster.kubectl_stdin(&["create", "-f", "-"], &pod.to_string())?;
            kubelet.patch_status(
                "pod",
                &pod_name,
                Some(RELEASE_NAMESPACE),
                &json!({"status": {
                    "phase": "Running",
                    "hostIP": node.lan_ip4.to_string(),
                    "podIP": node.lan_ip4.to_string(),
                    "podIPs": [{"ip": node.lan_ip4.to_string()}],
                }}),
            )?;
            let token = cluster.token(
                RELEASE_NAMESPACE,
                "trellis-agent",
                Some("trellis"),
                Some(&pod_name),
            )?;
            let token_file = scratch.join(format!("token-{}", node.name));
            write_private(&token_file, &token)?;

            let host_ip = node.lan_ip4.to_string();
            let env = |name: &str| match name {
                "NODE_NAME" => Some(node.name.clone()),
                "HOST_IP" => Some(host_ip.clone()),
                _ => None,
            };
            let expanded = expand_env(&agent_text, env).context("the chart's agent.yaml")?;
            let chart = AgentConfig::parse(&expanded).context("the chart's agent.yaml")?;
            let testbed = agent_defaults(node, options);
            let config = AgentConfig {
                control_plane: Some(ControlPlaneConfig {
                    address: controller_addr.into(),
                    server_name: Some(CONTROLLER_HOST.to_owned()),
                    ca_cert: ca_dir.join("root-cert.pem"),
                    token_file,
                    root_namespace: chart.control_plane.as_ref().map_or_else(
                        || RELEASE_NAMESPACE.to_owned(),
                        |c| c.root_namespace.clone(),
                    ),
                }),
                listen: testbed.listen,
                datapath: mesh_node::config::DatapathConfig {
                    cgroup_root: testbed.datapath.cgroup_root,
                    pin_dir: testbed.datapath.pin_dir,
                    ..chart.datapath
                },
                limits: testbed.limits,
                drain_timeout_secs: testbed.drain_timeout_secs,
                certificate_ttl_secs: testbed.certificate_ttl_secs,
                outbound: mesh_node::config::OutboundConfig {
                    connect_timeout_ms: testbed.outbound.connect_timeout_ms,
                    ..chart.outbound
                },
                log_format: LogFormat::Json,
                ..chart
            };
            config.validate().context("the agent config")?;
            let path = scratch.join(format!("agent-{}.yaml", node.name));
            std::fs::write(&path, config.to_yaml())?;
            configs.push(path);
        }

        let mut mesh = Self {
            tb,
            agents: (0..configs.len()).map(|_| None).collect(),
            logs: vec![Vec::new(); configs.len()],
            configs,
            ca_dir: ca_dir.clone(),
            control: Some(ControlPlane {
                config: controller_config,
                manifests: PathBuf::new(),
                process: None,
                logs: Vec::new(),
                namespaces: Default::default(),
                pods: Default::default(),
                owners: Default::default(),
                kubeconfig: Some(kubeconfig),
            }),
        };
        mesh.start_controller()?;
        // The root the controller published (as the chart mounts it into the agents).
        let root = cluster.kubectl(&[
            "get",
            "configmap",
            "trellis-ca-root",
            "-n",
            RELEASE_NAMESPACE,
            "-o",
            "jsonpath={.data.root-cert\\.pem}",
        ])?;
        if !root.contains("BEGIN CERTIFICATE") {
            bail!("the controller published no root certificate: {root:?}");
        }
        std::fs::write(ca_dir.join("root-cert.pem"), root)?;
        for i in 0..tb.nodes().len() {
            mesh.start_agent(i)?;
        }
        Ok(mesh)
    }
}

impl Mesh<'_> {
    /// Applies Gateway `name` (class `trellis-waypoint`) in `pod`'s namespace with kubectl and
    /// runs `mesh-node waypoint` in `pod`, which the test made a Pod object labelled as the
    /// Gateway's pod ([`super::waypoint::GATEWAY_NAME_LABEL`]) running as `service_account`. The waypoint
    /// proves who it is with a token of that account bound to its Pod, for the controller's
    /// audience, as a projected token would; it waits until the waypoint is ready.
    pub fn start_kube_waypoint<'p>(
        &self,
        cluster: &Cluster,
        name: &str,
        pod: &'p KubePod,
        service_account: &str,
    ) -> Result<Waypoint<'p>> {
        let namespace = pod.namespace.as_str();
        let gateway = json!({
            "apiVersion": GATEWAY_API_VERSION, "kind": "Gateway",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "gatewayClassName": WAYPOINT_CLASS,
                "listeners": [{"name": "mesh", "port": HBONE_PORT, "protocol": "HBONE"}],
            },
        });
        cluster
            .kubectl_stdin(&["apply", "-f", "-"], &gateway.to_string())
            .context("applying the Gateway")?;
        let token = cluster.token(
            namespace,
            service_account,
            Some("trellis"),
            Some(pod.name()),
        )?;
        let token_file = self.tb.scratch_dir().join(format!("token-waypoint-{name}"));
        write_private(&token_file, &token)?;
        let config = format!(
            "namespace: {namespace}\n\
             gateway: {name}\n\
             service_account: {service_account}\n\
             trust_domain: {TRUST_DOMAIN}\n\
             control_plane:\n  address: \"{controller}\"\n  server_name: {CONTROLLER_HOST}\n  \
             ca_cert: {ca}\n  token_file: {token}\n  root_namespace: {RELEASE_NAMESPACE}\n\
             listen:\n  hbone: \"[::]:{HBONE_PORT}\"\n  metrics: \"0.0.0.0:{WAYPOINT_METRICS_PORT}\"\n  \
             readiness: \"0.0.0.0:{WAYPOINT_READY_PORT}\"\n\
             log_format: json\n",
            controller = self.controller_addr(),
            ca = self.ca_dir.join("root-cert.pem").display(),
            token = token_file.display(),
        );
        self.launch_waypoint(name, &pod.pod, &config)
    }
}
