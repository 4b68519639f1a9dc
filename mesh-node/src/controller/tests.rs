//! The whole controller in process: a manifest directory in, TLS gRPC out.

use std::{path::Path, time::Duration};

use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::{files::tests::TempDir, *};
use crate::api::v1::{
    AgentMessage, Hello, Rejected, SignRequest, Update, agent_message::Message,
    certificate_authority_client::CertificateAuthorityClient, discovery_client::DiscoveryClient,
};

const TOKEN_A: &str = "token-for-node-a-0123456789";
const TOKEN_B: &str = "token-for-node-b-0123456789";
/// Service account shop/waypoint: the waypoint of [`WAYPOINT`].
const TOKEN_WAYPOINT: &str = "token-for-shop-waypoint-0123456789";
/// Service account shop/web: a workload, not a waypoint.
const TOKEN_WEB: &str = "token-for-shop-web-0123456789";
const LIMIT: Duration = Duration::from_secs(10);

const CLUSTER: &str = r"
apiVersion: v1
kind: Namespace
metadata: { name: shop, labels: { trellis.dev/mesh: enabled } }
---
apiVersion: v1
kind: Node
metadata: { name: node-a }
status: { addresses: [ { type: InternalIP, address: 192.168.0.1 } ] }
---
apiVersion: v1
kind: Node
metadata: { name: node-b }
status: { addresses: [ { type: InternalIP, address: 192.168.0.2 } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: web, namespace: shop, uid: u-web }
spec: { nodeName: node-a, serviceAccountName: web, containers: [] }
status: { podIP: 10.0.0.1 }
";

const API_POD: &str = r"
apiVersion: v1
kind: Pod
metadata: { name: api, namespace: shop, uid: u-api }
spec: { nodeName: node-b, serviceAccountName: api, containers: [] }
status: { podIP: 10.0.1.1 }
";

/// Waypoint shop/waypoint, its pod (on node-b), and a route for it.
const WAYPOINT: &str = r"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: { name: waypoint, namespace: shop }
spec: { gatewayClassName: trellis-waypoint }
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-1
  namespace: shop
  uid: u-waypoint-1
  labels: { gateway.networking.k8s.io/gateway-name: waypoint }
spec: { nodeName: node-b, serviceAccountName: waypoint, containers: [] }
status: { phase: Running, podIP: 10.0.1.9 }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: web, namespace: shop }
spec: { parentRefs: [ { name: waypoint } ], rules: [ { backendRefs: [ { name: web, port: 80 } ] } ] }
";

struct Running {
    dir: TempDir,
    addr: SocketAddr,
    root_pem: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ControllerError>>,
    monitoring: Option<SocketAddr>,
}

async fn start() -> Running {
    start_with(&[]).await
}

/// Starts a controller on [`CLUSTER`] plus `extra` manifest files (name, contents).
async fn start_with(extra: &[(&str, &str)]) -> Running {
    let dir = TempDir::new("controller");
    let manifests = dir.0.join("manifests");
    std::fs::create_dir(&manifests).expect("dir");
    std::fs::write(manifests.join("cluster.yaml"), CLUSTER).expect("write");
    for (name, contents) in extra {
        std::fs::write(manifests.join(name), contents).expect("write");
    }
    let tokens = dir.0.join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!(
            "node-a: {TOKEN_A}\nnode-b: {TOKEN_B}\n\
             \"serviceaccount:shop/waypoint\": {TOKEN_WAYPOINT}\n\
             \"serviceaccount:shop/web\": {TOKEN_WEB}\n"
        ),
    )
    .expect("write");
    let config_text = format!(
        "listen: 127.0.0.1:0\n\
         ca: {{ cert: {0}/ca/ca.pem, key: {0}/ca/ca-key.pem }}\n\
         source: {{ directory: {1} }}\n\
         auth: {{ bootstrap_tokens: {2} }}\n\
         monitoring: 127.0.0.1:0\n\
         max_certificate_ttl_secs: 90000\n",
        dir.0.display(),
        manifests.display(),
        tokens.display()
    );
    let config_path = dir.0.join("controller.yaml");
    std::fs::write(&config_path, config_text).expect("write");
    let config = ControllerConfig::load(&config_path).expect("valid config");

    let controller = Controller::bind(config).await.expect("bind");
    let addr = controller.local_addr();
    let root_pem = controller.ca_cert_pem().to_owned();
    let monitoring = controller.monitoring_addr();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(controller.serve(shutdown.clone()));
    Running {
        dir,
        addr,
        root_pem,
        shutdown,
        task,
        monitoring,
    }
}

async fn channel(running: &Running, domain: Option<&str>) -> Channel {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&running.root_pem));
    if let Some(domain) = domain {
        tls = tls.domain_name(domain);
    }
    Endpoint::from_shared(format!("https://{}", running.addr))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect_timeout(LIMIT)
        .connect()
        .await
        .expect("connects and verifies the controller")
}

fn authorized<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}

type Stream = (mpsc::Sender<AgentMessage>, tonic::Streaming<Update>);

/// Opens a discovery stream as `token`, saying Hello as `node`.
async fn open_stream(channel: Channel, token: &str, node: &str) -> Result<Stream, tonic::Status> {
    open_stream_as(channel, token, node, "").await
}

/// Opens a discovery stream as `token`, saying Hello as `node` in `role`.
async fn open_stream_as(
    channel: Channel,
    token: &str,
    node: &str,
    role: &str,
) -> Result<Stream, tonic::Status> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(AgentMessage {
        message: Some(Message::Hello(Hello {
            node: node.into(),
            last_version: 0,
            role: role.into(),
            build: String::new(),
        })),
    })
    .await
    .expect("queued");
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut client = DiscoveryClient::new(channel);
    let response = tokio::time::timeout(LIMIT, client.stream(authorized(outbound, token)))
        .await
        .expect("answer in time")?;
    Ok((tx, response.into_inner()))
}

async fn next(stream: &mut tonic::Streaming<Update>) -> Update {
    tokio::time::timeout(LIMIT, stream.message())
        .await
        .expect("an update in time")
        .expect("stream healthy")
        .expect("stream open")
}

fn keys(update: &Update) -> Vec<&str> {
    update.upserts.iter().map(|r| r.key.as_str()).collect()
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

#[tokio::test]
async fn discovery_streams_a_snapshot_then_deltas_over_tls() {
    let running = start().await;
    let channel = channel(&running, None).await;

    let (acks, mut updates) = open_stream(channel.clone(), TOKEN_A, "node-a")
        .await
        .expect("stream");
    let snapshot = next(&mut updates).await;
    assert!(snapshot.snapshot);
    assert_eq!(
        keys(&snapshot),
        vec!["node/node-a", "node/node-b", "workload/u-web"]
    );
    acks.send(AgentMessage {
        message: Some(Message::Ack(crate::api::v1::Ack {
            version: snapshot.version,
            rejected: vec![Rejected {
                key: "workload/u-web".into(),
                reason: "test: pretend it was malformed".into(),
            }],
        })),
    })
    .await
    .expect("ack queued");

    // A pod appears: a delta with just that workload.
    running.dir.write("manifests/api.yaml", API_POD);
    let added = next(&mut updates).await;
    assert!(!added.snapshot);
    assert!(added.version > snapshot.version, "versions increase");
    assert_eq!(keys(&added), vec!["workload/u-api"]);
    assert!(added.removes.is_empty());

    // It goes: a delta removing it.
    std::fs::remove_file(running.dir.0.join("manifests/api.yaml")).expect("remove");
    let removed = next(&mut updates).await;
    assert!(!removed.snapshot);
    assert!(removed.version > added.version);
    assert!(removed.upserts.is_empty());
    assert_eq!(removed.removes, vec!["workload/u-api".to_owned()]);

    // A reconnecting agent gets a fresh snapshot of the current state.
    let (_acks2, mut again) = open_stream(channel.clone(), TOKEN_A, "node-a")
        .await
        .expect("stream");
    let resync = next(&mut again).await;
    assert!(resync.snapshot);
    assert_eq!(resync.version, removed.version);

    // Shutdown ends the open streams and the server.
    running.shutdown.cancel();
    let end = tokio::time::timeout(LIMIT, updates.message())
        .await
        .expect("stream ends on shutdown");
    let status = end.expect_err("ends with a status telling the agent to come back");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    tokio::time::timeout(LIMIT, running.task)
        .await
        .expect("controller stops")
        .expect("no panic")
        .expect("clean stop");
}

#[tokio::test]
async fn discovery_refuses_strangers_and_other_nodes() {
    let running = start().await;
    let channel = channel(&running, None).await;
    let status = open_stream(channel.clone(), TOKEN_B, "node-a")
        .await
        .expect_err("node mismatch");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("node-a") && status.message().contains("node-b"));

    let status = open_stream(channel.clone(), "not-a-token-0123456789", "node-a")
        .await
        .expect_err("bad token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    running.shutdown.cancel();
    let _ = tokio::time::timeout(LIMIT, running.task).await;
}

#[tokio::test]
async fn ca_over_tls_signs_for_local_pods_only_and_persists_its_root() {
    let running = start().await;
    // Verified by DNS name this time (the IP SAN was used above).
    let channel = channel(&running, Some(CONTROLLER_DNS_NAME)).await;
    let mut ca = CertificateAuthorityClient::new(channel);
    let request = |token: &str, identity: &str| {
        authorized(
            SignRequest {
                csr_pem: csr(),
                identity: identity.into(),
                ttl_secs: 0,
            },
            token,
        )
    };
    // The state is published right after start; the CA may answer "unavailable" until then.
    let signed = tokio::time::timeout(LIMIT, async {
        loop {
            match ca
                .sign(request(TOKEN_A, "spiffe://cluster.local/ns/shop/sa/web"))
                .await
            {
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    })
    .await
    .expect("in time")
    .expect("signed")
    .into_inner();
    assert_eq!(signed.chain_pem.len(), 1);
    assert_eq!(signed.roots_pem, vec![running.root_pem.clone()]);

    let denied = ca
        .sign(request(TOKEN_B, "spiffe://cluster.local/ns/shop/sa/web"))
        .await
        .expect_err("web is not on node-b");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    // The generated root was persisted, its key private to the controller's user.
    use std::os::unix::fs::PermissionsExt;
    let key = running.dir.0.join("ca/ca-key.pem");
    let mode = std::fs::metadata(&key).expect("key").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let reloaded =
        LocalCa::load_or_generate(&running.dir.0.join("ca/ca.pem"), &key, "cluster.local")
            .expect("reload");
    assert_eq!(
        reloaded.cert_pem(),
        running.root_pem,
        "the same root, not a new one"
    );

    // Ready, with the refusal counted.
    let monitoring = running.monitoring.expect("monitoring enabled");
    let ready = http_get(monitoring, "/healthz/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let metrics = http_get(monitoring, "/metrics").await;
    assert!(
        metrics.contains("trellis_controller_certificate_requests_total{result=\"denied\"} 1"),
        "{metrics}"
    );
    running.shutdown.cancel();
    let _ = tokio::time::timeout(LIMIT, running.task).await;
}

/// Opens a waypoint stream, retrying while the controller has no state yet (just started).
async fn open_waypoint_stream(channel: Channel, token: &str) -> Result<Stream, tonic::Status> {
    tokio::time::timeout(LIMIT, async {
        loop {
            match open_stream_as(channel.clone(), token, "node-b", "waypoint").await {
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    })
    .await
    .expect("an answer other than unavailable in time")
}

#[tokio::test]
async fn waypoints_stream_as_their_service_account_and_alone_receive_routes() {
    let running = start_with(&[("waypoint.yaml", WAYPOINT)]).await;
    let channel = channel(&running, None).await;

    let (_acks, mut waypoint) = open_waypoint_stream(channel.clone(), TOKEN_WAYPOINT)
        .await
        .expect("the waypoint's service account streams as a waypoint");
    let snapshot = next(&mut waypoint).await;
    assert!(snapshot.snapshot);
    assert_eq!(
        keys(&snapshot),
        vec![
            "node/node-a",
            "node/node-b",
            "route/HTTPRoute/shop/web",
            "waypoint/shop/waypoint",
            "workload/u-waypoint-1",
            "workload/u-web",
        ]
    );

    let (_acks, mut agent) = open_stream(channel.clone(), TOKEN_A, "node-a")
        .await
        .expect("agent stream");
    let agent_snapshot = next(&mut agent).await;
    assert_eq!(
        keys(&agent_snapshot),
        vec![
            "node/node-a",
            "node/node-b",
            "waypoint/shop/waypoint",
            "workload/u-waypoint-1",
            "workload/u-web",
        ],
        "agents learn of the waypoint but never receive routes"
    );

    for (what, token, role, code) in [
        (
            "an agent as a waypoint",
            TOKEN_A,
            "waypoint",
            tonic::Code::PermissionDenied,
        ),
        (
            "a waypoint as an agent",
            TOKEN_WAYPOINT,
            "agent",
            tonic::Code::PermissionDenied,
        ),
        (
            "a waypoint without a role",
            TOKEN_WAYPOINT,
            "",
            tonic::Code::PermissionDenied,
        ),
        (
            "another workload as a waypoint",
            TOKEN_WEB,
            "waypoint",
            tonic::Code::PermissionDenied,
        ),
        (
            "an unknown role",
            TOKEN_A,
            "gateway",
            tonic::Code::InvalidArgument,
        ),
    ] {
        let status = open_stream_as(channel.clone(), token, "node-a", role)
            .await
            .expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
    }

    // The Gateway goes: its service account is no longer a waypoint's, and its stream ends.
    std::fs::remove_file(running.dir.0.join("manifests/waypoint.yaml")).expect("remove");
    let ended = tokio::time::timeout(LIMIT, async {
        loop {
            match waypoint.message().await {
                Ok(Some(_)) => {}
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends in time");
    let status = ended.expect_err("ends with an error");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let status = open_stream_as(channel.clone(), TOKEN_WAYPOINT, "node-b", "waypoint")
        .await
        .expect_err("no longer a waypoint");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // The agent saw the waypoint and its pod go, and nothing of the route.
    let removed = next(&mut agent).await;
    assert_eq!(
        removed.removes,
        vec![
            "waypoint/shop/waypoint".to_owned(),
            "workload/u-waypoint-1".to_owned()
        ]
    );
    running.shutdown.cancel();
    let _ = tokio::time::timeout(LIMIT, running.task).await;
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::time::timeout(LIMIT, async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .expect("write");
        let mut out = String::new();
        stream.read_to_string(&mut out).await.expect("read");
        out
    })
    .await
    .expect("answer in time")
}

#[test]
fn config_errors_name_the_field() {
    let parse = |text: &str| -> Result<ControllerConfig, String> {
        let config: ControllerConfig = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    };
    let base = "ca: { cert: /c, key: /k }\nsource: { kubernetes: {} }\n";
    let no_auth = parse(base).expect_err("auth required");
    assert!(no_auth.contains("auth"), "{no_auth}");

    let ok = parse(&format!("{base}auth: {{ token_review: {{}} }}\n")).expect("valid");
    assert_eq!(ok.listen, SocketAddr::from(([0, 0, 0, 0], 15012)));
    assert_eq!(ok.hbone_port, 15008);
    assert_eq!(ok.certificate_ttl_secs, 86400);
    assert_eq!(
        ok.auth.token_review.expect("set").agent_service_accounts,
        vec!["trellis-system/trellis-agent".to_owned()]
    );

    for (extra, field) in [
        ("trust_domain: Bad_Domain\n", "trust_domain"),
        ("certificate_ttl_secs: 0\n", "certificate_ttl_secs"),
        (
            "certificate_ttl_secs: 100\nmax_certificate_ttl_secs: 50\n",
            "max_certificate_ttl_secs",
        ),
        (
            "certificate_ttl_secs: 18446744073709551615\nmax_certificate_ttl_secs: 18446744073709551615\n",
            "max_certificate_ttl_secs",
        ),
        ("server_names: [\"not a name\"]\n", "server_names"),
        ("hbone_port: 0\n", "hbone_port"),
    ] {
        let text = format!("{base}auth: {{ token_review: {{}} }}\n{extra}");
        let err = parse(&text).expect_err(extra);
        assert!(err.contains(field), "{extra}: {err}");
    }
    let unknown = parse(&format!(
        "{base}auth: {{ token_review: {{}} }}\nlisten_port: 1\n"
    ))
    .expect_err("unknown field");
    assert!(unknown.contains("listen_port"), "{unknown}");
    let dir = parse(
        "ca: { cert: /c, key: /k }\nsource: { directory: /m }\nauth: { bootstrap_tokens: /t }\n",
    )
    .expect("directory source");
    assert!(matches!(dir.source, SourceConfig::Directory(ref p) if p == Path::new("/m")));

    // The root lives in files or in a Secret, never half of each.
    let tail = "source: { kubernetes: {} }\nauth: { token_review: {} }\n";
    parse(&format!(
        "ca: {{ secret: trellis-system/trellis-ca, publish_root: trellis-system/root }}\n{tail}"
    ))
    .expect("secret");
    for (ca, field) in [
        ("ca: { cert: /c }", "ca"),
        ("ca: { cert: /c, key: /k, secret: a/b }", "ca"),
        ("ca: {}", "ca"),
        ("ca: { secret: no-namespace }", "ca.secret"),
        (
            "ca: { secret: a/b, publish_root: Bad/Name }",
            "ca.publish_root",
        ),
    ] {
        let err = parse(&format!("{ca}\n{tail}")).expect_err(ca);
        assert!(err.contains(field), "{ca}: {err}");
    }
}

#[test]
fn serving_names_cover_the_listen_ip_and_extras() {
    let (dns, ips) = serving_names(
        "10.0.0.5:15012".parse().expect("addr"),
        &[
            "10.0.0.5".into(),
            "fd00::5".into(),
            "controller.example".into(),
        ],
    );
    assert_eq!(
        dns,
        vec![
            CONTROLLER_DNS_NAME.to_owned(),
            "controller.example".to_owned()
        ]
    );
    assert_eq!(
        ips,
        vec![
            "10.0.0.5".parse::<IpAddr>().expect("ip"),
            "fd00::5".parse().expect("ip")
        ]
    );
    let (_, ips) = serving_names("0.0.0.0:15012".parse().expect("addr"), &[]);
    assert!(ips.is_empty(), "an unspecified address names nothing");
}
