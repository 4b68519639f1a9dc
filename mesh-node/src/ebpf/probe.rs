//! Whether this node can run the datapath: the kernel accepts its programs, the cgroup root is
//! cgroup v2 and the pin directory is on bpffs. The pre-flight checks ([`crate::check`]) ask;
//! every install checks the filesystems again first.

use std::path::Path;

use aya::EbpfLoader;

use super::{DatapathSpec, EbpfError, OBJECT, load_programs};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn fs_magic(path: &Path) -> Result<i64, EbpfError> {
    let stat = nix::sys::statfs::statfs(path).map_err(|e| EbpfError::Io {
        what: "cannot statfs",
        path: path.into(),
        source: e.into(),
    })?;
    #[allow(
        clippy::unnecessary_cast,
        reason = "the field type differs between libcs"
    )]
    Ok(stat.filesystem_type().0 as i64)
}

/// Whether this kernel accepts every program of the datapath: loads them into a scratch pin
/// directory under `pin_dir` (which must be on bpffs) and removes it again. Attaches nothing,
/// so it is safe on a node whose pods are being served.
pub fn probe(pin_dir: &Path) -> Result<(), EbpfError> {
    let scratch = pin_dir.join(format!("probe_{}", std::process::id()));
    // Leave no trace: a pin directory made here is removed again (if still empty).
    let created = !pin_dir.exists();
    std::fs::create_dir_all(&scratch).map_err(|source| EbpfError::Io {
        what: "cannot create probe directory",
        path: scratch.clone(),
        source,
    })?;
    let result = EbpfLoader::new()
        .default_map_pin_directory(&scratch)
        .load(OBJECT)
        .map_err(EbpfError::from)
        .and_then(|mut ebpf| load_programs(&mut ebpf));
    let _ = std::fs::remove_dir_all(&scratch);
    if created {
        let _ = std::fs::remove_dir(pin_dir);
    }
    result
}

/// Whether `path` is a cgroup v2 directory.
pub fn is_cgroup2(path: &Path) -> Result<bool, EbpfError> {
    Ok(fs_magic(path)? == CGROUP2_SUPER_MAGIC)
}

/// Whether `path`, or its nearest existing ancestor, is on a bpf filesystem.
pub fn is_on_bpffs(path: &Path) -> Result<bool, EbpfError> {
    let mut probe = path.to_path_buf();
    while !probe.exists() {
        match probe.parent() {
            Some(parent) => probe = parent.into(),
            None => break,
        }
    }
    Ok(fs_magic(&probe)? == BPF_FS_MAGIC)
}

/// What [`super::Datapath::install`] checks first: a cgroup v2 root and a pin directory on
/// bpffs.
pub(super) fn preflight(spec: &DatapathSpec) -> Result<(), EbpfError> {
    if fs_magic(&spec.cgroup_root)? != CGROUP2_SUPER_MAGIC {
        return Err(EbpfError::NotCgroup2 {
            path: spec.cgroup_root.clone(),
        });
    }
    let mut probe = spec.pin_dir.clone();
    while !probe.exists() {
        match probe.parent() {
            Some(parent) => probe = parent.into(),
            None => break,
        }
    }
    if fs_magic(&probe)? != BPF_FS_MAGIC {
        return Err(EbpfError::NotBpffs {
            path: spec.pin_dir.clone(),
        });
    }
    Ok(())
}
