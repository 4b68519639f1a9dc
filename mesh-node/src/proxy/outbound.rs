//! Outbound: connections the datapath redirected away from a local pod.
//!
//! accept -> classify (original destination, source pod by cgroup, route) -> tunnel (HBONE to
//! the destination's node, straight to a local pod, or plain TCP out of the mesh) -> copy.

use std::{sync::Arc, time::Instant};

use tokio::net::TcpStream;

use super::{AccessLog, ClientAddr, HboneAddr, ProxyInputs, connect, reset};
use crate::{
    config::UnknownDestination,
    metrics::{Direction, Reporter, SecurityPolicy, TcpLabels},
    workload::Workload,
};

/// Where a connection goes.
enum Route {
    /// To a pod on this node: no TLS needed, the bytes never leave the node.
    Local(Arc<Workload>),
    /// To a pod on another node, through that node's agent.
    Remote(Arc<Workload>, HboneAddr),
    /// Out of the mesh, as plain TCP.
    Passthrough,
}

impl Route {
    fn path(&self) -> &'static str {
        match self {
            Route::Local(_) => "local",
            Route::Remote(..) => "hbone",
            Route::Passthrough => "passthrough",
        }
    }
}

pub async fn handle(inputs: Arc<ProxyInputs>, stream: TcpStream, client: ClientAddr) {
    let started = Instant::now();
    let _active = inputs.metrics.active(Direction::Outbound);
    let mut log = AccessLog::new(Direction::Outbound, "none", client.0, started);

    // Classify: where was it going, who sent it.
    let Some((dst, cgroup)) = inputs.original_dst.lookup(client) else {
        inputs
            .metrics
            .fail(Direction::Outbound, "no_original_destination");
        log.error = Some(
            "no original destination recorded: connection was not redirected by the datapath"
                .into(),
        );
        log.emit();
        return reset(stream);
    };
    log.dst_addr = Some(dst.0);
    let state = inputs.state.load_full();
    let Some(src) = state.workload_by_cgroup(cgroup).cloned() else {
        inputs.metrics.fail(Direction::Outbound, "unknown_source");
        log.error = Some(format!(
            "connection from cgroup {cgroup}, which belongs to no local workload"
        ));
        log.emit();
        return reset(stream);
    };
    log.src_workload = Some(&src);
    log.src_identity = Some(&src.identity);

    let route = match state.workload_by_ip(dst.0.ip()) {
        Some(w) if state.is_local(w) => Route::Local(w.clone()),
        Some(w) => match state.node(&w.node) {
            Some(node) => Route::Remote(w.clone(), HboneAddr(node.hbone)),
            None => {
                inputs.metrics.fail(Direction::Outbound, "unknown_node");
                log.error = Some(format!(
                    "destination {}/{} is on unknown node {}",
                    w.namespace, w.name, w.node
                ));
                log.emit();
                return reset(stream);
            }
        },
        None => Route::Passthrough,
    };
    log.path = route.path();
    let dst_workload = match &route {
        Route::Local(w) | Route::Remote(w, _) => Some(w.clone()),
        Route::Passthrough => None,
    };
    log.dst_workload = dst_workload.as_deref();
    log.dst_identity = dst_workload.as_ref().map(|w| &w.identity);
    let security = if matches!(route, Route::Remote(..)) {
        SecurityPolicy::MutualTls
    } else {
        SecurityPolicy::None
    };
    let labels = TcpLabels::new(Reporter::Source, security)
        .with_source(Some(&src), Some(&src.identity))
        .with_destination(log.dst_workload, log.dst_identity);

    // Tunnel.
    let result = match &route {
        Route::Passthrough if inputs.settings.unknown_destination == UnknownDestination::Deny => {
            inputs
                .metrics
                .fail(Direction::Outbound, "outside_mesh_denied");
            log.error = Some(
                "destination is outside the mesh and outbound.unknown_destination is deny".into(),
            );
            log.emit();
            return reset(stream);
        }
        Route::Local(_) | Route::Passthrough => {
            match connect(dst.0, inputs.settings.connect_timeout).await {
                Ok(upstream) => {
                    inputs.metrics.opened.get_or_create(&labels).inc();
                    copy(stream, upstream).await
                }
                Err(e) => {
                    inputs
                        .metrics
                        .fail(Direction::Outbound, "upstream_unreachable");
                    log.error = Some(format!("cannot connect to {}: {e}", dst.0));
                    log.emit();
                    return reset(stream);
                }
            }
        }
        Route::Remote(w, node) => {
            match inputs
                .pool
                .tunnel(
                    &inputs.certs,
                    &src.identity,
                    &w.identity,
                    *node,
                    dst,
                    client,
                )
                .await
            {
                Ok(tunnel) => {
                    inputs.metrics.opened.get_or_create(&labels).inc();
                    let result = copy(stream, tunnel.io).await;
                    drop(tunnel.guard);
                    result
                }
                Err(e) => {
                    inputs.metrics.fail(Direction::Outbound, e.reason());
                    log.error = Some(e.to_string());
                    log.emit();
                    return reset(stream);
                }
            }
        }
    };

    // Copy finished: account.
    let (sent, received, error) = result;
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
    log.emit();
}

/// Copies both ways until both sides finished, preserving half-close.
pub async fn copy<A, B>(mut a: A, mut b: B) -> (u64, u64, Option<String>)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut counted = super::copy::Counted::default();
    let result = super::copy::bidirectional(&mut a, &mut b, &mut counted).await;
    (
        counted.a_to_b,
        counted.b_to_a,
        result.err().map(|e| e.to_string()),
    )
}
