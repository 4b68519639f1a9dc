//! `meshctl check --pre`: the node checks a platform team runs before installing, and that
//! the agent runs before it touches the kernel.

use std::process::Command;

use mesh_tests::testbed::{BPFFS, bin_path, cgroup2_mount, e2e_gate};
use serde_json::Value;

/// Runs `meshctl check --pre -o json` with `args`; returns the exit code and the findings.
fn check(args: &[&str]) -> (i32, Vec<Value>) {
    let meshctl = bin_path("meshctl").expect("meshctl built (cargo build --bins)");
    let out = Command::new(meshctl)
        .args(["check", "--pre", "-o", "json"])
        .args(args)
        .output()
        .expect("meshctl runs");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "meshctl printed no JSON report ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let findings = report["findings"].as_array().cloned().unwrap_or_default();
    (out.status.code().unwrap_or(-1), findings)
}

fn level<'a>(findings: &'a [Value], code: &str) -> &'a str {
    findings
        .iter()
        .find(|f| f["code"] == code)
        .and_then(|f| f["level"].as_str())
        .unwrap_or_else(|| panic!("no finding {code} in {findings:?}"))
}

/// A pin directory for this test only, on the machine's bpffs; the check must leave nothing.
fn scratch_pin_dir() -> std::path::PathBuf {
    std::path::Path::new(BPFFS).join(format!("trellis-preflight-{}", std::process::id()))
}

#[test]
fn this_machine_passes_every_check() {
    if !e2e_gate("this_machine_passes_every_check") {
        return;
    }
    let cgroup_root = cgroup2_mount().expect("cgroup v2 mount");
    let pin_dir = scratch_pin_dir();
    let (code, findings) = check(&[
        "--cgroup-root",
        &cgroup_root.display().to_string(),
        "--pin-dir",
        &pin_dir.display().to_string(),
    ]);
    for f in &findings {
        assert_ne!(f["level"], "fail", "{f}");
    }
    assert_eq!(level(&findings, "TRL005"), "pass", "programs load");
    assert_eq!(code, 0);
    assert!(
        !pin_dir.exists(),
        "the program probe left {pin_dir:?} behind"
    );
}

#[test]
fn a_fake_cgroup_root_or_a_missing_bpffs_fails_with_its_code() {
    if !e2e_gate("a_fake_cgroup_root_or_a_missing_bpffs_fails_with_its_code") {
        return;
    }
    let plain = std::env::temp_dir().join(format!("trellis-preflight-{}", std::process::id()));
    std::fs::create_dir_all(&plain).expect("scratch dir");
    let cgroup_root = cgroup2_mount().expect("cgroup v2 mount");

    // A directory that is not cgroup v2, with a real bpffs.
    let pin_dir = scratch_pin_dir();
    let (code, findings) = check(&[
        "--cgroup-root",
        &plain.display().to_string(),
        "--pin-dir",
        &pin_dir.display().to_string(),
    ]);
    assert_eq!(level(&findings, "TRL002"), "fail");
    assert_eq!(level(&findings, "TRL003"), "pass");
    assert_eq!(code, 1);

    // A real cgroup root, but the pin directory is not on bpffs.
    let (code, findings) = check(&[
        "--cgroup-root",
        &cgroup_root.display().to_string(),
        "--pin-dir",
        &plain.join("bpf").display().to_string(),
    ]);
    assert_eq!(level(&findings, "TRL002"), "pass");
    assert_eq!(level(&findings, "TRL003"), "fail");
    assert_eq!(
        level(&findings, "TRL005"),
        "fail",
        "programs are not tried on a broken node"
    );
    assert_eq!(code, 1);
    let _ = std::fs::remove_dir_all(&plain);
}
