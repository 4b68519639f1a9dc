//! Finding and aborting TCP sockets of one network namespace through the kernel's sock_diag
//! netlink interface (what `ss -K` does).
//!
//! The node proxy closes the connections it carries when a policy change denies them; plaintext
//! connections that reached a pod directly never went through it. The kernel decides plaintext
//! only at the SYN, so when a change starts refusing plaintext on a port, the agent aborts the
//! plaintext connections already open on it here: the pod sees them reset (`ECONNABORTED`), as
//! the proxied ones are.
//!
//! Everything runs on a dedicated thread that enters the pod's network namespace (entering one
//! changes only the calling thread, which is then discarded).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::Path,
};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

/// Why sockets could not be listed or aborted.
#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("no process in cgroup {0} to find the pod's network namespace from")]
    NoProcess(String),
    #[error("cannot enter the network namespace of pid {pid}: {source}")]
    Netns { pid: u32, source: std::io::Error },
    #[error("sock_diag netlink request failed: {0}")]
    Netlink(std::io::Error),
    #[error("sock_diag answered a malformed message")]
    Malformed,
    #[error("the namespace thread panicked or could not start")]
    Thread,
}

/// One TCP socket, as sock_diag lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocket {
    pub state: u8,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
    family: u8,
    /// The kernel's identity of the socket (`inet_diag_sockid`), echoed to destroy it.
    id: [u8; SOCKID_LEN],
}

const NETLINK_HEADER: usize = 16;
const SOCKID_LEN: usize = 48;
const REQ_LEN: usize = 8 + SOCKID_LEN;
const MSG_MIN: usize = 4 + SOCKID_LEN + 20;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const IPPROTO_TCP: u8 = 6;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
pub const TCP_LISTEN: u8 = 10;
/// A namespace holds at most this many sockets as far as a dump is concerned: a bound on what
/// one dump may cost.
const MAX_SOCKETS: usize = 200_000;

/// A pid in the cgroup at `path` or below (processes of a Kubernetes pod live in its
/// containers' cgroups).
pub fn pid_in_cgroup(path: &Path) -> Option<u32> {
    let procs = std::fs::read_to_string(path.join("cgroup.procs")).ok()?;
    if let Some(pid) = procs.lines().find_map(|l| l.trim().parse().ok()) {
        return Some(pid);
    }
    std::fs::read_dir(path)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| pid_in_cgroup(&e.path()))
}

/// Runs `f` with a sock_diag session inside the network namespace of the pod at `cgroup`.
pub fn in_pod_netns<T: Send + 'static>(
    cgroup: &Path,
    f: impl FnOnce(&Session) -> Result<T, SockDiagError> + Send + 'static,
) -> Result<T, SockDiagError> {
    let pid = pid_in_cgroup(cgroup)
        .ok_or_else(|| SockDiagError::NoProcess(cgroup.display().to_string()))?;
    let netns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|source| SockDiagError::Netns { pid, source })?;
    std::thread::Builder::new()
        .name("trellis-sock-diag".into())
        .spawn(move || {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                SockDiagError::Netns {
                    pid,
                    source: e.into(),
                }
            })?;
            f(&Session::open()?)
        })
        .map_err(|_| SockDiagError::Thread)?
        .join()
        .map_err(|_| SockDiagError::Thread)?
}

/// A netlink sock_diag socket in the calling thread's network namespace.
pub struct Session {
    fd: std::os::fd::OwnedFd,
    seq: std::cell::Cell<u32>,
}

impl Session {
    fn open() -> Result<Self, SockDiagError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )
        .map_err(|e| SockDiagError::Netlink(e.into()))?;
        Ok(Self {
            fd,
            seq: std::cell::Cell::new(1),
        })
    }

    /// Every TCP socket of both families whose state is in `states` (a bit per state).
    pub fn list(&self, states: u32) -> Result<Vec<TcpSocket>, SockDiagError> {
        let mut all = Vec::new();
        for family in [AF_INET, AF_INET6] {
            let mut req = [0u8; REQ_LEN];
            req[0] = family;
            req[1] = IPPROTO_TCP;
            req[4..8].copy_from_slice(&states.to_ne_bytes());
            self.send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req)?;
            self.receive(|kind, payload| {
                if kind != SOCK_DIAG_BY_FAMILY {
                    return Ok(());
                }
                if all.len() < MAX_SOCKETS {
                    all.push(parse_socket(payload)?);
                }
                Ok(())
            })?;
        }
        Ok(all)
    }

    /// Aborts `socket` (its owner's next call fails with `ECONNABORTED`, the peer gets a RST).
    pub fn destroy(&self, socket: &TcpSocket) -> Result<(), SockDiagError> {
        let mut req = [0u8; REQ_LEN];
        req[0] = socket.family;
        req[1] = IPPROTO_TCP;
        req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
        req[8..].copy_from_slice(&socket.id);
        self.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &req)?;
        self.receive(|_, _| Ok(()))
    }

    fn send(&self, kind: u16, flags: u16, payload: &[u8]) -> Result<(), SockDiagError> {
        let seq = self.seq.get();
        self.seq.set(seq.wrapping_add(1));
        let mut msg = Vec::with_capacity(NETLINK_HEADER + payload.len());
        let len =
            u32::try_from(NETLINK_HEADER + payload.len()).map_err(|_| SockDiagError::Malformed)?;
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(payload);
        sendto(
            self.fd.as_raw_fd(),
            &msg,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map_err(|e| SockDiagError::Netlink(e.into()))?;
        Ok(())
    }

    /// Reads answers until the dump ends or the request is acknowledged; `each` gets every
    /// other message's type and payload.
    fn receive(
        &self,
        mut each: impl FnMut(u16, &[u8]) -> Result<(), SockDiagError>,
    ) -> Result<(), SockDiagError> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(|e| SockDiagError::Netlink(e.into()))?;
            let mut rest = buf.get(..n).ok_or(SockDiagError::Malformed)?;
            while rest.len() >= NETLINK_HEADER {
                let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                if len < NETLINK_HEADER || len > rest.len() {
                    return Err(SockDiagError::Malformed);
                }
                let payload = &rest[NETLINK_HEADER..len];
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .ok_or(SockDiagError::Malformed)?;
                        return match code {
                            0 => Ok(()),
                            e => Err(SockDiagError::Netlink(std::io::Error::from_raw_os_error(
                                -e,
                            ))),
                        };
                    }
                    _ => each(kind, payload)?,
                }
                // Messages are padded to four bytes.
                let next = len.div_ceil(4) * 4;
                rest = rest.get(next..).unwrap_or_default();
            }
        }
    }
}

fn parse_socket(msg: &[u8]) -> Result<TcpSocket, SockDiagError> {
    if msg.len() < MSG_MIN {
        return Err(SockDiagError::Malformed);
    }
    let family = msg[0];
    let state = msg[1];
    let mut id = [0u8; SOCKID_LEN];
    id.copy_from_slice(&msg[4..4 + SOCKID_LEN]);
    let port = |at: usize| u16::from_be_bytes([id[at], id[at + 1]]);
    let addr = |at: usize| -> IpAddr {
        if family == AF_INET {
            IpAddr::V4(Ipv4Addr::new(id[at], id[at + 1], id[at + 2], id[at + 3]))
        } else {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&id[at..at + 16]);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
    };
    Ok(TcpSocket {
        state,
        local: (addr(4), port(0)),
        remote: (addr(20), port(2)),
        family,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_socket_reads_its_addresses_and_ports() {
        let mut msg = [0u8; MSG_MIN];
        msg[0] = AF_INET;
        msg[1] = 1;
        msg[4..6].copy_from_slice(&8080u16.to_be_bytes());
        msg[6..8].copy_from_slice(&40_000u16.to_be_bytes());
        msg[8..12].copy_from_slice(&[10, 200, 1, 10]);
        msg[24..28].copy_from_slice(&[10, 199, 0, 100]);
        let socket = parse_socket(&msg).expect("parses");
        assert_eq!(socket.local, (IpAddr::from([10, 200, 1, 10]), 8080));
        assert_eq!(socket.remote, (IpAddr::from([10, 199, 0, 100]), 40_000));
        assert_eq!(socket.state, 1);
        assert!(matches!(
            parse_socket(&msg[..MSG_MIN - 1]),
            Err(SockDiagError::Malformed)
        ));
    }
}
