//! Pre-flight checks: can the agent run its datapath on this node? (And, in [`cluster`], the
//! checks after installation: is the mesh up on the cluster?)
//!
//! `meshctl check --pre` prints every check; the agent runs the hard ones before it touches
//! the kernel and refuses to start, with the same lines, when one fails. Each check has a
//! stable code (documented in the README) so that automation and support can refer to it.
//!
//! | code   | check                | fails when |
//! |--------|----------------------|------------|
//! | TRL001 | kernel version       | older than 5.8 (cgroup getpeername hooks); warns below 5.10 |
//! | TRL002 | cgroup v2            | the cgroup root is not a cgroup v2 directory |
//! | TRL003 | bpffs                | the pin directory is not on a bpf filesystem |
//! | TRL004 | capabilities         | CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN or CAP_SYS_ADMIN missing |
//! | TRL005 | eBPF programs        | the kernel refuses one of the datapath's programs |
//! | TRL006 | socket load balancer | (warning) Cilium's socket LB rewrites pod connects first |

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::ebpf;

pub mod cluster;

/// Oldest kernel with every hook the datapath attaches (cgroup getpeername: 5.8).
const MIN_KERNEL: (u32, u32) = (5, 8);
/// Oldest kernel the project tests against.
const TESTED_KERNEL: (u32, u32) = (5, 10);

/// Capabilities the agent needs, by number (linux/capability.h), with their names.
pub const CAPABILITIES: [(u32, &str); 4] = [
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
    (38, "CAP_PERFMON"),
    (39, "CAP_BPF"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Pass,
    Warn,
    Fail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub code: &'static str,
    pub check: &'static str,
    pub level: Level,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// What is checked, and where: the real node by default, fakes in tests.
#[derive(Clone, Debug)]
pub struct Environment {
    pub cgroup_root: PathBuf,
    pub pin_dir: PathBuf,
    /// `/proc`, for the kernel release and this process's capabilities.
    pub proc_root: PathBuf,
    /// Load the datapath's programs (needs the privileges checked by TRL004).
    pub probe_programs: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn failed(&self) -> bool {
        self.findings.iter().any(|f| f.level == Level::Fail)
    }

    /// One line per finding, and its hint below it when it did not pass.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let mark = match f.level {
                Level::Pass => "pass",
                Level::Warn => "WARN",
                Level::Fail => "FAIL",
            };
            out.push_str(&format!("[{mark}] {} {}: {}\n", f.code, f.check, f.detail));
            if let (Some(hint), false) = (&f.hint, f.level == Level::Pass) {
                out.push_str(&format!("       hint: {hint}\n"));
            }
        }
        out
    }

    /// The failures only, as one line each (the agent's start-up error).
    pub fn failures(&self) -> String {
        self.findings
            .iter()
            .filter(|f| f.level == Level::Fail)
            .map(|f| {
                let hint = f
                    .hint
                    .as_deref()
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default();
                format!("{} {}: {}{hint}", f.code, f.check, f.detail)
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn finding(code: &'static str, check: &'static str, level: Level, detail: String) -> Finding {
    Finding {
        code,
        check,
        level,
        detail,
        hint: None,
    }
}

impl Finding {
    fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// Runs every check, in order; none stops the others.
pub fn run(env: &Environment) -> Report {
    let mut findings = vec![
        kernel(&env.proc_root),
        cgroup2(&env.cgroup_root),
        bpffs(&env.pin_dir),
        capabilities(&env.proc_root),
    ];
    if env.probe_programs {
        let ready = findings.iter().all(|f| f.level != Level::Fail);
        findings.push(programs(&env.pin_dir, ready));
    }
    findings.push(socket_lb());
    Report { findings }
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn kernel(proc_root: &Path) -> Finding {
    const CODE: &str = "TRL001";
    const CHECK: &str = "kernel version";
    let path = proc_root.join("sys/kernel/osrelease");
    let release = match std::fs::read_to_string(&path) {
        Ok(r) => r.trim().to_owned(),
        Err(e) => {
            return finding(
                CODE,
                CHECK,
                Level::Fail,
                format!("cannot read {}: {e}", path.display()),
            );
        }
    };
    match parse_release(&release) {
        Some(v) if v < MIN_KERNEL => finding(
            CODE,
            CHECK,
            Level::Fail,
            format!("{release} is older than {}.{}", MIN_KERNEL.0, MIN_KERNEL.1),
        )
        .hint("the datapath needs cgroup connect, sock_ops and getpeername hooks (5.8+); upgrade the node's kernel"),
        Some(v) if v < TESTED_KERNEL => finding(
            CODE,
            CHECK,
            Level::Warn,
            format!("{release} works but is older than {}.{}, the oldest tested", TESTED_KERNEL.0, TESTED_KERNEL.1),
        ),
        Some(_) => finding(CODE, CHECK, Level::Pass, release),
        None => finding(
            CODE,
            CHECK,
            Level::Warn,
            format!("cannot parse kernel release {release:?}; the program check decides"),
        ),
    }
}

fn cgroup2(root: &Path) -> Finding {
    const CODE: &str = "TRL002";
    const CHECK: &str = "cgroup v2";
    match ebpf::is_cgroup2(root) {
        Ok(true) => finding(CODE, CHECK, Level::Pass, format!("{} is cgroup v2", root.display())),
        Ok(false) => finding(CODE, CHECK, Level::Fail, format!("{} is not a cgroup v2 directory", root.display()))
            .hint("boot the node with the unified hierarchy (systemd.unified_cgroup_hierarchy=1) and point datapath.cgroup_root at it"),
        Err(e) => finding(CODE, CHECK, Level::Fail, e.to_string())
            .hint("mount the host's cgroup v2 root into the agent and set datapath.cgroup_root"),
    }
}

fn bpffs(pin_dir: &Path) -> Finding {
    const CODE: &str = "TRL003";
    const CHECK: &str = "bpffs";
    match ebpf::is_on_bpffs(pin_dir) {
        Ok(true) => finding(CODE, CHECK, Level::Pass, format!("{} is on bpffs", pin_dir.display())),
        Ok(false) => finding(CODE, CHECK, Level::Fail, format!("{} is not on a bpf filesystem", pin_dir.display()))
            .hint("mount -t bpf bpf /sys/fs/bpf on the host (the Helm chart's init step does), and mount it into the agent"),
        Err(e) => finding(CODE, CHECK, Level::Fail, e.to_string())
            .hint("mount -t bpf bpf /sys/fs/bpf on the host, and mount it into the agent"),
    }
}

/// The effective capability set from `/proc/self/status`.
fn effective_caps(proc_root: &Path) -> Result<u64, String> {
    let path = proc_root.join("self/status");
    let status = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .ok_or_else(|| format!("{} has no CapEff line", path.display()))?;
    u64::from_str_radix(hex.trim(), 16).map_err(|e| format!("bad CapEff {hex:?}: {e}"))
}

fn capabilities(proc_root: &Path) -> Finding {
    const CODE: &str = "TRL004";
    const CHECK: &str = "capabilities";
    match effective_caps(proc_root) {
        Ok(caps) => {
            let missing: Vec<&str> = CAPABILITIES
                .iter()
                .filter(|(bit, _)| caps & (1 << bit) == 0)
                .map(|(_, name)| *name)
                .collect();
            if missing.is_empty() {
                finding(CODE, CHECK, Level::Pass, "all present".into())
            } else {
                finding(CODE, CHECK, Level::Fail, format!("missing {}", missing.join(", ")))
                    .hint("run the agent with capabilities BPF, PERFMON, NET_ADMIN and SYS_ADMIN (or privileged)")
            }
        }
        Err(e) => finding(CODE, CHECK, Level::Fail, e),
    }
}

fn programs(pin_dir: &Path, ready: bool) -> Finding {
    const CODE: &str = "TRL005";
    const CHECK: &str = "eBPF programs";
    if !ready {
        return finding(
            CODE,
            CHECK,
            Level::Fail,
            "not tried: fix the failures above first".into(),
        );
    }
    match ebpf::probe(pin_dir) {
        Ok(()) => finding(CODE, CHECK, Level::Pass, "the kernel accepts every datapath program".into()),
        Err(e) => finding(CODE, CHECK, Level::Fail, e.to_string())
            .hint("the kernel refused a program: check the kernel version, BTF (/sys/kernel/btf/vmlinux) and lockdown mode"),
    }
}

/// Cilium's socket load balancer attaches its own cgroup connect programs; unless it is
/// limited to the host namespace it rewrites pods' service connects before Trellis sees them.
fn socket_lb() -> Finding {
    const CODE: &str = "TRL006";
    const CHECK: &str = "socket load balancer";
    let cilium = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .any(|p| p.name_as_str().is_some_and(|n| n.starts_with("cil_sock")));
    if cilium {
        finding(CODE, CHECK, Level::Warn, "Cilium socket load balancing programs are loaded".into())
            .hint("install Cilium with socketLB.hostNamespaceOnly=true so pod connects reach Trellis unrewritten")
    } else {
        finding(
            CODE,
            CHECK,
            Level::Pass,
            "no conflicting socket load balancer found".into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_proc(release: &str, cap_eff: &str) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        std::fs::create_dir_all(dir.0.join("sys/kernel")).expect("mkdir");
        std::fs::create_dir_all(dir.0.join("self")).expect("mkdir");
        std::fs::write(dir.0.join("sys/kernel/osrelease"), format!("{release}\n")).expect("write");
        std::fs::write(
            dir.0.join("self/status"),
            format!("Name:\tagent\nCapInh:\t0000000000000000\nCapEff:\t{cap_eff}\n"),
        )
        .expect("write");
        dir
    }

    /// A scratch directory removed on drop (std only).
    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "trellis-check-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&path).expect("mkdir");
                Self(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn kernel_releases_are_read_as_distributions_write_them() {
        assert_eq!(parse_release("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(parse_release("5.10.0+"), Some((5, 10)));
        assert_eq!(parse_release("5.4.0-150-generic\n"), Some((5, 4)));
        assert_eq!(parse_release("garbage"), None);
        let old = fake_proc("5.4.0-150-generic", "000001ffffffffff");
        let f = kernel(&old.0);
        assert_eq!((f.code, f.level), ("TRL001", Level::Fail));
        let tested = fake_proc("5.9.1", "0");
        assert_eq!(kernel(&tested.0).level, Level::Warn);
        let new = fake_proc("6.18.0", "0");
        assert_eq!(kernel(&new.0).level, Level::Pass);
    }

    #[test]
    fn missing_capabilities_are_named() {
        let all = fake_proc("6.1.0", "000001ffffffffff");
        assert_eq!(capabilities(&all.0).level, Level::Pass);
        // NET_ADMIN and SYS_ADMIN only: BPF and PERFMON missing.
        let some = fake_proc("6.1.0", &format!("{:016x}", (1u64 << 12) | (1 << 21)));
        let f = capabilities(&some.0);
        assert_eq!(f.level, Level::Fail);
        assert_eq!(f.detail, "missing CAP_PERFMON, CAP_BPF");
    }

    #[test]
    fn a_directory_that_is_not_cgroup2_or_bpffs_fails_with_its_code() {
        let plain = tempdir::Dir::new();
        let proc = fake_proc("6.1.0", "000001ffffffffff");
        let env = Environment {
            cgroup_root: plain.0.clone(),
            pin_dir: plain.0.join("trellis"),
            proc_root: proc.0.clone(),
            probe_programs: true,
        };
        let report = run(&env);
        let level = |code: &str| {
            report
                .findings
                .iter()
                .find(|f| f.code == code)
                .map(|f| f.level)
        };
        assert_eq!(level("TRL002"), Some(Level::Fail));
        assert_eq!(level("TRL003"), Some(Level::Fail));
        assert_eq!(
            level("TRL005"),
            Some(Level::Fail),
            "not tried after failures"
        );
        assert!(report.failed());
        let text = report.text();
        assert!(
            text.contains("[FAIL] TRL002 cgroup v2") && text.contains("hint:"),
            "{text}"
        );
        assert!(
            report.failures().contains("TRL003 bpffs"),
            "{}",
            report.failures()
        );
    }
}
