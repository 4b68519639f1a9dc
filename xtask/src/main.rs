//! `cargo xtask`: Trellis's developer and user workflows.
//!
//! Deliberately light (no dependency on the other crates), so it builds on a fresh machine
//! before the eBPF toolchain exists, and can install that toolchain (`.ci/setup`) first.
//!
//! - `setup`: install what building and testing need (idempotent).
//! - `demo`: set up, build, and run the local testbed demo with real traffic.
//! - `test`: set up, build, check formatting and lints, run every test.
//! - `image`: build the container image (`Dockerfile`) with docker or podman.
//! - `chart-check`: check the Helm chart (schema, RBAC, `helm lint` and `helm template` with the
//!   real Helm that `.ci/kube-tools` builds).
//! - `crds`: regenerate the chart's CRDs (`charts/trellis/crds/<group>.yaml`, one file per API
//!   group) from the Rust types with `mesh-node crds`; the chart tests fail while a committed
//!   file differs.
//! - `bench`: build release binaries and run the `bench` binary (tests/src/bench.rs) as
//!   root: Trellis against no mesh and a userspace relay floor on the namespace testbed; a
//!   table on the terminal, every figure in `target/bench/latest.json`.
//! - `cluster up|down`: a real Kubernetes control plane (etcd, kube-apiserver,
//!   kube-controller-manager, built from Go modules by `.ci/kube-tools`) on loopback, the same
//!   one the cluster tests start; the admin kubeconfig is `target/cluster/admin.kubeconfig`.
//! - `kind-e2e`: the chart on a real Kubernetes (kind) cluster, with mTLS, a policy denial
//!   and a kubelet probe under STRICT checked. Needs a container engine, kind, kubectl and
//!   helm; not part of `test`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod cluster;
mod kind;

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
    /// Check the Helm chart: values against the schema, `helm lint` and `helm template` (the
    /// real Helm, built by .ci/kube-tools), the rendered objects and RBAC.
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
    /// Start (`up`) or stop (`down`) a real Kubernetes control plane on loopback: etcd,
    /// kube-apiserver and kube-controller-manager built from Go modules by .ci/kube-tools.
    Cluster {
        #[command(subcommand)]
        action: cluster::Action,
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
/// The API groups whose CRDs the chart installs only on request (mesh_node::k8s::crds::
/// OPTIONAL_GROUPS): a template each, `templates/crds-<group>.yaml`, wrapped in the value that
/// asks for them, since Helm never templates `crds/`.
const OPTIONAL_CRD_GROUPS: [(&str, &str); 2] = [
    ("security.istio.io", "istio.installCrds"),
    ("networking.istio.io", "istio.installCrds"),
];
/// Where the optional groups' templates live.
const OPTIONAL_CRDS_DIR: &str = "charts/trellis/templates";

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
                // rustfmt.toml's import grouping is a nightly option: checked with a nightly
                // rustfmt when one is installed; stable ignores it and accepts what nightly
                // wrote.
                match nightly_rustfmt() {
                    Some(toolchain) => run(
                        Command::new("cargo")
                            .arg(format!("+{toolchain}"))
                            .args(["fmt", "--all", "--", "--check"])
                            .current_dir(&root),
                        "cargo fmt --check",
                    )?,
                    None => {
                        eprintln!(
                            "xtask: no nightly rustfmt; checking with stable (import grouping unchecked)"
                        );
                        cargo(&root, &["fmt", "--all", "--", "--check"])?;
                    }
                }
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
        Task::Cluster { action } => cluster::run_action(&root, &action),
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

/// The Kubernetes components and Helm, built once from Go modules (`.ci/kube-tools`).
fn kube_tools(root: &Path) -> Result<()> {
    run(
        Command::new("bash")
            .arg(root.join(".ci/kube-tools"))
            .current_dir(root),
        ".ci/kube-tools",
    )
}

fn chart_check(root: &Path) -> Result<()> {
    // Helm itself, as the chart tests run it.
    kube_tools(root)?;
    // The chart tests parse the chart, validate values.yaml against values.schema.json,
    // run `helm lint --strict`, render every template with `helm template` and check the
    // agent, controller and RBAC objects. Under MESH_E2E=require a missing helm fails them.
    let mut test = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    test.args(["test", "-p", "mesh-tests", "--test", "chart"])
        .env("MESH_E2E", "require")
        .current_dir(root);
    run(&mut test, "the chart tests")
}

/// Writes the CRDs `mesh-node crds` prints for each API group into the chart. The generator
/// runs through cargo rather than as a library call so that xtask keeps no dependency on the
/// other crates.
fn crds(root: &Path) -> Result<()> {
    for group in CRD_GROUPS {
        let yaml = render_crds(root, group)?;
        write_crds(root, &format!("{CRDS_DIR}/{group}.yaml"), &yaml)?;
    }
    for (group, value) in OPTIONAL_CRD_GROUPS {
        let yaml = render_crds(root, group)?;
        // Helm would read `{{` in a description as a template action.
        if yaml.contains("{{") {
            bail!("the {group} CRDs contain `{{{{`, which Helm would template; reword the docs");
        }
        let template = format!(
            "{{{{- /* Installed only with {value}=true (clusters with Istio already have them). */}}}}\n\
             {{{{- if .Values.{value} }}}}\n{yaml}{{{{- end }}}}\n"
        );
        write_crds(
            root,
            &format!("{OPTIONAL_CRDS_DIR}/crds-{group}.yaml"),
            &template,
        )?;
    }
    Ok(())
}

/// What `mesh-node crds --group <group>` prints.
fn render_crds(root: &Path, group: &str) -> Result<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
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
    let yaml = String::from_utf8(out.stdout).context("`mesh-node crds` printed invalid UTF-8")?;
    // An empty or truncated stream would otherwise replace the chart's CRDs silently.
    if !yaml.contains("kind: CustomResourceDefinition") {
        bail!("`mesh-node crds --group {group}` printed no CRDs; refusing to overwrite them");
    }
    Ok(yaml)
}

fn write_crds(root: &Path, file: &str, yaml: &str) -> Result<()> {
    let path = root.join(file);
    if std::fs::read_to_string(&path).is_ok_and(|old| old == yaml) {
        println!("{file} is up to date");
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "wrote {file}; on a cluster that has them, apply it by hand (helm never upgrades \
         crds/): kubectl apply -f {file}"
    );
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

/// The pinned nightly toolchain, when it is installed with rustfmt, for the unstable options
/// of rustfmt.toml (another nightly's rustfmt may format differently).
fn nightly_rustfmt() -> Option<&'static str> {
    const PINNED: &str = "nightly-2026-05-19";
    Command::new("rustup")
        .args(["run", PINNED, "rustfmt", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
        .then_some(PINNED)
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
