//! In-process tests of the agent's control plane client: a fake controller (tonic over TLS on
//! 127.0.0.1) serving the CA and discovery services.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rcgen::{CertificateParams, CertificateSigningRequestParams, Issuer, KeyPair, SanType};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

use super::{cgroups::CgroupDiscovery, state_task::StateTask};
use crate::{
    api::v1::{
        self as api, AgentMessage, SignRequest, SignResponse, Update, agent_message,
        certificate_authority_server::{CertificateAuthority, CertificateAuthorityServer},
        discovery_server::{Discovery, DiscoveryServer},
        resource,
    },
    config::ControlPlaneConfig,
    control_plane::{channel, feed},
    identity::{
        Identity, LocalCa,
        store::{CertManager, CertStore, IssueError, Issuer as CertIssuer, RemoteCa},
    },
    state::MeshState,
    tls,
};

const TOKEN: &str = "node-a-bootstrap-token";

/// What the fake CA does with the next requests.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Good,
    /// Signs a certificate for another identity than asked.
    WrongIdentity,
    /// Signs a certificate valid from an hour in the future.
    NotYetValid,
    /// Signs a certificate already due for renewal (valid from 10 minutes ago for 20).
    DueNow,
}

struct FakeCa {
    issuer: Issuer<'static, KeyPair>,
    mode: Arc<Mutex<Mode>>,
    requests: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl CertificateAuthority for FakeCa {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if auth != Some(&format!("Bearer {TOKEN}")) {
            return Err(Status::unauthenticated("bad token"));
        }
        let request = request.into_inner();
        self.requests.lock().push(request.identity.clone());
        let mut csr = CertificateSigningRequestParams::from_pem(&request.csr_pem)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mode = *self.mode.lock();
        let identity = match mode {
            Mode::WrongIdentity => "spiffe://cluster.local/ns/shop/sa/admin".to_owned(),
            _ => request.identity,
        };
        csr.params.subject_alt_names = vec![SanType::URI(
            identity
                .try_into()
                .map_err(|_| Status::invalid_argument("uri"))?,
        )];
        let now = time::OffsetDateTime::now_utc();
        let minute = time::Duration::minutes(1);
        (csr.params.not_before, csr.params.not_after) = match mode {
            Mode::NotYetValid => (now + 60 * minute, now + 120 * minute),
            Mode::DueNow => (now - 10 * minute, now + 10 * minute),
            Mode::Good | Mode::WrongIdentity => (now - minute, now + 60 * minute),
        };
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(SignResponse {
            chain_pem: vec![cert.pem()],
            roots_pem: vec![],
        }))
    }
}

/// The fake discovery service: replays the scripted updates on each stream and forwards the
/// agent's messages to the test.
struct FakeDiscovery {
    script: Vec<Update>,
    from_agent: mpsc::UnboundedSender<AgentMessage>,
}

#[tonic::async_trait]
impl Discovery for FakeDiscovery {
    type StreamStream =
        std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Update, Status>> + Send>>;

    async fn stream(
        &self,
        request: Request<tonic::Streaming<AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = request.into_inner();
        let from_agent = self.from_agent.clone();
        let script = self.script.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            // Send the next update only after the agent acknowledged the previous one.
            let mut script = script.into_iter();
            while let Ok(Some(message)) = inbound.message().await {
                let _ = from_agent.send(message);
                if let Some(update) = script.next() {
                    let _ = tx.send(Ok(update));
                }
            }
        });
        let stream =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
            );
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A fake controller: a root, a TLS server on 127.0.0.1 and the files an agent needs.
struct Controller {
    root: LocalCa,
    address: SocketAddr,
    dir: PathBuf,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    mode: Arc<Mutex<Mode>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Controller {
    fn start(script: Vec<Update>) -> (Self, mpsc::UnboundedReceiver<AgentMessage>) {
        let root = LocalCa::generate("cluster.local").expect("root");
        let issuer = || {
            Issuer::from_ca_cert_pem(
                root.cert_pem(),
                KeyPair::from_pem(&root.key_pem()).expect("key"),
            )
            .expect("issuer")
        };
        let server_key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST))];
        let server_cert = params
            .signed_by(&server_key, &issuer())
            .expect("server cert");

        let mode = Arc::new(Mutex::new(Mode::Good));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (from_agent, agent_messages) = mpsc::unbounded_channel();
        let incoming = TcpIncoming::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind");
        let address = incoming.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let tls = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(server_cert.pem(), server_key.serialize_pem()),
        );
        let router = tonic::transport::Server::builder()
            .tls_config(tls)
            .expect("tls")
            .add_service(CertificateAuthorityServer::new(FakeCa {
                issuer: issuer(),
                mode: mode.clone(),
                requests: requests.clone(),
            }))
            .add_service(DiscoveryServer::new(FakeDiscovery { script, from_agent }));
        let server = tokio::spawn({
            let stop = stop.clone();
            async move {
                let _ = router
                    .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                    .await;
            }
        });

        let dir = std::env::temp_dir().join(format!(
            "trellis-agent-test-{}-{}",
            std::process::id(),
            address.port()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("ca.pem"), root.cert_pem()).expect("write");
        std::fs::write(dir.join("token"), format!("{TOKEN}\n")).expect("write");
        let controller = Self {
            root,
            address,
            dir,
            stop,
            server,
            mode,
            requests,
        };
        (controller, agent_messages)
    }

    fn config(&self) -> ControlPlaneConfig {
        ControlPlaneConfig {
            address: self.address.into(),
            server_name: None,
            ca_cert: self.dir.join("ca.pem"),
            token_file: self.dir.join("token"),
            root_namespace: crate::policy::DEFAULT_ROOT_NAMESPACE.into(),
        }
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock() = mode;
    }

    fn store(&self) -> Arc<CertStore> {
        Arc::new(
            CertStore::new(
                tls::provider(),
                std::slice::from_ref(self.root.cert_der()),
                "cluster.local",
            )
            .expect("store"),
        )
    }

    fn manager(&self, store: &Arc<CertStore>) -> CertManager {
        let config = self.config();
        let remote = RemoteCa::new(
            channel::channel(&config).expect("channel"),
            channel::BearerToken::new(config.token_file),
            store.roots().clone(),
            tls::provider(),
        );
        CertManager::new(
            store.clone(),
            CertIssuer::Remote(remote),
            Duration::from_hours(1),
        )
        .with_backoff(Duration::from_millis(200), Duration::from_secs(1))
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.server.await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn identity(sa: &str) -> Identity {
    Identity::new("cluster.local", "shop", sa).expect("identity")
}

fn wanted(ids: &[&Identity]) -> HashSet<Identity> {
    ids.iter().map(|i| (*i).clone()).collect()
}

#[tokio::test]
async fn remote_certificates_are_verified_and_follow_the_local_identities() {
    let (controller, _) = Controller::start(vec![]);
    let store = controller.store();
    let mut manager = controller.manager(&store);
    let (web, db) = (identity("web"), identity("db"));

    let failures = manager.reconcile(&wanted(&[&web, &db])).await;
    assert!(failures.is_empty(), "{failures:?}");
    let cert = store.get(&web).expect("web certificate");
    assert_eq!(
        tls::identity_of(&cert.server_key.cert[0]).expect("identity"),
        web
    );
    assert!(cert.server_key.keys_match().is_ok());
    assert!(store.get(&db).is_some());

    // Nothing due: nothing requested. An identity that left: its certificate dropped.
    let before = controller.requests.lock().len();
    manager.reconcile(&wanted(&[&web])).await;
    assert_eq!(controller.requests.lock().len(), before);
    assert!(store.get(&db).is_none());
    assert!(store.get(&web).is_some());
    controller.stop().await;
}

#[tokio::test]
async fn a_certificate_for_the_wrong_identity_is_refused() {
    let (controller, _) = Controller::start(vec![]);
    controller.set_mode(Mode::WrongIdentity);
    let store = controller.store();
    let mut manager = controller.manager(&store);
    let web = identity("web");
    let failures = manager.reconcile(&wanted(&[&web])).await;
    assert!(
        matches!(&failures[..], [(_, IssueError::WrongIdentity { presented, .. })] if presented.ends_with("/sa/admin")),
        "{failures:?}"
    );
    assert!(store.get(&web).is_none(), "never used");
    assert!(store.failures().contains_key(&web.to_string()));
    controller.stop().await;
}

#[tokio::test]
async fn an_unreachable_ca_keeps_the_old_certificate_and_retries_with_backoff() {
    let (controller, _) = Controller::start(vec![]);
    controller.set_mode(Mode::DueNow);
    let store = controller.store();
    let mut manager = controller.manager(&store);
    let web = identity("web");
    assert!(manager.reconcile(&wanted(&[&web])).await.is_empty());
    let held = store.get(&web).expect("issued");

    controller.stop().await;
    let failures = manager.reconcile(&wanted(&[&web])).await;
    assert_eq!(failures.len(), 1, "renewal was due and failed");
    let kept = store
        .get(&web)
        .expect("old certificate kept until it expires");
    assert!(Arc::ptr_eq(&kept, &held));
    // The retry waits (no tight loop) but not for long.
    let wake = manager.next_wake().expect("a retry is scheduled");
    let wait = wake.saturating_duration_since(tokio::time::Instant::now());
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(1),
        "{wait:?}"
    );
    // Before the retry is due, nothing is attempted.
    assert!(manager.reconcile(&wanted(&[&web])).await.is_empty());
}

#[tokio::test]
async fn a_not_yet_valid_certificate_is_requested_again_at_once_then_with_backoff() {
    let (controller, _) = Controller::start(vec![]);
    controller.set_mode(Mode::NotYetValid);
    let store = controller.store();
    let mut manager = controller.manager(&store);
    let web = identity("web");
    let failures = manager.reconcile(&wanted(&[&web])).await;
    assert!(
        matches!(&failures[..], [(_, IssueError::NotYetValid { .. })]),
        "{failures:?}"
    );
    assert!(store.get(&web).is_none());
    let now = tokio::time::Instant::now();
    assert!(
        manager.next_wake().expect("retry") <= now,
        "first retry is immediate"
    );
    // The immediate retry fails the same way: from now on, back off.
    assert_eq!(manager.reconcile(&wanted(&[&web])).await.len(), 1);
    assert!(manager.next_wake().expect("retry") > tokio::time::Instant::now());
    assert_eq!(controller.requests.lock().len(), 2);

    controller.set_mode(Mode::Good);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(manager.reconcile(&wanted(&[&web])).await.is_empty());
    assert!(store.get(&web).is_some());
    controller.stop().await;
}

async fn next(rx: &mut mpsc::UnboundedReceiver<AgentMessage>) -> agent_message::Message {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("agent message in time")
        .expect("stream open")
        .message
        .expect("message")
}

fn workload(uid: &str, name: &str, node: &str, ip: &str, enrolled: bool) -> api::Resource {
    api::Resource {
        key: format!("workload/{uid}"),
        kind: Some(resource::Kind::Workload(api::Workload {
            uid: uid.into(),
            name: name.into(),
            namespace: "shop".into(),
            service_account: name.into(),
            node: node.into(),
            ips: vec![ip.into()],
            labels: Default::default(),
            enrolled,
            zone: String::new(),
            waypoint: String::new(),
            telemetry: None,
        })),
    }
}

#[tokio::test]
async fn the_feed_applies_snapshots_and_deltas_then_acknowledges() {
    let uid = "8d3c4a1e-5b6f-4c7d-9e0f-123456789abc";
    let script = vec![
        Update {
            version: 1,
            snapshot: true,
            upserts: vec![
                workload(uid, "web", "node-a", "10.0.0.1", true),
                workload("remote-1", "db", "node-b", "10.0.1.1", true),
                api::Resource {
                    key: "node/node-b".into(),
                    kind: Some(resource::Kind::Node(api::Node {
                        name: "node-b".into(),
                        hbone: "10.1.0.2:15008".into(),
                        zone: String::new(),
                    })),
                },
            ],
            removes: vec![],
        },
        Update {
            version: 2,
            snapshot: false,
            upserts: vec![
                workload("remote-1", "db", "node-b", "bogus", true),
                workload("remote-2", "cache", "node-b", "10.0.1.2", false),
            ],
            removes: vec![],
        },
    ];
    let (controller, mut from_agent) = Controller::start(script);
    let cgroup_root = controller.dir.join("cgroups");
    std::fs::create_dir_all(cgroup_root.join(format!("pod{uid}"))).expect("pod cgroup");

    let config = controller.config();
    let shutdown = CancellationToken::new();
    let state = Arc::new(ArcSwap::from_pointee(MeshState::empty("node-a")));
    let (publish, mut states) = watch::channel(None);
    let (applied_tx, applied_rx) = mpsc::channel(1);
    let status = Arc::new(ArcSwap::from_pointee(feed::FeedStatus::default()));
    tokio::spawn(
        StateTask {
            local_node: "node-a".into(),
            root_namespace: crate::policy::DEFAULT_ROOT_NAMESPACE.into(),
            state: state.clone(),
            publish,
            cgroups: CgroupDiscovery::new(cgroup_root),
            applied: applied_rx,
        }
        .run(shutdown.clone()),
    );
    tokio::spawn(
        feed::Feed {
            node: "node-a".into(),
            role: "agent",
            trust_domain: "cluster.local".into(),
            channel: channel::channel(&config).expect("channel"),
            token: channel::BearerToken::new(config.token_file.clone()),
            status: status.clone(),
            applied: applied_tx,
            backoff: feed::default_backoff(),
        }
        .run(shutdown.clone()),
    );

    match next(&mut from_agent).await {
        agent_message::Message::Hello(hello) => assert_eq!(hello.node, "node-a"),
        other @ agent_message::Message::Ack(_) => panic!("expected hello, got {other:?}"),
    }
    match next(&mut from_agent).await {
        agent_message::Message::Ack(ack) => {
            assert_eq!(ack.version, 1);
            assert!(ack.rejected.is_empty());
        }
        other @ agent_message::Message::Hello(_) => panic!("expected ack, got {other:?}"),
    }
    let first = states.borrow_and_update().clone().expect("published");
    assert_eq!(first.local_cgroups().len(), 1, "local pod found by uid");
    assert!(
        first
            .workload_by_ip("10.0.1.1".parse().expect("ip"))
            .is_some()
    );

    match next(&mut from_agent).await {
        agent_message::Message::Ack(ack) => {
            assert_eq!(ack.version, 2);
            assert_eq!(ack.rejected.len(), 1);
            assert_eq!(ack.rejected[0].key, "workload/remote-1");
            assert!(ack.rejected[0].reason.contains("ips[0]"));
        }
        other @ agent_message::Message::Hello(_) => panic!("expected ack, got {other:?}"),
    }
    // Acked means swapped in: the bad resource kept its last good state, the rest applied.
    let now = state.load_full();
    assert!(
        now.workload_by_ip("10.0.1.1".parse().expect("ip"))
            .is_some()
    );
    assert!(
        now.workload_by_ip("10.0.1.2".parse().expect("ip"))
            .is_none(),
        "not enrolled"
    );
    assert!(
        now.known_workload_by_ip("10.0.1.2".parse().expect("ip"))
            .is_some()
    );
    let status = status.load();
    assert!(status.connected);
    assert_eq!(status.last_version, Some(2));
    assert_eq!(status.rejected.len(), 1);

    shutdown.cancel();
    controller.stop().await;
}

#[tokio::test]
async fn a_wrong_token_is_refused_and_retried() {
    let (controller, _) = Controller::start(vec![]);
    std::fs::write(controller.dir.join("token"), "stolen").expect("write");
    let store = controller.store();
    let mut manager = controller.manager(&store);
    let failures = manager.reconcile(&wanted(&[&identity("web")])).await;
    assert!(
        matches!(
            &failures[..],
            [(
                _,
                IssueError::Refused {
                    code: tonic::Code::Unauthenticated,
                    ..
                }
            )]
        ),
        "{failures:?}"
    );
    controller.stop().await;
}

#[test]
fn hbone_connections_per_peer_defaults_to_one_per_core() {
    use crate::config::OutboundConfig;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    assert_eq!(super::hbone_spread(&OutboundConfig::default()), cores);
    let three = OutboundConfig {
        hbone_connections_per_peer: std::num::NonZeroUsize::new(3),
        ..OutboundConfig::default()
    };
    assert_eq!(super::hbone_spread(&three), 3, "configured: as configured");
}

#[tokio::test]
async fn a_refused_configuration_stops_the_agent_before_the_datapath() {
    // A configuration built in code, never validated: more exclusions than the pinned map
    // holds. The agent must refuse it before it binds a listener or opens the pin directory,
    // which would otherwise be created here.
    let pin_dir = std::env::temp_dir().join(format!("trellis-agent-order-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin_dir);
    let text = format!(
        "node: node-a\nca: {{ cert: /nonexistent/ca.pem, key: /nonexistent/ca.key }}\n\
         listen: {{ outbound: \"127.0.0.1:1\", hbone: \"127.0.0.1:1\" }}\n\
         datapath: {{ cgroup_root: /nonexistent, pin_dir: {} }}\n\
         nodes: [{{ name: node-a, hbone: \"10.1.0.1:15008\" }}]\n",
        pin_dir.display()
    );
    let mut config = crate::config::AgentConfig::parse(&text).expect("valid as written");
    config.datapath.excluded_ports =
        (1..=u16::try_from(mesh_common::MAX_EXCLUDED_PORTS + 1).expect("fits")).collect();
    match super::run(config, CancellationToken::new()).await {
        Err(super::AgentError::Config(err)) => {
            assert_eq!(err.field(), Some("datapath.excluded_ports"), "{err}");
        }
        other => panic!("expected a configuration refusal, got {other:?}"),
    }
    assert!(!pin_dir.exists(), "nothing was pinned");
}
