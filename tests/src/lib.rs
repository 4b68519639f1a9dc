//! Test support for Trellis: the namespace testbed and the payload pattern.
//!
//! [`testbed`] builds a small cluster out of network namespaces, veth pairs and cgroup v2
//! directories (see the Testbed section of DESIGN.md) and runs processes inside it.
//! [`cluster`] runs a real Kubernetes control plane (etcd, kube-apiserver,
//! kube-controller-manager) for the cluster tests, with the testbed as its kubelet.
//! [`pattern`] is the deterministic byte stream that the `pod-app` workload sends, so a test
//! can compute the expected SHA-256 of a transfer without holding the data.
//!
//! The crate also ships two binaries used by the testbed: `podexec` (enter a namespace and
//! cgroup, then exec) and `pod-app` (the workload that runs in pods).

pub mod bench;
pub mod cluster;
pub mod mesh;
pub mod pattern;
pub mod testbed;
