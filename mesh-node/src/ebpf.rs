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

use std::{
    collections::HashSet,
    fs::File,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps, links::FdLink},
};
use mesh_common::{
    Enrollment, LAYOUT_VERSION, OrigDst, ProxyConfig, SockKey, Stat, maps, programs,
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
}

impl ConnTrack {
    /// The original destination and source cgroup of the connection whose client end is
    /// `client` (the peer address the outbound listener accepted).
    pub fn lookup(&self, client: SocketAddr) -> Option<(SocketAddr, u64)> {
        let key = sock_key(client);
        let orig = self.by_tuple.get(&key, 0).ok()?;
        Some((orig_to_socket_addr(&orig), orig.cgroup_id))
    }
}

/// The writer of the enrollment map: which pod cgroups are redirected.
pub struct Enroller {
    enrolled: HashMap<MapData, u64, Enrollment>,
}

impl std::fmt::Debug for Enroller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enroller").finish_non_exhaustive()
    }
}

impl Enroller {
    /// Makes the enrollment map exactly `pods`: stale entries go first (a pod that left, or a
    /// gone pod whose cgroup id could be reused), then the wanted ones are inserted. A pod
    /// that cannot be inserted (the map is full) is reported and the others still go in.
    pub fn enroll(&mut self, pods: &[PodCgroup]) -> Result<(), EbpfError> {
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
        let value = Enrollment {
            flags: Enrollment::REDIRECT_OUTBOUND,
            reserved: 0,
        };
        let mut first_failure = None;
        for pod in pods {
            if let Err(source) = self.enrolled.insert(pod.id, value, 0) {
                tracing::error!(cgroup = %pod.path.display(), error = %source, "cannot enroll pod");
                first_failure.get_or_insert_with(|| pod.path.clone());
            }
        }
        match first_failure {
            None => Ok(()),
            Some(cgroup) => Err(EbpfError::EnrollmentFull {
                max: mesh_common::MAX_ENROLLED_CGROUPS,
                cgroup,
            }),
        }
    }

    /// The cgroup ids in the map now.
    pub fn enrolled(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
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
        };
        if let Some(pods) = pods {
            enroller.enroll(pods)?;
        }
        let conntrack = Arc::new(ConnTrack {
            by_tuple: take_map(&mut ebpf, maps::ORIG_BY_TUPLE)?,
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
            ($ty:ty, $name:expr) => {{
                let name = $name;
                let program: &mut $ty = program_mut(&mut datapath._ebpf, name)?;
                let id = program
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(|source| EbpfError::Program { name, source })?;
                let link = program
                    .take_link(id)
                    .map_err(|source| EbpfError::Program { name, source })?;
                let link =
                    FdLink::try_from(link).map_err(|source| EbpfError::Link { name, source })?;
                replace_pinned_link(link, &links_dir.join(name))?;
            }};
        }
        for name in SOCK_ADDR_PROGRAMS {
            attach_and_pin!(CgroupSockAddr, name);
        }
        attach_and_pin!(SockOps, programs::SOCK_OPS);

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

/// Loads (and so verifies) every program of the object into the kernel, without attaching.
fn load_programs(ebpf: &mut Ebpf) -> Result<(), EbpfError> {
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
    let v6 = match addr.ip() {
        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
        IpAddr::V6(ip) => ip,
    };
    SockKey {
        ip: words(v6.octets()),
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
