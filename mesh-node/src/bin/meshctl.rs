//! `meshctl`: look inside a running Trellis agent.
//!
//! Reads the agent's admin endpoint (loopback on the node, port 15000 by default) and prints
//! what it holds as tables: workloads, certificates and their expiry, the datapath.

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

#[derive(Subcommand)]
enum Command {
    /// Summary of the agent: readiness, workloads, certificates, datapath.
    Status,
    /// The agent's full configuration dump as JSON.
    ConfigDump,
    /// The agent's Prometheus metrics.
    Metrics,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Status => print_status(&serde_json::from_str(
            &runtime.block_on(get(cli.admin, "/config_dump"))?,
        )?)?,
        Command::ConfigDump => println!("{}", runtime.block_on(get(cli.admin, "/config_dump"))?),
        Command::Metrics => print!("{}", runtime.block_on(get(cli.admin, "/metrics"))?),
    }
    Ok(())
}

async fn get(addr: SocketAddr, path: &str) -> Result<String> {
    let stream = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .context("timed out connecting to the agent's admin port")?
    .with_context(|| {
        format!(
            "cannot reach the agent's admin port at {addr} (is the agent running on this node?)"
        )
    })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("{path} answered {status}");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn print_status(dump: &Value) -> Result<()> {
    let s = |v: &Value| {
        v.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string())
    };
    println!(
        "node {}  trust domain {}  ready {}",
        s(&dump["node"]),
        s(&dump["trust_domain"]),
        dump["ready"]
    );
    println!("\nWORKLOADS");
    let mut rows = vec![vec![
        "NAMESPACE".into(),
        "NAME".into(),
        "NODE".into(),
        "IPS".into(),
        "IDENTITY".into(),
    ]];
    for w in dump["workloads"].as_array().into_iter().flatten() {
        let ips = w["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect::<Vec<_>>()
            .join(",");
        rows.push(vec![
            s(&w["namespace"]),
            s(&w["name"]),
            s(&w["node"]),
            ips,
            s(&w["identity"]),
        ]);
    }
    print_table(&rows);
    println!("\nCERTIFICATES");
    let mut rows = vec![vec!["IDENTITY".into(), "EXPIRES IN".into()]];
    for c in dump["certificates"].as_array().into_iter().flatten() {
        let secs = c["expires_in_secs"].as_u64().unwrap_or(0);
        rows.push(vec![
            s(&c["identity"]),
            format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        ]);
    }
    print_table(&rows);
    if let Some(dp) = dump["datapath"].as_object() {
        println!("\nDATAPATH  pinned at {}", s(&dp["pin_dir"]));
        let events = dp["events"].as_object().map(|e| {
            e.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        });
        println!(
            "enrolled cgroups: {}",
            dp["enrolled_cgroups"].as_array().map_or(0, Vec::len)
        );
        println!("events: {}", events.unwrap_or_default());
    }
    Ok(())
}

fn print_table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<width$}", width = widths[i]))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}
