//! `cargo xtask`: Trellis's developer and user workflows.
//!
//! Deliberately light (no dependency on the other crates), so it builds on a fresh machine
//! before the eBPF toolchain exists, and can install that toolchain (`.ci/setup`) first.
//!
//! - `setup`: install what building and testing need (idempotent).
//! - `demo`: set up, build, and run the local testbed demo with real traffic.
//! - `test`: set up, build, check formatting and lints, run every test.

use std::{path::PathBuf, process::Command};

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
}

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
            // The end-to-end tests spawn the agent and workload binaries: build them first.
            cargo(&root, &["build", "--bins"])?;
            if !no_lint {
                cargo(&root, &["fmt", "--all", "--", "--check"])?;
                cargo(&root, &["clippy", "--all-targets", "--", "-D", "warnings"])?;
                // The eBPF crate only builds for the BPF target, with nightly.
                run(
                    Command::new("cargo")
                        .args(["+nightly", "clippy", "-p", "mesh-ebpf", "--release"])
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
    }
}

fn setup(root: &PathBuf) -> Result<()> {
    run(
        Command::new("bash")
            .arg(root.join(".ci/setup"))
            .current_dir(root),
        ".ci/setup",
    )
}

fn cargo(root: &PathBuf, args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(
        Command::new(cargo).args(args).current_dir(root),
        &format!("cargo {}", args.join(" ")),
    )
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
