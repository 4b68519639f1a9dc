//! `mesh-node`: every Trellis role in one binary.
use std::path::PathBuf;

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
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                tokio::spawn(watch_signals(shutdown.clone()));
                mesh_node::agent::run(config, shutdown).await
            })?;
            Ok(())
        }
        Command::Controller { config } => {
            let config = mesh_node::controller::ControllerConfig::load(&config)?;
            init_tracing(config.log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                tokio::spawn(watch_signals(shutdown.clone()));
                mesh_node::controller::run(config, shutdown).await
            })?;
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
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.init(),
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
