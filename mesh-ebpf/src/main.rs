//! Trellis's datapath in the kernel.
//!
//! Attached to a node's pod cgroup root, these programs steer every TCP connection of an enrolled
//! pod into the node proxy and remember where it was going:
//!
//! - `sock_create` records the cgroup each TCP socket is created in (socket storage), so that
//!   a connection belongs to the pod that created its socket, whichever process connects it.
//! - `connect4`/`connect6` rewrite the destination of an enrolled pod's `connect()` to the proxy's
//!   outbound listener and record the original destination under the socket's cookie.
//! - `sock_ops` sees the connection established, and indexes the record by the client's own
//!   address and port, which is what the proxy sees as the peer after `accept()`. It asks for
//!   state callbacks as soon as a tracked connection sends its SYN, so records go when it
//!   closes, established or not.
//! - `sock_release` forgets the record of a socket being closed (also one whose connect failed
//!   before any SYN was sent).
//! - `getpeername4`/`getpeername6` give the application back the address it asked for.
//! - `mtls_ingress` (cgroup_skb ingress) drops plaintext connection attempts to pods in STRICT
//!   mutual TLS mode unless they come from the node itself (kubelet probes, the node proxy
//!   delivering what it received over HBONE), or are a connection the node proxy recorded in
//!   `DELIVERIES` before opening it from the client's address, and counts those PERMISSIVE
//!   pods let in.
//! - `return_path` (tcx ingress on pod links, in [`return_path`]) steers a pod's replies to
//!   such connections back to the node proxy.
//!
//! Enrollment is data (the `ENROLLED` map), never attachment, so pods come and go without
//! touching programs. The proxy's own sockets are never redirected by construction: the agent
//! does not run in a pod cgroup.
#![no_std]
#![no_main]

mod return_path;

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_CLONE, BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_map_type::BPF_MAP_TYPE_SK_STORAGE,
        bpf_sock_addr,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
        bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id, generated::bpf_sk_storage_get,
    },
    macros::{btf_map, cgroup_skb, cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use mesh_common::{
    AF_INET, AF_INET6, Delivery, Enrollment, LinkMac, MAX_CGROUP_DEPTH, MAX_DELIVERIES,
    MAX_ENROLLED_CGROUPS, MAX_EXCLUDED_NETS, MAX_EXCLUDED_PORTS, MAX_MTLS_PORTS, MAX_NODE_ADDRS,
    MAX_POD_LINKS, MAX_TRACKED_CONNECTIONS, MTLS_STRICT, MtlsPortKey, OrigDst, ProxyConfig,
    SockCgroups, SockKey, Stat, is_local_v6, is_v4_mapped, v4_mapped,
};

/// Verdicts of cgroup sock_addr programs.
const ALLOW: i32 = 1;
/// Refuses the syscall with EPERM: used where letting the connection through would bypass the
/// mesh (fail closed).
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
/// Verdicts of cgroup_skb programs.
const PASS: i32 = 1;
const DROP: i32 = 0;
/// Verdicts of cgroup sock programs (socket creation).
const SOCK_ALLOW: i32 = 1;
const SOCK_REFUSE: i32 = 0;

/// Flags of [`SockStorage`] maps: socket storage must not be preallocated, and is copied from
/// a listener to the sockets it accepts (which the kernel puts in the listener's cgroup, and
/// which `sock_create` never sees).
const SOCK_STORAGE_FLAGS: usize = (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize;
/// libbpf's `LIBBPF_PIN_BY_NAME`: pinned under the loader's map directory, by the map's name.
const PIN_BY_NAME: usize = 1;

/// A socket storage map, in the BTF form loaders read (`BPF_MAP_TYPE_SK_STORAGE` exists only
/// with BTF). aya-ebpf's own definition can neither pin nor clone, and its accessors only take
/// a sock_addr context; the loader reads this struct's member types, never its values.
#[repr(C)]
struct SockStorage<T> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; SOCK_STORAGE_FLAGS],
    pinning: *const [i32; PIN_BY_NAME],
}

// SAFETY: the fields are null placeholders that only describe the map in BTF; nothing reads or
// writes them, so sharing the static between CPUs shares no state.
unsafe impl<T> Sync for SockStorage<T> {}

impl<T> SockStorage<T> {
    const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
            pinning: ptr::null(),
        }
    }

    /// What map helpers take: the loader relocates references to the static into the map.
    fn as_ptr(&self) -> *mut c_void {
        ptr::from_ref(self).cast_mut().cast()
    }
}

#[map]
static ENROLLED: HashMap<u64, Enrollment> = HashMap::pinned(MAX_ENROLLED_CGROUPS, 0);
#[map]
static PROXY_CONFIG: Array<ProxyConfig> = Array::pinned(1, 0);
#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_TRACKED_CONNECTIONS, 0);
#[map]
static ORIG_BY_TUPLE: LruHashMap<SockKey, OrigDst> = LruHashMap::pinned(MAX_TRACKED_CONNECTIONS, 0);
#[map]
static EXCLUDED_PORTS: HashMap<u32, u32> = HashMap::pinned(MAX_EXCLUDED_PORTS, 0);
/// LPM tries require BPF_F_NO_PREALLOC.
#[map]
static EXCLUDED_NETS: LpmTrie<[u32; 4], u32> = LpmTrie::pinned(MAX_EXCLUDED_NETS, 1);
#[map]
static DP_STATS: PerCpuArray<u64> = PerCpuArray::pinned(Stat::COUNT, 0);
#[map]
static MTLS_PORTS: HashMap<MtlsPortKey, u32> = HashMap::pinned(MAX_MTLS_PORTS, 0);
#[map]
static NODE_ADDRS: HashMap<[u32; 4], u32> = HashMap::pinned(MAX_NODE_ADDRS, 0);
/// LRU: entries of a crashed agent's connections age out instead of filling the map (the
/// agent also empties it at start).
#[map]
static DELIVERIES: LruHashMap<Delivery, u32> = LruHashMap::pinned(MAX_DELIVERIES, 0);
#[map]
static LINK_MACS: HashMap<u32, LinkMac> = HashMap::pinned(MAX_POD_LINKS, 0);
#[btf_map]
static SOCK_CGROUPS: SockStorage<SockCgroups> = SockStorage::new();

#[inline(always)]
pub(crate) fn count(stat: Stat) {
    if let Some(slot) = DP_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: the pointer comes from the map lookup and is valid for this CPU's slot; per-CPU
        // storage has no concurrent writer while this program runs on the CPU.
        unsafe { *slot += 1 };
    }
}

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    try_sock_create(&ctx)
}

#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    try_sock_release(&ctx);
    SOCK_ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, AF_INET)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, AF_INET6)
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    try_getpeername(&ctx, AF_INET);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    try_getpeername(&ctx, AF_INET6);
    ALLOW
}

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    try_sock_ops(&ctx);
    1
}

#[cgroup_skb(ingress)]
pub fn mtls_ingress(ctx: SkBuffContext) -> i32 {
    try_mtls_ingress(&ctx)
}

/// Steers an enrolled pod's TCP connect() to the node proxy.
#[inline(always)]
fn try_connect(ctx: &SockAddrContext, family: u32) -> i32 {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` for the duration of the program.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let Some((cgroup_id, enrollment)) = socket_pod(sa) else {
        return ALLOW;
    };
    if enrollment.flags & Enrollment::REDIRECT_OUTBOUND == 0 {
        return ALLOW;
    }
    let Some(proxy) = PROXY_CONFIG.get(0) else {
        count(Stat::NoProxy);
        return REFUSE;
    };

    let dst_ip = if family == AF_INET {
        v4_mapped(sa.user_ip4)
    } else {
        read_ip6(sa)
    };
    let dst_port = u32::from(u16::from_be(sa.user_port as u16));
    let proxy_ip = if family == AF_INET || is_v4_mapped(&dst_ip) {
        v4_mapped(proxy.ip4)
    } else {
        proxy.ip6
    };

    if is_local_v6(&dst_ip) || dst_ip == proxy_ip || is_excluded(&dst_ip, dst_port) {
        count(Stat::Excluded);
        return ALLOW;
    }
    if proxy_ip == v4_mapped(0) || proxy_ip == [0; 4] {
        // No listener of this family: leaving the connection alone would take it out of the mesh.
        count(Stat::NoProxy);
        return REFUSE;
    }

    let orig = OrigDst {
        ip: dst_ip,
        port: dst_port,
        family,
        cgroup_id,
    };
    // SAFETY: cookie helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        count(Stat::TrackFull);
        warn!(
            ctx,
            "trellis: cannot track connection of cgroup {}, refusing", cgroup_id
        );
        return REFUSE;
    }

    if family == AF_INET {
        sa.user_ip4 = proxy.ip4;
    } else {
        write_ip6(sa, &proxy_ip);
    }
    sa.user_port = u32::from((proxy.outbound_port as u16).to_be());
    count(Stat::Redirected);
    ALLOW
}

/// Records the cgroup a TCP socket is created in, and its ancestors. The program runs in the
/// creating task, whose cgroup is the one the kernel stamps on the socket.
///
/// Fails closed: a socket of an enrolled pod whose cgroup cannot be recorded (the kernel could
/// not allocate the storage) is refused, since a later connect() would otherwise be judged by
/// whichever process makes it.
#[inline(always)]
fn try_sock_create(ctx: &SockContext) -> i32 {
    // SAFETY: the kernel passes a valid `bpf_sock` for the duration of the program.
    if unsafe { (*ctx.sock).type_ } != SOCK_STREAM {
        return SOCK_ALLOW;
    }
    // SAFETY: cgroup sock programs pass their context as the socket (the kernel takes the
    // socket from it); a null initial value with F_CREATE makes zeroed storage.
    let stored = unsafe {
        bpf_sk_storage_get(
            SOCK_CGROUPS.as_ptr(),
            ctx.as_ptr(),
            ptr::null_mut(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    }
    .cast::<SockCgroups>();
    if stored.is_null() {
        if enrolled_pod().is_some() {
            count(Stat::SocketUntracked);
            return SOCK_REFUSE;
        }
        return SOCK_ALLOW;
    }
    // SAFETY: a non-null result points to this socket's storage, sized for `SockCgroups`, and
    // nothing else writes it while the socket is being created.
    let ids = unsafe { &mut (*stored).ids };
    // SAFETY: helper without arguments, allowed in cgroup sock programs.
    ids[0] = unsafe { bpf_get_current_cgroup_id() };
    for (level, id) in ids.iter_mut().enumerate().skip(1) {
        // SAFETY: helper with a plain integer argument; returns 0 past the current depth.
        *id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
    }
    SOCK_ALLOW
}

/// Forgets the original destination of a socket being closed. The state callback covers
/// connections that sent a SYN; this covers the rest (a connect() redirected here that then
/// failed before sending one, such as an unreachable route).
#[inline(always)]
fn try_sock_release(ctx: &SockContext) {
    // SAFETY: the kernel passes a valid `bpf_sock` for the duration of the program.
    if unsafe { (*ctx.sock).type_ } != SOCK_STREAM {
        return;
    }
    // SAFETY: cookie helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = ORIG_BY_COOKIE.remove(cookie);
}

/// The enrolled pod the socket of `sa` belongs to: the one its creation cgroup (recorded by
/// `sock_create`) is in, never the cgroup of the process calling connect(), which may have
/// moved since.
///
/// A socket without a record was created before the datapath was attached (or before an
/// upgrade to this layout); for it the calling process's cgroup is the only evidence left, and
/// was the rule before. Refusing such sockets instead would break every pre-existing socket of
/// every pod, meshed or not, since nothing else says whose they are.
#[inline(always)]
fn socket_pod(sa: &bpf_sock_addr) -> Option<(u64, Enrollment)> {
    // SAFETY: `sk` is the socket of the syscall, always set for sock_addr programs.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    // SAFETY: lookup without F_CREATE of the socket's storage; `sk` is a full socket.
    let stored =
        unsafe { bpf_sk_storage_get(SOCK_CGROUPS.as_ptr(), sk.cast(), ptr::null_mut(), 0) }
            .cast::<SockCgroups>();
    if stored.is_null() {
        let pod = enrolled_pod();
        if pod.is_some() {
            count(Stat::CallerCgroupFallback);
        }
        return pod;
    }
    // SAFETY: a non-null result points to this socket's storage, sized for `SockCgroups`;
    // the value is copied out.
    let ids = unsafe { (*stored).ids };
    // A level past the array reads as 0, which ends the walk.
    find_enrolled(ids[0], |level| ids.get(level).copied().unwrap_or(0))
}

/// The enrolled pod cgroup the calling process belongs to: its own cgroup or an ancestor. In
/// Kubernetes, processes live in container cgroups below the pod's cgroup, which is the one
/// the agent enrolls.
#[inline(always)]
fn enrolled_pod() -> Option<(u64, Enrollment)> {
    // SAFETY: helper without arguments, allowed in cgroup sock and sock_addr programs.
    let current = unsafe { bpf_get_current_cgroup_id() };
    find_enrolled(current, |level| {
        // SAFETY: helper with a plain integer argument; returns 0 past the current depth.
        unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) }
    })
}

/// The enrolled pod cgroup of the socket receiving `ctx`: its own cgroup or an ancestor, as in
/// [`enrolled_pod`].
#[inline(always)]
fn enrolled_receiver(ctx: &SkBuffContext) -> Option<(u64, Enrollment)> {
    let skb = ctx.skb.skb;
    // SAFETY: `skb` is the program's own context; the kernel sets the receiving socket on it
    // for the duration of cgroup_skb programs.
    let current = unsafe { bpf_skb_cgroup_id(skb) };
    find_enrolled(current, |level| {
        // SAFETY: as above, with a plain integer argument; returns 0 past the socket's depth.
        unsafe { bpf_skb_ancestor_cgroup_id(skb, level as i32) }
    })
}

/// Looks `current` up in [`ENROLLED`], then its ancestors from the top of the hierarchy down
/// (`ancestor_at(level)`, 0 past the cgroup's depth).
#[inline(always)]
fn find_enrolled(current: u64, ancestor_at: impl Fn(usize) -> u64) -> Option<(u64, Enrollment)> {
    // SAFETY: read-only lookup of a plain-data value, copied out.
    if let Some(enrollment) = unsafe { ENROLLED.get(current) } {
        return Some((current, *enrollment));
    }
    for level in 1..MAX_CGROUP_DEPTH {
        let ancestor = ancestor_at(level);
        if ancestor == 0 || ancestor == current {
            break;
        }
        // SAFETY: read-only lookup of a plain-data value, copied out.
        if let Some(enrollment) = unsafe { ENROLLED.get(ancestor) } {
            return Some((ancestor, *enrollment));
        }
    }
    None
}

/// What `mtls_ingress` needs from a connection attempt.
struct Syn {
    /// Source address, network byte order, IPv4 mapped into IPv6.
    src: [u32; 4],
    /// Destination address, same form.
    dst: [u32; 4],
    /// Source port, host byte order.
    src_port: u32,
    /// Destination port, host byte order.
    dst_port: u32,
}

pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
pub(crate) const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// IPv6 extension headers walked before giving up on finding TCP (real stacks send at most a
/// couple; the bound keeps the program's path count fixed).
const MAX_IPV6_EXT_HEADERS: u32 = 6;

/// Enforces an enrolled pod's inbound mutual TLS mode on plaintext connection attempts.
///
/// Only connection-opening segments (SYN without ACK) are judged: a connection whose SYN never
/// got through never exists, and established connections (and replies to the pod's own
/// connects, which carry ACK) are left alone. Connections the node proxy delivers, and kubelet
/// probes, come from an address of the node and always pass.
#[inline(always)]
fn try_mtls_ingress(ctx: &SkBuffContext) -> i32 {
    let Some(syn) = parse_syn(ctx) else {
        return PASS;
    };
    let Some((cgroup_id, enrollment)) = enrolled_receiver(ctx) else {
        return PASS;
    };
    if is_loopback(&syn.src) || syn.src == syn.dst || is_node_addr(&syn.src) {
        return PASS;
    }
    // The node proxy delivering from the client's address: exactly the 4-tuple it recorded
    // before connecting, which a plaintext client cannot choose while the proxy holds it.
    let delivery = Delivery {
        client: syn.src,
        pod: syn.dst,
        client_port: syn.src_port,
        pod_port: syn.dst_port,
    };
    // SAFETY: read-only lookup; only its presence is used.
    if unsafe { DELIVERIES.get(&delivery) }.is_some() {
        count(Stat::DeliveryAdmitted);
        return PASS;
    }
    let key = MtlsPortKey {
        cgroup_id,
        port: syn.dst_port,
        reserved: 0,
    };
    // SAFETY: read-only lookup of a plain-data value, copied out.
    let strict = match unsafe { MTLS_PORTS.get(key) } {
        Some(mode) => *mode == MTLS_STRICT,
        None => enrollment.flags & Enrollment::STRICT_INBOUND != 0,
    };
    if strict {
        count(Stat::StrictDropped);
        DROP
    } else {
        count(Stat::PlaintextAccepted);
        PASS
    }
}

/// The addresses and port of a TCP SYN (without ACK), or `None` for anything else. cgroup_skb
/// data starts at the network header.
#[inline(always)]
fn parse_syn(ctx: &SkBuffContext) -> Option<Syn> {
    // SAFETY: the kernel passes a valid `__sk_buff` for the duration of the program.
    let protocol = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    let (src, dst, l4) = if protocol == ETH_P_IP {
        let version_ihl: u8 = ctx.load(0).ok()?;
        let ihl = u32::from(version_ihl & 0x0f) * 4;
        if version_ihl >> 4 != 4 || ihl < 20 {
            return None;
        }
        let proto: u8 = ctx.load(9).ok()?;
        if proto != IPPROTO_TCP {
            return None;
        }
        let src: u32 = ctx.load(12).ok()?;
        let dst: u32 = ctx.load(16).ok()?;
        (v4_mapped(src), v4_mapped(dst), ihl)
    } else if protocol == ETH_P_IPV6 {
        let src: [u32; 4] = ctx.load(8).ok()?;
        let dst: [u32; 4] = ctx.load(24).ok()?;
        (src, dst, ipv6_tcp_offset(ctx)?)
    } else {
        return None;
    };
    let flags: u8 = ctx.load(l4 as usize + 13).ok()?;
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return None;
    }
    let ports: [u16; 2] = ctx.load(l4 as usize).ok()?;
    Some(Syn {
        src,
        dst,
        src_port: u32::from(u16::from_be(ports[0])),
        dst_port: u32::from(u16::from_be(ports[1])),
    })
}

/// Offset of the TCP header in an IPv6 packet, past any extension headers; `None` if the
/// packet is not TCP (or hides it behind more extension headers than the bound).
#[inline(always)]
fn ipv6_tcp_offset(ctx: &SkBuffContext) -> Option<u32> {
    const HOP_BY_HOP: u8 = 0;
    const ROUTING: u8 = 43;
    const FRAGMENT: u8 = 44;
    const AUTH: u8 = 51;
    const DEST_OPTS: u8 = 60;
    let mut next: u8 = ctx.load(6).ok()?;
    let mut offset: u32 = 40;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        if next == IPPROTO_TCP {
            return Some(offset);
        }
        let header: [u8; 2] = ctx.load(offset as usize).ok()?;
        let len = match next {
            HOP_BY_HOP | ROUTING | DEST_OPTS => (u32::from(header[1]) + 1) * 8,
            FRAGMENT => 8,
            AUTH => (u32::from(header[1]) + 2) * 4,
            _ => return None,
        };
        next = header[0];
        offset += len;
    }
    (next == IPPROTO_TCP).then_some(offset)
}

/// Loopback sources (`127.0.0.0/8`, `::1`): the pod talking to itself.
#[inline(always)]
fn is_loopback(ip: &[u32; 4]) -> bool {
    if is_v4_mapped(ip) {
        return ip[3].to_ne_bytes()[0] == 127;
    }
    ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == u32::from_ne_bytes([0, 0, 0, 1])
}

#[inline(always)]
fn is_node_addr(ip: &[u32; 4]) -> bool {
    // SAFETY: read-only lookup of a plain-data value.
    unsafe { NODE_ADDRS.get(ip) }.is_some()
}

/// The verifier only allows 4-byte accesses to `user_ip6`: copy word by word, with volatile
/// accesses so the compiler cannot merge them into a byte-wise memcpy.
#[inline(always)]
fn read_ip6(sa: &bpf_sock_addr) -> [u32; 4] {
    let mut ip = [0u32; 4];
    for (i, word) in ip.iter_mut().enumerate() {
        // SAFETY: `i < 4`, so the pointer stays inside the kernel-provided `user_ip6` array.
        *word = unsafe { core::ptr::read_volatile(sa.user_ip6.as_ptr().add(i)) };
    }
    ip
}

#[inline(always)]
fn write_ip6(sa: &mut bpf_sock_addr, ip: &[u32; 4]) {
    for (i, word) in ip.iter().enumerate() {
        // SAFETY: `i < 4`, so the pointer stays inside the kernel-provided `user_ip6` array.
        unsafe { core::ptr::write_volatile(sa.user_ip6.as_mut_ptr().add(i), *word) };
    }
}

#[inline(always)]
fn is_excluded(ip: &[u32; 4], port: u32) -> bool {
    // SAFETY: read-only lookup of a plain-data value.
    if unsafe { EXCLUDED_PORTS.get(port) }.is_some() {
        return true;
    }
    EXCLUDED_NETS.get(Key::new(128, *ip)).is_some()
}

/// Reports the original destination to the application instead of the proxy.
#[inline(always)]
fn try_getpeername(ctx: &SockAddrContext, family: u32) {
    // SAFETY: cookie helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain-data value.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(cookie) }) else {
        return;
    };
    if orig.family != family {
        return;
    }
    // SAFETY: the kernel passes a valid `bpf_sock_addr` for the duration of the program.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if family == AF_INET {
        sa.user_ip4 = orig.ip[3];
    } else {
        write_ip6(sa, &orig.ip);
    }
    sa.user_port = u32::from((orig.port as u16).to_be());
    count(Stat::PeerRewritten);
}

/// Indexes redirected connections by the client's address once established, and forgets them
/// when they close, whether they were established or not.
#[inline(always)]
fn try_sock_ops(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return;
    }
    // SAFETY: cookie helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // The SYN is about to go out. Ask for state callbacks now rather than once established,
        // so a connection that is refused, times out or is closed before the handshake ends
        // (TCP_CLOSE from SYN_SENT) drops its record too.
        // SAFETY: read-only lookup; only its presence is used.
        if unsafe { ORIG_BY_COOKIE.get(cookie) }.is_some() {
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        }
        return;
    }
    let key = local_key(ctx);
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // SAFETY: read-only lookup; the value is copied before the map is written.
        let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(cookie) }).copied() else {
            return;
        };
        if ORIG_BY_TUPLE.insert(key, orig, 0).is_err() {
            count(Stat::TupleFull);
            return;
        }
        // Asked for at connect already; again here for connections whose SYN went out before
        // this program was attached.
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    } else if ctx.arg(1) == BPF_TCP_CLOSE {
        let _ = ORIG_BY_TUPLE.remove(key);
        let _ = ORIG_BY_COOKIE.remove(cookie);
    }
}

/// The socket's own address and port. Both address forms are read unconditionally, each with a
/// fixed-offset 4-byte load: the verifier refuses context loads through a computed pointer,
/// which is what the compiler makes of "read this field or that one".
#[inline(always)]
fn local_key(ctx: &SockOpsContext) -> SockKey {
    let ops = ctx.ops;
    // SAFETY: the kernel passes a valid `bpf_sock_ops` for the duration of the program; each
    // load reads one aligned u32 field of it.
    let (family, ip4, ip6, port) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ops).family),
            core::ptr::read_volatile(&raw const (*ops).local_ip4),
            [
                core::ptr::read_volatile(&raw const (*ops).local_ip6[0]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[1]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[2]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[3]),
            ],
            core::ptr::read_volatile(&raw const (*ops).local_port),
        )
    };
    let mapped = v4_mapped(ip4);
    let is_v4 = u32::from(family == AF_INET);
    // Branch-free select between the two forms.
    let mask = 0u32.wrapping_sub(is_v4);
    SockKey {
        ip: [
            (mapped[0] & mask) | (ip6[0] & !mask),
            (mapped[1] & mask) | (ip6[1] & !mask),
            (mapped[2] & mask) | (ip6[2] & !mask),
            (mapped[3] & mask) | (ip6[3] & !mask),
        ],
        port,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
