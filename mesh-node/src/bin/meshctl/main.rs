//! `meshctl`: look inside a running Trellis agent.
//!
//! Reads the agent's admin endpoint (loopback on the node, port 15000 by default) and prints
//! what it holds as tables: workloads, services, certificates and their expiry, the control
//! plane feed and the datapath. Pointed at a waypoint's admin endpoint, it also shows the
//! waypoint's routes and traffic policies. `meshctl waypoint generate` prints the objects that
//! deploy a waypoint. Pointed at the controller's monitoring port (`--controller`), it lists
//! the connected proxies and the versions they run and hold (`proxy-status`, `version`).

mod fleet;
mod l7;
mod manifests;
mod tables;

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Inspect Trellis agents")]
struct Cli {
    /// The agent's admin address.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:15000",
        env = "TRELLIS_ADMIN"
    )]
    admin: SocketAddr,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Summary of the agent: readiness, control plane feed, counts, datapath.
    Status,
    /// Every workload the agent knows, and whether it is in the mesh.
    Workloads,
    /// Services: virtual IPs, ports and endpoints.
    Services,
    /// Certificates held for local workloads, with expiry and renewal.
    Certs,
    /// The agent's full configuration dump as JSON.
    ConfigDump,
    /// Without --pre: checks the installed mesh (the API server's CRDs and Nodes through the
    /// kubeconfig, the controller and every node's agent through the controller). With --pre:
    /// checks this node: kernel, cgroup v2, bpffs, capabilities, eBPF programs, conflicts.
    Check {
        /// Pre-installation checks (run on the node, as the agent would run).
        #[arg(long)]
        pre: bool,
        /// The controller's monitoring address (loopback: `kubectl port-forward`).
        #[arg(long, env = "TRELLIS_CONTROLLER", default_value = "127.0.0.1:15014")]
        controller: SocketAddr,
        /// The cgroup v2 root the agent attaches to.
        #[arg(long, default_value = "/sys/fs/cgroup")]
        cgroup_root: std::path::PathBuf,
        /// The agent's pin directory (on bpffs).
        #[arg(long, default_value = "/sys/fs/bpf/trellis")]
        pin_dir: std::path::PathBuf,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// The agent's Prometheus metrics.
    Metrics,
    /// The agent's log filter; with FILTER (e.g. `debug`, `info,mesh_node::proxy=debug`),
    /// replaces it at once, without a restart.
    LogLevel { filter: Option<String> },
    /// Every agent and waypoint connected to the controller: its build, and whether it holds
    /// the controller's current state.
    ProxyStatus {
        /// The controller's monitoring address (loopback: `kubectl port-forward`).
        #[arg(long, env = "TRELLIS_CONTROLLER", default_value = "127.0.0.1:15014")]
        controller: SocketAddr,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// The versions of meshctl, the agent (`--admin`) and, with `--controller`, the controller
    /// and every proxy connected to it.
    Version {
        #[arg(long, env = "TRELLIS_CONTROLLER")]
        controller: Option<SocketAddr>,
    },
    /// Authorization policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// A waypoint's HTTPRoutes and GRPCRoutes: how each parent takes them.
    Routes,
    /// A waypoint's TrafficPolicies, and whether each applies.
    TrafficPolicies,
    /// Waypoints: generate the objects that deploy one.
    #[command(subcommand)]
    Waypoint(WaypointCommand),
}

#[derive(Subcommand)]
enum WaypointCommand {
    /// Prints (YAML, for `kubectl apply -f -`) a Gateway of class trellis-waypoint and the
    /// ServiceAccount, ConfigMap and Deployment that run it.
    Generate {
        /// The Gateway's namespace.
        #[arg(long, short = 'n')]
        namespace: String,
        /// The Gateway's name.
        #[arg(long, default_value = "waypoint")]
        name: String,
        /// The service account (the waypoint's identity); by default the Gateway's name.
        #[arg(long)]
        service_account: Option<String>,
        /// The mesh's root certificate, PEM: `kubectl get configmap trellis-ca-root -n
        /// trellis-system -o jsonpath='{.data.root-cert\.pem}'`.
        #[arg(long)]
        root_cert: std::path::PathBuf,
        #[arg(long, default_value = concat!("ghcr.io/trellis-mesh/mesh-node:", env!("CARGO_PKG_VERSION")))]
        image: String,
        #[arg(long, default_value_t = 1)]
        replicas: i32,
        /// The namespace Trellis is installed in: its controller, and the policies that apply
        /// mesh-wide.
        #[arg(long, default_value = "trellis-system")]
        mesh_namespace: String,
        /// The controller's address; by default its Service in the mesh namespace.
        #[arg(long)]
        controller: Option<String>,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// The verdict for a flow, decided by the agent's own engine over its current state,
    /// and the policy and rule that decided it.
    Explain {
        /// Source: a pod, NAMESPACE/NAME, or the IP address of a caller outside the mesh.
        #[arg(long)]
        from: String,
        /// Destination pod and port: NAMESPACE/NAME:PORT.
        #[arg(long)]
        to: String,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Every policy the agent enforces, and whether it is enforced as written.
    List,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dump = || -> Result<Value> {
        let text = runtime.block_on(get(cli.admin, "/config_dump"))?;
        serde_json::from_str(&text).context("the agent's config dump is not JSON")
    };
    match &cli.command {
        Command::Status => print!("{}", tables::status(&dump()?)),
        Command::Workloads => print!("{}", tables::workloads(&dump()?)),
        Command::Services => print!("{}", tables::services(&dump()?)),
        Command::Certs => print!("{}", tables::certificates(&dump()?)),
        Command::Check {
            pre,
            controller,
            cgroup_root,
            pin_dir,
            output,
        } => {
            let report = if *pre {
                mesh_node::check::run(&mesh_node::check::Environment {
                    cgroup_root: cgroup_root.clone(),
                    pin_dir: pin_dir.clone(),
                    proc_root: "/proc".into(),
                    probe_programs: true,
                })
            } else {
                let facts = runtime.block_on(fleet::cluster_facts(*controller))?;
                mesh_node::check::cluster::judge(&facts)
            };
            match output {
                Output::Text => print!("{}", report.text()),
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            if report.failed() {
                // The report said why; the exit status is for scripts.
                std::process::exit(1);
            }
        }
        Command::ConfigDump => println!("{}", runtime.block_on(get(cli.admin, "/config_dump"))?),
        Command::Metrics => print!("{}", runtime.block_on(get(cli.admin, "/metrics"))?),
        Command::LogLevel { filter } => {
            let text = match filter {
                None => runtime.block_on(get(cli.admin, "/logging"))?,
                Some(filter) => {
                    let query: String = form_urlencoded::Serializer::new(String::new())
                        .append_pair("level", filter)
                        .finish();
                    runtime.block_on(call(
                        http::Method::POST,
                        cli.admin,
                        &format!("/logging?{query}"),
                    ))?
                }
            };
            let answer: Value = serde_json::from_str(&text).context("not JSON")?;
            println!("{}", answer["level"].as_str().unwrap_or_default());
        }
        Command::ProxyStatus { controller, output } => {
            let listing = fleet::proxies(&runtime.block_on(get(*controller, "/debug/proxies"))?)?;
            match output {
                Output::Text => print!("{}", fleet::status_table(&listing)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&listing)?),
            }
        }
        Command::Version { controller } => {
            let agent = runtime.block_on(get(cli.admin, "/version"));
            let fleet = match controller {
                Some(addr) => Some(fleet::proxies(
                    &runtime.block_on(get(*addr, "/debug/proxies"))?,
                )?),
                None => None,
            };
            print!("{}", fleet::versions(agent.ok().as_deref(), fleet.as_ref()));
        }
        Command::Policy(PolicyCommand::List) => print!("{}", tables::policies(&dump()?)),
        Command::Routes => print!("{}", l7::routes(&dump()?)),
        Command::TrafficPolicies => print!("{}", l7::traffic_policies(&dump()?)),
        Command::Waypoint(WaypointCommand::Generate {
            namespace,
            name,
            service_account,
            root_cert,
            image,
            replicas,
            mesh_namespace,
            controller,
            trust_domain,
        }) => {
            let root_cert_pem = std::fs::read_to_string(root_cert)
                .with_context(|| format!("reading the root certificate {}", root_cert.display()))?;
            let spec = manifests::WaypointSpec {
                namespace: namespace.clone(),
                name: name.clone(),
                service_account: service_account.clone().unwrap_or_else(|| name.clone()),
                image: image.clone(),
                replicas: *replicas,
                trust_domain: trust_domain.clone(),
                controller: controller
                    .clone()
                    .unwrap_or_else(|| format!("trellis-controller.{mesh_namespace}.svc:15012")),
                root_namespace: mesh_namespace.clone(),
                root_cert_pem,
            };
            let objects = manifests::generate(&spec)?;
            for object in objects {
                print!("---\n{}", serde_saphyr::to_string(&object)?);
            }
        }
        Command::Policy(PolicyCommand::Explain { from, to, output }) => {
            let query: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("from", from)
                .append_pair("to", to)
                .finish();
            let text = runtime.block_on(get(cli.admin, &format!("/policy/explain?{query}")))?;
            let explanation: Value =
                serde_json::from_str(&text).context("the agent's explanation is not JSON")?;
            match output {
                Output::Text => print!("{}", tables::explanation(&explanation)),
                // One line, for scripts and `jq`.
                Output::Json => println!("{explanation}"),
            }
        }
    }
    Ok(())
}

async fn get(addr: SocketAddr, path: &str) -> Result<String> {
    call(http::Method::GET, addr, path).await
}

async fn call(method: http::Method, addr: SocketAddr, path: &str) -> Result<String> {
    let stream = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .with_context(|| format!("timed out connecting to {addr}"))?
    .with_context(|| {
        format!("cannot reach {addr} (the agent's admin port is on its node's loopback; the controller's monitoring port needs `kubectl port-forward`)")
    })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "{path} answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}
