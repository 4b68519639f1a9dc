//! `cargo xtask cluster up|down`: a real Kubernetes control plane (etcd, kube-apiserver with
//! RBAC and Node authorization and a service-account issuer, kube-controller-manager) on this
//! machine's loopback, for trying Trellis's controller against it by hand.
//!
//! The binaries come from `.ci/kube-tools` (built from Go modules once, then cached); the
//! processes are started and stopped by the `cluster` binary of the tests crate, which is the
//! library the cluster tests use (`mesh_tests::cluster`), so both run the same control plane.

use std::{path::Path, process::Command};

use anyhow::Result;
use clap::Subcommand;

use super::{cargo, run};

#[derive(Subcommand)]
pub enum Action {
    /// Build the components if needed, start them and leave them running.
    Up,
    /// Stop the control plane `up` started and remove its state.
    Down,
    /// The scale benchmark (as root): 1,000 pods, 200 Services and 500 policies created
    /// through a fresh control plane; the controller's time to converge and memory, and an
    /// agent's update latency. Writes target/bench/scale.json.
    Scale,
}

pub fn run_action(root: &Path, action: &Action) -> Result<()> {
    let dir = root.join("target/cluster");
    let dir = dir.to_string_lossy();
    let binary = root.join("target/debug/cluster");
    match action {
        Action::Up => {
            super::kube_tools(root)?;
            cargo(root, &["build", "-p", "mesh-tests", "--bin", "cluster"])?;
            run(
                Command::new(&binary).args(["up", "--dir", &dir]),
                "cluster up",
            )
        }
        Action::Scale => {
            super::kube_tools(root)?;
            cargo(root, &["build", "--bins"])?;
            run(
                Command::new(root.join("target/debug/scale"))
                    .args(["--json"])
                    .arg(root.join("target/bench/scale.json"))
                    .current_dir(root),
                "scale (it needs root: try `sudo -E cargo xtask cluster scale`)",
            )
        }
        Action::Down => {
            cargo(root, &["build", "-p", "mesh-tests", "--bin", "cluster"])?;
            run(
                Command::new(&binary).args(["down", "--dir", &dir]),
                "cluster down",
            )
        }
    }
}
