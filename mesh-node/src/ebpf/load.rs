//! Installing the datapath: the object loaded with its maps pinned, the maps filled, the
//! programs attached and their links pinned; and uninstalling it.
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
    net::IpAddr,
    os::fd::OwnedFd,
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
use mesh_common::{LAYOUT_VERSION, ProxyConfig, Stat, maps, programs};

use super::{
    ConnTrack, DatapathSpec, EbpfError, Enroller, OBJECT, PodCgroup, SOCK_ADDR_PROGRAMS,
    SOCK_PROGRAMS, load_programs, log, probe::preflight, program_mut, take_map, words,
};
use crate::metrics::ProgramRuns;

/// The loaded datapath. Dropping it leaves the pinned programs attached.
///
/// Shared read-only (counters, map ids, connection lookups); the enrollment map is not part of
/// it but of the [`Enroller`] that [`Datapath::install`] hands out, so exactly one owner
/// writes it.
pub struct Datapath {
    ebpf: Ebpf,
    conntrack: Arc<ConnTrack>,
    stats: PerCpuArray<MapData, u64>,
    version_dir: PathBuf,
    _logger: Option<log::LogPump>,
    /// Keeps the kernel's run-time statistics on while the datapath is held.
    _run_time_stats: Option<OwnedFd>,
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
        let mut enroller = Enroller::take(&mut ebpf)?;
        // Node addresses even without pods: a restarted agent keeps the pinned STRICT pods, and
        // their kubelet probes must keep passing if the node's addresses changed meanwhile.
        enroller.refresh_node_addrs()?;
        if let Some(pods) = pods {
            enroller.enroll(pods)?;
        }
        let conntrack = Arc::new(ConnTrack::take(&mut ebpf)?);
        let stats = take_map(&mut ebpf, maps::DP_STATS)?;
        let mut datapath = Self {
            ebpf,
            conntrack,
            stats,
            version_dir: version_dir.clone(),
            _logger: logger,
            _run_time_stats: spec.program_stats.then(enable_run_time_stats).flatten(),
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
        load_programs(&mut datapath.ebpf)?;
        // aya's program types share no trait for this sequence, hence a macro.
        macro_rules! attach_and_pin {
            ($cgroup:expr, $ty:ty, $name:expr $(, $attach_type:expr)?) => {{
                let name = $name;
                let program: &mut $ty = program_mut(&mut datapath.ebpf, name)?;
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
                    .map_or(0, |v| v.iter().sum());
                (s.name(), total)
            })
            .collect()
    }

    /// Each loaded program's name, runs and total run time, as the kernel counts them while
    /// run-time statistics are on (zero otherwise). A program whose information the kernel
    /// does not return is left out.
    pub fn program_runs(&self) -> Vec<ProgramRuns> {
        self.ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some(ProgramRuns {
                    program: name.to_owned(),
                    runs: info.run_count(),
                    run_time: info.run_time(),
                })
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
                    tracing::info!(dir = %entry.path().display(), "removed datapath of another layout version");
                }
                Err(e) => {
                    tracing::warn!(dir = %entry.path().display(), error = %e, "cannot remove old datapath");
                }
            }
        }
    }
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

/// Turns the kernel's run-time statistics on for as long as the returned descriptor is open;
/// without them the datapath works the same and its run counters stay at zero.
fn enable_run_time_stats() -> Option<OwnedFd> {
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => Some(fd),
        Err(error) => {
            tracing::warn!(%error, "cannot enable eBPF run-time statistics; program run counters stay at zero");
            None
        }
    }
}
