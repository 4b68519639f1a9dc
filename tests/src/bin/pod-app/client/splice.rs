//! `send --splice` and `fetch --splice`: the same exchanges as `send` and `fetch`, with every
//! byte moved between the socket and a pipe by splice(2), as zero-copy proxies and servers do.
//! splice() reads only the socket's own receive queue, so it is the client that notices when a
//! kernel fast path queues bytes anywhere else.
//!
//! Blocking code (callers run it on a blocking thread); every socket operation has a timeout.
//! Plain reads wait in poll(2) on a non-blocking socket, as event-driven programs do, so that
//! these clients exercise splice() and nothing else: a socket on the same-node fast path fails
//! blocking reads (see `datapath.fast_path`).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mesh_tests::pattern::{Pattern, hex};
use nix::fcntl::{SpliceFFlags, splice};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::canonical;

/// Bytes per pipe round: a fresh pipe holds 64 KiB, so a write of this size never blocks.
const ROUND: usize = 64 * 1024;
/// How long any one socket operation may block.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest reply a `sink` server may send.
const MAX_SINK_REPLY: u64 = 64 * 1024;

fn connect(to: SocketAddr) -> Result<(TcpStream, SocketAddr, SocketAddr)> {
    let stream = TcpStream::connect_timeout(&to, IO_TIMEOUT)
        .with_context(|| format!("connecting to {to}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let local = stream.local_addr().context("getsockname")?;
    let peer = stream.peer_addr().context("getpeername")?;
    Ok((stream, canonical(local), canonical(peer)))
}

fn pipe() -> Result<(std::fs::File, std::fs::File)> {
    let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe().context("pipe")?;
    Ok((r.into(), w.into()))
}

/// Sends `bytes` of the pattern to a `sink` server, pipe -> socket by splice(), half-closes and
/// reads the sink's verdict.
pub fn send(to: SocketAddr, bytes: u64) -> Result<(Value, bool)> {
    let start = Instant::now();
    let (mut stream, local, peer) = connect(to)?;
    let (pipe_r, mut pipe_w) = pipe()?;
    let mut pattern = Pattern::new(bytes);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; ROUND];
    loop {
        let n = pattern.fill(&mut buf);
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        pipe_w.write_all(&buf[..n]).context("filling the pipe")?;
        let mut left = n;
        while left > 0 {
            let moved = splice(&pipe_r, None, &stream, None, left, SpliceFFlags::empty())
                .with_context(|| {
                    format!(
                        "splicing into the socket at offset {}",
                        pattern.position() - left as u64
                    )
                })?;
            anyhow::ensure!(
                moved > 0,
                "splice moved nothing with {left} bytes in the pipe"
            );
            left -= moved;
        }
    }
    stream.shutdown(Shutdown::Write).context("shutdown")?;
    let reply = read_to_end_polling(&mut stream).context("reading the sink's reply")?;
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
            "elapsed_ms": start.elapsed().as_millis() as u64,
        }),
        ok,
    ))
}

/// Reads until EOF (at most [`MAX_SINK_REPLY`] bytes), waiting in poll(2) between reads.
fn read_to_end_polling(stream: &mut TcpStream) -> Result<Vec<u8>> {
    stream.set_nonblocking(true)?;
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                anyhow::ensure!(out.len() as u64 <= MAX_SINK_REPLY, "reply too long");
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                anyhow::ensure!(!left.is_zero(), "no EOF within {IO_TIMEOUT:?}");
                let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
                let wait = PollTimeout::try_from(left.min(Duration::from_secs(1)))
                    .unwrap_or(PollTimeout::MAX);
                poll(&mut fds, wait).context("poll")?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Asks a `source` server for `bytes` and receives them socket -> pipe by splice().
pub fn fetch(to: SocketAddr, bytes: u64) -> Result<(Value, bool)> {
    let start = Instant::now();
    let (mut stream, local, peer) = connect(to)?;
    stream
        .write_all(format!("{bytes}\n").as_bytes())
        .context("sending the byte count")?;
    let (mut pipe_r, pipe_w) = pipe()?;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut buf = vec![0u8; ROUND];
    loop {
        // Blocks like read(); SO_RCVTIMEO bounds it.
        let n = splice(&stream, None, &pipe_w, None, ROUND, SpliceFFlags::empty())
            .with_context(|| format!("splicing from the socket after {received} bytes"))?;
        if n == 0 {
            break;
        }
        pipe_r
            .read_exact(&mut buf[..n])
            .context("draining the pipe")?;
        hasher.update(&buf[..n]);
        received += n as u64;
    }
    let elapsed = start.elapsed().as_millis() as u64;
    stream.shutdown(Shutdown::Write).context("shutdown")?;
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
