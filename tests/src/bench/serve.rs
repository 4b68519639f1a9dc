//! The bench's servers and the relay floor, each a tokio process started by the orchestrator.
//!
//! Servers are deliberately cheaper than anything they measure (no hashing, large reads):
//! - `sink`: read to EOF, answer with the byte count (8 bytes, little endian), close;
//! - `source`: write as fast as the connection takes until the client closes it (the reverse
//!   bulk tests: the client counts what arrives);
//! - `echo`: send every byte back until EOF, then shut down writing;
//! - `one`: echo one byte and close at once, so the server side closes first and the client
//!   never holds a port in TIME_WAIT during the connection-rate run;
//! - `http`: HTTP/1.1 (hyper, keep-alive, pipelined requests answered in order): every request
//!   gets `200` with a fixed [`HTTP_BODY`]-byte body from one shared buffer.
//!
//! The relay is the floor any userspace proxy pays: accept, dial, `copy_bidirectional` with
//! the same maximum buffer size as Trellis (256 KiB), no TLS, no framing.

use std::{net::SocketAddr, str::FromStr, time::Duration};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Read buffer of the sink and echo servers.
const BUF: usize = 256 * 1024;
/// The relay's copy buffers, per direction (Trellis's largest copy buffer).
const RELAY_BUF: usize = 256 * 1024;
/// A connection idle this long is dropped, so nothing lingers if a client vanishes.
const IDLE: Duration = Duration::from_mins(2);
/// How long the relay waits for its upstream to accept.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Body size of every `http` response: a small response, 1 KiB.
pub const HTTP_BODY: usize = 1024;
/// Largest request head the `http` server reads (hyper's smallest allowed buffer).
const HTTP_MAX_HEAD: usize = 8192;

/// What a server listener does with each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Sink,
    Source,
    Echo,
    One,
    Http,
}

/// `ADDR=MODE` for [`serve`].
#[derive(Clone, Debug)]
pub struct Listen {
    pub addr: SocketAddr,
    pub mode: Mode,
}

impl FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, mode) = s
            .rsplit_once('=')
            .ok_or_else(|| format!("expected ADDR=MODE, got {s:?}"))?;
        let mode = match mode {
            "sink" => Mode::Sink,
            "source" => Mode::Source,
            "echo" => Mode::Echo,
            "one" => Mode::One,
            "http" => Mode::Http,
            other => {
                return Err(format!(
                    "unknown mode {other:?} (sink, source, echo, one, http)"
                ));
            }
        };
        let addr = addr
            .parse()
            .map_err(|e| format!("bad address {addr:?}: {e}"))?;
        Ok(Self { addr, mode })
    }
}

/// `LISTEN=TARGET` for [`relay`].
#[derive(Clone, Debug)]
pub struct RelayMap {
    pub listen: SocketAddr,
    pub target: SocketAddr,
}

impl FromStr for RelayMap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (listen, target) = s
            .split_once('=')
            .ok_or_else(|| format!("expected LISTEN=TARGET, got {s:?}"))?;
        let parse = |a: &str| {
            a.parse::<SocketAddr>()
                .map_err(|e| format!("bad address {a:?}: {e}"))
        };
        Ok(Self {
            listen: parse(listen)?,
            target: parse(target)?,
        })
    }
}

/// Binds every listener, prints `{"listening": true}` and serves until killed.
pub async fn serve(listens: Vec<Listen>) -> Result<()> {
    let mut listeners = Vec::new();
    for l in &listens {
        let listener = TcpListener::bind(l.addr)
            .await
            .with_context(|| format!("binding {}", l.addr))?;
        listeners.push((listener, l.mode));
    }
    println!("{}", json!({"listening": true}));
    // Built once: every response body is a cheap clone of the same bytes.
    let body = Bytes::from(vec![b'x'; HTTP_BODY]);
    let mut tasks = tokio::task::JoinSet::new();
    for (listener, mode) in listeners {
        let body = body.clone();
        tasks.spawn(async move {
            loop {
                let (conn, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors and the like: keep serving the others.
                        eprintln!("bench serve: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let body = body.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(conn, mode, body).await {
                        eprintln!("bench serve ({mode:?}): {e:#}");
                    }
                });
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    bail!("every listener stopped")
}

async fn handle(mut conn: TcpStream, mode: Mode, body: Bytes) -> Result<()> {
    conn.set_nodelay(true)?;
    match mode {
        Mode::Http => serve_http(conn, body).await?,
        Mode::Sink => {
            let mut buf = vec![0u8; BUF];
            let mut total: u64 = 0;
            loop {
                let n = idle(conn.read(&mut buf)).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            conn.write_all(&total.to_le_bytes()).await?;
            conn.shutdown().await?;
        }
        Mode::Source => source(conn).await?,
        Mode::Echo => {
            let mut buf = vec![0u8; BUF];
            loop {
                let n = idle(conn.read(&mut buf)).await?;
                if n == 0 {
                    break;
                }
                conn.write_all(&buf[..n]).await?;
            }
            conn.shutdown().await?;
        }
        Mode::One => {
            let mut b = [0u8; 1];
            idle(conn.read_exact(&mut b)).await?;
            conn.write_all(&b).await?;
            // Dropping closes: the server side takes the TIME_WAIT.
        }
    }
    Ok(())
}

/// Writes until the client goes away: its close (reset or broken pipe) is the normal end.
async fn source(mut conn: TcpStream) -> Result<()> {
    let buf = vec![0xa5u8; BUF];
    loop {
        match idle(conn.write_all(&buf)).await {
            Ok(()) => {}
            Err(e)
                if e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                    matches!(
                        io.kind(),
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                    )
                }) =>
            {
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}

/// HTTP/1.1 on one connection until the client closes it (or stays silent for [`IDLE`]).
async fn serve_http(conn: TcpStream, body: Bytes) -> Result<()> {
    let service = hyper::service::service_fn(move |_req| {
        let body = body.clone();
        async move {
            let mut response = hyper::Response::new(Full::new(body));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(IDLE)
        .max_buf_size(HTTP_MAX_HEAD)
        .keep_alive(true)
        .serve_connection(TokioIo::new(conn), service)
        .await
        .context("serving HTTP/1.1")
}

async fn idle<T>(fut: impl Future<Output = std::io::Result<T>>) -> Result<T> {
    Ok(tokio::time::timeout(IDLE, fut)
        .await
        .context("connection idle too long")??)
}

/// Relays every `map.listen` to `map.target`; prints `{"listening": true}` once bound.
pub async fn relay(maps: Vec<RelayMap>) -> Result<()> {
    let mut listeners = Vec::new();
    for m in &maps {
        let listener = TcpListener::bind(m.listen)
            .await
            .with_context(|| format!("binding {}", m.listen))?;
        listeners.push((listener, m.target));
    }
    println!("{}", json!({"listening": true}));
    let mut tasks = tokio::task::JoinSet::new();
    for (listener, target) in listeners {
        tasks.spawn(async move {
            loop {
                let (conn, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("bench relay: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                tokio::spawn(async move {
                    if let Err(e) = relay_one(conn, target).await {
                        eprintln!("bench relay to {target}: {e:#}");
                    }
                });
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    bail!("every relay listener stopped")
}

async fn relay_one(mut down: TcpStream, target: SocketAddr) -> Result<()> {
    let mut up = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(target))
        .await
        .context("dial timed out")??;
    down.set_nodelay(true)?;
    up.set_nodelay(true)?;
    tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, RELAY_BUF, RELAY_BUF).await?;
    Ok(())
}
