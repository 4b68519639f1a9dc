//! Finding a local pod's cgroup v2 directory from its uid.
//!
//! kubelet names pod cgroups after the pod uid, in one of two layouts below the kubepods
//! hierarchy (the agent's `datapath.cgroup_root`):
//! - cgroupfs driver: `kubepods/[burstable|besteffort/]pod<uid>`;
//! - systemd driver: `kubepods.slice/[kubepods-<qos>.slice/]kubepods[-<qos>]-pod<uid>.slice`,
//!   with the uid's `-` written as `_` (systemd reserves `-` for nesting).
//!
//! The testbed names its pod cgroups `pod<uid>` directly below the node's pod root, which is
//! the cgroupfs form. Container cgroups live below the pod's and are never descended into.
//!
//! The tree is walked to a bounded depth and the result cached; a uid missing from the cache
//! triggers a new walk, at most once per [`MIN_RESCAN`], so a pod whose cgroup does not exist
//! (yet) costs a walk a second at worst and never blocks the others.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::time::Instant;

use crate::ebpf::PodCgroup;

/// Deepest level a pod cgroup can be at below the root (`kubepods/burstable/pod<uid>` is 3
/// when the root is the cgroup mount's kubepods parent; one more for slack).
const MAX_DEPTH: usize = 4;
/// Minimum time between two walks of the tree.
pub const MIN_RESCAN: Duration = Duration::from_secs(1);

/// The uid a pod cgroup directory is named after, normalised to the API's form (`-`), or
/// `None` if the name is not a pod cgroup in either layout.
pub fn pod_uid_of(name: &str) -> Option<String> {
    let base = name.strip_suffix(".slice").unwrap_or(name);
    let systemd = base.len() != name.len();
    let uid = if systemd {
        // kubepods-pod<uid>.slice or kubepods-<qos>-pod<uid>.slice
        let (_, uid) = base.rsplit_once("-pod")?;
        if !base.starts_with("kubepods") {
            return None;
        }
        uid
    } else {
        base.strip_prefix("pod")?
    };
    let valid = !uid.is_empty()
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    valid.then(|| normalize(uid))
}

/// Uids compare in the API's spelling: systemd's `_` stands for `-`.
fn normalize(uid: &str) -> String {
    uid.replace('_', "-")
}

/// A cache of pod cgroups below one root, refreshed by bounded walks.
#[derive(Debug)]
pub struct CgroupDiscovery {
    root: PathBuf,
    by_uid: HashMap<String, PodCgroup>,
    last_scan: Option<Instant>,
}

impl CgroupDiscovery {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            by_uid: HashMap::new(),
            last_scan: None,
        }
    }

    /// The cgroup of the pod `uid`. A cached entry is checked against the directory (a pod
    /// cgroup that was removed and recreated gets a new id); a miss walks the tree again if
    /// the last walk is older than [`MIN_RESCAN`].
    pub fn find(&mut self, uid: &str) -> Option<PodCgroup> {
        let uid = normalize(uid);
        if let Some(cached) = self.by_uid.get(&uid) {
            match std::fs::metadata(&cached.path) {
                Ok(meta) if meta.ino() == cached.id => return Some(cached.clone()),
                _ => {
                    self.by_uid.remove(&uid);
                }
            }
        }
        if self.rescan_allowed() {
            self.scan();
            return self.by_uid.get(&uid).cloned();
        }
        None
    }

    /// When the next walk may happen.
    pub fn next_rescan(&self) -> Instant {
        self.last_scan
            .map_or_else(Instant::now, |at| at + MIN_RESCAN)
    }

    fn rescan_allowed(&self) -> bool {
        self.last_scan.is_none_or(|at| at.elapsed() >= MIN_RESCAN)
    }

    /// Walks the tree and replaces the cache with what is there now.
    pub fn scan(&mut self) {
        self.last_scan = Some(Instant::now());
        let mut found = HashMap::new();
        walk(&self.root, 1, &mut found);
        self.by_uid = found;
    }
}

fn walk(dir: &Path, depth: usize, found: &mut HashMap<String, PodCgroup>) {
    if depth > MAX_DEPTH {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        // Directories only, never through symlinks (cgroupfs has none; anything else is not
        // a cgroup).
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if !kind.is_dir() {
            continue;
        }
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        match pod_uid_of(name) {
            Some(uid) => {
                if let Ok(cgroup) = PodCgroup::from_path(&entry.path()) {
                    found.insert(uid, cgroup);
                }
            }
            None => walk(&entry.path(), depth + 1, found),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "8d3c4a1e-5b6f-4c7d-9e0f-123456789abc";

    #[test]
    fn names_in_both_kubelet_layouts_give_the_uid() {
        let systemd = UID.replace('-', "_");
        for name in [
            format!("pod{UID}"),
            format!("kubepods-pod{systemd}.slice"),
            format!("kubepods-burstable-pod{systemd}.slice"),
            format!("kubepods-besteffort-pod{systemd}.slice"),
        ] {
            assert_eq!(pod_uid_of(&name).as_deref(), Some(UID), "{name}");
        }
        for not_pod in [
            "kubepods.slice",
            "kubepods-burstable.slice",
            "burstable",
            "pod",
            "kubepods-pod.slice",
            "system.slice",
            "cri-containerd-0123.scope",
            "other-pod1234.slice",
            "pod../x",
        ] {
            assert_eq!(pod_uid_of(not_pod), None, "{not_pod}");
        }
    }

    fn tree(dirs: &[&str]) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        for d in dirs {
            std::fs::create_dir_all(dir.path().join(d)).expect("mkdir");
        }
        dir
    }

    #[test]
    fn finds_pods_in_the_cgroupfs_layout() {
        let other = "11111111-2222-3333-4444-555555555555";
        let root = tree(&[
            &format!("kubepods/burstable/pod{UID}/container-1"),
            &format!("kubepods/pod{other}"),
            "kubepods/besteffort",
        ]);
        let mut discovery = CgroupDiscovery::new(root.path().to_owned());
        let found = discovery.find(UID).expect("found");
        assert_eq!(
            found.path,
            root.path().join(format!("kubepods/burstable/pod{UID}"))
        );
        assert!(discovery.find(other).is_some(), "cached from the same walk");
    }

    #[test]
    fn finds_pods_in_the_systemd_layout() {
        let uid = UID.replace('-', "_");
        let root = tree(&[&format!(
            "kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-abc.scope"
        )]);
        let mut discovery = CgroupDiscovery::new(root.path().to_owned());
        let found = discovery.find(UID).expect("found");
        assert!(found.path.ends_with(format!(
            "kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice"
        )));
    }

    #[test]
    fn walks_are_bounded_and_rate_limited() {
        let root = tree(&[&format!("a/b/c/d/pod{UID}")]);
        let mut discovery = CgroupDiscovery::new(root.path().to_owned());
        assert!(discovery.find(UID).is_none(), "deeper than the walk goes");

        let root = tree(&[]);
        let mut discovery = CgroupDiscovery::new(root.path().to_owned());
        assert!(discovery.find(UID).is_none());
        std::fs::create_dir_all(root.path().join(format!("pod{UID}"))).expect("mkdir");
        assert!(
            discovery.find(UID).is_none(),
            "a second walk within MIN_RESCAN is not made"
        );
        discovery.scan();
        assert!(
            discovery.find(UID).is_some(),
            "found once the tree is walked again"
        );

        // A cgroup that went away is not served from the cache.
        std::fs::remove_dir(root.path().join(format!("pod{UID}"))).expect("rmdir");
        assert!(discovery.find(UID).is_none());
    }

    /// A scratch directory removed on drop (no extra dependency for one test module).
    mod tempdir {
        use std::path::{Path, PathBuf};

        pub struct Dir(PathBuf);

        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "trellis-cgroups-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&path).expect("mkdir");
                Self(path)
            }

            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}
