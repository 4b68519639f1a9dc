//! Outbound: connections the datapath redirected away from a local pod.
//!
//! accept -> classify (original destination, source pod by cgroup) -> resolve (a service's
//! virtual IP stands for its ready endpoints, anything else for itself: [`resolve`]) -> tunnel
//! (the first candidate that opens: HBONE to its node, straight to a local pod, or plain TCP
//! out of the mesh; a service moves to its next endpoint when one fails: [`tunnel`]) -> copy.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::TcpStream;

use super::{
    AccessLog, ClientAddr, ProxyInputs,
    copy::{self, Counted},
    finished,
    inbound::authorized::Registration,
    reset, reset_on_crash,
};
use crate::{
    config::UnknownDestination,
    metrics::{Direction, FailureReason, Reporter, SecurityPolicy, ServiceLabels, TcpLabels},
};

mod resolve;
mod tunnel;

use resolve::Route;
use tunnel::{Attempt, Upstream};

pub async fn handle(inputs: Arc<ProxyInputs>, stream: TcpStream, client: ClientAddr) {
    let started = Instant::now();
    let _active = inputs.metrics.active(Direction::Outbound);
    let mut log = AccessLog::new(Direction::Outbound, "none", client.0, started);
    reset_on_crash(&stream);

    // Classify: where was it going, who sent it.
    let Some((dst, cgroup)) = inputs.original_dst.lookup(client) else {
        let error = "no original destination recorded: connection was not redirected by the \
                     datapath";
        let reason = FailureReason::NoOriginalDestination;
        return refuse(&inputs, log, stream, reason, error.into());
    };
    log.dst_addr = Some(dst.0);
    let state = inputs.state.load_full();
    let Some(src) = state.workload_by_cgroup(cgroup).cloned() else {
        let error = format!("connection from cgroup {cgroup}, which belongs to no local workload");
        return refuse(&inputs, log, stream, FailureReason::UnknownSource, error);
    };
    log.src_workload = Some(&src);
    log.src_identity = Some(&src.identity);
    // Limit: one pod cannot hold the node's descriptors.
    let permit = match inputs.limits.connection(Some(cgroup)) {
        Ok(permit) => permit,
        Err(e) => return refuse(&inputs, log, stream, e.reason(), e.to_string()),
    };

    // Resolve: what the destination stands for.
    let destination = match resolve::destination(&state, &src, dst.0) {
        Ok(destination) => destination,
        Err(e) => {
            let service = e.service().cloned();
            log.dst_service = service.as_ref().map(|s| s.hostname.as_str());
            return refuse(&inputs, log, stream, e.reason(), e.to_string());
        }
    };
    let service = destination.service();
    log.dst_service = service.map(|s| s.hostname.as_str());
    // A service is in the mesh's registry: its endpoints are reached even when destinations
    // the mesh does not know are denied.
    let passthrough_allowed =
        service.is_some() || inputs.settings.unknown_destination == UnknownDestination::Passthrough;

    // Tunnel: the first candidate that opens.
    let opened = tunnel::open_first(
        &inputs,
        &state,
        &src,
        destination.candidates(),
        passthrough_allowed,
        destination.waypoint(),
        client,
    )
    .await;
    let (opened, failed) = match opened {
        Ok(opened) => opened,
        Err(failed) => {
            let (reason, error) = failure(log.dst_service, &failed);
            if let Some(last) = failed.last() {
                upstream_of(&mut log, last.addr, last.route.as_ref());
            }
            return refuse(&inputs, log, stream, reason, error);
        }
    };
    for attempt in &failed {
        tracing::warn!(
            service = log.dst_service.unwrap_or_default(),
            endpoint = %attempt.addr,
            error = %attempt.error,
            "service endpoint did not connect; a later one did"
        );
    }
    upstream_of(&mut log, opened.addr, Some(&opened.route));
    let security = if matches!(opened.route, Route::Remote(..) | Route::Waypoint(..)) {
        SecurityPolicy::MutualTls
    } else {
        SecurityPolicy::None
    };
    let labels = TcpLabels::new(Reporter::Source, security)
        .with_source(Some(&src), Some(&src.identity))
        .with_destination(log.dst_workload, log.dst_identity)
        .with_service(ServiceLabels::of(service.map(AsRef::as_ref)));
    inputs.metrics.opened.get_or_create(&labels).inc();

    // Copy.
    let timeouts = inputs.settings.timeouts;
    let (sent, received, error) = match opened.upstream {
        Upstream::Tcp(upstream) => copy_tcp(&inputs, stream, upstream, None).await,
        Upstream::Local(upstream, registration, delivered) => {
            log.delivered_from = Some(delivered.source);
            let copied = copy_tcp(&inputs, stream, upstream, Some(&registration)).await;
            // A failed copy reset the pod's socket: no TIME_WAIT to wait out.
            if let (Some(record), Some(_)) = (delivered.record, &copied.2) {
                record.reset();
            }
            copied
        }
        Upstream::Hbone(mut tunnel) => {
            let mut stream = stream;
            let mut counted = Counted::default();
            let result = copy::hbone(&mut stream, &mut tunnel.stream, &mut counted, timeouts).await;
            let error = match result {
                Ok(()) => {
                    finished(stream);
                    None
                }
                Err(e) => {
                    // Either end broke, or the connection timed out: each side learns it
                    // was cut, not finished (RST_STREAM towards the peer, RST to the pod).
                    tunnel.stream.reset();
                    reset(stream);
                    Some(failed_copy(&inputs, &e))
                }
            };
            drop(tunnel);
            (counted.a_to_b, counted.b_to_a, error)
        }
    };
    drop(permit);

    // Account.
    inputs.metrics.closed.get_or_create(&labels).inc();
    inputs
        .metrics
        .sent_bytes
        .get_or_create(&labels)
        .inc_by(sent);
    inputs
        .metrics
        .received_bytes
        .get_or_create(&labels)
        .inc_by(received);
    log.sent = sent;
    log.received = received;
    log.error = error;
    log.emit(&inputs.access_log, &inputs.metrics);
}

/// Records the upstream tried last (the one the bytes go to, once open) in the access log.
fn upstream_of<'a>(log: &mut AccessLog<'a>, addr: SocketAddr, route: Option<&'a Route>) {
    log.dst_addr = Some(addr);
    log.path = route.map_or("none", Route::path);
    let workload = route.and_then(Route::workload);
    log.dst_workload = workload.map(std::convert::AsRef::as_ref);
    log.dst_identity = match route {
        Some(Route::Waypoint(waypoint, _)) => Some(&waypoint.identity),
        _ => workload.map(|w| &w.identity),
    };
}

/// Counts, logs and resets a connection that cannot proceed.
fn refuse(
    inputs: &ProxyInputs,
    mut log: AccessLog<'_>,
    stream: TcpStream,
    reason: FailureReason,
    error: String,
) {
    inputs.metrics.fail(Direction::Outbound, reason);
    log.error = Some(error);
    log.emit(&inputs.access_log, &inputs.metrics);
    reset(stream);
}

/// The metrics reason and the error for a connection none of whose candidates opened. A
/// direct destination reports its one attempt as it is; a service names every attempt.
fn failure(service: Option<&str>, failed: &[Attempt]) -> (FailureReason, String) {
    let Some(service) = service else {
        return match failed {
            [only] => (only.reason, only.error.clone()),
            _ => (
                FailureReason::UpstreamUnreachable,
                "no candidate to connect to".into(),
            ),
        };
    };
    let tried = failed
        .iter()
        .enumerate()
        .map(|(i, a)| format!("attempt {} to {}: {}", i + 1, a.addr, a.error))
        .collect::<Vec<_>>()
        .join("; ");
    match failed.last() {
        // Stopped at an answer every endpoint would give: that is the reason.
        Some(last) if !last.retry => (last.reason, format!("service {service}: {tried}")),
        _ => (
            FailureReason::EndpointsUnreachable,
            format!("service {service}: no endpoint connected: {tried}"),
        ),
    }
}

/// Copies between a pod and a plain TCP upstream (a local pod, or outside the mesh) until both
/// sides finished. A failure on either side, a timeout, or a policy change that revokes the
/// connection (`registration`, for local pods) resets both: an abort stays an abort.
async fn copy_tcp(
    inputs: &ProxyInputs,
    mut client: TcpStream,
    mut upstream: TcpStream,
    registration: Option<&Registration>,
) -> (u64, u64, Option<String>) {
    let mut counted = Counted::default();
    let revoked = async {
        match registration {
            Some(registration) => registration.close.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let copied = tokio::select! {
        result = copy::bidirectional(&mut client, &mut upstream, &mut counted, inputs.settings.timeouts) => Some(result),
        () = revoked => None,
    };
    let error = match copied {
        Some(Ok(())) => None,
        Some(Err(e)) => Some(failed_copy(inputs, &e)),
        None => {
            inputs
                .metrics
                .fail(Direction::Outbound, FailureReason::PolicyRevoked);
            Some(match registration.and_then(Registration::revoked) {
                Some(decision) => {
                    format!("policy_revoked: closed after a policy change: {decision}")
                }
                None => "policy_revoked: closed after a policy change".to_owned(),
            })
        }
    };
    if error.is_some() {
        reset(client);
        reset(upstream);
    } else {
        finished(client);
        finished(upstream);
    }
    (counted.a_to_b, counted.b_to_a, error)
}

/// Counts a copy that ended in error and renders it for the access log.
fn failed_copy(inputs: &ProxyInputs, e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::TimedOut {
        inputs
            .metrics
            .fail(Direction::Outbound, FailureReason::IdleTimeout);
    }
    e.to_string()
}

#[cfg(test)]
mod tests;
