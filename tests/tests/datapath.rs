//! End-to-end proof of the node data path, on a real kernel with real eBPF programs, sockets and
//! TLS: enrolled pods' TCP connections are redirected into the node agent, carried between nodes
//! as HBONE (HTTP/2 CONNECT over mutual TLS 1.3 on port 15008) and delivered byte for byte with
//! half-close intact; the application still sees the address it dialled; the LAN carries only
//! TLS; what must not be redirected (node processes, pods outside the mesh, loopback) is not;
//! same-node and out-of-mesh traffic take their own paths; and an agent crash or restart never
//! lets a pod bypass the mesh nor duplicates the pinned datapath.
//!
//! Every test builds its own testbed (2 nodes, 2 pods each) and mesh, so they run in parallel.
//! Waits are bounded; "nothing happened" claims are checked against a later connection whose
//! effects are observed (a fence), or against kernel state that is updated synchronously.

use std::{
    collections::BTreeSet,
    fs::File,
    io::ErrorKind,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use mesh_node::config::{SourceAddress, UnknownDestination};
use mesh_tests::{
    mesh::{HBONE_PORT, Mesh, MeshOptions, metric_sum, spiffe_id},
    pattern::{self, Pattern},
    testbed::{Place, Testbed, bin_path, e2e_gate},
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;

/// Bound on any one `pod-app` client run (the client's own `--timeout-ms` is shorter, so it
/// reports its own error first).
const RUN_TIMEOUT: Duration = Duration::from_mins(4);
const CLIENT_TIMEOUT_MS: &str = "200000";
/// Bound on waiting for an access log event that must come.
const LOG_TIMEOUT: Duration = Duration::from_secs(15);
const MIB: u64 = 1 << 20;

/// The programs the agent pins under `links/`, one per hook.
const PROGRAMS: [&str; 8] = [
    "sock_create",
    "sock_release",
    "connect4",
    "connect6",
    "getpeername4",
    "getpeername6",
    "sock_ops",
    "mtls_ingress",
];

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Agents that dial pods from their node's address: a server seeing node 1's gateway is how
/// these tests tell a connection went through the mesh.
fn node_source() -> MeshOptions {
    MeshOptions {
        source_address: SourceAddress::Node,
        ..MeshOptions::default()
    }
}

fn testbed(external: bool) -> Result<Testbed> {
    Testbed::builder()
        .nodes(2)
        .pods_per_node(2)
        .external(external)
        .build()
}

/// Runs `pod-app ARGS...` at `place` and returns its JSON, failing unless it verified.
fn pod_app<'a>(tb: &Testbed, place: impl Into<Place<'a>>, args: &[&str]) -> Result<Value> {
    let mut cmd = vec!["pod-app", "--timeout-ms", CLIENT_TIMEOUT_MS];
    cmd.extend_from_slice(args);
    tb.run(place, &cmd, RUN_TIMEOUT)?.ok_json()
}

/// Starts `pod-app serve` with a server-side bound long enough for the big transfers.
fn server<'a>(
    tb: &Testbed,
    place: impl Into<Place<'a>>,
    listen: &[&str],
) -> Result<mesh_tests::testbed::Server> {
    let mut args = vec!["--timeout-ms", CLIENT_TIMEOUT_MS];
    for l in listen {
        args.extend(["--listen", l]);
    }
    tb.spawn_server(place, &args)
}

fn str_of<'v>(v: &'v Value, key: &str) -> Result<&'v str> {
    v[key]
        .as_str()
        .with_context(|| format!("no string {key:?} in {v}"))
}

fn addr_of(v: &Value, key: &str) -> Result<SocketAddr> {
    str_of(v, key)?
        .parse()
        .with_context(|| format!("{key:?} of {v} is not an address"))
}

/// `trellis_datapath_events_total{event=EVENT}` on `node`: counted by the eBPF programs
/// themselves, synchronously in the syscall, so it is exact as soon as the syscall returned.
fn dp_event(mesh: &Mesh, node: usize, event: &str) -> Result<f64> {
    Ok(metric_sum(
        &mesh.metrics(node)?,
        "trellis_datapath_events_total",
        &[("event", event)],
    ))
}

/// Events on `node` whose `src_addr` is `src` (the client socket's own address).
fn events_from(mesh: &Mesh, node: usize, src: &str) -> Vec<Value> {
    mesh.access_log(node)
        .into_iter()
        .filter(|e| e["src_addr"] == src)
        .collect()
}

/// A listener inside a namespace that a test polls itself, so "no connection arrived" is a
/// non-blocking accept returning `WouldBlock`, not a sleep.
fn probe_listener(place: Place<'_>, addr: SocketAddr) -> Result<TcpListener> {
    let listener = place.netns().run(move || TcpListener::bind(addr))??;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn assert_nothing_accepted(listener: &TcpListener, what: &str) -> Result<()> {
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
        Ok((_, peer)) => bail!("{what}: a connection from {peer} reached the server directly"),
        Err(e) => Err(e).context("accept on probe listener"),
    }
}

/// Makes a meshed cross-node connection and waits until both agents logged it. A proxied
/// connection is logged as soon as both of its directions ended, which for an earlier
/// connection was before its client exited; so once this later one is logged, an earlier one
/// that went through an agent would be in the log too, and the log can be checked for absences.
fn fence(tb: &Testbed, mesh: &Mesh, sink: &str) -> Result<String> {
    let v = pod_app(tb, tb.pod(0, 0), &["send", "--to", sink, "--bytes", "1000"])?;
    let local = str_of(&v, "local")?.to_owned();
    mesh.wait_access(0, LOG_TIMEOUT, |e| e["src_addr"] == local.as_str())?;
    mesh.wait_access(1, LOG_TIMEOUT, |e| e["src_addr"] == local.as_str())?;
    Ok(local)
}

/// A `tcpdump` on the testbed LAN, started through `podexec` so it captures in the LAN
/// namespace without touching the machine's own network.
struct Capture {
    child: Child,
    file: PathBuf,
    stderr: PathBuf,
}

impl Capture {
    /// Starts capturing on `br0` (promiscuous, so frames bridged between nodes are seen) and
    /// returns once tcpdump reports that it is listening.
    fn start(tb: &Testbed, name: &str) -> Result<Self> {
        let file = tb.scratch_dir().join(format!("{name}.pcap"));
        let stderr = tb.logs_dir().join(format!("tcpdump-{name}.stderr"));
        let child = Command::new(bin_path("podexec")?)
            .arg("--netns")
            .arg(tb.lan_netns().path())
            .arg("--")
            .args([
                "tcpdump", "-i", "br0", "-nn", "-s", "0", "-U",
                // A large kernel buffer, not immediate mode: the capture must be lossless even
                // while other tests load the CPU (it is stopped with SIGINT, which flushes).
                "-B", "262144",
            ])
            // A 64 MiB kernel buffer, so a fast transfer is not dropped; stay root so the file
            // in the scratch directory stays writable.
            .args(["-B", "65536", "-Z", "root", "-w"])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr)?)
            .spawn()
            .context("starting tcpdump")?;
        let mut capture = Self {
            child,
            file,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if capture.stderr_text().contains("listening on") {
                return Ok(capture);
            }
            if let Some(status) = capture.child.try_wait()? {
                bail!("tcpdump exited ({status}): {}", capture.stderr_text());
            }
            if Instant::now() > deadline {
                bail!("tcpdump not listening after 15s: {}", capture.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGINT, then waits (bounded) for tcpdump to flush and exit; returns its statistics.
    /// Waits (bounded) until the file written so far holds `bytes` of payload towards HBONE.
    fn wait_for_hbone_bytes(&self, bytes: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let written = std::fs::read(&self.file).unwrap_or_default();
            // A packet may be half written: only complete records count.
            if summarize_pcap(&written).is_ok_and(|s| s.to_hbone >= bytes) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "capture file never reached {bytes} bytes to HBONE"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) -> Result<(PathBuf, String)> {
        let pid = Pid::from_raw(i32::try_from(self.child.id())?);
        kill(pid, Signal::SIGINT).context("SIGINT to tcpdump")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                ensure!(
                    status.success(),
                    "tcpdump exited {status}: {}",
                    self.stderr_text()
                );
                return Ok((self.file.clone(), self.stderr_text()));
            }
            if Instant::now() > deadline {
                bail!("tcpdump did not exit within 20s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a pcap file holds, as far as these tests care.
#[derive(Debug, Default)]
struct PcapSummary {
    packets: u64,
    truncated: u64,
    tcp_packets: u64,
    /// TCP payload bytes sent to port 15008, and from it.
    to_hbone: u64,
    from_hbone: u64,
    /// Frames whose TCP segment has neither port 15008.
    tcp_other: u64,
}

/// Parses a classic pcap file (Ethernet link type) written by tcpdump.
fn summarize_pcap(data: &[u8]) -> Result<PcapSummary> {
    ensure!(data.len() >= 24, "pcap file too short");
    let magic = u32::from_le_bytes(data[0..4].try_into()?);
    ensure!(
        magic == 0xa1b2_c3d4 || magic == 0xa1b2_3c4d,
        "not a little-endian pcap file (magic {magic:#x})"
    );
    let linktype = u32::from_le_bytes(data[20..24].try_into()?);
    ensure!(linktype == 1, "link type {linktype} is not Ethernet");
    let mut s = PcapSummary::default();
    let mut off = 24;
    while off + 16 <= data.len() {
        let incl = u32::from_le_bytes(data[off + 8..off + 12].try_into()?) as usize;
        let orig = u32::from_le_bytes(data[off + 12..off + 16].try_into()?) as usize;
        off += 16;
        ensure!(off + incl <= data.len(), "pcap record runs past the end");
        let frame = &data[off..off + incl];
        off += incl;
        s.packets += 1;
        if incl < orig {
            s.truncated += 1;
        }
        let Some((sport, dport, payload)) = tcp_segment(frame) else {
            continue;
        };
        s.tcp_packets += 1;
        if dport == HBONE_PORT {
            s.to_hbone += payload;
        } else if sport == HBONE_PORT {
            s.from_hbone += payload;
        } else {
            s.tcp_other += 1;
        }
    }
    Ok(s)
}

/// (source port, destination port, payload length) of a TCP segment in an Ethernet frame.
fn tcp_segment(frame: &[u8]) -> Option<(u16, u16, u64)> {
    let be16 = |b: &[u8], i: usize| Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]));
    let ethertype = be16(frame, 12)?;
    let ip = frame.get(14..)?;
    // IP lengths, not the captured length: short frames carry Ethernet padding.
    let (tcp, ip_payload) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            if *ip.get(9)? != 6 {
                return None;
            }
            let total = usize::from(be16(ip, 2)?);
            (ip.get(ihl..)?, total.checked_sub(ihl)?)
        }
        0x86dd => {
            if *ip.get(6)? != 6 {
                return None;
            }
            (ip.get(40..)?, usize::from(be16(ip, 4)?))
        }
        _ => return None,
    };
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    let payload = ip_payload.checked_sub(data_offset)? as u64;
    Some((be16(tcp, 0)?, be16(tcp, 2)?, payload))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether `data` holds a TLS handshake record carrying a ServerHello whose supported_versions
/// extension selects TLS 1.3 (`00 2b 00 02 03 04`).
fn has_tls13_server_hello(data: &[u8]) -> bool {
    const SUPPORTED_VERSIONS_TLS13: [u8; 6] = [0x00, 0x2b, 0x00, 0x02, 0x03, 0x04];
    data.windows(6).enumerate().any(|(i, w)| {
        // Record: handshake (0x16), legacy version 0x0303, length; then handshake type 2.
        if w[0] != 0x16 || w[1] != 0x03 || w[2] != 0x03 || w[5] != 0x02 {
            return false;
        }
        let len = usize::from(u16::from_be_bytes([w[3], w[4]]));
        let body = &data[i + 5..(i + 5 + len).min(data.len())];
        contains(body, &SUPPORTED_VERSIONS_TLS13)
    })
}

/// Counts and names of `tcpdump -r FILE FILTER` output lines.
fn tcpdump_read(file: &Path, filter: &str) -> Result<Vec<String>> {
    let out = Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(file)
        .arg(filter)
        .output()
        .context("running tcpdump -r")?;
    ensure!(
        out.status.success(),
        "tcpdump -r {filter:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// The agent's pinned map ids, by name, from its config dump.
fn map_ids(mesh: &Mesh, node: usize) -> Result<Vec<(String, u64)>> {
    let dump = mesh.config_dump(node)?;
    let maps = dump["datapath"]["maps"]
        .as_array()
        .with_context(|| format!("no datapath maps in config dump {dump}"))?;
    maps.iter()
        .map(|m| {
            Ok((
                str_of(m, "name")?.to_owned(),
                m["id"].as_u64().context("map id")?,
            ))
        })
        .collect()
}

/// Entries of the per-socket tracking map (`ORIG_BY_COOKIE`) on `node`, from its config dump.
fn tracked_by_cookie(mesh: &Mesh, node: usize) -> Result<u64> {
    let dump = mesh.config_dump(node)?;
    dump["datapath"]["tracked"]["by_cookie"]
        .as_u64()
        .with_context(|| format!("no tracked connection count in {}", dump["datapath"]))
}

/// Waits (bounded) until `node` tracks at most `baseline` sockets again, and returns the count.
fn wait_tracked_at_most(mesh: &Mesh, node: usize, baseline: u64) -> Result<u64> {
    let deadline = Instant::now() + LOG_TIMEOUT;
    loop {
        let now = tracked_by_cookie(mesh, node)?;
        if now <= baseline {
            return Ok(now);
        }
        if Instant::now() >= deadline {
            bail!("node {node} still tracks {now} sockets, {baseline} before ({LOG_TIMEOUT:?})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pin_dir(mesh: &Mesh, node: usize) -> Result<PathBuf> {
    let dump = mesh.config_dump(node)?;
    Ok(PathBuf::from(str_of(&dump["datapath"], "pin_dir")?))
}

fn dir_entries(dir: &Path) -> Result<BTreeSet<String>> {
    std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. A cross-node exchange through the mesh, as the destination sees it
// ---------------------------------------------------------------------------------------------

#[test]
fn cross_node_http_exchange_arrives_with_the_client_identity_over_mutual_tls() -> Result<()> {
    if !e2e_gate("cross_node_http_exchange_arrives_with_the_client_identity_over_mutual_tls") {
        return Ok(());
    }
    let tb = testbed(false)?;
    let mesh = Mesh::start(&tb, &MeshOptions::default())?;
    let (client, dst) = (tb.pod(0, 0), tb.pod(1, 0));
    let _srv = server(&tb, dst, &["[::]:8080=http"])?;

    let v = pod_app(
        &tb,
        client,
        &["http-get", "--to", "10.200.1.10:8080", "--path", "/spec"],
    )?;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["body"]["path"], "/spec", "{v}");
    let local = str_of(&v, "local")?.to_owned();
    assert!(local.starts_with("10.200.0.10:"), "{v}");
    // The destination agent dialled the pod from the client pod's address (its identity
    // holds it): the server sees the client, and the access log below says it was delivered
    // through the mesh from the client's address.
    let seen = addr_of(&v["body"], "peer")?;
    assert_eq!(seen.ip().to_string(), "10.200.0.10", "{v}");

    let inbound = mesh.wait_access(1, LOG_TIMEOUT, |e| {
        e["direction"] == "inbound" && e["src_addr"] == local.as_str()
    })?;
    assert_eq!(
        inbound["src_identity"],
        spiffe_id(client).as_str(),
        "{inbound}"
    );
    assert_eq!(
        inbound["dst_identity"],
        spiffe_id(dst).as_str(),
        "{inbound}"
    );
    assert_eq!(inbound["src_workload"], "default/pod-0-0", "{inbound}");
    assert_eq!(inbound["dst_addr"], "10.200.1.10:8080", "{inbound}");
    assert_eq!(inbound["path"], "hbone", "{inbound}");
    assert_eq!(inbound["error"], "", "{inbound}");
    assert_eq!(inbound["delivered_from"], "client", "{inbound}");

    let outbound = mesh.wait_access(0, LOG_TIMEOUT, |e| {
        e["direction"] == "outbound" && e["src_addr"] == local.as_str()
    })?;
    assert_eq!(outbound["path"], "hbone", "{outbound}");
    assert_eq!(outbound["dst_addr"], "10.200.1.10:8080", "{outbound}");
    assert_eq!(
        outbound["dst_identity"],
        spiffe_id(dst).as_str(),
        "{outbound}"
    );

    let client_id = spiffe_id(client);
    let dst_id = spiffe_id(dst);
    let opened = metric_sum(
        &mesh.metrics(1)?,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", &client_id),
            ("destination_principal", &dst_id),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert_eq!(opened, 1.0, "node 1 counts the one connection it received");
    let opened_src = metric_sum(
        &mesh.metrics(0)?,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("source_principal", &client_id),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert_eq!(opened_src, 1.0, "node 0 counts the one connection it sent");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Bulk transfers are byte-exact both ways, and half-close crosses the tunnel
// ---------------------------------------------------------------------------------------------

#[test]
fn cross_node_transfers_are_byte_exact_both_ways_with_half_close() -> Result<()> {
    if !e2e_gate("cross_node_transfers_are_byte_exact_both_ways_with_half_close") {
        return Ok(());
    }
    let tb = testbed(false)?;
    let mesh = Mesh::start(&tb, &node_source())?;
    let _srv = server(
        &tb,
        tb.pod(1, 0),
        &["[::]:9000=echo", "[::]:9001=sink", "[::]:9002=source"],
    )?;
    let bytes = 256 * MIB;

    // pod(0,0) -> pod(1,0): the sink replies only after reading the client's EOF, and the
    // client reads that reply: the FIN crossed the tunnel and the return direction still works.
    let v = pod_app(
        &tb,
        tb.pod(0, 0),
        &["send", "--to", "10.200.1.10:9001", "--bytes", "256M"],
    )?;
    eprintln!("256 MiB sent in {} ms", v["elapsed_ms"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["reply"]["bytes"], bytes, "{v}");
    assert_eq!(v["reply"]["sha256"], v["sent_sha256"], "{v}");
    assert_eq!(v["sent_sha256"], pattern::sha256_hex(bytes).as_str(), "{v}");
    assert_eq!(
        addr_of(&v["reply"], "peer")?.ip().to_string(),
        "10.200.1.1",
        "the sink must be reached through node 1's agent: {v}"
    );
    let local = str_of(&v, "local")?.to_owned();
    let out = mesh.wait_access(0, LOG_TIMEOUT, |e| e["src_addr"] == local.as_str())?;
    assert_eq!(out["path"], "hbone", "{out}");
    assert_eq!(out["bytes_sent"], bytes, "{out}");
    assert_eq!(out["error"], "", "{out}");
    let inb = mesh.wait_access(1, LOG_TIMEOUT, |e| e["src_addr"] == local.as_str())?;
    assert_eq!(inb["bytes_sent"], bytes, "{inb}");

    // pod(1,0) <- pod(0,1): the source server writes after reading the count, half-closes,
    // and waits for the client's EOF before closing.
    let v = pod_app(
        &tb,
        tb.pod(0, 1),
        &["fetch", "--to", "10.200.1.10:9002", "--bytes", "256M"],
    )?;
    eprintln!("256 MiB fetched in {} ms", v["elapsed_ms"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["received"], bytes, "{v}");
    assert_eq!(v["sha256"], v["expected_sha256"], "{v}");
    assert_eq!(v["sha256"], pattern::sha256_hex(bytes).as_str(), "{v}");
    let local = str_of(&v, "local")?.to_owned();
    let out = mesh.wait_access(0, LOG_TIMEOUT, |e| e["src_addr"] == local.as_str())?;
    assert_eq!(out["path"], "hbone", "{out}");
    assert_eq!(out["bytes_received"], bytes, "{out}");
    assert_eq!(out["error"], "", "{out}");

    // Echo: both directions flow at once, and the echo ends only with the client's EOF.
    let v = pod_app(
        &tb,
        tb.pod(0, 0),
        &["echo", "--to", "10.200.1.10:9000", "--bytes", "8M"],
    )?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["received"], 8 * MIB, "{v}");
    assert_eq!(v["mismatch_at"], Value::Null, "{v}");
    let local = str_of(&v, "local")?.to_owned();
    let out = mesh.wait_access(0, LOG_TIMEOUT, |e| e["src_addr"] == local.as_str())?;
    assert_eq!(out["bytes_sent"], 8 * MIB, "{out}");
    assert_eq!(out["bytes_received"], 8 * MIB, "{out}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. On the wire: only HBONE, TLS 1.3, no plaintext
// ---------------------------------------------------------------------------------------------

#[test]
fn lan_carries_only_tls13_hbone_and_never_the_plaintext() -> Result<()> {
    if !e2e_gate("lan_carries_only_tls13_hbone_and_never_the_plaintext") {
        return Ok(());
    }
    let tb = testbed(false)?;
    // Pod (0,1) stays out of the mesh: the control that shows the capture would see plaintext.
    let mesh = Mesh::start(
        &tb,
        &MeshOptions {
            unenrolled: vec![(0, 1)],
            ..node_source()
        },
    )?;
    let _srv = server(&tb, tb.pod(1, 0), &["[::]:9001=sink"])?;
    let marker = "TRELLIS-PLAINTEXT-MARKER-7f3a9c";
    let bytes = 32 * MIB;

    // Capture from before the first cross-node connection, so the TLS handshake is on it.
    let capture = Capture::start(&tb, "meshed")?;
    let v = pod_app(
        &tb,
        tb.pod(0, 0),
        &[
            "send",
            "--to",
            "10.200.1.10:9001",
            "--bytes",
            "32M",
            "--marker",
            marker,
        ],
    )?;
    let local = str_of(&v, "local")?.to_owned();
    // The connection is over on both agents before the capture stops.
    mesh.wait_access(0, LOG_TIMEOUT, |e| e["src_addr"] == local.as_str())?;
    mesh.wait_access(1, LOG_TIMEOUT, |e| e["src_addr"] == local.as_str())?;
    // tcpdump writes packets as it reads them; stopping it earlier loses what it has not read.
    capture.wait_for_hbone_bytes(bytes, LOG_TIMEOUT)?;
    let (file, stats) = capture.stop()?;

    // The marker really was in the stream the sink received.
    assert_eq!(v["ok"], true, "{v}");
    let expected = Pattern::with_marker(bytes, marker.as_bytes())?.sha256_hex();
    assert_eq!(v["reply"]["sha256"], expected.as_str(), "{v}");

    assert!(
        stats
            .lines()
            .any(|l| l.trim() == "0 packets dropped by kernel"),
        "the capture lost packets, so it proves nothing: {stats}"
    );
    let data = std::fs::read(&file)?;
    let summary = summarize_pcap(&data)?;
    eprintln!("capture: {summary:?}; tcpdump: {stats}");
    assert_eq!(summary.truncated, 0, "{summary:?}");
    assert!(
        summary.to_hbone >= bytes,
        "the capture must hold the whole transfer: {summary:?}"
    );
    assert_eq!(summary.tcp_other, 0, "{summary:?}");
    // The same with tcpdump's own dissector.
    let other = tcpdump_read(&file, "tcp and not port 15008")?;
    assert!(other.is_empty(), "TCP outside HBONE on the LAN: {other:?}");
    let hbone = tcpdump_read(&file, "tcp port 15008")?;
    assert!(
        hbone.len() as u64 >= bytes / (64 * 1024),
        "only {} HBONE packets",
        hbone.len()
    );

    assert!(
        !contains(&data, marker.as_bytes()),
        "the payload marker appears in clear on the LAN"
    );
    assert!(
        has_tls13_server_hello(&data),
        "no TLS 1.3 ServerHello in the capture"
    );
    for plaintext in [&b"HTTP/1."[..], b"PRI * HTTP/2.0", b"CONNECT"] {
        assert!(
            !contains(&data, plaintext),
            "plaintext {:?} on the LAN",
            String::from_utf8_lossy(plaintext)
        );
    }

    // Control: the same transfer from the pod outside the mesh is caught in clear by the same
    // capture method, so the absences above are not blindness.
    let capture = Capture::start(&tb, "control")?;
    let v = pod_app(
        &tb,
        tb.pod(0, 1),
        &[
            "send",
            "--to",
            "10.200.1.10:9001",
            "--bytes",
            "1M",
            "--marker",
            marker,
        ],
    )?;
    assert_eq!(v["ok"], true, "{v}");
    let (file, _) = capture.stop()?;
    let data = std::fs::read(&file)?;
    assert!(
        contains(&data, marker.as_bytes()),
        "control: the capture misses plaintext"
    );
    assert!(!tcpdump_read(&file, "tcp and not port 15008")?.is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. The application sees the address it dialled
// ---------------------------------------------------------------------------------------------

#[test]
fn redirected_pod_sees_the_original_destination_as_its_peer() -> Result<()> {
    if !e2e_gate("redirected_pod_sees_the_original_destination_as_its_peer") {
        return Ok(());
    }
    let tb = testbed(false)?;
    let mesh = Mesh::start(&tb, &MeshOptions::default())?;
    let _remote = server(&tb, tb.pod(1, 0), &["[::]:9000=echo", "[::]:9001=sink"])?;
    let _local = server(&tb, tb.pod(0, 1), &["[::]:9000=echo"])?;

    let redirected = dp_event(&mesh, 0, "redirected")?;
    let rewritten = dp_event(&mesh, 0, "peer_rewritten")?;

    for to in ["10.200.1.10:9000", "10.200.0.11:9000"] {
        let v = pod_app(&tb, tb.pod(0, 0), &["peername", "--to", to])?;
        assert_eq!(
            v["peer"], to,
            "getpeername must report the dialled address: {v}"
        );
        assert!(
            str_of(&v, "local")?.starts_with("10.200.0.10:"),
            "the client keeps its own address: {v}"
        );
    }
    let v = pod_app(
        &tb,
        tb.pod(0, 0),
        &["send", "--to", "10.200.1.10:9001", "--bytes", "64K"],
    )?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["peer"], "10.200.1.10:9001", "{v}");

    // Three connects, each redirected once and each peer name rewritten once: the connection
    // really went to the proxy (15001), which the application never saw.
    assert_eq!(dp_event(&mesh, 0, "redirected")? - redirected, 3.0);
    assert_eq!(dp_event(&mesh, 0, "peer_rewritten")? - rewritten, 3.0);
    let dump = mesh.config_dump(0)?;
    let events = &dump["datapath"]["events"];
    assert_eq!(
        events["redirected"].as_f64(),
        Some(redirected + 3.0),
        "{dump}"
    );
    assert_eq!(events["no_proxy"], 0, "{dump}");
    assert_eq!(events["track_full"], 0, "{dump}");
    // And the proxy handled it: node 0 logged the connection to the original destination.
    let local = str_of(&v, "local")?.to_owned();
    let e = mesh.wait_access(0, LOG_TIMEOUT, |e| e["src_addr"] == local.as_str())?;
    assert_eq!(e["dst_addr"], "10.200.1.10:9001", "{e}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. What must not be redirected is not
// ---------------------------------------------------------------------------------------------

#[test]
fn node_processes_are_not_redirected() -> Result<()> {
    if !e2e_gate("node_processes_are_not_redirected") {
        return Ok(());
    }
    let tb = testbed(false)?;
    let mesh = Mesh::start(&tb, &node_source())?;
    let _remote = server(&tb, tb.pod(1, 0), &["[::]:9001=sink"])?;
    let _local = server(&tb, tb.pod(0, 0), &["[::]:9001=sink"])?;
    let redirected = dp_event(&mesh, 0, "redirected")?;
    let excluded = dp_event(&mesh, 0, "excluded")?;

    // Node 0 -> pod on node 1: the server sees node 0's own LAN address (through the mesh it
    // would see node 1's gateway).
    let v = pod_app(
        &tb,
        tb.node(0),
        &["send", "--to", "10.200.1.10:9001", "--bytes", "256K"],
    )?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["reply"]["peer"], v["local"], "{v}");
    assert_eq!(addr_of(&v, "local")?.ip().to_string(), "10.199.0.1", "{v}");
    let cross_local = str_of(&v, "local")?.to_owned();
    // Node 0 -> pod on node 0.
    let v = pod_app(
        &tb,
        tb.node(0),
        &["send", "--to", "10.200.0.10:9001", "--bytes", "256K"],
    )?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["reply"]["peer"], v["local"], "{v}");
    let same_local = str_of(&v, "local")?.to_owned();

    // The programs never ran for these sockets (they are outside the pod cgroup root).
    assert_eq!(dp_event(&mesh, 0, "redirected")?, redirected);
    assert_eq!(dp_event(&mesh, 0, "excluded")?, excluded);

    // After a meshed connection that both agents logged, no event names the node's sockets.
    let fenced = fence(&tb, &mesh, "10.200.1.10:9001")?;
    for node in 0..2 {
        for src in [&cross_local, &same_local] {
            let events = events_from(&mesh, node, src);
            assert!(events.is_empty(), "node {node} proxied {src}: {events:?}");
        }
        let log = mesh.access_log(node);
        assert_eq!(
            log.len(),
            1,
            "node {node}: only the fence {fenced}: {log:?}"
        );
    }
    Ok(())
}

#[test]
fn pods_outside_the_mesh_are_not_redirected() -> Result<()> {
    if !e2e_gate("pods_outside_the_mesh_are_not_redirected") {
        return Ok(());
    }
    let tb = testbed(false)?;
    let mesh = Mesh::start(
        &tb,
        &MeshOptions {
            unenrolled: vec![(0, 1)],
            ..node_source()
        },
    )?;
    let _srv = server(&tb, tb.pod(1, 0), &["[::]:9001=sink"])?;
    let dump = mesh.config_dump(0)?;
    let enrolled = dump["datapath"]["enrolled_cgroups"].to_string();
    let outside = tb.pod(0, 1).cgroup.display().to_string();
    assert!(
        !enrolled.contains(&format!("\"{outside}\"")),
        "{outside} is enrolled: {enrolled}"
    );
    let redirected = dp_event(&mesh, 0, "redirected")?;

    // The unenrolled pod reaches the server directly, with its own address.
    let v = pod_app(
        &tb,
        tb.pod(0, 1),
        &["send", "--to", "10.200.1.10:9001", "--bytes", "256K"],
    )?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        addr_of(&v["reply"], "peer")?.ip().to_string(),
        "10.200.0.11"
    );
    assert_eq!(v["reply"]["peer"], v["local"], "{v}");
    let outside_local = str_of(&v, "local")?.to_owned();
    assert_eq!(dp_event(&mesh, 0, "redirected")?, redirected);

    // A meshed pod next to it is redirected, and arrives from node 1's gateway because the
    // destination agent dials the pod.
    let v = pod_app(
        &tb,
        tb.pod(0, 0),
        &["send", "--to", "10.200.1.10:9001", "--bytes", "256K"],
    )?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(addr_of(&v["reply"], "peer")?.ip().to_string(), "10.200.1.1");
    assert_eq!(dp_event(&mesh, 0, "redirected")?, redirected + 1.0);
    let meshed_local = str_of(&v, "local")?.to_owned();
    mesh.wait_access(1, LOG_TIMEOUT, |e| e["src_addr"] == meshed_local.as_str())?;
    mesh.wait_access(0, LOG_TIMEOUT, |e| e["src_addr"] == meshed_local.as_str())?;
    for node in 0..2 {
        let events = events_from(&mesh, node, &outside_local);
        assert!(
            events.is_empty(),
            "node {node} proxied the unenrolled pod: {events:?}"
        );
    }
    Ok(())
}

#[test]
fn loopback_inside_a_pod_is_never_redirected() -> Result<()> {
    if !e2e_gate("loopback_inside_a_pod_is_never_redirected") {
        return Ok(());
    }
    let tb = testbed(false)?;
    let mesh = Mesh::start(&tb, &MeshOptions::default())?;
    let pod = tb.pod(0, 0);
    let _lo = server(&tb, pod, &["127.0.0.1:9100=echo", "[::1]:9101=echo"])?;
    let _remote = server(&tb, tb.pod(1, 0), &["[::]:9001=sink"])?;
    let redirected = dp_event(&mesh, 0, "redirected")?;
    let excluded = dp_event(&mesh, 0, "excluded")?;

    let mut locals = Vec::new();
    for to in ["127.0.0.1:9100", "[::1]:9101"] {
        let v = pod_app(&tb, pod, &["echo", "--to", to, "--bytes", "1M"])?;
        assert_eq!(v["ok"], true, "{to}: {v}");
        assert_eq!(v["peer"], to, "{v}");
        locals.push(str_of(&v, "local")?.to_owned());
    }
    // The programs saw both connects and let them be.
    assert_eq!(dp_event(&mesh, 0, "redirected")?, redirected);
    assert_eq!(dp_event(&mesh, 0, "excluded")?, excluded + 2.0);

    let fenced = fence(&tb, &mesh, "10.200.1.10:9001")?;
    let log = mesh.access_log(0);
    assert_eq!(log.len(), 1, "node 0: only the fence {fenced}: {log:?}");
    for local in &locals {
        assert!(events_from(&mesh, 0, local).is_empty());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5b. A connection belongs to the pod whose cgroup created its socket
// ---------------------------------------------------------------------------------------------

#[test]
fn connections_belong_to_the_cgroup_that_created_the_socket_not_the_caller() -> Result<()> {
    if !e2e_gate("connections_belong_to_the_cgroup_that_created_the_socket_not_the_caller") {
        return Ok(());
    }
    let tb = testbed(false)?;
    let mesh = Mesh::start(&tb, &node_source())?;
    let _srv = server(&tb, tb.pod(1, 0), &["[::]:9001=sink"])?;
    let (a, b) = (tb.pod(0, 0), tb.pod(0, 1));
    let system = tb.node(0).system_cgroup.display().to_string();
    let a_cgroup = a.cgroup.display().to_string();
    let redirected = dp_event(&mesh, 0, "redirected")?;
    let to = "10.200.1.10:9001";

    // Outbound on node 0 and inbound on node 1 for the connection from `local`.
    let events = |local: &str| -> Result<(Value, Value)> {
        let out = mesh.wait_access(0, LOG_TIMEOUT, |e| {
            e["direction"] == "outbound" && e["src_addr"] == local
        })?;
        let inb = mesh.wait_access(1, LOG_TIMEOUT, |e| {
            e["direction"] == "inbound" && e["src_addr"] == local
        })?;
        Ok((out, inb))
    };

    // Created in pod A, connected after moving to the node's system cgroup: still A's
    // connection, through the mesh (the server sees node 1's gateway, not the pod).
    let v = pod_app(
        &tb,
        a,
        &[
            "moved-send",
            "--to",
            to,
            "--cgroup",
            &system,
            "--bytes",
            "64K",
        ],
    )?;
    assert_eq!(v["ok"], true, "{v}");
    assert!(str_of(&v, "connected_from")?.ends_with("/n0/system"), "{v}");
    assert_eq!(
        addr_of(&v["reply"], "peer")?.ip().to_string(),
        "10.200.1.1",
        "{v}"
    );
    let (out, inb) = events(str_of(&v, "local")?)?;
    assert_eq!(out["src_workload"], "default/pod-0-0", "{out}");
    assert_eq!(inb["src_identity"], spiffe_id(a).as_str(), "{inb}");

    // Created in pod B, connected from inside pod A's cgroup: B's connection, never A's.
    let v = pod_app(
        &tb,
        b,
        &[
            "moved-send",
            "--to",
            to,
            "--cgroup",
            &a_cgroup,
            "--bytes",
            "64K",
        ],
    )?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        str_of(&v, "connected_from")?,
        str_of(&v, "created_in")?.replace(
            b.cgroup
                .file_name()
                .and_then(|n| n.to_str())
                .context("pod B cgroup name")?,
            a.cgroup
                .file_name()
                .and_then(|n| n.to_str())
                .context("pod A cgroup name")?,
        ),
        "{v}"
    );
    assert_eq!(
        addr_of(&v["reply"], "peer")?.ip().to_string(),
        "10.200.1.1",
        "{v}"
    );
    let (out, inb) = events(str_of(&v, "local")?)?;
    assert_eq!(out["src_workload"], "default/pod-0-1", "{out}");
    assert_eq!(inb["src_identity"], spiffe_id(b).as_str(), "{inb}");

    // Created on the node, outside every pod, connected from inside pod A's cgroup: not a pod
    // socket, so not redirected (the server sees the node's own address).
    let v = pod_app(
        &tb,
        tb.node(0),
        &[
            "moved-send",
            "--to",
            to,
            "--cgroup",
            &a_cgroup,
            "--bytes",
            "64K",
        ],
    )?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["reply"]["peer"], v["local"], "{v}");
    assert_eq!(addr_of(&v, "local")?.ip().to_string(), "10.199.0.1", "{v}");
    let node_local = str_of(&v, "local")?.to_owned();

    assert_eq!(dp_event(&mesh, 0, "redirected")?, redirected + 2.0);
    // Every socket here was created after the datapath was attached: none was judged by the
    // process that connected it.
    assert_eq!(dp_event(&mesh, 0, "caller_cgroup_fallback")?, 0.0);
    fence(&tb, &mesh, to)?;
    for node in 0..2 {
        let events = events_from(&mesh, node, &node_local);
        assert!(
            events.is_empty(),
            "node {node} proxied {node_local}: {events:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5c. Connects that never establish leave no tracking record behind
// ---------------------------------------------------------------------------------------------

#[test]
fn connects_that_never_establish_leave_no_tracking_record() -> Result<()> {
    if !e2e_gate("connects_that_never_establish_leave_no_tracking_record") {
        return Ok(());
    }
    const COUNT: f64 = 2000.0;
    let tb = testbed(false)?;
    let mesh = Mesh::start(&tb, &MeshOptions::default())?;
    let pod = tb.pod(0, 1);
    // The proxy listens on the node's pod gateway address: make it unreachable from this pod.
    let gateway = tb.node(0).gateway_ip4.to_string();
    let ip = |args: &[&str]| -> Result<()> {
        let mut cmd = vec!["ip"];
        cmd.extend_from_slice(args);
        tb.run(pod, &cmd, RUN_TIMEOUT)?.check()?;
        Ok(())
    };
    let abort = || -> Result<Value> {
        let count = COUNT.to_string();
        pod_app(
            &tb,
            pod,
            &[
                "abort-connects",
                "--to",
                "10.200.1.10:9001",
                "--count",
                &count,
            ],
        )
    };
    let baseline = tracked_by_cookie(&mesh, 0)?;

    // SYNs nobody answers (the gateway's neighbour entry names a MAC nobody has); each socket is
    // closed while its connection is still in SYN_SENT.
    ip(&[
        "neigh",
        "replace",
        &gateway,
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    let redirected = dp_event(&mesh, 0, "redirected")?;
    let v = abort()?;
    assert_eq!(v["in_progress"].as_f64(), Some(COUNT), "{v}");
    assert_eq!(dp_event(&mesh, 0, "redirected")? - redirected, COUNT, "{v}");
    wait_tracked_at_most(&mesh, 0, baseline)?;

    // Connects that fail after the redirect but before any SYN is sent (no route to the proxy).
    ip(&["neigh", "del", &gateway, "dev", "eth0"])?;
    ip(&["route", "add", "unreachable", &format!("{gateway}/32")])?;
    let redirected = dp_event(&mesh, 0, "redirected")?;
    let v = abort()?;
    assert_eq!(v["errors"]["EHOSTUNREACH"].as_f64(), Some(COUNT), "{v}");
    assert_eq!(dp_event(&mesh, 0, "redirected")? - redirected, COUNT, "{v}");
    wait_tracked_at_most(&mesh, 0, baseline)?;

    let dump = mesh.config_dump(0)?;
    assert_eq!(dump["datapath"]["events"]["track_full"], 0, "{dump}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. Same node, out of the mesh, and denying the unknown
// ---------------------------------------------------------------------------------------------

#[test]
fn same_node_traffic_stays_local_and_external_traffic_passes_through() -> Result<()> {
    if !e2e_gate("same_node_traffic_stays_local_and_external_traffic_passes_through") {
        return Ok(());
    }
    let tb = testbed(true)?;
    let mesh = Mesh::start(&tb, &node_source())?;
    let ext = tb.external().context("external host")?;
    let _neighbour = server(&tb, tb.pod(0, 1), &["[::]:9001=sink"])?;
    let _outside = server(&tb, ext, &["[::]:7001=sink"])?;
    let client = tb.pod(0, 0);

    // Same node: delivered by the local proxy, from the node's pod gateway.
    let v = pod_app(
        &tb,
        client,
        &["send", "--to", "10.200.0.11:9001", "--bytes", "4M"],
    )?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["peer"], "10.200.0.11:9001", "{v}");
    assert_eq!(addr_of(&v["reply"], "peer")?.ip().to_string(), "10.200.0.1");
    let local = str_of(&v, "local")?.to_owned();
    let e = mesh.wait_access(0, LOG_TIMEOUT, |e| e["src_addr"] == local.as_str())?;
    assert_eq!(e["direction"], "outbound", "{e}");
    assert_eq!(e["path"], "local", "{e}");
    assert_eq!(e["src_identity"], spiffe_id(client).as_str(), "{e}");
    assert_eq!(e["dst_workload"], "default/pod-0-1", "{e}");
    assert_eq!(e["bytes_sent"], 4 * MIB, "{e}");
    assert_eq!(e["error"], "", "{e}");
    let m = mesh.metrics(0)?;
    let local_opened = metric_sum(
        &m,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("destination_workload", "pod-0-1"),
            ("connection_security_policy", "none"),
        ],
    );
    assert_eq!(local_opened, 1.0, "{m}");

    // Outside the mesh: plain TCP from the node's own address (without the proxy, the host
    // would see the pod's address, as pod traffic is routed, not translated).
    let v = pod_app(
        &tb,
        client,
        &["send", "--to", "10.199.0.100:7001", "--bytes", "4M"],
    )?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["peer"], "10.199.0.100:7001", "{v}");
    assert_eq!(addr_of(&v["reply"], "peer")?.ip().to_string(), "10.199.0.1");
    let local = str_of(&v, "local")?.to_owned();
    let e = mesh.wait_access(0, LOG_TIMEOUT, |e| e["src_addr"] == local.as_str())?;
    assert_eq!(e["path"], "passthrough", "{e}");
    assert_eq!(e["dst_addr"], "10.199.0.100:7001", "{e}");
    assert_eq!(e["dst_workload"], "", "{e}");
    assert_eq!(e["bytes_sent"], 4 * MIB, "{e}");

    // No HBONE for either: nothing arrived at node 1, and node 0 took no inbound connection.
    assert!(mesh.access_log(1).is_empty(), "{:?}", mesh.access_log(1));
    let inbound: Vec<_> = mesh
        .access_log(0)
        .into_iter()
        .filter(|e| e["direction"] == "inbound")
        .collect();
    assert!(inbound.is_empty(), "{inbound:?}");
    let m = mesh.metrics(0)?;
    assert_eq!(
        metric_sum(
            &m,
            "istio_tcp_connections_opened_total",
            &[("connection_security_policy", "mutual_tls")]
        ),
        0.0,
        "{m}"
    );
    Ok(())
}

#[test]
fn external_connections_are_refused_promptly_when_unknown_destinations_are_denied() -> Result<()> {
    if !e2e_gate("external_connections_are_refused_promptly_when_unknown_destinations_are_denied") {
        return Ok(());
    }
    let tb = testbed(true)?;
    let mesh = Mesh::start(
        &tb,
        &MeshOptions {
            unknown_destination: UnknownDestination::Deny,
            ..MeshOptions::default()
        },
    )?;
    let ext = tb.external().context("external host")?;
    let probe = probe_listener(Place::Host(ext), "10.199.0.100:7002".parse()?)?;

    let started = Instant::now();
    let out = tb.run(
        tb.pod(0, 0),
        &[
            "pod-app",
            "--timeout-ms",
            "10000",
            "echo",
            "--to",
            "10.199.0.100:7002",
            "--bytes",
            "1000",
        ],
        RUN_TIMEOUT,
    )?;
    let elapsed = started.elapsed();
    assert_eq!(out.status.code(), Some(2), "the client must fail: {out:?}");
    let error = out.json()?["error"].as_str().unwrap_or_default().to_owned();
    assert!(!error.contains("timed out"), "refused by timeout: {error}");
    assert!(elapsed < Duration::from_secs(5), "refusal took {elapsed:?}");
    assert_nothing_accepted(&probe, "denied external destination")?;

    let e = mesh.wait_access(0, LOG_TIMEOUT, |e| e["dst_addr"] == "10.199.0.100:7002")?;
    assert!(
        str_of(&e, "error")?.contains("outside the mesh"),
        "access log must say why: {e}"
    );
    assert_eq!(
        metric_sum(
            &mesh.metrics(0)?,
            "trellis_connection_failures_total",
            &[("direction", "outbound"), ("reason", "outside_mesh_denied")]
        ),
        1.0
    );

    // Denying the unknown does not touch the mesh itself.
    let _srv = server(&tb, tb.pod(1, 0), &["[::]:9001=sink"])?;
    let v = pod_app(
        &tb,
        tb.pod(0, 0),
        &["send", "--to", "10.200.1.10:9001", "--bytes", "64K"],
    )?;
    assert_eq!(v["ok"], true, "{v}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 7. Concurrency
// ---------------------------------------------------------------------------------------------

#[test]
fn a_thousand_concurrent_cross_node_connections_all_complete() -> Result<()> {
    if !e2e_gate("a_thousand_concurrent_cross_node_connections_all_complete") {
        return Ok(());
    }
    let tb = testbed(false)?;
    let mesh = Mesh::start(&tb, &MeshOptions::default())?;
    let _srv = server(&tb, tb.pod(1, 0), &["[::]:9000=echo"])?;
    let redirected = dp_event(&mesh, 0, "redirected")?;

    // All 1,000 are connected (a barrier) before any of them sends.
    let v = pod_app(
        &tb,
        tb.pod(0, 0),
        &[
            "many",
            "--to",
            "10.200.1.10:9000",
            "--connections",
            "1000",
            "--concurrency",
            "1000",
            "--bytes",
            "1K",
        ],
    )?;
    assert_eq!(v["ok"], 1000, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(dp_event(&mesh, 0, "redirected")? - redirected, 1000.0);
    let opened = metric_sum(
        &mesh.metrics(1)?,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert_eq!(
        opened, 1000.0,
        "every connection crossed as its own HBONE stream"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 8. Agent crash, restart and stop
// ---------------------------------------------------------------------------------------------

#[test]
fn agent_crash_never_lets_pods_bypass_the_mesh_and_restart_reuses_the_pins() -> Result<()> {
    if !e2e_gate("agent_crash_never_lets_pods_bypass_the_mesh_and_restart_reuses_the_pins") {
        return Ok(());
    }
    let tb = testbed(false)?;
    let mut mesh = Mesh::start(&tb, &node_source())?;
    let _srv = server(&tb, tb.pod(1, 0), &["[::]:9001=sink"])?;
    let probe = probe_listener(Place::Pod(tb.pod(1, 0)), "10.200.1.10:9050".parse()?)?;

    let v = pod_app(
        &tb,
        tb.pod(0, 0),
        &["send", "--to", "10.200.1.10:9001", "--bytes", "64K"],
    )?;
    assert_eq!(v["ok"], true, "{v}");
    let ids_before = map_ids(&mesh, 0)?;
    for map in [
        "ENROLLED",
        "PROXY_CONFIG",
        "ORIG_BY_COOKIE",
        "ORIG_BY_TUPLE",
        "DP_STATS",
    ] {
        assert!(
            ids_before.iter().any(|(name, _)| name == map),
            "{map} is not pinned: {ids_before:?}"
        );
    }
    let links = pin_dir(&mesh, 0)?.join("links");
    let programs: BTreeSet<String> = PROGRAMS.iter().map(|p| (*p).to_owned()).collect();
    assert_eq!(dir_entries(&links)?, programs);
    let redirected = dp_event(&mesh, 0, "redirected")?;
    let excluded = dp_event(&mesh, 0, "excluded")?;

    mesh.kill_agent(0);
    // The datapath stays pinned and keeps redirecting to a proxy that is not there: the
    // connection fails instead of going straight to the server.
    let out = tb.run(
        tb.pod(0, 0),
        &[
            "pod-app",
            "--timeout-ms",
            "10000",
            "peername",
            "--to",
            "10.200.1.10:9050",
        ],
        RUN_TIMEOUT,
    )?;
    assert_eq!(
        out.status.code(),
        Some(2),
        "must fail while the agent is down: {out:?}"
    );
    let error = out.json()?["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("refused"), "{error}");
    assert_nothing_accepted(&probe, "agent down")?;
    assert_eq!(dir_entries(&links)?, programs, "pins survive the crash");

    mesh.start_agent(0)?;
    assert_eq!(map_ids(&mesh, 0)?, ids_before, "maps reused, not recreated");
    assert_eq!(
        dir_entries(&links)?,
        programs,
        "exactly one pin per program: no duplicates, no staging pins left"
    );
    // The counters live in the reused map: the refused attempt was redirected, like any other.
    let after_restart = dp_event(&mesh, 0, "redirected")?;
    assert_eq!(after_restart, redirected + 1.0);

    // New connections work at once through the new agent.
    let v = pod_app(
        &tb,
        tb.pod(0, 0),
        &["send", "--to", "10.200.1.10:9001", "--bytes", "1M"],
    )?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(addr_of(&v["reply"], "peer")?.ip().to_string(), "10.200.1.1");
    let local = str_of(&v, "local")?.to_owned();
    mesh.wait_access(0, LOG_TIMEOUT, |e| e["src_addr"] == local.as_str())?;
    // Exactly one program per hook runs: had the old links stayed attached next to the new
    // ones, this connect would have been counted twice (once redirected, then excluded as
    // already aimed at the proxy).
    assert_eq!(dp_event(&mesh, 0, "redirected")?, after_restart + 1.0);
    assert_eq!(dp_event(&mesh, 0, "excluded")?, excluded);
    Ok(())
}

#[test]
fn agent_stops_cleanly_on_sigterm_within_the_drain_deadline() -> Result<()> {
    if !e2e_gate("agent_stops_cleanly_on_sigterm_within_the_drain_deadline") {
        return Ok(());
    }
    let tb = testbed(false)?;
    let options = MeshOptions::default();
    let mut mesh = Mesh::start(&tb, &options)?;
    let _srv = server(&tb, tb.pod(0, 0), &["[::]:9001=sink"])?;
    let _remote = server(&tb, tb.pod(1, 0), &["[::]:9001=sink"])?;
    // Both agents hold HBONE connections to each other, so there is something to drain.
    for (from, to) in [((0, 0), "10.200.1.10:9001"), ((1, 0), "10.200.0.10:9001")] {
        let v = pod_app(
            &tb,
            tb.pod(from.0, from.1),
            &["send", "--to", to, "--bytes", "64K"],
        )?;
        assert_eq!(v["ok"], true, "{v}");
    }
    let links = pin_dir(&mesh, 0)?.join("links");
    let programs: BTreeSet<String> = PROGRAMS.iter().map(|p| (*p).to_owned()).collect();
    let drain = Duration::from_secs(options.drain_timeout_secs);
    let started = Instant::now();
    // `stop_agent` fails if the agent is still running when the deadline passes.
    let clean = mesh.stop_agent(0, drain)?;
    assert!(
        clean,
        "agent exited with failure:\n{}",
        mesh.agent_log_text(0)
    );
    assert!(started.elapsed() < drain, "took {:?}", started.elapsed());

    // A stopped agent leaves the datapath pinned: pods still cannot go around the mesh.
    assert_eq!(dir_entries(&links)?, programs);
    let probe = probe_listener(Place::Pod(tb.pod(1, 0)), "10.200.1.10:9050".parse()?)?;
    let out = tb.run(
        tb.pod(0, 0),
        &[
            "pod-app",
            "--timeout-ms",
            "10000",
            "peername",
            "--to",
            "10.200.1.10:9050",
        ],
        RUN_TIMEOUT,
    )?;
    assert_eq!(
        out.status.code(),
        Some(2),
        "must fail while stopped: {out:?}"
    );
    assert_nothing_accepted(&probe, "agent stopped")?;

    // And the next agent serves at once.
    mesh.start_agent(0)?;
    let v = pod_app(
        &tb,
        tb.pod(0, 0),
        &["send", "--to", "10.200.1.10:9001", "--bytes", "64K"],
    )?;
    assert_eq!(v["ok"], true, "{v}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// IPv6
// ---------------------------------------------------------------------------------------------

#[test]
fn cross_node_ipv6_goes_through_the_mesh_byte_exact() -> Result<()> {
    if !e2e_gate("cross_node_ipv6_goes_through_the_mesh_byte_exact") {
        return Ok(());
    }
    let tb = testbed(false)?;
    let mesh = Mesh::start(&tb, &node_source())?;
    let (client, dst) = (tb.pod(0, 0), tb.pod(1, 0));
    let _srv = server(&tb, dst, &["[::]:9001=sink"])?;
    let redirected = dp_event(&mesh, 0, "redirected")?;

    let to = "[fd00:200:1::10]:9001";
    let v = pod_app(&tb, client, &["send", "--to", to, "--bytes", "16M"])?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["reply"]["sha256"], pattern::sha256_hex(16 * MIB).as_str());
    assert_eq!(
        v["peer"], to,
        "getpeername6 must report the dialled address: {v}"
    );
    assert_eq!(
        addr_of(&v["reply"], "peer")?.ip().to_string(),
        "fd00:200:1::1",
        "delivered by node 1's agent: {v}"
    );
    assert_eq!(dp_event(&mesh, 0, "redirected")?, redirected + 1.0);
    let local = str_of(&v, "local")?.to_owned();
    let e = mesh.wait_access(1, LOG_TIMEOUT, |e| e["src_addr"] == local.as_str())?;
    assert_eq!(e["src_identity"], spiffe_id(client).as_str(), "{e}");
    assert_eq!(e["dst_addr"], to, "{e}");
    assert_eq!(e["bytes_sent"], 16 * MIB, "{e}");

    // A dual-stack socket dialling an IPv4-mapped address (as Java and many runtimes do) is an
    // IPv4 connection to the mesh: redirected, carried and reported as the IPv4 destination.
    let v = pod_app(
        &tb,
        client,
        &["send", "--to", "[::ffff:10.200.1.10]:9001", "--bytes", "4M"],
    )?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["peer"], "10.200.1.10:9001", "{v}");
    assert_eq!(addr_of(&v["reply"], "peer")?.ip().to_string(), "10.200.1.1");
    assert_eq!(dp_event(&mesh, 0, "redirected")?, redirected + 2.0);
    let local = str_of(&v, "local")?.to_owned();
    let e = mesh.wait_access(1, LOG_TIMEOUT, |e| e["src_addr"] == local.as_str())?;
    assert_eq!(e["src_identity"], spiffe_id(client).as_str(), "{e}");
    assert_eq!(e["dst_addr"], "10.200.1.10:9001", "{e}");
    Ok(())
}
