//! `mesh-node`: every Trellis role in one binary.
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_node::config::{AgentConfig, LogFormat};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "mesh-node",
    version,
    about = "Trellis sidecarless service mesh: node roles"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: owns the eBPF datapath, proxies pod traffic over HBONE.
    Agent {
        /// Agent configuration file (YAML).
        #[arg(long, env = "TRELLIS_AGENT_CONFIG")]
        config: PathBuf,
        /// Detach the datapath and remove every pinned map and link, then exit.
        #[arg(long)]
        uninstall: bool,
    },
    /// Run the controller: watches Kubernetes (or a manifest directory), signs workload
    /// certificates and streams the mesh state to every agent.
    Controller {
        /// Controller configuration file (YAML).
        #[arg(long, env = "TRELLIS_CONTROLLER_CONFIG")]
        config: PathBuf,
    },
    /// Run a waypoint: the L7 proxy of the services and pods that use it
    /// (`trellis.dev/use-waypoint`), configured by the controller's stream.
    Waypoint {
        /// Waypoint configuration file (YAML).
        #[arg(long, env = "TRELLIS_WAYPOINT_CONFIG")]
        config: PathBuf,
    },
    /// Prepare the node for the agent (the DaemonSet's init container): mount a bpf
    /// filesystem at `--bpffs` unless one is already there. Safe to run any number of times.
    NodeInit {
        /// Where the agent pins its maps and links; a bpffs is mounted here when absent.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
    /// Print the CustomResourceDefinitions of one API group as YAML, generated from the Rust
    /// types; `cargo xtask crds` writes each group into the Helm chart.
    Crds {
        /// `security.trellis.dev` (the policy kinds) or `traffic.trellis.dev` (TrafficPolicy).
        #[arg(long, default_value = mesh_node::k8s::crds::SECURITY_GROUP)]
        group: String,
    },
    /// Certificate authority utilities.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a new root CA (ca.pem, ca-key.pem) for a trust domain.
    Init {
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Directory to write the files to.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent { config, uninstall } => {
            let config = AgentConfig::load(&config)?;
            init_tracing(config.log_format);
            if uninstall {
                mesh_node::ebpf::uninstall(&config.datapath.pin_dir)?;
                return Ok(());
            }
            raise_fd_limit();
            until_signalled(|shutdown| mesh_node::agent::run(config, shutdown))
        }
        Command::Controller { config } => {
            let config = mesh_node::controller::ControllerConfig::load(&config)?;
            init_tracing(config.log_format);
            until_signalled(|shutdown| mesh_node::controller::run(config, shutdown))
        }
        Command::Waypoint { config } => {
            let config = mesh_node::config::waypoint::WaypointConfig::load(&config)?;
            init_tracing(config.log_format);
            raise_fd_limit();
            until_signalled(|shutdown| mesh_node::waypoint::run(config, shutdown))
        }
        Command::NodeInit { bpffs } => {
            init_tracing(LogFormat::Text);
            node_init(&bpffs)?;
            Ok(())
        }
        Command::Crds { group } => {
            let yaml = mesh_node::k8s::crds::yaml(&group)?;
            // Not `print!`, which panics when the reader of a pipe has gone away.
            std::io::Write::write_all(&mut std::io::stdout().lock(), yaml.as_bytes())
                .context("cannot write the CRDs to standard output")?;
            Ok(())
        }
        Command::Ca {
            command: CaCommand::Init { trust_domain, out },
        } => {
            init_tracing(LogFormat::Text);
            let ca = mesh_node::identity::LocalCa::generate(&trust_domain)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            std::fs::write(out.join("ca.pem"), ca.cert_pem())?;
            write_private(&out.join("ca-key.pem"), &ca.key_pem())?;
            println!(
                "wrote {}/ca.pem and ca-key.pem for trust domain {trust_domain}",
                out.display()
            );
            Ok(())
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum NodeInitError {
    #[error("cannot check the filesystem of {path}: {reason}")]
    Probe { path: PathBuf, reason: String },
    #[error("cannot create {path}: {source} (is the host path mounted writable?)")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot mount bpffs at {path}: {source} (the init container needs CAP_SYS_ADMIN, and \
         mountPropagation: Bidirectional on the host path so the agent and the host see it)"
    )]
    Mount { path: PathBuf, source: nix::Error },
    #[error(
        "mounted bpffs at {path} but it still does not read as bpffs: is {path} a mount point the kernel hides?"
    )]
    NotVisible { path: PathBuf },
}

/// What `node-init` must do for the bpffs path, from what is there now.
#[derive(Debug, PartialEq, Eq)]
enum BpffsPlan {
    /// The path is a directory on a bpffs already: nothing to do (a second run lands here).
    Present,
    /// The path is missing, but its nearest existing ancestor is a bpffs: a directory there
    /// is on that bpffs, so mounting another would only hide pins behind it.
    CreateDir,
    /// No bpffs: mount one (creating the directory first when missing).
    Mount { create_dir: bool },
}

/// `on_bpffs` is for the path when it exists, else for its nearest existing ancestor
/// (as [`mesh_node::ebpf::is_on_bpffs`] answers).
fn plan_bpffs(exists: bool, on_bpffs: bool) -> BpffsPlan {
    match (exists, on_bpffs) {
        (true, true) => BpffsPlan::Present,
        (false, true) => BpffsPlan::CreateDir,
        (exists, false) => BpffsPlan::Mount {
            create_dir: !exists,
        },
    }
}

fn node_init(path: &Path) -> Result<(), NodeInitError> {
    let on_bpffs = |path: &Path| {
        mesh_node::ebpf::is_on_bpffs(path).map_err(|e| NodeInitError::Probe {
            path: path.into(),
            reason: e.to_string(),
        })
    };
    let create_dir = |path: &Path| {
        std::fs::create_dir_all(path).map_err(|source| NodeInitError::CreateDir {
            path: path.into(),
            source,
        })
    };
    match plan_bpffs(path.is_dir(), on_bpffs(path)?) {
        BpffsPlan::Present => {
            tracing::info!(path = %path.display(), "bpffs already mounted");
            return Ok(());
        }
        BpffsPlan::CreateDir => {
            create_dir(path)?;
            tracing::info!(path = %path.display(), "created a directory on the existing bpffs");
            return Ok(());
        }
        BpffsPlan::Mount { create_dir: true } => create_dir(path)?,
        BpffsPlan::Mount { create_dir: false } => {}
    }
    use nix::mount::{MsFlags, mount};
    mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|source| NodeInitError::Mount {
        path: path.into(),
        source,
    })?;
    if !on_bpffs(path)? {
        return Err(NodeInitError::NotVisible { path: path.into() });
    }
    tracing::info!(path = %path.display(), "mounted bpffs");
    Ok(())
}

/// Runs a role on a multi-threaded runtime until it returns; SIGTERM or SIGINT cancels the
/// token it is given, which starts its drain.
fn until_signalled<F, E>(role: impl FnOnce(CancellationToken) -> F) -> anyhow::Result<()>
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(watch_signals(shutdown.clone()));
        role(shutdown).await
    })?;
    Ok(())
}

fn write_private(path: &std::path::Path, contents: &str) -> anyhow::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
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

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt};
    // RUST_LOG, else info; changeable at run time through the admin surface's /logging.
    let initial = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let registry = tracing_subscriber::registry().with(mesh_node::log_level::init(&initial));
    let layer = fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Json => registry
            .with(layer.json().flatten_event(true).with_current_span(false))
            .init(),
        LogFormat::Text => registry.with(layer).init(),
    }
}

/// Proxies hold two descriptors per connection: lift the soft limit to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "cannot raise the file descriptor limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the file descriptor limit"),
    }
}

async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_init_mounts_only_where_no_bpffs_is() {
        assert_eq!(plan_bpffs(true, true), BpffsPlan::Present, "second run");
        assert_eq!(plan_bpffs(false, true), BpffsPlan::CreateDir);
        assert_eq!(
            plan_bpffs(true, false),
            BpffsPlan::Mount { create_dir: false },
            "a plain /sys/fs/bpf directory on sysfs"
        );
        assert_eq!(
            plan_bpffs(false, false),
            BpffsPlan::Mount { create_dir: true }
        );
    }
}
