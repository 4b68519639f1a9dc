//! Which address a pod's connection comes from: only one the verified source owns, on the node
//! it came from; and the dial from the node's address reusing ports.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, Ipv6Addr},
};

use parking_lot::Mutex;
use tokio::net::TcpListener;

use super::*;
use crate::state::{NodeInfo, WorkloadTelemetry};

const TD: &str = "cluster.local";

/// Covers the pods it was given; remembers what was recorded and forgotten.
#[derive(Default)]
struct FakePath {
    covered: HashSet<IpAddr>,
    recorded: Mutex<Vec<(SocketAddr, SocketAddr)>>,
    forgotten: Mutex<Vec<(SocketAddr, SocketAddr, bool)>>,
}

impl ReturnPath for FakePath {
    fn covers(&self, pod: IpAddr) -> bool {
        self.covered.contains(&pod)
    }
    fn record(&self, client: SocketAddr, pod: SocketAddr) -> std::io::Result<()> {
        self.recorded.lock().push((client, pod));
        Ok(())
    }
    fn forget(&self, client: SocketAddr, pod: SocketAddr, linger: bool) {
        self.forgotten.lock().push((client, pod, linger));
    }
}

fn workload(name: &str, sa: &str, node: &str, ips: &[IpAddr]) -> Arc<Workload> {
    Arc::new(Workload {
        uid: format!("u-{name}"),
        name: name.into(),
        namespace: "shop".into(),
        service_account: sa.into(),
        node: node.into(),
        ips: ips.to_vec(),
        labels: Default::default(),
        enrolled: true,
        zone: None,
        cgroup: None,
        identity: Identity::new(TD, "shop", sa).expect("identity"),
        waypoint: None,
        telemetry: WorkloadTelemetry::of_pod(name, &Default::default()),
    })
}

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 200, 1, 10));
const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 200, 1, 11));
const POD: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 10));
const NODE_B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 199, 0, 2));

fn state() -> MeshState {
    MeshState::build(
        "node-a",
        [
            workload("client", "client", "node-b", &[CLIENT]),
            workload("other", "other", "node-b", &[OTHER]),
            workload("web", "web", "node-a", &[POD]),
        ],
        [NodeInfo {
            name: "node-b".into(),
            hbone: SocketAddr::new(NODE_B, 15008),
            zone: None,
        }],
        [],
        |_| None,
    )
}

fn policy(covered: &[IpAddr]) -> (SourcePolicy, Arc<FakePath>) {
    let path = Arc::new(FakePath {
        covered: covered.iter().copied().collect(),
        ..Default::default()
    });
    let policy = SourcePolicy {
        return_path: Some(path.clone()),
    };
    (policy, path)
}

fn id(sa: &str) -> Identity {
    Identity::new(TD, "shop", sa).expect("identity")
}

#[test]
fn hbone_clients_keep_an_address_their_identity_owns_on_their_node() {
    let (policy, _) = policy(&[POD]);
    let state = state();
    assert_eq!(
        policy.for_hbone(&state, &id("client"), CLIENT, NODE_B, POD),
        PodSource::Client(CLIENT)
    );
}

#[test]
fn claimed_addresses_of_other_identities_or_nodes_fall_back_to_the_node() {
    let (policy, _) = policy(&[POD]);
    let state = state();
    let unverified = PodSource::Node(NodeReason::UnverifiedSource);
    // Identity `client` claiming the address of `other`.
    assert_eq!(
        policy.for_hbone(&state, &id("client"), OTHER, NODE_B, POD),
        unverified
    );
    // An address no workload holds.
    let stranger = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    assert_eq!(
        policy.for_hbone(&state, &id("client"), stranger, NODE_B, POD),
        unverified
    );
    // The right identity and address, from a node the workload does not run on.
    let elsewhere = IpAddr::V4(Ipv4Addr::new(10, 199, 0, 3));
    assert_eq!(
        policy.for_hbone(&state, &id("client"), CLIENT, elsewhere, POD),
        unverified
    );
}

#[test]
fn disabled_uncovered_and_cross_family_fall_back_with_their_reason() {
    let state = state();
    assert_eq!(
        SourcePolicy::node_only().for_hbone(&state, &id("client"), CLIENT, NODE_B, POD),
        PodSource::Node(NodeReason::Disabled)
    );
    let (uncovered, _) = policy(&[]);
    assert_eq!(
        uncovered.for_hbone(&state, &id("client"), CLIENT, NODE_B, POD),
        PodSource::Node(NodeReason::ReturnPathNotReady)
    );
    let (covered, _) = policy(&[IpAddr::V6(Ipv6Addr::LOCALHOST)]);
    assert_eq!(
        covered.decide(Some(CLIENT), IpAddr::V6(Ipv6Addr::LOCALHOST)),
        PodSource::Node(NodeReason::FamilyMismatch)
    );
}

#[test]
fn same_node_sources_keep_only_their_own_address() {
    let (policy, _) = policy(&[POD]);
    let client = workload("client", "client", "node-a", &[CLIENT]);
    assert_eq!(
        policy.for_local(&client, CLIENT, POD),
        PodSource::Client(CLIENT)
    );
    assert_eq!(
        policy.for_local(&client, OTHER, POD),
        PodSource::Node(NodeReason::UnverifiedSource)
    );
    assert_eq!(PodSource::Client(CLIENT).log_value(), "client");
    assert_eq!(
        PodSource::Node(NodeReason::Disabled).log_value(),
        "node:disabled"
    );
}

#[tokio::test]
async fn node_dials_bind_a_port_and_record_nothing() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("listen");
    let dst = listener.local_addr().expect("addr");
    let (policy, path) = policy(&[]);
    let (stream, record) = policy
        .dial(
            PodSource::Node(NodeReason::UnverifiedSource),
            dst,
            Duration::from_secs(2),
        )
        .await
        .expect("dial");
    assert!(record.is_none());
    let (_accepted, peer) = listener.accept().await.expect("accept");
    assert_eq!(peer, stream.local_addr().expect("local"));
    assert!(path.recorded.lock().is_empty());
}

#[tokio::test]
async fn client_dials_record_the_exact_tuple_and_forget_it_when_dropped() {
    // Loopback is an address of this host, so the transparent bind needs no special route.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("listen");
    let dst = listener.local_addr().expect("addr");
    let (policy, path) = policy(&[]);
    let client = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let dialled = policy
        .dial(PodSource::Client(client), dst, Duration::from_secs(2))
        .await;
    let (stream, record) = match dialled {
        Ok(ok) => ok,
        // Unprivileged runs cannot set IP_TRANSPARENT; nothing to check then.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => return,
        Err(e) => panic!("dial: {e}"),
    };
    let (_accepted, peer) = listener.accept().await.expect("accept");
    let local = stream.local_addr().expect("local");
    assert_eq!(peer, local);
    assert_eq!(local.ip(), client);
    assert_eq!(*path.recorded.lock(), vec![(local, dst)]);
    record.expect("record").reset();
    assert_eq!(*path.forgotten.lock(), vec![(local, dst, false)]);
}
