//! End-to-end proof of the same-node fast path: what a pod sends to its node's proxy (its own
//! outbound connections, and its side of connections the proxy delivers to it) is queued by the
//! kernel straight onto the proxy's socket, and every byte still arrives, in order, with
//! half-close intact: for large transfers in both directions, for clients that move bytes with
//! splice(2), for servers that speak first (racing the proxy's end onto the path), and for a
//! thousand connections at once. With `datapath.fast_path: false` nothing joins the path.
//!
//! Proof that the path is taken comes from the kernel's own counters
//! (`trellis_datapath_events_total{event="fastpath_redirected"}`, one per message redirected).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result};
use mesh_tests::mesh::{Mesh, MeshOptions, metric_sum};
use mesh_tests::pattern;
use mesh_tests::testbed::{Place, Testbed, e2e_gate};
use serde_json::Value;

const RUN_TIMEOUT: Duration = Duration::from_secs(240);
const CLIENT_TIMEOUT_MS: &str = "200000";
const LOG_TIMEOUT: Duration = Duration::from_secs(15);
const MIB: u64 = 1 << 20;
/// pod(0,1) and pod(1,0): a neighbour of the client pod(0,0), and a pod on the other node.
const NEIGHBOUR: &str = "10.200.0.11";
const REMOTE: &str = "10.200.1.10";

/// The fast path is off by default: these tests turn it on.
fn on() -> MeshOptions {
    MeshOptions {
        fast_path: true,
        ..MeshOptions::default()
    }
}

fn testbed() -> Result<Testbed> {
    Testbed::builder().nodes(2).pods_per_node(2).build()
}

fn pod_app<'a>(tb: &Testbed, place: impl Into<Place<'a>>, args: &[&str]) -> Result<Value> {
    let mut cmd = vec!["pod-app", "--timeout-ms", CLIENT_TIMEOUT_MS];
    cmd.extend_from_slice(args);
    tb.run(place, &cmd, RUN_TIMEOUT)?.ok_json()
}

/// Every server mode the tests use, on both target pods.
fn servers(tb: &Testbed) -> Result<Vec<mesh_tests::testbed::Server>> {
    let listen = [
        "--timeout-ms",
        CLIENT_TIMEOUT_MS,
        "--listen",
        "[::]:9000=echo",
        "--listen",
        "[::]:9001=sink",
        "--listen",
        "[::]:9002=source",
        "--listen",
        "[::]:9003=greeter",
    ];
    Ok(vec![
        tb.spawn_server(tb.pod(0, 1), &listen)?,
        tb.spawn_server(tb.pod(1, 0), &listen)?,
    ])
}

fn event(mesh: &Mesh, node: usize, name: &str) -> Result<f64> {
    Ok(metric_sum(
        &mesh.metrics(node)?,
        "trellis_datapath_events_total",
        &[("event", name)],
    ))
}

/// The fast-path counters of `node`, for the failure messages.
fn counters(mesh: &Mesh, node: usize) -> Result<String> {
    Ok(format!(
        "node {node}: redirected {} fallback {} full {}",
        event(mesh, node, "fastpath_redirected")?,
        event(mesh, node, "fastpath_fallback")?,
        event(mesh, node, "fastpath_full")?,
    ))
}

fn send(tb: &Testbed, to: &str, size: &str, extra: &[&str]) -> Result<Value> {
    let mut args = vec!["send", "--to", to, "--bytes", size];
    args.extend_from_slice(extra);
    let v = pod_app(tb, tb.pod(0, 0), &args)?;
    anyhow::ensure!(v["ok"] == true, "send to {to}: {v}");
    anyhow::ensure!(
        v["sent_sha256"] == v["reply"]["sha256"],
        "the sink hashed other bytes: {v}"
    );
    Ok(v)
}

fn fetch(tb: &Testbed, from: &str, bytes: u64, extra: &[&str]) -> Result<Value> {
    let size = format!("{}M", bytes / MIB);
    let mut args = vec!["fetch", "--to", from, "--bytes", &size];
    args.extend_from_slice(extra);
    let v = pod_app(tb, tb.pod(0, 0), &args)?;
    anyhow::ensure!(v["ok"] == true, "fetch from {from}: {v}");
    anyhow::ensure!(
        v["received"] == bytes && v["sha256"] == pattern::sha256_hex(bytes).as_str(),
        "fetch from {from}: bytes lost, reordered or corrupted: {v}"
    );
    Ok(v)
}

#[test]
fn pods_send_to_their_proxy_through_the_kernel_fast_path_byte_exact_with_half_close() -> Result<()>
{
    if !e2e_gate("pods_send_to_their_proxy_through_the_kernel_fast_path_byte_exact_with_half_close")
    {
        return Ok(());
    }
    let tb = testbed()?;
    let mesh = Mesh::start(&tb, &on())?;
    let _servers = servers(&tb)?;
    let neighbour = |port: u16| format!("{NEIGHBOUR}:{port}");
    let remote = |port: u16| format!("{REMOTE}:{port}");

    // Same node, client to server: 64 MiB from pod(0,0) into node 0's proxy on the fast path,
    // then delivered; the sink answers only after the client's EOF crossed both hops.
    let before = event(&mesh, 0, "fastpath_redirected")?;
    let v = send(&tb, &neighbour(9001), "64M", &[])?;
    let local = v["local"].as_str().context("local")?.to_owned();
    let e = mesh.wait_access(0, LOG_TIMEOUT, |e| e["src_addr"] == local.as_str())?;
    assert_eq!(e["path"], "local", "{e}");
    assert_eq!(e["bytes_sent"], 64 * MIB, "{e}");
    // The client writes 64 KiB at a time: over a thousand messages, each redirected.
    let redirected = event(&mesh, 0, "fastpath_redirected")? - before;
    assert!(redirected >= 1000.0, "{}", counters(&mesh, 0)?);

    // Same node, server to client: the source pod's 64 MiB reach the proxy on the fast path
    // (its side of a connection the proxy delivered), and its half-close ends the stream.
    let before = event(&mesh, 0, "fastpath_redirected")?;
    fetch(&tb, &neighbour(9002), 64 * MIB, &[])?;
    let redirected = event(&mesh, 0, "fastpath_redirected")? - before;
    assert!(redirected >= 1000.0, "{}", counters(&mesh, 0)?);

    // Both directions at once.
    let v = pod_app(
        &tb,
        tb.pod(0, 0),
        &["echo", "--to", &neighbour(9000), "--bytes", "16M"],
    )?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["mismatch_at"], Value::Null, "{v}");

    // Across nodes: node 0's first hop (pod to proxy) and node 1's last hop (the server pod's
    // replies to its proxy) are both on the fast path; the HBONE hop between them is not.
    let before = [
        event(&mesh, 0, "fastpath_redirected")?,
        event(&mesh, 1, "fastpath_redirected")?,
    ];
    send(&tb, &remote(9001), "64M", &[])?;
    fetch(&tb, &remote(9002), 64 * MIB, &[])?;
    assert!(
        event(&mesh, 0, "fastpath_redirected")? - before[0] >= 1000.0,
        "{}",
        counters(&mesh, 0)?
    );
    assert!(
        event(&mesh, 1, "fastpath_redirected")? - before[1] >= 1000.0,
        "{}",
        counters(&mesh, 1)?
    );
    assert_eq!(event(&mesh, 0, "fastpath_full")?, 0.0);
    assert_eq!(event(&mesh, 1, "fastpath_full")?, 0.0);
    eprintln!("{}; {}", counters(&mesh, 0)?, counters(&mesh, 1)?);
    Ok(())
}

#[test]
fn splice_clients_and_servers_that_speak_first_stay_byte_exact() -> Result<()> {
    if !e2e_gate("splice_clients_and_servers_that_speak_first_stay_byte_exact") {
        return Ok(());
    }
    let tb = testbed()?;
    let mesh = Mesh::start(&tb, &on())?;
    let _servers = servers(&tb)?;

    // splice() reads only a socket's own receive queue and writes through sendmsg: a pod that
    // moves its bytes that way must see exactly what a read()/write() pod sees.
    for to in [NEIGHBOUR, REMOTE] {
        let before = event(&mesh, 0, "fastpath_redirected")?;
        send(&tb, &format!("{to}:9001"), "32M", &["--splice"])?;
        assert!(
            event(&mesh, 0, "fastpath_redirected")? - before >= 100.0,
            "spliced sends take the fast path: {}",
            counters(&mesh, 0)?
        );
        fetch(&tb, &format!("{to}:9002"), 32 * MIB, &["--splice"])?;
    }

    // A server that writes as soon as it accepts races the proxy's end onto the path: whichever
    // wins, its bytes must arrive in order (a socket that once sent through the stack never
    // switches to the redirect, or later bytes would overtake earlier ones).
    for round in 0..5 {
        for from in [NEIGHBOUR, REMOTE] {
            fetch(&tb, &format!("{from}:9003"), 16 * MIB, &[])
                .with_context(|| format!("greeting {round} from {from}"))?;
        }
    }
    eprintln!("{}; {}", counters(&mesh, 0)?, counters(&mesh, 1)?);
    Ok(())
}

#[test]
fn a_thousand_concurrent_same_node_connections_all_complete() -> Result<()> {
    if !e2e_gate("a_thousand_concurrent_same_node_connections_all_complete") {
        return Ok(());
    }
    let tb = testbed()?;
    let mesh = Mesh::start(&tb, &on())?;
    let _servers = servers(&tb)?;
    let before = event(&mesh, 0, "fastpath_redirected")?;
    let v = pod_app(
        &tb,
        tb.pod(0, 0),
        &[
            "many",
            "--to",
            &format!("{NEIGHBOUR}:9000"),
            "--connections",
            "1000",
            "--concurrency",
            "1000",
            "--bytes",
            "16K",
        ],
    )?;
    assert_eq!(v["ok"], 1000, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    // Each connection redirects at least its client's send and the echo's reply.
    assert!(
        event(&mesh, 0, "fastpath_redirected")? - before >= 2000.0,
        "{}",
        counters(&mesh, 0)?
    );
    assert_eq!(event(&mesh, 0, "fastpath_full")?, 0.0);
    Ok(())
}

#[test]
fn with_the_fast_path_off_no_socket_joins_it_and_traffic_flows() -> Result<()> {
    if !e2e_gate("with_the_fast_path_off_no_socket_joins_it_and_traffic_flows") {
        return Ok(());
    }
    let tb = testbed()?;
    let options = MeshOptions {
        fast_path: false,
        ..MeshOptions::default()
    };
    let mesh = Mesh::start(&tb, &options)?;
    let _servers = servers(&tb)?;
    send(&tb, &format!("{NEIGHBOUR}:9001"), "16M", &[])?;
    fetch(&tb, &format!("{REMOTE}:9002"), 16 * MIB, &[])?;
    for node in 0..2 {
        for name in ["fastpath_redirected", "fastpath_fallback", "fastpath_full"] {
            assert_eq!(event(&mesh, node, name)?, 0.0, "{}", counters(&mesh, node)?);
        }
    }
    // The proxy-side program is not attached either.
    let dump = mesh.config_dump(0)?;
    let pin_dir = dump["datapath"]["pin_dir"]
        .as_str()
        .with_context(|| format!("no pin_dir in config dump {dump}"))?;
    let links = std::path::Path::new(pin_dir).join("links");
    let pinned: BTreeSet<String> = std::fs::read_dir(&links)
        .with_context(|| format!("listing {}", links.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    assert!(pinned.contains("sock_ops"), "{pinned:?}");
    assert!(!pinned.contains("sock_ops_proxy"), "{pinned:?}");
    Ok(())
}
