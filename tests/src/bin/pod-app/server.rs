//! `pod-app serve`: the echo, sink, source, http and l7 servers.

mod collector;
mod l7;

use std::{fmt, io::Write as _, net::SocketAddr, str::FromStr, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use mesh_tests::pattern::{CHUNK, Pattern, hex};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

use crate::canonical;

/// Largest HTTP request head the `http` mode accepts.
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body the `http` mode reads (and discards).
const MAX_BODY: u64 = 1 << 20;

/// What a listener does with each connection.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Echo,
    Sink,
    Source,
    Http,
    L7,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Echo => "echo",
            Mode::Sink => "sink",
            Mode::Source => "source",
            Mode::Http => "http",
            Mode::L7 => "l7",
        })
    }
}

/// One `--listen ADDR[=MODE]` argument.
#[derive(Clone, Debug)]
pub struct ListenSpec {
    addr: SocketAddr,
    mode: Option<Mode>,
}

impl FromStr for ListenSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, mode) = match s.rsplit_once('=') {
            Some((addr, mode)) => (addr, Some(Mode::from_str(mode, true)?)),
            None => (s, None),
        };
        let addr = addr
            .parse()
            .map_err(|e| format!("bad listen address {addr:?}: {e}"))?;
        Ok(Self { addr, mode })
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// `ADDR[=MODE]`, repeatable, e.g. `[::]:8080=http` or `0.0.0.0:9000`.
    #[arg(long, required = true)]
    listen: Vec<ListenSpec>,
    /// Mode of listeners given without `=MODE`.
    #[arg(long, value_enum, default_value_t = Mode::Echo)]
    mode: Mode,
    /// Server name reported by `http` and `l7` modes.
    #[arg(long, env = "POD_NAME", default_value = "pod-app")]
    name: String,
}

/// Binds every listener, prints the ready line, then serves until killed.
pub async fn serve(args: ServeArgs, timeout: Duration) -> Result<()> {
    let name: Arc<str> = Arc::from(args.name.as_str());
    let mut bound = Vec::new();
    for spec in &args.listen {
        let listener = TcpListener::bind(spec.addr)
            .await
            .with_context(|| format!("binding {}", spec.addr))?;
        let addr = listener.local_addr().context("local_addr")?;
        bound.push((listener, addr, spec.mode.unwrap_or(args.mode)));
    }
    let listeners: Vec<Value> = bound
        .iter()
        .map(|(_, addr, mode)| json!({"addr": addr.to_string(), "mode": mode.to_string()}))
        .collect();
    let ready = json!({"listening": bound[0].1.to_string(), "listeners": listeners});
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{ready}").context("writing ready line")?;
    stdout.flush().context("flushing stdout")?;
    drop(stdout);

    // One state for all `l7` listeners, so `/_seen` and `/flaky/` count per server process.
    let l7 = if bound.iter().any(|(_, _, mode)| *mode == Mode::L7) {
        Some(l7::L7::new(name.clone()).await)
    } else {
        None
    };
    let mut loops = JoinSet::new();
    for (listener, addr, mode) in bound {
        let state = State {
            name: name.clone(),
            l7: l7.clone(),
        };
        loops.spawn(accept_loop(listener, addr, mode, state, timeout));
    }
    // Accept loops never return; if the task set ends, something is badly wrong.
    match loops.join_next().await {
        Some(Err(e)) => bail!("accept loop failed: {e}"),
        _ => bail!("accept loop ended"),
    }
}

/// What connection handlers share.
#[derive(Clone)]
struct State {
    name: Arc<str>,
    /// Present when some listener is in `l7` mode.
    l7: Option<Arc<l7::L7>>,
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    mode: Mode,
    state: State,
    timeout: Duration,
) {
    // `l7` connections shut down gracefully at `timeout`, then get a grace period.
    let limit = match mode {
        Mode::L7 => timeout + l7::GRACE,
        _ => timeout,
    };
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let state = state.clone();
                tokio::spawn(async move {
                    let peer = canonical(peer);
                    let result =
                        tokio::time::timeout(limit, handle(stream, peer, mode, state, timeout))
                            .await;
                    match result {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => eprintln!("pod-app {mode} {addr}: {peer}: {e:#}"),
                        Err(_) => {
                            eprintln!("pod-app {mode} {addr}: {peer}: timed out after {limit:?}");
                        }
                    }
                });
            }
            Err(e) => {
                // Usually EMFILE or a connection reset before accept: keep serving, but do
                // not spin on a persistent error.
                eprintln!("pod-app {mode} {addr}: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    mode: Mode,
    state: State,
    timeout: Duration,
) -> Result<()> {
    match mode {
        Mode::Echo => echo(stream).await,
        Mode::Sink => sink(stream, peer).await,
        Mode::Source => source(stream).await,
        Mode::Http => http(stream, peer, &state.name).await,
        Mode::L7 => match state.l7 {
            Some(l7) => l7::serve_connection(l7, stream, peer, timeout).await,
            None => bail!("no l7 state"),
        },
    }
}

/// Copies input to output until EOF, then half-closes, so the client sees its own EOF
/// echoed.
async fn echo(mut stream: TcpStream) -> Result<()> {
    let (r, mut w) = stream.split();
    let mut r = BufReader::with_capacity(CHUNK, r);
    tokio::io::copy_buf(&mut r, &mut w)
        .await
        .context("echoing")?;
    w.shutdown().await.context("shutdown")?;
    Ok(())
}

async fn sink(mut stream: TcpStream, peer: SocketAddr) -> Result<()> {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = stream.read(&mut buf).await.context("reading")?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    let reply = json!({
        "bytes": total,
        "sha256": hex(&hasher.finalize()),
        "peer": peer.to_string(),
    });
    stream
        .write_all(format!("{reply}\n").as_bytes())
        .await
        .context("writing summary")?;
    stream.shutdown().await.context("shutdown")?;
    Ok(())
}

async fn source(mut stream: TcpStream) -> Result<()> {
    let (r, mut w) = stream.split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    (&mut r)
        .take(64)
        .read_until(b'\n', &mut line)
        .await
        .context("reading byte count")?;
    let text = String::from_utf8_lossy(&line);
    let count: u64 = text
        .trim()
        .parse()
        .with_context(|| format!("bad byte count line {text:?}"))?;
    let mut pattern = Pattern::new(count);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = pattern.fill(&mut buf);
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).await.context("writing")?;
    }
    w.shutdown().await.context("shutdown")?;
    // Close only after the client is done, so it never sees a reset.
    tokio::io::copy(&mut r, &mut tokio::io::sink())
        .await
        .context("waiting for EOF")?;
    Ok(())
}

async fn http(mut stream: TcpStream, peer: SocketAddr, name: &str) -> Result<()> {
    let mut reader = BufReader::new(&mut stream);
    let Some(head) = read_head(&mut reader).await? else {
        return respond(&mut stream, "431 Request Header Fields Too Large", "{}").await;
    };
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return respond(&mut stream, "400 Bad Request", "{}").await;
    };
    let mut headers = Map::new();
    let mut content_length = 0u64;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "content-length" {
            content_length = v.parse().unwrap_or(0);
        }
        let value = match headers.get(&k).and_then(Value::as_str) {
            Some(prev) => format!("{prev}, {v}"),
            None => v.to_owned(),
        };
        headers.insert(k, Value::String(value));
    }
    // Consume a (small) body so closing does not reset the connection under the client.
    tokio::io::copy(
        &mut (&mut reader).take(content_length.min(MAX_BODY)),
        &mut tokio::io::sink(),
    )
    .await
    .context("reading body")?;
    let body = json!({
        "server": name,
        "peer": peer.to_string(),
        "path": path,
        "method": method,
        "headers": headers,
    });
    respond(&mut stream, "200 OK", &body.to_string()).await
}

/// Reads an HTTP head up to the blank line. `None` if it exceeds [`MAX_HEAD`].
async fn read_head<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> Result<Option<String>> {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let n = (&mut *reader)
            .take((MAX_HEAD + 1 - head.len()) as u64)
            .read_until(b'\n', &mut head)
            .await
            .context("reading request head")?;
        if head.len() > MAX_HEAD {
            return Ok(None);
        }
        if n == 0 {
            bail!("connection closed inside the request head");
        }
        let line = &head[before..];
        if line == b"\r\n" || line == b"\n" {
            return Ok(Some(String::from_utf8_lossy(&head).into_owned()));
        }
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) -> Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(response.as_bytes())
        .await
        .context("writing response")?;
    stream.shutdown().await.context("shutdown")?;
    Ok(())
}

/// Runs an `l7` listener on `127.0.0.1:0` in this process (for the binary's own tests) and
/// returns its address; it stops when the runtime does.
#[cfg(test)]
pub(crate) async fn spawn_l7(name: &str, timeout: Duration) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let state = State {
        name: Arc::from(name),
        l7: Some(l7::L7::new(Arc::from(name)).await),
    };
    tokio::spawn(accept_loop(listener, addr, Mode::L7, state, timeout));
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs_parse() {
        let s: ListenSpec = "[::]:8080=http".parse().expect("spec");
        assert_eq!(s.addr.to_string(), "[::]:8080");
        assert_eq!(s.mode, Some(Mode::Http));
        let s: ListenSpec = "0.0.0.0:8080=l7".parse().expect("spec");
        assert_eq!(s.mode, Some(Mode::L7));
        let s: ListenSpec = "0.0.0.0:9000".parse().expect("spec");
        assert_eq!(s.mode, None);
        assert!("0.0.0.0:9000=bogus".parse::<ListenSpec>().is_err());
        assert!("nowhere=echo".parse::<ListenSpec>().is_err());
    }
}
