//! Inbound: HBONE from other nodes' agents, delivered to pods on this node.
//!
//! accept -> TLS (client certificate required, identity verified) -> HTTP/2 -> per stream:
//! classify the CONNECT (method, authority, local pod, identity presented) -> authorize ->
//! dial the pod (from the client's address when the peer's identity owns it, see
//! [`super::transparent`]) -> 200 and copy. Anything else is answered with an HTTP status, a log line
//! naming the reason, and a counter; the connection and every other stream keep going.
//!
//! **Authorization** runs before the pod is dialled, on the identity of the verified client
//! certificate. The source address (from the source node's `forwarded` header) is used for
//! `ipBlocks` only when it belongs to a workload holding that same identity; otherwise it is
//! unknown and `ipBlocks` conditions fail closed. A denial is a 401 whose log line names the
//! policy and rule. Delivered connections stay registered ([`authorized`]) so that a policy
//! change closes the ones it now denies.
//!
//! Agents learn of a pod joining or leaving the mesh at slightly different moments, so a peer
//! may still (or already) treat a local pod as meshed when this node does not. A CONNECT to a
//! local pod that is known but not enrolled here is therefore delivered like any other (the
//! identity it was opened for must still be the pod's; the pod accepts plain connections
//! anyway), and a handshake naming the identity of such a pod waits, within the handshake
//! deadline, for its certificate rather than failing a pod that is joining.

pub mod authorized;

use std::{net::SocketAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Method, Request, StatusCode};
use tokio::net::TcpStream;

use super::{AccessLog, ClientAddr, ProxyInputs, copy::Counted, read_ahead::ReadAhead};
use crate::{
    hbone::{
        self, flood,
        server::{Next, Server},
    },
    identity::{Identity, store::certificate_serial},
    metrics::{Direction, FailureReason, Reporter, SecurityPolicy, ServiceLabels, TcpLabels},
    policy::{Destination, Flow},
    state::{MeshState, Workload},
    tls,
};

/// One accepted HBONE connection: who is on the other end, and which of our identities they
/// asked for.
struct Peer {
    inputs: Arc<ProxyInputs>,
    addr: SocketAddr,
    identity: Identity,
    /// Serial number (hex) of the certificate the client authenticated with.
    cert_serial: String,
    /// The local identity presented in the handshake; CONNECTs must target a pod holding it.
    presented: Identity,
}

pub async fn handle(inputs: Arc<ProxyInputs>, stream: TcpStream, client: ClientAddr) {
    let started = Instant::now();
    // Limit: unauthenticated peers hold at most so many handshakes at once.
    let handshake_permit = match inputs.limits.handshake() {
        Ok(permit) => permit,
        Err(e) => {
            super::reset(stream);
            return refuse_connection(&inputs, client, started, e.reason(), e.to_string());
        }
    };
    // Read the ClientHello first, so a refusal can name its reason.
    let handshake = async {
        let start = tokio_rustls::LazyConfigAcceptor::new(
            rustls::server::Acceptor::default(),
            ReadAhead::new(stream),
        )
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let hello = start.client_hello();
        if !hello
            .alpn()
            .is_some_and(|mut p| p.any(|p| p == tls::ALPN_H2))
        {
            return Err("TLS handshake refused: client did not offer ALPN h2".to_owned());
        }
        let name = hello.server_name().map(str::to_owned);
        match name
            .as_deref()
            .map(|n| Identity::from_sni(n, inputs.certs.trust_domain()))
        {
            Some(Ok(id)) if inputs.certs.get(&id).is_some() => {}
            // A local pod whose certificate is being fetched, or which is joining the mesh:
            // wait (within the handshake deadline) rather than refuse its first peers.
            Some(Ok(id))
                if runs_locally(&inputs.state.load(), &id)
                    && inputs
                        .certs
                        .wait_for(&id, inputs.settings.handshake_timeout)
                        .await
                        .is_some() => {}
            Some(Ok(id)) => {
                return Err(format!(
                    "TLS handshake refused: no certificate held for {id}"
                ));
            }
            _ => {
                return Err(format!(
                    "TLS handshake refused: server name {name:?} names no local workload identity"
                ));
            }
        }
        start
            .into_stream(inputs.server_tls.clone())
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))
    };
    let tls = match tokio::time::timeout(inputs.settings.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            return refuse_connection(&inputs, client, started, FailureReason::TlsHandshake, e);
        }
        Err(_) => {
            return refuse_connection(
                &inputs,
                client,
                started,
                FailureReason::HandshakeTimeout,
                "TLS handshake not completed in time".into(),
            );
        }
    };
    drop(handshake_permit);
    let conn = tls.get_ref().1;
    let identity = tls::peer_identity(conn);
    let cert_serial = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(certificate_serial)
        .unwrap_or_default();
    let presented = conn
        .server_name()
        .and_then(|n| Identity::from_sni(n, inputs.certs.trust_domain()).ok());
    let (Some(identity), Some(presented)) = (identity, presented) else {
        // The verifiers make this unreachable; refuse rather than trust an unnamed peer.
        return refuse_connection(
            &inputs,
            client,
            started,
            FailureReason::TlsHandshake,
            "no verified identity after handshake".into(),
        );
    };
    let peer = Arc::new(Peer {
        inputs: inputs.clone(),
        addr: client.0,
        identity,
        cert_serial,
        presented,
    });

    let flooded = tokio_util::sync::CancellationToken::new();
    let transport = flood::FloodGuard::new(tls, flooded.clone());
    // A peer that completes the handshake but never sends a CONNECT is closed after the
    // handshake timeout, so idle sockets cannot pile up.
    let first_request = tokio::time::sleep(inputs.settings.handshake_timeout);
    tokio::pin!(first_request);
    let settings = &inputs.settings;
    let mut server = tokio::select! {
        server = Server::handshake(transport, settings.max_streams_per_connection) => match server {
            Ok(server) => server,
            Err(e) => {
                tracing::debug!(peer = %peer.addr, identity = %peer.identity, error = %e, "HTTP/2 handshake failed");
                return;
            }
        },
        () = &mut first_request => return idle_ended(&peer, started),
    };
    let mut closing = false;
    let mut saw_stream = false;
    loop {
        tokio::select! {
            next = server.next() => match next {
                Next::Stream(request, respond) => {
                    saw_stream = true;
                    inputs.tasks.spawn(peer.clone().stream(request, respond));
                }
                Next::Closed | Next::Failed(_) if flooded.is_cancelled() => {
                    return flood_ended(&peer, started);
                }
                Next::Closed => return,
                Next::Failed(e) => {
                    tracing::debug!(peer = %peer.addr, identity = %peer.identity, error = %e, "HBONE connection ended with error");
                    return;
                }
            },
            () = flooded.cancelled() => {
                // The transport writes GOAWAY and closes; a peer that does not read gets
                // only a short grace.
                server.drain(flood::GRACE).await;
                return flood_ended(&peer, started);
            }
            () = inputs.shutdown.cancelled(), if !closing => {
                closing = true;
                server.graceful_shutdown();
            }
            () = &mut first_request, if !closing && !saw_stream => {
                return idle_ended(&peer, started);
            }
        }
    }
}

/// Counts and logs a connection closed for sending no CONNECT in time.
fn idle_ended(peer: &Peer, started: Instant) {
    let inputs = &peer.inputs;
    inputs
        .metrics
        .fail(Direction::Inbound, FailureReason::IdleConnection);
    AccessLog {
        src_identity: Some(&peer.identity),
        src_cert_serial: Some(&peer.cert_serial),
        error: Some(format!(
            "idle_connection: no request within {:?} of the handshake",
            inputs.settings.handshake_timeout
        )),
        ..AccessLog::new(Direction::Inbound, "hbone", peer.addr, started)
    }
    .emit(&inputs.access_log, &inputs.metrics);
}

/// Counts and logs (as the connection's access log event) a connection ended for a flood of
/// HTTP/2 control frames.
fn flood_ended(peer: &Peer, started: Instant) {
    let inputs = &peer.inputs;
    inputs
        .metrics
        .fail(Direction::Inbound, FailureReason::Http2Flood);
    AccessLog {
        src_identity: Some(&peer.identity),
        src_cert_serial: Some(&peer.cert_serial),
        error: Some(format!(
            "http2_flood: more than {} PING or SETTINGS frames in {:?}; sent GOAWAY(ENHANCE_YOUR_CALM)",
            flood::MAX_CONTROL_FRAMES,
            flood::WINDOW
        )),
        ..AccessLog::new(Direction::Inbound, "hbone", peer.addr, started)
    }
    .emit(&inputs.access_log, &inputs.metrics);
}

/// Re-authorizes open connections to local pods whenever a new state changes the policies,
/// the waypoints pods must be reached through, or the local workloads (whose labels select
/// policies), until `shutdown`.
pub async fn reauthorize(
    inputs: Arc<ProxyInputs>,
    mut states: tokio::sync::watch::Receiver<Option<Arc<MeshState>>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut last: Option<Arc<MeshState>> = None;
    loop {
        let state = states.borrow_and_update().clone();
        if let Some(state) = state {
            let changed = last.as_ref().is_none_or(|last| {
                !Arc::ptr_eq(last.policy(), state.policy())
                    || !last.same_guards(&state)
                    || last
                        .workloads()
                        .iter()
                        .filter(|w| last.is_local(w))
                        .ne(state.workloads().iter().filter(|w| state.is_local(w)))
            });
            if changed {
                let closed = inputs.authorized.reevaluate(&state);
                if closed > 0 {
                    tracing::info!(closed, "closed inbound connections the new policies deny");
                }
            }
            last = Some(state);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = states.changed() => if changed.is_err() { return },
        }
    }
}

/// Whether a pod of this node runs as `identity`, enrolled in the mesh or not yet.
fn runs_locally(state: &MeshState, identity: &Identity) -> bool {
    state
        .workloads()
        .iter()
        .any(|w| state.is_local(w) && &w.identity == identity)
}

fn refuse_connection(
    inputs: &ProxyInputs,
    client: ClientAddr,
    started: Instant,
    reason: FailureReason,
    error: String,
) {
    inputs.metrics.fail(Direction::Inbound, reason);
    AccessLog {
        error: Some(error),
        ..AccessLog::new(Direction::Inbound, "hbone", client.0, started)
    }
    .emit(&inputs.access_log, &inputs.metrics);
}

impl Peer {
    /// One CONNECT: classify, authorize, dial the pod, answer, copy; or refuse.
    async fn stream(self: Arc<Self>, req: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
        let started = Instant::now();
        let inputs = &self.inputs;

        // Classify.
        if req.method() != Method::CONNECT {
            return self.refuse(
                &mut respond,
                started,
                StatusCode::BAD_REQUEST,
                FailureReason::BadMethod,
                format!("method {} is not CONNECT", req.method()),
            );
        }
        let dst =
            match hbone::parse_authority(req.uri().authority().map(http::uri::Authority::as_str)) {
                Ok(dst) => dst,
                Err(e) => {
                    return self.refuse(
                        &mut respond,
                        started,
                        StatusCode::BAD_REQUEST,
                        FailureReason::BadAuthority,
                        e.to_string(),
                    );
                }
            };
        let state = inputs.state.load_full();
        // Enrolled or not (see the module docs): only which node it is on matters here.
        let target = match state
            .workload_by_ip(dst.ip())
            .or_else(|| state.known_workload_by_ip(dst.ip()))
        {
            Some(w) if state.is_local(w) => w.clone(),
            _ => {
                return self.refuse(
                    &mut respond,
                    started,
                    StatusCode::BAD_REQUEST,
                    FailureReason::NotLocal,
                    format!("{dst} is not a pod on this node"),
                );
            }
        };
        if target.identity != self.presented {
            return self.refuse(
                &mut respond,
                started,
                StatusCode::BAD_REQUEST,
                FailureReason::IdentityMismatch,
                format!(
                    "{dst} runs as {}, but this connection was opened for {}",
                    target.identity, self.presented
                ),
            );
        }
        // Telemetry only: the client's address as its node reported it.
        let client_addr = req
            .headers()
            .get(http::header::FORWARDED)
            .and_then(|v| v.to_str().ok())
            .and_then(hbone::parse_forwarded_for)
            .unwrap_or(self.addr);
        let src_workload = state
            .workload_by_ip(client_addr.ip())
            .filter(|w| w.identity == self.identity)
            .cloned();

        // A workload behind a waypoint takes connections from the waypoint only.
        if let Err(bypass) = state.guards(&target).admit(Some(&self.identity)) {
            return self.refuse(
                &mut respond,
                started,
                StatusCode::UNAUTHORIZED,
                FailureReason::WaypointBypass,
                format!("to {dst} ({}/{}): {bypass}", target.namespace, target.name),
            );
        }

        // Authorize (see the module docs).
        let grant = authorized::Grant {
            destination_uid: target.uid.clone(),
            port: dst.port(),
            source: self.identity.clone(),
            source_ip: src_workload.as_ref().map(|_| client_addr.ip()),
        };
        let decision = state.policy().decide(&Flow {
            destination: Destination::of(&target),
            port: grant.port,
            source: Some(&grant.source),
            source_ip: grant.source_ip,
        });
        if !decision.is_allowed() {
            return self.refuse(
                &mut respond,
                started,
                StatusCode::UNAUTHORIZED,
                FailureReason::PolicyDenied,
                format!(
                    "to {dst} ({}/{}): {decision}",
                    target.namespace, target.name
                ),
            );
        }

        // Deliver.
        let permit = match inputs.limits.connection(None) {
            Ok(permit) => permit,
            Err(e) => {
                return self.refuse(
                    &mut respond,
                    started,
                    StatusCode::SERVICE_UNAVAILABLE,
                    e.reason(),
                    e.to_string(),
                );
            }
        };
        // The pod sees the client's address when the peer's identity owns it (see
        // `transparent`), else the node's.
        let source = inputs.source.for_hbone(
            &state,
            &self.identity,
            client_addr.ip(),
            self.addr.ip(),
            dst.ip(),
        );
        if let crate::proxy::transparent::PodSource::Node(reason) = source {
            inputs.metrics.delivered_from_node(reason);
        }
        let dialled = inputs
            .source
            .dial(source, dst, inputs.settings.connect_timeout)
            .await;
        let (mut upstream, record) = match dialled {
            Ok(upstream) => upstream,
            Err(e) => {
                return self.refuse(
                    &mut respond,
                    started,
                    StatusCode::SERVICE_UNAVAILABLE,
                    FailureReason::UpstreamUnreachable,
                    format!("cannot connect to {dst}: {e}"),
                );
            }
        };
        // Telemetry names the source by the reported client when it is the peer's, else by
        // the peer's identity when every workload holding it is one workload (a waypoint
        // relays other pods' requests under its own identity, from an address that may be
        // its node's).
        let telemetry_source = src_workload.clone().or_else(|| {
            let mut holders = state
                .workloads()
                .iter()
                .filter(|w| w.identity == self.identity);
            let first = holders.next()?;
            let same = |w: &&Arc<Workload>| {
                w.namespace == first.namespace
                    && w.telemetry.workload_name == first.telemetry.workload_name
            };
            holders.all(|w| same(&w)).then(|| first.clone())
        });
        let labels = TcpLabels::new(Reporter::Destination, SecurityPolicy::MutualTls)
            .with_source(telemetry_source.as_deref(), Some(&self.identity))
            .with_destination(Some(&target), Some(&target.identity))
            .with_service(ServiceLabels::serving(&state, dst));
        inputs.metrics.opened.get_or_create(&labels).inc();
        let active = inputs.metrics.active(Direction::Inbound);
        let registration = inputs.authorized.register(grant);
        let _permit = permit;
        let _active = active;
        let mut counted = Counted::default();
        let error = match hbone::server::accept(respond, req) {
            Ok(mut tunnel) => {
                let copied = tokio::select! {
                    result = super::copy::hbone(&mut upstream, &mut tunnel, &mut counted, inputs.settings.timeouts) => Some(result),
                    () = registration.close.cancelled() => None,
                };
                let error = match copied {
                    Some(Ok(())) => None,
                    Some(Err(e)) => {
                        if e.kind() == std::io::ErrorKind::TimedOut {
                            inputs
                                .metrics
                                .fail(Direction::Inbound, FailureReason::IdleTimeout);
                        }
                        Some(e.to_string())
                    }
                    None => {
                        inputs
                            .metrics
                            .fail(Direction::Inbound, FailureReason::PolicyRevoked);
                        Some(match registration.revoked() {
                            Some(decision) => {
                                format!("policy_revoked: closed after a policy change: {decision}")
                            }
                            None => "policy_revoked: closed after a policy change".to_owned(),
                        })
                    }
                };
                if error.is_some() {
                    // The source node resets its pod's connection: an abort stays an abort.
                    tunnel.reset();
                }
                error
            }
            Err(e) => Some(format!("tunnel not established: {e}")),
        };
        if error.is_some() {
            // The pod learns its connection was cut, not finished.
            super::reset(upstream);
            if let Some(record) = record {
                record.reset();
            }
        } else {
            super::finished(upstream);
            drop(record);
        }
        drop(registration);
        // The copy counts from the pod's socket: towards the tunnel is what the pod sent.
        let (sent, received) = (counted.b_to_a, counted.a_to_b);
        let metrics = &inputs.metrics;
        metrics.closed.get_or_create(&labels).inc();
        // From the destination's point of view: sent towards the pod, received from it.
        metrics.sent_bytes.get_or_create(&labels).inc_by(sent);
        metrics
            .received_bytes
            .get_or_create(&labels)
            .inc_by(received);
        AccessLog {
            direction: Direction::Inbound,
            path: "hbone",
            src_addr: client_addr,
            src_workload: src_workload.as_deref(),
            src_identity: Some(&self.identity),
            src_cert_serial: Some(&self.cert_serial),
            dst_addr: Some(dst),
            dst_workload: Some(&target),
            dst_identity: Some(&target.identity),
            dst_service: None,
            sent,
            received,
            started,
            error,
            delivered_from: Some(source),
        }
        .emit(&inputs.access_log, &inputs.metrics);
    }

    /// Answers the stream with `status`, counting and logging the reason.
    fn refuse(
        &self,
        respond: &mut SendResponse<Bytes>,
        started: Instant,
        status: StatusCode,
        reason: FailureReason,
        error: String,
    ) {
        self.inputs.metrics.fail(Direction::Inbound, reason);
        AccessLog {
            src_identity: Some(&self.identity),
            src_cert_serial: Some(&self.cert_serial),
            error: Some(format!("{} {reason}: {error}", status.as_u16())),
            ..AccessLog::new(Direction::Inbound, "hbone", self.addr, started)
        }
        .emit(&self.inputs.access_log, &self.inputs.metrics);
        hbone::server::respond(respond, status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_round_trips() {
        let addr: SocketAddr = "[fd00::1]:4000".parse().expect("addr");
        assert_eq!(
            hbone::parse_forwarded_for(&hbone::forwarded_for(addr)),
            Some(addr)
        );
        assert_eq!(hbone::parse_forwarded_for("for=garbage"), None);
    }
}
