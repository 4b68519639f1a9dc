//! Processes inside the testbed: locating workspace binaries, starting a program in a
//! namespace and cgroup through `podexec`, and the [`Proc`] handle that owns it.
//!
//! Output goes to log files in the testbed's scratch directory by default (so nothing can
//! block on a full pipe and the logs survive for `MESH_KEEP_TESTBED=1`), or to pipes on
//! request. Every wait is bounded by a deadline.

use std::{
    ffi::{OsStr, OsString},
    fs::File,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::{cgroup, netns::Netns};

/// Binaries of this workspace that [`super::Testbed::spawn`] resolves with [`bin_path`] when
/// a command names them without a `/`.
pub const WORKSPACE_BINARIES: [&str; 4] = ["pod-app", "podexec", "mesh-node", "meshctl"];

/// How often bounded waits poll.
const POLL: Duration = Duration::from_millis(10);

/// How long a new process may take to reach its namespace and cgroup.
const PLACEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Finds a binary built from this workspace.
///
/// Looks in `$MESH_BIN_DIR` if set; otherwise next to the running executable and in its
/// parent directory (tests run from `target/debug/deps`, xtask from `target/debug`).
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let dirs: Vec<PathBuf> = match std::env::var_os("MESH_BIN_DIR") {
        Some(dir) => vec![PathBuf::from(dir)],
        None => {
            let exe = std::env::current_exe().context("finding the current executable")?;
            let dir = exe
                .parent()
                .with_context(|| format!("{} has no parent directory", exe.display()))?
                .to_path_buf();
            let mut dirs = vec![dir.clone()];
            dirs.extend(dir.parent().map(Path::to_path_buf));
            dirs
        }
    };
    let candidates: Vec<PathBuf> = dirs.iter().map(|d| d.join(name)).collect();
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "binary `{name}` not found (looked for {}); run `cargo build` first, or set MESH_BIN_DIR",
        tried.join(", ")
    )
}

/// Options for [`super::Testbed::spawn`].
#[derive(Debug, Clone, Default)]
pub struct SpawnOptions {
    name: Option<String>,
    piped: bool,
    stdin_piped: bool,
    envs: Vec<(OsString, OsString)>,
}

impl SpawnOptions {
    /// Default options: log files, stdin from `/dev/null`, generated name.
    pub fn new() -> Self {
        Self::default()
    }

    /// Names the process; its logs become `logs/NAME.stdout` and `logs/NAME.stderr`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Pipes stdout and stderr to the caller instead of writing log files.
    pub fn piped(mut self) -> Self {
        self.piped = true;
        self
    }

    /// Gives the process a stdin pipe (see [`Proc::take_stdin`]).
    pub fn stdin_piped(mut self) -> Self {
        self.stdin_piped = true;
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub(crate) fn requested_name(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

/// Where a process is started: the namespace to enter and the cgroup to join.
pub(crate) struct Target<'a> {
    pub netns: &'a Netns,
    pub cgroup: &'a Path,
    pub cgroup_mount: &'a Path,
}

/// Starts `cmd` at `target` through `podexec` and returns once the process is in its
/// namespace and cgroup (or has already exited).
pub(crate) fn spawn(
    target: &Target<'_>,
    cmd: &[OsString],
    opts: &SpawnOptions,
    name: String,
    logs_dir: &Path,
) -> Result<Proc> {
    let Some((program, args)) = cmd.split_first() else {
        bail!("empty command");
    };
    let program = resolve_program(program)?;
    let mut command = Command::new(bin_path("podexec")?);
    command
        .arg("--netns")
        .arg(target.netns.path())
        .arg("--cgroup")
        .arg(target.cgroup)
        .arg("--")
        .arg(&program)
        .args(args)
        .envs(opts.envs.iter().map(|(k, v)| (k, v)))
        .stdin(if opts.stdin_piped {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let description = describe(&program, args);

    let (stdout_path, stderr_path) = if opts.piped {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        (None, None)
    } else {
        let out = logs_dir.join(format!("{name}.stdout"));
        let err = logs_dir.join(format!("{name}.stderr"));
        let create =
            |p: &Path| File::create(p).with_context(|| format!("creating {}", p.display()));
        command.stdout(create(&out)?).stderr(create(&err)?);
        (Some(out), Some(err))
    };

    let child = command
        .spawn()
        .with_context(|| format!("starting {description} in {}", target.netns.name()))?;
    let mut proc = Proc {
        name,
        description,
        child,
        stdout_path,
        stderr_path,
    };
    wait_for_placement(&mut proc, target)?;
    Ok(proc)
}

/// Resolves a bare workspace binary name to its built path; anything else is left to `exec`'s
/// `PATH` lookup inside `podexec`.
fn resolve_program(program: &OsStr) -> Result<OsString> {
    match program.to_str() {
        Some(name) if WORKSPACE_BINARIES.contains(&name) => Ok(bin_path(name)?.into_os_string()),
        _ => Ok(program.to_owned()),
    }
}

fn describe(program: &OsStr, args: &[OsString]) -> String {
    let mut s = program.to_string_lossy().into_owned();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Polls until the process shows the target cgroup and network namespace, so callers can rely
/// on placement (and teardown's `cgroup.kill` can reach it) as soon as `spawn` returns.
fn wait_for_placement(proc: &mut Proc, target: &Target<'_>) -> Result<()> {
    let want_cgroup = cgroup::relative(target.cgroup_mount, target.cgroup)?;
    let netns_path = target.netns.path();
    let ino = std::fs::metadata(&netns_path)
        .with_context(|| format!("stat {}", netns_path.display()))?
        .ino();
    let want_netns = format!("net:[{ino}]");
    let pid = proc.pid();
    let deadline = Instant::now() + PLACEMENT_TIMEOUT;
    loop {
        if proc.try_wait()?.is_some() {
            return Ok(());
        }
        let in_cgroup = cgroup::cgroup_of(pid).is_ok_and(|c| c == want_cgroup);
        let in_netns = std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .is_ok_and(|l| l.as_os_str() == want_netns.as_str());
        if in_cgroup && in_netns {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = proc.kill();
            bail!(
                "{} did not reach netns {} and cgroup {want_cgroup} within {PLACEMENT_TIMEOUT:?}; stderr: {}",
                proc.description,
                target.netns.name(),
                proc.stderr_text()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// A process started in the testbed. It is killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    description: String,
    child: Child,
    stdout_path: Option<PathBuf>,
    stderr_path: Option<PathBuf>,
}

impl Proc {
    /// The process's name (also the stem of its log files).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The command line, for messages.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The process id (the program itself: `podexec` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The stdout log file, unless output is piped.
    pub fn stdout_path(&self) -> Option<&Path> {
        self.stdout_path.as_deref()
    }

    /// The stderr log file, unless output is piped.
    pub fn stderr_path(&self) -> Option<&Path> {
        self.stderr_path.as_deref()
    }

    /// What the process has written to its stdout log so far (empty if piped).
    pub fn stdout_text(&self) -> String {
        read_lossy(self.stdout_path.as_deref())
    }

    /// What the process has written to its stderr log so far (empty if piped).
    pub fn stderr_text(&self) -> String {
        read_lossy(self.stderr_path.as_deref())
    }

    /// The underlying child, e.g. to take piped stdout or stderr.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Takes the stdout pipe (only with [`SpawnOptions::piped`]).
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Takes the stdin pipe (only with [`SpawnOptions::stdin_piped`]).
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// The exit status if the process has exited (reaps it), without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("waiting for {}", self.description))
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends SIGTERM (no wait; follow with [`Proc::wait_timeout`]). No-op if it has exited.
    pub fn terminate(&mut self) -> Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// Sends SIGKILL and reaps the process (bounded wait). No-op if it has exited.
    pub fn kill(&mut self) -> Result<()> {
        self.signal(Signal::SIGKILL)?;
        match self.wait_timeout(Duration::from_secs(10))? {
            Some(_) => Ok(()),
            None => bail!("{} survived SIGKILL for 10s", self.description),
        }
    }

    fn signal(&mut self, signal: Signal) -> Result<()> {
        // Only signal a child we have not reaped: after reaping, the pid may belong to
        // someone else.
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = i32::try_from(self.pid()).context("pid out of range")?;
        match kill(Pid::from_raw(pid), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("sending {signal} to {}", self.description)),
        }
    }

    /// Polls the stdout log until a complete line satisfies `pred`, and returns that line.
    /// Fails if the process exits first or `timeout` passes.
    pub fn wait_for_stdout_line(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        if self.stdout_path.is_none() {
            bail!("{}: stdout is piped, not logged", self.description);
        }
        let deadline = Instant::now() + timeout;
        loop {
            // Read stdout before checking for exit so a line written just before exiting
            // is still seen.
            let text = self.stdout_text();
            let complete = text.rsplit_once('\n').map_or("", |(done, _)| done);
            if let Some(line) = complete.lines().find(|l| pred(l)) {
                return Ok(line.to_owned());
            }
            if let Some(status) = self.try_wait()? {
                bail!(
                    "{} exited ({status}) before the expected output; stdout: {text}; stderr: {}",
                    self.description,
                    self.stderr_text()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print the expected output within {timeout:?}; stdout: {text}; stderr: {}",
                    self.description,
                    self.stderr_text()
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("testbed: stopping {}: {e:#}", self.name);
        }
    }
}

fn read_lossy(path: Option<&Path>) -> String {
    path.and_then(|p| std::fs::read(p).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The result of [`super::Testbed::run`]: a finished process's status and output.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// The command line that ran.
    pub command: String,
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl CmdOutput {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Parses the last non-empty stdout line as JSON (`pod-app` prints one object at the end),
    /// whatever the exit status.
    pub fn json(&self) -> Result<serde_json::Value> {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .with_context(|| {
                format!(
                    "`{}` printed nothing; stderr: {}",
                    self.command, self.stderr
                )
            })?;
        serde_json::from_str(line).with_context(|| {
            format!(
                "`{}` printed non-JSON {line:?}; stderr: {}",
                self.command, self.stderr
            )
        })
    }

    /// Like [`CmdOutput::json`], but fails (with stdout and stderr) unless the command succeeded.
    pub fn ok_json(&self) -> Result<serde_json::Value> {
        self.check()?;
        self.json()
    }

    /// Fails with stdout and stderr unless the command succeeded.
    pub fn check(&self) -> Result<&Self> {
        if !self.success() {
            bail!(
                "`{}` failed ({}); stdout: {}; stderr: {}",
                self.command,
                self.status,
                self.stdout.trim(),
                self.stderr.trim()
            );
        }
        Ok(self)
    }
}

/// Waits (bounded) for a spawned process and collects its logged output.
pub(crate) fn finish(mut proc: Proc, timeout: Duration) -> Result<CmdOutput> {
    match proc.wait_timeout(timeout)? {
        Some(status) => Ok(CmdOutput {
            command: proc.description.clone(),
            status,
            stdout: proc.stdout_text(),
            stderr: proc.stderr_text(),
        }),
        None => {
            let kill_result = proc.kill();
            bail!(
                "`{}` timed out after {timeout:?} and was killed{}; stdout: {}; stderr: {}",
                proc.description,
                kill_result
                    .err()
                    .map(|e| format!(" (kill: {e:#})"))
                    .unwrap_or_default(),
                proc.stdout_text().trim(),
                proc.stderr_text().trim()
            )
        }
    }
}
