//! The `pod-app` `l7` server and its `requests` and `grpc` clients, for tests of L7 proxying
//! (HTTP/1.1, HTTP/2, gRPC). The JSON they return is documented in `pod-app`'s sources
//! (`server/l7.rs`, `client/requests.rs`, `client/grpc.rs`).

use std::{net::SocketAddr, time::Duration};

use anyhow::{Result, bail};
use serde_json::Value;

use super::{Place, Server, Testbed};

/// The client's own bound when the options do not set one (`pod-app`'s default).
const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How much longer than the client's own bound a run may take before it is killed.
const RUN_MARGIN: Duration = Duration::from_secs(10);

/// What `pod-app requests` sends. `RequestsOpts::default()` is one `GET /` over HTTP/1.1.
#[derive(Debug, Clone)]
pub struct RequestsOpts {
    /// Path and query, starting with `/`.
    pub path: String,
    pub method: String,
    /// Extra headers, each `Name: value`. A `host` header replaces the default (the target
    /// address); in HTTP/2 it becomes the `:authority`.
    pub headers: Vec<String>,
    /// Requests in all.
    pub count: usize,
    /// HTTP/2 with prior knowledge instead of HTTP/1.1.
    pub http2: bool,
    /// HTTP/2: an `:authority` sent beside the `host` header (which then stays).
    pub authority: Option<String>,
    /// Request body size in bytes (the test pattern).
    pub body_bytes: u64,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Bound on the whole run (`--timeout-ms`); `None`: the client's default of 30 s.
    pub timeout: Option<Duration>,
}

impl Default for RequestsOpts {
    fn default() -> Self {
        Self {
            path: "/".to_owned(),
            method: "GET".to_owned(),
            headers: Vec::new(),
            count: 1,
            http2: false,
            authority: None,
            body_bytes: 0,
            concurrency: 1,
            timeout: None,
        }
    }
}

impl RequestsOpts {
    /// `count` GETs of `path` over HTTP/1.1.
    pub fn get(path: &str, count: usize) -> Self {
        Self {
            path: path.to_owned(),
            count,
            ..Self::default()
        }
    }
}

impl Testbed {
    /// Starts `pod-app serve --listen [::]:PORT=l7 --name NAME` at `place`, where NAME is the
    /// place's name (what `requests` counts in `servers`).
    pub fn spawn_l7_server<'a>(&self, place: impl Into<Place<'a>>, port: u16) -> Result<Server> {
        let place = place.into();
        let listen = format!("[::]:{port}=l7");
        let name = place.name().to_owned();
        self.spawn_server(place, &["--listen", &listen, "--name", &name])
    }

    /// Runs `pod-app requests` at `place` against `to` and returns its JSON:
    /// `{"sent","statuses":{"200":n},"servers":{"pod-0-1":n},"errors","first_error",
    /// "connections","last":{"status","headers","body"},"timed_out","elapsed_ms"}`.
    /// Failed requests are in the tally; an error here means the client did not run.
    pub fn requests<'a>(
        &self,
        place: impl Into<Place<'a>>,
        to: SocketAddr,
        opts: &RequestsOpts,
    ) -> Result<Value> {
        let timeout = opts.timeout.unwrap_or(DEFAULT_CLIENT_TIMEOUT);
        let mut cmd = vec![
            "pod-app".to_owned(),
            "--timeout-ms".to_owned(),
            timeout.as_millis().to_string(),
            "requests".to_owned(),
            "--to".to_owned(),
            to.to_string(),
            "--path".to_owned(),
            opts.path.clone(),
            "--method".to_owned(),
            opts.method.clone(),
            "--count".to_owned(),
            opts.count.to_string(),
            "--body-bytes".to_owned(),
            opts.body_bytes.to_string(),
            "--concurrency".to_owned(),
            opts.concurrency.to_string(),
        ];
        for header in &opts.headers {
            cmd.extend(["--header".to_owned(), header.clone()]);
        }
        if opts.http2 {
            cmd.push("--http2".to_owned());
        }
        if let Some(authority) = &opts.authority {
            cmd.extend(["--authority".to_owned(), authority.clone()]);
        }
        self.run(place, &cmd, timeout + RUN_MARGIN)?.ok_json()
    }

    /// Runs `pod-app grpc` at `place`: a gRPC health `Check` of `service` at `to` and, if
    /// `watch` > 0, a `Watch` reading that many messages. Returns
    /// `{"check":"SERVING","watched":N,"statuses":["SERVING",...],"ok":true}`; a gRPC error
    /// is an `Err` whose text contains e.g. `gRPC status Unavailable (14): ...`.
    pub fn grpc<'a>(
        &self,
        place: impl Into<Place<'a>>,
        to: SocketAddr,
        service: &str,
        watch: usize,
    ) -> Result<Value> {
        let to = to.to_string();
        let watch = watch.to_string();
        let mut cmd = vec!["pod-app", "grpc", "--to", &to, "--service", service];
        if watch != "0" {
            cmd.extend(["--watch", &watch]);
        }
        self.run(place, &cmd, DEFAULT_CLIENT_TIMEOUT + RUN_MARGIN)?
            .ok_json()
    }

    /// What the `l7` server at `to` has answered so far, asked from `place` (directly, or
    /// through whatever is in the way): `{"requests":N,"paths":{"/p":n,...}}`.
    pub fn l7_seen<'a>(&self, place: impl Into<Place<'a>>, to: SocketAddr) -> Result<Value> {
        let out = self.requests(place, to, &RequestsOpts::get("/_seen", 1))?;
        let seen = &out["last"]["body"];
        if out["statuses"]["200"] != 1 || !seen["paths"].is_object() {
            bail!("no /_seen answer from {to}: {out}");
        }
        Ok(seen.clone())
    }
}
