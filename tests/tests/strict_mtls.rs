//! STRICT mutual TLS in the kernel: `mtls_ingress` drops plaintext connection attempts to a
//! STRICT pod unless they come from the node itself, lets them into a PERMISSIVE pod and counts
//! them, and honours per-port overrides both ways.
//!
//! These tests drive the datapath directly (no agent, no controller): each builds a one-node
//! testbed with an enrolled "server" pod (pod 0) and a "plain" pod outside the mesh (pod 1),
//! installs the datapath on the testbed's own pod cgroup root and pin directory from a thread
//! inside the node's namespace (where an agent runs, so the node addresses it records are the
//! node's), and enrolls the server with the mode under test. Plaintext comes from `pod-app`
//! clients in the plain pod and in the node's namespace (outside every pod cgroup, like
//! kubelet).
//!
//! A dropped SYN leaves the client retransmitting until its own deadline; the short client
//! timeout below bounds each attempt, and the `strict_dropped` counter, incremented
//! synchronously as the SYN arrives, shows it was the program that dropped it.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mesh_node::ebpf::{Datapath, DatapathSpec, Enroller, InboundMtls, PodCgroup};
use mesh_tests::testbed::{Node, Place, Testbed, e2e_gate};
use serde_json::Value;

const PORT_A: u16 = 9000;
const PORT_B: u16 = 9001;
/// Served from a container cgroup below the server pod's.
const PORT_C: u16 = 9002;
/// Bound on a plaintext connection that must be dropped: long enough for the first SYN and a
/// retransmission (at 1 s) to reach the program.
const DROPPED_TIMEOUT_MS: &str = "2500";
/// Bound on a connection that must succeed.
const OK_TIMEOUT_MS: &str = "10000";
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// A one-node testbed with the datapath installed by the test itself.
/// Fields drop in order: the server, then the datapath's handles, then the runtime (it carries
/// the datapath's log forwarding task), and the testbed (which unpins everything) last.
struct Bed {
    _server: mesh_tests::testbed::Server,
    enroller: Enroller,
    datapath: Datapath,
    _runtime: tokio::runtime::Runtime,
    tb: Testbed,
}

impl Bed {
    fn start() -> Result<Self> {
        let tb = Testbed::builder().nodes(1).pods_per_node(2).build()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let node = tb.node(0);
        let spec = DatapathSpec {
            cgroup_root: node.pod_cgroup_root.clone(),
            pin_dir: node.bpf_pin_dir.clone(),
            // Nothing listens there: the server pod's own connects would be refused, and the
            // tests never make any.
            outbound4: (node.gateway_ip4, 15001).into(),
            outbound6: Some((node.gateway_ip6, 15001).into()),
            excluded_ports: Vec::new(),
            excluded_nets: Vec::new(),
            program_stats: false,
        };
        let handle = runtime.handle().clone();
        let (datapath, enroller) = node.netns.run(move || {
            let _runtime = handle.enter();
            // No pods yet, as when an agent restarts on the control plane's feed.
            Datapath::install(&spec, None)
        })??;
        let server = tb.spawn_server(
            tb.pod(0, 0),
            &[
                "--listen",
                &format!("[::]:{PORT_A}=echo"),
                "--listen",
                &format!("[::]:{PORT_B}=echo"),
            ],
        )?;
        Ok(Self {
            _server: server,
            enroller,
            datapath,
            _runtime: runtime,
            tb,
        })
    }

    fn node(&self) -> &Node {
        self.tb.node(0)
    }

    /// Enrolls the server pod with `inbound`, from the node's namespace like an agent.
    fn enroll_server(&mut self, inbound: InboundMtls) -> Result<PodCgroup> {
        let mut pod = PodCgroup::from_path(&self.tb.pod(0, 0).cgroup)?;
        pod.inbound = inbound;
        let pods = [pod.clone()];
        let enroller = &mut self.enroller;
        self.tb.node(0).netns.run(|| enroller.enroll(&pods))??;
        Ok(pod)
    }

    fn stat(&self, name: &str) -> Result<u64> {
        self.datapath
            .stats()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .with_context(|| format!("no datapath counter {name}"))
    }

    /// (strict_dropped, plaintext_accepted).
    fn counters(&self) -> Result<(u64, u64)> {
        Ok((
            self.stat("strict_dropped")?,
            self.stat("plaintext_accepted")?,
        ))
    }

    fn server_addr(&self, port: u16, v6: bool) -> String {
        let pod = self.tb.pod(0, 0);
        if v6 {
            format!("[{}]:{port}", pod.ip6)
        } else {
            format!("{}:{port}", pod.ip4)
        }
    }

    /// An echo exchange from `place` that must succeed; returns the server-side peer the client
    /// saw as its own address.
    fn echo_ok<'a>(&self, place: impl Into<Place<'a>>, to: &str) -> Result<Value> {
        let place = place.into();
        let out = self.tb.run(
            place,
            &[
                "pod-app",
                "--timeout-ms",
                OK_TIMEOUT_MS,
                "echo",
                "--to",
                to,
                "--bytes",
                "4K",
            ],
            RUN_TIMEOUT,
        )?;
        out.ok_json()
            .with_context(|| format!("{} -> {to} must be let in", place.name()))
    }

    /// A connection from `place` that must never be established: the client's connect times
    /// out because every SYN is dropped.
    fn echo_dropped<'a>(&self, place: impl Into<Place<'a>>, to: &str) -> Result<()> {
        let place = place.into();
        let out = self.tb.run(
            place,
            &[
                "pod-app",
                "--timeout-ms",
                DROPPED_TIMEOUT_MS,
                "echo",
                "--to",
                to,
                "--bytes",
                "4K",
            ],
            RUN_TIMEOUT,
        )?;
        ensure!(
            !out.success(),
            "{} -> {to} must be dropped, but it got through: {out:?}",
            place.name()
        );
        let error = out.json()?["error"].as_str().unwrap_or_default().to_owned();
        // Timed out, not refused or reset: the SYN vanished, nothing answered it.
        ensure!(
            error.contains("timed out"),
            "{} -> {to}: expected a connect timeout, got {error:?}",
            place.name()
        );
        Ok(())
    }
}

#[test]
fn strict_pods_drop_plaintext_from_other_pods_but_not_from_the_node() -> Result<()> {
    if !e2e_gate("strict_pods_drop_plaintext_from_other_pods_but_not_from_the_node") {
        return Ok(());
    }
    let mut bed = Bed::start()?;
    // Installing recorded the node's addresses (the namespace it ran in), not the pods'.
    let addrs = bed.enroller.node_addrs();
    let node = bed.node();
    for ip in [
        node.gateway_ip4.into(),
        node.gateway_ip6.into(),
        node.lan_ip4.into(),
        std::net::IpAddr::from(node.lan_ip6),
    ] {
        ensure!(addrs.contains(&ip), "{ip} missing from {addrs:?}");
    }
    let (server, plain) = (bed.tb.pod(0, 0).clone(), bed.tb.pod(0, 1).clone());
    ensure!(
        !addrs.contains(&server.ip4.into()) && !addrs.contains(&plain.ip4.into()),
        "pod addresses recorded as the node's: {addrs:?}"
    );

    let pod = bed.enroll_server(InboundMtls::strict())?;
    ensure!(bed.enroller.strict_inbound(pod.id) == Some(true));
    let (dropped, accepted) = bed.counters()?;

    // Another pod, both families: dropped in the kernel and counted.
    for v6 in [false, true] {
        let before = bed.stat("strict_dropped")?;
        bed.echo_dropped(&plain, &bed.server_addr(PORT_A, v6))?;
        let after = bed.stat("strict_dropped")?;
        ensure!(
            after > before,
            "ipv6={v6}: strict_dropped did not move ({before} -> {after})"
        );
    }

    // The node (kubelet probes, the node proxy): let in, and neither counter moves.
    let dropped_after_pods = bed.stat("strict_dropped")?;
    for v6 in [false, true] {
        let v = bed.echo_ok(bed.node(), &bed.server_addr(PORT_A, v6))?;
        ensure!(v["ok"] == true, "{v}");
    }
    // The pod itself over loopback: never judged as plaintext from outside.
    let v = bed.echo_ok(&server, &format!("127.0.0.1:{PORT_A}"))?;
    ensure!(v["ok"] == true, "{v}");
    ensure!(
        bed.counters()? == (dropped_after_pods, accepted),
        "node and loopback connections were counted: {:?} (before {dropped}, {accepted})",
        bed.counters()?
    );
    Ok(())
}

#[test]
fn permissive_pods_accept_plaintext_and_count_it() -> Result<()> {
    if !e2e_gate("permissive_pods_accept_plaintext_and_count_it") {
        return Ok(());
    }
    let mut bed = Bed::start()?;
    let pod = bed.enroll_server(InboundMtls::default())?;
    ensure!(bed.enroller.strict_inbound(pod.id) == Some(false));
    let plain = bed.tb.pod(0, 1).clone();

    for (i, v6) in [false, true].into_iter().enumerate() {
        let v = bed.echo_ok(&plain, &bed.server_addr(PORT_A, v6))?;
        ensure!(v["ok"] == true, "{v}");
        // One connection, one SYN, one count.
        ensure!(
            bed.counters()? == (0, i as u64 + 1),
            "ipv6={v6}: {:?}",
            bed.counters()?
        );
    }
    // From the node: let in, not counted as plaintext from outside.
    let v = bed.echo_ok(bed.node(), &bed.server_addr(PORT_A, false))?;
    ensure!(v["ok"] == true, "{v}");
    ensure!(bed.counters()? == (0, 2), "{:?}", bed.counters()?);
    Ok(())
}

#[test]
fn port_overrides_win_over_the_pod_mode_both_ways() -> Result<()> {
    if !e2e_gate("port_overrides_win_over_the_pod_mode_both_ways") {
        return Ok(());
    }
    let mut bed = Bed::start()?;
    let plain = bed.tb.pod(0, 1).clone();
    let plain = &plain;

    // STRICT pod, PERMISSIVE port B.
    let pod = bed.enroll_server(InboundMtls {
        strict: true,
        ports: [(PORT_B, false)].into(),
    })?;
    ensure!(
        bed.enroller.port_overrides() == [(pod.id, PORT_B, false)],
        "{:?}",
        bed.enroller.port_overrides()
    );
    let (dropped, accepted) = bed.counters()?;
    bed.echo_dropped(plain, &bed.server_addr(PORT_A, false))?;
    bed.echo_ok(plain, &bed.server_addr(PORT_B, false))?;
    let (dropped2, accepted2) = bed.counters()?;
    ensure!(
        dropped2 > dropped && accepted2 == accepted + 1,
        "{:?} -> {:?}",
        (dropped, accepted),
        (dropped2, accepted2)
    );

    // PERMISSIVE pod, STRICT port A: the old override is gone, the new one in place.
    bed.enroll_server(InboundMtls {
        strict: false,
        ports: [(PORT_A, true)].into(),
    })?;
    ensure!(
        bed.enroller.port_overrides() == [(pod.id, PORT_A, true)],
        "stale override left: {:?}",
        bed.enroller.port_overrides()
    );
    ensure!(bed.enroller.strict_inbound(pod.id) == Some(false));
    bed.echo_dropped(plain, &bed.server_addr(PORT_A, true))?;
    bed.echo_ok(plain, &bed.server_addr(PORT_B, true))?;
    let (dropped3, accepted3) = bed.counters()?;
    ensure!(
        dropped3 > dropped2 && accepted3 == accepted2 + 1,
        "{:?} -> {:?}",
        (dropped2, accepted2),
        (dropped3, accepted3)
    );
    // The node is let in on the STRICT port.
    bed.echo_ok(bed.node(), &bed.server_addr(PORT_A, false))?;

    // Back to plain PERMISSIVE: no override left, both ports open.
    bed.enroll_server(InboundMtls::default())?;
    ensure!(
        bed.enroller.port_overrides().is_empty(),
        "{:?}",
        bed.enroller.port_overrides()
    );
    bed.echo_ok(plain, &bed.server_addr(PORT_A, false))?;

    // Leaving the mesh removes the pod's entries; its ports are no longer judged at all.
    bed.enroll_server(InboundMtls {
        strict: true,
        ports: [(PORT_B, false)].into(),
    })?;
    let pods: [PodCgroup; 0] = [];
    let enroller = &mut bed.enroller;
    bed.tb.node(0).netns.run(|| enroller.enroll(&pods))??;
    ensure!(bed.enroller.enrolled().is_empty() && bed.enroller.port_overrides().is_empty());
    let before = bed.counters()?;
    bed.echo_ok(plain, &bed.server_addr(PORT_A, false))?;
    ensure!(bed.counters()? == before, "{:?}", bed.counters()?);
    Ok(())
}

#[test]
fn a_server_in_a_container_cgroup_below_a_strict_pod_is_protected_as_the_pod() -> Result<()> {
    if !e2e_gate("a_server_in_a_container_cgroup_below_a_strict_pod_is_protected_as_the_pod") {
        return Ok(());
    }
    let mut bed = Bed::start()?;
    bed.enroll_server(InboundMtls::strict())?;
    // In Kubernetes the listening process sits in a container cgroup below the enrolled pod
    // cgroup; the program finds the pod through the socket's cgroup ancestors.
    let mut container = bed.tb.pod(0, 0).clone();
    container.cgroup = container.cgroup.join("container-1");
    std::fs::create_dir(&container.cgroup).context("container cgroup")?;
    let _nested = bed
        .tb
        .spawn_server(&container, &["--listen", &format!("[::]:{PORT_C}=echo")])?;

    let plain = bed.tb.pod(0, 1).clone();
    let before = bed.stat("strict_dropped")?;
    bed.echo_dropped(&plain, &bed.server_addr(PORT_C, false))?;
    ensure!(
        bed.stat("strict_dropped")? > before,
        "not counted as dropped"
    );
    bed.echo_ok(bed.node(), &bed.server_addr(PORT_C, false))?;
    Ok(())
}
