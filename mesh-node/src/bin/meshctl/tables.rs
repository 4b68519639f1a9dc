//! Tables from an agent's config dump (`/config_dump` JSON).
//!
//! Rendering works on the JSON rather than on the agent's types, so that a `meshctl` of one
//! version can read an agent of another: a missing field prints as `-`, never as an error.

use std::time::{SystemTime, UNIX_EPOCH};

use comfy_table::{CellAlignment, ContentArrangement, Table, presets};
use serde_json::Value;

/// A cell's text: strings as they are, absent values as `-`, the rest as JSON.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn list(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

fn joined(v: &Value) -> String {
    let parts: Vec<String> = list(v).map(cell).collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

/// `1h05m`, `42s`: how long until a Unix time, or `expired`.
fn remaining(secs: u64) -> String {
    if secs == 0 {
        return "expired".into();
    }
    match secs {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

fn ago(unix: Option<u64>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match unix {
        Some(t) if t <= now => format!("{} ago", remaining((now - t).max(1))),
        Some(_) => "just now".into(),
        None => "never".into(),
    }
}

/// Left-aligned columns separated by two spaces, no borders, no trailing spaces; the first row
/// is the header. Column widths are display widths, so wide characters still line up.
pub fn render(rows: &[Vec<String>]) -> String {
    let mut table = Table::new();
    // Never wrapped to the terminal: the output is the same on a terminal and in a pipe.
    table
        .load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled);
    let mut rows = rows.iter();
    if let Some(header) = rows.next() {
        table.set_header(header.clone());
    }
    table.add_rows(rows.cloned());
    let columns = table.column_count();
    for (i, column) in table.column_iter_mut().enumerate() {
        let gap = if i + 1 < columns { 2 } else { 0 };
        column.set_padding((0, gap));
        column.set_cell_alignment(CellAlignment::Left);
    }
    let mut out = String::new();
    for line in table.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn header(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

pub fn workloads(dump: &Value) -> String {
    let mut rows = vec![header(&[
        "NAMESPACE",
        "NAME",
        "NODE",
        "IPS",
        "MESH",
        "IDENTITY",
    ])];
    for w in list(&dump["workloads"]) {
        rows.push(vec![
            cell(&w["namespace"]),
            cell(&w["name"]),
            cell(&w["node"]),
            joined(&w["ips"]),
            if w["enrolled"] == true { "yes" } else { "no" }.into(),
            cell(&w["identity"]),
        ]);
    }
    render(&rows)
}

pub fn services(dump: &Value) -> String {
    let mut rows = vec![header(&[
        "NAMESPACE",
        "NAME",
        "VIPS",
        "PORTS",
        "ENDPOINTS",
        "READY",
    ])];
    for s in list(&dump["services"]) {
        let ports: Vec<String> = list(&s["ports"])
            .map(|p| format!("{}->{}", cell(&p["port"]), cell(&p["target_port"])))
            .collect();
        let endpoints: Vec<&Value> = list(&s["endpoints"]).collect();
        let ready = endpoints.iter().filter(|e| e["ready"] == true).count();
        rows.push(vec![
            cell(&s["namespace"]),
            cell(&s["name"]),
            joined(&s["vips"]),
            if ports.is_empty() {
                "-".into()
            } else {
                ports.join(",")
            },
            endpoints
                .iter()
                .map(|e| format!("{}@{}", cell(&e["ip"]), cell(&e["node"])))
                .collect::<Vec<_>>()
                .join(","),
            format!("{ready}/{}", endpoints.len()),
        ]);
    }
    render(&rows)
}

pub fn certificates(dump: &Value) -> String {
    let mut rows = vec![header(&["IDENTITY", "SERIAL", "EXPIRES IN", "RENEWS"])];
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for c in list(&dump["certificates"]) {
        let renews = match c["renew_at"].as_u64() {
            Some(t) if t > now => format!("in {}", remaining(t - now)),
            Some(_) => "due".into(),
            None => "-".into(),
        };
        rows.push(vec![
            cell(&c["identity"]),
            cell(&c["serial"]),
            remaining(c["expires_in_secs"].as_u64().unwrap_or(0)),
            renews,
        ]);
    }
    let mut out = render(&rows);
    if let Some(errors) = dump["certificate_errors"]
        .as_object()
        .filter(|e| !e.is_empty())
    {
        out.push_str("\nFAILING\n");
        let mut rows = vec![header(&["IDENTITY", "LAST ERROR"])];
        rows.extend(errors.iter().map(|(id, e)| vec![id.clone(), cell(e)]));
        out.push_str(&render(&rows));
    }
    out
}

pub fn status(dump: &Value) -> String {
    let mut out = format!(
        "node {}  trust domain {}  mode {}  ready {}\n",
        cell(&dump["node"]),
        cell(&dump["trust_domain"]),
        cell(&dump["mode"]),
        if dump["ready"] == true { "yes" } else { "no" },
    );
    let cp = &dump["control_plane"];
    if cp.is_object() {
        out.push_str(&format!(
            "control plane {}  {}  last update {} (version {})  streams opened {}\n",
            cell(&cp["address"]),
            if cp["connected"] == true {
                "connected"
            } else {
                "DISCONNECTED (serving the last state)"
            },
            ago(cp["last_update"].as_u64()),
            cell(&cp["last_version"]),
            cell(&cp["streams"]),
        ));
        if !cp["last_error"].is_null() {
            out.push_str(&format!("  last error: {}\n", cell(&cp["last_error"])));
        }
        for r in list(&cp["rejected"]) {
            out.push_str(&format!(
                "  rejected {}: {}\n",
                cell(&r["key"]),
                cell(&r["reason"])
            ));
        }
    }
    let workloads: Vec<&Value> = list(&dump["workloads"]).collect();
    let node = dump["node"].as_str().unwrap_or_default();
    let local = workloads.iter().filter(|w| w["node"] == node).count();
    let meshed = workloads
        .iter()
        .filter(|w| w["node"] == node && w["enrolled"] == true)
        .count();
    out.push_str(&format!(
        "workloads {} known, {local} on this node, {meshed} of them in the mesh; services {}; certificates {}\n",
        workloads.len(),
        list(&dump["services"]).count(),
        list(&dump["certificates"]).count(),
    ));
    if let Some(dp) = dump["datapath"].as_object() {
        let pending: Vec<String> = list(&dp["pending_cgroups"])
            .map(|p| format!("{}/{}", cell(&p["namespace"]), cell(&p["name"])))
            .collect();
        out.push_str(&format!(
            "datapath pinned at {}; {} pod cgroups redirected",
            cell(&dp["pin_dir"]),
            list(&dp["enrolled_cgroups"]).count(),
        ));
        if !pending.is_empty() {
            out.push_str(&format!(
                "; cgroup not found yet for {}",
                pending.join(", ")
            ));
        }
        out.push('\n');
        if let Some(events) = dp["events"].as_object() {
            let events: Vec<String> = events.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("datapath events {}\n", events.join(" ")));
        }
    }
    out
}

/// `meshctl policy list`: every policy the agent enforces and its `Accepted` condition.
pub fn policies(dump: &Value) -> String {
    let mut rows = vec![header(&[
        "KIND",
        "POLICY",
        "GENERATION",
        "ACCEPTED",
        "REASON",
        "MESSAGE",
    ])];
    for p in list(&dump["policies"]) {
        let c = &p["condition"];
        rows.push(vec![
            cell(&p["kind"]),
            cell(&p["id"]),
            cell(&p["generation"]),
            cell(&c["status"]),
            cell(&c["reason"]),
            cell(&c["message"]),
        ]);
    }
    render(&rows)
}

/// `meshctl policy explain`: the verdict first, then who, and what decided.
pub fn explanation(e: &Value) -> String {
    let party = |p: &Value| {
        format!(
            "{} ({}{}) at {}",
            cell(&p["pod"]),
            cell(&p["identity"]),
            if p["enrolled"] == true {
                ""
            } else {
                ", not in the mesh"
            },
            cell(&p["ip"]),
        )
    };
    let mut out = format!("{}\n", cell(&e["reason"]));
    out.push_str(&format!("  from        {}\n", party(&e["source"])));
    out.push_str(&format!(
        "  to          {} port {}\n",
        party(&e["destination"]),
        cell(&e["port"])
    ));
    out.push_str(&format!("  connection  {}\n", cell(&e["connection"])));
    if !e["policy"].is_null() {
        out.push_str(&format!(
            "  decided by  {} rule {}\n",
            cell(&e["policy"]),
            cell(&e["rule"])
        ));
    }
    if let Some(waypoints) = e["waypoints"].as_array().filter(|w| !w.is_empty()) {
        let names: Vec<String> = waypoints.iter().map(cell).collect();
        out.push_str(&format!(
            "  waypoint    only through {}\n",
            names.join(", ")
        ));
    }
    out.push_str(&format!(
        "  mTLS mode   {} ({})\n",
        cell(&e["mtls_mode"]),
        if e["mtls_policy"].is_null() {
            "no PeerAuthentication applies".to_owned()
        } else {
            format!("from PeerAuthentication {}", cell(&e["mtls_policy"]))
        }
    ));
    if !e["waypoint"].is_null() {
        let policies: Vec<&str> = list(&e["waypoint_policies"])
            .filter_map(Value::as_str)
            .collect();
        out.push_str(&format!(
            "  waypoint    {}: HTTP requests (to a Service's address or the pod's) are also judged by {}\n",
            cell(&e["waypoint"]),
            if policies.is_empty() {
                "no AuthorizationPolicy".to_owned()
            } else {
                policies.join(", ")
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn dump() -> Value {
        json!({
            "node": "node-0", "trust_domain": "cluster.local", "mode": "control_plane", "ready": true,
            "control_plane": {"address": "10.0.0.1:15012", "connected": false, "last_version": 7,
                               "last_update": 1, "last_error": "transport error", "streams": 2,
                               "rejected": [{"key": "workload/x", "reason": "bad ip"}]},
            "workloads": [
                {"namespace": "shop", "name": "web", "node": "node-0", "ips": ["10.1.0.5"],
                 "enrolled": true, "identity": "spiffe://cluster.local/ns/shop/sa/web"},
                {"namespace": "shop", "name": "db", "node": "node-1", "ips": [], "enrolled": false,
                 "identity": "spiffe://cluster.local/ns/shop/sa/db"}
            ],
            "services": [{"namespace": "shop", "name": "web", "vips": ["10.96.0.10"],
                          "ports": [{"port": 80, "target_port": 8080}],
                          "endpoints": [{"ip": "10.1.0.5", "node": "node-0", "ready": true},
                                        {"ip": "10.1.1.5", "node": "node-1", "ready": false}]}],
            "certificates": [{"identity": "spiffe://cluster.local/ns/shop/sa/web", "serial": "0a",
                              "expires_in_secs": 3700, "renew_at": 0}],
            "certificate_errors": {"spiffe://cluster.local/ns/shop/sa/api": "controller unreachable"},
            "datapath": {"pin_dir": "/sys/fs/bpf/trellis/v1", "enrolled_cgroups": [{"id": 1}],
                         "pending_cgroups": [{"namespace": "shop", "name": "late"}],
                         "events": {"redirected": 3}}
        })
    }

    #[test]
    fn columns_line_up_under_their_headers() {
        let table = render(&[
            header(&["A", "LONGER"]),
            vec!["wide cell".into(), "x".into()],
        ]);
        assert_eq!(table, "A          LONGER\nwide cell  x\n");
        let short = render(&[header(&["A", "B", "C"]), vec!["1".into()]]);
        assert_eq!(
            short, "A  B  C\n1\n",
            "a short row leaves no trailing spaces"
        );
        let wide = render(&[header(&["NAME", "X"]), vec!["日本語".into(), "y".into()]]);
        assert_eq!(wide, "NAME    X\n日本語  y\n", "widths are display columns");
    }

    #[test]
    fn workloads_show_membership_and_absent_ips() {
        let table = workloads(&dump());
        let db = table.lines().find(|l| l.contains("db")).expect("db row");
        assert!(db.contains(" - ") && db.contains(" no "), "{db}");
        assert!(table.contains("10.1.0.5  yes"), "{table}");
    }

    #[test]
    fn services_show_port_mapping_and_readiness() {
        let table = services(&dump());
        assert!(table.contains("80->8080"), "{table}");
        assert!(table.contains("10.1.0.5@node-0,10.1.1.5@node-1"), "{table}");
        assert!(table.trim_end().ends_with("1/2"), "{table}");
    }

    #[test]
    fn certificates_show_expiry_and_failures() {
        let table = certificates(&dump());
        assert!(table.contains("1h01m"), "{table}");
        assert!(table.contains("due"), "{table}");
        assert!(
            table.contains("FAILING") && table.contains("controller unreachable"),
            "{table}"
        );
    }

    #[test]
    fn status_says_what_an_operator_must_look_at() {
        let text = status(&dump());
        assert!(
            text.contains("DISCONNECTED (serving the last state)"),
            "{text}"
        );
        assert!(text.contains("last error: transport error"), "{text}");
        assert!(text.contains("rejected workload/x: bad ip"), "{text}");
        assert!(
            text.contains("1 on this node, 1 of them in the mesh"),
            "{text}"
        );
        assert!(
            text.contains("cgroup not found yet for shop/late"),
            "{text}"
        );
    }

    #[test]
    fn an_older_or_partial_dump_still_prints() {
        let empty = json!({});
        for text in [
            status(&empty),
            workloads(&empty),
            services(&empty),
            certificates(&empty),
        ] {
            assert!(!text.is_empty());
        }
    }
}
