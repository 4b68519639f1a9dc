//! Outbound connections to Services: endpoints tried in turn, resets when none answers, and
//! the attempts a failure names.

//! The outbound handler in-process: a fake original-destination lookup, endpoints on
//! loopback addresses (outside the mesh, so reached as plain TCP), no datapath.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::*;
use crate::{
    ebpf::PodCgroup,
    identity::{CertStore, Identity, LocalCa},
    metrics::Metrics,
    proxy::{
        OriginalDst, OriginalDstLookup, Settings,
        limits::{Caps, Limits},
        pool::Pool,
    },
    state::{
        MeshState, Workload,
        service::{Endpoint, Service, ServicePort},
    },
    tls,
};

const TD: &str = "cluster.local";
const CLIENT_CGROUP: u64 = 7;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// Every connection was going to `dst`, from the client pod's cgroup.
struct FixedDst(SocketAddr);

impl OriginalDstLookup for FixedDst {
    fn lookup(&self, _client: ClientAddr) -> Option<(OriginalDst, u64)> {
        Some((OriginalDst(self.0), CLIENT_CGROUP))
    }
}

fn client_workload() -> Arc<Workload> {
    Arc::new(Workload {
        uid: "u-client".into(),
        name: "client".into(),
        namespace: "shop".into(),
        service_account: "client".into(),
        node: "node-a".into(),
        ips: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))],
        labels: Default::default(),
        enrolled: true,
        zone: None,
        cgroup: None,
        identity: Identity::new(TD, "shop", "client").expect("identity"),
        waypoint: None,
        telemetry: crate::state::WorkloadTelemetry::of_pod("client", &Default::default()),
    })
}

/// Service `web` on VIP:80 -> `target_port` of each endpoint (all ready).
fn web(endpoints: &[Ipv4Addr], target_port: u16) -> Arc<Service> {
    Arc::new(Service::new(
        "web".into(),
        "shop".into(),
        vec![IpAddr::V4(VIP)],
        vec![ServicePort {
            name: "http".into(),
            port: 80,
            target_port: Some(target_port),
        }],
        endpoints
            .iter()
            .map(|ip| Endpoint {
                ip: IpAddr::V4(*ip),
                node: String::new(),
                zone: String::new(),
                ready: true,
                workload_uid: None,
            })
            .collect(),
        false,
    ))
}

fn inputs(service: Arc<Service>, dst: SocketAddr) -> Arc<ProxyInputs> {
    let state = MeshState::build("node-a", [client_workload()], [], [service], |_| {
        Some(PodCgroup {
            path: "/cg/client".into(),
            id: CLIENT_CGROUP,
            inbound: Default::default(),
        })
    });
    let ca = LocalCa::generate(TD).expect("ca");
    let certs = Arc::new(
        CertStore::new(tls::provider(), std::slice::from_ref(ca.cert_der()), TD).expect("store"),
    );
    let server_tls = tls::server_config(tls::provider(), certs.roots().clone(), TD, certs.clone())
        .expect("server config");
    let timeout = Duration::from_secs(2);
    Arc::new(ProxyInputs {
        state: Arc::new(ArcSwap::from_pointee(state)),
        certs,
        original_dst: Arc::new(FixedDst(dst)),
        metrics: Arc::new(Metrics::new()),
        pool: Pool::new(timeout, 1),
        server_tls: Arc::new(server_tls),
        settings: Settings {
            connect_timeout: timeout,
            handshake_timeout: timeout,
            unknown_destination: UnknownDestination::Deny,
            max_streams_per_connection: 100,
            timeouts: copy::Timeouts::NONE,
        },
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
        authorized: Arc::default(),
        limits: Limits::new(Caps {
            connections: 100,
            per_pod: 100,
            handshakes: 10,
        }),
        access_log: Arc::new(crate::log_limit::AccessLogLimit::new(100, 200)),
        source: crate::proxy::transparent::SourcePolicy::node_only(),
    })
}

/// An echo server on `ip`: returns the port.
async fn echo_server(ip: Ipv4Addr, port: u16) -> u16 {
    let listener = TcpListener::bind((ip, port)).await.expect("bind echo");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// One client connection through the handler; returns what came back (`None`: reset or
/// closed without an answer).
async fn exchange(inputs: &Arc<ProxyInputs>) -> Option<Vec<u8>> {
    let front = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind front");
    let mut client = tokio::net::TcpStream::connect(front.local_addr().expect("addr"))
        .await
        .expect("connect front");
    let (accepted, peer) = front.accept().await.expect("accept");
    let handler = tokio::spawn(handle(inputs.clone(), accepted, ClientAddr(peer)));
    let mut answer = Vec::new();
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        client.write_all(b"ping").await.ok()?;
        client.shutdown().await.ok()?;
        client.read_to_end(&mut answer).await.ok()
    })
    .await
    .expect("bounded exchange");
    tokio::time::timeout(Duration::from_secs(10), handler)
        .await
        .expect("handler finishes")
        .expect("handler");
    result.filter(|_| !answer.is_empty()).map(|_| answer)
}

fn failures(inputs: &ProxyInputs, reason: &str) -> f64 {
    let text = inputs.metrics.encode();
    text.lines()
        .filter(|l| {
            l.starts_with("trellis_connection_failures_total")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_dead_endpoint_is_skipped_and_every_connection_succeeds() {
    let live = Ipv4Addr::new(127, 0, 0, 3);
    let dead = Ipv4Addr::new(127, 0, 0, 2);
    let port = echo_server(live, 0).await;
    let inputs = inputs(web(&[dead, live], port), SocketAddr::from((VIP, 80)));
    // Round robin puts the dead endpoint first every other connection.
    for i in 0..6 {
        assert_eq!(
            exchange(&inputs).await.as_deref(),
            Some(&b"ping"[..]),
            "connection {i}"
        );
    }
    let text = inputs.metrics.encode();
    assert!(
        text.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("destination_service=\"web.shop.svc.cluster.local\"")
                && l.ends_with(" 6")),
        "{text}"
    );
    assert_eq!(failures(&inputs, "endpoints_unreachable"), 0.0);
}

#[tokio::test]
async fn a_service_with_every_endpoint_dead_resets_and_counts_it() {
    // A port nothing listens on: bind, note it, close.
    let port = {
        let l = TcpListener::bind((Ipv4Addr::new(127, 0, 0, 2), 0))
            .await
            .expect("bind");
        l.local_addr().expect("addr").port()
    };
    let dead: Vec<Ipv4Addr> = (2..7).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let inputs = inputs(web(&dead, port), SocketAddr::from((VIP, 80)));
    assert_eq!(exchange(&inputs).await, None);
    assert_eq!(failures(&inputs, "endpoints_unreachable"), 1.0);
}

#[tokio::test]
async fn a_port_the_service_does_not_define_is_reset() {
    let port = echo_server(Ipv4Addr::new(127, 0, 0, 3), 0).await;
    let inputs = inputs(
        web(&[Ipv4Addr::new(127, 0, 0, 3)], port),
        SocketAddr::from((VIP, 81)),
    );
    assert_eq!(exchange(&inputs).await, None);
    assert_eq!(failures(&inputs, "unknown_service_port"), 1.0);
}

#[tokio::test]
async fn a_service_without_ready_endpoints_is_reset() {
    let inputs = inputs(web(&[], 8080), SocketAddr::from((VIP, 80)));
    assert_eq!(exchange(&inputs).await, None);
    assert_eq!(failures(&inputs, "no_ready_endpoint"), 1.0);
}

#[test]
fn at_most_max_attempts_endpoints_are_tried() {
    let endpoints: Vec<Ipv4Addr> = (1..10).map(|i| Ipv4Addr::new(10, 0, 1, i)).collect();
    let state = MeshState::build("node-a", [], [], [web(&endpoints, 8080)], |_| None);
    match resolve::destination(&state, &client_workload(), SocketAddr::from((VIP, 80))) {
        Ok(d) => {
            assert_eq!(d.candidates().len(), resolve::MAX_ATTEMPTS);
            assert!(d.candidates().iter().all(|a| a.port() == 8080));
        }
        Err(e) => panic!("resolves: {e}"),
    }
    let other = SocketAddr::from(([10, 0, 9, 9], 80));
    assert!(matches!(
        resolve::destination(&state, &client_workload(), other),
        Ok(resolve::Destination::Direct(a)) if a == other
    ));
}

#[test]
fn a_failed_service_connection_names_the_service_and_each_attempt() {
    let attempt = |ip: [u8; 4], error: &str, retry: bool| Attempt {
        addr: SocketAddr::from((ip, 8080)),
        route: None,
        reason: if retry {
            FailureReason::UpstreamUnreachable
        } else {
            FailureReason::Denied
        },
        error: error.into(),
        retry,
    };
    let (reason, error) = failure(
        Some("web.shop.svc.cluster.local"),
        &[
            attempt([10, 0, 0, 1], "refused", true),
            attempt([10, 0, 0, 2], "timed out", true),
        ],
    );
    assert_eq!(reason, FailureReason::EndpointsUnreachable);
    assert_eq!(
        error,
        "service web.shop.svc.cluster.local: no endpoint connected: attempt 1 to \
             10.0.0.1:8080: refused; attempt 2 to 10.0.0.2:8080: timed out"
    );
    // A verdict every endpoint would give ends the walk and is the reason.
    let (reason, _) = failure(
        Some("web.shop.svc.cluster.local"),
        &[attempt([10, 0, 0, 1], "401", false)],
    );
    assert_eq!(reason, FailureReason::Denied);
    // A direct destination keeps its own reason and message.
    let (reason, error) = failure(None, &[attempt([10, 0, 0, 1], "refused", true)]);
    assert_eq!(
        (reason, error.as_str()),
        (FailureReason::UpstreamUnreachable, "refused")
    );
}
