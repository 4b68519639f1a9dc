//! Types shared by the eBPF programs (`mesh-ebpf`) and the node agent (`mesh-node`).
//!
//! Every map the datapath uses is named here together with its key and value types, so the
//! programs and the loader cannot disagree. All types are `#[repr(C)]` without padding: the
//! kernel copies them byte for byte, and padding bytes would make hash keys nondeterministic.
//!
//! Addresses are stored as 16 bytes in network byte order; IPv4 uses the IPv4-mapped IPv6 form
//! (`::ffff:a.b.c.d`) so one key type serves both families. Ports are host byte order.
#![cfg_attr(not(test), no_std)]

/// Layout version of the pinned maps. Bumped whenever a key or value type changes, so an agent
/// never reuses maps pinned by an incompatible build (they live in a different directory).
/// Version 2: `Enrollment.flags` gained `STRICT_INBOUND`, and `MTLS_PORTS`, `NODE_ADDRS` and
/// two counters were added.
/// Version 3: `SOCK_CGROUPS` (socket storage) and two counters were added; `OrigDst.cgroup_id`
/// is the pod of the socket's creation cgroup.
/// Version 4: `DELIVERIES` and `LINK_MACS` (the client-address return path) and two counters
/// were added.
pub const LAYOUT_VERSION: u32 = 4;

/// Map names, as they appear in the object file and under the pin directory.
pub mod maps {
    /// `HashMap<u64 cgroup id, Enrollment>`: the pod cgroups whose connections are meshed.
    pub const ENROLLED: &str = "ENROLLED";
    /// `Array<ProxyConfig>` with one element: where redirected connections go.
    pub const PROXY_CONFIG: &str = "PROXY_CONFIG";
    /// `LruHashMap<u64 socket cookie, OrigDst>`: filled at connect, read by getpeername.
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    /// `LruHashMap<SockKey, OrigDst>`: the client end of each redirected connection, read by the
    /// proxy after accept to recover the original destination and the source cgroup.
    pub const ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    /// `HashMap<u32 port, u32>`: destination ports never redirected.
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    /// `LpmTrie<[u8; 16], u32>`: destination networks never redirected.
    pub const EXCLUDED_NETS: &str = "EXCLUDED_NETS";
    /// `PerCpuArray<u64>` indexed by [`crate::Stat`].
    pub const DP_STATS: &str = "DP_STATS";
    /// `HashMap<MtlsPortKey, u32 mode>`: per-port overrides of an enrolled pod's inbound mode
    /// ([`crate::MTLS_PERMISSIVE`] or [`crate::MTLS_STRICT`]).
    pub const MTLS_PORTS: &str = "MTLS_PORTS";
    /// `HashMap<[u32; 4] address, u32>`: every address of the node's network namespace (IPv4
    /// mapped into IPv6). Plaintext from these (kubelet probes, the node proxy) is always let in.
    pub const NODE_ADDRS: &str = "NODE_ADDRS";
    /// Socket storage (`BPF_MAP_TYPE_SK_STORAGE`, cloned to accepted sockets) of
    /// [`crate::SockCgroups`]: the cgroup a TCP socket was created in, and its ancestors,
    /// written by `sock_create`. Identity comes from here, not from whichever process calls
    /// `connect()`.
    pub const SOCK_CGROUPS: &str = "SOCK_CGROUPS";
    /// `LruHashMap<Delivery, u32>`: the connections the node proxy opens to a local pod from
    /// the client's address (transparent sockets), written by the agent before it connects and
    /// removed once the socket is closed. `mtls_ingress` admits exactly these 4-tuples through
    /// STRICT; `return_path` steers the pod's replies to them back to the agent.
    pub const DELIVERIES: &str = "DELIVERIES";
    /// `HashMap<u32 ifindex, LinkMac>`: for pod links enslaved to a bridge, the bridge's MAC.
    /// A pod replies to a client on its own subnet at layer 2 (to the client's MAC); the
    /// return path rewrites such a reply to the bridge, so the node's IP stack receives it.
    pub const LINK_MACS: &str = "LINK_MACS";
}

/// Program names, as they appear in the object file.
pub mod programs {
    pub const CONNECT4: &str = "connect4";
    pub const CONNECT6: &str = "connect6";
    pub const GETPEERNAME4: &str = "getpeername4";
    pub const GETPEERNAME6: &str = "getpeername6";
    pub const SOCK_OPS: &str = "sock_ops";
    /// cgroup_skb ingress: drops plaintext connection attempts to STRICT pods.
    pub const MTLS_INGRESS: &str = "mtls_ingress";
    /// cgroup/sock_create: records the cgroup a TCP socket is created in.
    pub const SOCK_CREATE: &str = "sock_create";
    /// cgroup/sock_release: forgets the original destination of a socket being closed.
    pub const SOCK_RELEASE: &str = "sock_release";
    /// tc (tcx) ingress on the node side of pod links: marks a pod's replies to a connection
    /// the node proxy opened from the client's address, so policy routing delivers them to
    /// the proxy's socket instead of forwarding them to the client.
    pub const RETURN_PATH: &str = "return_path";
}

/// Mark bits `return_path` sets on a reply it steers; the agent's policy routing rule
/// (`fwmark RETURN_MARK/RETURN_MARK_MASK lookup RETURN_TABLE`) delivers such packets locally.
pub const RETURN_MARK: u32 = 0x0000_7e00;
/// The bits of the packet mark [`RETURN_MARK`] owns; the others are left as they were.
pub const RETURN_MARK_MASK: u32 = 0x0000_ff00;
/// Routing table holding the single `local` default route of the return path.
pub const RETURN_TABLE: u32 = 0x7e11;
/// Priority of the return path's rule: after the `local` table (0), before `main` (32766).
pub const RETURN_RULE_PRIORITY: u32 = 32_000;
/// Capacity of [`maps::DELIVERIES`]: connections delivered from client addresses at once.
pub const MAX_DELIVERIES: u32 = 131_072;
/// Capacity of [`maps::LINK_MACS`]: pod links of the node.
pub const MAX_POD_LINKS: u32 = 4_096;

/// Capacity of the connection-tracking maps. LRU maps: a flood of connections evicts the
/// oldest entries rather than failing new connects.
pub const MAX_TRACKED_CONNECTIONS: u32 = 65_536;
/// How deep below the cgroup2 root a socket's cgroup may be and still be matched to its pod:
/// the number of cgroup ids [`SockCgroups`] holds.
pub const MAX_CGROUP_DEPTH: usize = 16;
/// Capacity of the enrollment map: pods per node.
pub const MAX_ENROLLED_CGROUPS: u32 = 4_096;
pub const MAX_EXCLUDED_PORTS: u32 = 256;
pub const MAX_EXCLUDED_NETS: u32 = 256;
/// Capacity of [`maps::MTLS_PORTS`]: port overrides summed over the node's pods.
pub const MAX_MTLS_PORTS: u32 = 16_384;
/// Capacity of [`maps::NODE_ADDRS`]. Generous because every host-side veth of a pod may carry an
/// IPv6 link-local address of its own.
pub const MAX_NODE_ADDRS: u32 = 4_096;

/// Inbound mode values of [`maps::MTLS_PORTS`].
pub const MTLS_PERMISSIVE: u32 = 0;
pub const MTLS_STRICT: u32 = 1;

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// Value of [`maps::ENROLLED`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enrollment {
    /// Bit set of `Enrollment::*` flags.
    pub flags: u32,
    pub reserved: u32,
}

impl Enrollment {
    /// Outbound TCP connections of this cgroup are redirected to the node proxy.
    pub const REDIRECT_OUTBOUND: u32 = 1 << 0;
    /// Inbound plaintext connections that did not come from the node are dropped (STRICT mutual
    /// TLS), unless [`maps::MTLS_PORTS`] overrides the destination port.
    pub const STRICT_INBOUND: u32 = 1 << 1;
}

/// Key of [`maps::MTLS_PORTS`]: a local port of an enrolled pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MtlsPortKey {
    /// The enrolled pod cgroup (the key of [`maps::ENROLLED`]).
    pub cgroup_id: u64,
    /// Destination port, host byte order.
    pub port: u32,
    pub reserved: u32,
}

/// The only element of [`maps::PROXY_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// IPv4 address of the outbound listener, network byte order; 0 when unset.
    pub ip4: u32,
    /// IPv6 address of the outbound listener, network byte order; all zero when unset, in which
    /// case enrolled pods' native IPv6 connections are refused rather than leaving the mesh.
    pub ip6: [u32; 4],
    /// Port of the outbound listener, host byte order.
    pub outbound_port: u32,
    pub flags: u32,
}

/// Key of [`maps::DELIVERIES`]: a connection the node proxy opens to a local pod from the
/// client's address, as the pod sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Delivery {
    /// The client's address (the proxy socket's local address), network byte order, IPv4
    /// mapped into IPv6.
    pub client: [u32; 4],
    /// The pod's address, same form.
    pub pod: [u32; 4],
    /// The proxy socket's local port, host byte order.
    pub client_port: u32,
    /// The pod's port, host byte order.
    pub pod_port: u32,
}

/// Value of [`maps::LINK_MACS`]: a MAC address, padded to eight bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkMac {
    pub addr: [u8; 6],
    pub reserved: [u8; 2],
}

/// Key of [`maps::ORIG_BY_TUPLE`]: one end of a TCP connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Address in network byte order, IPv4 mapped into IPv6.
    pub ip: [u32; 4],
    /// Port, host byte order.
    pub port: u32,
}

/// Value of the connection-tracking maps: where the application meant to connect.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Original destination address, network byte order, as the application passed it
    /// (IPv4 mapped into IPv6 when `family` is `AF_INET`).
    pub ip: [u32; 4],
    /// Original destination port, host byte order.
    pub port: u32,
    /// Address family of the application's socket.
    pub family: u32,
    /// The enrolled pod cgroup the socket was created in (see [`SockCgroups`]): the kernel's
    /// word on which pod this is.
    pub cgroup_id: u64,
}

/// Value of [`maps::SOCK_CGROUPS`]: the cgroup a socket was created in and its ancestors.
///
/// `ids[0]` is the creation cgroup itself; `ids[level]` for `level >= 1` is its ancestor at
/// that level below the root (level 1 is a child of the root), 0 past the cgroup's own depth.
/// The programs look `ids[0]` up in [`maps::ENROLLED`], then the ancestors from the top down,
/// so a socket of a container cgroup below an enrolled pod cgroup belongs to that pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockCgroups {
    pub ids: [u64; MAX_CGROUP_DEPTH],
}

/// Indexes of [`maps::DP_STATS`]: events the datapath counts.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// A connect() was redirected to the node proxy.
    Redirected = 0,
    /// A connect() from an enrolled pod was left alone (loopback, excluded port or network).
    Excluded = 1,
    /// A connect() was refused because the original destination could not be recorded.
    TrackFull = 2,
    /// A connect() was refused because no proxy address of its family is configured.
    NoProxy = 3,
    /// The established connection could not be indexed by its tuple.
    TupleFull = 4,
    /// getpeername() returned the original destination.
    PeerRewritten = 5,
    /// A plaintext connection attempt (TCP SYN) to a STRICT pod, not from the node, was dropped.
    StrictDropped = 6,
    /// A plaintext connection attempt to a PERMISSIVE pod, not from the node, was let in.
    PlaintextAccepted = 7,
    /// A connect() on a socket without a recorded creation cgroup (created before the
    /// datapath was attached) was matched to a pod by the calling process's cgroup.
    CallerCgroupFallback = 8,
    /// A TCP socket of an enrolled pod was refused at creation because its creation cgroup
    /// could not be recorded (socket storage allocation failed).
    SocketUntracked = 9,
    /// A connection attempt from a client address to a STRICT pod was let in because the node
    /// proxy recorded that exact 4-tuple before connecting (see [`maps::DELIVERIES`]).
    DeliveryAdmitted = 10,
    /// A pod's reply to a connection delivered from a client address was steered back to the
    /// node proxy.
    ReturnSteered = 11,
}

impl Stat {
    pub const COUNT: u32 = 12;
    pub const ALL: [Stat; Stat::COUNT as usize] = [
        Stat::Redirected,
        Stat::Excluded,
        Stat::TrackFull,
        Stat::NoProxy,
        Stat::TupleFull,
        Stat::PeerRewritten,
        Stat::StrictDropped,
        Stat::PlaintextAccepted,
        Stat::CallerCgroupFallback,
        Stat::SocketUntracked,
        Stat::DeliveryAdmitted,
        Stat::ReturnSteered,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::Redirected => "redirected",
            Stat::Excluded => "excluded",
            Stat::TrackFull => "track_full",
            Stat::NoProxy => "no_proxy",
            Stat::TupleFull => "tuple_full",
            Stat::PeerRewritten => "peer_rewritten",
            Stat::StrictDropped => "strict_dropped",
            Stat::PlaintextAccepted => "plaintext_accepted",
            Stat::CallerCgroupFallback => "caller_cgroup_fallback",
            Stat::SocketUntracked => "socket_untracked",
            Stat::DeliveryAdmitted => "delivery_admitted",
            Stat::ReturnSteered => "return_steered",
        }
    }
}

/// The second 32-bit word of an IPv4-mapped IPv6 address (`::ffff:0:0`), as stored in memory.
pub const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// IPv4 address (network byte order) in its IPv4-mapped IPv6 form.
#[allow(
    clippy::inline_always,
    reason = "called from eBPF programs, where an out-of-line call costs verifier budget"
)]
#[inline(always)]
pub const fn v4_mapped(ip4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_PREFIX, ip4]
}

/// Whether a 16-byte address is IPv4-mapped.
#[allow(
    clippy::inline_always,
    reason = "called from eBPF programs, where an out-of-line call costs verifier budget"
)]
#[inline(always)]
pub const fn is_v4_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_PREFIX
}

/// Whether an IPv4 address (network byte order) must never be redirected: loopback and the
/// unspecified address stay inside the pod.
#[allow(
    clippy::inline_always,
    reason = "called from eBPF programs, where an out-of-line call costs verifier budget"
)]
#[inline(always)]
pub const fn is_local_v4(ip4: u32) -> bool {
    let first = ip4.to_ne_bytes()[0];
    first == 127 || ip4 == 0
}

/// Whether an IPv6 address (network byte order) must never be redirected: `::1`, `::`, and the
/// IPv4-mapped forms of loopback and unspecified.
#[allow(
    clippy::inline_always,
    reason = "called from eBPF programs, where an out-of-line call costs verifier budget"
)]
#[inline(always)]
pub const fn is_local_v6(ip: &[u32; 4]) -> bool {
    if is_v4_mapped(ip) {
        return is_local_v4(ip[3]);
    }
    ip[0] == 0
        && ip[1] == 0
        && ip[2] == 0
        && (ip[3] == 0 || ip[3] == u32::from_ne_bytes([0, 0, 0, 1]))
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and integer arrays with
    // no padding (sizes checked below), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Enrollment {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProxyConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MtlsPortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockCgroups {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Delivery {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LinkMac {}
}

// No padding anywhere: the size is the sum of the fields.
const _: () = assert!(core::mem::size_of::<Enrollment>() == 8);
const _: () = assert!(core::mem::size_of::<ProxyConfig>() == 28);
const _: () = assert!(core::mem::size_of::<SockKey>() == 20);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 32);
const _: () = assert!(core::mem::size_of::<MtlsPortKey>() == 16);
const _: () = assert!(core::mem::size_of::<SockCgroups>() == 8 * MAX_CGROUP_DEPTH);
const _: () = assert!(core::mem::size_of::<Delivery>() == 40);
const _: () = assert!(core::mem::size_of::<LinkMac>() == 8);

#[cfg(test)]
mod tests {
    use super::*;

    fn be(a: u8, b: u8, c: u8, d: u8) -> u32 {
        u32::from_ne_bytes([a, b, c, d])
    }

    #[test]
    fn loopback_and_unspecified_are_local() {
        assert!(is_local_v4(be(127, 0, 0, 1)));
        assert!(is_local_v4(be(127, 9, 8, 7)));
        assert!(is_local_v4(0));
        assert!(!is_local_v4(be(10, 0, 0, 1)));
        assert!(!is_local_v4(be(1, 2, 3, 127)));
        assert!(is_local_v6(&[0, 0, 0, be(0, 0, 0, 1)]));
        assert!(is_local_v6(&v4_mapped(be(127, 0, 0, 1))));
        assert!(!is_local_v6(&v4_mapped(be(10, 1, 2, 3))));
        assert!(!is_local_v6(&[be(0xfd, 0, 0, 0), 0, 0, be(0, 0, 0, 1)]));
    }

    #[test]
    fn stats_are_listed_in_index_order_with_distinct_names() {
        for (i, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(*stat as usize, i, "{stat:?}");
        }
        let mut names: Vec<_> = Stat::ALL.iter().map(|s| s.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Stat::COUNT as usize);
    }

    #[test]
    fn mapped_form_matches_std() {
        let ip = be(10, 200, 1, 11);
        let mapped = v4_mapped(ip);
        let mut bytes = [0u8; 16];
        for (i, w) in mapped.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 200, 1, 11]
        );
        assert!(is_v4_mapped(&mapped));
    }
}
