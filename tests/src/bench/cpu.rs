//! CPU accounting around a load run: the proxy processes' own time, the whole machine's time
//! by kind, and the run time of the Trellis eBPF programs.
//!
//! The eBPF programs run in the context of whoever triggers them (a pod's `connect()`, packet
//! receive in softirq), so no process's CPU time includes them: the kernel counts their run
//! time per program only while `kernel.bpf_stats_enabled` is set ([`BpfStats`] sets it for the
//! whole run and restores it). The programs are found through the agents' own descriptors
//! (`/proc/PID/fdinfo` of a program fd carries `prog_id` and `run_time_ns`), so programs of
//! anything else on the machine are never counted.
//!
//! The machine figures come from `/proc/stat`, which no namespace narrows: they include the
//! client and servers (in every configuration alike) and anything else the machine runs.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde_json::{Value, json};

/// /proc reports CPU times in USER_HZ, which the kernel ABI fixes at 100 on Linux.
const USER_HZ: f64 = 100.0;
/// Where the kernel's eBPF statistics switch lives.
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Sum of user and system CPU time of `pids` (all their threads), in seconds.
pub fn process_seconds(pids: &[u32]) -> Result<f64> {
    let mut ticks: u64 = 0;
    for pid in pids {
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // Fields after the command name, which is in parentheses and may contain spaces.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .with_context(|| format!("unexpected {path}: {stat:?}"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line; `rest` starts at field 3.
        for i in [11, 12] {
            ticks += fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .with_context(|| format!("no CPU time field in {path}: {stat:?}"))?;
        }
    }
    Ok(ticks as f64 / USER_HZ)
}

/// The machine's CPU time so far by kind (all CPUs), in seconds: the `cpu` line of
/// `/proc/stat`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MachineCpu {
    /// user + nice.
    pub user: f64,
    pub system: f64,
    /// Hard and soft interrupts (the network receive path runs mostly in softirq).
    pub irq: f64,
    pub softirq: f64,
    /// Everything but idle and iowait.
    pub busy: f64,
}

impl MachineCpu {
    pub fn now() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        parse_stat(&stat)
    }

    /// The time spent since `earlier`, as vCPUs (CPU-seconds per second of `wall`).
    pub fn vcpus_since(&self, earlier: &Self, wall: f64) -> Value {
        let per = |a: f64, b: f64| (a - b) / wall.max(1e-9);
        json!({
            "user": per(self.user, earlier.user),
            "system": per(self.system, earlier.system),
            "irq": per(self.irq, earlier.irq),
            "softirq": per(self.softirq, earlier.softirq),
            "busy": per(self.busy, earlier.busy),
        })
    }
}

fn parse_stat(stat: &str) -> Result<MachineCpu> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse::<u64>().context("bad /proc/stat field"))
        .collect::<Result<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, included in user/nice]
    let field = |i: usize| ticks.get(i).copied().unwrap_or(0) as f64 / USER_HZ;
    let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
    Ok(MachineCpu {
        user: field(0) + field(1),
        system: field(2),
        irq: field(5),
        softirq: field(6),
        busy,
    })
}

/// Turns on the kernel's eBPF run-time statistics for as long as it lives, then puts back the
/// previous setting.
pub struct BpfStats {
    previous: Option<String>,
}

impl BpfStats {
    /// Enables the statistics; on a kernel without the switch (or when it cannot be written)
    /// says so and the eBPF figures stay empty.
    pub fn enable() -> Self {
        let previous = match std::fs::read_to_string(BPF_STATS) {
            Ok(p) => p.trim().to_owned(),
            Err(e) => {
                eprintln!("bench: no eBPF run-time statistics ({BPF_STATS}: {e})");
                return Self { previous: None };
            }
        };
        if let Err(e) = std::fs::write(BPF_STATS, "1") {
            eprintln!("bench: cannot enable eBPF run-time statistics ({BPF_STATS}: {e})");
            return Self { previous: None };
        }
        Self {
            previous: Some(previous),
        }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(previous) = &self.previous
            && let Err(e) = std::fs::write(BPF_STATS, previous)
        {
            eprintln!("bench: cannot restore {BPF_STATS} to {previous}: {e}");
        }
    }
}

/// Total run time (seconds) of the eBPF programs `pids` hold descriptors of, each program
/// counted once; `None` when they hold none.
pub fn ebpf_seconds(pids: &[u32]) -> Result<Option<f64>> {
    let mut by_id: BTreeMap<u64, u64> = BTreeMap::new();
    for pid in pids {
        let dir = format!("/proc/{pid}/fdinfo");
        let entries = std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))?;
        for entry in entries {
            // A descriptor closed while listing is simply gone.
            let Ok(entry) = entry else { continue };
            let Ok(info) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            if let Some((id, ns)) = parse_prog_fdinfo(&info) {
                by_id.insert(id, ns);
            }
        }
    }
    Ok((!by_id.is_empty()).then(|| by_id.values().sum::<u64>() as f64 / 1e9))
}

/// `(prog_id, run_time_ns)` of a program descriptor's fdinfo (links and maps have no run time).
fn parse_prog_fdinfo(info: &str) -> Option<(u64, u64)> {
    let value = |key: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((value("prog_id:")?, value("run_time_ns:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_machine_line_of_proc_stat() {
        let stat = "cpu  100 20 300 4000 50 6 70 8 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 1\n";
        let cpu = parse_stat(stat).expect("parsed");
        assert_eq!(cpu.user, 1.2);
        assert_eq!(cpu.system, 3.0);
        assert_eq!(cpu.softirq, 0.7);
        assert!((cpu.busy - 5.04).abs() < 1e-9, "{}", cpu.busy);
    }

    #[test]
    fn only_program_descriptors_have_a_run_time() {
        let prog = "pos:\t0\nflags:\t02000002\nprog_type:\t18\nprog_jited:\t1\nprog_tag:\tab\n\
                    memlock:\t4096\nprog_id:\t42\nrun_time_ns:\t1234\nrun_cnt:\t5\n";
        assert_eq!(parse_prog_fdinfo(prog), Some((42, 1234)));
        let link = "pos:\t0\nlink_type:\tcgroup\nlink_id:\t7\nprog_tag:\tab\nprog_id:\t42\n";
        assert_eq!(parse_prog_fdinfo(link), None);
    }
}
