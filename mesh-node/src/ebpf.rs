//! The agent's side of the kernel datapath: loads the programs, owns the pinned maps and links.
//!
//! - [`load`]: installing the datapath (maps filled, programs attached, links pinned over the
//!   previous agent's), its counters, and uninstalling it.
//! - [`enroll`]: which pod cgroups are redirected, and their inbound mutual TLS modes.
//! - [`conntrack`]: the original destination of a redirected connection.
//! - [`probe`]: whether this kernel and these filesystems can run the datapath at all.
//! - [`log`]: the programs' log records, forwarded into the agent's.
//! - [`return_path`]: the replies of connections the proxy opens from client addresses.
//!
//! This module holds what they share: the eBPF object and its programs by name, the address
//! form the programs compare, and the one error type.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use aya::{
    Ebpf,
    programs::{CgroupSkb, CgroupSock, CgroupSockAddr, SockOps},
};
use mesh_common::programs;

mod conntrack;
mod enroll;
mod load;
mod log;
mod probe;
mod return_path;

pub use conntrack::{ConnTrack, Tracked, sock_key};
pub use enroll::{Enroller, InboundMtls, PodCgroup};
pub use load::{Datapath, uninstall};
pub use probe::{is_cgroup2, is_on_bpffs, probe};
pub use return_path::{Deliveries, ReturnPath};

/// The eBPF object built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "cannot load eBPF object (is this kernel 5.10+ with BTF, and the agent privileged?): {0}"
    )]
    Load(#[from] aya::EbpfError),
    #[error(
        "eBPF object lacks {kind} {name}: the agent and its programs are from different builds"
    )]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF link of {name}: {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("cannot pin {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 { path: PathBuf },
    #[error("{path} is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs { path: PathBuf },
    #[error("enrollment map is full ({max} pods): cannot enroll {cgroup}")]
    EnrollmentFull { max: u32, cgroup: PathBuf },
    #[error(
        "mutual TLS port map is full ({max} overrides per node): cannot write port {port} of \
         {cgroup}, which refuses plaintext until this clears"
    )]
    PortOverrideFull {
        max: u32,
        cgroup: PathBuf,
        port: u16,
    },
    #[error("cannot open a netlink socket for the return path's routing: {0}")]
    Netlink(#[source] std::io::Error),
    #[error(
        "cannot install the return path's policy routing {what} (the agent needs CAP_NET_ADMIN \
         in the node's network namespace): {e}"
    )]
    Routing {
        what: &'static str,
        e: rtnetlink::Error,
    },
    #[error("cannot list the node's addresses (getifaddrs): {0}")]
    NodeAddrs(#[source] std::io::Error),
    #[error(
        "node address map is full ({max} addresses): plaintext from {addr} (kubelet probes, the \
         node proxy) to STRICT pods is dropped; check the node's interfaces"
    )]
    NodeAddrsFull { max: u32, addr: IpAddr },
}

/// What the datapath needs to know, derived from the agent's configuration.
#[derive(Clone, Debug)]
pub struct DatapathSpec {
    pub cgroup_root: PathBuf,
    pub pin_dir: PathBuf,
    pub outbound4: SocketAddr,
    pub outbound6: Option<SocketAddr>,
    pub excluded_ports: Vec<u16>,
    pub excluded_nets: Vec<(IpAddr, u8)>,
    /// Whether to enable the kernel's run-time statistics (see [`Datapath::program_runs`]).
    pub program_stats: bool,
}

/// The cgroup sock_addr programs: connect rewrites and their getpeername counterparts.
const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
];

/// The cgroup sock programs: socket creation (identity) and release (tracking cleanup).
const SOCK_PROGRAMS: [&str; 2] = [programs::SOCK_CREATE, programs::SOCK_RELEASE];

/// Loads (and so verifies) every program of the object into the kernel, without attaching.
fn load_programs(ebpf: &mut Ebpf) -> Result<(), EbpfError> {
    for name in SOCK_PROGRAMS {
        let program: &mut CgroupSock = program_mut(ebpf, name)?;
        program
            .load()
            .map_err(|source| EbpfError::Program { name, source })?;
    }
    for name in SOCK_ADDR_PROGRAMS {
        let program: &mut CgroupSockAddr = program_mut(ebpf, name)?;
        program
            .load()
            .map_err(|source| EbpfError::Program { name, source })?;
    }
    let program: &mut SockOps = program_mut(ebpf, programs::SOCK_OPS)?;
    program.load().map_err(|source| EbpfError::Program {
        name: programs::SOCK_OPS,
        source,
    })?;
    let program: &mut CgroupSkb = program_mut(ebpf, programs::MTLS_INGRESS)?;
    program.load().map_err(|source| EbpfError::Program {
        name: programs::MTLS_INGRESS,
        source,
    })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(EbpfError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(EbpfError::Missing {
        kind: "program",
        name,
    })?;
    program
        .try_into()
        .map_err(|source| EbpfError::Program { name, source })
}

/// 16 address bytes as the four native-endian words the programs compare (network order bytes).
fn words(octets: [u8; 16]) -> [u32; 4] {
    let mut out = [0u32; 4];
    for (i, word) in out.iter_mut().enumerate() {
        *word = u32::from_ne_bytes([
            octets[i * 4],
            octets[i * 4 + 1],
            octets[i * 4 + 2],
            octets[i * 4 + 3],
        ]);
    }
    out
}

fn octets(words: &[u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, word) in words.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    out
}

/// An address in the form the programs compare: 16 bytes, IPv4 mapped into IPv6.
fn ip_key(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    words(v6.octets())
}

fn key_to_ip(key: &[u32; 4]) -> IpAddr {
    let v6 = Ipv6Addr::from(octets(key));
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_keys_round_trip_in_both_families() {
        for ip in ["10.200.0.1", "fd00:200::1", "::1", "127.0.0.1"] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(key_to_ip(&ip_key(ip)), ip);
        }
        assert_eq!(
            ip_key("10.200.0.1".parse().expect("ip")),
            mesh_common::v4_mapped(u32::from_ne_bytes([10, 200, 0, 1]))
        );
    }
}
