//! `mesh-node node-init`: the agent DaemonSet's init step, which mounts bpffs on the node when
//! nothing is mounted there, and does nothing on every later run.

use std::{path::Path, process::Command};

use mesh_node::ebpf::is_on_bpffs;
use mesh_tests::testbed::{bin_path, e2e_gate};
use nix::mount::{MntFlags, umount2};

/// How many mounts sit exactly at `path` (a second mount on top would be a leak).
fn mounts_at(path: &Path) -> usize {
    let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let wanted = path.display().to_string();
    table
        .lines()
        .filter(|line| line.split(' ').nth(4) == Some(wanted.as_str()))
        .count()
}

fn node_init(path: &Path) -> (bool, String) {
    let mesh_node = bin_path("mesh-node").expect("mesh-node built (cargo build --bins)");
    let out = Command::new(mesh_node)
        .args(["node-init", "--bpffs"])
        .arg(path)
        .output()
        .expect("mesh-node runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), log)
}

/// Unmounts the scratch bpffs and removes the directory, even when an assertion failed.
struct Scratch<'a>(&'a Path);

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        // Bounded: node-init mounts at most once per run, and the test runs it twice.
        for _ in 0..4 {
            if umount2(self.0, MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
        let _ = std::fs::remove_dir(self.0);
    }
}

#[test]
fn node_init_mounts_bpffs_once_and_is_idempotent() {
    if !e2e_gate("node_init_mounts_bpffs_once_and_is_idempotent") {
        return;
    }
    // A scratch directory on a non-bpf filesystem, like /sys/fs/bpf on a fresh node (sysfs).
    let dir = std::env::temp_dir().join(format!("trellis-node-init-{}", std::process::id()));
    let _cleanup = Scratch(&dir);
    assert!(
        !dir.exists(),
        "scratch directory {dir:?} left by an earlier run"
    );
    assert!(
        !is_on_bpffs(&dir).expect("statfs"),
        "the temp dir is not on bpffs"
    );

    // First run: creates the directory and mounts bpffs there.
    let (ok, log) = node_init(&dir);
    assert!(ok, "node-init failed: {log}");
    assert!(is_on_bpffs(&dir).expect("statfs"), "bpffs mounted: {log}");
    assert_eq!(mounts_at(&dir), 1, "one mount");
    assert!(log.contains("mounted bpffs"), "{log}");

    // Second run (a restarted pod): nothing to do, no second mount stacked on the first.
    let (ok, log) = node_init(&dir);
    assert!(ok, "second node-init failed: {log}");
    assert!(log.contains("already mounted"), "{log}");
    assert_eq!(mounts_at(&dir), 1, "still one mount");

    // The mount is a usable bpffs: the agent's pin directory can be created in it.
    let pins = dir.join("trellis");
    std::fs::create_dir(&pins).expect("a directory on the new bpffs");
    let (ok, log) = node_init(&pins);
    assert!(ok && log.contains("already mounted"), "{log}");
    assert_eq!(
        mounts_at(&pins),
        0,
        "no mount on top of a bpffs subdirectory"
    );
    std::fs::remove_dir(&pins).expect("remove pin dir");
}

#[test]
fn node_init_explains_a_path_it_cannot_mount() {
    if !e2e_gate("node_init_explains_a_path_it_cannot_mount") {
        return;
    }
    // A regular file cannot become a mount point for a directory filesystem.
    let file = std::env::temp_dir().join(format!("trellis-node-init-file-{}", std::process::id()));
    std::fs::write(&file, b"").expect("scratch file");
    let (ok, log) = node_init(&file);
    std::fs::remove_file(&file).expect("remove scratch file");
    assert!(!ok, "node-init must fail: {log}");
    assert!(
        log.contains(&file.display().to_string()),
        "names the path: {log}"
    );
}
