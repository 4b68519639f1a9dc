//! `cargo xtask`: Trellis's developer and user workflows.
//!
//! Deliberately light (no dependency on the other crates), so it builds on a fresh machine
//! before the eBPF toolchain exists, and can install that toolchain (`.ci/setup`) first.
//!
//! - `setup`: install what building and testing need (idempotent).
//! - `demo`: set up, build, and run the local testbed demo with real traffic.
//! - `test`: set up, build, check formatting and lints, run every test.
//! - `image`: build the container image (`Dockerfile`) with docker or podman.
//! - `chart-check`: check the Helm chart (schema, templates, RBAC); `helm lint` and
//!   `helm template` too where helm is installed.
//! - `crds`: regenerate the chart's CRDs (`charts/trellis/crds/<group>.yaml`, one file per API
//!   group) from the Rust types with `mesh-node crds`; the chart tests fail while a committed
//!   file differs.
//! - `bench`: build release binaries and run the `bench` binary (tests/src/bench.rs) as
//!   root: Trellis against no mesh and a userspace relay floor on the namespace testbed; a
//!   table on the terminal, every figure in `target/bench/latest.json`.
//! - `kind-e2e`: the chart on a real Kubernetes (kind) cluster, with mTLS, a policy denial
//!   and a kubelet probe under STRICT checked. Needs a container engine, kind, kubectl and
//!   helm; not part of `test`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Trellis workflows")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain and system packages Trellis needs (skips what is present).
    Setup,
    /// Build everything and run the demo: a 2-node, 4-pod mesh on network namespaces.
    Demo,
    /// Build everything, check formatting and lints, and run all tests.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the image with mesh-node and meshctl (docker or podman, whichever works).
    Image {
        /// Image name and tag.
        #[arg(long, default_value = DEFAULT_IMAGE)]
        tag: String,
        /// Copy `cargo build --release` binaries from this machine instead of building inside
        /// the image (faster; the host's glibc must not be newer than Debian 12's).
        #[arg(long)]
        prebuilt: bool,
    },
    /// Check the Helm chart: values against the schema, rendered templates, RBAC; plus
    /// `helm lint` and `helm template` when helm is installed.
    ChartCheck,
    /// Regenerate charts/trellis/crds/ from the Rust types (runs `mesh-node crds`).
    Crds,
    /// Benchmark Trellis against no mesh and a relay floor on the testbed (run as root).
    Bench {
        /// Short durations: the whole run takes a couple of minutes.
        #[arg(long)]
        quick: bool,
        /// Rounds; each runs every configuration (default 3, or 2 with --quick).
        #[arg(long)]
        rounds: Option<usize>,
        /// Where to write the JSON report (default target/bench/latest.json).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Only tests whose SCENARIO-TEST name is this, or else contains it (repeatable), e.g.
        /// same-node-rr.
        #[arg(long)]
        only: Vec<String>,
        /// Another node proxy to measure: a command template per node namespace (see
        /// `bench run --help`).
        #[arg(long)]
        peer: Option<String>,
        /// Where the client dials in the peer configuration: direct or relay.
        #[arg(long)]
        peer_dial: Option<String>,
        /// Use debug binaries (quicker to build; the figures are not representative).
        #[arg(long)]
        debug: bool,
    },
    /// Create a kind cluster, install the chart and check the mesh end to end.
    KindE2e {
        /// kind cluster name (reused when it exists).
        #[arg(long, default_value = "trellis-e2e")]
        cluster: String,
        /// kindest/node image for every node.
        #[arg(long, env = "KIND_NODE_IMAGE", default_value = kind::DEFAULT_NODE_IMAGE)]
        node_image: String,
        /// Keep the cluster afterwards (for debugging).
        #[arg(long)]
        keep: bool,
        /// Build the image from this machine's release binaries (see `image --prebuilt`).
        #[arg(long)]
        prebuilt: bool,
    },
}

/// The image `image` builds and `kind-e2e` loads.
const DEFAULT_IMAGE: &str = "trellis/mesh-node:dev";

/// The chart's CRD directory, relative to the workspace root: one `<group>.yaml` per API group
/// of [`CRD_GROUPS`]. Helm 3 installs `crds/` before the templates (and never upgrades it);
/// tests/tests/chart.rs checks each file is what `crds` writes.
const CRDS_DIR: &str = "charts/trellis/crds";
/// The API groups `mesh-node crds --group` renders (mesh_node::k8s::crds::GROUPS; xtask depends on
/// no other crate, and the chart tests fail if the two lists ever differ).
const CRD_GROUPS: [&str; 2] = ["security.trellis.dev", "traffic.trellis.dev"];

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.command {
        Task::Setup => setup(&root),
        Task::Demo => {
            setup(&root)?;
            cargo(&root, &["build", "--bins"])?;
            run(
                Command::new(root.join("target/debug/demo")).current_dir(&root),
                "demo",
            )
        }
        Task::Test { no_lint, args } => {
            setup(&root)?;
            // The end-to-end tests spawn the agent and workload binaries: build them first,
            // together with every test target so dev-dependency features resolve once and
            // `cargo test` below reuses these artifacts instead of building a second copy.
            cargo(&root, &["build", "--all-targets"])?;
            if !no_lint {
                cargo(&root, &["fmt", "--all", "--", "--check"])?;
                cargo(&root, &["clippy", "--all-targets", "--", "-D", "warnings"])?;
                // The eBPF crate only builds for the BPF target, with the toolchain whose
                // LLVM is bpf-linker's (as mesh-node's build script chooses it).
                let toolchain = bpf_toolchain()?;
                let mut clippy = Command::new("cargo");
                if !toolchain.starts_with("nightly") {
                    clippy.env("RUSTC_BOOTSTRAP", "1");
                }
                run(
                    clippy
                        .arg(format!("+{toolchain}"))
                        .args(["clippy", "-p", "mesh-ebpf", "--release"])
                        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
                        .args(["--target-dir", "target/bpf-clippy", "--", "-D", "warnings"])
                        .current_dir(&root),
                    "clippy on mesh-ebpf",
                )?;
            }
            let mut test = vec!["test"];
            if !args.is_empty() {
                test.push("--");
                test.extend(args.iter().map(String::as_str));
            }
            cargo(&root, &test)
        }
        Task::Image { tag, prebuilt } => image(&root, &tag, prebuilt),
        Task::ChartCheck => chart_check(&root),
        Task::Crds => crds(&root),
        Task::Bench {
            quick,
            rounds,
            json,
            only,
            peer,
            peer_dial,
            debug,
        } => {
            // Every binary: the bench starts podexec, mesh-node and itself inside the testbed,
            // and finds them next to itself, so all come from the same profile.
            let profile = if debug { "debug" } else { "release" };
            let mut build = vec!["build", "--bins"];
            if !debug {
                build.push("--release");
            }
            cargo(&root, &build)?;
            let json = json.unwrap_or_else(|| root.join("target/bench/latest.json"));
            let mut bench = Command::new(root.join("target").join(profile).join("bench"));
            bench.arg("run").arg("--json").arg(&json).current_dir(&root);
            if quick {
                bench.arg("--quick");
            }
            if let Some(rounds) = rounds {
                bench.arg("--rounds").arg(rounds.to_string());
            }
            for o in &only {
                bench.arg("--only").arg(o);
            }
            if let Some(peer) = &peer {
                bench.arg("--peer").arg(peer);
            }
            if let Some(dial) = &peer_dial {
                bench.arg("--peer-dial").arg(dial);
            }
            run(
                &mut bench,
                "bench (it needs root: try `sudo -E cargo xtask bench`)",
            )
        }
        Task::KindE2e {
            cluster,
            node_image,
            keep,
            prebuilt,
        } => kind::run(&root, &cluster, &node_image, keep, prebuilt),
    }
}

/// A container engine that answers (a `docker` client without a daemon does not count).
fn container_engine() -> Result<&'static str> {
    let mut reasons = Vec::new();
    for engine in ["docker", "podman"] {
        match Command::new(engine).arg("info").output() {
            Ok(out) if out.status.success() => return Ok(engine),
            Ok(out) => reasons.push(format!(
                "{engine} is installed but `{engine} info` failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("no output")
            )),
            Err(_) => reasons.push(format!("{engine} is not installed")),
        }
    }
    bail!(
        "no usable container engine ({}): install docker or podman and make sure its daemon or \
         socket is running",
        reasons.join("; ")
    )
}

fn image(root: &Path, tag: &str, prebuilt: bool) -> Result<()> {
    let engine = container_engine()?;
    if prebuilt {
        cargo(root, &["build", "--release", "-p", "mesh-node", "--bins"])?;
    }
    let binaries = if prebuilt { "prebuilt" } else { "source" };
    run(
        Command::new(engine)
            .args(["build", "-t", tag, "-f", "Dockerfile"])
            .args(["--build-arg", &format!("BINARIES={binaries}"), "."])
            // The Dockerfile uses cache mounts, a BuildKit feature.
            .env("DOCKER_BUILDKIT", "1")
            .current_dir(root),
        &format!("{engine} build"),
    )?;
    println!("built {tag} ({binaries} binaries) with {engine}");
    Ok(())
}

fn chart_check(root: &Path) -> Result<()> {
    // The chart tests parse the chart, validate values.yaml against values.schema.json,
    // render every template and check the agent, controller and RBAC objects.
    cargo(root, &["test", "-p", "mesh-tests", "--test", "chart"])?;
    let chart = root.join("charts/trellis");
    let chart = chart.to_string_lossy();
    if Command::new("helm").arg("version").output().is_err() {
        println!(
            "helm is not installed: skipped `helm lint` and `helm template` (the chart tests \
             above rendered the templates themselves; install helm for the real engine)"
        );
        return Ok(());
    }
    let variants: [&[&str]; 2] = [
        &[],
        &[
            "--set",
            "agent.privileged=true,monitoring.podMonitor.enabled=true,monitoring.serviceMonitor.enabled=true",
        ],
    ];
    for extra in variants {
        run(
            Command::new("helm")
                .args(["lint", "--strict", &chart])
                .args(extra),
            "helm lint",
        )?;
        let out = Command::new("helm")
            .args([
                "template",
                "trellis",
                &chart,
                "--namespace",
                "trellis-system",
            ])
            .args(extra)
            .output()
            .context("cannot start helm template")?;
        if !out.status.success() {
            bail!(
                "helm template failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    println!("helm lint and helm template passed");
    Ok(())
}

/// Writes the CRDs `mesh-node crds` prints for each API group into the chart. The generator
/// runs through cargo rather than as a library call so that xtask keeps no dependency on the
/// other crates.
fn crds(root: &Path) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for group in CRD_GROUPS {
        let file = format!("{CRDS_DIR}/{group}.yaml");
        let out = Command::new(&cargo)
            .args([
                "run",
                "--quiet",
                "--package",
                "mesh-node",
                "--bin",
                "mesh-node",
            ])
            .args(["--", "crds", "--group", group])
            .current_dir(root)
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("cannot start `cargo run --package mesh-node -- crds`")?;
        if !out.status.success() {
            bail!(
                "`mesh-node crds --group {group}` failed ({}); its errors are above (does `cargo build --bins` work?)",
                out.status
            );
        }
        let yaml =
            String::from_utf8(out.stdout).context("`mesh-node crds` printed invalid UTF-8")?;
        // An empty or truncated stream would otherwise replace the chart's CRDs silently.
        if !yaml.contains("kind: CustomResourceDefinition") {
            bail!("`mesh-node crds --group {group}` printed no CRDs; refusing to overwrite {file}");
        }
        let path = root.join(&file);
        if std::fs::read_to_string(&path).is_ok_and(|old| old == yaml) {
            println!("{file} is up to date");
            continue;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, &yaml).with_context(|| format!("writing {}", path.display()))?;
        println!(
            "wrote {file}; on a cluster that has them, apply it by hand (helm never upgrades \
             crds/): kubectl apply -f {file}"
        );
    }
    Ok(())
}

fn setup(root: &Path) -> Result<()> {
    run(
        Command::new("bash")
            .arg(root.join(".ci/setup"))
            .current_dir(root),
        ".ci/setup",
    )
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(
        Command::new(cargo).args(args).current_dir(root),
        &format!("cargo {}", args.join(" ")),
    )
}

/// The first installed toolchain whose LLVM is bpf-linker's (22): a nightly, else stable
/// (with `RUSTC_BOOTSTRAP=1` for `-Z build-std`). The same order as mesh-node's build script.
fn bpf_toolchain() -> Result<String> {
    let preferred = std::env::var("TRELLIS_BPF_TOOLCHAIN").ok();
    for toolchain in
        preferred
            .iter()
            .map(String::as_str)
            .chain(["nightly", "nightly-2026-05-19", "stable"])
    {
        let out = Command::new("rustup")
            .args(["run", toolchain, "rustc", "-vV"])
            .output();
        let llvm_22 = out.is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.starts_with("LLVM version: 22."))
        });
        if llvm_22 {
            return Ok(toolchain.to_owned());
        }
    }
    bail!("no Rust toolchain with LLVM 22 for the BPF target; run .ci/setup")
}

fn run(command: &mut Command, what: &str) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(PathBuf::from)
        .context("xtask is not inside the workspace")
}

/// `cargo xtask kind-e2e`: the chart on a kind cluster, checked end to end.
///
/// kind nodes are privileged containers sharing this machine's kernel, so the agent loads its
/// programs into the host kernel and attaches them to each node container's cgroup subtree;
/// `agent.privileged=true` is needed because the node containers' own capability sets are what
/// the pods inherit from.
mod kind {
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
            r#"apiVersion: v1
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
"#
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
            r#"apiVersion: security.trellis.dev/v1
kind: PeerAuthentication
metadata: {{ name: default, namespace: {APPS} }}
spec:
  mtls: {{ mode: STRICT }}
"#
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

    pub fn run(
        root: &Path,
        cluster: &str,
        node_image: &str,
        keep: bool,
        prebuilt: bool,
    ) -> Result<()> {
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
            .map(|o| o.status.success())
            .unwrap_or(false)
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
        const DEADLINE: Duration = Duration::from_secs(120);
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
}
