//! The node proxy: the outbound listener for redirected pod connections and the inbound HBONE
//! listener, sharing one set of inputs.
//!
//! Every connection reads top to bottom in named phases: accept, classify, (policy), tunnel,
//! copy; and ends with one access log event and its metrics.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::UnknownDestination,
    identity::{CertStore, Identity},
    log_limit::{AccessLogLimit, LogSource},
    metrics::{Direction, DirectionLabels, FailureReason, Metrics},
    state::{MeshState, Workload},
};

pub mod copy;
pub mod inbound;
pub mod limits;
pub mod outbound;
pub mod pool;
pub mod read_ahead;
pub mod transparent;

/// The address the application asked to connect to, before redirection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst(pub SocketAddr);
/// The client end of an accepted connection, as the listener sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);
/// A node agent's HBONE listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HboneAddr(pub SocketAddr);

/// Recovers where a redirected connection was going and which cgroup opened it.
pub trait OriginalDstLookup: Send + Sync {
    fn lookup(&self, client: ClientAddr) -> Option<(OriginalDst, u64)>;
}

impl OriginalDstLookup for crate::ebpf::ConnTrack {
    fn lookup(&self, client: ClientAddr) -> Option<(OriginalDst, u64)> {
        crate::ebpf::ConnTrack::lookup(self, client.0)
            .map(|(dst, cgroup)| (OriginalDst(dst), cgroup))
    }
}

/// Tunables of both listeners.
#[derive(Clone, Debug)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub unknown_destination: UnknownDestination,
    pub max_streams_per_connection: u32,
    /// Idle and half-close timeouts of every proxied connection.
    pub timeouts: copy::Timeouts,
}

/// What every listener and connection task shares.
pub struct ProxyInputs {
    pub state: Arc<ArcSwap<MeshState>>,
    pub certs: Arc<CertStore>,
    pub original_dst: Arc<dyn OriginalDstLookup>,
    pub metrics: Arc<Metrics>,
    pub pool: pool::Pool,
    pub server_tls: Arc<rustls::ServerConfig>,
    pub settings: Settings,
    /// Cancelled on shutdown: listeners stop accepting, HBONE connections send GOAWAY.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them to drain.
    pub tasks: TaskTracker,
    /// Open connections to local pods, re-authorized when the policies change.
    pub authorized: Arc<inbound::authorized::Authorized>,
    /// Connection and handshake caps.
    pub limits: Arc<limits::Limits>,
    /// Access-log events per source.
    pub access_log: Arc<AccessLogLimit>,
    /// Which address local pods' connections are opened from.
    pub source: transparent::SourcePolicy,
}

/// A listener on `addr` with `backlog` pending connections. Like `TcpListener::bind`, it sets
/// SO_REUSEADDR: a restarted proxy must rebind while its old connections linger.
pub fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Accepts until shutdown, handing each connection to `handle` as a tracked task.
pub async fn accept_loop<F, Fut>(
    inputs: Arc<ProxyInputs>,
    listener: TcpListener,
    direction: Direction,
    handle: F,
) where
    F: Fn(Arc<ProxyInputs>, TcpStream, ClientAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut backoff = crate::accept::Backoff::new(direction.as_str());
    loop {
        let accepted = tokio::select! {
            () = inputs.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.reset();
                let _ = stream.set_nodelay(true);
                inputs
                    .tasks
                    .spawn(handle(inputs.clone(), stream, ClientAddr(peer)));
            }
            Err(e) => {
                // Out of file descriptors or memory: shed load instead of spinning.
                inputs.metrics.fail(direction, FailureReason::Accept);
                backoff.failed(&e).await;
            }
        }
    }
}

/// Dials `addr` with the configured timeout.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}

/// Closes `stream` with a reset, so the client learns promptly that the connection failed.
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Arms a pod-facing socket to be reset, not closed, should this process die while it is
/// proxied: with a zero linger the kernel answers the crash with RST, so the pod sees its
/// connection cut rather than finished. [`finished`] disarms it for a clean close.
pub fn reset_on_crash(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// Closes a connection whose directions both finished: with FIN, as the pods ended it (see
/// [`reset_on_crash`]); a reset here could discard bytes the pod has not read yet.
pub fn finished(stream: TcpStream) {
    let linger = nix::libc::linger {
        l_onoff: 0,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &linger);
    drop(stream);
}

/// Dials a pod (or a destination outside the mesh) for a proxied connection: [`connect`],
/// armed by [`reset_on_crash`].
pub async fn connect_proxied(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = connect(addr, timeout).await?;
    reset_on_crash(&stream);
    Ok(stream)
}

/// One access log event per connection.
#[derive(Debug)]
pub struct AccessLog<'a> {
    pub direction: Direction,
    pub path: &'static str,
    pub src_addr: SocketAddr,
    pub src_workload: Option<&'a Workload>,
    pub src_identity: Option<&'a Identity>,
    /// Inbound: serial number (hex) of the client certificate that authenticated the HBONE
    /// connection, so certificate rotation can be traced per connection.
    pub src_cert_serial: Option<&'a str>,
    pub dst_addr: Option<SocketAddr>,
    pub dst_workload: Option<&'a Workload>,
    pub dst_identity: Option<&'a Identity>,
    /// Outbound: the service whose virtual IP the client dialled (`dst_addr` is then the
    /// endpoint tried last, the one the bytes went to when the connection opened).
    pub dst_service: Option<&'a str>,
    pub sent: u64,
    pub received: u64,
    pub started: Instant,
    pub error: Option<String>,
    /// Connections to a local pod: which address it was opened from.
    pub delivered_from: Option<transparent::PodSource>,
}

impl AccessLog<'_> {
    /// An event for a connection from `src_addr`, to be filled in as the connection proceeds.
    pub fn new(
        direction: Direction,
        path: &'static str,
        src_addr: SocketAddr,
        started: Instant,
    ) -> Self {
        Self {
            direction,
            path,
            src_addr,
            src_workload: None,
            src_identity: None,
            src_cert_serial: None,
            dst_addr: None,
            dst_workload: None,
            dst_identity: None,
            dst_service: None,
            sent: 0,
            received: 0,
            started,
            error: None,
            delivered_from: None,
        }
    }

    /// Writes the event unless its source is over its rate (`limit`); one left out is counted
    /// in `metrics` and reported by the source's next written event as `suppressed`.
    pub fn emit(&self, limit: &AccessLogLimit, metrics: &Metrics) {
        let source = match (self.direction, self.src_identity) {
            (Direction::Inbound, Some(id)) => LogSource::Identity(id),
            _ => LogSource::Addr(self.src_addr.ip()),
        };
        let Some(suppressed) = limit.admit(source, Instant::now()) else {
            metrics
                .access_log_suppressed
                .get_or_create(&DirectionLabels {
                    direction: self.direction,
                })
                .inc();
            return;
        };
        let name = |w: Option<&Workload>| {
            w.map(|w| format!("{}/{}", w.namespace, w.name))
                .unwrap_or_default()
        };
        let id = |i: Option<&Identity>| i.map(std::string::ToString::to_string).unwrap_or_default();
        let dst = self.dst_addr.map(|a| a.to_string()).unwrap_or_default();
        let duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let error = self.error.as_deref().unwrap_or("");
        let delivered_from = self
            .delivered_from
            .map(transparent::PodSource::log_value)
            .unwrap_or_default();
        tracing::info!(
            target: "access",
            direction = self.direction.as_str(),
            path = self.path,
            src_addr = %self.src_addr,
            src_workload = %name(self.src_workload),
            src_identity = %id(self.src_identity),
            src_cert_serial = self.src_cert_serial.unwrap_or_default(),
            dst_addr = %dst,
            dst_workload = %name(self.dst_workload),
            dst_identity = %id(self.dst_identity),
            dst_service = self.dst_service.unwrap_or_default(),
            bytes_sent = self.sent,
            bytes_received = self.received,
            duration_ms = (duration_ms * 1000.0).round() / 1000.0,
            error,
            delivered_from,
            suppressed,
            "connection"
        );
    }
}
