//! The Trellis testbed: a small cluster of network namespaces, veth pairs and cgroup v2
//! directories on one machine, for end-to-end tests, `cargo xtask demo` and `cargo xtask bench`.
//!
//! Topology of one [`Testbed`] (all names start with its prefix `tb{pid}x{n}`):
//!
//! ```text
//!  {p}-n0p0 eth0 ─┐                                            ┌─ eth0 {p}-n1p0
//!  {p}-n0p1 eth0 ─┤ p0,p1 in bridge `pods`      bridge `pods` ├─ eth0 {p}-n1p1
//!                 {p}-n0 (eth0) ── n0 ┐          ┌ n1 ── (eth0) {p}-n1
//!                                     {p}-lan  br0
//!                                          └ ext ── (eth0) {p}-ext   (optional)
//! ```
//!
//! * node `i`: LAN `10.199.0.{i+1}/24`, `fd00:199::{i+1}/64`; bridge `pods` with
//!   `10.200.{i}.1/24`, `fd00:200:{i}::1/64`; forwarding on; routes to every other node's pod
//!   subnets via that node's LAN address.
//! * pod `k` of node `i`: `10.200.{i}.{k+10}/24`, `fd00:200:{i}::{k+10}/64`, default routes
//!   via the node's `pods` bridge.
//! * external host: `10.199.0.100/24`, `fd00:199::100/64`, routes to all pod subnets.
//!
//! Nothing is linked to the machine's own network namespace: veths are created directly in
//! their target namespaces, and no address or route is added outside them.
//!
//! cgroups (below the cgroup2 mount, `/sys/fs/cgroup/unified` on the hybrid layout):
//! `trellis-testbed/{p}/n{i}/pods` is node `i`'s pod cgroup root, `.../pods/pod{uid}` a pod's
//! cgroup (named after the pod's uid as kubelet's cgroupfs driver does, so the agent finds it
//! the same way), `.../n{i}/system` holds processes started on the node itself (outside the pod
//! root), and `.../ext` those on the external host. Every process the testbed starts is in
//! one of them, so teardown can kill everything with `cgroup.kill`.
//!
//! Also per testbed: `/sys/fs/bpf/trellis-testbed/{p}/n{i}` for the agent's pins and
//! `/tmp/trellis-testbed/{p}/` for configs and `logs/`.
//!
//! Dropping the [`Testbed`] tears it all down, also after a panic; building one first removes
//! what crashed runs (whose pid is gone) left behind. With `MESH_KEEP_TESTBED=1` the
//! processes are still killed but namespaces, cgroups, pins and scratch files are kept for
//! inspection (the next run's stale sweep removes them).

mod cgroup;
mod gate;
mod http;
mod l7;
mod netns;
mod plan;
mod process;

use std::{
    collections::BTreeSet,
    ffi::OsStr,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
    sync::{
        Once,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
pub use cgroup::{cgroup_of, cgroup2_mount};
pub use gate::{BPFFS, e2e_gate};
pub use l7::RequestsOpts;
pub use netns::{Netns, ip};
pub use plan::{MAX_NODES, MAX_PODS_PER_NODE};
pub use process::{CmdOutput, Proc, SpawnOptions, WORKSPACE_BINARIES, bin_path};

/// Parent of every testbed's cgroup tree, below the cgroup2 mount.
const CGROUP_PARENT: &str = "trellis-testbed";
/// Parent of every testbed's pin directories.
const BPF_PARENT: &str = "/sys/fs/bpf/trellis-testbed";
/// Parent of every testbed's scratch directory.
const SCRATCH_PARENT: &str = "/tmp/trellis-testbed";

/// How long links may take to come up after build.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long teardown waits for killed processes to leave their cgroups.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Testbed::spawn_server`] waits for the `listening` line.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Numbers testbeds within this process.
static NEXT_TESTBED: AtomicU64 = AtomicU64::new(0);

/// A node: a network namespace on the LAN with a bridge for its pods.
#[derive(Debug, Clone)]
pub struct Node {
    /// 0-based index.
    pub index: usize,
    /// `node-{index}`.
    pub name: String,
    /// The node's network namespace.
    pub netns: Netns,
    /// Address on the LAN (`eth0`).
    pub lan_ip4: Ipv4Addr,
    /// IPv6 address on the LAN.
    pub lan_ip6: Ipv6Addr,
    /// The pods' default gateway (on bridge `pods`).
    pub gateway_ip4: Ipv4Addr,
    /// The pods' IPv6 default gateway.
    pub gateway_ip6: Ipv6Addr,
    /// Parent cgroup of this node's pods (where the agent attaches its programs).
    pub pod_cgroup_root: PathBuf,
    /// cgroup of processes started on the node itself, outside the pod cgroup root.
    pub system_cgroup: PathBuf,
    /// bpffs directory for the agent's pins (created empty; removed at teardown).
    pub bpf_pin_dir: PathBuf,
}

impl Node {
    /// bpffs directory for the agent's pins.
    pub fn bpf_pin_dir(&self) -> &Path {
        &self.bpf_pin_dir
    }

    /// Parent cgroup of this node's pods.
    pub fn pod_cgroup_root(&self) -> &Path {
        &self.pod_cgroup_root
    }
}

/// A pod: a network namespace behind its node's `pods` bridge, with its own cgroup.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Index of the node it runs on.
    pub node: usize,
    /// Index among that node's pods.
    pub index: usize,
    /// `pod-{node}-{index}`.
    pub name: String,
    /// The pod's uid (UUID-shaped, unique per testbed): `metadata.uid` in its manifest.
    pub uid: String,
    /// The pod's network namespace.
    pub netns: Netns,
    /// The pod's address.
    pub ip4: Ipv4Addr,
    /// The pod's IPv6 address.
    pub ip6: Ipv6Addr,
    /// The pod's cgroup: `pod{uid}` below its node's pod cgroup root.
    pub cgroup: PathBuf,
}

/// A host outside the mesh (the external host on the LAN).
#[derive(Debug, Clone)]
pub struct Host {
    /// `external`.
    pub name: String,
    /// The host's network namespace.
    pub netns: Netns,
    /// LAN address.
    pub ip4: Ipv4Addr,
    /// LAN IPv6 address.
    pub ip6: Ipv6Addr,
    /// cgroup its processes run in (not below any pod cgroup root).
    pub cgroup: PathBuf,
}

/// Where [`Testbed::spawn`] starts a process. Built from `&Pod`, `&Node` or `&Host`.
#[derive(Debug, Clone, Copy)]
pub enum Place<'a> {
    /// In the pod's namespace and cgroup.
    Pod(&'a Pod),
    /// In the node's namespace, in the node's system cgroup (not in any pod cgroup).
    Node(&'a Node),
    /// In the external host's namespace.
    Host(&'a Host),
}

impl Place<'_> {
    /// The name of the pod, node or host.
    pub fn name(&self) -> &str {
        match self {
            Place::Pod(p) => &p.name,
            Place::Node(n) => &n.name,
            Place::Host(h) => &h.name,
        }
    }

    /// The network namespace processes start in.
    pub fn netns(&self) -> &Netns {
        match self {
            Place::Pod(p) => &p.netns,
            Place::Node(n) => &n.netns,
            Place::Host(h) => &h.netns,
        }
    }

    /// The cgroup processes start in.
    pub fn cgroup(&self) -> &Path {
        match self {
            Place::Pod(p) => &p.cgroup,
            Place::Node(n) => &n.system_cgroup,
            Place::Host(h) => &h.cgroup,
        }
    }
}

impl<'a> From<&'a Pod> for Place<'a> {
    fn from(p: &'a Pod) -> Self {
        Place::Pod(p)
    }
}

impl<'a> From<&'a Node> for Place<'a> {
    fn from(n: &'a Node) -> Self {
        Place::Node(n)
    }
}

impl<'a> From<&'a Host> for Place<'a> {
    fn from(h: &'a Host) -> Self {
        Place::Host(h)
    }
}

/// A `pod-app serve` process that has bound all its listeners.
#[derive(Debug)]
pub struct Server {
    /// The process (killed when dropped).
    pub proc: Proc,
    /// The bound addresses, in `--listen` order (with real ports if `:0` was asked for).
    pub addrs: Vec<SocketAddr>,
}

impl Server {
    /// The first listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }
}

impl Deref for Server {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// Configures and builds a [`Testbed`]. Defaults: 2 nodes, 2 pods per node, no external host.
#[derive(Debug, Clone)]
pub struct TestbedBuilder {
    nodes: usize,
    pods_per_node: usize,
    external: bool,
}

impl Default for TestbedBuilder {
    fn default() -> Self {
        Self {
            nodes: 2,
            pods_per_node: 2,
            external: false,
        }
    }
}

impl TestbedBuilder {
    /// Number of nodes (1..=[`MAX_NODES`]).
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// Pods on each node (0..=[`MAX_PODS_PER_NODE`]).
    pub fn pods_per_node(mut self, n: usize) -> Self {
        self.pods_per_node = n;
        self
    }

    /// Whether to add the external host.
    pub fn external(mut self, yes: bool) -> Self {
        self.external = yes;
        self
    }

    /// Creates everything and returns once all links are up. On error, whatever was created
    /// is removed again.
    pub fn build(self) -> Result<Testbed> {
        ensure!(
            (1..=MAX_NODES).contains(&self.nodes),
            "nodes must be 1..={MAX_NODES}, got {}",
            self.nodes
        );
        ensure!(
            self.pods_per_node <= MAX_PODS_PER_NODE,
            "pods_per_node must be at most {MAX_PODS_PER_NODE}, got {}",
            self.pods_per_node
        );
        let cgroup_mount = cgroup2_mount()?;
        sweep_stale_once(&cgroup_mount);

        let (pid, seq) = (
            std::process::id(),
            NEXT_TESTBED.fetch_add(1, Ordering::Relaxed),
        );
        let prefix = plan::prefix(pid, seq);
        let cgroup_root = cgroup_mount.join(CGROUP_PARENT).join(&prefix);
        let bpf_root = Path::new(BPF_PARENT).join(&prefix);
        let scratch = Path::new(SCRATCH_PARENT).join(&prefix);

        let nodes = (0..self.nodes)
            .map(|i| {
                let node_cg = cgroup_root.join(format!("n{i}"));
                Node {
                    index: i,
                    name: plan::node_name(i),
                    netns: Netns::from_name(plan::node_netns(&prefix, i)),
                    lan_ip4: plan::node_lan_ip4(i),
                    lan_ip6: plan::node_lan_ip6(i),
                    gateway_ip4: plan::gateway_ip4(i),
                    gateway_ip6: plan::gateway_ip6(i),
                    pod_cgroup_root: node_cg.join("pods"),
                    system_cgroup: node_cg.join("system"),
                    bpf_pin_dir: bpf_root.join(format!("n{i}")),
                }
            })
            .collect::<Vec<_>>();
        let pods = nodes
            .iter()
            .flat_map(|node| {
                let (i, prefix) = (node.index, prefix.as_str());
                (0..self.pods_per_node).map(move |k| {
                    let uid = plan::pod_uid(pid, seq, i, k);
                    Pod {
                        node: i,
                        index: k,
                        name: plan::pod_name(i, k),
                        netns: Netns::from_name(plan::pod_netns(prefix, i, k)),
                        ip4: plan::pod_ip4(i, k),
                        ip6: plan::pod_ip6(i, k),
                        cgroup: node.pod_cgroup_root.join(format!("pod{uid}")),
                        uid,
                    }
                })
            })
            .collect::<Vec<_>>();
        let external = self.external.then(|| Host {
            name: "external".to_owned(),
            netns: Netns::from_name(plan::ext_netns(&prefix)),
            ip4: plan::ext_ip4(),
            ip6: plan::ext_ip6(),
            cgroup: cgroup_root.join("ext"),
        });

        // From here on, dropping `tb` (on any error) removes whatever was created.
        let tb = Testbed {
            prefix,
            nodes,
            pods,
            pods_per_node: self.pods_per_node,
            external,
            cgroup_mount,
            cgroup_root,
            bpf_root,
            scratch,
            next_proc: AtomicU64::new(0),
        };
        tb.create()
            .with_context(|| format!("building testbed {}", tb.prefix))?;
        Ok(tb)
    }
}

/// A running testbed. See the [module docs](self) for the layout. Dropping it tears it down.
#[derive(Debug)]
pub struct Testbed {
    prefix: String,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    pods_per_node: usize,
    external: Option<Host>,
    cgroup_mount: PathBuf,
    cgroup_root: PathBuf,
    bpf_root: PathBuf,
    scratch: PathBuf,
    next_proc: AtomicU64,
}

impl Testbed {
    /// A builder with the defaults (2 nodes, 2 pods each, no external host).
    pub fn builder() -> TestbedBuilder {
        TestbedBuilder::default()
    }

    /// This testbed's name prefix (`tb{pid}x{n}`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// All nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `i`. Panics if out of range.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Pod `k` of node `node`. Panics if out of range.
    pub fn pod(&self, node: usize, k: usize) -> &Pod {
        assert!(
            node < self.nodes.len() && k < self.pods_per_node,
            "no pod {k} on node {node}"
        );
        &self.pods[node * self.pods_per_node + k]
    }

    /// All pods, node by node.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.iter()
    }

    /// The pods of node `i`.
    pub fn node_pods(&self, i: usize) -> &[Pod] {
        &self.pods[i * self.pods_per_node..(i + 1) * self.pods_per_node]
    }

    /// The external host, if built with `.external(true)`.
    pub fn external(&self) -> Option<&Host> {
        self.external.as_ref()
    }

    /// The LAN namespace (bridge `br0` joining the nodes).
    pub fn lan_netns(&self) -> Netns {
        Netns::from_name(plan::lan_netns(&self.prefix))
    }

    /// Scratch directory for configs and logs (`/tmp/trellis-testbed/{prefix}`).
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch
    }

    /// Where process logs go (`{scratch}/logs`).
    pub fn logs_dir(&self) -> PathBuf {
        self.scratch.join("logs")
    }

    /// The cgroup2 mount point in use.
    pub fn cgroup_mount(&self) -> &Path {
        &self.cgroup_mount
    }

    /// This testbed's cgroup tree root.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// Starts `cmd` at `place` (see [`Place`]) and returns once it is in the place's namespace
    /// and cgroup. A bare program name from [`WORKSPACE_BINARIES`] is resolved with
    /// [`bin_path`]; other names are looked up in `PATH`.
    pub fn spawn<'a, S: AsRef<OsStr>>(
        &self,
        place: impl Into<Place<'a>>,
        cmd: &[S],
        opts: SpawnOptions,
    ) -> Result<Proc> {
        let place = place.into();
        let cmd: Vec<_> = cmd.iter().map(|s| s.as_ref().to_owned()).collect();
        let seq = self.next_proc.fetch_add(1, Ordering::Relaxed);
        let logs = self.logs_dir();
        let name = match opts.requested_name() {
            Some(name) if !logs.join(format!("{name}.stdout")).exists() => name.to_owned(),
            Some(name) => format!("{name}.{seq}"),
            None => {
                let program = cmd
                    .first()
                    .map(|p| Path::new(p).file_name().unwrap_or(p.as_os_str()))
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("{}.{program}.{seq}", place.name())
            }
        };
        let target = process::Target {
            netns: place.netns(),
            cgroup: place.cgroup(),
            cgroup_mount: &self.cgroup_mount,
        };
        process::spawn(&target, &cmd, &opts, name, &logs)
    }

    /// Runs `cmd` at `place` to completion (at most `timeout`; killed and an error after that)
    /// and returns its status and output. A non-zero exit is not an error here: see
    /// [`CmdOutput::check`] and [`CmdOutput::ok_json`].
    pub fn run<'a, S: AsRef<OsStr>>(
        &self,
        place: impl Into<Place<'a>>,
        cmd: &[S],
        timeout: Duration,
    ) -> Result<CmdOutput> {
        self.run_with(place, cmd, SpawnOptions::new(), timeout)
    }

    /// [`Testbed::run`] with options (an environment, say).
    pub fn run_with<'a, S: AsRef<OsStr>>(
        &self,
        place: impl Into<Place<'a>>,
        cmd: &[S],
        opts: SpawnOptions,
        timeout: Duration,
    ) -> Result<CmdOutput> {
        let proc = self.spawn(place, cmd, opts)?;
        process::finish(proc, timeout)
    }

    /// Starts `pod-app serve ARGS...` at `place` and waits (bounded) until it prints its
    /// `{"listening": ...}` line, e.g. `spawn_server(pod, &["--listen", "[::]:9000=echo"])`.
    pub fn spawn_server<'a>(&self, place: impl Into<Place<'a>>, args: &[&str]) -> Result<Server> {
        let mut cmd = vec!["pod-app", "serve"];
        cmd.extend_from_slice(args);
        let mut proc = self.spawn(place, &cmd, SpawnOptions::new())?;
        let line =
            proc.wait_for_stdout_line(SERVER_READY_TIMEOUT, |l| l.contains("\"listening\""))?;
        let addrs = parse_listening(&line)
            .with_context(|| format!("parsing {}'s ready line {line:?}", proc.description()))?;
        Ok(Server { proc, addrs })
    }

    /// Creates namespaces, links, addresses, routes, cgroups and directories, then waits for
    /// the links to come up.
    fn create(&self) -> Result<()> {
        let logs = self.logs_dir();
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        for node in &self.nodes {
            cgroup::create(&node.pod_cgroup_root)?;
            cgroup::create(&node.system_cgroup)?;
            std::fs::create_dir_all(&node.bpf_pin_dir)
                .with_context(|| format!("creating {}", node.bpf_pin_dir.display()))?;
        }
        for pod in &self.pods {
            cgroup::create(&pod.cgroup)?;
        }
        if let Some(ext) = &self.external {
            cgroup::create(&ext.cgroup)?;
        }

        let lan = Netns::create(&plan::lan_netns(&self.prefix))?;
        lan.ip(&["link", "add", "br0", "type", "bridge"])?;
        lan.ip(&["link", "set", "br0", "up"])?;

        for node in &self.nodes {
            self.create_node(&lan, node)?;
        }
        for pod in &self.pods {
            self.create_pod(pod)?;
        }
        if let Some(ext) = &self.external {
            self.create_external(&lan, ext)?;
        }
        self.wait_ready()
    }

    fn create_node(&self, lan: &Netns, node: &Node) -> Result<()> {
        let i = node.index;
        let ns = Netns::create(node.netns.name())?;
        attach_to_bridge(&ns, lan, &format!("n{i}"), "br0")?;
        add_addrs(&ns, "eth0", node.lan_ip4, node.lan_ip6, 24)?;
        ns.ip(&["link", "add", "pods", "type", "bridge"])?;
        add_addrs(&ns, "pods", node.gateway_ip4, node.gateway_ip6, 24)?;
        ns.ip(&["link", "set", "pods", "up"])?;
        ns.sysctl("net/ipv4/ip_forward", "1")?;
        ns.sysctl("net/ipv6/conf/all/forwarding", "1")?;
        for other in self.nodes.iter().filter(|o| o.index != i) {
            let j = other.index;
            let (via4, via6) = (other.lan_ip4.to_string(), other.lan_ip6.to_string());
            ns.ip(&["route", "add", &plan::pod_subnet4(j), "via", &via4])?;
            ns.ip(&["-6", "route", "add", &plan::pod_subnet6(j), "via", &via6])?;
        }
        Ok(())
    }

    fn create_pod(&self, pod: &Pod) -> Result<()> {
        let node = &self.nodes[pod.node];
        let ns = Netns::create(pod.netns.name())?;
        attach_to_bridge(&ns, &node.netns, &format!("p{}", pod.index), "pods")?;
        add_addrs(&ns, "eth0", pod.ip4, pod.ip6, 24)?;
        let (gw4, gw6) = (node.gateway_ip4.to_string(), node.gateway_ip6.to_string());
        ns.ip(&["route", "add", "default", "via", &gw4])?;
        ns.ip(&["-6", "route", "add", "default", "via", &gw6])?;
        Ok(())
    }

    fn create_external(&self, lan: &Netns, ext: &Host) -> Result<()> {
        let ns = Netns::create(ext.netns.name())?;
        attach_to_bridge(&ns, lan, "ext", "br0")?;
        add_addrs(&ns, "eth0", ext.ip4, ext.ip6, 24)?;
        for node in &self.nodes {
            let (via4, via6) = (node.lan_ip4.to_string(), node.lan_ip6.to_string());
            ns.ip(&["route", "add", &plan::pod_subnet4(node.index), "via", &via4])?;
            ns.ip(&[
                "-6",
                "route",
                "add",
                &plan::pod_subnet6(node.index),
                "via",
                &via6,
            ])?;
        }
        Ok(())
    }

    /// Polls (bounded) until every link the testbed made reports operstate UP. Addresses are
    /// `nodad`, and bridges without STP forward as soon as a port is up, so this is the last
    /// thing that can lag behind `ip`'s return.
    fn wait_ready(&self) -> Result<()> {
        let mut expected: Vec<(Netns, Vec<String>)> = Vec::new();
        let mut lan_links = vec!["br0".to_owned()];
        for node in &self.nodes {
            lan_links.push(format!("n{}", node.index));
            let mut links = vec!["eth0".to_owned()];
            if self.pods_per_node > 0 {
                links.push("pods".to_owned());
                links.extend((0..self.pods_per_node).map(|k| format!("p{k}")));
            }
            expected.push((node.netns.clone(), links));
        }
        for pod in &self.pods {
            expected.push((pod.netns.clone(), vec!["eth0".to_owned()]));
        }
        if let Some(ext) = &self.external {
            lan_links.push("ext".to_owned());
            expected.push((ext.netns.clone(), vec!["eth0".to_owned()]));
        }
        expected.push((self.lan_netns(), lan_links));

        let deadline = Instant::now() + READY_TIMEOUT;
        for (ns, links) in &expected {
            loop {
                let down = links_not_up(ns, links)?;
                if down.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "links {down:?} in {} not up after {READY_TIMEOUT:?}",
                        ns.name()
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let keep = std::env::var("MESH_KEEP_TESTBED").is_ok_and(|v| v == "1");
        if keep {
            if let Err(e) = cgroup::kill_and_wait(&self.cgroup_root, KILL_TIMEOUT) {
                eprintln!("testbed {}: {e:#}", self.prefix);
            }
            eprintln!(
                "testbed {p}: kept (MESH_KEEP_TESTBED=1): namespaces `ip netns list | grep {p}-`, \
                 cgroups {}, pins {}, logs {}",
                self.cgroup_root.display(),
                self.bpf_root.display(),
                self.logs_dir().display(),
                p = self.prefix,
            );
            return;
        }
        for e in teardown(
            &self.prefix,
            &self.cgroup_root,
            &self.bpf_root,
            &self.scratch,
        ) {
            eprintln!("testbed {}: teardown: {e:#}", self.prefix);
        }
    }
}

/// Creates the veth pair `eth0` (in `ns`) <-> `port` (in `bridge_ns`), enslaves `port` to
/// `bridge` and brings both ends up. Both ends are created directly in their namespaces.
fn attach_to_bridge(ns: &Netns, bridge_ns: &Netns, port: &str, bridge: &str) -> Result<()> {
    ns.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        port,
        "netns",
        bridge_ns.name(),
    ])?;
    bridge_ns.ip(&["link", "set", port, "master", bridge, "up"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    Ok(())
}

/// Adds an IPv4 `/len4` and an IPv6 `/64` address (without duplicate address detection, so it
/// is usable at once) to `dev`.
fn add_addrs(ns: &Netns, dev: &str, ip4: Ipv4Addr, ip6: Ipv6Addr, len4: u8) -> Result<()> {
    ns.ip(&["addr", "add", &format!("{ip4}/{len4}"), "dev", dev])?;
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{ip6}/64"),
        "dev",
        dev,
        "nodad",
    ])?;
    Ok(())
}

/// The links among `links` in `ns` whose operstate is not UP.
fn links_not_up(ns: &Netns, links: &[String]) -> Result<Vec<String>> {
    let json = ns.ip(&["-j", "link", "show"])?;
    let parsed: serde_json::Value = serde_json::from_str(&json)
        .with_context(|| format!("parsing `ip -j link` in {}", ns.name()))?;
    let up: BTreeSet<&str> = parsed
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|l| l["operstate"] == "UP")
        .filter_map(|l| l["ifname"].as_str())
        .collect();
    Ok(links
        .iter()
        .filter(|l| !up.contains(l.as_str()))
        .cloned()
        .collect())
}

/// Reads the addresses from `pod-app serve`'s ready line.
fn parse_listening(line: &str) -> Result<Vec<SocketAddr>> {
    let v: serde_json::Value = serde_json::from_str(line)?;
    let addrs = match v["listeners"].as_array() {
        Some(list) => list
            .iter()
            .map(|l| l["addr"].as_str().context("listener without addr"))
            .collect::<Result<Vec<_>>>()?,
        None => vec![v["listening"].as_str().context("no listening address")?],
    };
    ensure!(!addrs.is_empty(), "no listeners");
    addrs
        .into_iter()
        .map(|a| a.parse().with_context(|| format!("bad address {a:?}")))
        .collect()
}

/// Removes everything belonging to `prefix`, returning the errors met (it carries on after
/// each, so one stuck piece does not leave the rest behind).
fn teardown(
    prefix: &str,
    cgroup_root: &Path,
    bpf_root: &Path,
    scratch: &Path,
) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();
    // Kill first, so nothing holds the namespaces or recreates pins while they go away.
    if let Err(e) = cgroup::kill_and_wait(cgroup_root, KILL_TIMEOUT) {
        errors.push(e);
    }
    let ns_prefix = format!("{prefix}-");
    match Netns::list() {
        Ok(names) => {
            for name in names.iter().filter(|n| n.starts_with(&ns_prefix)) {
                if let Err(e) = Netns::delete(name) {
                    errors.push(e);
                }
            }
        }
        Err(e) => errors.push(e),
    }
    if let Err(e) = cgroup::remove_tree(cgroup_root) {
        errors.push(e);
    }
    for dir in [bpf_root, scratch] {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                errors.push(anyhow::Error::new(e).context(format!("removing {}", dir.display())));
            }
        }
    }
    errors
}

/// Runs [`sweep_stale`] once per process.
fn sweep_stale_once(cgroup_mount: &Path) {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| sweep_stale(cgroup_mount));
}

/// Removes testbeds left behind by processes that no longer exist (crashed or killed runs).
fn sweep_stale(cgroup_mount: &Path) {
    let cgroup_parent = cgroup_mount.join(CGROUP_PARENT);
    let mut names = Netns::list().unwrap_or_default();
    for dir in [
        cgroup_parent.as_path(),
        Path::new(BPF_PARENT),
        Path::new(SCRATCH_PARENT),
    ] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            names.extend(
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned)),
            );
        }
    }
    let own = std::process::id();
    let stale: BTreeSet<&str> = names
        .iter()
        .filter_map(|n| plan::parse_prefix(n))
        .filter(|&(_, pid)| pid != own && !Path::new(&format!("/proc/{pid}")).exists())
        .map(|(prefix, _)| prefix)
        .collect();
    for prefix in stale {
        let errors = teardown(
            prefix,
            &cgroup_parent.join(prefix),
            &Path::new(BPF_PARENT).join(prefix),
            &Path::new(SCRATCH_PARENT).join(prefix),
        );
        eprintln!(
            "testbed: removed stale testbed {prefix} ({} errors)",
            errors.len()
        );
        for e in errors {
            eprintln!("testbed: stale {prefix}: {e:#}");
        }
    }
}
