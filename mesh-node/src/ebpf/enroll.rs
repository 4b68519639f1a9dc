//! Enrollment: which pod cgroups the datapath redirects, and what plaintext each refuses.
//!
//! Inbound mutual TLS ([`InboundMtls`]) is enforced by `mtls_ingress` from three maps the
//! [`Enroller`] writes: the pod's flag in `ENROLLED`, per-port overrides in `MTLS_PORTS`, and
//! the node's own addresses in `NODE_ADDRS` (plaintext from those always passes: kubelet
//! probes and the proxy's deliveries). Writes are ordered so that a failure leaves a port
//! refusing plaintext rather than accepting it.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use mesh_common::{Enrollment, MTLS_PERMISSIVE, MTLS_STRICT, MtlsPortKey, maps};

use super::{EbpfError, ip_key, key_to_ip, take_map};

/// A pod cgroup to enroll, identified by its directory.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodCgroup {
    pub path: PathBuf,
    pub id: u64,
    /// Whether the pod accepts inbound plaintext that did not come through the node.
    pub inbound: InboundMtls,
}

/// Which plaintext a pod refuses in the kernel: connection attempts that come neither from the
/// node (its proxy, kubelet probes) nor from the pod itself, to ports where a caller without an
/// identity is denied, by STRICT mutual TLS or by authorization policy alike (see
/// [`crate::policy::Engine::plaintext_refusals`]). Other ports let plaintext in and count it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct InboundMtls {
    /// Whether ports without an override refuse plaintext.
    pub strict: bool,
    /// Per-port overrides: port -> refuses plaintext.
    pub ports: BTreeMap<u16, bool>,
}

impl InboundMtls {
    /// STRICT on every port.
    pub fn strict() -> Self {
        Self {
            strict: true,
            ports: BTreeMap::new(),
        }
    }

    /// Whether `port` refuses plaintext.
    pub fn is_strict(&self, port: u16) -> bool {
        self.ports.get(&port).copied().unwrap_or(self.strict)
    }
}

impl PodCgroup {
    /// The cgroup v2 id of a directory is its inode number.
    pub fn from_path(path: &Path) -> Result<Self, EbpfError> {
        let meta = std::fs::metadata(path).map_err(|source| EbpfError::Io {
            what: "cannot stat cgroup",
            path: path.into(),
            source,
        })?;
        Ok(Self {
            path: path.into(),
            id: meta.ino(),
            inbound: InboundMtls::default(),
        })
    }
}

/// The writer of the enrollment maps: which pod cgroups are redirected, their inbound mutual
/// TLS modes, and the node addresses those modes exempt.
pub struct Enroller {
    enrolled: HashMap<MapData, u64, Enrollment>,
    mtls_ports: HashMap<MapData, MtlsPortKey, u32>,
    node_addrs: HashMap<MapData, [u32; 4], u32>,
}

impl std::fmt::Debug for Enroller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enroller").finish_non_exhaustive()
    }
}

impl Enroller {
    /// Takes the enrollment maps out of the loaded object: from here on, this is their only
    /// writer.
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        Ok(Self {
            enrolled: take_map(ebpf, maps::ENROLLED)?,
            mtls_ports: take_map(ebpf, maps::MTLS_PORTS)?,
            node_addrs: take_map(ebpf, maps::NODE_ADDRS)?,
        })
    }

    /// Makes the enrollment maps exactly `pods` (and refreshes the node's addresses first, so
    /// a new one is exempt before any pod turns STRICT).
    ///
    /// Order, so that no port accepts plaintext at any moment unless it did before or should
    /// after:
    /// 1. entries of pods that left go (a gone pod's cgroup id could be reused), freeing room;
    /// 2. each pod's port overrides are written, then its flags: a pod turning PERMISSIVE with
    ///    a STRICT port has that port's override in place before the flag relaxes the rest;
    /// 3. overrides no longer wanted go last; until then their ports keep their previous mode.
    ///
    /// A write that fails (a full map) is reported and the others still go in. It fails
    /// closed: a STRICT override that cannot be written makes the whole pod STRICT, and a
    /// PERMISSIVE one that cannot be written leaves its port STRICT. A pod that cannot be
    /// enrolled at all is out of the mesh, as before, and reported.
    pub fn enroll(&mut self, pods: &[PodCgroup]) -> Result<(), EbpfError> {
        let mut first_failure = self.refresh_node_addrs().err();

        let wanted: HashSet<u64> = pods.iter().map(|p| p.id).collect();
        let stale: Vec<u64> = self
            .enrolled
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !wanted.contains(id))
            .collect();
        for id in stale {
            let _ = self.enrolled.remove(&id);
        }
        let gone: Vec<MtlsPortKey> = self
            .mtls_ports
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !wanted.contains(&key.cgroup_id))
            .collect();
        for key in gone {
            let _ = self.mtls_ports.remove(&key);
        }

        let mut written: HashSet<MtlsPortKey> = HashSet::new();
        for pod in pods {
            let mut strict_override_failed = false;
            for (key, mode) in port_overrides(pod) {
                match self.mtls_ports.insert(key, mode, 0) {
                    Ok(()) => {
                        written.insert(key);
                    }
                    Err(source) => {
                        let port = (key.port & 0xffff) as u16;
                        tracing::error!(cgroup = %pod.path.display(), port, error = %source,
                            "cannot write the port's mutual TLS mode; it refuses plaintext");
                        strict_override_failed |= mode == MTLS_STRICT;
                        first_failure.get_or_insert_with(|| EbpfError::PortOverrideFull {
                            max: mesh_common::MAX_MTLS_PORTS,
                            cgroup: pod.path.clone(),
                            port,
                        });
                    }
                }
            }
            let value = Enrollment {
                flags: enrollment_flags(&pod.inbound, strict_override_failed),
                reserved: 0,
            };
            if let Err(source) = self.enrolled.insert(pod.id, value, 0) {
                tracing::error!(cgroup = %pod.path.display(), error = %source, "cannot enroll pod");
                first_failure.get_or_insert_with(|| EbpfError::EnrollmentFull {
                    max: mesh_common::MAX_ENROLLED_CGROUPS,
                    cgroup: pod.path.clone(),
                });
            }
        }

        let unwanted: Vec<MtlsPortKey> = self
            .mtls_ports
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !written.contains(key))
            .collect();
        for key in unwanted {
            let _ = self.mtls_ports.remove(&key);
        }
        first_failure.map_or(Ok(()), Err)
    }

    /// Makes `NODE_ADDRS` exactly the addresses of the network namespace the agent runs in
    /// (the node's). An address that cannot be inserted is reported, the others still go in.
    pub fn refresh_node_addrs(&mut self) -> Result<(), EbpfError> {
        let wanted = node_addresses()?;
        let stale: Vec<[u32; 4]> = self
            .node_addrs
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !wanted.contains(key))
            .collect();
        for key in stale {
            let _ = self.node_addrs.remove(&key);
        }
        let mut first_failure = None;
        for key in &wanted {
            if let Err(source) = self.node_addrs.insert(key, 1, 0) {
                let addr = key_to_ip(key);
                tracing::error!(%addr, error = %source, "cannot record node address");
                first_failure.get_or_insert(EbpfError::NodeAddrsFull {
                    max: mesh_common::MAX_NODE_ADDRS,
                    addr,
                });
            }
        }
        first_failure.map_or(Ok(()), Err)
    }

    /// The cgroup ids in the map now.
    pub fn enrolled(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
    }

    /// Whether the enrolled cgroup `id` is STRICT by default (`None`: not enrolled).
    pub fn strict_inbound(&self, id: u64) -> Option<bool> {
        let value = self.enrolled.get(&id, 0).ok()?;
        Some(value.flags & Enrollment::STRICT_INBOUND != 0)
    }

    /// The port overrides in the map now: (cgroup id, port, strict), sorted.
    pub fn port_overrides(&self) -> Vec<(u64, u16, bool)> {
        let mut out: Vec<(u64, u16, bool)> = self
            .mtls_ports
            .iter()
            .filter_map(Result::ok)
            .map(|(key, mode)| {
                (
                    key.cgroup_id,
                    (key.port & 0xffff) as u16,
                    mode == MTLS_STRICT,
                )
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// The node addresses in the map now, sorted.
    pub fn node_addrs(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = self
            .node_addrs
            .keys()
            .filter_map(Result::ok)
            .map(|key| key_to_ip(&key))
            .collect();
        out.sort_unstable();
        out
    }
}

/// The `MTLS_PORTS` entries a pod needs: only overrides that differ from its own mode change
/// anything, so only those take room in the map.
fn port_overrides(pod: &PodCgroup) -> Vec<(MtlsPortKey, u32)> {
    pod.inbound
        .ports
        .iter()
        .filter(|(_, strict)| **strict != pod.inbound.strict)
        .map(|(port, strict)| {
            let key = MtlsPortKey {
                cgroup_id: pod.id,
                port: u32::from(*port),
                reserved: 0,
            };
            (
                key,
                if *strict {
                    MTLS_STRICT
                } else {
                    MTLS_PERMISSIVE
                },
            )
        })
        .collect()
}

/// The `ENROLLED` flags of a pod; STRICT as well when one of its STRICT port overrides could not
/// be written (fail closed: better to refuse plaintext on its PERMISSIVE ports too).
fn enrollment_flags(inbound: &InboundMtls, strict_override_failed: bool) -> u32 {
    let mut flags = Enrollment::REDIRECT_OUTBOUND;
    if inbound.strict || strict_override_failed {
        flags |= Enrollment::STRICT_INBOUND;
    }
    flags
}

/// Every address of the calling thread's network namespace, as `NODE_ADDRS` keys.
fn node_addresses() -> Result<BTreeSet<[u32; 4]>, EbpfError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| EbpfError::NodeAddrs(e.into()))?;
    Ok(addrs
        .filter_map(|ifaddr| {
            let addr = ifaddr.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(ip_key(IpAddr::V4(v4.ip())))
            } else {
                addr.as_sockaddr_in6().map(|v6| ip_key(IpAddr::V6(v6.ip())))
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(strict: bool, ports: &[(u16, bool)]) -> PodCgroup {
        PodCgroup {
            path: "/cg/pod".into(),
            id: 42,
            inbound: InboundMtls {
                strict,
                ports: ports.iter().copied().collect(),
            },
        }
    }

    #[test]
    fn only_overrides_that_differ_from_the_pod_mode_are_written() {
        let key = |port| MtlsPortKey {
            cgroup_id: 42,
            port,
            reserved: 0,
        };
        assert_eq!(
            port_overrides(&pod(true, &[(80, false), (443, true)])),
            vec![(key(80), MTLS_PERMISSIVE)]
        );
        assert_eq!(
            port_overrides(&pod(false, &[(80, false), (9000, true)])),
            vec![(key(9000), MTLS_STRICT)]
        );
        assert!(port_overrides(&pod(false, &[])).is_empty());
    }

    #[test]
    fn a_strict_override_that_cannot_be_written_makes_the_pod_strict() {
        let permissive = InboundMtls::default();
        assert_eq!(
            enrollment_flags(&permissive, false),
            Enrollment::REDIRECT_OUTBOUND
        );
        assert_eq!(
            enrollment_flags(&permissive, true),
            Enrollment::REDIRECT_OUTBOUND | Enrollment::STRICT_INBOUND
        );
        assert_eq!(
            enrollment_flags(&InboundMtls::strict(), false),
            Enrollment::REDIRECT_OUTBOUND | Enrollment::STRICT_INBOUND
        );
    }

    #[test]
    fn port_overrides_win_over_the_pod_mode() {
        let inbound = pod(true, &[(80, false)]).inbound;
        assert!(!inbound.is_strict(80));
        assert!(inbound.is_strict(81));
        assert!(!InboundMtls::default().is_strict(80));
    }

    #[test]
    fn node_addresses_include_loopback() {
        let addrs = node_addresses().expect("getifaddrs");
        assert!(
            addrs.contains(&ip_key("127.0.0.1".parse().expect("ip"))),
            "{:?}",
            addrs.iter().map(key_to_ip).collect::<Vec<_>>()
        );
    }
}
