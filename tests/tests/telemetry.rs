//! Telemetry as its consumers read it, end to end: the real Prometheus server (Debian's
//! `prometheus`) scrapes both agents and a waypoint while real traffic crosses the mesh, then
//!
//! - every `istio_*` series carries exactly Istio's standard label set ([`STANDARD`], plus
//!   [`L7_ONLY`] on the waypoint's), and no value is empty (Prometheus drops empty labels, so
//!   an empty value shows as a missing label);
//! - the query shapes of Istio's Grafana dashboards ([`ISTIO_DASHBOARD_QUERIES`]) and of
//!   Kiali's graph ([`KIALI_QUERIES`]) return the test's traffic, each group-by label present;
//! - a rollout (the backend pod replaced by another pod of the same Deployment) creates no new
//!   series: the workload label is the Deployment, not the pod.
//!
//! The workloads are Deployments as Kubernetes writes them: pods owned by a ReplicaSet named
//! `<deployment>-<pod-template-hash>`, with `app` and `version` labels. Prometheus runs in node
//! 0's namespace, on loopback, and scrapes the agents on their LAN metrics port and the
//! waypoint on its pod's.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use mesh_tests::{
    mesh::{
        METRICS_PORT, Mesh, MeshOptions, NAMESPACE, PodOwner,
        waypoint::{GATEWAY_NAME_LABEL, USE_WAYPOINT_LABEL, WAYPOINT_METRICS_PORT, Waypoint},
    },
    testbed::{Pod, Proc, RequestsOpts, Server, SpawnOptions, Testbed, e2e_gate},
};
use serde_json::Value;

mod waypoint_fixture;

use waypoint_fixture::{PORT, TARGET_PORT, WAIT, WAYPOINT};

/// The labels of every `istio_*` series (besides Prometheus's `__name__`, `instance`, `job`,
/// and a histogram bucket's `le`).
const STANDARD: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];
/// The waypoint's request series carry these too.
const L7_ONLY: [&str; 2] = ["response_code", "grpc_response_status"];

/// The metrics each reporter must have exposed.
const TCP_METRICS: [&str; 4] = [
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
];
const HTTP_METRICS: [&str; 10] = [
    "istio_requests_total",
    "istio_request_duration_milliseconds_bucket",
    "istio_request_duration_milliseconds_sum",
    "istio_request_duration_milliseconds_count",
    "istio_request_bytes_bucket",
    "istio_request_bytes_sum",
    "istio_request_bytes_count",
    "istio_response_bytes_bucket",
    "istio_response_bytes_sum",
    "istio_response_bytes_count",
];

/// Queries of the shapes Istio's Grafana dashboards (mesh, service, workload) use, and the
/// label (name, value) each must return a positive sample for.
const ISTIO_DASHBOARD_QUERIES: [(&str, (&str, &str)); 9] = [
    (
        r#"sum(rate(istio_requests_total{reporter=~"source|waypoint"}[1m])) by (destination_service, response_code)"#,
        ("destination_service", SERVICE_HOST),
    ),
    (
        r#"histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{reporter="waypoint"}[1m])) by (le, destination_workload))"#,
        ("destination_workload", "web"),
    ),
    (
        r#"sum(rate(istio_tcp_sent_bytes_total{reporter="destination"}[1m])) by (source_workload, destination_workload)"#,
        ("destination_workload", "db"),
    ),
    (
        r#"sum(rate(istio_requests_total{reporter="waypoint", destination_workload="web", destination_workload_namespace="default", response_code!~"5.*"}[1m])) by (source_workload, source_workload_namespace) / sum(rate(istio_requests_total{reporter="waypoint", destination_workload="web", destination_workload_namespace="default"}[1m])) by (source_workload, source_workload_namespace)"#,
        ("source_workload", "client"),
    ),
    (
        r#"sum(irate(istio_requests_total{reporter="waypoint", destination_service=~"web.default.svc.cluster.local"}[1m])) by (source_workload, source_workload_namespace, response_code, grpc_response_status)"#,
        ("source_workload", "client"),
    ),
    (
        r#"histogram_quantile(0.50, sum(irate(istio_request_bytes_bucket{reporter="waypoint", destination_service=~"web.default.svc.cluster.local"}[1m])) by (source_workload, source_workload_namespace, le))"#,
        ("source_workload", "client"),
    ),
    (
        r#"histogram_quantile(0.95, sum(irate(istio_response_bytes_bucket{reporter="waypoint", destination_workload="web"}[1m])) by (destination_canonical_service, destination_canonical_revision, le))"#,
        ("destination_canonical_revision", "v1"),
    ),
    (
        r#"sum(rate(istio_tcp_received_bytes_total{reporter="destination", destination_workload="db", destination_workload_namespace="default"}[1m])) by (source_workload, source_workload_namespace)"#,
        ("source_workload", "client"),
    ),
    (
        r#"sum(rate(istio_tcp_connections_opened_total{reporter="source", source_workload="client"}[1m])) by (destination_service, destination_service_namespace, connection_security_policy)"#,
        ("connection_security_policy", "mutual_tls"),
    ),
];

/// Kiali's graph groups by these (HTTP and gRPC); a series without one of them is skipped.
const KIALI_HTTP_GROUP_BY: &str = "source_cluster,source_workload_namespace,source_workload,source_canonical_service,source_canonical_revision,destination_cluster,destination_service_namespace,destination_service,destination_service_name,destination_workload_namespace,destination_workload,destination_canonical_service,destination_canonical_revision,request_protocol,response_code,grpc_response_status,response_flags";
/// ... and these for TCP.
const KIALI_TCP_GROUP_BY: &str = "source_cluster,source_workload_namespace,source_workload,source_canonical_service,source_canonical_revision,destination_cluster,destination_service_namespace,destination_service,destination_service_name,destination_workload_namespace,destination_workload,destination_canonical_service,destination_canonical_revision,response_flags";

/// Kiali's graph queries for the namespace: (metric, group-by, the destination workload whose
/// traffic it must show).
const KIALI_QUERIES: [(&str, &str, &str); 3] = [
    ("istio_requests_total", KIALI_HTTP_GROUP_BY, "web"),
    ("istio_tcp_sent_bytes_total", KIALI_TCP_GROUP_BY, "db"),
    ("istio_tcp_received_bytes_total", KIALI_TCP_GROUP_BY, "db"),
];

const SERVICE: &str = "web";
const SERVICE_HOST: &str = "web.default.svc.cluster.local";
const REQUESTS: usize = 40;
const BODY: u64 = 2048;
const PROMETHEUS_WAIT: Duration = Duration::from_secs(60);
const DB_PORT: u16 = 9000;
const TCP_BYTES: &str = "64K";

/// Two nodes of three pods: client (0, 0), waypoint (0, 1), the HTTP backend (1, 0), the pod
/// that replaces it in the rollout (1, 1), and a TCP sink reached directly (1, 2).
fn testbed() -> Testbed {
    Testbed::builder()
        .nodes(2)
        .pods_per_node(3)
        .build()
        .expect("testbed")
}

/// A pod of Deployment `deployment` (ReplicaSet `<deployment>-<hash>`), labelled as
/// Kubernetes labels it, running as the Deployment's service account.
fn deployment_pod(
    mesh: &mut Mesh<'_>,
    pod: &Pod,
    deployment: &str,
    hash: &str,
    extra: &[(&str, &str)],
    account: Option<&str>,
) {
    let mut labels = vec![("pod-template-hash", hash)];
    labels.extend_from_slice(extra);
    mesh.write_owned_pod(
        pod,
        NAMESPACE,
        &labels,
        PodOwner {
            kind: "ReplicaSet".into(),
            name: format!("{deployment}-{hash}"),
            service_account: account.map(str::to_owned),
        },
    )
    .expect("pod manifest");
}

/// An `l7` server on `pod:8080` answering with the pod's name, its connections kept for the
/// whole test.
fn serve(tb: &Testbed, pod: &Pod) -> Server {
    tb.spawn_server(
        pod,
        &[
            "--timeout-ms",
            "600000",
            "--listen",
            &format!("0.0.0.0:{TARGET_PORT}=l7"),
            "--name",
            &pod.name,
        ],
    )
    .expect("server")
}

/// The real Prometheus server, in node 0's namespace.
struct Prometheus<'tb> {
    tb: &'tb Testbed,
    addr: SocketAddr,
    process: Proc,
}

impl<'tb> Prometheus<'tb> {
    /// Starts it scraping `agents` and `waypoints` (host:port) every second; waits (bounded)
    /// until it answers.
    fn start(tb: &'tb Testbed, agents: &[SocketAddr], waypoints: &[SocketAddr]) -> Result<Self> {
        let dir = tb.scratch_dir().join("prometheus");
        std::fs::create_dir_all(dir.join("data"))?;
        let targets = |t: &[SocketAddr]| {
            t.iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n\
             - job_name: trellis-agents\n  static_configs:\n  - targets: [{}]\n\
             - job_name: trellis-waypoints\n  static_configs:\n  - targets: [{}]\n",
            targets(agents),
            targets(waypoints),
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        // A free loopback port in node 0's namespace.
        let port = tb.node(0).netns.run(|| -> Result<u16> {
            Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
                .local_addr()?
                .port())
        })??;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let process = tb.spawn(
            tb.node(0),
            &[
                "prometheus".to_owned(),
                format!("--config.file={}", config_path.display()),
                format!("--storage.tsdb.path={}", dir.join("data").display()),
                format!("--web.listen-address={addr}"),
                "--log.level=warn".to_owned(),
            ],
            SpawnOptions::new().name("prometheus"),
        )?;
        let mut prometheus = Self { tb, addr, process };
        let deadline = Instant::now() + PROMETHEUS_WAIT;
        loop {
            if !prometheus.process.is_running() {
                bail!("prometheus exited:\n{}", prometheus.process.stderr_text());
            }
            if prometheus
                .get("/-/ready")
                .is_ok_and(|(status, _)| status == 200)
            {
                return Ok(prometheus);
            }
            if Instant::now() > deadline {
                bail!(
                    "prometheus not ready after {PROMETHEUS_WAIT:?}:\n{}",
                    prometheus.process.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `GET path` (HTTP/1.0: the body ends with the connection, never chunked).
    fn get(&self, path: &str) -> Result<(u16, String)> {
        let addr = self.addr;
        let path = path.to_owned();
        self.tb
            .node(0)
            .netns
            .run(move || -> Result<(u16, String)> {
                let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
                let mut response = Vec::new();
                stream.take(64 * 1024 * 1024).read_to_end(&mut response)?;
                let text = String::from_utf8_lossy(&response);
                let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .context("no status")?;
                Ok((status, body.to_owned()))
            })?
    }

    /// `data` of an API call that succeeded.
    fn api(&self, path: &str) -> Result<Value> {
        let (status, body) = self.get(path)?;
        let v: Value =
            serde_json::from_str(&body).with_context(|| format!("{path}: {status} {body}"))?;
        ensure!(
            status == 200 && v["status"] == "success",
            "{path}: {status} {body}"
        );
        Ok(v["data"].clone())
    }

    /// The instant vector `promql` evaluates to: (labels, value) per sample.
    fn query(&self, promql: &str) -> Result<Vec<(BTreeMap<String, String>, f64)>> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(promql)))?;
        let result = data["result"].as_array().context("no result")?;
        result
            .iter()
            .map(|sample| {
                let labels: BTreeMap<String, String> =
                    serde_json::from_value(sample["metric"].clone())?;
                let value = sample["value"][1]
                    .as_str()
                    .context("no value")?
                    .parse::<f64>()?;
                Ok((labels, value))
            })
            .collect()
    }

    /// The sum of `promql`'s samples (0 when it returns none).
    fn value(&self, promql: &str) -> Result<f64> {
        Ok(self.query(promql)?.iter().map(|(_, v)| v).sum())
    }

    /// Polls (bounded) until `promql` sums to at least `at_least`.
    fn wait_value(&self, promql: &str, at_least: f64) -> Result<f64> {
        let deadline = Instant::now() + PROMETHEUS_WAIT;
        loop {
            let value = self.value(promql)?;
            if value >= at_least {
                return Ok(value);
            }
            if Instant::now() > deadline {
                bail!(
                    "{promql} is {value}, not {at_least} or more, after {PROMETHEUS_WAIT:?}; \
                     series: {:?}; targets: {}",
                    self.series(
                        r#"{__name__=~"istio_tcp_connections_opened_total|istio_requests_total"}"#
                    ),
                    self.api("/api/v1/targets").unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The label sets of every series `matcher` selects.
    fn series(&self, matcher: &str) -> Result<Vec<BTreeMap<String, String>>> {
        let data = self.api(&format!("/api/v1/series?match[]={}", encode(matcher)))?;
        Ok(serde_json::from_value(data)?)
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        self.process.kill().ok();
    }
}

/// Percent-encodes a query parameter (everything but RFC 3986's unreserved characters).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Whether the `prometheus` binary runs; without it the test skips (and fails under
/// `MESH_E2E=require`).
fn prometheus_gate(test: &str) -> bool {
    let found = std::process::Command::new("prometheus")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("MESH_E2E").as_deref() != Ok("require"),
            "MESH_E2E=require but {test} cannot run: no `prometheus` binary (.ci/setup installs \
             Debian's package)"
        );
        eprintln!("skipping {test}: no `prometheus` binary");
    }
    found
}

/// `count` POSTs of [`BODY`] bytes from `client` to `vip`; asserts they were all answered
/// 200 by `server`.
fn traffic(tb: &Testbed, client: &Pod, vip: SocketAddr, server: &Pod, count: usize) {
    let summary = tb
        .requests(
            client,
            vip,
            &RequestsOpts {
                method: "POST".into(),
                path: "/orders".into(),
                body_bytes: BODY,
                count,
                ..Default::default()
            },
        )
        .expect("requests");
    assert_eq!(
        summary["statuses"]["200"].as_u64(),
        Some(count as u64),
        "{summary}"
    );
    assert_eq!(
        summary["servers"][&server.name].as_u64(),
        Some(count as u64),
        "{summary}"
    );
}

/// Waits (bounded) until node `node`'s agent and the waypoint send Service `web` to `pod`
/// alone, and know every workload of `names` by its owner.
fn wait_endpoint(mesh: &Mesh<'_>, waypoint: &Waypoint<'_>, pod: &Pod, names: &[&str]) {
    let ready = |dump: &Value| {
        let service = dump["services"].as_array().and_then(|services| {
            services
                .iter()
                .find(|s| s["name"] == SERVICE && s["namespace"] == NAMESPACE)
        });
        let endpoints_ok = service.is_some_and(|s| {
            s["endpoints"]
                .as_array()
                .is_some_and(|e| e.len() == 1 && e[0]["ip"] == pod.ip4.to_string().as_str())
        });
        let workloads: BTreeSet<&str> = dump["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| w["telemetry"]["workload_name"].as_str())
            .collect();
        endpoints_ok && names.iter().all(|n| workloads.contains(n))
    };
    for node in 0..2 {
        mesh.wait_config(node, WAIT, ready)
            .unwrap_or_else(|e| panic!("node {node}: {e:#}"));
    }
    waypoint.wait_dump(WAIT, ready).expect("waypoint state");
}

/// The series of every `istio_*` metric, by name.
fn istio_series(prom: &Prometheus<'_>) -> Vec<BTreeMap<String, String>> {
    prom.series(r#"{__name__=~"istio_.+"}"#).expect("series")
}

/// Series per workload: `(label, workload) -> count` over every `istio_*` series.
fn series_per_workload(series: &[BTreeMap<String, String>]) -> BTreeMap<(String, String), usize> {
    let mut counts = BTreeMap::new();
    for s in series {
        for label in ["source_workload", "destination_workload"] {
            if let Some(w) = s.get(label) {
                *counts.entry((label.to_owned(), w.clone())).or_default() += 1;
            }
        }
    }
    counts
}

#[test]
fn prometheus_reads_istio_labels_dashboard_and_kiali_queries_across_a_rollout() {
    let test = "prometheus_reads_istio_labels_dashboard_and_kiali_queries_across_a_rollout";
    if !e2e_gate(test) || !prometheus_gate(test) {
        return;
    }
    let tb = testbed();
    let mut mesh = Mesh::start(
        &tb,
        &MeshOptions {
            control_plane: true,
            metrics_on_lan: true,
            ..Default::default()
        },
    )
    .expect("mesh");
    let (client, waypoint_pod, web_a, web_b) =
        (tb.pod(0, 0), tb.pod(0, 1), tb.pod(1, 0), tb.pod(1, 1));
    let waypoint = mesh
        .start_waypoint(WAYPOINT, waypoint_pod)
        .expect("waypoint starts");
    // The waypoint's pod as its Deployment's (its account stays the one it authenticates as).
    mesh.write_owned_pod(
        waypoint_pod,
        NAMESPACE,
        &[
            (GATEWAY_NAME_LABEL, WAYPOINT),
            ("pod-template-hash", "6d4b9c"),
        ],
        PodOwner {
            kind: "ReplicaSet".into(),
            name: format!("{WAYPOINT}-6d4b9c"),
            service_account: None,
        },
    )
    .expect("waypoint pod");
    mesh.set_namespace_label(NAMESPACE, USE_WAYPOINT_LABEL, Some(WAYPOINT))
        .expect("label namespace");
    deployment_pod(
        &mut mesh,
        client,
        "client",
        "7f9c5d",
        &[("app", "client"), ("version", "v3")],
        None,
    );
    let web_labels = [("app", "web"), ("version", "v1")];
    deployment_pod(&mut mesh, web_a, "web", "5d8f7b", &web_labels, Some("web"));
    let _servers = [serve(&tb, web_a), serve(&tb, web_b)];
    let db = tb.pod(1, 2);
    deployment_pod(
        &mut mesh,
        db,
        "db",
        "84c7f6",
        &[("app", "db"), (USE_WAYPOINT_LABEL, "none")],
        Some("db"),
    );
    let _db_server = tb
        .spawn_server(db, &["--listen", &format!("0.0.0.0:{DB_PORT}=sink")])
        .expect("db server");
    let vip_ip = Ipv4Addr::new(10, 96, 0, 40);
    let vip = SocketAddr::from((vip_ip, PORT));
    mesh.write_service(
        SERVICE,
        &[vip_ip.into()],
        &[(PORT, TARGET_PORT)],
        &[(web_a, true)],
        None,
    )
    .expect("service");
    wait_endpoint(&mesh, &waypoint, web_a, &["client", "web", "db", WAYPOINT]);

    let agents: Vec<SocketAddr> = (0..2)
        .map(|n| SocketAddr::new(tb.node(n).lan_ip4.into(), METRICS_PORT))
        .collect();
    let waypoints = [SocketAddr::new(
        waypoint_pod.ip4.into(),
        WAYPOINT_METRICS_PORT,
    )];
    let prom = Prometheus::start(&tb, &agents, &waypoints).expect("prometheus");

    // Two rounds, each waited for in Prometheus: rates need a counter seen to increase.
    let at_waypoint = r#"sum(istio_requests_total{reporter="waypoint", destination_workload="web", source_workload="client", response_code="200"})"#;
    let tcp_at_web = r#"sum(istio_tcp_connections_opened_total{reporter="destination", destination_workload="web", source_workload="waypoint"})"#;
    // The agents count a connection's bytes when it closes: the TCP rounds are connections of
    // their own, sent straight to db (not through the waypoint, which keeps its connections).
    let db_addr = SocketAddr::new(db.ip4.into(), DB_PORT);
    let tcp_at_db = r#"sum(istio_tcp_connections_closed_total{reporter="destination", destination_workload="db", source_workload="client"})"#;
    for round in 1..=2 {
        traffic(&tb, client, vip, web_a, REQUESTS);
        let sent = tb
            .run(
                client,
                &[
                    "pod-app",
                    "send",
                    "--to",
                    &db_addr.to_string(),
                    "--bytes",
                    TCP_BYTES,
                ],
                WAIT,
            )
            .and_then(|o| o.ok_json())
            .expect("tcp send");
        assert_eq!(sent["ok"], true, "{sent}");
        prom.wait_value(at_waypoint, (round * REQUESTS) as f64)
            .expect("requests scraped");
        prom.wait_value(tcp_at_db, round as f64)
            .expect("connections scraped");
        prom.wait_value(tcp_at_web, 1.0)
            .expect("the waypoint's connection scraped");
    }

    // The exact label set of every series.
    let series = istio_series(&prom);
    let names: BTreeSet<&str> = series
        .iter()
        .filter_map(|s| s.get("__name__").map(String::as_str))
        .collect();
    for name in TCP_METRICS.iter().chain(&HTTP_METRICS) {
        assert!(names.contains(name), "no {name} series; got {names:?}");
    }
    for s in &series {
        let name = s["__name__"].as_str();
        let mut expected: BTreeSet<&str> = STANDARD.into_iter().collect();
        expected.extend(["__name__", "instance", "job"]);
        if !name.starts_with("istio_tcp") {
            expected.extend(L7_ONLY);
        }
        if name.ends_with("_bucket") {
            expected.insert("le");
        }
        let got: BTreeSet<&str> = s.keys().map(String::as_str).collect();
        assert_eq!(got, expected, "labels of {s:?}");
        assert!(s.values().all(|v| !v.is_empty()), "{s:?}");
        let reporters: &[&str] = if name.starts_with("istio_tcp") {
            &["source", "destination"]
        } else {
            &["waypoint"]
        };
        assert!(reporters.contains(&s["reporter"].as_str()), "{s:?}");
    }
    // The values of the client -> web requests, as Istio derives them.
    let request = series
        .iter()
        .find(|s| {
            s["__name__"] == "istio_requests_total"
                && s["source_workload"] == "client"
                && s["destination_workload"] == "web"
        })
        .expect("the client's requests to web");
    for (label, value) in [
        ("source_workload_namespace", NAMESPACE),
        ("source_app", "client"),
        ("source_version", "v3"),
        ("source_canonical_service", "client"),
        ("source_canonical_revision", "v3"),
        ("source_cluster", "Kubernetes"),
        (
            "source_principal",
            &format!("spiffe://cluster.local/ns/default/sa/{}", client.name),
        ),
        ("destination_app", "web"),
        ("destination_canonical_service", "web"),
        ("destination_canonical_revision", "v1"),
        ("destination_cluster", "Kubernetes"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/web",
        ),
        ("destination_service", SERVICE_HOST),
        ("destination_service_name", SERVICE),
        ("destination_service_namespace", NAMESPACE),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("response_flags", "-"),
        ("grpc_response_status", "unknown"),
        ("connection_security_policy", "mutual_tls"),
    ] {
        assert_eq!(request[label], value, "{label} in {request:?}");
    }
    // Request and response sizes are the bodies' (the pattern sent, the server's answer).
    let request_bytes = prom
        .value(r#"sum(istio_request_bytes_sum{reporter="waypoint", destination_workload="web"})"#)
        .expect("request bytes");
    assert_eq!(request_bytes, (2 * REQUESTS) as f64 * BODY as f64);
    let response_bytes = prom
        .value(r#"sum(istio_response_bytes_sum{reporter="waypoint", destination_workload="web"})"#)
        .expect("response bytes");
    assert!(response_bytes > 0.0, "{response_bytes}");

    // Istio's dashboards.
    for (promql, (label, value)) in ISTIO_DASHBOARD_QUERIES {
        let result = prom.query(promql).expect("query");
        assert!(
            result
                .iter()
                .any(|(l, v)| l.get(label).map(String::as_str) == Some(value) && *v > 0.0),
            "{promql} returned {result:?}"
        );
        eprintln!("checked: {promql}");
    }
    // Kiali's graph: every series it reads has every label it groups by.
    for (metric, group_by, destination) in KIALI_QUERIES {
        let promql = format!(
            r#"sum(rate({metric}{{reporter=~"source|destination|waypoint",source_workload_namespace="{NAMESPACE}"}}[1m])) by ({group_by})"#
        );
        let result = prom.query(&promql).expect("query");
        assert!(
            result.iter().any(|(l, v)| {
                *v > 0.0 && l.get("destination_workload").map(String::as_str) == Some(destination)
            }),
            "{promql} returned {result:?}"
        );
        for (labels, _) in &result {
            for label in group_by.split(',') {
                assert!(
                    labels.get(label).is_some_and(|v| !v.is_empty()),
                    "{promql}: {label} missing from {labels:?}"
                );
            }
        }
        eprintln!("checked: {promql}");
    }

    // The rollout: the backend pod is replaced by another pod of the same Deployment (another
    // ReplicaSet hash would be a new revision; the same one is a pod rescheduled).
    let before = series_per_workload(&istio_series(&prom));
    mesh.delete_pod(web_a).expect("delete the old pod");
    deployment_pod(&mut mesh, web_b, "web", "5d8f7b", &web_labels, Some("web"));
    mesh.write_service(
        SERVICE,
        &[vip_ip.into()],
        &[(PORT, TARGET_PORT)],
        &[(web_b, true)],
        None,
    )
    .expect("service moves to the new pod");
    wait_endpoint(&mesh, &waypoint, web_b, &["client", "web", WAYPOINT]);
    let opened_before = prom.value(tcp_at_web).expect("opened");
    traffic(&tb, client, vip, web_b, REQUESTS);
    prom.wait_value(at_waypoint, (3 * REQUESTS) as f64)
        .expect("requests after the rollout scraped");
    prom.wait_value(tcp_at_web, opened_before + 1.0)
        .expect("connections to the new pod scraped");
    let series_after = istio_series(&prom);
    let after = series_per_workload(&series_after);
    eprintln!("series per workload before the rollout: {before:?}");
    eprintln!("series per workload after the rollout:  {after:?}");
    assert_eq!(after, before, "the rollout created series");
    for pod in [web_a, web_b] {
        assert!(
            !series_after
                .iter()
                .any(|s| s.values().any(|v| *v == pod.name)),
            "a series names pod {}",
            pod.name
        );
    }

    // One scrape of each, for the record.
    for (what, text) in [
        ("agent on node 1", mesh.metrics(1).expect("agent metrics")),
        ("waypoint", waypoint.metrics().expect("waypoint metrics")),
    ] {
        eprintln!("--- {what}");
        let mut shown: BTreeMap<String, usize> = BTreeMap::new();
        for line in text.lines().filter(|l| l.starts_with("istio_")) {
            let name = line.split(['{', ' ']).next().unwrap_or_default().to_owned();
            let n = shown.entry(name).or_default();
            if *n < 2 {
                eprintln!("{line}");
            }
            *n += 1;
        }
    }
}
