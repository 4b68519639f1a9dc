//! One pod cannot take its node down: per-pod and node-wide connection caps in the agent,
//! proven on the testbed through the kernel redirect and both agents.
//!
//! - A pod that opens far more connections than its cap gets the excess reset at once, each
//!   refusal counted (`trellis_connection_failures_total{reason="pod_connection_limit"}`),
//!   while the node's other pods keep connecting, same node and cross node, and the agent
//!   keeps answering its readiness probe.
//! - Once the hoarding pod lets go, it connects again: slots are given back.
//! - A pod in a connect loop gets at most its rate of access-log lines; the rest are counted
//!   (`trellis_access_log_suppressed_total`) and reported by its next line, while another pod's
//!   connections are all logged.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_node::config::LimitsConfig;
use mesh_tests::{
    mesh::{Mesh, MeshOptions, metric_sum},
    testbed::{Pod, SpawnOptions, Testbed, e2e_gate},
};
use serde_json::Value;

const PER_POD: usize = 100;
const HOARD: usize = 600;
const WAIT: Duration = Duration::from_secs(30);

#[test]
fn a_pod_hoarding_connections_is_capped_while_its_neighbours_keep_working() {
    if !e2e_gate("a_pod_hoarding_connections_is_capped_while_its_neighbours_keep_working") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(3)
        .build()
        .expect("testbed");
    let mesh = Mesh::start(
        &tb,
        &MeshOptions {
            limits: LimitsConfig {
                max_connections_per_pod: PER_POD,
                ..LimitsConfig::default()
            },
            ..Default::default()
        },
    )
    .expect("mesh");
    let (hoarder, neighbour, local_server) = (tb.pod(0, 0), tb.pod(0, 1), tb.pod(0, 2));
    let remote_server = tb.pod(1, 0);
    let _remote = tb
        .spawn_server(
            remote_server,
            &[
                "--listen",
                "0.0.0.0:8080=http",
                "--listen",
                "0.0.0.0:9000=sink",
                "--name",
                "remote",
            ],
        )
        .expect("remote server");
    let _local = tb
        .spawn_server(
            local_server,
            &["--listen", "0.0.0.0:8080=http", "--name", "local"],
        )
        .expect("local server");
    let get = |from: &Pod, server: &Pod| {
        tb.get_server_name(
            from,
            SocketAddr::from((server.ip4, 8080)),
            Some(Duration::from_secs(5)),
        )
    };
    assert_eq!(get(neighbour, remote_server).as_deref(), Ok("remote"));

    // The hoarder opens six times its cap and holds them (a sink never answers).
    let target = SocketAddr::from((remote_server.ip4, 9000)).to_string();
    let connections = HOARD.to_string();
    let mut hoard = tb
        .spawn(
            hoarder,
            &[
                "pod-app",
                "--timeout-ms",
                "60000",
                "hoard",
                "--to",
                &target,
                "--connections",
                &connections,
                "--hold-ms",
                "8000",
            ],
            SpawnOptions::new(),
        )
        .expect("hoard");

    // Every connection past the cap is refused and counted.
    let refused = || {
        mesh.metrics(0).map_or(0.0, |m| {
            metric_sum(
                &m,
                "trellis_connection_failures_total",
                &[
                    ("direction", "outbound"),
                    ("reason", "pod_connection_limit"),
                ],
            )
        })
    };
    let deadline = Instant::now() + WAIT;
    while refused() < (HOARD - PER_POD) as f64 {
        assert!(
            Instant::now() < deadline,
            "refusals counted: {} of {}",
            refused(),
            HOARD - PER_POD
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // While the hoarder holds its cap, its neighbours connect both ways and the agent is ready.
    for _ in 0..5 {
        assert_eq!(get(neighbour, remote_server).as_deref(), Ok("remote"));
        assert_eq!(get(neighbour, local_server).as_deref(), Ok("local"));
    }
    let (status, _) = mesh
        .admin_get(0, "/healthz/ready")
        .expect("readiness answers");
    assert_eq!(status, 200);

    // The hoarder saw exactly its cap stay open; the rest were reset.
    let report: Value = hoard
        .wait_for_stdout_line(WAIT, |l| l.contains("\"opened\""))
        .ok()
        .and_then(|l| serde_json::from_str(&l).ok())
        .expect("hoard report");
    assert_eq!(report["alive"], PER_POD, "{report}");
    // A reset can arrive before the client's connect() returns, which then fails with it.
    let cut = ["reset", "closed", "connect_errors"]
        .iter()
        .map(|k| report[*k].as_u64().unwrap_or(0))
        .sum::<u64>();
    assert_eq!(cut, (HOARD - PER_POD) as u64, "{report}");
    let log_lines = mesh
        .agent_log_text(0)
        .lines()
        .filter(|l| l.contains("pod_connection_limit") && l.contains("connection refused"))
        .count();
    assert!(
        (1..=3).contains(&log_lines),
        "refusals are logged at most once per interval, not once each: {log_lines} lines"
    );

    // Once it lets go, its slots come back.
    drop(hoard);
    let deadline = Instant::now() + WAIT;
    while get(hoarder, remote_server).as_deref() != Ok("remote") {
        assert!(Instant::now() < deadline, "the hoarder connects again");
        std::thread::sleep(Duration::from_millis(200));
    }
}

const FLOOD: usize = 3_000;
const LOG_RATE: u32 = 50;
const LOG_BURST: u32 = 100;

#[test]
fn a_connect_loop_cannot_flood_the_access_log() {
    if !e2e_gate("a_connect_loop_cannot_flood_the_access_log") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(2)
        .build()
        .expect("testbed");
    let mesh = Mesh::start(
        &tb,
        &MeshOptions {
            limits: LimitsConfig {
                access_log_per_source_per_sec: LOG_RATE,
                access_log_burst: LOG_BURST,
                ..LimitsConfig::default()
            },
            ..Default::default()
        },
    )
    .expect("mesh");
    let (flooder, neighbour, server) = (tb.pod(0, 0), tb.pod(0, 1), tb.pod(1, 0));
    let _server = tb
        .spawn_server(
            server,
            &[
                "--listen",
                "0.0.0.0:8080=http",
                "--listen",
                "0.0.0.0:9000=echo",
                "--name",
                "server",
            ],
        )
        .expect("server");
    let from = |pod: &Pod| {
        let ip = pod.ip4.to_string();
        move |e: &Value| {
            e["direction"] == "outbound"
                && e["src_addr"]
                    .as_str()
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                    .is_some_and(|a| a.ip().to_string() == ip)
        }
    };
    let suppressed = || {
        mesh.metrics(0).map_or(0.0, |m| {
            metric_sum(
                &m,
                "trellis_access_log_suppressed_total",
                &[("direction", "outbound")],
            )
        })
    };

    let started = Instant::now();
    let target = SocketAddr::from((server.ip4, 9000)).to_string();
    let connections = FLOOD.to_string();
    let mut flood = tb
        .spawn(
            flooder,
            &[
                "pod-app",
                "--timeout-ms",
                "60000",
                "many",
                "--to",
                &target,
                "--connections",
                &connections,
                "--concurrency",
                "50",
                "--bytes",
                "1",
            ],
            SpawnOptions::new(),
        )
        .expect("many");
    // The neighbour's connections, made during the flood, are all logged.
    for _ in 0..20 {
        assert_eq!(
            tb.get_server_name(
                neighbour,
                SocketAddr::from((server.ip4, 8080)),
                Some(Duration::from_secs(5))
            )
            .as_deref(),
            Ok("server")
        );
    }
    let report: Value = flood
        .wait_for_stdout_line(WAIT * 2, |l| l.contains("\"connections\""))
        .ok()
        .and_then(|l| serde_json::from_str(&l).ok())
        .expect("many report");
    assert_eq!(report["ok"], FLOOD, "{report}");

    // Every connection ends in one event: written or counted, exactly.
    let written = || {
        mesh.access_log(0)
            .iter()
            .filter(|e| from(flooder)(e))
            .count()
    };
    let deadline = Instant::now() + WAIT;
    while written() as f64 + suppressed() < FLOOD as f64 {
        assert!(
            Instant::now() < deadline,
            "events: {} written + {} suppressed of {FLOOD}",
            written(),
            suppressed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (lines, left_out) = (written(), suppressed());
    assert_eq!(lines as f64 + left_out, FLOOD as f64);
    let bound = f64::from(LOG_RATE) * elapsed + f64::from(LOG_BURST) + 1.0;
    assert!(
        (lines as f64) <= bound,
        "{lines} lines in {elapsed:.1} s; the limit allows {bound:.0}"
    );
    assert!(left_out > 0.0, "the flood outran the limit");
    let neighbour_lines = mesh
        .access_log(0)
        .iter()
        .filter(|e| from(neighbour)(e))
        .count();
    assert_eq!(
        neighbour_lines, 20,
        "the neighbour's connections are all logged"
    );

    // The flooder's next line says how many were left out since its last one, so its lines
    // account for every event.
    let deadline = Instant::now() + WAIT;
    loop {
        assert_eq!(
            tb.get_server_name(
                flooder,
                SocketAddr::from((server.ip4, 8080)),
                Some(Duration::from_secs(5))
            )
            .as_deref(),
            Ok("server")
        );
        let log = mesh.access_log(0);
        let mine: Vec<&Value> = log.iter().filter(|e| from(flooder)(e)).collect();
        let reported: u64 = mine.iter().filter_map(|e| e["suppressed"].as_u64()).sum();
        if reported as f64 == suppressed() && mine.len() > lines {
            assert!(
                mine.iter().all(|e| e["suppressed"].is_u64()),
                "{:?}",
                mine.last()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reported {reported} of {}",
            suppressed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
