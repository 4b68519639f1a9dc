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

#![allow(
    clippy::missing_panics_doc,
    clippy::manual_assert,
    clippy::single_match_else,
    reason = "a test harness: a panic, with its message, is how a test fails; a wait's two outcomes read as a match"
)]
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "test patterns and load shapes cast values bounded by their own loops"
)]

pub mod bench;
pub mod cluster;
pub mod mesh;
pub mod pattern;
pub mod testbed;
