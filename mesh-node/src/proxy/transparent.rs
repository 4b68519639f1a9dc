//! Which address the node proxy opens a local pod's connection from, and the dial itself.
//!
//! With `inbound.preserve_client_address` on, the pod sees the client pod's address as its
//! peer: the proxy binds a transparent socket (`IP_TRANSPARENT`/`IPV6_TRANSPARENT`) to that
//! address before connecting. The address is one the mesh state says the verified source owns:
//! over HBONE, a workload holding the peer certificate's identity and scheduled on the node the
//! HBONE connection comes from; on the same node, the source pod the kernel matched by its
//! socket's creation cgroup. Never an address a peer merely claims. Anything else (a waypoint,
//! an unknown or mismatched source, a pod whose link the return path does not cover yet) is
//! delivered from the node, and says why ([`NodeReason`]) in the access log and a counter.
//!
//! Before connecting from a client address, the 4-tuple is recorded through [`ReturnPath`]
//! (the datapath's `DELIVERIES` map): STRICT pods admit exactly that tuple, and the pod's
//! replies to it are steered back to this socket. The record outlives the socket by the
//! TIME_WAIT period, so the pod's last segments still reach it.
//!
//! Every dial binds an explicit port (with `SO_REUSEADDR`) before connecting, from the client
//! address or the node's: the kernel then reuses a 4-tuple still in TIME_WAIT when timestamps
//! protect it (`tcp_twsk_unique`), so short connections to one pod do not run out of ports.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::Arc,
    time::Duration,
};

use tokio::net::{TcpSocket, TcpStream};

use crate::{
    identity::Identity,
    state::{MeshState, Workload},
};

/// Binds tried before a dial gives up: a port the kernel hands out may still be in use by an
/// established connection to the same pod (the bind cannot know the destination).
const BIND_ATTEMPTS: usize = 8;

pub use crate::metrics::NodeReason;

/// The address a pod's connection is opened from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodSource {
    /// The client pod's own address.
    Client(IpAddr),
    /// The node's address, for the reason given.
    Node(NodeReason),
}

impl PodSource {
    /// The access log's `delivered_from`: `client`, or `node:<reason>`.
    pub fn log_value(self) -> String {
        match self {
            Self::Client(_) => "client".to_owned(),
            Self::Node(reason) => format!("node:{}", reason.as_str()),
        }
    }
}

/// The datapath's side of client-address delivery.
pub trait ReturnPath: Send + Sync {
    /// Whether the pod's replies to `pod` are steered (its link carries the program).
    fn covers(&self, pod: IpAddr) -> bool;
    /// Records a connection about to be opened from `client` to `pod`.
    fn record(&self, client: SocketAddr, pod: SocketAddr) -> std::io::Result<()>;
    /// Forgets it: at once (`linger` false, the socket was reset) or after TIME_WAIT.
    fn forget(&self, client: SocketAddr, pod: SocketAddr, linger: bool);
}

impl ReturnPath for crate::ebpf::Deliveries {
    fn covers(&self, pod: IpAddr) -> bool {
        crate::ebpf::Deliveries::covers(self, pod)
    }
    fn record(&self, client: SocketAddr, pod: SocketAddr) -> std::io::Result<()> {
        crate::ebpf::Deliveries::record(self, client, pod)
    }
    fn forget(&self, client: SocketAddr, pod: SocketAddr, linger: bool) {
        crate::ebpf::Deliveries::forget(self, client, pod, linger);
    }
}

/// How the proxy picks the address it dials pods from.
#[derive(Clone)]
pub struct SourcePolicy {
    /// `None`: preservation off (or no datapath to steer replies).
    pub return_path: Option<Arc<dyn ReturnPath>>,
}

impl SourcePolicy {
    /// Preservation off: every pod connection comes from the node, as before.
    pub fn node_only() -> Self {
        Self { return_path: None }
    }

    /// Over HBONE: `claimed` is the client address the source node reported; it is used only
    /// when a workload holding `identity` owns it and runs on the node the HBONE connection
    /// came from (`peer`).
    pub fn for_hbone(
        &self,
        state: &MeshState,
        identity: &Identity,
        claimed: IpAddr,
        peer: IpAddr,
        pod: IpAddr,
    ) -> PodSource {
        let verified = state
            .workload_by_ip(claimed)
            .filter(|w| &w.identity == identity)
            .filter(|w| state.node(&w.node).is_some_and(|n| n.hbone.ip() == peer));
        self.decide(verified.map(|_| claimed), pod)
    }

    /// On the same node: `src` is the source pod the kernel identified (by cgroup) and
    /// `client` the address its connection came from.
    pub fn for_local(&self, src: &Workload, client: IpAddr, pod: IpAddr) -> PodSource {
        let verified = src.ips.contains(&client).then_some(client);
        self.decide(verified, pod)
    }

    fn decide(&self, verified: Option<IpAddr>, pod: IpAddr) -> PodSource {
        let Some(return_path) = &self.return_path else {
            return PodSource::Node(NodeReason::Disabled);
        };
        let Some(client) = verified.map(|ip| ip.to_canonical()) else {
            return PodSource::Node(NodeReason::UnverifiedSource);
        };
        if client.is_ipv4() != pod.to_canonical().is_ipv4() {
            return PodSource::Node(NodeReason::FamilyMismatch);
        }
        if !return_path.covers(pod) {
            return PodSource::Node(NodeReason::ReturnPathNotReady);
        }
        PodSource::Client(client)
    }

    /// Dials `pod` from `source`, armed to reset should the agent die (see
    /// [`super::reset_on_crash`]). The returned [`Record`] must be kept until the stream is
    /// closed.
    pub async fn dial(
        &self,
        source: PodSource,
        pod: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<(TcpStream, Option<Record>)> {
        let dialled = tokio::time::timeout(timeout, self.dial_once(source, pod)).await;
        let (stream, record) = dialled.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
        })??;
        let _ = stream.set_nodelay(true);
        super::reset_on_crash(&stream);
        Ok((stream, record))
    }

    async fn dial_once(
        &self,
        source: PodSource,
        pod: SocketAddr,
    ) -> std::io::Result<(TcpStream, Option<Record>)> {
        let (local, return_path) = match (source, &self.return_path) {
            (PodSource::Client(ip), Some(return_path)) => (ip, Some(return_path)),
            _ => (node_source(pod)?, None),
        };
        let mut last = None;
        for _ in 0..BIND_ATTEMPTS {
            let socket = bound_socket(local, pod, return_path.is_some())?;
            let bound = socket.local_addr()?;
            let record = match return_path {
                Some(return_path) => {
                    return_path.record(bound, pod)?;
                    Some(Record {
                        return_path: return_path.clone(),
                        client: bound,
                        pod,
                        linger: true,
                    })
                }
                None => None,
            };
            match socket.connect(pod).await {
                Ok(stream) => return Ok((stream, record)),
                // The port is held by an established connection to the same pod: another.
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                    if let Some(record) = record {
                        record.reset();
                    }
                    last = Some(e);
                }
                Err(e) => {
                    if let Some(record) = record {
                        record.reset();
                    }
                    return Err(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EADDRNOTAVAIL)))
    }
}

/// A connection recorded in the datapath; forgotten when dropped.
pub struct Record {
    return_path: Arc<dyn ReturnPath>,
    client: SocketAddr,
    pod: SocketAddr,
    linger: bool,
}

impl Record {
    /// The socket was reset (zero linger): no TIME_WAIT follows, forget it at once.
    pub fn reset(mut self) {
        self.linger = false;
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.return_path.forget(self.client, self.pod, self.linger);
    }
}

/// The node's address the kernel would pick for `pod` (the route's preferred source): a
/// connected UDP socket sends nothing and reports it.
fn node_source(pod: SocketAddr) -> std::io::Result<IpAddr> {
    let any: SocketAddr = if pod.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let probe = std::net::UdpSocket::bind(any)?;
    probe.connect(pod)?;
    Ok(probe.local_addr()?.ip())
}

/// A TCP socket bound to `local` with a port of the kernel's choosing, `SO_REUSEADDR` set (so
/// the connect may reuse a 4-tuple in TIME_WAIT) and, for a client address, transparent.
fn bound_socket(local: IpAddr, pod: SocketAddr, transparent: bool) -> std::io::Result<TcpSocket> {
    let socket = if pod.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    if transparent {
        set_transparent(&socket, pod.is_ipv4())?;
    }
    socket.bind(SocketAddr::new(local, 0))?;
    Ok(socket)
}

/// Lets the socket bind an address the node does not own (`CAP_NET_ADMIN`).
#[allow(
    clippy::cast_possible_truncation,
    reason = "the size of a c_int (4 bytes) fits a socklen_t"
)]
fn set_transparent(socket: &TcpSocket, v4: bool) -> std::io::Result<()> {
    let (level, name) = if v4 {
        (libc::SOL_IP, libc::IP_TRANSPARENT)
    } else {
        (libc::SOL_IPV6, libc::IPV6_TRANSPARENT)
    };
    let on: libc::c_int = 1;
    // SAFETY: the descriptor is the socket's own and open for the call; the option value is a
    // c_int living on the stack for the call, with its exact size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests;
