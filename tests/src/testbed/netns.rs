//! Network namespaces: the [`Netns`] handle, running code inside one, and the `ip` command.
//!
//! Namespaces are named ones (`ip netns add`), so they live as bind mounts in `/run/netns` and
//! outlive any process, which is what lets teardown and the stale sweep find them by name.
//! All configuration goes through `ip -n NAME ...`, never through the root namespace.

use std::{fs::File, path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};
use parking_lot::Mutex;

/// Directory where `ip netns` keeps its namespace mounts.
pub const NETNS_DIR: &str = "/run/netns";

/// Serialises `ip netns add` inside this process: the first call on a fresh machine sets up
/// the `/run/netns` mount, and two racing first calls could mount it twice.
static NETNS_ADD_LOCK: Mutex<()> = Mutex::new(());

/// A named network namespace created by the testbed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Refers to an existing namespace by name (does not create it).
    pub fn from_name(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }

    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, the file to open for `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// Runs `f` on a fresh thread that has first joined this namespace, and returns its result.
    ///
    /// Sockets keep the namespace they were created in, so a listener or connection made in
    /// `f` can be returned and used from any thread. A panic in `f` is re-raised here so that
    /// test assertions inside `f` behave normally. Errors only if the namespace can't be
    /// entered.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = self.path();
        let file =
            File::open(&path).with_context(|| format!("opening netns {}", path.display()))?;
        std::thread::scope(|scope| {
            let handle = scope.spawn(move || -> Result<T> {
                // Only this thread changes namespace; it ends when `f` returns.
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("setns into {}", path.display()))?;
                Ok(f())
            });
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs `ip -n NAME ARGS...` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Writes a sysctl (e.g. `net/ipv4/ip_forward`) inside this namespace.
    ///
    /// `/proc/sys/net` resolves against the opening thread's namespace, so a thread in the
    /// namespace can write it directly; this avoids `ip netns exec` and a `sysctl` process.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = PathBuf::from("/proc/sys").join(key);
        self.run(|| std::fs::write(&path, value))?
            .with_context(|| format!("writing {value} to {} in {}", path.display(), self.name))
    }

    /// Creates the named namespace with `lo` up.
    pub(crate) fn create(name: &str) -> Result<Self> {
        {
            let _guard = NETNS_ADD_LOCK.lock();
            ip(&["netns", "add", name])?;
        }
        let ns = Self::from_name(name);
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Deletes the named namespace (`ip netns del`).
    pub(crate) fn delete(name: &str) -> Result<()> {
        ip(&["netns", "del", name]).map(|_| ())
    }

    /// Names of all named namespaces on the machine.
    pub fn list() -> Result<Vec<String>> {
        let entries = match std::fs::read_dir(NETNS_DIR) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).context(format!("listing {NETNS_DIR}")),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {NETNS_DIR}"))?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }
}

/// Runs the `ip` command with `args`, failing with its stderr if it exits non-zero.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
