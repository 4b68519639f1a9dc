//! The CA service: who may obtain which identity, TTL caps, and denials that name the caller.

use std::collections::BTreeMap;

use tokio::sync::watch;

use super::*;
use crate::controller::{
    Published,
    auth::tests::{WAYPOINT_TOKEN, WEB_TOKEN, tokens},
    objects::{ClusterObjects, Object},
    translate::{TranslateSettings, translate},
};

const TD: &str = "cluster.local";

fn state() -> SharedState {
    let mut o = ClusterObjects::default();
    let ns: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "shop", "labels": {"trellis.dev/mesh": "enabled"}}}))
    .expect("ns");
    o.apply(Object::Namespace(ns)).expect("named");
    for (name, sa, node, ip) in [
        ("web", "web.v2", "node-a", "10.0.0.1"),
        ("api", "api", "node-b", "10.0.1.1"),
        ("wp", "waypoint", "node-a", "10.0.0.2"),
    ] {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "shop", "uid": format!("u-{name}"),
                             "labels": {"gateway.networking.k8s.io/gateway-name": name}},
                "spec": {"serviceAccountName": sa, "nodeName": node, "containers": []},
                "status": {"phase": "Running", "podIP": ip}}))
        .expect("pod");
        o.apply(Object::Pod(pod)).expect("named");
    }
    // Pod "wp" serves waypoint shop/wp; the other pods' labels name no waypoint.
    let waypoint = crate::controller::objects::PolicyObject::untyped(&serde_json::json!({
            "metadata": {"name": "wp", "namespace": "shop"},
            "spec": {"gatewayClassName": "trellis-waypoint"}}))
    .expect("gateway");
    o.apply(Object::Gateway(waypoint)).expect("named");
    let translation = translate(
        &o,
        &TranslateSettings {
            trust_domain: TD.into(),
            hbone_port: 15008,
            cluster_id: "Kubernetes".into(),
            istio_labels: false,
        },
    );
    let (_tx, rx) = watch::channel(Some(Arc::new(Published {
        version: 1,
        translation,
    })));
    rx
}

fn service(ca: Arc<LocalCa>, metrics: Arc<ControllerMetrics>) -> CaService {
    CaService::new(
        ca,
        Arc::new(tokens()),
        state(),
        metrics,
        Arc::default(),
        TD.into(),
        super::Ttl {
            default: Duration::from_hours(24),
            max: Duration::from_hours(48),
        },
    )
}

fn csr(alg: &'static rcgen::SignatureAlgorithm) -> String {
    let key = rcgen::KeyPair::generate_for(alg).expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec!["evil.example.com".into()]).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "admin");
    params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

fn request(token: &str, identity: &str, csr_pem: String, ttl_secs: u64) -> Request<SignRequest> {
    let mut request = Request::new(SignRequest {
        csr_pem,
        identity: identity.into(),
        ttl_secs,
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}

const NODE_A: &str = "token-for-node-a-0123456789";

#[tokio::test]
async fn signs_only_the_identity_for_the_requesters_key() {
    let ca = Arc::new(LocalCa::generate(TD).expect("ca"));
    let metrics = Arc::new(ControllerMetrics::new());
    let svc = service(ca.clone(), metrics.clone());
    let id = "spiffe://cluster.local/ns/shop/sa/web.v2";
    let response = svc
        .sign(request(NODE_A, id, csr(&rcgen::PKCS_ECDSA_P256_SHA256), 0))
        .await
        .expect("signed")
        .into_inner();
    assert_eq!(response.chain_pem.len(), 1, "leaf only, root excluded");
    assert_eq!(response.roots_pem, vec![ca.cert_pem().to_owned()]);

    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let leaf = CertificateDer::from_pem_slice(response.chain_pem[0].as_bytes()).expect("pem");
    assert_eq!(
        crate::tls::identity_of(&leaf)
            .expect("identity")
            .to_string(),
        id
    );
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&leaf).expect("der");
    assert_eq!(
        cert.subject().iter_common_name().count(),
        0,
        "no CN from the request"
    );
    let san = cert.subject_alternative_name().expect("ok").expect("san");
    assert_eq!(
        san.value.general_names.len(),
        1,
        "no DNS name from the request"
    );
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(life, 24 * 3600 + 300, "default TTL plus the backdating");
    // Verifies against the root like any workload certificate.
    let roots = crate::tls::root_store(ca.cert_der()).expect("roots");
    let parsed = rustls::server::ParsedCertificate::try_from(&leaf).expect("parsed");
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        &[],
        rustls_pki_types::UnixTime::now(),
        crate::tls::provider().signature_verification_algorithms.all,
    )
    .expect("chains to the root");
    assert_eq!(metrics.sign_count(SignResult::Signed), 1);
}

#[tokio::test]
async fn ttl_is_capped() {
    let ca = Arc::new(LocalCa::generate(TD).expect("ca"));
    let svc = service(ca, Arc::new(ControllerMetrics::new()));
    let id = "spiffe://cluster.local/ns/shop/sa/web.v2";
    let response = svc
        .sign(request(
            NODE_A,
            id,
            csr(&rcgen::PKCS_ECDSA_P256_SHA256),
            365 * 24 * 3600,
        ))
        .await
        .expect("signed")
        .into_inner();
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    use x509_parser::prelude::FromDer;
    let leaf = CertificateDer::from_pem_slice(response.chain_pem[0].as_bytes()).expect("pem");
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&leaf).expect("der");
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(life, 48 * 3600 + 300);
}

#[tokio::test]
async fn refuses_and_signs_nothing_otherwise() {
    let ca = Arc::new(LocalCa::generate(TD).expect("ca"));
    let metrics = Arc::new(ControllerMetrics::new());
    let svc = service(ca, metrics.clone());
    let good_csr = || csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    let cases: BTreeMap<&str, (Request<SignRequest>, tonic::Code)> = BTreeMap::from([
            ("another node's pod", (
                request(NODE_A, "spiffe://cluster.local/ns/shop/sa/api", good_csr(), 0),
                tonic::Code::PermissionDenied,
            )),
            ("a dot is not a wildcard", (
                request(NODE_A, "spiffe://cluster.local/ns/shop/sa/webxv2", good_csr(), 0),
                tonic::Code::PermissionDenied,
            )),
            ("bad token", (
                request("token-for-node-a-012345678X", "spiffe://cluster.local/ns/shop/sa/web.v2", good_csr(), 0),
                tonic::Code::Unauthenticated,
            )),
            ("no token", (
                Request::new(SignRequest {
                    csr_pem: good_csr(),
                    identity: "spiffe://cluster.local/ns/shop/sa/web.v2".into(),
                    ttl_secs: 0,
                }),
                tonic::Code::Unauthenticated,
            )),
            ("other trust domain", (
                request(NODE_A, "spiffe://other.example/ns/shop/sa/web.v2", good_csr(), 0),
                tonic::Code::InvalidArgument,
            )),
            ("not a spiffe id", (
                request(NODE_A, "spiffe://cluster.local/ns/shop/sa/web.v2/x", good_csr(), 0),
                tonic::Code::InvalidArgument,
            )),
            ("P-384 key", (
                request(NODE_A, "spiffe://cluster.local/ns/shop/sa/web.v2", csr(&rcgen::PKCS_ECDSA_P384_SHA384), 0),
                tonic::Code::InvalidArgument,
            )),
            ("garbage csr", (
                request(NODE_A, "spiffe://cluster.local/ns/shop/sa/web.v2", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(), 0),
                tonic::Code::InvalidArgument,
            )),
        ]);
    for (name, (req, code)) in cases {
        let status = svc.sign(req).await.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {status:?}");
    }
    assert_eq!(metrics.sign_count(SignResult::Signed), 0, "nothing signed");
    assert_eq!(metrics.sign_count(SignResult::Denied), 2);
    assert_eq!(metrics.sign_count(SignResult::Unauthenticated), 2);
}

#[tokio::test]
async fn denial_names_node_and_identity() {
    let ca = Arc::new(LocalCa::generate(TD).expect("ca"));
    let svc = service(ca, Arc::new(ControllerMetrics::new()));
    let status = svc
        .sign(request(
            NODE_A,
            "spiffe://cluster.local/ns/shop/sa/api",
            csr(&rcgen::PKCS_ECDSA_P256_SHA256),
            0,
        ))
        .await
        .expect_err("denied");
    assert!(
        status.message().contains("node node-a"),
        "{}",
        status.message()
    );
    assert!(
        status
            .message()
            .contains("spiffe://cluster.local/ns/shop/sa/api")
    );
}

#[tokio::test]
async fn a_waypoint_may_obtain_only_its_own_identity_and_agents_never_may() {
    let ca = Arc::new(LocalCa::generate(TD).expect("ca"));
    let metrics = Arc::new(ControllerMetrics::new());
    let svc = service(ca, metrics.clone());
    let waypoint = "spiffe://cluster.local/ns/shop/sa/waypoint";
    let signed = svc
        .sign(request(
            WAYPOINT_TOKEN,
            waypoint,
            csr(&rcgen::PKCS_ECDSA_P256_SHA256),
            0,
        ))
        .await
        .expect("a waypoint's own identity is signed")
        .into_inner();
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let leaf = CertificateDer::from_pem_slice(signed.chain_pem[0].as_bytes()).expect("pem");
    assert_eq!(
        crate::tls::identity_of(&leaf)
            .expect("identity")
            .to_string(),
        waypoint
    );

    let cases = [
        (
            "a waypoint asking for another identity",
            WAYPOINT_TOKEN,
            "spiffe://cluster.local/ns/shop/sa/web.v2",
            "may only obtain its own identity",
        ),
        (
            "a waypoint asking for its name in another namespace",
            WAYPOINT_TOKEN,
            "spiffe://cluster.local/ns/other/sa/waypoint",
            "may only obtain its own identity",
        ),
        (
            "a workload that is not a waypoint",
            WEB_TOKEN,
            "spiffe://cluster.local/ns/shop/sa/web",
            "not the service account of a waypoint",
        ),
        (
            "the agent of the waypoint pod's node",
            "token-for-node-a-0123456789",
            waypoint,
            "it is a waypoint's",
        ),
    ];
    for (name, token, identity, why) in cases {
        let status = svc
            .sign(request(
                token,
                identity,
                csr(&rcgen::PKCS_ECDSA_P256_SHA256),
                0,
            ))
            .await
            .expect_err(name);
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{name}: {status:?}"
        );
        assert!(
            status.message().contains(why),
            "{name}: {}",
            status.message()
        );
    }
    assert_eq!(metrics.sign_count(SignResult::Signed), 1);
    assert_eq!(metrics.sign_count(SignResult::Denied), 4);
}
