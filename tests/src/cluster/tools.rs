//! Where the Kubernetes binaries are: the cache `.ci/kube-tools` builds them into (it prints
//! its bin directories with `--print`, so the versions have one home), else `PATH`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// The binaries a control plane and the chart tests run.
#[derive(Debug, Clone)]
pub struct Tools {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
}

/// `.ci/kube-tools`, from the workspace root.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/kube-tools")
}

/// The bin directories `.ci/kube-tools --print` names (they may not exist yet).
fn cache_dirs() -> Result<Vec<PathBuf>> {
    let script = script();
    let out = Command::new("bash")
        .arg(&script)
        .arg("--print")
        .output()
        .with_context(|| format!("running {} --print", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} --print failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(PathBuf::from)
        .collect())
}

/// `name` in the cache's bin directories, else on `PATH`.
fn find(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    dirs.iter()
        .cloned()
        .chain(std::env::split_paths(&path))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// One binary, or why it is missing.
pub fn find_one(name: &str) -> Result<PathBuf> {
    let dirs = cache_dirs()?;
    find(name, &dirs).with_context(|| {
        format!(
            "{name} is neither in {dirs:?} nor on PATH: run `{}` (it builds the pinned Kubernetes, \
             etcd and Helm releases from Go modules once)",
            script().display()
        )
    })
}

impl Tools {
    /// Every binary, or one error naming all that are missing.
    pub fn find() -> Result<Self> {
        let dirs = cache_dirs()?;
        let mut missing = Vec::new();
        let mut get = |name: &str| {
            find(name, &dirs).unwrap_or_else(|| {
                missing.push(name.to_owned());
                PathBuf::new()
            })
        };
        let tools = Tools {
            etcd: get("etcd"),
            kube_apiserver: get("kube-apiserver"),
            kube_controller_manager: get("kube-controller-manager"),
            kubectl: get("kubectl"),
            helm: get("helm"),
        };
        if !missing.is_empty() {
            bail!(
                "{} not found in {dirs:?} nor on PATH: run `{}` (it builds the pinned Kubernetes, \
                 etcd and Helm releases from Go modules once)",
                missing.join(", "),
                script().display()
            );
        }
        Ok(tools)
    }
}

/// Whether a test that needs the Kubernetes binaries can run: the tools, or `None` after
/// printing why it is skipped. Under `MESH_E2E=require` a missing binary fails the test.
pub fn tools_gate(test_name: &str) -> Option<Tools> {
    match Tools::find() {
        Ok(tools) => Some(tools),
        Err(e) => {
            if std::env::var("MESH_E2E").is_ok_and(|v| v == "require") {
                panic!("MESH_E2E=require but {test_name} cannot run: {e:#}");
            }
            eprintln!("skipping {test_name}: {e:#}");
            None
        }
    }
}

/// Like [`tools_gate`] for `helm` alone.
pub fn helm_gate(test_name: &str) -> Option<PathBuf> {
    match find_one("helm") {
        Ok(helm) => Some(helm),
        Err(e) => {
            if std::env::var("MESH_E2E").is_ok_and(|v| v == "require") {
                panic!("MESH_E2E=require but {test_name} cannot run: {e:#}");
            }
            eprintln!("skipping {test_name}: {e:#}");
            None
        }
    }
}
