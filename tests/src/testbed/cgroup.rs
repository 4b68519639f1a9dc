//! cgroup v2 directories: finding the cgroup2 mount, creating, killing and removing trees.
//!
//! The testbed enables no controllers; cgroups are used only as the attachment points for
//! the agent's eBPF programs and as a reliable way to find and kill every process a testbed
//! started (`cgroup.kill` also reaches processes that forked away from their parent).

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};

/// Where cgroup2 may be mounted, in order of preference (hybrid layout first).
const CANDIDATES: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];

/// Returns the cgroup2 mount point, or an error naming the places that were checked.
pub fn cgroup2_mount() -> Result<PathBuf> {
    for candidate in CANDIDATES {
        if let Ok(st) = statfs(candidate)
            && st.filesystem_type() == CGROUP2_SUPER_MAGIC
        {
            return Ok(PathBuf::from(candidate));
        }
    }
    bail!(
        "no cgroup2 filesystem mounted at {} (the testbed needs cgroup v2)",
        CANDIDATES.join(" or ")
    )
}

/// The cgroup v2 path of `pid` relative to the cgroup2 mount (`/a/b`), read from
/// `/proc/PID/cgroup` (the `0::` line).
pub fn cgroup_of(pid: u32) -> Result<String> {
    let path = format!("/proc/{pid}/cgroup");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
        .with_context(|| format!("no cgroup v2 line in {path}: {text:?}"))
}

/// The form of `dir` that [`cgroup_of`] reports: its path below the cgroup2 mount.
pub fn relative(mount: &Path, dir: &Path) -> Result<String> {
    let rel = dir
        .strip_prefix(mount)
        .with_context(|| format!("{} is not below {}", dir.display(), mount.display()))?;
    Ok(format!("/{}", rel.display()))
}

/// Creates a cgroup directory and its parents.
pub(crate) fn create(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating cgroup {}", dir.display()))
}

/// Whether the cgroup (or any descendant) still has processes.
fn populated(dir: &Path) -> Result<bool> {
    let path = dir.join("cgroup.events");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(!text.lines().any(|l| l.trim() == "populated 0"))
}

/// Kills every process in the cgroup tree and waits (up to `timeout`) until it is empty.
/// A missing directory counts as empty.
pub(crate) fn kill_and_wait(dir: &Path, timeout: Duration) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let kill = dir.join("cgroup.kill");
    fs::write(&kill, "1").with_context(|| format!("writing 1 to {}", kill.display()))?;
    let deadline = Instant::now() + timeout;
    while populated(dir)? {
        if Instant::now() >= deadline {
            bail!(
                "cgroup {} still has processes {timeout:?} after cgroup.kill",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Removes a cgroup directory tree bottom-up (cgroupfs only allows `rmdir` of empty cgroups,
/// and its control files cannot be unlinked, so `remove_dir_all` does not work here).
pub(crate) fn remove_tree(dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if entry
            .file_type()
            .with_context(|| format!("stat {}", entry.path().display()))?
            .is_dir()
        {
            remove_tree(&entry.path())?;
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing cgroup {}", dir.display())),
    }
}
