//! `bench`: the Trellis benchmark (`cargo xtask bench` runs `bench run`).
//!
//! `run` is the orchestrator (as root: it builds a testbed); `serve`, `relay` and `load` are
//! the programs it starts inside the testbed. See [`mesh_tests::bench`].

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mesh_tests::bench::{catalog, load, peer, run, serve};
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
        /// Only tests whose SCENARIO-TEST name is this, or else contains it (repeatable),
        /// e.g. `same-node-rr` (that test alone), `cross-node`, `bulk`, `rev`,
        /// `cross-node-http` (alias `l7`).
        #[arg(long)]
        only: Vec<String>,
        /// Another node proxy as one more configuration: a command template started in each
        /// node's namespace, split on whitespace, with placeholders {bench}, {node}, {index},
        /// {lan_ip}, {gateway_ip}, {peer_lan_ip}, {pod_cgroup} and {maps} (see the `peer`
        /// module), e.g. `--peer '{bench} relay {maps}' --peer-dial relay`.
        #[arg(long)]
        peer: Option<String>,
        /// Where the client dials in the peer configuration: `direct` (the server pod; the
        /// peer intercepts) or `relay` (the relay floor's addresses on the client's node).
        #[arg(long, default_value = "direct")]
        peer_dial: peer::Dial,
    },
    /// Servers: `--listen ADDR=sink|source|echo|one|http`, repeatable.
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
    /// Throughput to a sink over N streams, or with --reverse from a source.
    Bulk {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// Server to client: read from a `source` server.
        #[arg(long)]
        reverse: bool,
        #[arg(long)]
        secs: f64,
    },
    /// Closed-loop ping-pong on one connection to an echo server.
    Pingpong {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = catalog::PINGPONG_SIZE)]
        size: usize,
        #[arg(long)]
        secs: f64,
    },
    /// One 1-byte echo at a time against a `one` server until one completes, for at most SECS.
    Probe {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        secs: f64,
    },
    /// Open-loop request/response against an echo server.
    Rr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = catalog::RR_CONNS)]
        conns: usize,
        #[arg(long, default_value_t = catalog::RR_RATE)]
        rate: u64,
        #[arg(long, default_value_t = catalog::RR_SIZE)]
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
        #[arg(long, default_value_t = catalog::HTTP_CONNS)]
        conns: usize,
        #[arg(long, default_value_t = catalog::HTTP_RATE)]
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
        #[arg(long, default_value_t = catalog::CONNECT_LOOPS)]
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
            peer,
            peer_dial,
        } => {
            let peer = peer.map(|p| peer::Peer::new(&p, peer_dial)).transpose()?;
            let opts = run::RunOptions {
                quick,
                rounds: rounds.unwrap_or(if quick { 2 } else { 3 }),
                json,
                only,
                peer,
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
                reverse,
                secs: s,
            } => {
                let d = secs(s)?;
                if reverse {
                    runtime()?
                        .block_on(load::bulk_reverse(to, streams, d))
                        .map(Some)
                } else {
                    runtime()?.block_on(load::bulk(to, streams, d)).map(Some)
                }
            }
            Load::Pingpong { to, size, secs: s } => load::pingpong(to, size, secs(s)?).map(Some),
            Load::Probe { to, secs: s } => load::probe(to, secs(s)?).map(Some),
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
