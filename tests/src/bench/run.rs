//! The orchestrator: testbed, servers, the configurations round by round, and the CPU and
//! memory samples of the proxy processes around each load run.
//!
//! Topology (ports fixed so the relay maps are static):
//!
//! ```text
//! client pod-0-0 ──────────────────────────────────────────► server pod-1-0  (cross-node)
//!                └─────────────────────────────────────────► server pod-0-1  (same-node)
//! relay floor:  pod-0-0 -> relay A (node 0 gateway :1700x) -> relay B (node 1 LAN :1700x) -> pod-1-0
//!               pod-0-0 -> relay A (node 0 gateway :1701x) -> pod-0-1
//! Trellis:      pod-0-0 dials the server pod; the eBPF redirect and HBONE do the rest
//! waypoint:     pod-0-0 dials Service VIP 10.96.0.80:80 (-> pod-1-0:5004), whose namespace
//!               uses the waypoint in pod-1-1: agent 0 -> HBONE -> waypoint (HTTP parsed,
//!               routed) -> HBONE as the waypoint -> agent 1 -> pod-1-0   (HTTP test only)
//! ```
//!
//! The HTTP test (`cross-node-http`, alias `l7`) runs in no mesh, Trellis (L4: agents only) and
//! the waypoint configuration (control-plane mode: controller, agents on its feed, and
//! `mesh-node waypoint`); the other tests run in no mesh, the relay floor and Trellis. A
//! configuration none of the selected tests runs in is not started at all.
//!
//! Trellis is torn down after each of its turns with `mesh-node agent --uninstall`, so the
//! next no-mesh turn runs with no program attached at all.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::mesh::waypoint::{USE_WAYPOINT_LABEL, Waypoint};
use crate::mesh::{Mesh, MeshOptions, NAMESPACE};
use crate::testbed::{Proc, SpawnOptions, Testbed};

use super::report::{self, Run};

/// Server ports in the server pods.
const SINK_PORT: u16 = 5001;
const ECHO_PORT: u16 = 5002;
const ONE_PORT: u16 = 5003;
const HTTP_PORT: u16 = 5004;
/// Every server port, in the order the relay maps them (relay port = base + index).
const SERVER_PORTS: [(u16, &str); 4] = [
    (SINK_PORT, "sink"),
    (ECHO_PORT, "echo"),
    (ONE_PORT, "one"),
    (HTTP_PORT, "http"),
];
/// The waypoint configuration: the Gateway's name, the Service the HTTP test dials through it
/// (a VIP from the range no testbed route uses, see `mesh::service`) and its port.
const WAYPOINT_NAME: &str = "bench-waypoint";
const HTTP_SERVICE: &str = "bench-http";
const HTTP_VIP: [u8; 4] = [10, 96, 0, 80];
const HTTP_SERVICE_PORT: u16 = 80;
/// How long the waypoint configuration may take to route the Service once everything is up
/// (the controller's feed reaching agent 0 and the waypoint).
const WAYPOINT_ROUTE_TIMEOUT: Duration = Duration::from_secs(30);
/// Relay ports: cross-node chain (relay A and B) and same-node (relay A only).
const RELAY_CROSS_BASE: u16 = 17000;
const RELAY_SAME_BASE: u16 = 17010;
/// How long a server or relay may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on one load run beyond its nominal duration (connects, drains, process start).
const RUN_SLACK: Duration = Duration::from_secs(60);
/// /proc reports CPU times in USER_HZ, which the kernel ABI fixes at 100 on Linux.
const USER_HZ: f64 = 100.0;

/// Request/response parameters (issue 6: 1 KiB at 1000 rps over 4 connections).
pub const RR_RATE: u64 = 1000;
pub const RR_CONNS: usize = 4;
pub const RR_SIZE: usize = 1024;
/// HTTP test (issue 7): GETs of a 1 KiB body ([`super::serve::HTTP_BODY`]) at 1000 rps over
/// 4 keep-alive connections, like the request/response test.
pub const HTTP_RATE: u64 = 1000;
pub const HTTP_CONNS: usize = 4;
/// Concurrent loops of the connection-rate test.
pub const CONNECT_LOOPS: usize = 4;
/// Established, silent connections held open to measure what an idle connection costs the
/// proxies (below the load generator's default descriptor limit of 1024).
pub const IDLE_CONNS: usize = 500;
/// How long the load generator holds them; the sample is taken as soon as they are up.
const IDLE_HOLD: Duration = Duration::from_secs(30);

/// What `bench run` does.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Short durations (a couple of minutes in all).
    pub quick: bool,
    /// Rounds; every configuration runs every selected test once per round.
    pub rounds: usize,
    /// Where the JSON report goes.
    pub json: PathBuf,
    /// Only tests whose `scenario-test` name contains one of these (all when empty).
    pub only: Vec<String>,
    /// The Trellis configurations run with the same-node fast path on.
    pub fast_path: bool,
}

/// The ways the same traffic crosses the testbed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Config {
    NoMesh,
    Relay,
    /// Trellis at L4: the agents only (static configuration).
    Trellis,
    /// Trellis with a waypoint on the path (control-plane mode); HTTP test only.
    Waypoint,
}

impl Config {
    pub const ALL: [Config; 4] = [
        Config::NoMesh,
        Config::Relay,
        Config::Trellis,
        Config::Waypoint,
    ];

    /// The JSON key.
    pub fn key(self) -> &'static str {
        match self {
            Config::NoMesh => "no_mesh",
            Config::Relay => "relay",
            Config::Trellis => "trellis",
            Config::Waypoint => "waypoint",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    CrossNode,
    SameNode,
}

impl Scenario {
    pub const ALL: [Scenario; 2] = [Scenario::CrossNode, Scenario::SameNode];

    pub fn key(self) -> &'static str {
        match self {
            Scenario::CrossNode => "cross-node",
            Scenario::SameNode => "same-node",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Test {
    Bulk1,
    Bulk8,
    Rr,
    Connect,
    /// HTTP/1.1 GETs through the L7 path (issue 7).
    Http,
}

impl Test {
    pub const ALL: [Test; 5] = [
        Test::Bulk1,
        Test::Bulk8,
        Test::Rr,
        Test::Connect,
        Test::Http,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Test::Bulk1 => "bulk1",
            Test::Bulk8 => "bulk8",
            Test::Rr => "rr",
            Test::Connect => "connect",
            Test::Http => "http",
        }
    }

    /// Another name `--only` matches (`cross-node-l7`).
    fn alias(self) -> Option<&'static str> {
        match self {
            Test::Http => Some("l7"),
            _ => None,
        }
    }

    fn port(self) -> u16 {
        match self {
            Test::Bulk1 | Test::Bulk8 => SINK_PORT,
            Test::Rr => ECHO_PORT,
            Test::Connect => ONE_PORT,
            Test::Http => HTTP_PORT,
        }
    }

    /// The configurations the test runs in: the byte-stream tests compare Trellis with the
    /// relay floor; the HTTP test compares Trellis at L4 with Trellis through a waypoint (a
    /// waypoint speaks HTTP only, and the relay adds nothing an L4 comparison lacks).
    pub fn runs_in(self, config: Config) -> bool {
        match self {
            Test::Http => config != Config::Relay,
            _ => config != Config::Waypoint,
        }
    }

    /// The scenarios the test runs in: a waypoint is measured cross-node only (on one node
    /// the waypoint's two hops would stay on that node, which no deployment can count on).
    fn runs_on(self, scenario: Scenario) -> bool {
        self != Test::Http || scenario == Scenario::CrossNode
    }
}

/// How long each test measures.
#[derive(Clone, Copy, Debug)]
struct Durations {
    bulk: Duration,
    rr: Duration,
    connect: Duration,
    http: Duration,
}

impl Durations {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                bulk: Duration::from_secs(1),
                rr: Duration::from_secs(2),
                connect: Duration::from_secs(1),
                http: Duration::from_secs(2),
            }
        } else {
            Self {
                bulk: Duration::from_secs(5),
                rr: Duration::from_secs(10),
                connect: Duration::from_secs(5),
                http: Duration::from_secs(10),
            }
        }
    }

    fn of(self, test: Test) -> Duration {
        match test {
            Test::Bulk1 | Test::Bulk8 => self.bulk,
            Test::Rr => self.rr,
            Test::Connect => self.connect,
            Test::Http => self.http,
        }
    }
}

/// The tests `only` selects, in a fixed order.
pub fn select(only: &[String]) -> Result<Vec<(Scenario, Test)>> {
    let all = Scenario::ALL
        .iter()
        .flat_map(|&s| Test::ALL.iter().map(move |&t| (s, t)));
    let selected: Vec<_> = all
        .filter(|(s, t)| t.runs_on(*s))
        .filter(|(s, t)| {
            let names: Vec<String> = std::iter::once(t.key())
                .chain(t.alias())
                .map(|k| format!("{}-{k}", s.key()))
                .collect();
            only.is_empty()
                || only
                    .iter()
                    .any(|o| names.iter().any(|n| n.contains(o.as_str())))
        })
        .collect();
    if selected.is_empty() {
        bail!(
            "--only {only:?} selects no test; names are SCENARIO-TEST with SCENARIO cross-node or \
             same-node and TEST bulk1, bulk8, rr or connect, or cross-node-http (alias \
             cross-node-l7)"
        );
    }
    Ok(selected)
}

/// Runs the benchmark, prints the table and writes the JSON report; returns the report.
pub fn run(opts: &RunOptions) -> Result<Value> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the bench builds network namespaces and attaches eBPF programs: run it as root"
    );
    ensure!(opts.rounds > 0, "--rounds must be at least 1");
    let selected = select(&opts.only)?;
    let durations = Durations::new(opts.quick);
    let exe = std::env::current_exe().context("finding the bench binary")?;
    let exe = exe.to_string_lossy().into_owned();

    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(2)
        .build()
        .context("building the testbed")?;
    let listen = |ip: IpAddr| {
        SERVER_PORTS.map(|(port, mode)| format!("{}={mode}", SocketAddr::new(ip, port)))
    };
    let mut servers = Vec::new();
    for pod in [tb.pod(1, 0), tb.pod(0, 1)] {
        let mut cmd = vec![exe.clone(), "serve".into()];
        for l in listen(pod.ip4.into()) {
            cmd.extend(["--listen".into(), l]);
        }
        servers.push(spawn_ready(
            &tb,
            pod,
            &cmd,
            &format!("server-{}", pod.name),
        )?);
    }

    // Only the configurations a selected test runs in; the order rotates per round.
    let configs: Vec<Config> = Config::ALL
        .into_iter()
        .filter(|c| selected.iter().any(|(_, t)| t.runs_in(*c)))
        .collect();
    let mut runs: Vec<Run> = Vec::new();
    let mut memory: Vec<Value> = Vec::new();
    for round in 0..opts.rounds {
        for c in 0..configs.len() {
            let config = configs[(round + c) % configs.len()];
            let active = Active::start(&tb, config, &exe, opts.fast_path)
                .with_context(|| format!("starting {}", config.key()))?;
            let pids = active.proxy_pids();
            let waypoint_pids: Vec<u32> = active.waypoint_pid().into_iter().collect();
            let rss_idle = rss_bytes(&pids, "VmRSS:")?;
            let anon_idle = rss_bytes(&pids, "RssAnon:")?;
            let waypoint_rss_idle = rss_bytes(&waypoint_pids, "VmRSS:")?;
            let waypoint_anon_idle = rss_bytes(&waypoint_pids, "RssAnon:")?;
            // The idle-connection cost is the agents' (or relays'); the waypoint configuration
            // runs the same agents and carries HTTP only.
            let idle_conn_bytes = if pids.is_empty() || config == Config::Waypoint {
                None
            } else {
                Some(
                    idle_connection_cost(&tb, &exe, config, &pids)
                        .with_context(|| format!("round {} {} idle", round + 1, config.key()))?,
                )
            };
            for &(scenario, test) in selected.iter().filter(|(_, t)| t.runs_in(config)) {
                let run = measure(&tb, &exe, config, scenario, test, durations, &active)
                    .with_context(|| {
                        format!(
                            "round {} {} {}-{}",
                            round + 1,
                            config.key(),
                            scenario.key(),
                            test.key()
                        )
                    })?;
                eprintln!(
                    "bench: round {}/{} {:<8} {:<10} {:<8} {}",
                    round + 1,
                    opts.rounds,
                    config.key(),
                    scenario.key(),
                    test.key(),
                    run.summary()
                );
                runs.push(Run { round, ..run });
            }
            let rss_after = rss_bytes(&pids, "VmRSS:")?;
            let anon_after = rss_bytes(&pids, "RssAnon:")?;
            if !pids.is_empty() {
                let mut sample = json!({
                    "round": round,
                    "config": config.key(),
                    "rss_idle_bytes": rss_idle,
                    "rss_after_load_bytes": rss_after,
                    "rss_anon_idle_bytes": anon_idle,
                    "rss_anon_after_load_bytes": anon_after,
                    "idle_conn_bytes": idle_conn_bytes,
                });
                if !waypoint_pids.is_empty() {
                    sample["waypoint_rss_idle_bytes"] = json!(waypoint_rss_idle);
                    sample["waypoint_rss_anon_idle_bytes"] = json!(waypoint_anon_idle);
                    sample["waypoint_rss_after_load_bytes"] =
                        json!(rss_bytes(&waypoint_pids, "VmRSS:")?);
                    sample["waypoint_rss_anon_after_load_bytes"] =
                        json!(rss_bytes(&waypoint_pids, "RssAnon:")?);
                }
                memory.push(sample);
            }
            active
                .stop(&tb)
                .with_context(|| format!("stopping {}", config.key()))?;
        }
    }
    drop(servers);

    let settings = json!({
        "quick": opts.quick,
        "fast_path": opts.fast_path,
        "rounds": opts.rounds,
        "bulk_secs": durations.bulk.as_secs_f64(),
        "rr_secs": durations.rr.as_secs_f64(),
        "connect_secs": durations.connect.as_secs_f64(),
        "rr_rate": RR_RATE,
        "rr_conns": RR_CONNS,
        "rr_size": RR_SIZE,
        "connect_loops": CONNECT_LOOPS,
        "http_secs": durations.http.as_secs_f64(),
        "http_rate": HTTP_RATE,
        "http_conns": HTTP_CONNS,
        "http_body_bytes": super::serve::HTTP_BODY,
        "bench_build": if cfg!(debug_assertions) { "debug" } else { "release" },
    });
    let report = report::build(&runs, &memory, settings, machine())?;
    println!("{}", report::table(&report));
    write_json(&opts.json, &report)?;
    eprintln!("bench: wrote {}", opts.json.display());
    Ok(report)
}

/// One load run with the proxies' CPU time around it (the waypoint's apart from the agents').
fn measure(
    tb: &Testbed,
    exe: &str,
    config: Config,
    scenario: Scenario,
    test: Test,
    durations: Durations,
    active: &Active<'_>,
) -> Result<Run> {
    let pids = active.proxy_pids();
    let waypoint_pids: Vec<u32> = active.waypoint_pid().into_iter().collect();
    let to = target(tb, config, scenario, test).to_string();
    let duration = durations.of(test);
    let secs = format!("{}", duration.as_secs_f64());
    let mut cmd: Vec<String> = vec![exe.into(), "load".into()];
    match test {
        Test::Bulk1 | Test::Bulk8 => {
            let streams = if test == Test::Bulk1 { "1" } else { "8" };
            cmd.extend(["bulk".into(), "--streams".into(), streams.into()]);
        }
        Test::Rr => cmd.extend([
            "rr".into(),
            "--conns".into(),
            RR_CONNS.to_string(),
            "--rate".into(),
            RR_RATE.to_string(),
            "--size".into(),
            RR_SIZE.to_string(),
        ]),
        Test::Connect => cmd.extend([
            "connect".into(),
            "--conns".into(),
            CONNECT_LOOPS.to_string(),
        ]),
        Test::Http => cmd.extend([
            "http".into(),
            "--conns".into(),
            HTTP_CONNS.to_string(),
            "--rate".into(),
            HTTP_RATE.to_string(),
        ]),
    }
    cmd.extend(["--to".into(), to, "--secs".into(), secs]);

    let cpu_before = cpu_seconds(&pids)?;
    let waypoint_before = cpu_seconds(&waypoint_pids)?;
    let started = Instant::now();
    let out = tb.run(tb.pod(0, 0), &cmd, duration + RUN_SLACK)?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(&pids)? - cpu_before;
    let waypoint_cpu = cpu_seconds(&waypoint_pids)? - waypoint_before;
    let result = out.ok_json()?;
    Ok(Run {
        round: 0,
        config,
        scenario,
        test,
        wall_secs: wall,
        proxy_cpu_secs: (!pids.is_empty()).then_some(cpu),
        waypoint_cpu_secs: (!waypoint_pids.is_empty()).then_some(waypoint_cpu),
        result,
    })
}

/// Anonymous memory the proxies hold per established, silent cross-node connection: the
/// growth of their anonymous RSS while [`IDLE_CONNS`] such connections are open, divided by
/// their number. Run on freshly started proxies, so freed memory the allocator keeps from
/// earlier tests cannot hide the cost.
fn idle_connection_cost(tb: &Testbed, exe: &str, config: Config, pids: &[u32]) -> Result<f64> {
    let to = target(tb, config, Scenario::CrossNode, Test::Rr).to_string();
    let before = rss_bytes(pids, "RssAnon:")?;
    let cmd: Vec<String> = vec![
        exe.into(),
        "load".into(),
        "hold".into(),
        "--to".into(),
        to,
        "--conns".into(),
        IDLE_CONNS.to_string(),
        "--secs".into(),
        IDLE_HOLD.as_secs().to_string(),
    ];
    let mut proc = tb.spawn(tb.pod(0, 0), &cmd, SpawnOptions::new().name("idle-conns"))?;
    proc.wait_for_stdout_line(RUN_SLACK, |l| l.contains(super::load::HOLDING))?;
    let held = rss_bytes(pids, "RssAnon:")?;
    // Ending it early closes the connections before the next test; its exit status does not
    // matter.
    proc.kill()?;
    Ok((held as f64 - before as f64) / IDLE_CONNS as f64)
}

/// Where the client dials for `test` in `scenario` under `config`.
fn target(tb: &Testbed, config: Config, scenario: Scenario, test: Test) -> SocketAddr {
    let server = match scenario {
        Scenario::CrossNode => tb.pod(1, 0),
        Scenario::SameNode => tb.pod(0, 1),
    };
    match config {
        Config::Waypoint if test == Test::Http => SocketAddr::from((HTTP_VIP, HTTP_SERVICE_PORT)),
        Config::NoMesh | Config::Trellis | Config::Waypoint => {
            SocketAddr::new(server.ip4.into(), test.port())
        }
        Config::Relay => {
            let base = match scenario {
                Scenario::CrossNode => RELAY_CROSS_BASE,
                Scenario::SameNode => RELAY_SAME_BASE,
            };
            SocketAddr::new(
                tb.node(0).gateway_ip4.into(),
                base + test.port() - SINK_PORT,
            )
        }
    }
}

/// A configuration while it is up.
struct Active<'tb> {
    mesh: Option<Mesh<'tb>>,
    waypoint: Option<Waypoint<'tb>>,
    relays: Vec<Proc>,
}

impl<'tb> Active<'tb> {
    fn start(tb: &'tb Testbed, config: Config, exe: &str, fast_path: bool) -> Result<Self> {
        let options = MeshOptions {
            fast_path,
            ..MeshOptions::default()
        };
        match config {
            Config::NoMesh => Ok(Self {
                mesh: None,
                waypoint: None,
                relays: Vec::new(),
            }),
            Config::Trellis => Ok(Self {
                mesh: Some(Mesh::start(tb, &options)?),
                waypoint: None,
                relays: Vec::new(),
            }),
            Config::Waypoint => Self::start_waypoint(tb, exe, options),
            Config::Relay => {
                let (a, b) = (tb.node(0), tb.node(1));
                let mut a_maps = Vec::new();
                let mut b_maps = Vec::new();
                for (port, _) in SERVER_PORTS {
                    let offset = port - SINK_PORT;
                    let cross = RELAY_CROSS_BASE + offset;
                    let same = RELAY_SAME_BASE + offset;
                    a_maps.push(format!(
                        "{}={}",
                        SocketAddr::new(a.gateway_ip4.into(), cross),
                        SocketAddr::new(b.lan_ip4.into(), cross)
                    ));
                    a_maps.push(format!(
                        "{}={}",
                        SocketAddr::new(a.gateway_ip4.into(), same),
                        SocketAddr::new(tb.pod(0, 1).ip4.into(), port)
                    ));
                    b_maps.push(format!(
                        "{}={}",
                        SocketAddr::new(b.lan_ip4.into(), cross),
                        SocketAddr::new(tb.pod(1, 0).ip4.into(), port)
                    ));
                }
                let mut relays = Vec::new();
                for (node, maps) in [(a, a_maps), (b, b_maps)] {
                    let mut cmd = vec![exe.to_owned(), "relay".into()];
                    for m in maps {
                        cmd.extend(["--map".into(), m]);
                    }
                    relays.push(spawn_ready(
                        tb,
                        node,
                        &cmd,
                        &format!("relay-{}", node.name),
                    )?);
                }
                Ok(Self {
                    mesh: None,
                    waypoint: None,
                    relays,
                })
            }
        }
    }

    /// Control-plane mode with a waypoint in pod-1-1 for the whole namespace, and the HTTP
    /// Service over pod-1-0; returns once a GET through the waypoint is answered.
    fn start_waypoint(tb: &'tb Testbed, exe: &str, options: MeshOptions) -> Result<Self> {
        let mut mesh = Mesh::start(
            tb,
            &MeshOptions {
                control_plane: true,
                ..options
            },
        )?;
        mesh.write_service(
            HTTP_SERVICE,
            &[IpAddr::from(HTTP_VIP)],
            &[(HTTP_SERVICE_PORT, HTTP_PORT)],
            &[(tb.pod(1, 0), true)],
            None,
        )?;
        let waypoint = mesh
            .start_waypoint(WAYPOINT_NAME, tb.pod(1, 1))
            .context("starting the waypoint")?;
        mesh.set_namespace_label(NAMESPACE, USE_WAYPOINT_LABEL, Some(WAYPOINT_NAME))?;
        let through = format!("{NAMESPACE}/{WAYPOINT_NAME}");
        mesh.wait_config(0, WAYPOINT_ROUTE_TIMEOUT, |dump| {
            dump["services"].as_array().is_some_and(|services| {
                services.iter().any(|s| {
                    s["name"] == HTTP_SERVICE
                        && s["waypoint"] == through.as_str()
                        && s["endpoints"].as_array().map(Vec::len) == Some(1)
                })
            })
        })
        .context("agent 0 sending the HTTP Service through the waypoint")?;
        // Agent 0 knowing the route is not enough: the waypoint learns the Service from its own
        // stream and refuses tunnels for destinations it does not know yet.
        let vip = SocketAddr::from((HTTP_VIP, HTTP_SERVICE_PORT)).to_string();
        let secs = WAYPOINT_ROUTE_TIMEOUT.as_secs().to_string();
        tb.run(
            tb.pod(0, 0),
            &[
                exe,
                "load",
                "http-probe",
                "--to",
                vip.as_str(),
                "--secs",
                secs.as_str(),
            ],
            WAYPOINT_ROUTE_TIMEOUT + RUN_SLACK,
        )?
        .ok_json()
        .with_context(|| {
            format!(
                "a GET through the waypoint\nwaypoint log:\n{}",
                waypoint.log_text()
            )
        })?;
        Ok(Self {
            mesh: Some(mesh),
            waypoint: Some(waypoint),
            relays: Vec::new(),
        })
    }

    /// The processes whose CPU and memory count as the proxy's.
    fn proxy_pids(&self) -> Vec<u32> {
        match &self.mesh {
            Some(mesh) => (0..2).filter_map(|i| mesh.agent_pid(i)).collect(),
            None => self.relays.iter().map(Proc::pid).collect(),
        }
    }

    /// The waypoint process, whose CPU and memory are reported apart from the agents'.
    fn waypoint_pid(&self) -> Option<u32> {
        self.waypoint.as_ref().map(|w| w.process.pid())
    }

    /// Stops the proxies; for Trellis also detaches the datapath, so nothing is redirected.
    fn stop(self, tb: &Testbed) -> Result<()> {
        drop(self.relays);
        // Before the agents and the controller: it would only log their absence.
        drop(self.waypoint);
        let Some(mesh) = self.mesh else {
            return Ok(());
        };
        let configs: Vec<String> = (0..tb.nodes().len())
            .map(|i| mesh.config_path(i).to_string_lossy().into_owned())
            .collect();
        // Dropping the mesh kills the agents; the pinned programs stay until uninstalled.
        drop(mesh);
        for (i, config) in configs.iter().enumerate() {
            tb.run(
                tb.node(i),
                &["mesh-node", "agent", "--config", config, "--uninstall"],
                Duration::from_secs(30),
            )?
            .check()?;
        }
        Ok(())
    }
}

/// Starts `cmd` at `place` and waits (bounded) for its `{"listening": ...}` line.
fn spawn_ready<'a>(
    tb: &Testbed,
    place: impl Into<crate::testbed::Place<'a>>,
    cmd: &[String],
    name: &str,
) -> Result<Proc> {
    let mut proc = tb.spawn(place, cmd, SpawnOptions::new().name(name))?;
    proc.wait_for_stdout_line(READY_TIMEOUT, |l| l.contains("\"listening\""))?;
    Ok(proc)
}

/// Sum of user and system CPU time of `pids` (all their threads), in seconds.
fn cpu_seconds(pids: &[u32]) -> Result<f64> {
    let mut ticks: u64 = 0;
    for pid in pids {
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // Fields after the command name, which is in parentheses and may contain spaces.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .with_context(|| format!("unexpected {path}: {stat:?}"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line; `rest` starts at field 3.
        for i in [11, 12] {
            ticks += fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .with_context(|| format!("no CPU time field in {path}: {stat:?}"))?;
        }
    }
    Ok(ticks as f64 / USER_HZ)
}

/// Sum of one resident-memory line of `/proc/PID/status` (`VmRSS:` for all of it, `RssAnon:`
/// for heap and stacks without the mapped binary's pages) over `pids`, in bytes.
fn rss_bytes(pids: &[u32], line: &str) -> Result<u64> {
    let mut total = 0;
    for pid in pids {
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix(line))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .with_context(|| format!("no {line} line in {path}"))?;
        total += kib * 1024;
    }
    Ok(total)
}

/// What the figures were measured on.
fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu_model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned());
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu_model,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "git_head": git,
    })
}

fn write_json(path: &Path, report: &Value) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}
