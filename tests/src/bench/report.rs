//! From runs to figures: the JSON report and the terminal table.
//!
//! Rates (Gbit/s, connections/s) and CPU figures are the median over rounds, so one disturbed
//! round does not move them; latency percentiles come from the rounds' histograms merged, so
//! p99.9 and max see every sample. Ratios are Trellis over no mesh and over the relay floor of
//! the same run; "added" is Trellis's (and the relay's) latency minus no mesh's. The HTTP
//! test's figures (the L7 table) compare Trellis at L4 and Trellis through a waypoint with no
//! mesh, the same way, and count the waypoint's CPU and memory apart from the agents'.

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::load::{histogram_from_buckets, new_histogram};
use super::run::{Config, Scenario, Test};

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
    /// What the load generator printed.
    pub result: Value,
}

impl Run {
    /// One line for the progress log.
    pub fn summary(&self) -> String {
        let r = &self.result;
        let main = match self.test {
            Test::Bulk1 | Test::Bulk8 => format!("{:.2} Gbit/s", num(&r["gbps"])),
            Test::Rr => format!(
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
            Test::Connect => format!(
                "{:.0} conn/s ({} failed)",
                num(&r["per_s"]),
                r["failed"].as_u64().unwrap_or(0)
            ),
        };
        let main = match self.proxy_cpu_secs {
            Some(cpu) => format!("{main}; proxy CPU {cpu:.2} s in {:.1} s", self.wall_secs),
            None => main,
        };
        match self.waypoint_cpu_secs {
            Some(cpu) => format!("{main}; waypoint CPU {cpu:.2} s"),
            None => main,
        }
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
        (v[n / 2 - 1] + v[n / 2]) / 2.0
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
    [no_mesh, relay, trellis, waypoint]: [Option<f64>; 4],
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
    })
}

/// A row of the L7 table (see [`table`]).
fn l7_figure(
    scenario: &str,
    key: &str,
    label: &str,
    better: Better,
    values: [Option<f64>; 4],
    latency: bool,
) -> Value {
    let mut f = figure(scenario, key, label, better, values, latency);
    f["table"] = "l7".into();
    f
}

/// Each configuration's runs' histograms merged (`None` for a configuration without runs).
fn merged_histograms(runs: &[&Run]) -> Result<[Option<Histogram<u64>>; 4]> {
    let mut merged = [None, None, None, None];
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
fn quantile_us(merged: &[Option<Histogram<u64>>; 4], quantile: Option<f64>) -> [Option<f64>; 4] {
    let mut out = [None; 4];
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
        let per_config = |f: &dyn Fn(&Run) -> Option<f64>| -> [Option<f64>; 4] {
            Config::ALL.map(|c| median(of(c).into_iter().filter_map(f).collect()))
        };
        let cpu_rate = |r: &Run| r.proxy_cpu_secs.map(|cpu| cpu / r.wall_secs);
        match test {
            Test::Bulk1 | Test::Bulk8 => {
                let streams = if test == Test::Bulk1 {
                    "1 stream"
                } else {
                    "8 streams"
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
            Test::Rr => {
                let these: Vec<&Run> = runs
                    .iter()
                    .filter(|r| r.scenario == scenario && r.test == test)
                    .collect();
                let merged = merged_histograms(&these)?;
                let rr = "1 KiB req/resp @1000 rps, 4 conns";
                for (key, label, quantile) in LATENCY_ROWS {
                    figures.push(figure(
                        sc,
                        &format!("rr.{key}"),
                        &format!("{rr}: {label} (us)"),
                        Better::Lower,
                        quantile_us(&merged, quantile),
                        true,
                    ));
                }
                figures.push(figure(
                    sc,
                    "rr.vcpu_per_krps",
                    "req/resp, proxy vCPU per 1000 rps",
                    Better::Lower,
                    per_config(&|r| {
                        let krps = r.result["rate"].as_f64()? / 1000.0;
                        cpu_rate(r).map(|v| v / krps)
                    }),
                    false,
                ));
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
            Test::Connect => {
                figures.push(figure(
                    sc,
                    "connect.per_s",
                    "new connections/s (1-byte echo)",
                    Better::Higher,
                    per_config(&|r| r.result["per_s"].as_f64()),
                    false,
                ));
                figures.push(figure(
                    sc,
                    "connect.vcpu_per_kconn",
                    "new connections, proxy vCPU per 1000/s",
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
                        "connect.failed",
                        "failed connections (median per run)",
                        Better::Lower,
                        failed,
                        false,
                    ));
                }
            }
        }
    }
    let rss = |field: &str| -> [Option<f64>; 4] {
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

/// The terminal tables, one row per scenario x metric: the byte-stream tests (no mesh, relay
/// floor, Trellis) and, when the HTTP test ran, the L7 table (no mesh, Trellis at L4, Trellis
/// through a waypoint).
pub fn table(report: &Value) -> String {
    let fmt = |v: &Value| match v.as_f64() {
        None => "-".to_owned(),
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) if x.abs() >= 0.1 => format!("{x:.2}"),
        Some(x) => format!("{x:.3}"),
    };
    let ratio = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.2}x"));
    let added = |v: &Value| v.as_f64().map_or(String::new(), |x| format!("{x:+.0}"));
    let figures = report["figures"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let (l7, l4): (Vec<&Value>, Vec<&Value>) = figures.iter().partition(|f| f["table"] == "l7");
    // Value columns: 9 wide as always for the byte-stream table, 10 for the L7 table's
    // longer headings.
    let header = |cells: &[&str], width: usize| {
        let mut line = format!("{:<11} {:<44}", cells[0], cells[1]);
        for c in &cells[2..] {
            line.push_str(&format!(" {c:>width$}"));
        }
        line.push('\n');
        line.push_str(&"-".repeat(line.len().saturating_sub(1)));
        line.push('\n');
        line
    };
    let row = |f: &Value, cells: &[String], width: usize| {
        let mut line = format!(
            "{:<11} {:<44}",
            f["scenario"].as_str().unwrap_or(""),
            f["metric"].as_str().unwrap_or("")
        );
        for c in cells {
            line.push_str(&format!(" {c:>width$}"));
        }
        // Rows without an added-latency figure would end in blanks.
        let mut line = line.trim_end().to_owned();
        line.push('\n');
        line
    };
    let mut out = String::new();
    if !l4.is_empty() {
        out.push_str(&header(
            &[
                "scenario",
                "metric",
                "no-mesh",
                "relay",
                "Trellis",
                "T/no-mesh",
                "T/relay",
                "T added",
            ],
            9,
        ));
        for f in l4 {
            out.push_str(&row(
                f,
                &[
                    fmt(&f["no_mesh"]),
                    fmt(&f["relay"]),
                    fmt(&f["trellis"]),
                    ratio(&f["trellis_over_no_mesh"]),
                    ratio(&f["trellis_over_relay"]),
                    added(&f["trellis_added_over_no_mesh"]),
                ],
                9,
            ));
        }
    }
    if !l7.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&header(
            &[
                "scenario",
                "metric (L7)",
                "no-mesh",
                "Trellis L4",
                "waypoint",
                "L4/no-mesh",
                "W/no-mesh",
                "W/L4",
                "L4 added",
                "W added",
            ],
            10,
        ));
        for f in l7 {
            out.push_str(&row(
                f,
                &[
                    fmt(&f["no_mesh"]),
                    fmt(&f["trellis"]),
                    fmt(&f["waypoint"]),
                    ratio(&f["trellis_over_no_mesh"]),
                    ratio(&f["waypoint_over_no_mesh"]),
                    ratio(&f["waypoint_over_trellis"]),
                    added(&f["trellis_added_over_no_mesh"]),
                    added(&f["waypoint_added_over_no_mesh"]),
                ],
                10,
            ));
        }
    }
    out
}
