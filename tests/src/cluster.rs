//! A real Kubernetes control plane for tests and `cargo xtask cluster up`: etcd, kube-apiserver
//! and kube-controller-manager, as built by `.ci/kube-tools`, on loopback (of this machine or
//! of a testbed namespace).
//!
//! The API server authorizes with Node and RBAC, serves a certificate made for the cluster
//! ([`pki`]), and issues and reviews service-account tokens (TokenRequest, TokenReview) signed
//! with the cluster's key. The controller-manager runs the controllers that need no kubelet
//! and no cloud: namespace lifecycle, garbage collection, service accounts and their tokens,
//! EndpointSlices. Nothing schedules or runs pods: whoever plays the kubelet binds and reports
//! them (see [`kubelet`]).
//!
//! The API server keeps an audit log of every service account's requests ([`audit`]), so tests
//! can count what the mesh's accounts asked for; etcd can be compacted under the API server
//! ([`Cluster::compact_etcd`]), so tests can expire watches.
//!
//! [`Cluster::start`] returns once `/readyz` answers and the controller-manager has made the
//! `default` service account; dropping the [`Cluster`] stops the processes and removes the
//! state directory (kept with `MESH_KEEP_TESTBED=1`).

mod pki;
mod tools;

pub mod audit;
pub mod gateway_api;
pub mod kubelet;

use std::{
    ffi::OsString,
    io::Write,
    net::{IpAddr, Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
pub use tools::{Tools, find_one, helm_gate, script as tools_script, tools_gate};

/// How long the API server may take to answer `/readyz` after start.
const READY_TIMEOUT: Duration = Duration::from_mins(2);
/// How long a stopped component may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The issuer (and default audience) of service-account tokens.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The controllers the controller-manager runs: those a cluster without kubelets, a scheduler
/// or a cloud still needs. Deployments and ReplicaSets are not reconciled: whoever plays the
/// kubelet creates the owner chain itself, so no controller makes pods nobody runs.
const CONTROLLERS: &str = "namespace-controller,garbage-collector-controller,\
serviceaccount-controller,serviceaccount-token-controller,root-ca-certificate-publisher-controller,\
endpointslice-controller,endpointslice-mirroring-controller";
/// The file `Cluster::detach` writes: one `name pid` line per component.
const PIDS_FILE: &str = "pids";
/// The API server's audit log, below `logs/`.
const AUDIT_LOG: &str = "audit.log";
/// The etcd key [`Cluster::compact_etcd`] writes, base64 as etcd's JSON gateway takes keys:
/// `/trellis-tests/compaction-marker`, outside the API server's `/registry` prefix.
const COMPACTION_MARKER_KEY: &str = "L3RyZWxsaXMtdGVzdHMvY29tcGFjdGlvbi1tYXJrZXI=";

/// Where and how to run the control plane.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Run every component inside this named network namespace (`ip netns exec`); `None`:
    /// this machine's.
    pub netns: Option<String>,
    /// The API server's address (also in its certificate). Loopback by default.
    pub address: IpAddr,
    /// The state directory (certificates, etcd data, logs, kubeconfigs); a fresh one under
    /// the temporary directory by default.
    pub dir: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            netns: None,
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            dir: None,
        }
    }
}

/// One process of the control plane: how to start it, and the running child.
#[derive(Debug)]
struct Component {
    name: &'static str,
    binary: PathBuf,
    args: Vec<OsString>,
    child: Option<Child>,
    /// How many times it was started (its log file gets a suffix after the first).
    starts: usize,
}

/// A running control plane; dropping it stops every component and removes its directory.
#[derive(Debug)]
pub struct Cluster {
    tools: Tools,
    netns: Option<String>,
    dir: PathBuf,
    server: String,
    /// etcd's client URL (in the cluster's network namespace).
    etcd_url: String,
    components: Vec<Component>,
    detached: bool,
}

impl Cluster {
    /// Starts etcd, the API server and the controller-manager, and waits until they serve.
    pub fn start(tools: Tools, options: ClusterOptions) -> Result<Self> {
        let dir = match &options.dir {
            Some(dir) => dir.clone(),
            None => std::env::temp_dir().join(format!(
                "trellis-cluster-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or_default()
            )),
        };
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let pki = dir.join("pki");
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut addresses = vec![loopback, options.address];
        addresses.dedup();
        pki::write(&pki, &addresses)?;

        // A namespace of the testbed is this cluster's alone: the usual ports are free there.
        let (etcd_port, peer_port, api_port) = if options.netns.is_some() {
            (2379, 2380, 6443)
        } else {
            (free_port()?, free_port()?, free_port()?)
        };
        let server = format!("https://{}", socket(options.address, api_port));
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let p = |name: &str| pki.join(name).into_os_string();
        let audit_policy = dir.join("audit-policy.yaml");
        std::fs::write(&audit_policy, audit::POLICY)
            .with_context(|| format!("writing {}", audit_policy.display()))?;
        let etcd = Component::new(
            "etcd",
            &tools.etcd,
            vec![
                "--name=cluster".into(),
                flag("--data-dir", dir.join("etcd")),
                format!("--listen-client-urls={etcd_url}").into(),
                format!("--advertise-client-urls={etcd_url}").into(),
                format!("--listen-peer-urls={peer_url}").into(),
                format!("--initial-advertise-peer-urls={peer_url}").into(),
                format!("--initial-cluster=cluster={peer_url}").into(),
                // A test cluster's data is worth no fsync; the machine's disk is shared.
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
        );
        let apiserver = Component::new(
            "kube-apiserver",
            &tools.kube_apiserver,
            vec![
                format!("--etcd-servers={etcd_url}").into(),
                format!("--bind-address={}", options.address).into(),
                format!("--advertise-address={}", options.address).into(),
                // The `kubernetes` Service's endpoints cannot be a loopback address, and no pod
                // here dials the API server through it.
                "--endpoint-reconciler-type=none".into(),
                format!("--secure-port={api_port}").into(),
                flag("--cert-dir", dir.join("apiserver")),
                flag("--tls-cert-file", p(pki::SERVING_CERT)),
                flag("--tls-private-key-file", p(pki::SERVING_KEY)),
                flag("--client-ca-file", p(pki::CA_CERT)),
                format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}").into(),
                flag("--service-account-key-file", p(pki::SA_PUBLIC_KEY)),
                flag("--service-account-signing-key-file", p(pki::SA_KEY)),
                "--authorization-mode=Node,RBAC".into(),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
                flag("--audit-policy-file", audit_policy),
                flag("--audit-log-path", dir.join("logs").join(AUDIT_LOG)),
                "--audit-log-format=json".into(),
                // Each event is written before the request is answered: a test that reads the
                // log after a call sees it.
                "--audit-log-mode=blocking".into(),
                "--v=1".into(),
            ],
        );
        let admin = dir.join("admin.kubeconfig");
        write_kubeconfig(
            &admin,
            &server,
            &pki.join(pki::CA_CERT),
            &User::Certificate {
                cert: pki.join(pki::ADMIN_CERT),
                key: pki.join(pki::ADMIN_KEY),
            },
        )?;
        let controller_manager = Component::new(
            "kube-controller-manager",
            &tools.kube_controller_manager,
            vec![
                flag("--kubeconfig", admin.clone().into_os_string()),
                flag(
                    "--authentication-kubeconfig",
                    admin.clone().into_os_string(),
                ),
                flag("--authorization-kubeconfig", admin.clone().into_os_string()),
                format!("--controllers={CONTROLLERS}").into(),
                flag("--service-account-private-key-file", p(pki::SA_KEY)),
                flag("--root-ca-file", p(pki::CA_CERT)),
                "--use-service-account-credentials=true".into(),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--secure-port=0".into(),
                "--v=1".into(),
            ],
        );
        let mut cluster = Cluster {
            tools,
            netns: options.netns,
            dir,
            server,
            etcd_url: etcd_url.clone(),
            components: vec![etcd, apiserver, controller_manager],
            detached: false,
        };
        cluster.launch(0)?;
        cluster.launch(1)?;
        cluster.wait_ready()?;
        cluster.launch(2)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        while !cluster
            .kubectl_output(&["get", "serviceaccount", "default", "-n", "default"])?
            .status
            .success()
        {
            cluster.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "the controller-manager made no default service account in {READY_TIMEOUT:?}\n{}",
                    cluster.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(cluster)
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The API server's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The admin kubeconfig (group `system:masters`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// The CA that signed the API server's certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("pki").join(pki::CA_CERT)
    }

    /// The binaries this cluster runs.
    pub fn tools(&self) -> &Tools {
        &self.tools
    }

    /// The named network namespace the components run in, if any.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// `binary` as a command, run in the cluster's network namespace.
    pub fn command(&self, binary: &Path) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(binary);
                c
            }
            None => Command::new(binary),
        }
    }

    /// kubectl as `kubeconfig`'s user, in the cluster's network namespace. Its discovery
    /// cache is this cluster's own: every test cluster serves at the same address, and a cache
    /// shared by address would resolve a short name (`authorizationpolicy`) to a kind another
    /// test's cluster served (`security.istio.io`'s) but this one does not.
    pub fn kubectl_as(&self, kubeconfig: &Path) -> Command {
        let mut c = self.command(&self.tools.kubectl);
        c.arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"));
        c
    }

    /// kubectl as the admin.
    pub fn kubectl_command(&self) -> Command {
        self.kubectl_as(&self.kubeconfig())
    }

    /// Runs kubectl as the admin and returns whatever happened.
    pub fn kubectl_output(&self, args: &[&str]) -> Result<Output> {
        self.kubectl_command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("cannot start kubectl")
    }

    /// Runs kubectl as the admin; its stdout, or an error with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        checked(self.kubectl_command().args(args).stdin(Stdio::null()), args)
    }

    /// Runs kubectl as the admin with `stdin`; its stdout, or an error with its stderr.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        with_stdin(self.kubectl_command().args(args), args, stdin)
    }

    /// `kubectl apply --server-side` of a YAML or JSON stream, as the admin.
    pub fn apply(&self, manifests: &str) -> Result<String> {
        self.kubectl_stdin(
            &[
                "apply",
                "--server-side",
                "--field-manager=trellis-tests",
                "-f",
                "-",
            ],
            manifests,
        )
    }

    /// `kubectl get ARGS -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["get"];
        all.extend(args);
        all.extend(["-o", "json"]);
        let text = self.kubectl(&all)?;
        serde_json::from_str(&text).with_context(|| format!("kubectl {args:?} printed no JSON"))
    }

    /// A token of service account `namespace/name` from the TokenRequest API, for `audience`
    /// (the API server's own by default), bound to Pod `bound_pod` (in the same namespace)
    /// when given.
    pub fn token(
        &self,
        namespace: &str,
        name: &str,
        audience: Option<&str>,
        bound_pod: Option<&str>,
    ) -> Result<String> {
        let mut args = vec!["create", "token", name, "-n", namespace, "--duration", "2h"];
        if let Some(audience) = audience {
            args.extend(["--audience", audience]);
        }
        if let Some(pod) = bound_pod {
            args.extend(["--bound-object-kind", "Pod", "--bound-object-name", pod]);
        }
        Ok(self.kubectl(&args)?.trim().to_owned())
    }

    /// Writes a kubeconfig at `path` that authenticates with bearer `token`.
    pub fn write_token_kubeconfig(&self, path: &Path, token: &str) -> Result<()> {
        write_kubeconfig(
            path,
            &self.server,
            &self.ca_cert(),
            &User::Token(token.to_owned()),
        )
    }

    /// Every log line `component` (`etcd`, `kube-apiserver`, `kube-controller-manager`) wrote,
    /// over all its starts.
    pub fn log(&self, component: &str) -> String {
        let Some(c) = self.components.iter().find(|c| c.name == component) else {
            return String::new();
        };
        (0..c.starts.max(1))
            .filter_map(|n| std::fs::read_to_string(self.log_path(c.name, n)).ok())
            .collect()
    }

    /// Every service account request the API server has answered, oldest first.
    pub fn audit(&self) -> Result<Vec<audit::Request>> {
        audit::read(&self.dir.join("logs").join(AUDIT_LOG))
    }

    /// Compacts etcd's whole history: writes a marker key outside the API server's prefix
    /// (so the revision is past every resource version a client has seen) and compacts at
    /// that revision, physically. A watch resumed from any earlier resource version is then
    /// answered 410 Gone. Returns the revision. Uses etcd's JSON gateway (with `curl`, in the
    /// cluster's network namespace).
    pub fn compact_etcd(&self) -> Result<u64> {
        let put = self.etcd_post(
            "/v3/kv/put",
            &serde_json::json!({"key": COMPACTION_MARKER_KEY, "value": "MQ=="}),
        )?;
        // int64 fields are strings in etcd's JSON.
        let revision: u64 = put["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .with_context(|| format!("etcd's put answer has no revision: {put}"))?;
        self.etcd_post(
            "/v3/kv/compaction",
            &serde_json::json!({"revision": revision.to_string(), "physical": true}),
        )?;
        Ok(revision)
    }

    fn etcd_post(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
        let out = self
            .command(Path::new("curl"))
            .args(["--silent", "--show-error", "--fail", "--max-time", "30"])
            .args(["-X", "POST", "-H", "Content-Type: application/json"])
            .args(["--data", &body.to_string()])
            .arg(format!("{}{path}", self.etcd_url))
            .stdin(Stdio::null())
            .output()
            .context("cannot run curl (needed to reach etcd's JSON gateway)")?;
        if !out.status.success() {
            bail!(
                "etcd {path} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| format!("etcd {path} answered no JSON"))
    }

    /// Stops the API server (SIGTERM, bounded) while etcd and the rest stay up.
    pub fn stop_apiserver(&mut self) -> Result<()> {
        stop(&mut self.components[1])
    }

    /// Starts the API server again (same address, port, keys) and waits until it is ready.
    pub fn start_apiserver(&mut self) -> Result<()> {
        self.launch(1)?;
        self.wait_ready()
    }

    /// Leaves the processes running and the state directory in place, for `cluster down`.
    pub fn detach(mut self) -> Result<PathBuf> {
        let mut pids = String::new();
        for c in &self.components {
            if let Some(child) = &c.child {
                pids.push_str(&format!("{} {}\n", c.name, child.id()));
            }
        }
        std::fs::write(self.dir.join(PIDS_FILE), pids).context("writing the pid file")?;
        self.detached = true;
        Ok(self.dir.clone())
    }

    /// Stops the components a detached cluster left in `dir` and removes it.
    pub fn down(dir: &Path) -> Result<()> {
        let pids = std::fs::read_to_string(dir.join(PIDS_FILE))
            .with_context(|| format!("no cluster state in {}", dir.display()))?;
        // Last started first: the controller-manager, the API server, then etcd.
        for line in pids.lines().rev() {
            let Some((name, pid)) = line.split_once(' ') else {
                continue;
            };
            let Ok(pid) = pid.trim().parse::<i32>() else {
                continue;
            };
            // Only a process that still runs this component (pids are reused).
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if !String::from_utf8_lossy(&cmdline).contains(name) {
                continue;
            }
            let pid = Pid::from_raw(pid);
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while kill(pid, None).is_ok() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = kill(pid, Signal::SIGKILL);
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
    }

    /// Polls `check` every 200 ms until it holds, for at most [`READY_TIMEOUT`].
    pub fn wait_for(&self, what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = None;
        loop {
            match check() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last = Some(e),
            }
            if Instant::now() > deadline {
                bail!(
                    "waited {READY_TIMEOUT:?} for {what} (last error: {last:?})\n{}",
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log_path(&self, name: &str, start: usize) -> PathBuf {
        let suffix = if start == 0 {
            String::new()
        } else {
            format!(".{start}")
        };
        self.dir.join("logs").join(format!("{name}{suffix}.log"))
    }

    fn launch(&mut self, index: usize) -> Result<()> {
        let log = self.log_path(self.components[index].name, self.components[index].starts);
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let c = &self.components[index];
        let child = self
            .command(&c.binary)
            .args(&c.args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", c.binary.display()))?;
        let c = &mut self.components[index];
        c.child = Some(child);
        c.starts += 1;
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_running()?;
            let out = self.kubectl_output(&["get", "--raw", "/readyz"])?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the API server is not ready after {READY_TIMEOUT:?}: {}\n{}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// An error (with the logs) if a started component has exited.
    fn check_running(&mut self) -> Result<()> {
        for c in &mut self.components {
            if let Some(child) = c.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let name = c.name;
                bail!("{name} exited ({status})\n{}", self.log_tails());
            }
        }
        Ok(())
    }

    /// The last lines of every component's log, for error messages.
    fn log_tails(&self) -> String {
        self.components
            .iter()
            .map(|c| {
                let log = self.log(c.name);
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                format!("--- {} (last lines)\n{tail}\n", c.name)
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        for c in self.components.iter_mut().rev() {
            if let Err(e) = stop(c) {
                eprintln!("stopping {}: {e:#}", c.name);
            }
        }
        if std::env::var("MESH_KEEP_TESTBED").is_ok_and(|v| v == "1") {
            eprintln!("kept the cluster's state in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Component {
    fn new(name: &'static str, binary: &Path, args: Vec<OsString>) -> Self {
        Self {
            name,
            binary: binary.to_owned(),
            args,
            child: None,
            starts: 0,
        }
    }
}

/// SIGTERM, then SIGKILL if the component has not exited within [`STOP_TIMEOUT`].
fn stop(c: &mut Component) -> Result<()> {
    let Some(mut child) = c.child.take() else {
        return Ok(());
    };
    let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill()?;
    child.wait()?;
    Ok(())
}

fn flag(name: &str, value: impl Into<OsString>) -> OsString {
    let mut f = OsString::from(format!("{name}="));
    f.push(value.into());
    f
}

fn socket(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// A port nothing listens on now (on this machine's loopback).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .context("binding a probe socket")?
        .local_addr()?
        .port())
}

fn checked(command: &mut Command, args: &[&str]) -> Result<String> {
    let out = command.output().context("cannot start kubectl")?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn with_stdin(command: &mut Command, args: &[&str], stdin: &str) -> Result<String> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start kubectl")?;
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.as_bytes())
            .context("writing kubectl's input")?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

enum User {
    Certificate { cert: PathBuf, key: PathBuf },
    Token(String),
}

fn write_kubeconfig(path: &Path, server: &str, ca: &Path, user: &User) -> Result<()> {
    let user = match user {
        User::Certificate { cert, key } => serde_json::json!({
            "client-certificate": cert, "client-key": key,
        }),
        User::Token(token) => serde_json::json!({ "token": token }),
    };
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "trellis", "cluster": {
            "server": server, "certificate-authority": ca,
        }}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "trellis", "context": {"cluster": "trellis", "user": "user"}}],
        "current-context": "trellis",
    });
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(serde_json::to_string_pretty(&config)?.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
