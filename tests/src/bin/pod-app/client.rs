//! `pod-app` clients: send, moved-send, abort-connects, fetch, echo, http-get, many, peername,
//! and (in submodules)
//! requests, grpc and attack.
//!
//! Each returns the JSON to print and whether the result verified.

pub mod attack;
pub mod grpc;
pub mod raw_syn;
pub mod requests;

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_tests::pattern::{CHUNK, Pattern, Verifier, hex};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpSocket, TcpStream},
    sync::{Barrier, Semaphore},
    task::JoinSet,
};

use crate::canonical;

/// Largest reply a `sink` server may send.
const MAX_SINK_REPLY: u64 = 64 * 1024;
/// Largest HTTP response head and body `http-get` accepts.
const MAX_HTTP_HEAD: u64 = 64 * 1024;
const MAX_HTTP_BODY: u64 = 16 << 20;
/// How many error strings `many` reports.
const MAX_ERRORS: usize = 5;

async fn connect(to: SocketAddr) -> Result<(TcpStream, SocketAddr, SocketAddr)> {
    let stream = TcpStream::connect(to)
        .await
        .with_context(|| format!("connecting to {to}"))?;
    let local = stream.local_addr().context("getsockname")?;
    let peer = stream.peer_addr().context("getpeername")?;
    Ok((stream, canonical(local), canonical(peer)))
}

fn elapsed_ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

pub async fn send(to: SocketAddr, bytes: u64, marker: Option<&str>) -> Result<(Value, bool)> {
    let start = Instant::now();
    let (stream, local, peer) = connect(to).await?;
    send_over(stream, local, peer, bytes, marker, start).await
}

/// `send` on a socket created in this process's cgroup and connected after the process moved
/// itself to `cgroup` (a cgroup v2 directory): the cgroup the kernel stamped on the socket and
/// the caller's cgroup at connect() then differ. Reports both.
pub async fn moved_send(to: SocketAddr, cgroup: &Path, bytes: u64) -> Result<(Value, bool)> {
    let start = Instant::now();
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("socket")?;
    let created_in = own_cgroup()?;
    let procs = cgroup.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("moving to {}", procs.display()))?;
    let connected_from = own_cgroup()?;
    if connected_from == created_in {
        bail!("still in {created_in} after writing to {}", procs.display());
    }
    let stream = socket
        .connect(to)
        .await
        .with_context(|| format!("connecting to {to}"))?;
    let local = canonical(stream.local_addr().context("getsockname")?);
    let peer = canonical(stream.peer_addr().context("getpeername")?);
    let (mut value, ok) = send_over(stream, local, peer, bytes, None, start).await?;
    value["created_in"] = json!(created_in);
    value["connected_from"] = json!(connected_from);
    Ok((value, ok))
}

/// This process's cgroup v2 path (the `0::` line of `/proc/self/cgroup`).
fn own_cgroup() -> Result<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .with_context(|| format!("no cgroup v2 line in {text:?}"))
}

/// `count` non-blocking connects to `to`, each socket closed right after connect() returned,
/// before any handshake could finish unless the peer is this host. Tallies what connect()
/// said: `{"attempts","in_progress","connected","errors":{"ERRNO":n}}`.
pub fn abort_connects(to: SocketAddr, count: u64) -> Result<(Value, bool)> {
    use std::os::fd::AsRawFd;

    use nix::{
        errno::Errno,
        sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, connect, socket},
    };

    let family = if to.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let addr = SockaddrStorage::from(to);
    let (mut in_progress, mut connected) = (0u64, 0u64);
    let mut errors: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for _ in 0..count {
        let fd = socket(
            family,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .context("socket")?;
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => connected += 1,
            Err(Errno::EINPROGRESS) => in_progress += 1,
            Err(e) => *errors.entry(format!("{e:?}")).or_default() += 1,
        }
        drop(fd);
    }
    Ok((
        json!({
            "attempts": count,
            "in_progress": in_progress,
            "connected": connected,
            "errors": errors,
        }),
        true,
    ))
}

async fn send_over(
    mut stream: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
    bytes: u64,
    marker: Option<&str>,
    start: Instant,
) -> Result<(Value, bool)> {
    let mut pattern = match marker {
        Some(m) => Pattern::with_marker(bytes, m.as_bytes())?,
        None => Pattern::new(bytes),
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = pattern.fill(&mut buf);
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        stream
            .write_all(&buf[..n])
            .await
            .with_context(|| format!("writing at offset {}", pattern.position() - n as u64))?;
    }
    stream.shutdown().await.context("shutdown")?;
    let mut reply = Vec::new();
    (&mut stream)
        .take(MAX_SINK_REPLY)
        .read_to_end(&mut reply)
        .await
        .context("reading the sink's reply")?;
    let text = String::from_utf8_lossy(&reply);
    let reply: Value = serde_json::from_str(text.trim())
        .with_context(|| format!("sink replied with non-JSON {text:?}"))?;
    let sent_sha256 = hex(&hasher.finalize());
    let ok = reply["bytes"] == bytes && reply["sha256"] == sent_sha256.as_str();
    Ok((
        json!({
            "local": local.to_string(),
            "peer": peer.to_string(),
            "sent": bytes,
            "sent_sha256": sent_sha256,
            "reply": reply,
            "ok": ok,
            "elapsed_ms": elapsed_ms(start),
        }),
        ok,
    ))
}

pub async fn fetch(to: SocketAddr, bytes: u64) -> Result<(Value, bool)> {
    let start = Instant::now();
    let (mut stream, local, peer) = connect(to).await?;
    stream
        .write_all(format!("{bytes}\n").as_bytes())
        .await
        .context("sending the byte count")?;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .with_context(|| format!("reading after {received} bytes"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        received += n as u64;
    }
    let elapsed = elapsed_ms(start);
    stream.shutdown().await.context("shutdown")?;
    let sha256 = hex(&hasher.finalize());
    let expected_sha256 = Pattern::new(bytes).sha256_hex();
    let ok = received == bytes && sha256 == expected_sha256;
    Ok((
        json!({
            "local": local.to_string(),
            "peer": peer.to_string(),
            "received": received,
            "sha256": sha256,
            "expected_sha256": expected_sha256,
            "ok": ok,
            "elapsed_ms": elapsed,
        }),
        ok,
    ))
}

/// What came back from one echo exchange.
struct EchoReport {
    received: u64,
    mismatch_at: Option<u64>,
}

impl EchoReport {
    fn ok(&self, bytes: u64) -> bool {
        self.received == bytes && self.mismatch_at.is_none()
    }
}

/// Writes `bytes` of the pattern and reads the echo at the same time (the echo server only
/// writes what it reads, so writing everything first would deadlock once buffers fill).
async fn echo_over(stream: TcpStream, bytes: u64) -> Result<EchoReport> {
    let (mut r, mut w) = stream.into_split();
    let writer = async move {
        let mut pattern = Pattern::new(bytes);
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = pattern.fill(&mut buf);
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n]).await.context("writing")?;
        }
        w.shutdown().await.context("shutdown")?;
        anyhow::Ok(w)
    };
    let reader = async move {
        let mut verifier = Verifier::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = r
                .read(&mut buf)
                .await
                .with_context(|| format!("reading after {} bytes", verifier.received()))?;
            if n == 0 {
                break;
            }
            verifier.update(&buf[..n]);
        }
        anyhow::Ok(verifier)
    };
    let (w, verifier) = tokio::join!(writer, reader);
    let verifier = verifier?;
    // A write error after the reader finished still counts: the echo was cut short.
    w?;
    Ok(EchoReport {
        received: verifier.received(),
        mismatch_at: verifier.mismatch_at(),
    })
}

pub async fn echo(to: SocketAddr, bytes: u64) -> Result<(Value, bool)> {
    let start = Instant::now();
    let (stream, local, peer) = connect(to).await?;
    let report = echo_over(stream, bytes).await?;
    let ok = report.ok(bytes);
    Ok((
        json!({
            "local": local.to_string(),
            "peer": peer.to_string(),
            "sent": bytes,
            "received": report.received,
            "mismatch_at": report.mismatch_at,
            "ok": ok,
            "elapsed_ms": elapsed_ms(start),
        }),
        ok,
    ))
}

pub async fn peername(to: SocketAddr) -> Result<(Value, bool)> {
    let (_stream, local, peer) = connect(to).await?;
    Ok((
        json!({"local": local.to_string(), "peer": peer.to_string()}),
        true,
    ))
}

pub async fn http_get(
    to: SocketAddr,
    path: &str,
    host: Option<&str>,
    extra_headers: &[String],
) -> Result<(Value, bool)> {
    let start = Instant::now();
    let (mut stream, local, peer) = connect(to).await?;
    let host = host.map_or_else(|| to.to_string(), str::to_owned);
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: pod-app\r\nConnection: close\r\n"
    );
    for h in extra_headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    // No half-close after the request: some servers treat it as an abort.
    stream
        .write_all(request.as_bytes())
        .await
        .context("writing request")?;

    let mut reader = BufReader::new(&mut stream);
    let (status, reason, headers) = read_response_head(&mut reader).await?;
    let body = read_body(&mut reader, &headers).await?;
    let text = String::from_utf8_lossy(&body).into_owned();
    let body = serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text));
    Ok((
        json!({
            "local": local.to_string(),
            "peer": peer.to_string(),
            "status": status,
            "reason": reason,
            "headers": headers,
            "body": body,
            "elapsed_ms": elapsed_ms(start),
        }),
        true,
    ))
}

async fn read_line_bounded<R: AsyncRead + tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    budget: &mut u64,
) -> Result<String> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(*budget)
        .read_until(b'\n', &mut line)
        .await
        .context("reading response")?;
    *budget -= n as u64;
    if n == 0 || line.last() != Some(&b'\n') {
        bail!("response ended or grew too large inside the head");
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
}

async fn read_response_head<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> Result<(u16, String, Map<String, Value>)> {
    let mut budget = MAX_HTTP_HEAD;
    let status_line = read_line_bounded(reader, &mut budget).await?;
    let mut parts = status_line.splitn(3, ' ');
    let (Some(_version), Some(code)) = (parts.next(), parts.next()) else {
        bail!("bad status line {status_line:?}");
    };
    let status: u16 = code
        .parse()
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let reason = parts.next().unwrap_or_default().to_owned();
    let mut headers = Map::new();
    loop {
        let line = read_line_bounded(reader, &mut budget).await?;
        if line.is_empty() {
            return Ok((status, reason, headers));
        }
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            let value = match headers.get(&k).and_then(Value::as_str) {
                Some(prev) => format!("{prev}, {v}"),
                None => v.to_owned(),
            };
            headers.insert(k, Value::String(value));
        }
    }
}

async fn read_body<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    headers: &Map<String, Value>,
) -> Result<Vec<u8>> {
    let header = |name: &str| headers.get(name).and_then(Value::as_str).unwrap_or("");
    let mut body = Vec::new();
    if header("transfer-encoding")
        .to_ascii_lowercase()
        .contains("chunked")
    {
        let mut budget = MAX_HTTP_HEAD;
        loop {
            let size_line = read_line_bounded(reader, &mut budget).await?;
            let size_hex = size_line.split(';').next().unwrap_or_default().trim();
            let size = u64::from_str_radix(size_hex, 16)
                .with_context(|| format!("bad chunk size line {size_line:?}"))?;
            if size == 0 {
                // Trailers, up to the blank line.
                while !read_line_bounded(reader, &mut budget).await?.is_empty() {}
                return Ok(body);
            }
            if body.len() as u64 + size > MAX_HTTP_BODY {
                bail!("response body larger than {MAX_HTTP_BODY} bytes");
            }
            let start = body.len();
            body.resize(start + size as usize, 0);
            reader
                .read_exact(&mut body[start..])
                .await
                .context("reading chunk")?;
            read_line_bounded(reader, &mut budget).await?;
        }
    }
    if let Ok(len) = header("content-length").parse::<u64>() {
        if len > MAX_HTTP_BODY {
            bail!("response body of {len} bytes is larger than {MAX_HTTP_BODY}");
        }
        body.resize(len as usize, 0);
        reader.read_exact(&mut body).await.context("reading body")?;
        return Ok(body);
    }
    reader
        .take(MAX_HTTP_BODY)
        .read_to_end(&mut body)
        .await
        .context("reading body")?;
    Ok(body)
}

/// Opens `connections` echo connections, at most `concurrency` at a time (all at once by
/// default: then every connection is established before any of them sends data).
/// Opens `connections` connections to `to` (64 at a time), holds them for `hold`, then
/// reports how many are still open (a read would block), how many the other end closed or
/// reset, and how many could not connect at all.
pub async fn hoard(to: SocketAddr, connections: usize, hold: Duration) -> Result<(Value, bool)> {
    let mut open = Vec::with_capacity(connections);
    let mut connect_errors = 0usize;
    let mut errors = Vec::new();
    for chunk in (0..connections).collect::<Vec<_>>().chunks(64) {
        let mut tasks = JoinSet::new();
        for _ in chunk {
            tasks.spawn(TcpStream::connect(to));
        }
        while let Some(joined) = tasks.join_next().await {
            match joined.context("connect task")? {
                Ok(stream) => open.push(stream),
                Err(e) => {
                    connect_errors += 1;
                    if errors.len() < MAX_ERRORS {
                        errors.push(e.to_string());
                    }
                }
            }
        }
    }
    tokio::time::sleep(hold).await;
    let (mut alive, mut closed, mut reset) = (0usize, 0usize, 0usize);
    let mut byte = [0u8; 1];
    for stream in &open {
        match stream.try_read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => alive += 1,
            Ok(0) => closed += 1,
            // Bytes from a server that speaks first: open.
            Ok(_) => alive += 1,
            Err(_) => reset += 1,
        }
    }
    Ok((
        json!({
            "opened": open.len(),
            "alive": alive,
            "closed": closed,
            "reset": reset,
            "connect_errors": connect_errors,
            "errors": errors,
        }),
        true,
    ))
}

pub async fn many(
    to: SocketAddr,
    connections: usize,
    bytes: u64,
    concurrency: Option<usize>,
    timeout: Duration,
) -> Result<(Value, bool)> {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let concurrency = concurrency.unwrap_or(connections).max(1);
    let all_at_once = concurrency >= connections;
    let barrier = Arc::new(Barrier::new(if all_at_once { connections } else { 1 }));
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    for _ in 0..connections {
        let (barrier, permits) = (barrier.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.context("semaphore closed")?;
            let connected = TcpStream::connect(to).await;
            // Wait for the others even if this connect failed, or they would wait forever.
            if all_at_once {
                barrier.wait().await;
            }
            let stream = connected.with_context(|| format!("connecting to {to}"))?;
            let report = echo_over(stream, bytes).await?;
            if !report.ok(bytes) {
                bail!(
                    "echo mismatch: received {} of {bytes} bytes, first difference at {:?}",
                    report.received,
                    report.mismatch_at
                );
            }
            anyhow::Ok(())
        });
    }
    let (mut ok, mut failed) = (0usize, 0usize);
    let mut errors = Vec::new();
    let note = |e: String, errors: &mut Vec<String>| {
        if errors.len() < MAX_ERRORS {
            errors.push(e);
        }
    };
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(None) => break,
            Ok(Some(Ok(Ok(())))) => ok += 1,
            Ok(Some(Ok(Err(e)))) => {
                failed += 1;
                note(format!("{e:#}"), &mut errors);
            }
            Ok(Some(Err(e))) => {
                failed += 1;
                note(format!("task: {e}"), &mut errors);
            }
            Err(_) => {
                failed += tasks.len();
                note(
                    format!("{} connections timed out after {timeout:?}", tasks.len()),
                    &mut errors,
                );
                tasks.abort_all();
                break;
            }
        }
    }
    Ok((
        json!({
            "connections": connections,
            "bytes": bytes,
            "ok": ok,
            "failed": failed,
            "errors": errors,
            "elapsed_ms": elapsed_ms(start),
        }),
        failed == 0,
    ))
}
