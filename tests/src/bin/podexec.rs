//! `podexec --netns PATH [--cgroup DIR] -- PROGRAM [ARGS...]`
//!
//! Puts itself into the cgroup `DIR` (if given), joins the network namespace at `PATH`, then
//! replaces itself with `PROGRAM`, so the program runs with the same pid inside the pod.
//!
//! This is what the testbed uses instead of `ip netns exec`, which also enters a new mount
//! namespace and remounts `/sys`, hiding `/sys/fs/cgroup` and `/sys/fs/bpf` from the program.
//! It stays single-threaded: `setns` applies to the calling thread only, and `exec` keeps
//! only that thread.

use std::{
    ffi::OsString,
    fs::File,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{Context, Result};
use clap::Parser;
use nix::sched::{CloneFlags, setns};

/// Run a program inside a network namespace and cgroup.
#[derive(Parser, Debug)]
#[command(name = "podexec")]
struct Args {
    /// Network namespace file to join (e.g. /run/netns/NAME).
    #[arg(long)]
    netns: PathBuf,
    /// cgroup v2 directory to move into before exec.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// The program and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<OsString>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // `exec` only returns on failure.
    let err = match enter(&args) {
        Ok(()) => exec(&args),
        Err(e) => e,
    };
    eprintln!("podexec: {err:#}");
    ExitCode::from(127)
}

/// Joins the cgroup first (writing our own pid), then the network namespace.
fn enter(args: &Args) -> Result<()> {
    if let Some(dir) = &args.cgroup {
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .with_context(|| format!("writing own pid to {}", procs.display()))?;
    }
    let ns = File::open(&args.netns)
        .with_context(|| format!("opening netns {}", args.netns.display()))?;
    setns(&ns, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns into {}", args.netns.display()))?;
    Ok(())
}

fn exec(args: &Args) -> anyhow::Error {
    let (program, rest) = args
        .command
        .split_first()
        .unwrap_or_else(|| unreachable!("clap requires a command"));
    let err = Command::new(program).args(rest).exec();
    anyhow::Error::new(err).context(format!("exec {}", program.to_string_lossy()))
}
