//! From runs to figures: the JSON report and the terminal table.
//!
//! Rates (Gbit/s, connections/s) and CPU figures are the median over rounds, so one disturbed
//! round does not move them; latency percentiles come from the rounds' histograms merged, so
//! p99.9 and max see every sample. Ratios are Trellis over no mesh and over the relay floor of
//! the same run; "added" is Trellis's (and the relay's) latency minus no mesh's.

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
    /// CPU time of the proxy processes in that window (none without a proxy).
    pub proxy_cpu_secs: Option<f64>,
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
            Test::Connect => format!(
                "{:.0} conn/s ({} failed)",
                num(&r["per_s"]),
                r["failed"].as_u64().unwrap_or(0)
            ),
        };
        match self.proxy_cpu_secs {
            Some(cpu) => format!("{main}; proxy CPU {cpu:.2} s in {:.1} s", self.wall_secs),
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

/// One row: a figure for each configuration and the ratios.
fn figure(
    scenario: &str,
    key: &str,
    label: &str,
    better: Better,
    [no_mesh, relay, trellis]: [Option<f64>; 3],
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
        "trellis_over_no_mesh": ratio(trellis, no_mesh),
        "trellis_over_relay": ratio(trellis, relay),
        "trellis_added_over_no_mesh": added(trellis),
        "relay_added_over_no_mesh": added(relay),
    })
}

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
        let per_config = |f: &dyn Fn(&Run) -> Option<f64>| -> [Option<f64>; 3] {
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
                let mut merged: Vec<Option<Histogram<u64>>> = Vec::new();
                for c in Config::ALL {
                    let runs = of(c);
                    if runs.is_empty() {
                        merged.push(None);
                        continue;
                    }
                    let mut h = new_histogram()?;
                    for r in runs {
                        h.add(histogram_from_buckets(&r.result["hist"])?)
                            .context("merging round histograms")?;
                    }
                    merged.push(Some(h));
                }
                let q = |quantile: Option<f64>| -> [Option<f64>; 3] {
                    let mut out = [None; 3];
                    for (slot, h) in out.iter_mut().zip(&merged) {
                        *slot = h.as_ref().filter(|h| !h.is_empty()).map(|h| {
                            let ns = match quantile {
                                Some(q) => h.value_at_quantile(q),
                                None => h.max(),
                            };
                            ns as f64 / 1000.0
                        });
                    }
                    out
                };
                let rr = "1 KiB req/resp @1000 rps, 4 conns";
                for (key, label, quantile) in [
                    ("p50_us", "p50", Some(0.5)),
                    ("p90_us", "p90", Some(0.9)),
                    ("p99_us", "p99", Some(0.99)),
                    ("p999_us", "p99.9", Some(0.999)),
                    ("max_us", "max", None),
                ] {
                    figures.push(figure(
                        sc,
                        &format!("rr.{key}"),
                        &format!("{rr}: {label} (us)"),
                        Better::Lower,
                        q(quantile),
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
    let rss = |field: &str| -> [Option<f64>; 3] {
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
    figures.push(figure(
        "both nodes",
        "rss.idle_mib",
        "proxy RSS idle, sum of 2 nodes (MiB)",
        Better::Lower,
        rss("rss_idle_bytes"),
        false,
    ));
    figures.push(figure(
        "both nodes",
        "rss.after_load_mib",
        "proxy RSS after load, sum of 2 nodes (MiB)",
        Better::Lower,
        rss("rss_after_load_bytes"),
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
        rss("rss_anon_idle_bytes"),
        false,
    ));
    figures.push(figure(
        "both nodes",
        "rss.anon_after_load_mib",
        "proxy RSS after load, anonymous only (MiB)",
        Better::Lower,
        rss("rss_anon_after_load_bytes"),
        false,
    ));

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

/// The terminal table: one row per scenario x metric.
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
    let mut out = format!(
        "{:<11} {:<44} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "scenario", "metric", "no-mesh", "relay", "Trellis", "T/no-mesh", "T/relay", "T added"
    );
    out.push_str(&"-".repeat(out.len().saturating_sub(1)));
    out.push('\n');
    for f in report["figures"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        out.push_str(&format!(
            "{:<11} {:<44} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            f["scenario"].as_str().unwrap_or(""),
            f["metric"].as_str().unwrap_or(""),
            fmt(&f["no_mesh"]),
            fmt(&f["relay"]),
            fmt(&f["trellis"]),
            ratio(&f["trellis_over_no_mesh"]),
            ratio(&f["trellis_over_relay"]),
            added(&f["trellis_added_over_no_mesh"]),
        ));
    }
    out
}
