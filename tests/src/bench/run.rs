//! The orchestrator: testbed, servers, the configurations round by round, and the CPU and
//! memory samples around each load run (see [`super::cpu`]).
//!
//! Topology (ports fixed so the relay maps are static):
//!
//! ```text
//! client pod-0-0 ──────────────────────────────────────────► server pod-1-0  (cross-node)
//!                └─────────────────────────────────────────► server pod-0-1  (same-node)
//! relay floor:  pod-0-0 -> relay A (node 0 gateway :1700x) -> relay B (node 1 LAN :1700x) -> pod-1-0
//!               pod-0-0 -> relay A (node 0 gateway :1701x) -> pod-0-1
//! Trellis:      pod-0-0 dials the server pod; the eBPF redirect and HBONE do the rest
//! --peer:       a command per node namespace; pod-0-0 dials the server pod or, with
//!               `--peer-dial relay`, the relay floor's addresses (see `super::peer`)
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
//! next no-mesh turn runs with no program attached at all. The cold-connection test runs
//! under Trellis in a turn of its own, with agents that pool no HBONE connection
//! (`outbound.hbone_single_use`), so every connection costs a full mutual-TLS handshake.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use super::{
    catalog::{
        CONNECT_LOOPS, Config, Durations, HTTP_CONNS, HTTP_PORT, HTTP_RATE, PINGPONG_SIZE, RR_SIZE,
        SERVER_PORTS, SINK_PORT, Scenario, Test, select,
    },
    cpu::{self, BpfStats, MachineCpu},
    peer::{self, Dial, Peer},
    report::{self, Run},
};
use crate::{
    mesh::{
        Mesh, MeshOptions, NAMESPACE,
        waypoint::{USE_WAYPOINT_LABEL, Waypoint},
    },
    testbed::{Proc, SpawnOptions, Testbed},
};

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
/// How long a `--peer` may take until a connection through it is answered.
const PEER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one load run beyond its nominal duration (connects, drains, process start).
const RUN_SLACK: Duration = Duration::from_mins(1);
/// Established, silent connections held open to measure what an idle connection costs the
/// proxies, and fewer with `--quick`.
pub const IDLE_CONNS: usize = 10_000;
pub const IDLE_CONNS_QUICK: usize = 1_000;
/// Time allowed per held connection to be opened, on top of [`RUN_SLACK`].
const IDLE_CONNECT_BUDGET: Duration = Duration::from_millis(10);
/// How long the load generator holds them; the sample is taken as soon as they are up.
const IDLE_HOLD: Duration = Duration::from_secs(30);
/// Descriptor limit (soft and hard) the orchestrator sets for itself and so for everything it
/// starts: relay A holds two descriptors per held connection, the servers and agents one.
const FD_LIMIT: u64 = 65_536;
/// Descriptors a proxy needs besides the held connections (listeners, HBONE, logs); above the
/// agents' own reserve (`limits.reserved_descriptors`, 256), so the held connections fit
/// under the node-wide cap the agents derive from the same descriptor limit.
const FD_RESERVE: u64 = 400;

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
    /// Another node proxy to measure as one more configuration.
    pub peer: Option<Peer>,
}

/// One bring-up of a configuration within a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Turn {
    config: Config,
    /// Trellis with agents that pool no HBONE connection (the cold-connection test).
    single_use: bool,
}

impl Turn {
    fn runs(self, test: Test) -> bool {
        test.runs_in(self.config) && test.single_use_agents(self.config) == self.single_use
    }

    fn name(self) -> String {
        if self.single_use {
            format!("{} (single-use HBONE)", self.config.key())
        } else {
            self.config.key().to_owned()
        }
    }
}

/// What every measurement needs.
struct Bench<'a> {
    tb: &'a Testbed,
    exe: &'a str,
    durations: Durations,
    /// Where the client dials in the peer configuration.
    peer_dial: Dial,
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
    let wanted = if opts.quick {
        IDLE_CONNS_QUICK
    } else {
        IDLE_CONNS
    };
    // Relay A holds two descriptors per held connection.
    let fits = usize::try_from(raise_fd_limit().saturating_sub(FD_RESERVE) / 2).unwrap_or(0);
    let idle_conns = wanted.min(fits);
    if idle_conns < wanted {
        eprintln!(
            "bench: the descriptor limit cannot be raised to {FD_LIMIT}: holding {idle_conns} \
             idle connections instead of {wanted}"
        );
    }
    // Before any agent loads its programs; restored when the run ends, however it ends.
    let _bpf_stats = BpfStats::enable();

    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(2)
        .build()
        .context("building the testbed")?;
    let bench = Bench {
        tb: &tb,
        exe: &exe,
        durations,
        peer_dial: opts.peer.as_ref().map(|p| p.dial).unwrap_or_default(),
    };
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

    // Only the configurations a selected test runs in (the peer only when given); the order
    // rotates per round.
    let mut turns: Vec<Turn> = Vec::new();
    for config in Config::ALL {
        if config == Config::Peer && opts.peer.is_none() {
            continue;
        }
        for single_use in [false, true] {
            let turn = Turn { config, single_use };
            if selected.iter().any(|(_, t)| turn.runs(*t)) {
                turns.push(turn);
            }
        }
    }
    let mut runs: Vec<Run> = Vec::new();
    let mut memory: Vec<Value> = Vec::new();
    for round in 0..opts.rounds {
        for c in 0..turns.len() {
            let turn = turns[(round + c) % turns.len()];
            let config = turn.config;
            let active = match (config, &opts.peer) {
                _ if turn.single_use => Active::start_single_use(&tb),
                (Config::Peer, Some(peer)) => Active::start_peer(&bench, peer),
                _ => Active::start(&tb, config, &exe),
            }
            .with_context(|| format!("starting {}", turn.name()))?;
            let pids = active.proxy_pids();
            let waypoint_pids: Vec<u32> = active.waypoint_pid().into_iter().collect();
            let rss_idle = rss_bytes(&pids, "VmRSS:")?;
            let anon_idle = rss_bytes(&pids, "RssAnon:")?;
            let waypoint_rss_idle = rss_bytes(&waypoint_pids, "VmRSS:")?;
            let waypoint_anon_idle = rss_bytes(&waypoint_pids, "RssAnon:")?;
            // The idle-connection cost is the agents' (or relays'); the waypoint configuration
            // runs the same agents and carries HTTP only, the single-use agents the cold test.
            let sample_memory = !pids.is_empty() && !turn.single_use;
            let idle_conn_bytes = if !sample_memory || config == Config::Waypoint {
                None
            } else {
                Some(
                    idle_connection_cost(&bench, config, &pids, idle_conns)
                        .with_context(|| format!("round {} {} idle", round + 1, config.key()))?,
                )
            };
            for &(scenario, test) in selected.iter().filter(|(_, t)| turn.runs(*t)) {
                let run = measure(&bench, config, scenario, test, &active).with_context(|| {
                    format!(
                        "round {} {} {}-{}",
                        round + 1,
                        turn.name(),
                        scenario.key(),
                        test.key()
                    )
                })?;
                eprintln!(
                    "bench: round {}/{} {:<8} {:<10} {:<12} {}",
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
            if sample_memory {
                let mut sample = json!({
                    "round": round,
                    "config": config.key(),
                    "rss_idle_bytes": rss_idle,
                    "rss_after_load_bytes": rss_after,
                    "rss_anon_idle_bytes": anon_idle,
                    "rss_anon_after_load_bytes": anon_after,
                    "idle_conns": idle_conn_bytes.map(|_| idle_conns),
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
                .with_context(|| format!("stopping {}", turn.name()))?;
        }
    }
    drop(servers);

    let rr_tests: Vec<Value> = Test::ALL
        .iter()
        .filter_map(|t| {
            t.rr()
                .map(|(rate, conns)| json!({"test": t.key(), "rate": rate, "conns": conns}))
        })
        .collect();
    let settings = json!({
        "quick": opts.quick,
        "rounds": opts.rounds,
        "bulk_secs": durations.bulk.as_secs_f64(),
        "rr_secs": durations.rr.as_secs_f64(),
        "connect_secs": durations.connect.as_secs_f64(),
        "rr_size": RR_SIZE,
        "rr_tests": rr_tests,
        "pingpong_size": PINGPONG_SIZE,
        "pingpong_secs": durations.rr.as_secs_f64(),
        "connect_loops": CONNECT_LOOPS,
        "idle_conns": idle_conns,
        "http_secs": durations.http.as_secs_f64(),
        "http_rate": HTTP_RATE,
        "http_conns": HTTP_CONNS,
        "http_body_bytes": super::serve::HTTP_BODY,
        "peer": opts.peer.as_ref().map(|p| json!({
            "command": p.template.join(" "),
            "dial": format!("{:?}", p.dial).to_lowercase(),
        })),
        "bench_build": if cfg!(debug_assertions) { "debug" } else { "release" },
    });
    let report = report::build(&runs, &memory, settings, machine())?;
    println!("{}", super::table::table(&report));
    write_json(&opts.json, &report)?;
    eprintln!("bench: wrote {}", opts.json.display());
    Ok(report)
}

/// One load run with the CPU time around it: the proxies' (the waypoint's apart from the
/// agents'), their eBPF programs' and the whole machine's.
fn measure(
    bench: &Bench<'_>,
    config: Config,
    scenario: Scenario,
    test: Test,
    active: &Active<'_>,
) -> Result<Run> {
    let pids = active.proxy_pids();
    let waypoint_pids: Vec<u32> = active.waypoint_pid().into_iter().collect();
    let to = target(bench, config, scenario, test).to_string();
    let duration = bench.durations.of(test);
    let secs = format!("{}", duration.as_secs_f64());
    let mut cmd: Vec<String> = vec![bench.exe.into(), "load".into()];
    match test {
        Test::Bulk1 | Test::Bulk8 | Test::Bulk1Rev | Test::Bulk8Rev => {
            let (streams, reverse) = test.bulk().unwrap_or((1, false));
            cmd.extend(["bulk".into(), "--streams".into(), streams.to_string()]);
            if reverse {
                cmd.push("--reverse".into());
            }
        }
        Test::Rr | Test::Rr64 | Test::Rr10k => {
            let (rate, conns) = test.rr().unwrap_or_default();
            cmd.extend([
                "rr".into(),
                "--conns".into(),
                conns.to_string(),
                "--rate".into(),
                rate.to_string(),
                "--size".into(),
                RR_SIZE.to_string(),
            ]);
        }
        Test::PingPong => cmd.extend([
            "pingpong".into(),
            "--size".into(),
            PINGPONG_SIZE.to_string(),
        ]),
        Test::Connect | Test::ConnectCold => cmd.extend([
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

    let cpu_before = cpu::process_seconds(&pids)?;
    let waypoint_before = cpu::process_seconds(&waypoint_pids)?;
    let ebpf_before = cpu::ebpf_seconds(&pids)?;
    let machine_before = MachineCpu::now()?;
    let started = Instant::now();
    let out = bench
        .tb
        .run(bench.tb.pod(0, 0), &cmd, duration + RUN_SLACK)?;
    let wall = started.elapsed().as_secs_f64();
    let machine = MachineCpu::now()?.vcpus_since(&machine_before, wall);
    let cpu = cpu::process_seconds(&pids)? - cpu_before;
    let waypoint_cpu = cpu::process_seconds(&waypoint_pids)? - waypoint_before;
    let ebpf = match (cpu::ebpf_seconds(&pids)?, ebpf_before) {
        (Some(after), Some(before)) => Some(after - before),
        _ => None,
    };
    let result = out.ok_json()?;
    Ok(Run {
        round: 0,
        config,
        scenario,
        test,
        wall_secs: wall,
        proxy_cpu_secs: (!pids.is_empty()).then_some(cpu),
        waypoint_cpu_secs: (!waypoint_pids.is_empty()).then_some(waypoint_cpu),
        ebpf_cpu_secs: ebpf,
        machine_vcpus: machine,
        result,
    })
}

/// Anonymous memory the proxies hold per established, silent cross-node connection: the
/// growth of their anonymous RSS while `conns` such connections are open, divided by their
/// number. Run on freshly started proxies, so freed memory the allocator keeps from earlier
/// tests cannot hide the cost.
fn idle_connection_cost(
    bench: &Bench<'_>,
    config: Config,
    pids: &[u32],
    conns: usize,
) -> Result<f64> {
    let tb = bench.tb;
    let to = target(bench, config, Scenario::CrossNode, Test::Rr).to_string();
    let before = rss_bytes(pids, "RssAnon:")?;
    let cmd: Vec<String> = vec![
        bench.exe.into(),
        "load".into(),
        "hold".into(),
        "--to".into(),
        to,
        "--conns".into(),
        conns.to_string(),
        "--secs".into(),
        IDLE_HOLD.as_secs().to_string(),
    ];
    let mut proc = tb.spawn(tb.pod(0, 0), &cmd, SpawnOptions::new().name("idle-conns"))?;
    let within = RUN_SLACK + IDLE_CONNECT_BUDGET * u32::try_from(conns).unwrap_or(u32::MAX);
    proc.wait_for_stdout_line(within, |l| l.contains(super::load::HOLDING))?;
    let held = rss_bytes(pids, "RssAnon:")?;
    // Ending it early closes the connections before the next test; its exit status does not
    // matter.
    proc.kill()?;
    Ok((held as f64 - before as f64) / conns as f64)
}

/// Where the client dials for `test` in `scenario` under `config`.
fn target(bench: &Bench<'_>, config: Config, scenario: Scenario, test: Test) -> SocketAddr {
    let tb = bench.tb;
    let server = match scenario {
        Scenario::CrossNode => tb.pod(1, 0),
        Scenario::SameNode => tb.pod(0, 1),
    };
    let via_relay =
        config == Config::Relay || (config == Config::Peer && bench.peer_dial == Dial::Relay);
    match config {
        Config::Waypoint if test == Test::Http => SocketAddr::from((HTTP_VIP, HTTP_SERVICE_PORT)),
        _ if via_relay => {
            let base = match scenario {
                Scenario::CrossNode => RELAY_CROSS_BASE,
                Scenario::SameNode => RELAY_SAME_BASE,
            };
            SocketAddr::new(
                tb.node(0).gateway_ip4.into(),
                base + test.port() - SINK_PORT,
            )
        }
        _ => SocketAddr::new(server.ip4.into(), test.port()),
    }
}

/// The relay floor's `LISTEN=TARGET` maps for node 0 (relay A: the cross-node chain's first
/// hop and the same-node relay) and node 1 (relay B: the chain's last hop).
fn relay_maps(tb: &Testbed) -> [Vec<String>; 2] {
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
    [a_maps, b_maps]
}

/// A configuration while it is up.
struct Active<'tb> {
    mesh: Option<Mesh<'tb>>,
    waypoint: Option<Waypoint<'tb>>,
    relays: Vec<Proc>,
}

impl<'tb> Active<'tb> {
    fn start(tb: &'tb Testbed, config: Config, exe: &str) -> Result<Self> {
        match config {
            Config::NoMesh => Ok(Self {
                mesh: None,
                waypoint: None,
                relays: Vec::new(),
            }),
            Config::Trellis => Ok(Self {
                mesh: Some(Mesh::start(tb, &mesh_options())?),
                waypoint: None,
                relays: Vec::new(),
            }),
            Config::Waypoint => Self::start_waypoint(tb, exe),
            Config::Relay => {
                let [a_maps, b_maps] = relay_maps(tb);
                let (a, b) = (tb.node(0), tb.node(1));
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
            Config::Peer => bail!("the peer configuration starts with `Active::start_peer`"),
        }
    }

    /// Trellis whose agents pool no HBONE connection: every connection a full handshake.
    fn start_single_use(tb: &'tb Testbed) -> Result<Self> {
        let options = MeshOptions {
            hbone_single_use: true,
            ..mesh_options()
        };
        Ok(Self {
            mesh: Some(Mesh::start(tb, &options)?),
            waypoint: None,
            relays: Vec::new(),
        })
    }

    /// The `--peer` command in each node's namespace; returns once a connection through it
    /// is answered in both scenarios.
    fn start_peer(bench: &Bench<'tb>, peer: &Peer) -> Result<Self> {
        let tb = bench.tb;
        let maps = relay_maps(tb);
        let mut procs = Vec::new();
        for (index, maps) in maps.into_iter().enumerate() {
            let node = tb.node(index);
            let vars = peer::NodeVars {
                bench: bench.exe.to_owned(),
                node: node.name.clone(),
                index,
                lan_ip: node.lan_ip4,
                gateway_ip: node.gateway_ip4,
                peer_lan_ip: tb.node(1 - index).lan_ip4,
                pod_cgroup: node.pod_cgroup_root.to_string_lossy().into_owned(),
                maps,
            };
            let cmd = peer::expand(&peer.template, &vars);
            procs.push(tb.spawn(
                node,
                &cmd,
                SpawnOptions::new().name(format!("peer-{}", node.name)),
            )?);
        }
        let active = Self {
            mesh: None,
            waypoint: None,
            relays: procs,
        };
        let secs = PEER_READY_TIMEOUT.as_secs().to_string();
        for scenario in Scenario::ALL {
            let to = target(bench, Config::Peer, scenario, Test::Connect).to_string();
            tb.run(
                tb.pod(0, 0),
                &[bench.exe, "load", "probe", "--to", &to, "--secs", &secs],
                PEER_READY_TIMEOUT + RUN_SLACK,
            )?
            .ok_json()
            .with_context(|| {
                let logs: Vec<String> = active
                    .relays
                    .iter()
                    .map(|p| format!("{}:\n{}", p.description(), p.stderr_text()))
                    .collect();
                format!(
                    "a connection through the peer ({})\n{}",
                    scenario.key(),
                    logs.join("\n")
                )
            })?;
        }
        Ok(active)
    }

    /// Control-plane mode with a waypoint in pod-1-1 for the whole namespace, and the HTTP
    /// Service over pod-1-0; returns once a GET through the waypoint is answered.
    fn start_waypoint(tb: &'tb Testbed, exe: &str) -> Result<Self> {
        let mut mesh = Mesh::start(
            tb,
            &MeshOptions {
                control_plane: true,
                ..Default::default()
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

/// The bench's mesh: one client pod holds the idle-connection test's connections, so the
/// per-pod cap (which that test is not about) sits above them.
fn mesh_options() -> MeshOptions {
    let mut options = MeshOptions::default();
    options.limits.max_connections_per_pod = IDLE_CONNS + 1_000;
    options
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

/// Raises the descriptor limit (soft and hard) to [`FD_LIMIT`]: everything the orchestrator
/// starts inherits it, and the idle-connection test holds thousands. Without the right to
/// raise the hard limit (a container without `CAP_SYS_RESOURCE`), the soft limit goes up to
/// the hard one. Returns the soft limit in force.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            eprintln!("bench: cannot read the descriptor limit: {e}");
            return 0;
        }
    };
    if hard < FD_LIMIT && setrlimit(Resource::RLIMIT_NOFILE, FD_LIMIT, FD_LIMIT).is_ok() {
        return FD_LIMIT;
    }
    let target = soft.max(hard.min(FD_LIMIT));
    if target > soft
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, target, hard)
    {
        eprintln!("bench: cannot raise the descriptor limit to {target}: {e}");
        return soft;
    }
    target
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
        "cpus": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
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
