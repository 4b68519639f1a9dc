//! The same-node fast path, userspace side.
//!
//! In the kernel, `sock_ops` puts pod sockets of connections to and from the node proxy in
//! `FASTPATH_PODS`, `sock_ops_proxy` (attached to the proxy's own cgroup) puts the proxy's
//! accepted ends of redirected connections in `FASTPATH_PROXY`, and `fastpath_msg` queues what
//! a pod sends straight onto the proxy's socket. This module finds the proxy's own cgroup and
//! holds the one handle the proxy needs at run time: putting the sockets it dials to local pods
//! in `FASTPATH_PROXY`, so the pod's replies take the short way back too.

use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::maps::{MapData, SockHash};
use mesh_common::SockPair;
use tokio::net::TcpStream;

use super::sock_key;

/// The proxy's side of the fast path: its sockets to local pods.
pub struct FastPath {
    /// aya's map handle writes through `&mut self`; the update is one syscall, so holding the
    /// lock for it is cheaper than any alternative and never contended for long.
    proxy_sockets: Mutex<SockHash<MapData, SockPair>>,
}

impl FastPath {
    pub(super) fn new(proxy_sockets: SockHash<MapData, SockPair>) -> Self {
        Self {
            proxy_sockets: Mutex::new(proxy_sockets),
        }
    }

    /// Puts the proxy's end of a connection it dialled to a pod of this node on the fast path:
    /// from then on, what the pod sends on it is queued straight onto `stream`. Call before the
    /// pod can have sent anything that matters (right after connect); a pod that sent earlier
    /// stays on the TCP/IP path for the connection's lifetime, which is only slower.
    pub fn join(&self, stream: &TcpStream) {
        let (Ok(local), Ok(peer)) = (stream.local_addr(), stream.peer_addr()) else {
            return;
        };
        let key = SockPair {
            local: sock_key(local),
            remote: sock_key(peer),
        };
        let Ok(mut map) = self.proxy_sockets.lock() else {
            return;
        };
        if let Err(error) = map.insert(key, stream.as_raw_fd(), 0) {
            // Full map or a socket already closing: the connection works, on the slow path.
            tracing::debug!(%error, %local, %peer, "connection stays off the fast path");
        }
    }
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath").finish_non_exhaustive()
    }
}

/// The inode number of the initial cgroup namespace (`PROC_CGROUP_INIT_INO`).
const INIT_CGROUP_NS_INO: u64 = 0xEFFF_FFFB;

/// The cgroup v2 directory this process runs in, where `sock_ops_proxy` attaches. `None` when
/// that is the root of the whole machine's hierarchy: attaching there would run the program for
/// every socket of every process.
pub fn own_cgroup() -> std::io::Result<Option<PathBuf>> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let Some(relative) = cgroups.lines().find_map(|line| line.strip_prefix("0::")) else {
        return Ok(None);
    };
    let Some(mount) = cgroup2_mount(&mountinfo) else {
        return Ok(None);
    };
    if relative == "/" {
        // In a cgroup namespace (a container), "/" is the container's own cgroup.
        let ns = std::fs::metadata("/proc/self/ns/cgroup")?;
        if std::os::unix::fs::MetadataExt::ino(&ns) == INIT_CGROUP_NS_INO {
            return Ok(None);
        }
    }
    Ok(Some(mount.join(relative.trim_start_matches('/'))))
}

/// The mount point of the cgroup v2 hierarchy in `/proc/self/mountinfo` format.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, rest) = line.split_once(" - ")?;
        if rest.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        // Fields: id, parent, major:minor, root, mount point, ...
        let point = mount.split_whitespace().nth(4)?;
        Some(Path::new(&unescape_octal(point)).to_path_buf())
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let digits: String = chars.clone().take(3).collect();
            if digits.len() == 3
                && let Ok(code) = u8::from_str_radix(&digits, 8)
            {
                out.push(char::from(code));
                for _ in 0..3 {
                    chars.next();
                }
                continue;
            }
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
25 22 0:22 / /sys/fs/cgroup rw,nosuid shared:9 - tmpfs tmpfs ro,mode=755
30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev shared:10 - cgroup2 cgroup2 rw,nsdelegate
31 25 0:27 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu
";

    #[test]
    fn the_cgroup2_mount_is_found_among_v1_hierarchies() {
        assert_eq!(
            cgroup2_mount(MOUNTINFO),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("22 1 254:0 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }

    #[test]
    fn escaped_mount_points_are_decoded() {
        let line = "30 25 0:26 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(line), Some(PathBuf::from("/mnt/cg two")));
        assert_eq!(unescape_octal("a\\\\b"), "a\\\\b");
        assert_eq!(unescape_octal("a\\134b"), "a\\b");
    }
}
