//! HBONE from source agents, terminated: accept -> TLS as the waypoint's identity -> HTTP/2
//! CONNECT per client connection -> classify the destination (a service or pod that uses
//! this waypoint, nothing else) -> 200 -> serve HTTP/1.1 or HTTP/2 on the tunnel, each request
//! through [`super::forward`].
//!
//! The waypoint is not an open relay: a CONNECT for anything that does not name this waypoint
//! is refused with 400 and counted. Limits bound what one peer can make it hold: handshake and
//! first-request deadlines, concurrent tunnels per connection, header sizes, concurrent
//! requests, HTTP/2 rapid-reset protection on both layers, and on the HBONE layer the same
//! control-frame flood guard as the agents' ([`hbone::flood`]).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::{Target, WaypointInputs, forward::Downstream};
use crate::{
    hbone::{
        self, H2Io, flood,
        server::{Next, Server},
    },
    identity::Identity,
    metrics::{Direction, FailureReason},
    proxy::{AccessLog, ClientAddr},
    tls,
};

/// Smallest read buffer hyper's HTTP/1.1 server accepts; header limits below it are rounded up.
const MIN_H1_BUFFER: usize = 8192;
/// Time a tunnelled client has to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn handle(inputs: Arc<WaypointInputs>, stream: TcpStream, client: ClientAddr) {
    let started = Instant::now();
    let handshake_timeout = Duration::from_millis(inputs.limits.handshake_timeout_ms);
    let acceptor = tokio_rustls::TlsAcceptor::from(inputs.server_tls.clone());
    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            return refuse(
                &inputs,
                client.0,
                None,
                started,
                FailureReason::TlsHandshake,
                format!("TLS handshake failed: {e}"),
            );
        }
        Err(_) => {
            return refuse(
                &inputs,
                client.0,
                None,
                started,
                FailureReason::HandshakeTimeout,
                "TLS handshake not completed in time".into(),
            );
        }
    };
    let Some(peer) = tls::peer_identity(tls.get_ref().1) else {
        return refuse(
            &inputs,
            client.0,
            None,
            started,
            FailureReason::TlsHandshake,
            "no verified identity after handshake".into(),
        );
    };
    let peer = Arc::new(peer);
    let flooded = tokio_util::sync::CancellationToken::new();
    let transport = flood::FloodGuard::new(tls, flooded.clone());
    let max_tunnels = inputs.limits.max_tunnels_per_connection;
    let mut server = match tokio::time::timeout(
        handshake_timeout,
        Server::handshake(transport, max_tunnels),
    )
    .await
    {
        Ok(Ok(server)) => server,
        Ok(Err(e)) => {
            tracing::debug!(peer = %client.0, identity = %peer, error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            let error = "HTTP/2 preface not received in time".to_owned();
            return refuse(
                &inputs,
                client.0,
                Some(&peer),
                started,
                FailureReason::HandshakeTimeout,
                error,
            );
        }
    };
    let mut closing = false;
    loop {
        tokio::select! {
            next = server.next() => match next {
                Next::Stream(request, respond) => {
                    tunnel(&inputs, &peer, client.0, request, respond);
                }
                Next::Closed | Next::Failed(_) if flooded.is_cancelled() => {
                    return flood_ended(&inputs, client.0, &peer, started);
                }
                Next::Closed => return,
                Next::Failed(e) => {
                    tracing::debug!(peer = %client.0, identity = %peer, error = %e, "HBONE connection ended with error");
                    return;
                }
            },
            () = flooded.cancelled() => {
                server.drain(flood::GRACE).await;
                return flood_ended(&inputs, client.0, &peer, started);
            }
            () = inputs.shutdown.cancelled(), if !closing => {
                closing = true;
                server.graceful_shutdown();
            }
        }
    }
}

/// Counts and logs a connection ended for a flood of HTTP/2 control frames.
fn flood_ended(inputs: &WaypointInputs, addr: SocketAddr, peer: &Identity, started: Instant) {
    let error = format!(
        "more than {} PING or SETTINGS frames in {:?}; sent GOAWAY(ENHANCE_YOUR_CALM)",
        flood::MAX_CONTROL_FRAMES,
        flood::WINDOW
    );
    refuse(
        inputs,
        addr,
        Some(peer),
        started,
        FailureReason::Http2Flood,
        error,
    );
}

/// One CONNECT: classify, then serve HTTP on the tunnel (a task of its own), or refuse it.
fn tunnel(
    inputs: &Arc<WaypointInputs>,
    peer: &Arc<Identity>,
    peer_addr: SocketAddr,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let started = Instant::now();
    let mut refused = |reason: FailureReason, error: String| {
        refuse(inputs, peer_addr, Some(peer), started, reason, error);
        hbone::server::respond(&mut respond, StatusCode::BAD_REQUEST);
    };
    if req.method() != Method::CONNECT {
        return refused(
            FailureReason::BadMethod,
            format!("method {} is not CONNECT", req.method()),
        );
    }
    let dst = match hbone::parse_authority(req.uri().authority().map(http::uri::Authority::as_str))
    {
        Ok(dst) => dst,
        Err(e) => return refused(FailureReason::BadAuthority, e.to_string()),
    };
    let mesh = inputs.mesh.load_full();
    let Some(target) = Target::classify(&mesh, &inputs.me, dst) else {
        return refused(
            FailureReason::NotServed,
            format!("{dst} does not use waypoint {}", inputs.me),
        );
    };
    // Telemetry only: the client as its node reported it, believed only when that address
    // belongs to a workload holding the identity that authenticated.
    let client_addr = req
        .headers()
        .get(http::header::FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(hbone::parse_forwarded_for);
    let source = client_addr
        .and_then(|a| mesh.known_workload_by_ip(a.ip()))
        .filter(|w| w.identity == **peer)
        .cloned();
    let downstream = Arc::new(Downstream {
        inputs: inputs.clone(),
        peer: peer.clone(),
        source,
        client_addr: client_addr.unwrap_or(peer_addr),
        target,
    });
    match hbone::server::accept(respond, req) {
        Ok(stream) => {
            let io = TokioIo::new(H2Io::new(stream));
            inputs.tasks.spawn(serve_http(downstream, io));
        }
        Err(e) => tracing::debug!(error = %e, "tunnel not established"),
    }
}

/// Serves HTTP/1.1 or HTTP/2 (by the client's preface) on one tunnel until it closes.
async fn serve_http(downstream: Arc<Downstream>, tunnel: TokioIo<H2Io>) {
    let limits = &downstream.inputs.limits;
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size((limits.max_header_bytes as usize).max(MIN_H1_BUFFER))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes)
        .max_concurrent_streams(limits.max_concurrent_requests)
        .max_pending_accept_reset_streams(hbone::MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(Some(hbone::MAX_PENDING_ACCEPT_RESETS))
        .keep_alive_interval(hbone::KEEPALIVE_INTERVAL)
        .keep_alive_timeout(hbone::KEEPALIVE_TIMEOUT);
    let service = hyper::service::service_fn({
        let downstream = downstream.clone();
        move |req| {
            let downstream = downstream.clone();
            async move { Ok::<_, Infallible>(super::forward::handle(downstream, req).await) }
        }
    });
    let connection = builder.serve_connection(tunnel, service);
    tokio::pin!(connection);
    let shutdown = downstream.inputs.shutdown.clone();
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    downstream.inputs.metrics.fail(Direction::Inbound, FailureReason::HttpProtocol);
                    tracing::info!(target: "access", client = %downstream.client_addr, identity = %downstream.peer, error = %e, "client HTTP connection ended with a protocol error");
                }
                return;
            }
            () = shutdown.cancelled(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Counts and logs a refused connection or tunnel.
fn refuse(
    inputs: &WaypointInputs,
    addr: SocketAddr,
    identity: Option<&Identity>,
    started: Instant,
    reason: FailureReason,
    error: String,
) {
    inputs.metrics.fail(Direction::Inbound, reason);
    AccessLog {
        src_identity: identity,
        error: Some(format!("{reason}: {error}")),
        ..AccessLog::new(Direction::Inbound, "waypoint", addr, started)
    }
    .emit(&inputs.access_log, &inputs.metrics);
}
