//! `pod-app end-watch` and `pod-app end-stream`: how a connection ended, as the application's
//! own system calls report it.
//!
//! Both sides of one connection, each in its pod: `end-watch` accepts one connection and
//! reads it, `end-stream` connects and writes without pause. Either may abort after so many
//! bytes (close with SO_LINGER 0: a TCP RST). Each prints a `{"flowing": ...}` line once bytes
//! are moving (so a test can break something mid-transfer), then one report:
//! `{"end": "fin" | "reset" | "aborted" | "timeout", "bytes": N, "error": ...}`, where `fin`
//! is a clean end of stream (read returned 0) and `reset` an error a reset connection gives
//! (ECONNRESET, EPIPE).

use std::{io::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Bytes after which the `flowing` line is printed.
const FLOWING_AFTER: u64 = 256 * 1024;
const CHUNK: usize = 64 * 1024;

/// How one side saw its connection end.
struct Ended {
    end: &'static str,
    bytes: u64,
    error: Option<String>,
}

impl Ended {
    fn report(self) -> (Value, bool) {
        let value = json!({"end": self.end, "bytes": self.bytes, "error": self.error});
        (value, true)
    }

    fn of(result: std::io::Result<()>, bytes: u64) -> Self {
        match result {
            Ok(()) => Self {
                end: "fin",
                bytes,
                error: None,
            },
            Err(e) => Self {
                end: match e.kind() {
                    std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted => "reset",
                    _ => "error",
                },
                bytes,
                error: Some(e.to_string()),
            },
        }
    }
}

fn print_line(value: &Value) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{value}").context("writing stdout")?;
    stdout.flush().context("flushing stdout")
}

/// Closes with a reset.
fn abort(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Accepts one connection on `listen` and reads it to its end, or aborts after `abort_after`
/// bytes.
pub async fn watch(
    listen: SocketAddr,
    abort_after: Option<u64>,
    timeout: Duration,
) -> Result<(Value, bool)> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr().context("local_addr")?;
    print_line(&json!({"listening": addr.to_string()}))?;
    let (mut stream, _) = tokio::time::timeout(timeout, listener.accept())
        .await
        .context("no connection in time")?
        .context("accept")?;
    let mut bytes = 0u64;
    let mut flowing = false;
    let mut buf = vec![0u8; CHUNK];
    let result = tokio::time::timeout(timeout, async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            bytes += n as u64;
            if !flowing && bytes >= FLOWING_AFTER {
                flowing = true;
                let _ = print_line(&json!({"flowing": bytes}));
            }
            if abort_after.is_some_and(|limit| bytes >= limit) {
                return Err(std::io::Error::other("abort"));
            }
        }
    })
    .await;
    Ok(match result {
        Err(_) => Ended {
            end: "timeout",
            bytes,
            error: None,
        },
        Ok(Err(_)) if abort_after.is_some_and(|limit| bytes >= limit) => {
            abort(stream);
            Ended {
                end: "aborted",
                bytes,
                error: None,
            }
        }
        Ok(result) => Ended::of(result, bytes),
    }
    .report())
}

/// Connects to `to` and writes without pause (reading whatever comes back) until the
/// connection ends, or aborts after `abort_after` bytes.
pub async fn stream(
    to: SocketAddr,
    abort_after: Option<u64>,
    timeout: Duration,
) -> Result<(Value, bool)> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(to))
        .await
        .context("connect timed out")?
        .with_context(|| format!("connect to {to}"))?;
    let (mut read, mut write) = stream.into_split();
    let chunk = vec![0x5au8; CHUNK];
    let mut bytes = 0u64;
    let mut flowing = false;
    let writing = async {
        loop {
            write.write_all(&chunk).await?;
            bytes += CHUNK as u64;
            if !flowing && bytes >= FLOWING_AFTER {
                flowing = true;
                let _ = print_line(&json!({"flowing": bytes}));
            }
            if abort_after.is_some_and(|limit| bytes >= limit) {
                return Ok::<_, std::io::Error>(true);
            }
        }
    };
    // The other side sends nothing: a read returns only at the connection's end.
    let reading = async {
        let mut byte = [0u8; 1];
        match read.read(&mut byte).await {
            Ok(0) => Ok(()),
            Ok(_) => Err(std::io::Error::other(
                "unexpected bytes from the other side",
            )),
            Err(e) => Err(e),
        }
    };
    let outcome = tokio::time::timeout(timeout, async {
        tokio::select! {
            written = writing => written.map(|_| None),
            read = reading => read.map(|()| Some(())),
        }
    })
    .await;
    let ended = match outcome {
        Err(_) => Ended {
            end: "timeout",
            bytes,
            error: None,
        },
        Ok(Ok(None)) => {
            let stream = read.reunite(write).context("reuniting the socket halves")?;
            abort(stream);
            Ended {
                end: "aborted",
                bytes,
                error: None,
            }
        }
        Ok(Ok(Some(()))) => Ended::of(Ok(()), bytes),
        Ok(Err(e)) => Ended::of(Err(e), bytes),
    };
    Ok(ended.report())
}
