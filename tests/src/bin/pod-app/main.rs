//! `pod-app`: the workload that runs in testbed pods.
//!
//! Servers (`serve`) run until killed. After binding every listener they print one line
//! `{"listening":"ADDR","listeners":[{"addr":"ADDR","mode":"MODE"},...]}` on stdout (real
//! ports, so `:0` works), which is what callers wait for. Each `--listen` takes
//! `ADDR[=MODE]`; a listener without `=MODE` uses `--mode` (default `echo`). Example:
//! `pod-app serve --listen [::]:8080=http --listen [::]:9000=echo`. Modes:
//!
//! * `echo`: send back every byte until the peer's EOF, then shut down writing.
//! * `sink`: read to EOF, then write `{"bytes":N,"sha256":"HEX","peer":"ADDR"}\n` and close.
//! * `source`: read a line with a decimal count N, write N bytes of the pattern, shut down
//!   writing, wait for the peer's EOF, close.
//! * `http`: answer one HTTP/1.1 request with 200 and a JSON body
//!   `{"server","peer","path","method","headers"}`, `Connection: close`.
//! * `l7`: HTTP/1.1 with keep-alive and HTTP/2 with prior knowledge on the same port, plus
//!   the gRPC health service; the path picks the answer (`/status/<code>`, `/delay/<ms>`,
//!   `/flaky/<key>/<n>`, `/_seen`, anything else: 200 with the request as JSON). Each
//!   connection is shut down gracefully after `--timeout-ms`. See `server/l7.rs`.
//!
//! Clients: `send`, `fetch`, `echo` and `many` against the byte servers above (`moved-send`:
//! `send` from a socket created in another cgroup than the one connecting it);
//! `abort-connects` (connects closed before their handshake can end); `http-get`
//! (one HTTP/1.1 GET); `peername`; `requests` (N HTTP/1.1 or HTTP/2 requests over keep-alive
//! connections, tallied as `{"sent","statuses","servers","errors","first_error","last",...}`,
//! see `client/requests.rs`); `grpc` (a health `Check` and optional `Watch`, printing
//! `{"check","watched","statuses","ok"}`); `end-watch` and `end-stream` (the two sides of
//! one transfer, each reporting how its connection ended, `fin` or `reset`, or resetting it
//! itself; see `ends.rs`).
//!
//! Clients print ONE JSON object on stdout when done. Exit status: 0 when the operation
//! completed and verified, 1 when it completed but verification failed (`"ok": false`, or
//! `"failed" > 0` for `many`), 2 on an error (the object then has an `"error"` field).
//! `requests` exits 0 whenever it ran: failed requests are in its tally (it reports what it
//! has when `--timeout-ms` runs out, with `"timed_out": true`). `grpc` exits 2 on any gRPC
//! error, with `"error": "Check: gRPC status Unavailable (14): ..."`, and 1 if the `Watch`
//! stream ended before N messages.
//! Every operation (and each server connection) is bounded by `--timeout-ms` (default 30000).
//! Byte counts accept a binary suffix: `64K`, `256M`, `1G`.
//! Addresses in the output are canonical (`10.0.0.1:80`, not `[::ffff:10.0.0.1]:80`).
//! The payload is [`mesh_tests::pattern`], so tests can compute expected hashes.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test traffic casts sizes and counts bounded by its own arguments"
)]

mod client;
mod ends;
#[cfg(test)]
mod l7_tests;
mod server;

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use serde_json::{Map, Value, json};

/// The Trellis testbed workload.
#[derive(Parser, Debug)]
#[command(name = "pod-app")]
struct Cli {
    /// Bound on the whole client operation, or on each server connection.
    #[arg(long, global = true, default_value_t = 30_000)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run servers until killed.
    Serve(server::ServeArgs),
    /// Send N pattern bytes to a `sink` server and report both hashes.
    Send {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, value_parser = parse_size)]
        bytes: u64,
        /// Write this string at every 64 KiB of the stream (findable in packet captures).
        #[arg(long)]
        marker: Option<String>,
    },
    /// `send`, on a socket created here and connected after this process moved itself to
    /// another cgroup (writing its pid to `CGROUP/cgroup.procs`). Adds `created_in` and
    /// `connected_from` (cgroup paths) to the report.
    MovedSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        cgroup: std::path::PathBuf,
        #[arg(long, value_parser = parse_size)]
        bytes: u64,
    },
    /// N non-blocking connects, each socket closed as soon as connect() returns; tallies
    /// `{"attempts","in_progress","connected","errors"}`.
    AbortConnects {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: u64,
    },
    /// Accept one connection and read it to its end (or abort it after N bytes); report how
    /// it ended: `fin`, `reset`, `aborted` (see `ends.rs`).
    EndWatch {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, value_parser = parse_size)]
        abort_after: Option<u64>,
    },
    /// Connect and write without pause until the connection ends (or abort it after N bytes);
    /// report how it ended (see `ends.rs`).
    EndStream {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, value_parser = parse_size)]
        abort_after: Option<u64>,
    },
    /// Ask a `source` server for N bytes and hash what arrives.
    Fetch {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, value_parser = parse_size)]
        bytes: u64,
    },
    /// Send N bytes to an `echo` server and check they come back unchanged.
    Echo {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, value_parser = parse_size)]
        bytes: u64,
    },
    /// One HTTP/1.1 GET.
    HttpGet {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        /// Host header (default: the --to address).
        #[arg(long)]
        host: Option<String>,
        /// Extra request header `Name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
    },
    /// Many concurrent echo connections.
    Many {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        connections: usize,
        #[arg(long, value_parser = parse_size, default_value = "1024")]
        bytes: u64,
        /// Connections open at once (default: all of them).
        #[arg(long)]
        concurrency: Option<usize>,
    },
    /// Open up to N connections and hold them without sending, then report how many are
    /// still open and how many the other end reset or closed.
    Hoard {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        connections: usize,
        /// How long to hold them before checking.
        #[arg(long, default_value_t = 2_000)]
        hold_ms: u64,
    },
    /// One TCP SYN on a raw socket (bypassing connect() and so any redirect), and what came
    /// back: `syn-ack`, `rst` or `none`.
    RawSyn {
        #[arg(long)]
        to: SocketAddr,
    },
    /// Connect and report the local address and the peer name the socket sees.
    Peername {
        #[arg(long)]
        to: SocketAddr,
    },
    /// N HTTP requests over keep-alive connections (HTTP/1.1, or HTTP/2 with --http2).
    Requests(client::requests::RequestsArgs),
    /// Hostile HTTP, byte by byte (see `client/attack.rs`); reports what came back.
    Attack {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, value_enum)]
        kind: client::attack::Kind,
        /// The request bytes of `--kind raw`.
        #[arg(long)]
        request: Option<String>,
    },
    /// gRPC health Check of a service, and with --watch N a Watch reading N messages.
    Grpc {
        #[arg(long)]
        to: SocketAddr,
        /// The service to check (`""`: the server as a whole).
        #[arg(long, default_value = "")]
        service: String,
        /// Also Watch the service and read this many messages.
        #[arg(long)]
        watch: Option<usize>,
    },
}

fn main() -> ExitCode {
    raise_nofile_limit();
    let cli = Cli::parse();
    let timeout = Duration::from_millis(cli.timeout_ms);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report_error(&anyhow::Error::new(e).context("starting tokio")),
    };
    match runtime.block_on(run(cli.command, timeout)) {
        Ok((value, ok)) => {
            println!("{value}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => report_error(&e),
    }
}

fn report_error(e: &anyhow::Error) -> ExitCode {
    println!("{}", json!({ "error": format!("{e:#}") }));
    ExitCode::from(2)
}

/// Runs one command. Returns the JSON to print and whether verification passed.
async fn run(command: Command, timeout: Duration) -> Result<(Value, bool)> {
    let bounded = |what: String| move |_| anyhow::anyhow!("{what} timed out after {timeout:?}");
    match command {
        Command::Serve(args) => server::serve(args, timeout)
            .await
            .map(|()| (json!({}), true)),
        // `many` keeps its own deadline so it can report partial results.
        Command::Many {
            to,
            connections,
            bytes,
            concurrency,
        } => client::many(to, connections, bytes, concurrency, timeout).await,
        Command::Send { to, bytes, marker } => {
            tokio::time::timeout(timeout, client::send(to, bytes, marker.as_deref()))
                .await
                .map_err(bounded(format!("send to {to}")))?
        }
        Command::MovedSend { to, cgroup, bytes } => {
            tokio::time::timeout(timeout, client::moved_send(to, &cgroup, bytes))
                .await
                .map_err(bounded(format!("send to {to} from {}", cgroup.display())))?
        }
        Command::AbortConnects { to, count } => client::abort_connects(to, count),
        // Both keep their own deadline, reported as the `timeout` end.
        Command::EndWatch {
            listen,
            abort_after,
        } => ends::watch(listen, abort_after, timeout).await,
        Command::EndStream { to, abort_after } => ends::stream(to, abort_after, timeout).await,
        Command::Fetch { to, bytes } => tokio::time::timeout(timeout, client::fetch(to, bytes))
            .await
            .map_err(bounded(format!("fetch from {to}")))?,
        Command::Echo { to, bytes } => tokio::time::timeout(timeout, client::echo(to, bytes))
            .await
            .map_err(bounded(format!("echo with {to}")))?,
        Command::HttpGet {
            to,
            path,
            host,
            headers,
        } => tokio::time::timeout(
            timeout,
            client::http_get(to, &path, host.as_deref(), &headers),
        )
        .await
        .map_err(bounded(format!("GET {path} from {to}")))?,
        Command::Hoard {
            to,
            connections,
            hold_ms,
        } => tokio::time::timeout(
            timeout,
            client::hoard(to, connections, Duration::from_millis(hold_ms)),
        )
        .await
        .map_err(bounded(format!("hoard of {to}")))?,
        Command::RawSyn { to } => {
            let wait = timeout;
            tokio::task::spawn_blocking(move || client::raw_syn::raw_syn(to, wait))
                .await
                .context("raw-syn task")?
        }
        Command::Peername { to } => tokio::time::timeout(timeout, client::peername(to))
            .await
            .map_err(bounded(format!("connect to {to}")))?,
        // `requests` keeps its own deadline so it can report partial results.
        Command::Requests(args) => client::requests::requests(args, timeout).await,
        // `attack` keeps its own deadline so it can report what came back until then.
        Command::Attack { to, kind, request } => {
            client::attack::attack(to, kind, request, timeout).await
        }
        Command::Grpc { to, service, watch } => {
            tokio::time::timeout(timeout, client::grpc::grpc(to, &service, watch, timeout))
                .await
                .map_err(bounded(format!("gRPC health of {service:?} at {to}")))?
        }
    }
}

/// Lets `many` open thousands of sockets: the soft limit is often 1024 while the hard limit
/// is much higher.
fn raise_nofile_limit() {
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        eprintln!("pod-app: raising RLIMIT_NOFILE to {hard}: {e}");
    }
}

/// Parses `123`, `64K`, `256M`, `1G` (binary multiples).
fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 10),
        Some((i, 'm' | 'M')) => (&s[..i], 20),
        Some((i, 'g' | 'G')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .with_context(|| format!("bad byte count {s:?}"))?;
    n.checked_mul(1 << shift)
        .with_context(|| format!("byte count {s:?} too large"))
}

/// HTTP headers as a JSON object: lower-case names, repeated headers joined with `, `,
/// non-UTF-8 bytes replaced.
pub(crate) fn headers_json(headers: &http::HeaderMap) -> Map<String, Value> {
    let mut map = Map::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        let joined = match map.get(name.as_str()).and_then(Value::as_str) {
            Some(prev) => format!("{prev}, {value}"),
            None => value.into_owned(),
        };
        map.insert(name.as_str().to_owned(), Value::String(joined));
    }
    map
}

/// `addr` with an IPv4-mapped IPv6 address turned back into IPv4.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("0").ok(), Some(0));
        assert_eq!(parse_size("1000").ok(), Some(1000));
        assert_eq!(parse_size("64K").ok(), Some(65_536));
        assert_eq!(parse_size("256M").ok(), Some(256 << 20));
        assert_eq!(parse_size("1g").ok(), Some(1 << 30));
        assert!(parse_size("x").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn mapped_addresses_become_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:80".parse().expect("addr");
        assert_eq!(canonical(mapped).to_string(), "10.1.2.3:80");
        let v6: SocketAddr = "[fd00::1]:80".parse().expect("addr");
        assert_eq!(canonical(v6), v6);
    }
}
