//! `demo`: Trellis on a local testbed, with real traffic and a report of what happened.
//!
//! Builds two nodes with two pods each plus a host outside the mesh, starts the controller (on a
//! directory of Kubernetes manifests) and an agent per node on its feed, sends same-node,
//! cross-node (IPv4 and IPv6), bulk and out-of-mesh traffic from unmodified programs in the
//! pods, then reads the agents' access logs and metrics to show each flow's path and the
//! identities the proxies verified. Then it takes a pod out of the mesh and back by relabelling
//! its manifest, live. Everything is torn down at the end.
//! Run through `cargo xtask demo` (needs root).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use mesh_tests::{
    mesh::{Mesh, MeshOptions, metric_sum},
    testbed::{Place, Testbed, e2e_gate},
};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);

struct Flow {
    title: &'static str,
    from: (usize, usize),
    to: String,
    to_label: String,
    args: Vec<String>,
}

fn main() -> Result<()> {
    if !e2e_gate("demo") {
        bail!("the demo needs root, cgroup v2, bpffs and iproute2 (see the reason above)");
    }
    println!("Trellis demo: building a 2-node, 4-pod testbed with a host outside the mesh...");
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(2)
        .external(true)
        .build()?;
    let mut mesh = Mesh::start(
        &tb,
        &MeshOptions {
            control_plane: true,
            ..Default::default()
        },
    )
    .context("starting the controller and the agents")?;
    println!(
        "controller ready, watching {}; agents ready on {} and {}\n",
        mesh.manifests_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        tb.node(0).name,
        tb.node(1).name
    );

    let ext = tb.external().context("external host")?;
    let _servers = [
        tb.spawn_server(
            tb.pod(0, 1),
            &[
                "--listen",
                "[::]:8080=http",
                "--listen",
                "[::]:9000=sink",
                "--name",
                "pod-0-1",
            ],
        )?,
        tb.spawn_server(
            tb.pod(1, 0),
            &[
                "--listen",
                "[::]:8080=http",
                "--listen",
                "[::]:9000=sink",
                "--name",
                "pod-1-0",
            ],
        )?,
        tb.spawn_server(
            Place::Host(ext),
            &["--listen", "[::]:8080=http", "--name", "external"],
        )?,
    ];
    let http = |to: String| vec!["http-get".to_string(), "--to".into(), to];
    let flows = vec![
        Flow {
            title: "same node",
            from: (0, 0),
            to: format!("{}:8080", tb.pod(0, 1).ip4),
            to_label: "pod-0-1".into(),
            args: vec![],
        },
        Flow {
            title: "cross node",
            from: (0, 0),
            to: format!("{}:8080", tb.pod(1, 0).ip4),
            to_label: "pod-1-0".into(),
            args: vec![],
        },
        Flow {
            title: "cross node, IPv6",
            from: (0, 1),
            to: format!("[{}]:8080", tb.pod(1, 0).ip6),
            to_label: "pod-1-0".into(),
            args: vec![],
        },
        Flow {
            title: "cross node, 64 MiB upload",
            from: (1, 1),
            to: format!("{}:9000", tb.pod(0, 1).ip4),
            to_label: "pod-0-1".into(),
            args: vec!["send".into(), "--bytes".into(), "64M".into()],
        },
        Flow {
            title: "out of the mesh",
            from: (1, 1),
            to: format!("{}:8080", ext.ip4),
            to_label: "external host".into(),
            args: vec![],
        },
    ];

    let mut failures = 0;
    for flow in &flows {
        let pod = tb.pod(flow.from.0, flow.from.1);
        let mut cmd = vec!["pod-app".to_string()];
        if flow.args.is_empty() {
            cmd.extend(http(flow.to.clone()));
        } else {
            cmd.extend(flow.args.clone());
            cmd.extend(["--to".to_string(), flow.to.clone()]);
        }
        let out = tb.run(pod, &cmd, TIMEOUT)?;
        let result = out.json().unwrap_or(Value::Null);
        let local = result["local"].as_str().unwrap_or_default().to_owned();
        println!(
            "== {}: {} -> {} ({})",
            flow.title, pod.name, flow.to_label, flow.to
        );
        if !out.success() {
            failures += 1;
            println!(
                "   FAILED: {}",
                result["error"].as_str().unwrap_or(out.stderr.trim())
            );
            continue;
        }
        let outbound = mesh
            .wait_access(flow.from.0, Duration::from_secs(5), |e| {
                e["direction"] == "outbound" && e["src_addr"] == local.as_str()
            })
            .ok();
        match &outbound {
            Some(e) => {
                println!(
                    "   application: connected to {}, getpeername says {}",
                    flow.to,
                    result["peer"].as_str().unwrap_or("?")
                );
                println!(
                    "   source agent ({}): path {}, as {}",
                    tb.node(flow.from.0).name,
                    e["path"].as_str().unwrap_or("?"),
                    e["src_identity"].as_str().unwrap_or("?")
                );
                println!(
                    "   bytes: {} sent, {} received, {} ms",
                    e["bytes_sent"], e["bytes_received"], e["duration_ms"]
                );
            }
            None => println!("   source agent: no access log event found"),
        }
        if outbound.as_ref().is_some_and(|e| e["path"] == "hbone") {
            let dst_node = usize::from(flow.to_label.starts_with("pod-1"));
            match mesh.wait_access(dst_node, Duration::from_secs(5), |e| {
                e["direction"] == "inbound" && e["src_addr"] == local.as_str()
            }) {
                Ok(e) => println!(
                    "   destination agent ({}): mutual TLS verified caller {} -> delivered to {}",
                    tb.node(dst_node).name,
                    e["src_identity"].as_str().unwrap_or("?"),
                    e["dst_workload"].as_str().unwrap_or("?"),
                ),
                Err(_) => println!("   destination agent: no access log event found"),
            }
        }
        if let Some(reply) = result.get("reply") {
            let same = reply["sha256"] == result["sent_sha256"];
            println!(
                "   integrity: sha256 of what arrived {} what was sent",
                if same { "matches" } else { "DIFFERS FROM" }
            );
            if !same {
                failures += 1;
            }
        }
        println!();
    }

    failures += service_vip(&tb, &mut mesh)?;
    failures += live_membership(&tb, &mut mesh)?;
    failures += policy(&tb, &mut mesh)?;

    println!("meshctl status on {}:", tb.node(0).name);
    let status = tb.run(tb.node(0), &["meshctl", "status"], TIMEOUT)?;
    if !status.success() {
        failures += 1;
    }
    println!("{}{}", status.stdout, status.stderr);
    for i in 0..tb.nodes().len() {
        let metrics = mesh.metrics(i)?;
        println!(
            "{}: {} connections opened (mTLS in: {}), {} datapath redirects, {} failures",
            tb.node(i).name,
            metric_sum(&metrics, "istio_tcp_connections_opened_total", &[]),
            metric_sum(
                &metrics,
                "istio_tcp_connections_opened_total",
                &[
                    ("reporter", "destination"),
                    ("connection_security_policy", "mutual_tls")
                ]
            ),
            metric_sum(
                &metrics,
                "trellis_datapath_events_total",
                &[("event", "redirected")]
            ),
            metric_sum(&metrics, "trellis_connection_failures_total", &[]),
        );
    }
    println!("\ntearing down the testbed");
    drop(mesh);
    drop(tb);
    if failures > 0 {
        bail!("{failures} flow(s) failed");
    }
    println!("demo complete: every flow succeeded");
    Ok(())
}

/// A Service `web` (10.96.0.10:80 -> 8080) backed by pod-0-1 and pod-1-0: the source agent
/// resolves the virtual IP itself and spreads connections over both endpoints.
fn service_vip(tb: &Testbed, mesh: &mut Mesh<'_>) -> Result<usize> {
    let vip: std::net::IpAddr = [10, 96, 0, 10].into();
    mesh.write_service(
        "web",
        &[vip],
        &[(80, 8080)],
        &[(tb.pod(0, 1), true), (tb.pod(1, 0), true)],
        None,
    )?;
    mesh.wait_service(0, "web", 2, TIMEOUT)?;
    println!("== service: pod-0-0 -> web ({vip}:80), 4 connections");
    let mut failures = 0;
    for _ in 0..4 {
        let out = tb.run(
            tb.pod(0, 0),
            &["pod-app", "http-get", "--to", &format!("{vip}:80")],
            TIMEOUT,
        )?;
        let result = out.json().unwrap_or(Value::Null);
        let local = result["local"].as_str().unwrap_or_default().to_owned();
        let event = mesh
            .wait_access(0, Duration::from_secs(5), |e| {
                e["direction"] == "outbound" && e["src_addr"] == local.as_str()
            })
            .ok();
        if let (Some(e), true) = (&event, out.success()) {
            println!(
                "   answered by {} via endpoint {} (path {})",
                result["body"]["server"].as_str().unwrap_or("?"),
                e["dst_addr"].as_str().unwrap_or("?"),
                e["path"].as_str().unwrap_or("?"),
            );
        } else {
            failures += 1;
            println!(
                "   FAILED: {}",
                result["error"].as_str().unwrap_or(out.stderr.trim())
            );
        }
    }
    println!();
    Ok(failures)
}

/// Takes pod-0-0 out of the mesh by labelling its manifest `trellis.dev/mesh=disabled`, shows
/// that its next connection goes out as plain TCP without the agent, then brings it back.
/// Returns the number of steps that did not behave.
fn live_membership(tb: &Testbed, mesh: &mut Mesh<'_>) -> Result<usize> {
    let pod = tb.pod(0, 0);
    let to = format!("{}:8080", tb.pod(1, 0).ip4);
    let mut failures = 0;
    let mut request = |mesh: &Mesh<'_>, expect_meshed: bool| -> Result<()> {
        let out = tb.run(pod, &["pod-app", "http-get", "--to", &to], TIMEOUT)?;
        let result = out.json().unwrap_or(Value::Null);
        let local = result["local"].as_str().unwrap_or_default().to_owned();
        let event = mesh
            .wait_access(
                0,
                Duration::from_secs(if expect_meshed { 5 } else { 1 }),
                |e| e["direction"] == "outbound" && e["src_addr"] == local.as_str(),
            )
            .ok();
        let meshed = event.is_some();
        println!(
            "   request {}: {}",
            if out.success() { "succeeded" } else { "FAILED" },
            match &event {
                Some(e) => format!(
                    "through the agent, path {}",
                    e["path"].as_str().unwrap_or("?")
                ),
                None => "straight to the destination, not through the agent".into(),
            }
        );
        if !out.success() || meshed != expect_meshed {
            failures += 1;
        }
        Ok(())
    };
    let enrolled = |n: usize| {
        move |d: &Value| d["datapath"]["enrolled_cgroups"].as_array().map(Vec::len) == Some(n)
    };
    let before = mesh
        .config_dump(0)?
        .get("datapath")
        .and_then(|d| d["enrolled_cgroups"].as_array().map(Vec::len))
        .unwrap_or(0);
    println!(
        "== live membership: label {} trellis.dev/mesh=disabled",
        pod.name
    );
    mesh.set_pod_label(pod, "trellis.dev/mesh", Some("disabled"))?;
    mesh.wait_config(0, TIMEOUT, enrolled(before.saturating_sub(1)))?;
    request(mesh, false)?;
    println!("== live membership: remove the label again");
    mesh.set_pod_label(pod, "trellis.dev/mesh", None)?;
    mesh.wait_config(0, TIMEOUT, enrolled(before))?;
    request(mesh, true)?;
    println!();
    Ok(failures)
}

/// A DENY for one principal: its connection is refused at the destination node, which says
/// which policy and rule decided; `meshctl policy explain` gives the same answer; deleting the
/// policy lets it through again.
fn policy(tb: &Testbed, mesh: &mut Mesh<'_>) -> Result<usize> {
    let (client, server) = (tb.pod(0, 0), tb.pod(1, 0));
    let to = std::net::SocketAddr::from((server.ip4, 8080));
    let principal = format!("cluster.local/ns/default/sa/{}", client.name);
    let mut failures = 0;
    println!("== policy: DENY from {principal} (AuthorizationPolicy default/deny-demo)");
    mesh.write_policy(
        "AuthorizationPolicy",
        "default",
        "deny-demo",
        serde_json::json!({"action": "DENY",
            "rules": [{"from": [{"source": {"principals": [principal]}}]}]}),
    )?;
    mesh.wait_policies(1, &["default/deny-demo"], TIMEOUT)?;
    if let Ok(name) = tb.get_server_name(client, to, Some(Duration::from_secs(4))) {
        println!("   request SUCCEEDED (answered by {name}): the policy was not enforced");
        failures += 1;
    } else {
        let reason = mesh
            .wait_access(1, TIMEOUT, |e| {
                e["error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("401 policy_denied"))
            })
            .ok()
            .and_then(|e| e["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "no denial in node-1's access log".into());
        println!("   request refused; node-1 says: {reason}");
    }
    let query = format!(
        "/policy/explain?from=default/{}&to=default/{}:8080",
        client.name, server.name
    );
    let (_, explained) = mesh.admin_get(1, &query)?;
    let explained: Value = serde_json::from_str(&explained).unwrap_or(Value::Null);
    println!(
        "   meshctl policy explain --from default/{} --to default/{}:8080 -> {}",
        client.name,
        server.name,
        explained["reason"].as_str().unwrap_or("?")
    );
    println!("== policy: delete it");
    mesh.delete_policy("AuthorizationPolicy", "default", "deny-demo")?;
    mesh.wait_policies(1, &[], TIMEOUT)?;
    match tb.get_server_name(client, to, Some(Duration::from_secs(4))) {
        Ok(name) => println!("   request succeeded (answered by {name})"),
        Err(e) => {
            println!("   request FAILED: {e}");
            failures += 1;
        }
    }
    println!();
    Ok(failures)
}
