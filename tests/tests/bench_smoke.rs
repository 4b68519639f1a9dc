//! The benchmark machinery works: a quick `bench run` measures every configuration and writes
//! a report with every figure. Speeds are never asserted: only that each configuration
//! produced figures, and that the relay and Trellis runs really crossed a proxy (it spent
//! CPU) while the no-mesh run had none; for the HTTP test, that the waypoint configuration
//! really crossed the waypoint (it spent CPU and answered every request). The bench's own
//! relay also runs as a `--peer` (started from the command template, dialled like the relay
//! floor), which checks the peer machinery end to end.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::testbed::{bin_path, e2e_gate};
use serde_json::Value;

/// A quick run of four tests with a peer takes one to two minutes (much of it starting the
/// control plane and the waypoint, in debug builds); this bounds a hung run.
const RUN_TIMEOUT: Duration = Duration::from_mins(5);

fn figure<'a>(report: &'a Value, scenario: &str, key: &str) -> &'a Value {
    report["figures"]
        .as_array()
        .expect("figures is an array")
        .iter()
        .find(|f| f["scenario"] == scenario && f["key"] == key)
        .unwrap_or_else(|| panic!("no figure {scenario} {key} in {report:#}"))
}

fn positive(f: &Value, config: &str) -> f64 {
    let v = f[config].as_f64().unwrap_or(f64::NAN);
    assert!(v > 0.0, "{config} has no positive figure in {f}");
    v
}

#[test]
fn quick_bench_reports_every_configuration() {
    if !e2e_gate("quick_bench_reports_every_configuration") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json = dir.join("report.json");
    let mut child = Command::new(bin_path("bench").expect("bench binary (cargo build --bins)"))
        .args(["run", "--quick", "--rounds", "1"])
        .args(["--only", "same-node-rr", "--only", "cross-node-bulk1"])
        .args(["--only", "cross-node-http", "--only", "same-node-pingpong"])
        .args(["--peer", "{bench} relay {maps}", "--peer-dial", "relay"])
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start bench");
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for bench") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bench did not finish within {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "bench failed ({status}); its log is above"
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("report written"))
            .expect("report is JSON");
    let _ = std::fs::remove_dir_all(&dir);

    let configs = ["no_mesh", "relay", "trellis", "peer"];
    for key in ["rr.p50_us", "rr.p99_us", "rr.max_us"] {
        let f = figure(&report, "same-node", key);
        for c in configs {
            positive(f, c);
        }
        assert!(
            f["trellis_over_no_mesh"].as_f64().is_some()
                && f["trellis_added_over_no_mesh"].as_f64().is_some(),
            "{key} has no ratio or added latency: {f}"
        );
    }
    let bulk = figure(&report, "cross-node", "bulk1.gbps");
    for c in configs {
        positive(bulk, c);
    }
    assert!(bulk["trellis_over_relay"].as_f64().is_some(), "{bulk}");
    assert!(bulk["trellis_over_peer"].as_f64().is_some(), "{bulk}");

    // Ping-pong: a rate and latency in every configuration.
    for key in ["pingpong.per_s", "pingpong.p50_us", "pingpong.p99_us"] {
        let f = figure(&report, "same-node", key);
        for c in configs {
            positive(f, c);
        }
    }

    // CPU: the machine worked in every configuration. Ping-pong keeps a core busy, so its
    // machine figure is positive everywhere; the light request-response test may round to
    // zero ticks of /proc/stat, so it only has to be recorded. The Trellis eBPF programs ran
    // (their run time is counted on top of the agents'), and no other configuration has any.
    let busy = figure(&report, "same-node", "pingpong.machine_vcpu.busy");
    for c in configs {
        positive(busy, c);
    }
    let rr_busy = figure(&report, "same-node", "rr.machine_vcpu.busy");
    for c in configs {
        let v = rr_busy[c].as_f64().unwrap_or(f64::NAN);
        assert!(v >= 0.0, "{c} has no machine figure in {rr_busy}");
    }
    let ebpf = figure(&report, "same-node", "rr.machine_vcpu.ebpf");
    positive(ebpf, "trellis");
    for c in ["no_mesh", "relay", "peer"] {
        assert!(ebpf[c].is_null(), "{c} has an eBPF figure: {ebpf}");
    }
    let with_ebpf = figure(&report, "same-node", "rr.vcpu_per_krps_with_ebpf");
    assert!(
        positive(with_ebpf, "trellis")
            > positive(figure(&report, "same-node", "rr.vcpu_per_krps"), "trellis"),
        "{with_ebpf}"
    );

    // Traffic crossed the proxies: they spent CPU on it. Without a mesh there is no proxy.
    for (scenario, key) in [
        ("same-node", "rr.vcpu_per_krps"),
        ("cross-node", "bulk1.gbit_per_cpu_s"),
    ] {
        let f = figure(&report, scenario, key);
        assert!(f["no_mesh"].is_null(), "no-mesh has a proxy figure: {f}");
        positive(f, "relay");
        positive(f, "trellis");
        positive(f, "peer");
    }
    let rss = figure(&report, "both nodes", "rss.idle_mib");
    positive(rss, "relay");
    positive(rss, "trellis");
    positive(rss, "peer");
    positive(figure(&report, "both nodes", "idle_conn_bytes"), "trellis");

    // HTTP: latency in no mesh, Trellis at L4 and through the waypoint, with the added
    // latency against no mesh; the agents spent CPU in both mesh configurations, the waypoint
    // in its own; every request was answered 200 (no `http.failed` row).
    let l7 = ["no_mesh", "trellis", "waypoint"];
    for key in ["http.p50_us", "http.p99_us", "http.max_us"] {
        let f = figure(&report, "cross-node", key);
        for c in l7 {
            positive(f, c);
        }
        assert!(f["relay"].is_null(), "the relay ran the HTTP test: {f}");
        assert!(f["peer"].is_null(), "the peer ran the HTTP test: {f}");
        for added in ["trellis_added_over_no_mesh", "waypoint_added_over_no_mesh"] {
            assert!(f[added].as_f64().is_some(), "{key} has no {added}: {f}");
        }
    }
    let agents = figure(&report, "cross-node", "http.agents_cpu_s_per_kreq");
    assert!(agents["no_mesh"].is_null(), "{agents}");
    positive(agents, "trellis");
    positive(agents, "waypoint");
    let waypoint = figure(&report, "cross-node", "http.waypoint_cpu_s_per_kreq");
    assert!(waypoint["trellis"].is_null(), "{waypoint}");
    positive(waypoint, "waypoint");
    positive(
        figure(&report, "waypoint", "waypoint.rss_idle_mib"),
        "waypoint",
    );
    assert!(
        report["figures"]
            .as_array()
            .is_some_and(|f| f.iter().all(|f| f["key"] != "http.failed")),
        "some HTTP requests were not answered 200: {report:#}"
    );

    // Every run is in the report: 3 tests x 4 configurations (no mesh, relay, Trellis, peer)
    // and the HTTP test x 3 (no mesh, Trellis, waypoint), 1 round.
    assert_eq!(
        report["runs"].as_array().map(Vec::len),
        Some(15),
        "{report:#}"
    );
}
