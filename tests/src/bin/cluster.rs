//! `cluster`: a real Kubernetes control plane on this machine's loopback, for `cargo xtask
//! cluster up|down` (see `mesh_tests::cluster`).
//!
//! - `cluster up [--dir DIR]`: starts etcd, kube-apiserver and kube-controller-manager, waits
//!   until they serve, prints the admin kubeconfig's path and leaves them running.
//! - `cluster down [--dir DIR]`: stops what `up` started there and removes the directory.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use mesh_tests::cluster::{Cluster, ClusterOptions, Tools};

#[derive(Parser)]
#[command(name = "cluster", about = "A Kubernetes control plane on loopback")]
struct Cli {
    #[command(subcommand)]
    command: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Start the control plane and leave it running.
    Up {
        /// State directory (certificates, etcd data, logs, kubeconfig).
        #[arg(long, default_value_os_t = default_dir())]
        dir: PathBuf,
    },
    /// Stop the control plane `up` started and remove its state directory.
    Down {
        #[arg(long, default_value_os_t = default_dir())]
        dir: PathBuf,
    },
}

fn default_dir() -> PathBuf {
    std::env::temp_dir().join("trellis-cluster")
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Action::Up { dir } => {
            if dir.join("pids").exists() {
                anyhow::bail!(
                    "a cluster is already up in {} (`cargo xtask cluster down` first)",
                    dir.display()
                );
            }
            let tools = Tools::find()?;
            let cluster = Cluster::start(
                tools,
                ClusterOptions {
                    dir: Some(dir),
                    ..ClusterOptions::default()
                },
            )?;
            let server = cluster.server().to_owned();
            let kubeconfig = cluster.kubeconfig();
            let dir = cluster.detach()?;
            println!("the API server is ready at {server}");
            println!("export KUBECONFIG={}", kubeconfig.display());
            println!(
                "logs in {}/logs; stop it with `cargo xtask cluster down`",
                dir.display()
            );
            Ok(())
        }
        Action::Down { dir } => {
            Cluster::down(&dir)?;
            println!("stopped the cluster in {}", dir.display());
            Ok(())
        }
    }
}
