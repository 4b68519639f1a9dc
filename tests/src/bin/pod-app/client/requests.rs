//! `pod-app requests`: many HTTP requests over keep-alive connections, tallied.
//!
//! HTTP/1.1: each of the `--concurrency` workers keeps its own connection and sends its
//! requests on it one after another. HTTP/2 (`--http2`, prior knowledge): all workers share
//! one connection, so up to `--concurrency` streams are in flight on it at once. A
//! connection that fails or is closed by the server is replaced before the next request;
//! requests that fail at the transport level are counted in `errors`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use http::{
    HeaderMap, Method, Request, Response, Uri, Version,
    header::{HOST, HeaderName, HeaderValue},
};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_tests::pattern::Pattern;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::{net::TcpStream, task::JoinSet};

use crate::headers_json;

/// Largest response body read; a larger one counts as an error.
const MAX_RESPONSE_BODY: usize = 16 << 20;
/// Largest request body `--body-bytes` may ask for (it is held in memory).
const MAX_REQUEST_BODY: u64 = 256 << 20;
/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// `last.body` is parsed as JSON up to this size; otherwise it is text cut to [`MAX_TEXT`].
const MAX_JSON: usize = 64 * 1024;
const MAX_TEXT: usize = 4 * 1024;

#[derive(Args, Debug)]
pub struct RequestsArgs {
    #[arg(long)]
    to: SocketAddr,
    #[arg(long, default_value = "/")]
    path: String,
    #[arg(long, default_value = "GET")]
    method: String,
    /// Request header `Name: value` (repeatable). `Host` defaults to the --to address (in
    /// HTTP/2 it becomes the `:authority`).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Requests to send in all.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// HTTP/2 with prior knowledge instead of HTTP/1.1.
    #[arg(long)]
    http2: bool,
    /// HTTP/2 only: the `:authority`, sent beside the `Host` header instead of replacing it
    /// (a client that names two hosts).
    #[arg(long, requires = "http2")]
    authority: Option<String>,
    /// Request body size (pattern bytes), e.g. `64K`.
    #[arg(long, value_parser = crate::parse_size, default_value = "0")]
    body_bytes: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
}

/// The validated request every worker sends.
struct Plan {
    to: SocketAddr,
    http2: bool,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Plan {
    fn new(args: &RequestsArgs) -> Result<Self> {
        let method = Method::from_bytes(args.method.as_bytes())
            .with_context(|| format!("bad method {:?}", args.method))?;
        let mut headers = HeaderMap::new();
        for h in &args.headers {
            let (name, value) = parse_header(h)?;
            headers.append(name, value);
        }
        let host = match headers.get(HOST) {
            Some(h) => h.to_str().context("non-ASCII host header")?.to_owned(),
            None => args.to.to_string(),
        };
        ensure_path(&args.path)?;
        // HTTP/1.1 sends the path and a Host header; HTTP/2 the absolute URI, from which
        // hyper takes `:scheme` and `:authority` (and a `host` header would be redundant).
        let uri = if let Some(authority) = &args.authority {
            format!("http://{authority}{}", args.path)
        } else if args.http2 {
            headers.remove(HOST);
            format!("http://{host}{}", args.path)
        } else {
            headers.insert(HOST, HeaderValue::from_str(&host).context("bad host")?);
            args.path.clone()
        };
        let uri: Uri = uri
            .parse()
            .with_context(|| format!("bad path {:?} or host {host:?}", args.path))?;
        if args.body_bytes > MAX_REQUEST_BODY {
            bail!("--body-bytes is limited to {MAX_REQUEST_BODY}");
        }
        let mut body = vec![0u8; args.body_bytes as usize];
        let mut pattern = Pattern::new(args.body_bytes);
        let mut filled = 0;
        while filled < body.len() {
            filled += pattern.fill(&mut body[filled..]);
        }
        Ok(Self {
            to: args.to,
            http2: args.http2,
            method,
            uri,
            headers,
            body: Bytes::from(body),
        })
    }

    fn request(&self) -> Result<Request<Full<Bytes>>> {
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(self.uri.clone())
            .version(if self.http2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            })
            .body(Full::new(self.body.clone()))
            .context("building the request")?;
        *req.headers_mut() = self.headers.clone();
        Ok(req)
    }
}

fn ensure_path(path: &str) -> Result<()> {
    if !path.starts_with('/') {
        bail!("--path must start with '/', got {path:?}");
    }
    Ok(())
}

/// Parses `Name: value`.
fn parse_header(h: &str) -> Result<(HeaderName, HeaderValue)> {
    let (name, value) = h
        .split_once(':')
        .with_context(|| format!("header {h:?} is not `Name: value`"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .with_context(|| format!("bad header name in {h:?}"))?;
    let value = HeaderValue::from_str(value.trim())
        .with_context(|| format!("bad header value in {h:?}"))?;
    Ok((name, value))
}

/// What the workers found, merged as they go.
#[derive(Default)]
struct Tally {
    done: u64,
    statuses: BTreeMap<u16, u64>,
    servers: BTreeMap<String, u64>,
    errors: u64,
    first_error: Option<String>,
    connections: u64,
    last: Option<(u16, HeaderMap, Bytes)>,
}

impl Tally {
    fn error(&mut self, e: &anyhow::Error) {
        self.done += 1;
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{e:#}"));
        }
    }

    fn response(&mut self, status: u16, headers: HeaderMap, body: Bytes) {
        self.done += 1;
        *self.statuses.entry(status).or_default() += 1;
        if let Some(Value::Object(o)) = parse_json(&body)
            && let Some(Value::String(server)) = o.get("server")
        {
            *self.servers.entry(server.clone()).or_default() += 1;
        }
        self.last = Some((status, headers, body));
    }

    fn json(&self, sent: u64, timed_out: bool, elapsed: Duration) -> Value {
        let last = self.last.as_ref().map(|(status, headers, body)| {
            json!({"status": status, "headers": headers_json(headers), "body": body_json(body)})
        });
        let statuses: BTreeMap<String, u64> = self
            .statuses
            .iter()
            .map(|(s, n)| (s.to_string(), *n))
            .collect();
        json!({
            "sent": sent,
            "statuses": statuses,
            "servers": self.servers,
            "errors": self.errors,
            "first_error": self.first_error,
            "connections": self.connections,
            "last": last,
            "timed_out": timed_out,
            "elapsed_ms": elapsed.as_millis() as u64,
        })
    }
}

fn parse_json(body: &[u8]) -> Option<Value> {
    (body.len() <= MAX_JSON)
        .then(|| serde_json::from_slice(body).ok())
        .flatten()
}

/// A body as JSON if it is JSON, else as text cut to [`MAX_TEXT`] bytes.
fn body_json(body: &[u8]) -> Value {
    if let Some(v) = parse_json(body) {
        return v;
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_TEXT)]);
    Value::String(text.into_owned())
}

/// State shared by the workers.
struct Shared {
    plan: Plan,
    /// Requests claimed so far (may pass `count` by up to the number of workers).
    claimed: AtomicU64,
    count: u64,
    tally: Mutex<Tally>,
    /// The HTTP/2 connection all workers share.
    h2: tokio::sync::Mutex<Option<http2::SendRequest<Full<Bytes>>>>,
}

impl Shared {
    fn claim(&self) -> bool {
        self.claimed.fetch_add(1, Ordering::Relaxed) < self.count
    }

    fn tally(&self) -> parking_lot::MutexGuard<'_, Tally> {
        // A panicking worker cannot leave a half-updated tally behind.
        self.tally.lock()
    }

    async fn connect(&self) -> Result<TokioIo<TcpStream>> {
        let stream = TcpStream::connect(self.plan.to)
            .await
            .with_context(|| format!("connecting to {}", self.plan.to))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        self.tally().connections += 1;
        Ok(TokioIo::new(stream))
    }

    async fn h1_connect(&self) -> Result<http1::SendRequest<Full<Bytes>>> {
        let io = self.connect().await?;
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(MAX_HEAD)
            .handshake(io)
            .await
            .context("HTTP/1.1 handshake")?;
        // The connection ends when the sender is dropped or the peer closes it.
        tokio::spawn(conn);
        Ok(sender)
    }

    /// The shared HTTP/2 connection, replaced if it is gone.
    async fn h2_sender(&self) -> Result<http2::SendRequest<Full<Bytes>>> {
        let mut slot = self.h2.lock().await;
        if let Some(sender) = slot.as_mut()
            && sender.ready().await.is_ok()
        {
            return Ok(sender.clone());
        }
        *slot = None;
        let io = self.connect().await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .max_header_list_size(MAX_HEAD as u32)
            .handshake(io)
            .await
            .context("HTTP/2 handshake")?;
        tokio::spawn(conn);
        *slot = Some(sender.clone());
        Ok(sender)
    }

    async fn worker(self: Arc<Self>) {
        let mut h1: Option<http1::SendRequest<Full<Bytes>>> = None;
        while self.claim() {
            let result = self.exchange(&mut h1).await;
            match result {
                Ok(response) => {
                    let (parts, body) = response;
                    self.tally()
                        .response(parts.status.as_u16(), parts.headers, body);
                }
                Err(e) => {
                    // Start over on a new connection: this one may be broken.
                    h1 = None;
                    self.tally().error(&e);
                }
            }
        }
    }

    /// Sends one request and reads the whole response. A request that was never sent
    /// because the connection had just closed (e.g. an idle HTTP/1.1 connection the server
    /// timed out) is retried once on a new connection.
    async fn exchange(
        &self,
        h1: &mut Option<http1::SendRequest<Full<Bytes>>>,
    ) -> Result<(http::response::Parts, Bytes)> {
        let response = match self.send(h1).await {
            Err(e) if e.is_canceled() => {
                *h1 = None;
                self.send(h1).await
            }
            other => other,
        };
        let response = response.map_err(|e| {
            let what = if self.plan.http2 {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            };
            anyhow::Error::new(e).context(format!("{what} request"))
        })?;
        // The server will close this connection: do not try to reuse it.
        if !self.plan.http2 && closes(response.headers()) {
            *h1 = None;
        }
        read_response(response).await
    }

    /// Sends the request on the current connection (or a new one).
    async fn send(
        &self,
        h1: &mut Option<http1::SendRequest<Full<Bytes>>>,
    ) -> Result<Response<Incoming>, SendError> {
        let req = self.plan.request()?;
        if self.plan.http2 {
            let mut sender = self.h2_sender().await?;
            return Ok(sender.send_request(req).await?);
        }
        // A connection the server has closed is replaced quietly.
        if let Some(sender) = h1.as_mut()
            && sender.ready().await.is_err()
        {
            *h1 = None;
        }
        let sender = match h1 {
            Some(sender) => sender,
            None => h1.insert(self.h1_connect().await?),
        };
        Ok(sender.send_request(req).await?)
    }
}

/// Why a request could not be sent: before it was on the wire (connecting, building it) or
/// from hyper.
#[derive(Debug)]
enum SendError {
    Setup(anyhow::Error),
    Hyper(hyper::Error),
}

impl SendError {
    fn is_canceled(&self) -> bool {
        matches!(self, SendError::Hyper(e) if e.is_canceled())
    }
}

impl From<anyhow::Error> for SendError {
    fn from(e: anyhow::Error) -> Self {
        SendError::Setup(e)
    }
}

impl From<hyper::Error> for SendError {
    fn from(e: hyper::Error) -> Self {
        SendError::Hyper(e)
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Setup(e) => write!(f, "{e:#}"),
            SendError::Hyper(e) => {
                // hyper's own message is terse ("connection error"); the cause says more.
                write!(f, "{e}")?;
                let mut source = std::error::Error::source(e);
                while let Some(s) = source {
                    write!(f, ": {s}")?;
                    source = s.source();
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for SendError {}

/// Whether an HTTP/1.1 response says the connection ends after it.
fn closes(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
}

async fn read_response(response: Response<Incoming>) -> Result<(http::response::Parts, Bytes)> {
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_RESPONSE_BODY)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the response body: {e}"))?
        .to_bytes();
    Ok((parts, body))
}

/// Runs the `requests` command. Always "verified": the tally is the result.
pub async fn requests(args: RequestsArgs, timeout: Duration) -> Result<(Value, bool)> {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let shared = Arc::new(Shared {
        plan: Plan::new(&args)?,
        claimed: AtomicU64::new(0),
        count: args.count,
        tally: Mutex::new(Tally::default()),
        h2: tokio::sync::Mutex::new(None),
    });
    let mut workers = JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        workers.spawn(shared.clone().worker());
    }
    let mut timed_out = false;
    loop {
        match tokio::time::timeout_at(deadline, workers.join_next()).await {
            Ok(None) => break,
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => shared.tally().error(&anyhow::anyhow!("worker: {e}")),
            Err(_) => {
                timed_out = true;
                workers.abort_all();
                break;
            }
        }
    }
    let mut tally = shared.tally();
    // Requests claimed but unfinished when the time ran out count as errors.
    let sent = shared.claimed.load(Ordering::Relaxed).min(args.count);
    if timed_out {
        let unfinished = sent.saturating_sub(tally.done);
        tally.errors += unfinished;
        tally
            .first_error
            .get_or_insert_with(|| format!("{unfinished} requests timed out after {timeout:?}"));
    }
    Ok((tally.json(sent, timed_out, start.elapsed()), true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse() {
        let (n, v) = parse_header("X-Test:  a b ").expect("header");
        assert_eq!((n.as_str(), v.to_str().ok()), ("x-test", Some("a b")));
        assert!(parse_header("no colon").is_err());
        assert!(parse_header("bad name: v").is_err());
    }

    #[test]
    fn bodies_render() {
        assert_eq!(body_json(br#"{"a":1}"#), json!({"a": 1}));
        assert_eq!(body_json(b"plain"), json!("plain"));
        let long = vec![b'x'; MAX_TEXT + 10];
        assert_eq!(body_json(&long).as_str().map(str::len), Some(MAX_TEXT));
    }
}
