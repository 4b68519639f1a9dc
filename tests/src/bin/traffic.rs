//! `traffic`: clients that keep running while a test changes the mesh around them, driven
//! through stdin. Each prints JSON lines on stdout (one per event, flushed per line) so the
//! test can follow along; the exit status is 0 only if nothing failed.
//!
//! * `traffic loop --to ADDR [--interval-ms 20] [--max-ms 300000]`: a new connection and one
//!   HTTP/1.1 GET to a `pod-app` `http` server, again and again until stdin reaches EOF (the
//!   test closes it) or `--max-ms` passes. One line per attempt:
//!   `{"seq":N,"ok":true,"local":"ADDR","peer":"ADDR"}` (`peer`: the client address the
//!   server saw, which tells how the connection travelled) or
//!   `{"seq":N,"ok":false,"local":"ADDR","error":"..."}`; then
//!   `{"done":true,"attempts":N,"failures":F}`.
//! * `traffic hold --to ADDR`: one connection to a `pod-app` `echo` server, kept open.
//!   Prints `{"connected":true,"local":"ADDR"}`; then for each stdin line `ping N` sends N
//!   bytes, reads them back and prints `{"ping":SEQ,"bytes":N,"ok":true}` (or `"ok":false`
//!   with `"error"`); on `close` or EOF half-closes, reads until the server's EOF and prints
//!   `{"closed":true,"clean":BOOL,"sent":N,"received":N,"error":...}`.
//!
//! Every network operation is bounded by timeouts, so a test never waits on a stuck client.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test traffic casts sizes and counts bounded by its own arguments"
)]

use std::{
    io::{BufRead, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Parser, Debug)]
#[command(name = "traffic")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Repeated GETs on new connections until stdin closes.
    Loop {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        /// Upper bound on the whole loop, in case the test never closes stdin.
        #[arg(long, default_value_t = 300_000)]
        max_ms: u64,
    },
    /// One long-lived echo connection, exercised on command.
    Hold {
        #[arg(long)]
        to: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Loop {
            to,
            interval_ms,
            max_ms,
        } => run_loop(
            to,
            Duration::from_millis(interval_ms),
            Duration::from_millis(max_ms),
        ),
        Command::Hold { to } => hold(to),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            emit(&json!({ "error": format!("{e:#}") }));
            ExitCode::from(2)
        }
    }
}

fn emit(value: &Value) {
    let mut out = std::io::stdout().lock();
    // Nothing useful can be done if stdout is gone; the test then sees the exit status.
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

fn connect(to: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to {to}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sets the returned flag once stdin reaches EOF (or fails).
fn watch_stdin() -> Arc<AtomicBool> {
    let closed = Arc::new(AtomicBool::new(false));
    let flag = closed.clone();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().lock().read_to_end(&mut sink);
        flag.store(true, Ordering::Relaxed);
    });
    closed
}

#[allow(
    clippy::unnecessary_wraps,
    reason = "every mode returns the same Result, which main reports"
)]
fn run_loop(to: SocketAddr, interval: Duration, max: Duration) -> Result<bool> {
    let stop = watch_stdin();
    let deadline = Instant::now() + max;
    let (mut attempts, mut failures) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        attempts += 1;
        let mut local = String::new();
        match get(to, &mut local) {
            Ok(peer) => emit(&json!({"seq": attempts, "ok": true, "local": local, "peer": peer})),
            Err(e) => {
                failures += 1;
                emit(
                    &json!({"seq": attempts, "ok": false, "local": local, "error": format!("{e:#}")}),
                );
            }
        }
        std::thread::sleep(interval);
    }
    emit(&json!({"done": true, "attempts": attempts, "failures": failures}));
    Ok(failures == 0)
}

/// One GET on a new connection; returns the client address the server reports.
fn get(to: SocketAddr, local: &mut String) -> Result<String> {
    let mut stream = connect(to)?;
    *local = stream.local_addr()?.to_string();
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {to}\r\nUser-Agent: traffic\r\nConnection: close\r\n\r\n"
    )
    .context("writing request")?;
    let mut response = Vec::new();
    stream
        .take(1024 * 1024)
        .read_to_end(&mut response)
        .context("reading response")?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("incomplete response ({} bytes)", response.len()))?;
    let status = head.split(' ').nth(1).unwrap_or_default();
    if status != "200" {
        bail!("status {status:?}");
    }
    let body: Value = serde_json::from_str(body).context("response body is not JSON")?;
    let peer = body["peer"]
        .as_str()
        .context("response body has no peer")?
        .to_owned();
    Ok(peer)
}

fn hold(to: SocketAddr) -> Result<bool> {
    let mut stream = connect(to)?;
    emit(&json!({"connected": true, "local": stream.local_addr()?.to_string()}));
    let (mut sent, mut received, mut all_ok) = (0u64, 0u64, true);
    let mut seq = 0u64;
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.context("reading stdin")?;
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("ping"), Some(n)) => {
                seq += 1;
                let n: usize = n.parse().with_context(|| format!("bad byte count {n:?}"))?;
                match ping(&mut stream, n) {
                    Ok(()) => {
                        sent += n as u64;
                        received += n as u64;
                        emit(&json!({"ping": seq, "bytes": n, "ok": true}));
                    }
                    Err(e) => {
                        all_ok = false;
                        emit(
                            &json!({"ping": seq, "bytes": n, "ok": false, "error": format!("{e:#}")}),
                        );
                    }
                }
            }
            (Some("close"), _) => break,
            _ => bail!("unknown command {line:?} (ping N | close)"),
        }
    }
    // Half-close, then the echo server's EOF: a clean end on both sides.
    let end = stream
        .shutdown(Shutdown::Write)
        .context("half-closing")
        .and_then(|()| {
            let mut rest = Vec::new();
            (&mut stream)
                .take(1024 * 1024)
                .read_to_end(&mut rest)
                .context("reading to the server's EOF")?;
            if rest.is_empty() {
                Ok(())
            } else {
                bail!("{} unexpected bytes before EOF", rest.len())
            }
        });
    let clean = end.is_ok();
    emit(&json!({
        "closed": true,
        "clean": clean,
        "sent": sent,
        "received": received,
        "error": end.err().map(|e| format!("{e:#}")),
    }));
    Ok(all_ok && clean)
}

/// Sends `n` bytes and reads them back unchanged.
fn ping(stream: &mut TcpStream, n: usize) -> Result<()> {
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    stream.write_all(&data).context("writing")?;
    let mut back = vec![0; n];
    stream.read_exact(&mut back).context("reading the echo")?;
    if back != data {
        bail!("echo differs from what was sent");
    }
    Ok(())
}
