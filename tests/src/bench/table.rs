//! The report as terminal tables: the byte-stream tests (no mesh, relay floor, Trellis and a
//! `--peer` if given), the L7 table (no mesh, Trellis at L4, Trellis through a waypoint) when
//! the HTTP test ran, and the machine table (whole-machine CPU by kind and the eBPF programs'
//! run time, per test).

use serde_json::Value;

/// Width of the metric column.
const METRIC: usize = 50;

fn fmt(v: &Value) -> String {
    match v.as_f64() {
        None => "-".to_owned(),
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) if x.abs() >= 0.1 => format!("{x:.2}"),
        Some(x) => format!("{x:.3}"),
    }
}

fn ratio(v: &Value) -> String {
    v.as_f64().map_or("-".to_owned(), |x| format!("{x:.2}x"))
}

fn added(v: &Value) -> String {
    v.as_f64().map_or(String::new(), |x| format!("{x:+.0}"))
}

fn header(cells: &[&str], width: usize) -> String {
    let mut line = format!("{:<11} {:<METRIC$}", cells[0], cells[1]);
    for c in &cells[2..] {
        line.push_str(&format!(" {c:>width$}"));
    }
    line.push('\n');
    line.push_str(&"-".repeat(line.len().saturating_sub(1)));
    line.push('\n');
    line
}

fn row(scenario: &str, metric: &str, cells: &[String], width: usize) -> String {
    let mut line = format!("{scenario:<11} {metric:<METRIC$}");
    for c in cells {
        line.push_str(&format!(" {c:>width$}"));
    }
    // Rows without an added-latency figure would end in blanks.
    let mut line = line.trim_end().to_owned();
    line.push('\n');
    line
}

fn text<'a>(f: &'a Value, key: &str) -> &'a str {
    f[key].as_str().unwrap_or("")
}

/// The tables, one row per scenario x metric (machine table: per scenario x test).
pub fn table(report: &Value) -> String {
    let figures = report["figures"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let in_table = |name: &str| -> Vec<&Value> {
        figures
            .iter()
            .filter(|f| f["table"].as_str().unwrap_or("l4") == name)
            .collect()
    };
    let (l4, l7, machine) = (in_table("l4"), in_table("l7"), in_table("machine"));
    let peer = figures.iter().any(|f| !f["peer"].is_null());
    let mut sections = Vec::new();
    if !l4.is_empty() {
        sections.push(l4_table(&l4, peer));
    }
    if !l7.is_empty() {
        sections.push(l7_table(&l7));
    }
    if !machine.is_empty() {
        sections.push(machine_table(&machine, peer));
    }
    sections.join("\n")
}

fn l4_table(figures: &[&Value], peer: bool) -> String {
    let mut cells = vec![
        "scenario",
        "metric",
        "no-mesh",
        "relay",
        "Trellis",
        "T/no-mesh",
        "T/relay",
    ];
    if peer {
        cells.extend(["peer", "P/no-mesh", "T/peer"]);
    }
    cells.push("T added");
    if peer {
        cells.push("P added");
    }
    let mut out = header(&cells, 9);
    for f in figures {
        let mut cells = vec![
            fmt(&f["no_mesh"]),
            fmt(&f["relay"]),
            fmt(&f["trellis"]),
            ratio(&f["trellis_over_no_mesh"]),
            ratio(&f["trellis_over_relay"]),
        ];
        if peer {
            cells.extend([
                fmt(&f["peer"]),
                ratio(&f["peer_over_no_mesh"]),
                ratio(&f["trellis_over_peer"]),
            ]);
        }
        cells.push(added(&f["trellis_added_over_no_mesh"]));
        if peer {
            cells.push(added(&f["peer_added_over_no_mesh"]));
        }
        out.push_str(&row(text(f, "scenario"), text(f, "metric"), &cells, 9));
    }
    out
}

fn l7_table(figures: &[&Value]) -> String {
    // 10 wide for the longer headings.
    let mut out = header(
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
    );
    for f in figures {
        let cells = [
            fmt(&f["no_mesh"]),
            fmt(&f["trellis"]),
            fmt(&f["waypoint"]),
            ratio(&f["trellis_over_no_mesh"]),
            ratio(&f["waypoint_over_no_mesh"]),
            ratio(&f["waypoint_over_trellis"]),
            added(&f["trellis_added_over_no_mesh"]),
            added(&f["waypoint_added_over_no_mesh"]),
        ];
        out.push_str(&row(text(f, "scenario"), text(f, "metric"), &cells, 10));
    }
    out
}

/// One row per scenario x test: each configuration's user/system/softirq vCPUs and the
/// Trellis eBPF run time in vCPUs.
fn machine_table(figures: &[&Value], peer: bool) -> String {
    let mut configs = vec![
        ("no_mesh", "no-mesh"),
        ("relay", "relay"),
        ("trellis", "Trellis"),
        ("waypoint", "waypoint"),
    ];
    if peer {
        configs.push(("peer", "peer"));
    }
    // Only the configurations that ran one of these tests.
    configs.retain(|(key, _)| figures.iter().any(|f| !f[*key].is_null()));
    let mut cells = vec!["scenario", "test: machine vCPU user/sys/softirq"];
    cells.extend(configs.iter().map(|(_, name)| *name));
    cells.push("T eBPF");
    let mut out = header(&cells, 14);
    let find = |scenario: &str, test: &str, kind: &str| {
        figures.iter().copied().find(|f| {
            f["scenario"] == scenario
                && f["test"] == test
                && f["key"] == format!("{test}.machine_vcpu.{kind}").as_str()
        })
    };
    for f in figures.iter().filter(|f| {
        f["key"]
            .as_str()
            .is_some_and(|k| k.ends_with(".machine_vcpu.user"))
    }) {
        let (scenario, test) = (text(f, "scenario"), text(f, "test"));
        let kinds = [
            find(scenario, test, "user"),
            find(scenario, test, "system"),
            find(scenario, test, "softirq"),
        ];
        let mut cells: Vec<String> = configs
            .iter()
            .map(|(key, _)| {
                if kinds.iter().all(|k| k.is_none_or(|k| k[*key].is_null())) {
                    return "-".to_owned();
                }
                kinds
                    .iter()
                    .map(|k| {
                        k.map_or("-".to_owned(), |k| {
                            format!("{:.2}", k[*key].as_f64().unwrap_or(f64::NAN))
                        })
                    })
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .collect();
        cells.push(find(scenario, test, "ebpf").map_or("-".to_owned(), |e| fmt(&e["trellis"])));
        out.push_str(&row(scenario, test, &cells, 14));
    }
    out
}
