//! `bench`: the Trellis benchmark (`cargo xtask bench` runs `bench run`).
//!
//! `run` is the orchestrator (as root: it builds a testbed); `serve`, `relay` and `load` are
//! the programs it starts inside the testbed. See [`mesh_tests::bench`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mesh_tests::bench::{load, run, serve};
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "Trellis against no mesh, a userspace relay floor and (HTTP) a waypoint"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build a testbed and run every configuration, round by round (needs root).
    Run {
        /// Short durations: the whole run takes a couple of minutes.
        #[arg(long)]
        quick: bool,
        /// Rounds (default 3, or 2 with --quick).
        #[arg(long)]
        rounds: Option<usize>,
        /// Where to write the JSON report.
        #[arg(long, default_value = "target/bench/latest.json")]
        json: PathBuf,
        /// Only tests whose SCENARIO-TEST name contains this (repeatable), e.g.
        /// `same-node-rr`, `cross-node`, `bulk`, `cross-node-http` (alias `l7`).
        #[arg(long)]
        only: Vec<String>,
        /// Run the Trellis configurations with the same-node fast path on
        /// (`datapath.fast_path: true`).
        #[arg(long)]
        fast_path: bool,
    },
    /// Servers: `--listen ADDR=sink|echo|one|http`, repeatable.
    Serve {
        #[arg(long, required = true)]
        listen: Vec<serve::Listen>,
    },
    /// The relay floor: `--map LISTEN=TARGET`, repeatable.
    Relay {
        #[arg(long, required = true)]
        map: Vec<serve::RelayMap>,
    },
    /// The load generator; prints one JSON object.
    Load {
        #[command(subcommand)]
        kind: Load,
    },
}

#[derive(Subcommand, Debug)]
enum Load {
    /// Throughput to a sink over N streams.
    Bulk {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        streams: usize,
        #[arg(long)]
        secs: f64,
    },
    /// Open-loop request/response against an echo server.
    Rr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = run::RR_CONNS)]
        conns: usize,
        #[arg(long, default_value_t = run::RR_RATE)]
        rate: u64,
        #[arg(long, default_value_t = run::RR_SIZE)]
        size: usize,
        #[arg(long)]
        secs: f64,
    },
    /// Holds N established, silent connections to an echo server for a while.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        secs: f64,
    },
    /// Open-loop HTTP/1.1 GETs against an `http` server (or a path to one).
    Http {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = run::HTTP_CONNS)]
        conns: usize,
        #[arg(long, default_value_t = run::HTTP_RATE)]
        rate: u64,
        #[arg(long)]
        secs: f64,
    },
    /// One GET at a time until one is answered 200, for at most SECS.
    HttpProbe {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        secs: f64,
    },
    /// New connections per second against a `one` server.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = run::CONNECT_LOOPS)]
        conns: usize,
        #[arg(long)]
        secs: f64,
    },
}

fn main() -> ExitCode {
    match main_inner(Cli::parse().command) {
        Ok(Some(value)) => {
            println!("{value}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")
}

fn secs(s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("bad duration {s} s"))
}

/// Runs one command; `Some` is a JSON object to print on stdout.
fn main_inner(command: Command) -> Result<Option<Value>> {
    match command {
        Command::Run {
            quick,
            rounds,
            json,
            only,
            fast_path,
        } => {
            let opts = run::RunOptions {
                quick,
                rounds: rounds.unwrap_or(if quick { 2 } else { 3 }),
                json,
                only,
                fast_path,
            };
            // The table is the output; the JSON went to the file.
            run::run(&opts).map(|_| None)
        }
        Command::Serve { listen } => runtime()?.block_on(serve::serve(listen)).map(|()| None),
        Command::Relay { map } => runtime()?.block_on(serve::relay(map)).map(|()| None),
        Command::Load { kind } => match kind {
            Load::Bulk {
                to,
                streams,
                secs: s,
            } => {
                let d = secs(s)?;
                runtime()?.block_on(load::bulk(to, streams, d)).map(Some)
            }
            Load::Rr {
                to,
                conns,
                rate,
                size,
                secs: s,
            } => load::rr(to, conns, rate, size, secs(s)?).map(Some),
            Load::Connect { to, conns, secs: s } => load::connect(to, conns, secs(s)?).map(Some),
            Load::Hold { to, conns, secs: s } => load::hold(to, conns, secs(s)?).map(Some),
            Load::Http {
                to,
                conns,
                rate,
                secs: s,
            } => load::http(to, conns, rate, secs(s)?).map(Some),
            Load::HttpProbe { to, secs: s } => load::http_probe(to, secs(s)?).map(Some),
        },
    }
}
