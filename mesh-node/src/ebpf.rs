//! The agent's side of the kernel datapath: loads the programs, owns the pinned maps and links.
//!
//! Layout under the configured pin directory: `v<LAYOUT_VERSION>/maps/<MAP>` and
//! `v<LAYOUT_VERSION>/links/<program>`. Maps and links are pinned so the datapath keeps
//! redirecting (and keeps refusing what it refuses) while the agent restarts; a new agent reuses
//! the maps and swaps in its own programs without a gap. A directory of another layout version
//! is never reused: it is removed once the new programs are attached.
//!
//! Order of installation, so that a crash at any point leaves no pod half-redirected: maps are
//! filled first, then programs attached, then old links replaced.
//!
//! Inbound mutual TLS ([`InboundMtls`]) is enforced by `mtls_ingress` from three maps the
//! [`Enroller`] writes: the pod's flag in `ENROLLED`, per-port overrides in `MTLS_PORTS`, and
//! the node's own addresses in `NODE_ADDRS` (plaintext from those always passes: kubelet
//! probes and the proxy's deliveries). Writes are ordered so that a failure leaves a port
//! refusing plaintext rather than accepting it.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs::File,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, SockOps,
        links::FdLink,
    },
};
use mesh_common::{
    Enrollment, LAYOUT_VERSION, MTLS_PERMISSIVE, MTLS_STRICT, MtlsPortKey, OrigDst, ProxyConfig,
    SockKey, Stat, maps, programs,
};

mod log;

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
}

/// A pod cgroup to enroll, identified by its directory.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodCgroup {
    pub path: PathBuf,
    pub id: u64,
    /// Whether the pod accepts inbound plaintext that did not come through the node.
    pub inbound: InboundMtls,
}

/// Which plaintext a pod refuses in the kernel: connection attempts that come neither from the
/// node (its proxy, kubelet probes) nor from the pod itself, to ports where a caller without an
/// identity is denied, by STRICT mutual TLS or by authorization policy alike (see
/// [`crate::policy::Engine::plaintext_refusals`]). Other ports let plaintext in and count it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct InboundMtls {
    /// Whether ports without an override refuse plaintext.
    pub strict: bool,
    /// Per-port overrides: port -> refuses plaintext.
    pub ports: BTreeMap<u16, bool>,
}

impl InboundMtls {
    /// STRICT on every port.
    pub fn strict() -> Self {
        Self {
            strict: true,
            ports: BTreeMap::new(),
        }
    }

    /// Whether `port` refuses plaintext.
    pub fn is_strict(&self, port: u16) -> bool {
        self.ports.get(&port).copied().unwrap_or(self.strict)
    }
}

impl PodCgroup {
    /// The cgroup v2 id of a directory is its inode number.
    pub fn from_path(path: &Path) -> Result<Self, EbpfError> {
        let meta = std::fs::metadata(path).map_err(|source| EbpfError::Io {
            what: "cannot stat cgroup",
            path: path.into(),
            source,
        })?;
        Ok(Self {
            path: path.into(),
            id: meta.ino(),
            inbound: InboundMtls::default(),
        })
    }
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn fs_magic(path: &Path) -> Result<i64, EbpfError> {
    let stat = nix::sys::statfs::statfs(path).map_err(|e| EbpfError::Io {
        what: "cannot statfs",
        path: path.into(),
        source: e.into(),
    })?;
    #[allow(
        clippy::unnecessary_cast,
        reason = "the field type differs between libcs"
    )]
    Ok(stat.filesystem_type().0 as i64)
}

/// The loaded datapath. Dropping it leaves the pinned programs attached.
///
/// Shared read-only (counters, map ids, connection lookups); the enrollment map is not part of
/// it but of the [`Enroller`] that [`Datapath::install`] hands out, so exactly one owner
/// writes it.
pub struct Datapath {
    _ebpf: Ebpf,
    conntrack: Arc<ConnTrack>,
    stats: PerCpuArray<MapData, u64>,
    version_dir: PathBuf,
    _logger: Option<log::LogPump>,
}

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
            by_cookie: self.by_cookie.keys().filter(Result::is_ok).count(),
            by_tuple: self.by_tuple.keys().filter(Result::is_ok).count(),
        }
    }
}

/// The writer of the enrollment maps: which pod cgroups are redirected, their inbound mutual
/// TLS modes, and the node addresses those modes exempt.
pub struct Enroller {
    enrolled: HashMap<MapData, u64, Enrollment>,
    mtls_ports: HashMap<MapData, MtlsPortKey, u32>,
    node_addrs: HashMap<MapData, [u32; 4], u32>,
}

impl std::fmt::Debug for Enroller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enroller").finish_non_exhaustive()
    }
}

impl Enroller {
    /// Makes the enrollment maps exactly `pods` (and refreshes the node's addresses first, so
    /// a new one is exempt before any pod turns STRICT).
    ///
    /// Order, so that no port accepts plaintext at any moment unless it did before or should
    /// after:
    /// 1. entries of pods that left go (a gone pod's cgroup id could be reused), freeing room;
    /// 2. each pod's port overrides are written, then its flags: a pod turning PERMISSIVE with
    ///    a STRICT port has that port's override in place before the flag relaxes the rest;
    /// 3. overrides no longer wanted go last; until then their ports keep their previous mode.
    ///
    /// A write that fails (a full map) is reported and the others still go in. It fails
    /// closed: a STRICT override that cannot be written makes the whole pod STRICT, and a
    /// PERMISSIVE one that cannot be written leaves its port STRICT. A pod that cannot be
    /// enrolled at all is out of the mesh, as before, and reported.
    pub fn enroll(&mut self, pods: &[PodCgroup]) -> Result<(), EbpfError> {
        let mut first_failure = self.refresh_node_addrs().err();

        let wanted: HashSet<u64> = pods.iter().map(|p| p.id).collect();
        let stale: Vec<u64> = self
            .enrolled
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !wanted.contains(id))
            .collect();
        for id in stale {
            let _ = self.enrolled.remove(&id);
        }
        let gone: Vec<MtlsPortKey> = self
            .mtls_ports
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !wanted.contains(&key.cgroup_id))
            .collect();
        for key in gone {
            let _ = self.mtls_ports.remove(&key);
        }

        let mut written: HashSet<MtlsPortKey> = HashSet::new();
        for pod in pods {
            let mut strict_override_failed = false;
            for (key, mode) in port_overrides(pod) {
                match self.mtls_ports.insert(key, mode, 0) {
                    Ok(()) => {
                        written.insert(key);
                    }
                    Err(source) => {
                        let port = (key.port & 0xffff) as u16;
                        tracing::error!(cgroup = %pod.path.display(), port, error = %source,
                            "cannot write the port's mutual TLS mode; it refuses plaintext");
                        strict_override_failed |= mode == MTLS_STRICT;
                        first_failure.get_or_insert_with(|| EbpfError::PortOverrideFull {
                            max: mesh_common::MAX_MTLS_PORTS,
                            cgroup: pod.path.clone(),
                            port,
                        });
                    }
                }
            }
            let value = Enrollment {
                flags: enrollment_flags(&pod.inbound, strict_override_failed),
                reserved: 0,
            };
            if let Err(source) = self.enrolled.insert(pod.id, value, 0) {
                tracing::error!(cgroup = %pod.path.display(), error = %source, "cannot enroll pod");
                first_failure.get_or_insert_with(|| EbpfError::EnrollmentFull {
                    max: mesh_common::MAX_ENROLLED_CGROUPS,
                    cgroup: pod.path.clone(),
                });
            }
        }

        let unwanted: Vec<MtlsPortKey> = self
            .mtls_ports
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !written.contains(key))
            .collect();
        for key in unwanted {
            let _ = self.mtls_ports.remove(&key);
        }
        first_failure.map_or(Ok(()), Err)
    }

    /// Makes `NODE_ADDRS` exactly the addresses of the network namespace the agent runs in
    /// (the node's). An address that cannot be inserted is reported, the others still go in.
    pub fn refresh_node_addrs(&mut self) -> Result<(), EbpfError> {
        let wanted = node_addresses()?;
        let stale: Vec<[u32; 4]> = self
            .node_addrs
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !wanted.contains(key))
            .collect();
        for key in stale {
            let _ = self.node_addrs.remove(&key);
        }
        let mut first_failure = None;
        for key in &wanted {
            if let Err(source) = self.node_addrs.insert(key, 1, 0) {
                let addr = key_to_ip(key);
                tracing::error!(%addr, error = %source, "cannot record node address");
                first_failure.get_or_insert(EbpfError::NodeAddrsFull {
                    max: mesh_common::MAX_NODE_ADDRS,
                    addr,
                });
            }
        }
        first_failure.map_or(Ok(()), Err)
    }

    /// The cgroup ids in the map now.
    pub fn enrolled(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
    }

    /// Whether the enrolled cgroup `id` is STRICT by default (`None`: not enrolled).
    pub fn strict_inbound(&self, id: u64) -> Option<bool> {
        let value = self.enrolled.get(&id, 0).ok()?;
        Some(value.flags & Enrollment::STRICT_INBOUND != 0)
    }

    /// The port overrides in the map now: (cgroup id, port, strict), sorted.
    pub fn port_overrides(&self) -> Vec<(u64, u16, bool)> {
        let mut out: Vec<(u64, u16, bool)> = self
            .mtls_ports
            .iter()
            .filter_map(Result::ok)
            .map(|(key, mode)| {
                (
                    key.cgroup_id,
                    (key.port & 0xffff) as u16,
                    mode == MTLS_STRICT,
                )
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// The node addresses in the map now, sorted.
    pub fn node_addrs(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = self
            .node_addrs
            .keys()
            .filter_map(Result::ok)
            .map(|key| key_to_ip(&key))
            .collect();
        out.sort_unstable();
        out
    }
}

/// The `MTLS_PORTS` entries a pod needs: only overrides that differ from its own mode change
/// anything, so only those take room in the map.
fn port_overrides(pod: &PodCgroup) -> Vec<(MtlsPortKey, u32)> {
    pod.inbound
        .ports
        .iter()
        .filter(|(_, strict)| **strict != pod.inbound.strict)
        .map(|(port, strict)| {
            let key = MtlsPortKey {
                cgroup_id: pod.id,
                port: u32::from(*port),
                reserved: 0,
            };
            (
                key,
                if *strict {
                    MTLS_STRICT
                } else {
                    MTLS_PERMISSIVE
                },
            )
        })
        .collect()
}

/// The `ENROLLED` flags of a pod; STRICT as well when one of its STRICT port overrides could not
/// be written (fail closed: better to refuse plaintext on its PERMISSIVE ports too).
fn enrollment_flags(inbound: &InboundMtls, strict_override_failed: bool) -> u32 {
    let mut flags = Enrollment::REDIRECT_OUTBOUND;
    if inbound.strict || strict_override_failed {
        flags |= Enrollment::STRICT_INBOUND;
    }
    flags
}

/// Every address of the calling thread's network namespace, as `NODE_ADDRS` keys.
fn node_addresses() -> Result<BTreeSet<[u32; 4]>, EbpfError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| EbpfError::NodeAddrs(e.into()))?;
    Ok(addrs
        .filter_map(|ifaddr| {
            let addr = ifaddr.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(ip_key(IpAddr::V4(v4.ip())))
            } else {
                addr.as_sockaddr_in6().map(|v6| ip_key(IpAddr::V6(v6.ip())))
            }
        })
        .collect())
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

impl Datapath {
    /// Loads the programs, fills the maps, attaches to the pod cgroup root and pins everything.
    ///
    /// With `pods`, the enrollment map is made exactly that before any program is attached
    /// (static mode). Without, it is left as a previous agent pinned it, so pods stay
    /// redirected (and refused while no proxy knows them) until the owner of the returned
    /// [`Enroller`] reconciles it against the first state from the controller.
    pub fn install(
        spec: &DatapathSpec,
        pods: Option<&[PodCgroup]>,
    ) -> Result<(Self, Enroller), EbpfError> {
        preflight(spec)?;
        let version_dir = spec.pin_dir.join(format!("v{LAYOUT_VERSION}"));
        let maps_dir = version_dir.join("maps");
        let links_dir = version_dir.join("links");
        for dir in [&maps_dir, &links_dir] {
            std::fs::create_dir_all(dir).map_err(|source| EbpfError::Io {
                what: "cannot create pin directory",
                path: dir.clone(),
                source,
            })?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(OBJECT)?;
        let logger = log::LogPump::start(&mut ebpf);

        // 1. Maps first: the programs must never run against empty or stale configuration.
        let mut proxy: Array<MapData, ProxyConfig> = take_map(&mut ebpf, maps::PROXY_CONFIG)?;
        proxy
            .set(0, proxy_config(spec), 0)
            .map_err(|source| EbpfError::Map {
                name: maps::PROXY_CONFIG,
                source,
            })?;
        let mut ports: HashMap<MapData, u32, u32> = take_map(&mut ebpf, maps::EXCLUDED_PORTS)?;
        reconcile_ports(&mut ports, &spec.excluded_ports)?;
        let mut nets: LpmTrie<MapData, [u32; 4], u32> = take_map(&mut ebpf, maps::EXCLUDED_NETS)?;
        reconcile_nets(&mut nets, &spec.excluded_nets)?;
        let mut enroller = Enroller {
            enrolled: take_map(&mut ebpf, maps::ENROLLED)?,
            mtls_ports: take_map(&mut ebpf, maps::MTLS_PORTS)?,
            node_addrs: take_map(&mut ebpf, maps::NODE_ADDRS)?,
        };
        // Node addresses even without pods: a restarted agent keeps the pinned STRICT pods, and
        // their kubelet probes must keep passing if the node's addresses changed meanwhile.
        enroller.refresh_node_addrs()?;
        if let Some(pods) = pods {
            enroller.enroll(pods)?;
        }
        let conntrack = Arc::new(ConnTrack {
            by_tuple: take_map(&mut ebpf, maps::ORIG_BY_TUPLE)?,
            by_cookie: take_map(&mut ebpf, maps::ORIG_BY_COOKIE)?,
        });
        let stats = take_map(&mut ebpf, maps::DP_STATS)?;
        let mut datapath = Self {
            _ebpf: ebpf,
            conntrack,
            stats,
            version_dir: version_dir.clone(),
            _logger: logger,
        };

        // 2. Attach and pin, replacing what a previous agent pinned. Cgroup links always allow
        //    several programs per hook (the kernel refuses attach flags on links), so the new
        //    programs run alongside the old ones until the old links are unpinned.
        let cgroup = File::open(&spec.cgroup_root).map_err(|source| EbpfError::Io {
            what: "cannot open cgroup",
            path: spec.cgroup_root.clone(),
            source,
        })?;
        // Every program is loaded (verified) before any is attached: a program the kernel
        // refuses must not leave pods with a redirect but no tracking (half-redirected).
        load_programs(&mut datapath._ebpf)?;
        // aya's program types share no trait for this sequence, hence a macro.
        macro_rules! attach_and_pin {
            ($cgroup:expr, $ty:ty, $name:expr $(, $attach_type:expr)?) => {{
                let name = $name;
                let program: &mut $ty = program_mut(&mut datapath._ebpf, name)?;
                let id = program
                    .attach($cgroup, $($attach_type,)? CgroupAttachMode::Single)
                    .map_err(|source| EbpfError::Program { name, source })?;
                let link = program
                    .take_link(id)
                    .map_err(|source| EbpfError::Program { name, source })?;
                let link =
                    FdLink::try_from(link).map_err(|source| EbpfError::Link { name, source })?;
                replace_pinned_link(link, &links_dir.join(name))?;
            }};
        }
        // Socket creation first: the sooner sockets carry their creation cgroup, the fewer
        // connects fall back to the calling process's cgroup.
        for name in SOCK_PROGRAMS {
            attach_and_pin!(&cgroup, CgroupSock, name);
        }
        for name in SOCK_ADDR_PROGRAMS {
            attach_and_pin!(&cgroup, CgroupSockAddr, name);
        }
        attach_and_pin!(&cgroup, SockOps, programs::SOCK_OPS);
        attach_and_pin!(
            &cgroup,
            CgroupSkb,
            programs::MTLS_INGRESS,
            CgroupSkbAttachType::Ingress
        );

        // 3. Only now retire datapaths of other layout versions.
        remove_other_versions(&spec.pin_dir);
        tracing::info!(pin_dir = %version_dir.display(), cgroup_root = %spec.cgroup_root.display(), "datapath attached");
        Ok((datapath, enroller))
    }

    pub fn conntrack(&self) -> Arc<ConnTrack> {
        self.conntrack.clone()
    }

    /// Where maps and links are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.version_dir
    }

    /// Summed per-CPU counters of the programs, by name.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        Stat::ALL
            .iter()
            .map(|s| {
                let total = self
                    .stats
                    .get(&(*s as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (s.name(), total)
            })
            .collect()
    }

    /// Ids of the pinned maps, to show that restarts reuse them.
    pub fn map_ids(&self) -> Vec<(String, u32)> {
        let dir = self.version_dir.join("maps");
        let mut ids = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if let Ok(map) = MapData::from_pin(entry.path())
                    && let Ok(info) = map.info()
                {
                    ids.push((entry.file_name().to_string_lossy().into_owned(), info.id()));
                }
            }
        }
        ids.sort();
        ids
    }
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.version_dir)
            .finish_non_exhaustive()
    }
}

/// Detaches every program and removes every pinned map of every layout version.
pub fn uninstall(pin_dir: &Path) -> Result<(), EbpfError> {
    if !pin_dir.exists() {
        return Ok(());
    }
    std::fs::remove_dir_all(pin_dir).map_err(|source| EbpfError::Io {
        what: "cannot remove pin directory",
        path: pin_dir.into(),
        source,
    })?;
    tracing::info!(pin_dir = %pin_dir.display(), "datapath detached and unpinned");
    Ok(())
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

/// Whether this kernel accepts every program of the datapath: loads them into a scratch pin
/// directory under `pin_dir` (which must be on bpffs) and removes it again. Attaches nothing,
/// so it is safe on a node whose pods are being served.
pub fn probe(pin_dir: &Path) -> Result<(), EbpfError> {
    let scratch = pin_dir.join(format!("probe_{}", std::process::id()));
    // Leave no trace: a pin directory made here is removed again (if still empty).
    let created = !pin_dir.exists();
    std::fs::create_dir_all(&scratch).map_err(|source| EbpfError::Io {
        what: "cannot create probe directory",
        path: scratch.clone(),
        source,
    })?;
    let result = EbpfLoader::new()
        .default_map_pin_directory(&scratch)
        .load(OBJECT)
        .map_err(EbpfError::from)
        .and_then(|mut ebpf| load_programs(&mut ebpf));
    let _ = std::fs::remove_dir_all(&scratch);
    if created {
        let _ = std::fs::remove_dir(pin_dir);
    }
    result
}

/// Whether `path` is a cgroup v2 directory.
pub fn is_cgroup2(path: &Path) -> Result<bool, EbpfError> {
    Ok(fs_magic(path)? == CGROUP2_SUPER_MAGIC)
}

/// Whether `path`, or its nearest existing ancestor, is on a bpf filesystem.
pub fn is_on_bpffs(path: &Path) -> Result<bool, EbpfError> {
    let mut probe = path.to_path_buf();
    while !probe.exists() {
        match probe.parent() {
            Some(parent) => probe = parent.into(),
            None => break,
        }
    }
    Ok(fs_magic(&probe)? == BPF_FS_MAGIC)
}

fn preflight(spec: &DatapathSpec) -> Result<(), EbpfError> {
    if fs_magic(&spec.cgroup_root)? != CGROUP2_SUPER_MAGIC {
        return Err(EbpfError::NotCgroup2 {
            path: spec.cgroup_root.clone(),
        });
    }
    let mut probe = spec.pin_dir.clone();
    while !probe.exists() {
        match probe.parent() {
            Some(parent) => probe = parent.into(),
            None => break,
        }
    }
    if fs_magic(&probe)? != BPF_FS_MAGIC {
        return Err(EbpfError::NotBpffs {
            path: spec.pin_dir.clone(),
        });
    }
    Ok(())
}

/// Pins `link` at `path`, atomically replacing (and so detaching) a link a previous agent
/// pinned there: the new program is attached before the old one goes, so there is no instant
/// in which connections escape redirection.
fn replace_pinned_link(link: FdLink, path: &Path) -> Result<(), EbpfError> {
    // bpffs refuses names with a dot.
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!("_new_{}", std::process::id()));
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let pinned = link.pin(&staging).map_err(|source| EbpfError::Pin {
        path: staging.clone(),
        source,
    })?;
    std::fs::rename(&staging, path).map_err(|source| EbpfError::Io {
        what: "cannot move pinned link to",
        path: path.into(),
        source,
    })?;
    // The pin now holds the link; our descriptor can go.
    drop(pinned);
    Ok(())
}

fn remove_other_versions(pin_dir: &Path) {
    let current = format!("v{LAYOUT_VERSION}");
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('v') && name != current.as_str() {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    tracing::info!(dir = %entry.path().display(), "removed datapath of another layout version")
                }
                Err(e) => {
                    tracing::warn!(dir = %entry.path().display(), error = %e, "cannot remove old datapath")
                }
            }
        }
    }
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

fn proxy_config(spec: &DatapathSpec) -> ProxyConfig {
    let ip4 = match spec.outbound4.ip() {
        IpAddr::V4(ip) => u32::from_ne_bytes(ip.octets()),
        IpAddr::V6(_) => 0,
    };
    let ip6 = match spec.outbound6.map(|a| a.ip()) {
        Some(IpAddr::V6(ip)) => words(ip.octets()),
        _ => [0; 4],
    };
    ProxyConfig {
        ip4,
        ip6,
        outbound_port: u32::from(spec.outbound4.port()),
        flags: 0,
    }
}

fn reconcile_ports(map: &mut HashMap<MapData, u32, u32>, ports: &[u16]) -> Result<(), EbpfError> {
    let wanted: HashSet<u32> = ports.iter().map(|p| u32::from(*p)).collect();
    let stale: Vec<u32> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|p| !wanted.contains(p))
        .collect();
    for port in stale {
        let _ = map.remove(&port);
    }
    for port in wanted {
        map.insert(port, 1, 0).map_err(|source| EbpfError::Map {
            name: maps::EXCLUDED_PORTS,
            source,
        })?;
    }
    Ok(())
}

fn reconcile_nets(
    map: &mut LpmTrie<MapData, [u32; 4], u32>,
    nets: &[(IpAddr, u8)],
) -> Result<(), EbpfError> {
    let wanted: Vec<Key<[u32; 4]>> = nets
        .iter()
        .map(|(ip, len)| match ip {
            IpAddr::V4(v4) => Key::new(96 + u32::from(*len), words(v4.to_ipv6_mapped().octets())),
            IpAddr::V6(v6) => Key::new(u32::from(*len), words(v6.octets())),
        })
        .collect();
    let existing: Vec<Key<[u32; 4]>> = map.keys().filter_map(Result::ok).collect();
    for key in existing {
        let _ = map.remove(&key);
    }
    for key in &wanted {
        map.insert(key, 1, 0).map_err(|source| EbpfError::Map {
            name: maps::EXCLUDED_NETS,
            source,
        })?;
    }
    Ok(())
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

    #[test]
    fn keys_use_the_mapped_form_for_ipv4() {
        let key = sock_key("10.200.0.10:40000".parse().expect("addr"));
        assert_eq!(
            key.ip,
            mesh_common::v4_mapped(u32::from_ne_bytes([10, 200, 0, 10]))
        );
        assert_eq!(key.port, 40000);
    }

    fn pod(strict: bool, ports: &[(u16, bool)]) -> PodCgroup {
        PodCgroup {
            path: "/cg/pod".into(),
            id: 42,
            inbound: InboundMtls {
                strict,
                ports: ports.iter().copied().collect(),
            },
        }
    }

    #[test]
    fn only_overrides_that_differ_from_the_pod_mode_are_written() {
        let key = |port| MtlsPortKey {
            cgroup_id: 42,
            port,
            reserved: 0,
        };
        assert_eq!(
            port_overrides(&pod(true, &[(80, false), (443, true)])),
            vec![(key(80), MTLS_PERMISSIVE)]
        );
        assert_eq!(
            port_overrides(&pod(false, &[(80, false), (9000, true)])),
            vec![(key(9000), MTLS_STRICT)]
        );
        assert!(port_overrides(&pod(false, &[])).is_empty());
    }

    #[test]
    fn a_strict_override_that_cannot_be_written_makes_the_pod_strict() {
        let permissive = InboundMtls::default();
        assert_eq!(
            enrollment_flags(&permissive, false),
            Enrollment::REDIRECT_OUTBOUND
        );
        assert_eq!(
            enrollment_flags(&permissive, true),
            Enrollment::REDIRECT_OUTBOUND | Enrollment::STRICT_INBOUND
        );
        assert_eq!(
            enrollment_flags(&InboundMtls::strict(), false),
            Enrollment::REDIRECT_OUTBOUND | Enrollment::STRICT_INBOUND
        );
    }

    #[test]
    fn port_overrides_win_over_the_pod_mode() {
        let inbound = pod(true, &[(80, false)]).inbound;
        assert!(!inbound.is_strict(80));
        assert!(inbound.is_strict(81));
        assert!(!InboundMtls::default().is_strict(80));
    }

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

    #[test]
    fn node_addresses_include_loopback() {
        let addrs = node_addresses().expect("getifaddrs");
        assert!(
            addrs.contains(&ip_key("127.0.0.1".parse().expect("ip"))),
            "{:?}",
            addrs.iter().map(key_to_ip).collect::<Vec<_>>()
        );
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
