//! Whether this machine can run end-to-end tests, and what a test does when it cannot.
//!
//! The testbed needs root, cgroup v2, iproute2 and a bpffs at `/sys/fs/bpf`. Tests call
//! [`e2e_gate`] first: on a machine without these they are skipped with a message, unless
//! `MESH_E2E=require` (CI on the real test hosts), where a skip would hide a broken setup.

use std::{process::Command, sync::OnceLock};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

use super::cgroup;

/// Where the agent pins its maps and programs.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Returns true if end-to-end tests can run here.
///
/// Otherwise panics naming what is missing when `MESH_E2E=require`, or prints
/// `skipping TEST: REASON` to stderr and returns false. Mounts bpffs at `/sys/fs/bpf` if
/// nothing is mounted there. The checks run once per process.
pub fn e2e_gate(test_name: &str) -> bool {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    match RESULT.get_or_init(check) {
        Ok(()) => true,
        Err(reason) => {
            if std::env::var("MESH_E2E").is_ok_and(|v| v == "require") {
                panic!("MESH_E2E=require but {test_name} cannot run: {reason}");
            }
            eprintln!("skipping {test_name}: {reason}");
            false
        }
    }
}

/// Runs every check and returns all the reasons that failed, joined.
fn check() -> Result<(), String> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("not running as root".to_owned());
    }
    if let Err(e) = cgroup::cgroup2_mount() {
        missing.push(format!("{e:#}"));
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => missing.push(format!("`ip -V` failed ({})", out.status)),
        Err(e) => missing.push(format!("iproute2 `ip` not runnable: {e}")),
    }
    if let Err(e) = ensure_bpffs() {
        missing.push(e);
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join("; "))
    }
}

fn is_bpffs() -> bool {
    statfs(BPFFS).is_ok_and(|st| st.filesystem_type() == BPF_FS_MAGIC)
}

/// Makes sure bpffs is mounted at [`BPFFS`], mounting it if needed.
fn ensure_bpffs() -> Result<(), String> {
    if is_bpffs() {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS).map_err(|e| format!("cannot create {BPFFS}: {e}"))?;
    mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| format!("{BPFFS} is not bpffs and mounting it failed: {e}"))?;
    // Another process may have mounted it at the same moment; either way it must be bpffs now.
    if is_bpffs() {
        Ok(())
    } else {
        Err(format!("{BPFFS} is still not bpffs after mounting"))
    }
}
