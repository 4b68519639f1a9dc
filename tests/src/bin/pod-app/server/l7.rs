//! `l7` mode: an HTTP/1.1 (keep-alive) and HTTP/2 (prior knowledge) server on one port, for
//! testing an L7 proxy end to end. What it answers is chosen by the request path:
//!
//! * any path: 200 with
//!   `{"server","peer","path","authority","method","headers","version","body_bytes"}`
//!   (`path` includes the query; `authority` is HTTP/2's `:authority`, null in HTTP/1.1,
//!   whose `host` is among the headers; `version` is `HTTP/1.1` or `HTTP/2.0`);
//! * `/status/<code>` (200..=599): that status, same body (none for 204 and 304);
//! * `/delay/<ms>`: sleeps that long (at most [`MAX_DELAY`]), then 200;
//! * `/flaky/<key>/<n>`: 503 for the first `n` requests this server sees for `<key>`, 200
//!   after that (the body's `attempt` counts from 1);
//! * `/_seen`: `{"requests":N,"paths":{"/p":count,...}}` of every request answered so far,
//!   `/_seen` itself excepted (so a test can check that mirrored copies arrived);
//! * `content-type: application/grpc*`: the gRPC health service (`grpc.health.v1.Health`),
//!   where service `""` is SERVING and service `"toggle"` flips between SERVING and
//!   NOT_SERVING every [`TOGGLE_EVERY`], so a `Watch` on it streams messages;
//! * gRPC to `opentelemetry.proto.collector.trace.v1.TraceService`: an OTLP trace collector
//!   ([`super::collector`]), whose spans `/_spans` lists.
//!
//! A malformed `/status/`, `/delay/` or `/flaky/` path gets 400 with an `error` field, so a
//! typo in a test fails loudly instead of answering 200.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use anyhow::{Result, anyhow};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::{net::TcpStream, task::JoinHandle};
use tonic::{body::Body, codegen::Service};
use tonic_health::{
    ServingStatus,
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};

use super::collector::{self, Collector};
use crate::headers_json;

/// Largest request head: HTTP/1.1 read buffer and HTTP/2 header list.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body counted; a larger one gets 413. Bodies are counted, never stored,
/// so this only bounds how long one request can keep the server reading.
const MAX_BODY: u64 = 256 << 20;
/// Longest `/delay/<ms>`.
pub const MAX_DELAY: Duration = Duration::from_secs(30);
/// Distinct `/flaky/` keys and `/_seen` paths remembered; beyond that, new flaky keys always
/// succeed and new paths are counted under [`OTHER_PATHS`].
const MAX_KEYS: usize = 4096;
const OTHER_PATHS: &str = "(other)";
/// Concurrent HTTP/2 streams per connection.
const MAX_STREAMS: u32 = 256;
/// How long in-flight requests may still finish once a connection has lived for its
/// `--timeout-ms` and was asked to shut down gracefully.
pub const GRACE: Duration = Duration::from_secs(5);
/// The health service that flips, and how often.
pub const TOGGLE_SERVICE: &str = "toggle";
pub const TOGGLE_EVERY: Duration = Duration::from_millis(50);

/// What one path asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Echo,
    Status(StatusCode),
    Delay(Duration),
    Flaky { key: &'a str, failures: u64 },
    Seen,
    Bad(String),
}

/// Maps a request path (without the query) to what the server does.
fn route(path: &str) -> Route<'_> {
    if path == "/_seen" {
        return Route::Seen;
    }
    if let Some(code) = path.strip_prefix("/status/") {
        return match code.parse::<u16>().ok().filter(|c| (200..=599).contains(c)) {
            Some(c) => StatusCode::from_u16(c).map_or_else(
                |e| Route::Bad(format!("bad status {code:?}: {e}")),
                Route::Status,
            ),
            None => Route::Bad(format!("bad status {code:?}: want 200..=599")),
        };
    }
    if let Some(ms) = path.strip_prefix("/delay/") {
        return match ms.parse::<u64>() {
            Ok(ms) => Route::Delay(Duration::from_millis(ms).min(MAX_DELAY)),
            Err(e) => Route::Bad(format!("bad delay {ms:?}: {e}")),
        };
    }
    if let Some(rest) = path.strip_prefix("/flaky/") {
        return match rest.rsplit_once('/') {
            Some((key, n)) if !key.is_empty() => match n.parse() {
                Ok(failures) => Route::Flaky { key, failures },
                Err(e) => Route::Bad(format!("bad failure count {n:?}: {e}")),
            },
            _ => Route::Bad(format!("want /flaky/<key>/<n>, got {path:?}")),
        };
    }
    Route::Echo
}

/// Per-server counters, shared by every connection of every `l7` listener of the process.
#[derive(Debug, Default)]
struct Counters {
    /// Requests seen so far per `/flaky/` key.
    flaky: HashMap<String, u64>,
    requests: u64,
    paths: BTreeMap<String, u64>,
}

impl Counters {
    /// Counts one request for `key` and returns which attempt it is (from 1) and whether it
    /// must fail.
    fn flaky(&mut self, key: &str, failures: u64) -> (u64, bool) {
        if self.flaky.len() >= MAX_KEYS && !self.flaky.contains_key(key) {
            // Out of room: report the attempt as past every failure.
            return (failures.saturating_add(1), false);
        }
        let attempt = self.flaky.entry(key.to_owned()).or_default();
        *attempt += 1;
        let attempt = *attempt;
        (attempt, attempt <= failures)
    }

    /// Counts one answered request for `/_seen`.
    fn seen(&mut self, path: &str) {
        self.requests += 1;
        let key = if self.paths.len() < MAX_KEYS || self.paths.contains_key(path) {
            path
        } else {
            OTHER_PATHS
        };
        *self.paths.entry(key.to_owned()).or_default() += 1;
    }

    fn seen_json(&self) -> Value {
        json!({"requests": self.requests, "paths": self.paths})
    }
}

/// The state of a process's `l7` listeners. Dropping it stops the health toggler.
pub struct L7 {
    name: Arc<str>,
    counters: Mutex<Counters>,
    health: HealthServer<HealthService>,
    collector: Collector,
    toggler: JoinHandle<()>,
}

impl Drop for L7 {
    fn drop(&mut self) {
        self.toggler.abort();
    }
}

impl L7 {
    /// Sets up the health statuses (both registered before the first request can arrive) and
    /// starts the toggler. Must run inside a tokio runtime.
    pub async fn new(name: Arc<str>) -> Arc<Self> {
        let reporter = HealthReporter::new();
        reporter
            .set_service_status(TOGGLE_SERVICE, ServingStatus::Serving)
            .await;
        let health = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
        Arc::new(Self {
            name,
            counters: Mutex::new(Counters::default()),
            health,
            collector: Collector::default(),
            toggler: tokio::spawn(toggle(reporter)),
        })
    }

    fn counters(&self) -> parking_lot::MutexGuard<'_, Counters> {
        // A panic while holding the lock cannot leave the counters inconsistent.
        self.counters.lock()
    }

    async fn answer(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, Infallible> {
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let uri_path = req.uri().path().to_owned();
        let route = route(&uri_path);
        if uri_path == "/_spans" {
            return Ok(reply(StatusCode::OK, &self.collector.json()));
        }
        if route != Route::Seen {
            self.counters().seen(&path);
        }
        if is_grpc(req.headers()) {
            if uri_path.starts_with(collector::PATH_PREFIX) {
                let mut server = self.collector.server();
                std::future::poll_fn(|cx| {
                    Service::<Request<Incoming>>::poll_ready(&mut server, cx)
                })
                .await?;
                return server.call(req).await;
            }
            return self.grpc(req).await;
        }
        let (parts, body) = req.into_parts();
        let mut info = json!({
            "server": &*self.name,
            "peer": peer.to_string(),
            "path": path,
            "authority": parts.uri.authority().map(http::uri::Authority::as_str),
            "method": parts.method.as_str(),
            "headers": headers_json(&parts.headers),
            "version": format!("{:?}", parts.version),
        });
        let body_bytes = match count_body(body).await {
            Ok(n) => n,
            Err((status, e)) => {
                info["error"] = Value::String(e);
                return Ok(reply(status, &info));
            }
        };
        info["body_bytes"] = body_bytes.into();
        let status = match route {
            Route::Echo => StatusCode::OK,
            Route::Status(status) => status,
            Route::Delay(delay) => {
                tokio::time::sleep(delay).await;
                StatusCode::OK
            }
            Route::Flaky { key, failures } => {
                let (attempt, fail) = self.counters().flaky(key, failures);
                info["attempt"] = attempt.into();
                if fail {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                }
            }
            Route::Seen => return Ok(reply(StatusCode::OK, &self.counters().seen_json())),
            Route::Bad(e) => {
                info["error"] = Value::String(e);
                StatusCode::BAD_REQUEST
            }
        };
        Ok(reply(status, &info))
    }

    async fn grpc(&self, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let mut health = self.health.clone();
        std::future::poll_fn(|cx| Service::<Request<Incoming>>::poll_ready(&mut health, cx))
            .await?;
        health.call(req).await
    }
}

/// Flips [`TOGGLE_SERVICE`] every [`TOGGLE_EVERY`] until aborted.
async fn toggle(reporter: HealthReporter) {
    let mut tick = tokio::time::interval(TOGGLE_EVERY);
    // The first tick is immediate; the status starts as SERVING.
    tick.tick().await;
    let mut serving = true;
    loop {
        tick.tick().await;
        serving = !serving;
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status(TOGGLE_SERVICE, status).await;
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Reads the whole request body, counting its bytes (up to [`MAX_BODY`]).
async fn count_body(mut body: Incoming) -> Result<u64, (StatusCode, String)> {
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| (StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?;
        if let Some(data) = frame.data_ref() {
            total += data.len() as u64;
            if total > MAX_BODY {
                return Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("body larger than {MAX_BODY} bytes"),
                ));
            }
        }
    }
    Ok(total)
}

fn reply(status: StatusCode, body: &Value) -> Response<Body> {
    // 204 and 304 cannot carry a body.
    let body = if matches!(status.as_u16(), 204 | 304) {
        Body::empty()
    } else {
        Body::new(Full::new(Bytes::from(body.to_string())))
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// Serves one connection, HTTP/1.1 or HTTP/2 (told apart by the HTTP/2 preface). After
/// `timeout` the connection is shut down gracefully (HTTP/2 GOAWAY, or HTTP/1.1 close after
/// the current response); the caller bounds the whole by `timeout` + [`GRACE`].
pub async fn serve_connection(
    l7: Arc<L7>,
    stream: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
) -> Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(timeout)
        .max_buf_size(MAX_HEAD);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD as u32)
        .max_concurrent_streams(MAX_STREAMS);
    let service = service_fn(move |req| l7.clone().answer(req, peer));
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        done = conn.as_mut() => return done.map_err(|e| anyhow!("serving: {e}")),
        () = tokio::time::sleep(timeout) => conn.as_mut().graceful_shutdown(),
    }
    conn.await
        .map_err(|e| anyhow!("serving (shutting down): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route() {
        assert_eq!(route("/"), Route::Echo);
        assert_eq!(route("/anything/else"), Route::Echo);
        assert_eq!(route("/status"), Route::Echo);
        assert_eq!(route("/_seen"), Route::Seen);
        assert_eq!(
            route("/status/503"),
            Route::Status(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(route("/status/204"), Route::Status(StatusCode::NO_CONTENT));
        for bad in [
            "/status/",
            "/status/x",
            "/status/199",
            "/status/600",
            "/status/5000",
        ] {
            assert!(matches!(route(bad), Route::Bad(_)), "{bad}");
        }
        assert_eq!(
            route("/delay/250"),
            Route::Delay(Duration::from_millis(250))
        );
        assert_eq!(route("/delay/99999999"), Route::Delay(MAX_DELAY));
        assert!(matches!(route("/delay/-1"), Route::Bad(_)));
        assert_eq!(
            route("/flaky/a/2"),
            Route::Flaky {
                key: "a",
                failures: 2
            }
        );
        // The key may itself contain slashes: the count is the last segment.
        assert_eq!(
            route("/flaky/a/b/0"),
            Route::Flaky {
                key: "a/b",
                failures: 0
            }
        );
        for bad in ["/flaky/", "/flaky/a", "/flaky//2", "/flaky/a/x"] {
            assert!(matches!(route(bad), Route::Bad(_)), "{bad}");
        }
    }

    #[test]
    fn flaky_fails_the_first_n_per_key() {
        let mut c = Counters::default();
        assert_eq!(c.flaky("k", 2), (1, true));
        assert_eq!(c.flaky("k", 2), (2, true));
        assert_eq!(c.flaky("k", 2), (3, false));
        assert_eq!(c.flaky("k", 2), (4, false));
        // Keys are independent.
        assert_eq!(c.flaky("other", 1), (1, true));
        assert_eq!(c.flaky("zero", 0), (1, false));
    }

    #[test]
    fn flaky_keys_are_bounded() {
        let mut c = Counters::default();
        for i in 0..MAX_KEYS {
            c.flaky(&i.to_string(), 5);
        }
        assert_eq!(c.flaky("new", 5), (6, false));
        assert_eq!(c.flaky.len(), MAX_KEYS);
        assert_eq!(c.flaky("0", 5), (2, true));
    }

    #[test]
    fn seen_counts_paths_boundedly() {
        let mut c = Counters::default();
        c.seen("/a");
        c.seen("/a");
        c.seen("/b?x=1");
        assert_eq!(
            c.seen_json(),
            json!({"requests": 3, "paths": {"/a": 2, "/b?x=1": 1}})
        );
        for i in 0..MAX_KEYS {
            c.seen(&format!("/{i}"));
        }
        assert_eq!(c.paths.len(), MAX_KEYS + 1);
        assert_eq!(c.paths.get(OTHER_PATHS), Some(&2));
        c.seen("/a");
        assert_eq!(c.paths.get("/a"), Some(&3));
    }
}
