//! Tests of the testbed itself: topology, routing without any mesh, process placement,
//! the pod-app protocols and teardown.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};
use mesh_tests::{
    pattern,
    testbed::{Testbed, cgroup_of, cgroup2_mount, e2e_gate},
};

const RUN_TIMEOUT: Duration = Duration::from_mins(1);

fn netns_names() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn keep_requested() -> bool {
    std::env::var("MESH_KEEP_TESTBED").is_ok_and(|v| v == "1")
}

fn build(nodes: usize, pods: usize, external: bool) -> Testbed {
    Testbed::builder()
        .nodes(nodes)
        .pods_per_node(pods)
        .external(external)
        .build()
        .expect("build testbed")
}

#[test]
fn cross_node_traffic_flows_without_a_mesh() -> Result<()> {
    if !e2e_gate("cross_node_traffic_flows_without_a_mesh") {
        return Ok(());
    }
    let tb = build(2, 2, true);
    let server = tb.spawn_server(
        tb.pod(1, 0),
        &["--listen", "[::]:9000=echo", "--listen", "[::]:9001=sink"],
    )?;
    assert_eq!(server.addrs.len(), 2);
    assert_eq!(server.addrs[1].port(), 9001);

    // IPv4 across nodes: pod(0,0) -> node 0 -> LAN -> node 1 -> pod(1,0).
    let out = tb.run(
        tb.pod(0, 0),
        &[
            "pod-app",
            "echo",
            "--to",
            "10.200.1.10:9000",
            "--bytes",
            "1000000",
        ],
        RUN_TIMEOUT,
    )?;
    let v = out.ok_json()?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["received"], 1_000_000);
    assert_eq!(
        v["local"].as_str().map(|l| l.starts_with("10.200.0.10:")),
        Some(true)
    );
    assert_eq!(v["peer"], "10.200.1.10:9000");

    // IPv6 across nodes.
    let v = tb
        .run(
            tb.pod(0, 1),
            &[
                "pod-app",
                "echo",
                "--to",
                "[fd00:200:1::10]:9000",
                "--bytes",
                "1000000",
            ],
            RUN_TIMEOUT,
        )?
        .ok_json()?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        v["local"]
            .as_str()
            .map(|l| l.starts_with("[fd00:200::11]:")),
        Some(true),
        "{v}"
    );

    // Same node, pod to pod over the `pods` bridge.
    let v = tb
        .run(
            tb.pod(1, 1),
            &[
                "pod-app",
                "echo",
                "--to",
                "10.200.1.10:9000",
                "--bytes",
                "64K",
            ],
            RUN_TIMEOUT,
        )?
        .ok_json()?;
    assert_eq!(v["ok"], true, "{v}");

    // send/sink: hashes on both ends match, and the sink saw the real source address.
    let v = tb
        .run(
            tb.pod(0, 0),
            &[
                "pod-app",
                "send",
                "--to",
                "10.200.1.10:9001",
                "--bytes",
                "3M",
                "--marker",
                "HELLO",
            ],
            RUN_TIMEOUT,
        )?
        .ok_json()?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["sent"], 3 << 20);
    assert_eq!(v["reply"]["sha256"], v["sent_sha256"]);
    assert_eq!(v["reply"]["peer"], v["local"]);
    let expected = pattern::Pattern::with_marker(3 << 20, b"HELLO")?.sha256_hex();
    assert_eq!(v["sent_sha256"], expected.as_str());

    // Pod -> external host and external host -> pod.
    let ext = tb.external().context("external host")?;
    let ext_server = tb.spawn_server(ext, &["--listen", "[::]:7000=echo"])?;
    for to in ["10.199.0.100:7000", "[fd00:199::100]:7000"] {
        let v = tb
            .run(
                tb.pod(1, 1),
                &["pod-app", "echo", "--to", to, "--bytes", "100000"],
                RUN_TIMEOUT,
            )?
            .ok_json()?;
        assert_eq!(v["ok"], true, "{to}: {v}");
    }
    let v = tb
        .run(
            ext,
            &[
                "pod-app",
                "echo",
                "--to",
                "10.200.1.10:9000",
                "--bytes",
                "1000",
            ],
            RUN_TIMEOUT,
        )?
        .ok_json()?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        v["local"].as_str().map(|l| l.starts_with("10.199.0.100:")),
        Some(true)
    );
    drop(ext_server);

    // Node -> pod on another node.
    let v = tb
        .run(
            tb.node(0),
            &["pod-app", "peername", "--to", "10.200.1.10:9000"],
            RUN_TIMEOUT,
        )?
        .ok_json()?;
    assert_eq!(v["peer"], "10.200.1.10:9000");
    assert_eq!(
        v["local"].as_str().map(|l| l.starts_with("10.199.0.1:")),
        Some(true),
        "{v}"
    );
    assert!(
        server.stderr_text().is_empty(),
        "server stderr: {}",
        server.stderr_text()
    );
    Ok(())
}

#[test]
fn source_http_and_many_work() -> Result<()> {
    if !e2e_gate("source_http_and_many_work") {
        return Ok(());
    }
    let tb = build(1, 2, false);
    let server = tb.spawn_server(
        tb.pod(0, 0),
        &[
            "--name",
            "srv",
            "--listen",
            "0.0.0.0:0=source",
            "--listen",
            "[::]:8080=http",
            "--listen",
            "[::]:9000",
        ],
    )?;
    let source_port = server.addr().port();
    assert_ne!(source_port, 0);

    let to = format!("10.200.0.10:{source_port}");
    let v = tb
        .run(
            tb.pod(0, 1),
            &["pod-app", "fetch", "--to", &to, "--bytes", "5000001"],
            RUN_TIMEOUT,
        )?
        .ok_json()?;
    assert_eq!(v["received"], 5_000_001);
    assert_eq!(v["sha256"], v["expected_sha256"]);
    assert_eq!(
        v["expected_sha256"],
        pattern::sha256_hex(5_000_001).as_str()
    );

    let v = tb
        .run(
            tb.pod(0, 1),
            &[
                "pod-app",
                "http-get",
                "--to",
                "[fd00:200:0::10]:8080",
                "--path",
                "/hello?x=1",
                "--header",
                "X-Test: yes",
            ],
            RUN_TIMEOUT,
        )?
        .ok_json()?;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["body"]["server"], "srv");
    assert_eq!(v["body"]["path"], "/hello?x=1");
    assert_eq!(v["body"]["headers"]["x-test"], "yes");
    assert_eq!(v["body"]["peer"], v["local"]);

    let v = tb
        .run(
            tb.pod(0, 1),
            &[
                "pod-app",
                "many",
                "--to",
                "10.200.0.10:9000",
                "--connections",
                "300",
                "--bytes",
                "4K",
            ],
            RUN_TIMEOUT,
        )?
        .ok_json()?;
    assert_eq!(v["ok"], 300, "{v}");
    assert_eq!(v["failed"], 0, "{v}");

    // A refused connection is an error with exit status 2 and an "error" field.
    let out = tb.run(
        tb.pod(0, 1),
        &["pod-app", "echo", "--to", "10.200.0.10:1", "--bytes", "1"],
        RUN_TIMEOUT,
    )?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        out.json()?["error"]
            .as_str()
            .is_some_and(|e| e.contains("connecting")),
        "{out:?}"
    );
    Ok(())
}

#[test]
fn processes_land_in_the_right_cgroups_and_namespaces() -> Result<()> {
    if !e2e_gate("processes_land_in_the_right_cgroups_and_namespaces") {
        return Ok(());
    }
    let tb = build(2, 1, true);
    let mount = cgroup2_mount()?;
    let rel = |p: &std::path::Path| -> String {
        format!(
            "/{}",
            p.strip_prefix(&mount)
                .map(|r| r.display().to_string())
                .unwrap_or_default()
        )
    };

    let pod = tb.pod(1, 0);
    let mut in_pod = tb.spawn(pod, &["sleep", "60"], Default::default())?;
    assert_eq!(cgroup_of(in_pod.pid())?, rel(&pod.cgroup));

    let node = tb.node(1);
    let in_node = tb.spawn(node, &["sleep", "60"], Default::default())?;
    let node_cg = cgroup_of(in_node.pid())?;
    assert!(
        !node_cg.starts_with(&rel(&node.pod_cgroup_root)),
        "{node_cg}"
    );
    assert_eq!(node_cg, rel(&node.system_cgroup));

    // Processes see their namespace's addresses, and /sys/fs/cgroup and bpffs stay visible
    // (podexec does not remount /sys the way `ip netns exec` does).
    let out = tb.run(
        pod,
        &["ip", "-o", "addr", "show", "dev", "eth0"],
        RUN_TIMEOUT,
    )?;
    out.check()?;
    assert!(out.stdout.contains("10.200.1.10/24"), "{}", out.stdout);
    assert!(out.stdout.contains("fd00:200:1::10/64"), "{}", out.stdout);
    let out = tb.run(
        pod,
        &[
            "ls",
            "-d",
            &pod.cgroup.display().to_string(),
            &node.bpf_pin_dir.display().to_string(),
        ],
        RUN_TIMEOUT,
    )?;
    out.check()?;

    // Netns::run enters the namespace on a helper thread: a listener made there is reachable
    // from a pod on the other node.
    let listener = node.netns.run(|| TcpListener::bind("0.0.0.0:0"))??;
    let port = listener.local_addr()?.port();
    let to = format!("{}:{port}", node.lan_ip4);
    let client = std::thread::spawn(move || -> Result<SocketAddr> {
        let (mut s, peer) = listener.accept()?;
        s.write_all(b"hi")?;
        Ok(peer)
    });
    let v = tb
        .run(
            tb.pod(0, 0),
            &["pod-app", "peername", "--to", &to],
            RUN_TIMEOUT,
        )?
        .ok_json()?;
    let peer = client
        .join()
        .map_err(|_| anyhow::anyhow!("accept thread panicked"))??;
    assert_eq!(Some(peer.to_string().as_str()), v["local"].as_str());

    // And a connection made inside the pod namespace from this process.
    let ext_ip = tb.external().context("external")?.ip4;
    let ext_server = tb.spawn_server(
        tb.external().context("external")?,
        &["--listen", "0.0.0.0:5000=echo"],
    )?;
    let mut conn = pod.netns.run(|| TcpStream::connect((ext_ip, 5000)))??;
    conn.write_all(b"ping")?;
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut back = String::new();
    conn.read_to_string(&mut back)?;
    assert_eq!(back, "ping");
    drop(ext_server);

    // Terminate and wait are bounded and report the exit.
    in_pod.terminate()?;
    let status = in_pod.wait_timeout(Duration::from_secs(10))?;
    assert!(status.is_some(), "sleep survived SIGTERM");
    Ok(())
}

#[test]
fn teardown_removes_everything_and_testbeds_coexist() -> Result<()> {
    if !e2e_gate("teardown_removes_everything_and_testbeds_coexist") {
        return Ok(());
    }
    let a = build(1, 1, false);
    let b = build(2, 1, true);
    assert_ne!(a.prefix(), b.prefix());
    let names = netns_names();
    for ns in [&a.node(0).netns, &b.node(1).netns, &b.pod(1, 0).netns] {
        assert!(
            names.iter().any(|n| n == ns.name()),
            "{} missing from {names:?}",
            ns.name()
        );
    }
    // The same addresses exist in both, isolated from each other.
    let sa = a.spawn_server(a.pod(0, 0), &["--listen", "0.0.0.0:9000=echo"])?;
    let sb = b.spawn_server(b.pod(0, 0), &["--listen", "0.0.0.0:9000=echo"])?;
    let v = b
        .run(
            b.pod(1, 0),
            &[
                "pod-app",
                "echo",
                "--to",
                "10.200.0.10:9000",
                "--bytes",
                "1000",
            ],
            RUN_TIMEOUT,
        )?
        .ok_json()?;
    assert_eq!(v["ok"], true, "{v}");

    let prefix = a.prefix().to_owned();
    let scratch = a.scratch_dir().to_path_buf();
    let cgroup_root = a.cgroup_root().to_path_buf();
    let pin_root: PathBuf = a
        .node(0)
        .bpf_pin_dir()
        .parent()
        .context("pin parent")?
        .to_path_buf();
    let pod_pid = sa.pid();
    assert!(scratch.join("logs").is_dir());
    assert!(cgroup_root.is_dir());
    assert!(pin_root.is_dir());
    // Leak the server handle: teardown must still kill it (through cgroup.kill).
    std::mem::forget(sa);
    drop(a);
    if keep_requested() {
        return Ok(());
    }
    let stat = std::fs::read_to_string(format!("/proc/{pod_pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "server still running: {stat}"
    );
    let names = netns_names();
    assert!(
        !names.iter().any(|n| n.starts_with(&format!("{prefix}-"))),
        "{names:?}"
    );
    assert!(!scratch.exists());
    assert!(!cgroup_root.exists());
    assert!(!pin_root.exists());

    // b is unaffected.
    let v = b
        .run(
            b.pod(1, 0),
            &[
                "pod-app",
                "echo",
                "--to",
                "10.200.0.10:9000",
                "--bytes",
                "1000",
            ],
            RUN_TIMEOUT,
        )?
        .ok_json()?;
    assert_eq!(v["ok"], true, "{v}");
    drop(sb);
    Ok(())
}

#[test]
fn teardown_runs_after_a_panic() {
    if !e2e_gate("teardown_runs_after_a_panic") {
        return;
    }
    let prefix = std::panic::catch_unwind(|| {
        let tb = build(1, 1, false);
        let prefix = tb.prefix().to_owned();
        std::panic::panic_any(prefix);
    })
    .expect_err("the closure panics")
    .downcast::<String>()
    .expect("prefix payload");
    if keep_requested() {
        return;
    }
    let names = netns_names();
    assert!(
        !names.iter().any(|n| n.starts_with(&format!("{prefix}-"))),
        "{names:?}"
    );
}

#[test]
fn workspace_binaries_are_found() {
    let path = mesh_tests::testbed::bin_path("pod-app").expect("pod-app is built with the tests");
    assert!(path.ends_with("pod-app"));
    let err = mesh_tests::testbed::bin_path("no-such-binary").expect_err("missing");
    assert!(format!("{err:#}").contains("cargo build"), "{err:#}");
}
