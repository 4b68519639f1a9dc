//! From runs to figures: the JSON report and the terminal table.
//!
//! Rates (Gbit/s, connections/s) and CPU figures are the median over rounds, so one disturbed
//! round does not move them; latency percentiles come from the rounds' histograms merged, so
//! p99.9 and max see every sample. Ratios are Trellis over no mesh and over the relay floor of
//! the same run; "added" is Trellis's (and the relay's) latency minus no mesh's. The HTTP
//! test's figures (the L7 table) compare Trellis at L4 and Trellis through a waypoint with no
//! mesh, the same way, and count the waypoint's CPU and memory apart from the agents'. A
//! `--peer` gets its own column, compared with no mesh and with Trellis.
//!
//! The machine table shows, per test, the whole machine's CPU (user, system, softirq) in
//! vCPUs over the run, and the Trellis eBPF programs' run time, which no process's CPU time
//! includes.

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::{
    catalog::{Config, PINGPONG_SIZE, RR_SIZE, Scenario, Test},
    load::{histogram_from_buckets, new_histogram},
};

/// One load run as measured by the orchestrator.
#[derive(Clone, Debug)]
pub struct Run {
    pub round: usize,
    pub config: Config,
    pub scenario: Scenario,
    pub test: Test,
    /// Wall time of the load process, which is also the CPU sampling window.
    pub wall_secs: f64,
    /// CPU time of the proxy processes in that window (none without a proxy): the relays, or
    /// both nodes' agents.
    pub proxy_cpu_secs: Option<f64>,
    /// CPU time of the waypoint in that window (waypoint configuration only).
    pub waypoint_cpu_secs: Option<f64>,
    /// Run time of the eBPF programs the proxies hold in that window (Trellis only).
    pub ebpf_cpu_secs: Option<f64>,
    /// The whole machine's CPU in that window by kind, in vCPUs (see [`super::cpu`]).
    pub machine_vcpus: Value,
    /// What the load generator printed.
    pub result: Value,
}

impl Run {
    /// One line for the progress log.
    pub fn summary(&self) -> String {
        let r = &self.result;
        let main = match self.test {
            Test::Bulk1 | Test::Bulk8 | Test::Bulk1Rev | Test::Bulk8Rev => {
                format!("{:.2} Gbit/s", num(&r["gbps"]))
            }
            Test::PingPong => format!(
                "{:.0} round trips/s, p50 {:.0} us, p99 {:.0} us",
                num(&r["per_s"]),
                num(&r["p50_us"]),
                num(&r["p99_us"])
            ),
            Test::Rr | Test::Rr64 | Test::Rr10k => format!(
                "p50 {:.0} us, p99 {:.0} us, max {:.0} us",
                num(&r["p50_us"]),
                num(&r["p99_us"]),
                num(&r["max_us"])
            ),
            Test::Http => format!(
                "p50 {:.0} us, p99 {:.0} us, max {:.0} us, {} not 200",
                num(&r["p50_us"]),
                num(&r["p99_us"]),
                num(&r["max_us"]),
                r["failed"].as_u64().unwrap_or(0)
            ),
            Test::Connect | Test::ConnectCold => format!(
                "{:.0} conn/s ({} failed)",
                num(&r["per_s"]),
                r["failed"].as_u64().unwrap_or(0)
            ),
        };
        let main = match self.proxy_cpu_secs {
            Some(cpu) => format!("{main}; proxy CPU {cpu:.2} s in {:.1} s", self.wall_secs),
            None => main,
        };
        let main = match self.waypoint_cpu_secs {
            Some(cpu) => format!("{main}; waypoint CPU {cpu:.2} s"),
            None => main,
        };
        let main = match self.ebpf_cpu_secs {
            Some(cpu) => format!("{main}; eBPF {cpu:.3} s"),
            None => main,
        };
        format!(
            "{main}; machine {:.2} vCPU",
            num(&self.machine_vcpus["busy"])
        )
    }
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    })
}

/// Which way a figure is better, for readers of the JSON.
#[derive(Clone, Copy)]
enum Better {
    Higher,
    Lower,
}

/// One row: a figure for each configuration (in [`Config::ALL`] order) and the ratios.
fn figure(
    scenario: &str,
    key: &str,
    label: &str,
    better: Better,
    [no_mesh, relay, trellis, waypoint, peer]: [Option<f64>; 5],
    latency: bool,
) -> Value {
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let added = |a: Option<f64>| match (a, no_mesh) {
        (Some(a), Some(b)) if latency => Some(a - b),
        _ => None,
    };
    json!({
        "scenario": scenario,
        "key": key,
        "metric": label,
        "better": match better { Better::Higher => "higher", Better::Lower => "lower" },
        "no_mesh": no_mesh,
        "relay": relay,
        "trellis": trellis,
        "waypoint": waypoint,
        "trellis_over_no_mesh": ratio(trellis, no_mesh),
        "trellis_over_relay": ratio(trellis, relay),
        "trellis_added_over_no_mesh": added(trellis),
        "relay_added_over_no_mesh": added(relay),
        "waypoint_over_no_mesh": ratio(waypoint, no_mesh),
        "waypoint_over_trellis": ratio(waypoint, trellis),
        "waypoint_added_over_no_mesh": added(waypoint),
        "peer": peer,
        "peer_over_no_mesh": ratio(peer, no_mesh),
        "trellis_over_peer": ratio(trellis, peer),
        "peer_added_over_no_mesh": added(peer),
    })
}

/// A row of the L7 table (see [`table`]).
fn l7_figure(
    scenario: &str,
    key: &str,
    label: &str,
    better: Better,
    values: [Option<f64>; 5],
    latency: bool,
) -> Value {
    let mut f = figure(scenario, key, label, better, values, latency);
    f["table"] = "l7".into();
    f
}

/// A row of the machine table (see [`table`]): vCPUs of one kind during one test.
fn machine_figure(scenario: &str, test: Test, kind: &str, values: [Option<f64>; 5]) -> Value {
    let mut f = figure(
        scenario,
        &format!("{}.machine_vcpu.{kind}", test.key()),
        &format!("{}: machine {kind} (vCPU)", test.key()),
        Better::Lower,
        values,
        false,
    );
    f["table"] = "machine".into();
    f["test"] = test.key().into();
    f
}

/// The table label of a request/response test.
fn rr_label(test: Test) -> String {
    let (rate, conns) = test.rr().unwrap_or_default();
    format!("{} KiB req/resp @{rate} rps, {conns} conns", RR_SIZE / 1024)
}

/// Each configuration's runs' histograms merged (`None` for a configuration without runs).
fn merged_histograms(runs: &[&Run]) -> Result<[Option<Histogram<u64>>; 5]> {
    let mut merged = [None, None, None, None, None];
    for (slot, c) in merged.iter_mut().zip(Config::ALL) {
        let mut h = new_histogram()?;
        let mut any = false;
        for r in runs.iter().filter(|r| r.config == c) {
            h.add(histogram_from_buckets(&r.result["hist"])?)
                .context("merging round histograms")?;
            any = true;
        }
        *slot = any.then_some(h);
    }
    Ok(merged)
}

/// A quantile (`None`: the maximum) of each merged histogram, in microseconds.
fn quantile_us(merged: &[Option<Histogram<u64>>; 5], quantile: Option<f64>) -> [Option<f64>; 5] {
    let mut out = [None; 5];
    for (slot, h) in out.iter_mut().zip(merged) {
        *slot = h.as_ref().filter(|h| !h.is_empty()).map(|h| {
            let ns = match quantile {
                Some(q) => h.value_at_quantile(q),
                None => h.max(),
            };
            ns as f64 / 1000.0
        });
    }
    out
}

/// The latency rows: label suffix, key suffix and quantile (`None`: the maximum).
const LATENCY_ROWS: [(&str, &str, Option<f64>); 5] = [
    ("p50_us", "p50", Some(0.5)),
    ("p90_us", "p90", Some(0.9)),
    ("p99_us", "p99", Some(0.99)),
    ("p999_us", "p99.9", Some(0.999)),
    ("max_us", "max", None),
];

/// Builds the report: settings, machine, every run, the figures and the memory samples.
pub fn build(runs: &[Run], memory: &[Value], settings: Value, machine: Value) -> Result<Value> {
    let mut pairs: Vec<(Scenario, Test)> = runs.iter().map(|r| (r.scenario, r.test)).collect();
    pairs.sort();
    pairs.dedup();

    let mut figures = Vec::new();
    for (scenario, test) in pairs {
        let sc = scenario.key();
        let of = |config: Config| -> Vec<&Run> {
            runs.iter()
                .filter(|r| r.config == config && r.scenario == scenario && r.test == test)
                .collect()
        };
        // The median over rounds of `f` for each configuration.
        let per_config = |f: &dyn Fn(&Run) -> Option<f64>| -> [Option<f64>; 5] {
            Config::ALL.map(|c| median(of(c).into_iter().filter_map(f).collect()))
        };
        let cpu_rate = |r: &Run| r.proxy_cpu_secs.map(|cpu| cpu / r.wall_secs);
        match test {
            Test::Bulk1 | Test::Bulk8 | Test::Bulk1Rev | Test::Bulk8Rev => {
                let (n, reverse) = test.bulk().unwrap_or((1, false));
                let streams = match (n, reverse) {
                    (1, false) => "1 stream".to_owned(),
                    (n, false) => format!("{n} streams"),
                    (1, true) => "1 stream server->client".to_owned(),
                    (n, true) => format!("{n} streams server->client"),
                };
                figures.push(figure(
                    sc,
                    &format!("{}.gbps", test.key()),
                    &format!("bulk {streams} (Gbit/s)"),
                    Better::Higher,
                    per_config(&|r| r.result["gbps"].as_f64()),
                    false,
                ));
                figures.push(figure(
                    sc,
                    &format!("{}.gbit_per_cpu_s", test.key()),
                    &format!("bulk {streams}, Gbit per proxy CPU-s"),
                    Better::Higher,
                    per_config(&|r| {
                        let gbit = r.result["bytes"].as_f64()? * 8.0 / 1e9;
                        r.proxy_cpu_secs.filter(|c| *c > 0.0).map(|c| gbit / c)
                    }),
                    false,
                ));
            }
            Test::Rr | Test::Rr64 | Test::Rr10k => {
                let these: Vec<&Run> = runs
                    .iter()
                    .filter(|r| r.scenario == scenario && r.test == test)
                    .collect();
                let merged = merged_histograms(&these)?;
                let rr = rr_label(test);
                let (rate, conns) = test.rr().unwrap_or_default();
                let short = format!("req/resp @{rate}/{conns}c");
                let key = test.key();
                for (suffix, label, quantile) in LATENCY_ROWS {
                    figures.push(figure(
                        sc,
                        &format!("{key}.{suffix}"),
                        &format!("{rr}: {label} (us)"),
                        Better::Lower,
                        quantile_us(&merged, quantile),
                        true,
                    ));
                }
                let per_krps = |cpu: Option<f64>, r: &Run| {
                    let krps = r.result["rate"].as_f64()? / 1000.0;
                    cpu.map(|c| c / r.wall_secs / krps)
                };
                figures.push(figure(
                    sc,
                    &format!("{key}.vcpu_per_krps"),
                    &format!("{short}, proxy vCPU per 1000 rps"),
                    Better::Lower,
                    per_config(&|r| per_krps(r.proxy_cpu_secs, r)),
                    false,
                ));
                // The eBPF programs run in the pods' and the kernel's context, so they are
                // added to the proxies' own time (nothing to add for a relay).
                figures.push(figure(
                    sc,
                    &format!("{key}.vcpu_per_krps_with_ebpf"),
                    &format!("{short}, proxy+eBPF vCPU per 1000 rps"),
                    Better::Lower,
                    per_config(&|r| {
                        let all = r.proxy_cpu_secs.map(|p| p + r.ebpf_cpu_secs.unwrap_or(0.0));
                        per_krps(all, r)
                    }),
                    false,
                ));
                figures.push(figure(
                    sc,
                    &format!("{key}.machine_vcpu_per_krps"),
                    &format!("{short}, machine vCPU per 1000 rps"),
                    Better::Lower,
                    per_config(&|r| {
                        let krps = r.result["rate"].as_f64()? / 1000.0;
                        r.machine_vcpus["busy"].as_f64().map(|v| v / krps)
                    }),
                    false,
                ));
            }
            Test::PingPong => {
                let these: Vec<&Run> = runs
                    .iter()
                    .filter(|r| r.scenario == scenario && r.test == test)
                    .collect();
                let merged = merged_histograms(&these)?;
                let pp = format!("{PINGPONG_SIZE} B ping-pong, 1 conn");
                figures.push(figure(
                    sc,
                    "pingpong.per_s",
                    &format!("{pp}: round trips/s"),
                    Better::Higher,
                    per_config(&|r| r.result["per_s"].as_f64()),
                    false,
                ));
                for (suffix, label, quantile) in LATENCY_ROWS {
                    figures.push(figure(
                        sc,
                        &format!("pingpong.{suffix}"),
                        &format!("{pp}: {label} (us)"),
                        Better::Lower,
                        quantile_us(&merged, quantile),
                        true,
                    ));
                }
            }
            Test::Http => {
                let these: Vec<&Run> = runs
                    .iter()
                    .filter(|r| r.scenario == scenario && r.test == test)
                    .collect();
                let merged = merged_histograms(&these)?;
                let http = "HTTP GET 1 KiB @1000 rps, 4 conns";
                for (key, label, quantile) in LATENCY_ROWS {
                    figures.push(l7_figure(
                        sc,
                        &format!("http.{key}"),
                        &format!("{http}: {label} (us)"),
                        Better::Lower,
                        quantile_us(&merged, quantile),
                        true,
                    ));
                }
                // CPU per 1000 requests answered (any status), the rate actually served.
                let per_kreq = |cpu: Option<f64>, r: &Run| {
                    let k = r.result["responses"].as_f64()? / 1000.0;
                    cpu.filter(|_| k > 0.0).map(|c| c / k)
                };
                figures.push(l7_figure(
                    sc,
                    "http.agents_cpu_s_per_kreq",
                    "HTTP, agents CPU-s per 1000 requests",
                    Better::Lower,
                    per_config(&|r| per_kreq(r.proxy_cpu_secs, r)),
                    false,
                ));
                figures.push(l7_figure(
                    sc,
                    "http.waypoint_cpu_s_per_kreq",
                    "HTTP, waypoint CPU-s per 1000 requests",
                    Better::Lower,
                    per_config(&|r| per_kreq(r.waypoint_cpu_secs, r)),
                    false,
                ));
                figures.push(l7_figure(
                    sc,
                    "http.mesh_cpu_s_per_kreq",
                    "HTTP, agents+waypoint CPU-s per 1000 req",
                    Better::Lower,
                    per_config(&|r| {
                        let all = match (r.proxy_cpu_secs, r.waypoint_cpu_secs) {
                            (Some(a), Some(w)) => Some(a + w),
                            (a, w) => a.or(w),
                        };
                        per_kreq(all, r)
                    }),
                    false,
                ));
                let failed = per_config(&|r| r.result["failed"].as_f64());
                if failed.iter().flatten().any(|f| *f > 0.0) {
                    figures.push(l7_figure(
                        sc,
                        "http.failed",
                        "HTTP responses not 200 (median per run)",
                        Better::Lower,
                        failed,
                        false,
                    ));
                }
            }
            Test::Connect | Test::ConnectCold => {
                let key = test.key();
                let (what, short) = if test == Test::ConnectCold {
                    ("new conns/s, full mTLS handshake each", "cold connections")
                } else {
                    ("new connections/s (1-byte echo)", "new connections")
                };
                figures.push(figure(
                    sc,
                    &format!("{key}.per_s"),
                    what,
                    Better::Higher,
                    per_config(&|r| r.result["per_s"].as_f64()),
                    false,
                ));
                figures.push(figure(
                    sc,
                    &format!("{key}.vcpu_per_kconn"),
                    &format!("{short}, proxy vCPU per 1000/s"),
                    Better::Lower,
                    per_config(&|r| {
                        let k = r.result["per_s"].as_f64()? / 1000.0;
                        cpu_rate(r).filter(|_| k > 0.0).map(|v| v / k)
                    }),
                    false,
                ));
                let failed = per_config(&|r| r.result["failed"].as_f64());
                if failed.iter().flatten().any(|f| *f > 0.0) {
                    figures.push(figure(
                        sc,
                        &format!("{key}.failed"),
                        &format!("failed {short} (median per run)"),
                        Better::Lower,
                        failed,
                        false,
                    ));
                }
            }
        }
        for kind in ["user", "system", "softirq", "busy"] {
            figures.push(machine_figure(
                sc,
                test,
                kind,
                per_config(&|r| r.machine_vcpus[kind].as_f64()),
            ));
        }
        figures.push(machine_figure(
            sc,
            test,
            "ebpf",
            per_config(&|r| r.ebpf_cpu_secs.map(|e| e / r.wall_secs)),
        ));
    }
    let rss = |field: &str| -> [Option<f64>; 5] {
        Config::ALL.map(|c| {
            median(
                memory
                    .iter()
                    .filter(|m| m["config"] == c.key())
                    .filter_map(|m| m[field].as_f64())
                    .map(|b| b / (1024.0 * 1024.0))
                    .collect(),
            )
        })
    };
    // The agents' memory is compared between the configurations that ran the same tests: the
    // waypoint configuration's agents carried the HTTP test only (its samples stay in `memory`).
    let agents_rss = |field: &str| {
        let mut values = rss(field);
        values[3] = None;
        values
    };
    figures.push(figure(
        "both nodes",
        "rss.idle_mib",
        "proxy RSS idle, sum of 2 nodes (MiB)",
        Better::Lower,
        agents_rss("rss_idle_bytes"),
        false,
    ));
    figures.push(figure(
        "both nodes",
        "rss.after_load_mib",
        "proxy RSS after load, sum of 2 nodes (MiB)",
        Better::Lower,
        agents_rss("rss_after_load_bytes"),
        false,
    ));
    figures.push(figure(
        "both nodes",
        "idle_conn_bytes",
        "proxy memory per idle connection (bytes)",
        Better::Lower,
        Config::ALL.map(|c| {
            median(
                memory
                    .iter()
                    .filter(|m| m["config"] == c.key())
                    .filter_map(|m| m["idle_conn_bytes"].as_f64())
                    .collect(),
            )
        }),
        false,
    ));
    // The part of RSS that is the process's own (heap, stacks): the rest is pages of the
    // mapped binary, shared with every process running it and reclaimable by the kernel.
    figures.push(figure(
        "both nodes",
        "rss.anon_idle_mib",
        "proxy RSS idle, anonymous only (MiB)",
        Better::Lower,
        agents_rss("rss_anon_idle_bytes"),
        false,
    ));
    figures.push(figure(
        "both nodes",
        "rss.anon_after_load_mib",
        "proxy RSS after load, anonymous only (MiB)",
        Better::Lower,
        agents_rss("rss_anon_after_load_bytes"),
        false,
    ));

    // The waypoint process alone (the waypoint configuration's samples only).
    if memory.iter().any(|m| m["config"] == Config::Waypoint.key()) {
        for (key, label, field) in [
            (
                "waypoint.rss_idle_mib",
                "waypoint RSS idle (MiB)",
                "waypoint_rss_idle_bytes",
            ),
            (
                "waypoint.rss_after_load_mib",
                "waypoint RSS after load (MiB)",
                "waypoint_rss_after_load_bytes",
            ),
            (
                "waypoint.rss_anon_idle_mib",
                "waypoint RSS idle, anon. only (MiB)",
                "waypoint_rss_anon_idle_bytes",
            ),
            (
                "waypoint.rss_anon_after_load_mib",
                "waypoint RSS after load, anon. only (MiB)",
                "waypoint_rss_anon_after_load_bytes",
            ),
        ] {
            figures.push(l7_figure(
                "waypoint",
                key,
                label,
                Better::Lower,
                rss(field),
                false,
            ));
        }
    }

    let runs_json: Vec<Value> = runs
        .iter()
        .map(|r| {
            let mut result = r.result.clone();
            if let Some(obj) = result.as_object_mut() {
                // The histograms are in the figures already; raw buckets would bury the rest.
                obj.remove("hist");
            }
            json!({
                "round": r.round,
                "config": r.config.key(),
                "scenario": r.scenario.key(),
                "test": r.test.key(),
                "wall_secs": r.wall_secs,
                "proxy_cpu_secs": r.proxy_cpu_secs,
                "waypoint_cpu_secs": r.waypoint_cpu_secs,
                "ebpf_cpu_secs": r.ebpf_cpu_secs,
                "machine_vcpus": r.machine_vcpus,
                "result": result,
            })
        })
        .collect();
    Ok(json!({
        "machine": machine,
        "settings": settings,
        "figures": figures,
        "memory": memory,
        "runs": runs_json,
    }))
}
