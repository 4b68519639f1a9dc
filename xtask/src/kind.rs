//! `cargo xtask kind-e2e`: the chart on a kind cluster, checked end to end.
//!
//! kind nodes are privileged containers sharing this machine's kernel, so the agent loads its
//! programs into the host kernel and attaches them to each node container's cgroup subtree;
//! `agent.privileged=true` is needed because the node containers' own capability sets are what
//! the pods inherit from.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{DEFAULT_IMAGE, container_engine, image};

pub const DEFAULT_NODE_IMAGE: &str = "kindest/node:v1.33.1";
const NAMESPACE: &str = "trellis-system";
const APPS: &str = "trellis-e2e";
/// A namespace outside the mesh, for the STRICT check.
const OUTSIDE: &str = "trellis-e2e-plain";

fn kind_config(cluster: &str, node_image: &str) -> String {
    format!(
        "kind: Cluster\n\
         apiVersion: kind.x-k8s.io/v1alpha4\n\
         name: {cluster}\n\
         nodes:\n\
         - role: control-plane\n  image: {node_image}\n\
         - role: worker\n  image: {node_image}\n\
         - role: worker\n  image: {node_image}\n"
    )
}

/// Two apps on different workers: `server` (HTTP on 8080, with a kubelet readiness probe)
/// and `client`, each with its own service account (its mesh identity).
fn apps(server_node: &str, client_node: &str) -> String {
    format!(
        r"apiVersion: v1
kind: ServiceAccount
metadata: {{ name: server, namespace: {APPS} }}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{ name: client, namespace: {APPS} }}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{ name: server, namespace: {APPS} }}
spec:
  replicas: 1
  selector: {{ matchLabels: {{ app: server }} }}
  template:
metadata: {{ labels: {{ app: server }} }}
spec:
  serviceAccountName: server
  nodeSelector: {{ kubernetes.io/hostname: {server_node} }}
  containers:
    - name: server
      image: registry.k8s.io/e2e-test-images/agnhost:2.53
      args: [netexec, --http-port=8080]
      ports: [{{ containerPort: 8080 }}]
      readinessProbe:
        httpGet: {{ path: /healthz, port: 8080 }}
        periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata: {{ name: server, namespace: {APPS} }}
spec:
  selector: {{ app: server }}
  ports: [{{ name: http, port: 8080 }}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{ name: client, namespace: {APPS} }}
spec:
  replicas: 1
  selector: {{ matchLabels: {{ app: client }} }}
  template:
metadata: {{ labels: {{ app: client }} }}
spec:
  serviceAccountName: client
  nodeSelector: {{ kubernetes.io/hostname: {client_node} }}
  containers:
    - name: client
      image: curlimages/curl:8.11.1
      command: [sleep, infinity]
---
apiVersion: v1
kind: Pod
metadata: {{ name: outsider, namespace: {OUTSIDE} }}
spec:
  nodeSelector: {{ kubernetes.io/hostname: {client_node} }}
  containers:
- name: outsider
  image: curlimages/curl:8.11.1
  command: [sleep, infinity]
"
    )
}

/// DENY the client's identity at the server, as Istio users write it.
fn deny_policy(trust_domain: &str) -> String {
    format!(
        r#"apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {{ name: deny-client, namespace: {APPS} }}
spec:
  selector: {{ matchLabels: {{ app: server }} }}
  action: DENY
  rules:
- from:
    - source: {{ principals: ["{trust_domain}/ns/{APPS}/sa/client"] }}
"#
    )
}

fn strict_policy() -> String {
    format!(
        r"apiVersion: security.trellis.dev/v1
kind: PeerAuthentication
metadata: {{ name: default, namespace: {APPS} }}
spec:
  mtls: {{ mode: STRICT }}
"
    )
}

/// What is missing to run, all at once, so that one run tells the whole story.
fn preflight() -> Result<&'static str> {
    let mut missing = Vec::new();
    let engine = container_engine().map_err(|e| missing.push(format!("{e:#}")));
    for tool in ["kind", "kubectl", "helm"] {
        if Command::new(tool).arg("version").output().is_err() {
            missing.push(format!("{tool} is not installed"));
        }
    }
    match engine {
        Ok(engine) if missing.is_empty() => Ok(engine),
        _ => bail!(
            "kind-e2e cannot run on this machine: {}. It needs a working container engine \
             (docker or podman), kind, kubectl and helm; run it on a workstation or CI \
             runner that has them",
            missing.join("; ")
        ),
    }
}

pub fn run(root: &Path, cluster: &str, node_image: &str, keep: bool, prebuilt: bool) -> Result<()> {
    let engine = preflight()?;
    let work = root.join("target/kind-e2e");
    std::fs::create_dir_all(&work).context("creating target/kind-e2e")?;
    image(root, DEFAULT_IMAGE, prebuilt)?;

    let existing = output(Command::new("kind").args(["get", "clusters"]))?;
    if existing.lines().any(|l| l.trim() == cluster) {
        println!("reusing kind cluster {cluster}");
    } else {
        let config = work.join("kind.yaml");
        std::fs::write(&config, kind_config(cluster, node_image))
            .context("writing the kind config")?;
        let mut create = Command::new("kind");
        create
            .args(["create", "cluster", "--wait", "180s", "--config"])
            .arg(&config);
        if engine == "podman" {
            create.env("KIND_EXPERIMENTAL_PROVIDER", "podman");
        }
        step(&mut create, "kind create cluster")?;
    }
    let result = checks(root, cluster, &work);
    if keep {
        println!("kept kind cluster {cluster} (kind delete cluster --name {cluster})");
    } else if let Err(e) = step(
        Command::new("kind").args(["delete", "cluster", "--name", cluster]),
        "kind delete cluster",
    ) {
        eprintln!("warning: {e:#}");
    }
    result?;
    println!("kind-e2e passed: mTLS between nodes, policy denial, kubelet probe under STRICT");
    Ok(())
}

fn checks(root: &Path, cluster: &str, work: &Path) -> Result<()> {
    let context = format!("kind-{cluster}");
    let kubectl = |args: &[&str]| {
        let mut c = Command::new("kubectl");
        c.args(["--context", &context]).args(args);
        c
    };
    step(
        Command::new("kind").args(["load", "docker-image", DEFAULT_IMAGE, "--name", cluster]),
        "kind load docker-image",
    )?;
    let (repository, tag) = DEFAULT_IMAGE.split_once(':').context("image has a tag")?;
    step(
        Command::new("helm")
            .args(["upgrade", "--install", "trellis"])
            .arg(root.join("charts/trellis"))
            .args([
                "--kube-context",
                &context,
                "--namespace",
                NAMESPACE,
                "--create-namespace",
            ])
            .args([
                "--set",
                "agent.privileged=true",
                "--set",
                "image.pullPolicy=Never",
            ])
            .args(["--set", &format!("image.repository={repository}")])
            .args(["--set", &format!("image.tag={tag}")])
            .args(["--wait", "--timeout", "5m"]),
        "helm install",
    )?;

    // Two workers, one app on each.
    let workers = output(&mut kubectl(&[
        "get",
        "nodes",
        "-l",
        "!node-role.kubernetes.io/control-plane",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ]))?;
    let workers: Vec<&str> = workers.split_whitespace().collect();
    let [server_node, client_node, ..] = workers.as_slice() else {
        bail!("kind-e2e needs two worker nodes, found {workers:?}");
    };
    for ns in [APPS, OUTSIDE] {
        let yaml = output(&mut kubectl(&[
            "create",
            "namespace",
            ns,
            "--dry-run=client",
            "-o",
            "yaml",
        ]))?;
        apply(&context, work, &format!("{ns}-namespace.yaml"), &yaml)?;
    }
    step(
        &mut kubectl(&[
            "label",
            "namespace",
            APPS,
            "trellis.dev/mesh=enabled",
            "--overwrite",
        ]),
        "label the app namespace",
    )?;
    apply(&context, work, "apps.yaml", &apps(server_node, client_node))?;
    for (ns, what) in [(APPS, "deployment/server"), (APPS, "deployment/client")] {
        step(
            &mut kubectl(&["-n", ns, "rollout", "status", what, "--timeout", "180s"]),
            &format!("rollout of {what}"),
        )?;
    }
    step(
        &mut kubectl(&[
            "-n",
            OUTSIDE,
            "wait",
            "pod/outsider",
            "--for=condition=Ready",
            "--timeout",
            "180s",
        ]),
        "outsider pod",
    )?;

    let curl = |ns: &str, target: &str| {
        kubectl(&[
            "-n",
            ns,
            "exec",
            if ns == APPS {
                "deploy/client"
            } else {
                "outsider"
            },
            "--",
            "curl",
            "-sS",
            "--max-time",
            "3",
            target,
        ])
        .output()
        .is_ok_and(|o| o.status.success())
    };
    let url = format!("http://server.{APPS}.svc:8080/hostname");

    // 1. mTLS: the client reaches the server across nodes, and the server node's agent
    //    counts the connection as mutual TLS.
    poll("client reaches server", || Ok(curl(APPS, &url)))?;
    let agent = output(&mut kubectl(&[
        "-n",
        NAMESPACE,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=trellis-agent",
        "--field-selector",
        &format!("spec.nodeName={server_node}"),
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]))?;
    poll("the server's agent reports mutual TLS", || {
        let metrics = output(&mut kubectl(&[
            "-n",
            NAMESPACE,
            "exec",
            agent.trim(),
            "--",
            "meshctl",
            "metrics",
        ]))?;
        Ok(metrics.lines().any(|l| {
            l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"destination\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
                && l.contains(&format!(
                    "source_principal=\"spiffe://cluster.local/ns/{APPS}/sa/client\""
                ))
        }))
    })?;

    // 2. A DENY policy on the client's identity stops it; removing it lets it through.
    let policy = apply(&context, work, "deny.yaml", &deny_policy("cluster.local"))?;
    poll("the policy denies the client", || Ok(!curl(APPS, &url)))?;
    step(
        &mut kubectl(&["delete", "-f", &policy.to_string_lossy()]),
        "delete the policy",
    )?;
    poll("the client is allowed again", || Ok(curl(APPS, &url)))?;

    // 3. STRICT: plain text from outside the mesh is refused, but the kubelet's probes
    //    still reach the pod: a restarted server becomes Ready.
    apply(&context, work, "strict.yaml", &strict_policy())?;
    let pod_ip = output(&mut kubectl(&[
        "-n",
        APPS,
        "get",
        "pods",
        "-l",
        "app=server",
        "-o",
        "jsonpath={.items[0].status.podIP}",
    ]))?;
    let direct = format!("http://{}:8080/hostname", pod_ip.trim());
    poll("STRICT refuses plain text from outside the mesh", || {
        Ok(!curl(OUTSIDE, &direct))
    })?;
    step(
        &mut kubectl(&["-n", APPS, "rollout", "restart", "deployment/server"]),
        "restart server",
    )?;
    step(
        &mut kubectl(&[
            "-n",
            APPS,
            "rollout",
            "status",
            "deployment/server",
            "--timeout",
            "120s",
        ]),
        "the restarted server becomes Ready under STRICT (kubelet probes pass)",
    )?;
    poll("mesh clients still reach the server under STRICT", || {
        Ok(curl(APPS, &url))
    })?;
    Ok(())
}

/// Writes `yaml` to `work/file` and applies it; returns the file.
fn apply(context: &str, work: &Path, file: &str, yaml: &str) -> Result<std::path::PathBuf> {
    let path = work.join(file);
    std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    step(
        Command::new("kubectl")
            .args(["--context", context, "apply", "-f"])
            .arg(&path),
        &format!("kubectl apply {file}"),
    )?;
    Ok(path)
}

/// Retries `check` every 2 s until it holds, for at most 2 minutes.
fn poll(what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    const DEADLINE: Duration = Duration::from_mins(2);
    let start = Instant::now();
    let mut last_error = None;
    while start.elapsed() < DEADLINE {
        match check() {
            Ok(true) => {
                println!("ok: {what}");
                return Ok(());
            }
            Ok(false) => {}
            Err(e) => last_error = Some(e),
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    match last_error {
        Some(e) => bail!("{what}: not true after {DEADLINE:?} (last error: {e:#})"),
        None => bail!("{what}: not true after {DEADLINE:?}"),
    }
}

fn step(command: &mut Command, what: &str) -> Result<()> {
    println!("==> {what}");
    super::run(command, what)
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
