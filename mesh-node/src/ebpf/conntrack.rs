//! The original destination of a redirected connection, as the programs recorded it.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use mesh_common::{OrigDst, SockKey, maps};

use super::{EbpfError, ip_key, octets, take_map};

/// Looks up the original destination of a redirected connection.
#[derive(Debug)]
pub struct ConnTrack {
    by_tuple: HashMap<MapData, SockKey, OrigDst>,
    by_cookie: HashMap<MapData, u64, OrigDst>,
}

/// How many connections the tracking maps hold now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tracked {
    /// Redirected sockets, from connect() until they close (established or not).
    pub by_cookie: usize,
    /// Established redirected connections, until they close.
    pub by_tuple: usize,
}

impl ConnTrack {
    /// Takes the tracking maps out of the loaded object.
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        Ok(Self {
            by_tuple: take_map(ebpf, maps::ORIG_BY_TUPLE)?,
            by_cookie: take_map(ebpf, maps::ORIG_BY_COOKIE)?,
        })
    }

    /// The original destination and source cgroup of the connection whose client end is
    /// `client` (the peer address the outbound listener accepted).
    pub fn lookup(&self, client: SocketAddr) -> Option<(SocketAddr, u64)> {
        let key = sock_key(client);
        let orig = self.by_tuple.get(&key, 0).ok()?;
        Some((orig_to_socket_addr(&orig), orig.cgroup_id))
    }

    /// Counts the entries of both maps (one syscall per entry: for diagnostics, not hot paths).
    pub fn tracked(&self) -> Tracked {
        Tracked {
            by_cookie: self.by_cookie.keys().flatten().count(),
            by_tuple: self.by_tuple.keys().flatten().count(),
        }
    }
}

/// The key the programs use for the client end of a connection.
pub fn sock_key(addr: SocketAddr) -> SockKey {
    SockKey {
        ip: ip_key(addr.ip()),
        port: u32::from(addr.port()),
    }
}

fn orig_to_socket_addr(orig: &OrigDst) -> SocketAddr {
    let v6 = Ipv6Addr::from(octets(&orig.ip));
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    // Port fits in 16 bits: the programs store a u16.
    SocketAddr::new(ip, (orig.port & 0xffff) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ebpf::words;

    #[test]
    fn keys_use_the_mapped_form_for_ipv4() {
        let key = sock_key("10.200.0.10:40000".parse().expect("addr"));
        assert_eq!(
            key.ip,
            mesh_common::v4_mapped(u32::from_ne_bytes([10, 200, 0, 10]))
        );
        assert_eq!(key.port, 40000);
    }

    #[test]
    fn original_destinations_convert_back() {
        use std::net::Ipv4Addr;
        let orig = OrigDst {
            ip: mesh_common::v4_mapped(u32::from_ne_bytes(Ipv4Addr::new(10, 1, 2, 3).octets())),
            port: 8080,
            family: mesh_common::AF_INET,
            cgroup_id: 7,
        };
        assert_eq!(
            orig_to_socket_addr(&orig),
            "10.1.2.3:8080".parse::<SocketAddr>().expect("addr")
        );
        let v6: Ipv6Addr = "fd00::5".parse().expect("addr");
        let orig = OrigDst {
            ip: words(v6.octets()),
            port: 443,
            family: mesh_common::AF_INET6,
            cgroup_id: 7,
        };
        assert_eq!(
            orig_to_socket_addr(&orig),
            "[fd00::5]:443".parse::<SocketAddr>().expect("addr")
        );
    }
}
