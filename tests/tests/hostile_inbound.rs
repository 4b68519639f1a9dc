//! Hostile peers on the HBONE port (HOSTILE.md items 1-14).
//!
//! Four tests start a two-node mesh and attack node 1's HBONE listener (10.199.0.2:15008) from
//! a thread inside node 0's network namespace, with real sockets, real TLS 1.3 and real HTTP/2:
//! the position of a compromised or misconfigured machine on the node LAN.
//!
//! * [`handshakes_outside_the_hbone_contract_are_refused_and_counted`]: HOSTILE 1-4, and the
//!   server-name half of 5;
//! * [`connect_requests_are_classified_before_anything_is_dialled`]: HOSTILE 6-9;
//! * [`oversized_headers_and_http2_floods_are_contained`]: HOSTILE 10-11;
//! * [`stalled_handshakes_and_idle_connections_are_closed`]: HOSTILE 14.
//!
//! Each attack must be
//!
//! * refused the right way: a failed TLS handshake, an HTTP status, a stream reset or a GOAWAY;
//! * logged: an access log event on node 1 whose `error` names the reason;
//! * counted: `trellis_connection_failures_total{direction="inbound",reason=...}` on node 1 goes
//!   up by exactly one, and no other failure counter moves;
//! * harmless to everyone else: nothing is dialled for a refused request, and afterwards (for
//!   floods, also during) a legitimate request from pod-0-0 to pod-1-0 through the mesh succeeds
//!   and is carried by node 1's HBONE listener.
//!
//! The fifth test, [`outbound_refuses_a_peer_that_proves_the_wrong_identity`], turns the roles
//! around (HOSTILE 5): an impostor takes node 1's HBONE address and node 0's agent, dialling it
//! for pod-0-0, must refuse it before sending a byte of HTTP/2.
//!
//! Tests collect every violated case and fail once at the end listing all of them, so one
//! regression does not hide the state of the other cases.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test traffic casts sizes and counts bounded by its own arguments"
)]

use std::{
    collections::BTreeMap,
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use bytes::Bytes;
use h2::{RecvStream, SendStream, client::SendRequest};
use http::{Method, Request};
use mesh_node::{
    identity::{Identity, LocalCa},
    tls,
};
use mesh_tests::{
    mesh::{HBONE_PORT, Mesh, MeshOptions, TRUST_DOMAIN, metric_sum},
    testbed::{Pod, Server, Testbed, e2e_gate},
};
use parking_lot::Mutex;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
    time::timeout,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

/// Bound on one `pod-app` run.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one whole attack, whatever it does.
const ATTACK_TIMEOUT: Duration = Duration::from_mins(1);
/// Bound on any single network step of an attack (connect, handshake, response).
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long node 1 may take to log and count a refusal.
const LOG_TIMEOUT: Duration = Duration::from_secs(10);
/// The test mesh uses `inbound.handshake_timeout_ms: 5000`: a stalled peer must be gone well
/// within this.
const CLOSE_BOUND: Duration = Duration::from_secs(15);
/// Lifetime of the certificates the tests issue themselves.
const CERT_TTL: Duration = Duration::from_hours(1);

/// pod-1-0's HTTP server: the legitimate destination.
const POD_1_0_HTTP: &str = "10.200.1.10:8080";
/// What the tests send through an open tunnel.
const TUNNEL_REQUEST: &[u8] =
    b"GET /through-hbone HTTP/1.1\r\nHost: 10.200.1.10:8080\r\nConnection: close\r\n\r\n";

// ---------------------------------------------------------------------------------------------
// HOSTILE 1-4 and the server-name side of 5: the TLS handshake.
// ---------------------------------------------------------------------------------------------

/// Everything that is not a mutual-TLS 1.3 handshake with ALPN h2, a client certificate the mesh
/// issued, currently valid, for an identity of this trust domain, asking for an identity node 1
/// holds, is refused before any HTTP/2 is spoken, logged and counted as `tls_handshake`.
#[test]
fn handshakes_outside_the_hbone_contract_are_refused_and_counted() -> Result<()> {
    if !e2e_gate("handshakes_outside_the_hbone_contract_are_refused_and_counted") {
        return Ok(());
    }
    let tb = Testbed::builder().build()?;
    let mesh = Mesh::start(&tb, &MeshOptions::default())?;
    let _servers = http_servers(&tb)?;
    let env = Env::new(&tb, &mesh)?;
    env.assert_mesh_serves("start-up")?;
    let mut violations = Vec::new();

    // HOSTILE 1: bytes that are not TLS at all. The listener must hang up without answering as
    // HTTP (at most a TLS alert record comes back), and nothing may count as a request.
    let h2c_preface = {
        let mut bytes = raw::PREFACE.to_vec();
        raw::frame(&mut bytes, raw::SETTINGS, 0, 0, &[]);
        bytes
    };
    let plaintexts: [(&str, Vec<u8>); 2] = [
        (
            "plaintext HTTP/1.1 request",
            b"GET / HTTP/1.1\r\nHost: 10.199.0.2:15008\r\n\r\n".to_vec(),
        ),
        ("cleartext HTTP/2 (h2c prior knowledge)", h2c_preface),
    ];
    for (what, payload) in plaintexts {
        violations.extend(env.check(what, || {
            let before = env.before("tls_handshake")?;
            let hbone = env.hbone;
            let (local, reply) = env.attack(move || async move {
                let mut tcp = tcp(hbone).await?;
                let local = tcp.local_addr()?;
                tcp.write_all(&payload).await?;
                let mut reply = Vec::new();
                // Reading to the end only finishes if the listener hangs up; a reset is fine.
                let read = timeout(
                    IO_TIMEOUT,
                    AsyncReadExt::take(&mut tcp, 64 * 1024).read_to_end(&mut reply),
                )
                .await;
                ensure!(read.is_ok(), "the listener kept the connection open");
                Ok((local, reply))
            })?;
            ensure!(
                !reply.starts_with(b"HTTP/"),
                "answered as HTTP: {:?}",
                String::from_utf8_lossy(&reply)
            );
            ensure!(
                reply.first().is_none_or(|&b| b == 0x15),
                "sent something other than a TLS alert: {reply:02x?}"
            );
            env.assert_refused(&before, local, &["TLS handshake"])?;
            env.assert_nothing_dialled(&before)?;
            env.assert_mesh_serves(what)
        }));
    }

    let pod00 = tb.pod(0, 0);
    let pod10 = tb.pod(1, 0);
    let valid = env.client_as(pod00)?;

    // HOSTILE 2: a client that does not offer ALPN h2 is refused in the handshake itself,
    // and the log says that ALPN is the problem (not, say, a missing certificate).
    let alpn_cases: [(&str, Vec<Vec<u8>>); 2] = [
        ("TLS without ALPN", vec![]),
        ("TLS with ALPN http/1.1 only", vec![b"http/1.1".to_vec()]),
    ];
    for (what, alpn) in alpn_cases {
        let mut config = (*valid).clone();
        config.alpn_protocols = alpn;
        violations.extend(env.check(what, || {
            env.expect_tls_refusal(
                Arc::new(config),
                sni(pod10),
                true,
                // rustls says "peer doesn't support any known protocol" when ALPN fails.
                &["alpn", "application protocol", "known protocol"],
            )
        }));
    }

    // HOSTILE 3: no client certificate. With TLS 1.3 the client may only learn on its first
    // read, so what matters is that no request gets an answer.
    violations.extend(env.check("TLS without a client certificate", || {
        env.expect_tls_refusal(
            no_client_auth()?,
            sni(pod10),
            false,
            &[
                "no certificates",
                "certificate required",
                "client certificate",
            ],
        )
    }));

    // HOSTILE 3: certificates the mesh did not issue, or not now. A forged root may copy the
    // mesh root's name (then the signature is what fails) or not (then the issuer is unknown).
    let forgers = [
        (
            "client certificate from a forged root with the mesh root's name",
            LocalCa::generate(TRUST_DOMAIN)?,
            &["BadSignature", "bad signature"][..],
        ),
        (
            "client certificate from another root",
            LocalCa::generate("other.example")?,
            &["UnknownIssuer", "unknown issuer"][..],
        ),
    ];
    for (what, forger, names) in forgers {
        let forged = forger.issue(&identity(pod00), CERT_TTL)?;
        violations.extend(env.check(what, || {
            env.expect_tls_refusal(
                env.client(forged.chain, forged.key)?,
                sni(pod10),
                false,
                names,
            )
        }));
    }
    let uri = |id: &Identity| -> Result<rcgen::SanType> {
        Ok(rcgen::SanType::URI(id.to_string().try_into()?))
    };
    violations.extend(
        env.check("expired client certificate from the mesh CA", || {
            let (chain, key) =
                env.sign_with_mesh_ca(vec![uri(&identity(pod00))?], ((2020, 1, 1), (2020, 1, 2)))?;
            env.expect_tls_refusal(env.client(chain, key)?, sni(pod10), false, &["expired"])
        }),
    );
    violations.extend(
        env.check("not yet valid client certificate from the mesh CA", || {
            let (chain, key) =
                env.sign_with_mesh_ca(vec![uri(&identity(pod00))?], ((2099, 1, 1), (2099, 1, 2)))?;
            env.expect_tls_refusal(
                env.client(chain, key)?,
                sni(pod10),
                false,
                &["not valid yet", "notvalidyet", "not yet valid"],
            )
        }),
    );
    violations.extend(env.check(
        "client certificate from the mesh CA without a SPIFFE ID",
        || {
            let (chain, key) = env.sign_with_mesh_ca(
                vec![rcgen::SanType::DnsName("pod-0-0.default.svc".try_into()?)],
                ((2020, 1, 1), (2090, 1, 1)),
            )?;
            env.expect_tls_refusal(
                env.client(chain, key)?,
                sni(pod10),
                false,
                &["URI SAN", "SPIFFE"],
            )
        },
    ));

    // HOSTILE 4: the mesh CA signed it, but for another trust domain.
    let foreign = env.ca.issue(
        &Identity::new("evil.local", "default", &pod00.name)?,
        CERT_TTL,
    )?;
    violations.extend(env.check(
        "client certificate for another trust domain (spiffe://evil.local/...)",
        || {
            env.expect_tls_refusal(
                env.client(foreign.chain, foreign.key)?,
                sni(pod10),
                false,
                &["trust domain", "ApplicationVerificationFailure"],
            )
        },
    ));

    // HOSTILE 5, server side: node 1 presents only identities of its own pods. Asking it for
    // pod-0-0 (which lives on node 0), for an identity nobody has, for a name that is not an
    // identity, or for nothing, gets no certificate and so no handshake.
    let unknown_names: [(&str, ServerName<'static>); 4] = [
        (
            "server name of pod-0-0, which node 1 does not host",
            sni(pod00),
        ),
        (
            "server name of an identity nobody holds",
            ServerName::try_from("default.ghost.id.trellis")?,
        ),
        (
            "server name that is not an identity",
            ServerName::try_from("node-1.example.com")?,
        ),
        (
            "no server name (IP address)",
            ServerName::IpAddress(Ipv4Addr::new(10, 199, 0, 2).into()),
        ),
    ];
    for (what, name) in unknown_names {
        violations.extend(env.check(what, || {
            env.expect_tls_refusal(
                valid.clone(),
                name,
                true,
                &["certificate", "server name", "identity"],
            )
        }));
    }

    ensure!(
        violations.is_empty(),
        "{} case(s) violated the HBONE handshake contract:\n{}",
        violations.len(),
        violations.join("\n")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// HOSTILE 6-9: the CONNECT request on an authenticated connection.
// ---------------------------------------------------------------------------------------------

/// One CONNECT (or not) on a fresh, fully authenticated HBONE connection (client pod-0-0,
/// server name pod-1-0), and how node 1 must answer it.
struct RequestCase {
    what: &'static str,
    method: Method,
    uri: &'static str,
    headers: &'static [(&'static str, &'static str)],
    status: u16,
    reason: &'static str,
    /// h2 itself may reject the request as malformed with a stream reset before the agent
    /// sees it; then nothing is logged or counted by the agent, and nothing is dialled.
    h2_may_reset: bool,
}

impl RequestCase {
    fn connect(what: &'static str, uri: &'static str, status: u16, reason: &'static str) -> Self {
        Self::method(Method::CONNECT, what, uri, status, reason)
    }

    fn method(
        method: Method,
        what: &'static str,
        uri: &'static str,
        status: u16,
        reason: &'static str,
    ) -> Self {
        Self {
            what,
            method,
            uri,
            headers: &[],
            status,
            reason,
            h2_may_reset: false,
        }
    }

    fn with_headers(self, headers: &'static [(&'static str, &'static str)]) -> Self {
        Self { headers, ..self }
    }

    fn or_h2_reset(self) -> Self {
        Self {
            h2_may_reset: true,
            ..self
        }
    }
}

/// Headers a hostile client adds to claim pod-1-1's identity or address.
const IDENTITY_CLAIMS: &[(&str, &str)] = &[
    ("forwarded", "for=\"10.200.1.11:1\""),
    ("x-forwarded-for", "10.200.1.11"),
    (
        "x-forwarded-client-cert",
        "By=spiffe://cluster.local/ns/default/sa/pod-1-1;URI=spiffe://cluster.local/ns/default/sa/pod-1-1",
    ),
    (
        "x-spiffe-id",
        "spiffe://cluster.local/ns/default/sa/pod-1-1",
    ),
    (
        "baggage",
        "k8s.pod.name=pod-1-1,k8s.namespace.name=default,service.account=pod-1-1",
    ),
];

/// A CONNECT is served only if it names, as a literal `IP:port`, a pod on this node that runs
/// as the identity the client asked for in the handshake; everything else is answered with
/// 400 (or 503 when the pod does not accept), logged and counted under its reason, and nothing
/// is dialled. Headers never change who the client is.
#[test]
fn connect_requests_are_classified_before_anything_is_dialled() -> Result<()> {
    if !e2e_gate("connect_requests_are_classified_before_anything_is_dialled") {
        return Ok(());
    }
    let tb = Testbed::builder().build()?;
    let mesh = Mesh::start(&tb, &MeshOptions::default())?;
    let _servers = http_servers(&tb)?;
    let env = Env::new(&tb, &mesh)?;
    env.assert_mesh_serves("start-up")?;
    let pod00_id = identity(tb.pod(0, 0)).to_string();
    let mut violations = Vec::new();

    // The control: the hostile client is a correct HBONE client, so the refusals below are
    // about their requests alone.
    violations.extend(env.check("valid CONNECT (control)", || {
        let before = env.before("none")?;
        let (local, outcome, reply) = env.tunnel(connect_req(POD_1_0_HTTP, &[])?)?;
        ensure!(matches!(outcome, Outcome::Status(200)), "got {outcome:?}");
        let reply = reply.unwrap_or_default();
        ensure!(
            reply.starts_with("HTTP/1.1 200") && reply.contains("\"server\":\"pod-1-0\""),
            "pod-1-0 did not answer through the tunnel: {reply:?}"
        );
        let local = local.to_string();
        let event = env.wait_event(&before, |e| e["src_addr"] == local.as_str())?;
        ensure!(event["src_identity"] == pod00_id.as_str(), "{event}");
        ensure!(event["dst_workload"] == "default/pod-1-0", "{event}");
        ensure!(
            event["error"].as_str().is_none_or(str::is_empty),
            "{local}: {event}"
        );
        Ok(())
    }));

    let cases = [
        // HOSTILE 7: only CONNECT.
        RequestCase::method(
            Method::GET,
            "GET instead of CONNECT",
            "http://10.200.1.10:8080/",
            400,
            "bad_method",
        ),
        RequestCase::method(
            Method::POST,
            "POST instead of CONNECT",
            "http://10.200.1.10:8080/",
            400,
            "bad_method",
        ),
        // HOSTILE 6: only pods of this node.
        RequestCase::connect(
            "CONNECT to pod-0-0, which is on node 0",
            "10.200.0.10:8080",
            400,
            "not_local",
        ),
        RequestCase::connect(
            "CONNECT to an address that is no pod",
            "10.200.1.99:8080",
            400,
            "not_local",
        ),
        // HOSTILE 8: never the proxy itself.
        RequestCase::connect(
            "CONNECT to node 1's own HBONE listener",
            "10.199.0.2:15008",
            400,
            "not_local",
        ),
        RequestCase::connect(
            "CONNECT to node 1's outbound listener",
            "10.200.1.1:15001",
            400,
            "not_local",
        ),
        RequestCase::connect(
            "CONNECT to the loopback admin port",
            "127.0.0.1:15000",
            400,
            "bad_authority",
        ),
        RequestCase::connect(
            "CONNECT to IPv6 loopback",
            "[::1]:15008",
            400,
            "bad_authority",
        ),
        RequestCase::connect(
            "CONNECT to IPv4-mapped loopback",
            "[::ffff:127.0.0.1]:15000",
            400,
            "bad_authority",
        ),
        RequestCase::connect(
            "CONNECT to the unspecified address",
            "0.0.0.0:8080",
            400,
            "bad_authority",
        ),
        // HOSTILE 7: a literal IP:port and nothing else.
        RequestCase::connect(
            "CONNECT to a hostname",
            "example.com:80",
            400,
            "bad_authority",
        ),
        RequestCase::connect(
            "CONNECT to localhost by name",
            "localhost:15000",
            400,
            "bad_authority",
        ),
        RequestCase::connect(
            "CONNECT without a port",
            "10.200.1.10",
            400,
            "bad_authority",
        ),
        RequestCase::connect("CONNECT to port 0", "10.200.1.10:0", 400, "bad_authority"),
        RequestCase::connect(
            "CONNECT with userinfo",
            "user@10.200.1.10:8080",
            400,
            "bad_authority",
        ),
        RequestCase::connect(
            "CONNECT to an IPv6 address with a zone id",
            "[fe80::1%25eth0]:80",
            400,
            "bad_authority",
        )
        .or_h2_reset(),
        RequestCase::connect("CONNECT without :authority", "/", 400, "bad_authority").or_h2_reset(),
        // HOSTILE 6: the pod must run as the identity the client asked to reach.
        RequestCase::connect(
            "CONNECT to pod-1-1 on a connection opened for pod-1-0",
            "10.200.1.11:8080",
            400,
            "identity_mismatch",
        ),
        RequestCase::connect(
            "CONNECT to pod-1-1 over IPv6 on a connection opened for pod-1-0",
            "[fd00:200:1::11]:8080",
            400,
            "identity_mismatch",
        ),
        // HOSTILE 9: headers claiming pod-1-1 do not make the client pod-1-1.
        RequestCase::connect(
            "CONNECT to pod-1-1 with headers claiming to be pod-1-1",
            "10.200.1.11:8080",
            400,
            "identity_mismatch",
        )
        .with_headers(IDENTITY_CLAIMS),
        // DESIGN: 503 when the pod does not accept.
        RequestCase::connect(
            "CONNECT to a port of pod-1-0 where nothing listens",
            "10.200.1.10:9",
            503,
            "upstream_unreachable",
        ),
    ];
    for case in &cases {
        violations.extend(env.check(case.what, || env.expect_request_refusal(case)));
    }

    // HOSTILE 9: a valid request with spoofed telemetry and identity headers is delivered, and
    // node 1 attributes it to the identity in the client certificate, never to the headers.
    violations.extend(env.check(
        "valid CONNECT with spoofed forwarded/identity headers",
        || {
            let before = env.before("none")?;
            let (local, outcome, reply) =
                env.tunnel(connect_req(POD_1_0_HTTP, IDENTITY_CLAIMS)?)?;
            ensure!(matches!(outcome, Outcome::Status(200)), "got {outcome:?}");
            let reply = reply.unwrap_or_default();
            ensure!(
                reply.contains("\"server\":\"pod-1-0\""),
                "not delivered to pod-1-0"
            );
            // The claimed address belongs to another identity: the pod is dialled from the
            // node, never from pod-1-1's address.
            ensure!(
                !reply.contains("\"peer\":\"10.200.1.11:"),
                "delivered from the claimed address: {reply}"
            );
            // `forwarded` may serve as the logged client address (telemetry), so this
            // connection's event carries either that or the real one.
            let local = local.to_string();
            let event = env.wait_event(&before, |e| {
                e["dst_addr"] == POD_1_0_HTTP
                    && (e["src_addr"] == local.as_str() || e["src_addr"] == "10.200.1.11:1")
            })?;
            ensure!(
                event["src_identity"] == pod00_id.as_str(),
                "logged src_identity {} instead of the certificate's {pod00_id}",
                event["src_identity"]
            );
            ensure!(
                event["src_workload"] != "default/pod-1-1",
                "attributed to pod-1-1 because of headers: {event}"
            );
            ensure!(
                event["delivered_from"] == "node:unverified_source",
                "delivered from {} instead of the node: {event}",
                event["delivered_from"]
            );
            let metrics = env.mesh.metrics(1)?;
            let spoofed = metric_sum(
                &metrics,
                "istio_tcp_connections_opened_total",
                &[("reporter", "destination"), ("source_workload", "pod-1-1")],
            ) + metric_sum(
                &metrics,
                "istio_tcp_connections_opened_total",
                &[
                    ("reporter", "destination"),
                    (
                        "source_principal",
                        "spiffe://cluster.local/ns/default/sa/pod-1-1",
                    ),
                ],
            );
            ensure!(spoofed == 0.0, "metrics attribute a connection to pod-1-1");
            Ok(())
        },
    ));

    ensure!(
        violations.is_empty(),
        "{} case(s) violated the CONNECT contract:\n{}",
        violations.len(),
        violations.join("\n")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// HOSTILE 14: slowloris.
// ---------------------------------------------------------------------------------------------

/// Silent sockets stay open until closed by the peer.
const SILENT_SOCKETS: usize = 20;

/// A peer that opens TCP and stalls (sends nothing, or trickles a ClientHello) is closed at the
/// handshake timeout and counted as `handshake_timeout`; one that completes TLS (with or without
/// the HTTP/2 preface) but never sends a request is closed as `idle_connection`. Their file
/// descriptors are released. Meanwhile a well-behaved client that rests between two requests
/// on one connection (as the outbound pool does) is not mistaken for an idle one.
#[test]
fn stalled_handshakes_and_idle_connections_are_closed() -> Result<()> {
    if !e2e_gate("stalled_handshakes_and_idle_connections_are_closed") {
        return Ok(());
    }
    let tb = Testbed::builder().build()?;
    let mesh = Mesh::start(&tb, &MeshOptions::default())?;
    let _servers = http_servers(&tb)?;
    let env = Env::new(&tb, &mesh)?;
    env.assert_mesh_serves("start-up")?;

    let before = env.before("handshake_timeout")?;
    let fds_before = env.agent_fds()?;
    let config = env.client_as(tb.pod(0, 0))?;
    let name = sni(tb.pod(1, 0));
    let hello = client_hello(config.clone(), name.clone())?;
    let hbone = env.hbone;

    let (attack, fds_during) = std::thread::scope(|s| {
        let attack = s.spawn(|| {
            env.attack(move || async move {
                let used = tokio::spawn(use_connection_twice(hbone, config.clone(), name.clone()));
                let mut tasks = tokio::task::JoinSet::new();
                for _ in 0..SILENT_SOCKETS {
                    tasks.spawn(hold_silent(hbone));
                }
                tasks.spawn(hold_trickling(hbone, hello));
                tasks.spawn(hold_tls_without_http2(hbone, config.clone(), name.clone()));
                tasks.spawn(hold_idle_http2(hbone, config, name));
                let mut held = Vec::new();
                while let Some(result) = tasks.join_next().await {
                    held.push(result??);
                }
                Ok((held, used.await??))
            })
        });
        // While the attackers are connected, their sockets must really be held by the agent.
        std::thread::sleep(Duration::from_secs(2));
        let during = env.agent_fds();
        (attack.join(), during)
    });
    let (held, used) = attack.map_err(|_| anyhow!("attack thread panicked"))??;
    let fds_during = fds_during?;

    // Every violation is collected, so one run shows the whole state of HOSTILE 14.
    let mut violations = Vec::new();
    if let Err(e) = used {
        violations.push(format!(
            "- a connection that carried a request was treated as idle: {e}"
        ));
    }

    // Everyone was hung up on, in bounded time.
    for h in &held {
        if h.closed_after.is_none_or(|t| t >= CLOSE_BOUND) {
            violations.push(format!(
                "- {} from {} was not closed within {CLOSE_BOUND:?} (closed after {:?})",
                h.kind, h.local, h.closed_after
            ));
        }
    }
    if fds_during < fds_before + SILENT_SOCKETS {
        violations.push(format!(
            "- the agent did not hold the attackers' sockets ({fds_before} -> {fds_during} fds)"
        ));
    }

    // Counted under the right reasons, and nothing else counted: the well-behaved connection
    // and node 0's pooled connection are not "idle".
    let stalled = held
        .iter()
        .filter(|h| h.reason == "handshake_timeout")
        .count();
    let idle = held.len() - stalled;
    if let Err(e) = env.wait_counts(
        &before,
        &[
            ("handshake_timeout", stalled as f64),
            ("idle_connection", idle as f64),
        ],
    ) {
        violations.push(format!("- {e:#}"));
    }

    // File descriptors released.
    let deadline = Instant::now() + LOG_TIMEOUT;
    let mut fds = env.agent_fds()?;
    while fds > fds_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        fds = env.agent_fds()?;
    }
    if fds > fds_before {
        violations.push(format!(
            "- agent file descriptors not released: {fds_before} before, {fds_during} during, \
             {fds} after"
        ));
    }
    if let Err(e) = env.assert_mesh_serves("slowloris") {
        violations.push(format!("- {e:#}"));
    }

    // Logged, each under its own connection.
    for h in &held {
        if let Err(e) = env.assert_logged(&before, h.local, h.names) {
            violations.push(format!("- {} from {}: {e:#}", h.kind, h.local));
        }
    }
    ensure!(
        violations.is_empty(),
        "{} violation(s) of the slowloris contract:\n{}",
        violations.len(),
        violations.join("\n")
    );
    Ok(())
}

/// One stalled connection and what became of it.
#[derive(Debug)]
struct Held {
    kind: &'static str,
    local: SocketAddr,
    /// When node 1 hung up, counted from connecting; `None` if it never did.
    closed_after: Option<Duration>,
    /// The failure reason node 1 must count.
    reason: &'static str,
    /// What the access log error must mention (any of).
    names: &'static [&'static str],
}

const TIMEOUT_NAMES: &[&str] = &["not completed in time", "timeout", "timed out"];
const IDLE_NAMES: &[&str] = &["idle", "no request", "sent no"];

/// Longer than the test mesh's handshake (and first-request) timeout of 5 s.
const REST: Duration = Duration::from_secs(8);

/// A well-behaved client: one tunnel, then the connection rests longer than the first-request
/// timeout, then a second tunnel on the same connection. The violation, if any, as text.
async fn use_connection_twice(
    hbone: SocketAddr,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Result<Result<(), String>> {
    let (_, conn) = h2_conn(hbone, config, name).await?;
    let conn = conn.map_err(|o| anyhow!("valid HTTP/2 handshake failed: {o:?}"))?;
    let first = conn.get_through(connect_req(POD_1_0_HTTP, &[])?).await?;
    if !matches!(first.0, Outcome::Status(200)) {
        return Ok(Err(format!("first tunnel: {first:?}")));
    }
    tokio::time::sleep(REST).await;
    let second = conn.get_through(connect_req(POD_1_0_HTTP, &[])?).await?;
    conn.close().await;
    Ok(match second.0 {
        Outcome::Status(200) => Ok(()),
        other => Err(format!(
            "after resting {REST:?}, a second CONNECT on the same connection got {other:?}"
        )),
    })
}

/// Opens TCP and sends nothing.
async fn hold_silent(hbone: SocketAddr) -> Result<Held> {
    let started = Instant::now();
    let mut tcp = tcp(hbone).await?;
    let local = tcp.local_addr()?;
    let closed_after = wait_closed(&mut tcp, started).await;
    Ok(Held {
        kind: "silent TCP connection",
        local,
        closed_after,
        reason: "handshake_timeout",
        names: TIMEOUT_NAMES,
    })
}

/// Sends a real ClientHello one byte every half second, never completing it in time.
async fn hold_trickling(hbone: SocketAddr, hello: Vec<u8>) -> Result<Held> {
    let started = Instant::now();
    let tcp = tcp(hbone).await?;
    let local = tcp.local_addr()?;
    let (mut rd, mut wr) = tcp.into_split();
    let trickle = async move {
        for byte in hello.iter().take(40) {
            if wr.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Out of patience before the server: keep the socket open, silently.
        std::future::pending::<()>().await;
    };
    let closed_after = tokio::select! {
        closed = wait_closed(&mut rd, started) => closed,
        () = trickle => None,
    };
    Ok(Held {
        kind: "trickled ClientHello",
        local,
        closed_after,
        reason: "handshake_timeout",
        names: TIMEOUT_NAMES,
    })
}

/// Completes mutual TLS, then never sends the HTTP/2 preface.
async fn hold_tls_without_http2(
    hbone: SocketAddr,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Result<Held> {
    let started = Instant::now();
    let (local, tls) = tls(hbone, config, name).await?;
    let mut tls = tls.map_err(|e| anyhow!("valid handshake failed: {e}"))?;
    let closed_after = wait_closed(&mut tls, started).await;
    Ok(Held {
        kind: "TLS connection without HTTP/2 preface",
        local,
        closed_after,
        reason: "idle_connection",
        names: IDLE_NAMES,
    })
}

/// Completes mutual TLS and the HTTP/2 handshake, then never sends a request.
async fn hold_idle_http2(
    hbone: SocketAddr,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Result<Held> {
    let started = Instant::now();
    let (local, conn) = h2_conn(hbone, config, name).await?;
    let conn = conn.map_err(|o| anyhow!("valid HTTP/2 handshake failed: {o:?}"))?;
    // Hold the request handle so that only the server can end the connection.
    let Conn { client, driver, .. } = conn;
    let closed_after = match timeout(CLOSE_BOUND + Duration::from_secs(5), driver).await {
        Ok(_) => Some(started.elapsed()),
        Err(_) => None,
    };
    drop(client);
    Ok(Held {
        kind: "HTTP/2 connection without a request",
        local,
        closed_after,
        reason: "idle_connection",
        names: IDLE_NAMES,
    })
}

/// Reads until EOF or error (the peer hung up) and returns when, or `None` if it did not
/// within the bound.
async fn wait_closed<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    started: Instant,
) -> Option<Duration> {
    let deadline = started + CLOSE_BOUND + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline.into(), reader.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => return None,
        }
    }
}

/// The bytes of a real ClientHello for `name`.
fn client_hello(config: Arc<ClientConfig>, name: ServerName<'static>) -> Result<Vec<u8>> {
    let mut conn = rustls::ClientConnection::new(config, name)?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// HOSTILE 10 and 11: oversized headers and HTTP/2 floods.
// ---------------------------------------------------------------------------------------------

/// HEADERS+RST_STREAM pairs per write: above hyper's pending-accept-reset limit (50), so one
/// read of the server sees more resets than it tolerates.
const RESET_PAIRS_PER_WRITE: usize = 100;
/// Writes in the rapid reset flood: 2,000 pairs at most.
const RESET_WRITES: usize = 20;
/// CONTINUATION frames of 4 KiB in the continuation flood: 4 MiB at most.
const CONTINUATION_FRAMES: usize = 1024;
/// A flood must cost its sender the connection at once (milliseconds in practice), long before
/// it has been fully written.
/// PING or SETTINGS floods: writes of this many frames each (the bound is 100 per 10 s).
const CONTROL_FRAMES_PER_WRITE: usize = 50;
const CONTROL_WRITES: usize = 40;
const FLOOD_CLOSE_BOUND: Duration = Duration::from_secs(5);

/// A header block over the configured limit is refused per stream (the connection keeps
/// serving); one far over it costs the client its connection; HEADERS+RST_STREAM and
/// CONTINUATION floods get a GOAWAY. Node 1 keeps serving others during and after, and releases
/// what the floods made it hold.
#[test]
fn oversized_headers_and_http2_floods_are_contained() -> Result<()> {
    if !e2e_gate("oversized_headers_and_http2_floods_are_contained") {
        return Ok(());
    }
    let tb = Testbed::builder().build()?;
    let mesh = Mesh::start(&tb, &MeshOptions::default())?;
    let _servers = http_servers(&tb)?;
    let env = Env::new(&tb, &mesh)?;
    env.assert_mesh_serves("start-up")?;
    let fds_before = env.agent_fds()?;
    let config = env.client_as(tb.pod(0, 0))?;
    let name = sni(tb.pod(1, 0));
    let hbone = env.hbone;

    // HOSTILE 10: 20 KiB of headers (limit 16 KiB) -> 431 or a stream reset, and the same
    // connection still carries a valid tunnel afterwards.
    let before = env.before("none")?;
    let (first, second) = env.attack({
        let (config, name) = (config.clone(), name.clone());
        move || async move {
            let (_, conn) = h2_conn(hbone, config, name).await?;
            let conn = conn.map_err(|o| anyhow!("valid connection failed: {o:?}"))?;
            let big = "a".repeat(20 * 1024);
            let oversized = Request::builder()
                .method(Method::CONNECT)
                .uri(POD_1_0_HTTP)
                .header("x-padding", big.as_str())
                .body(())?;
            let first = match send(&conn.client, oversized).await {
                Ok(opened) => Outcome::Status(opened.status),
                Err(outcome) => outcome,
            };
            let second = conn.get_through(connect_req(POD_1_0_HTTP, &[])?).await?;
            conn.close().await;
            Ok((first, second))
        }
    })?;
    ensure!(
        matches!(first, Outcome::Status(431) | Outcome::Reset(_)),
        "a 20 KiB header block got {first:?}, not 431 or a stream reset"
    );
    ensure!(
        matches!(second.0, Outcome::Status(200))
            && second.1.as_deref().is_some_and(|r| r.contains("pod-1-0")),
        "the connection did not survive a refused oversized stream: {second:?}"
    );
    ensure!(
        env.opened()? == before.opened + 1.0,
        "the oversized request was delivered"
    );

    // 64 KiB -> refused; h2 may treat it as abuse and close the connection (GOAWAY).
    let before = env.before("none")?;
    let big = env.attack({
        let (config, name) = (config.clone(), name.clone());
        move || async move {
            let big = "a".repeat(64 * 1024);
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri(POD_1_0_HTTP)
                .header("x-padding", big.as_str())
                .body(())?;
            Ok(one_request(hbone, config, name, req).await?.1)
        }
    })?;
    ensure!(
        matches!(
            big,
            Outcome::Status(431) | Outcome::Reset(_) | Outcome::Http2(_)
        ),
        "a 64 KiB header block got {big:?}"
    );
    env.assert_nothing_dialled(&before)?;
    env.assert_mesh_serves("oversized header blocks")?;

    // HOSTILE 11: rapid reset. Hand-written frames, so that every HEADERS is immediately
    // followed by its RST_STREAM on the wire (a client library would queue and coalesce).
    let rapid_reset = |writes: usize| -> Vec<u8> {
        let mut out = Vec::new();
        for k in 0..RESET_PAIRS_PER_WRITE {
            let stream = 1 + 2 * (writes * RESET_PAIRS_PER_WRITE + k) as u32;
            raw::connect_headers(&mut out, stream, POD_1_0_HTTP, raw::END_HEADERS);
            raw::frame(
                &mut out,
                raw::RST_STREAM,
                0,
                stream,
                &raw::CANCEL.to_be_bytes(),
            );
        }
        out
    };
    let end = env.flood_while_serving(
        "rapid reset",
        config.clone(),
        name.clone(),
        RESET_WRITES,
        rapid_reset,
    )?;
    ensure!(
        end.closed_after.is_some_and(|t| t < FLOOD_CLOSE_BOUND),
        "rapid reset: node 1 kept the connection open ({end:?})"
    );
    ensure!(
        end.goaway == Some(raw::ENHANCE_YOUR_CALM),
        "rapid reset: expected GOAWAY(ENHANCE_YOUR_CALM), got {end:?}"
    );

    // HOSTILE 11: PING and SETTINGS floods end in GOAWAY(ENHANCE_YOUR_CALM), each counted.
    for (what, kind, payload) in [
        ("PING flood", raw::PING, &[7u8; 8][..]),
        ("SETTINGS flood", raw::SETTINGS, &[][..]),
    ] {
        let floods = || -> Result<f64> {
            Ok(metric_sum(
                &env.mesh.metrics(1)?,
                "trellis_connection_failures_total",
                &[("direction", "inbound"), ("reason", "http2_flood")],
            ))
        };
        let before = floods()?;
        let end =
            env.flood_while_serving(what, config.clone(), name.clone(), CONTROL_WRITES, |_| {
                let mut out = Vec::new();
                for _ in 0..CONTROL_FRAMES_PER_WRITE {
                    raw::frame(&mut out, kind, 0, 0, payload);
                }
                out
            })?;
        ensure!(
            end.closed_after.is_some_and(|t| t < FLOOD_CLOSE_BOUND)
                && end.goaway == Some(raw::ENHANCE_YOUR_CALM),
            "{what}: expected GOAWAY(ENHANCE_YOUR_CALM) and the connection closed, got {end:?}"
        );
        let deadline = Instant::now() + LOG_TIMEOUT;
        while floods()? < before + 1.0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        ensure!(
            floods()? == before + 1.0,
            "{what}: http2_flood counted {} times, expected once",
            floods()? - before
        );
    }

    // HOSTILE 11: CONTINUATION flood: a header block that never ends.
    let continuation = |i: usize| -> Vec<u8> {
        let mut out = Vec::new();
        if i == 0 {
            raw::connect_headers(&mut out, 1, POD_1_0_HTTP, 0);
        } else {
            let mut block = Vec::new();
            raw::literal(&mut block, &format!("x-flood-{i}"), &[b'a'; 4000]);
            raw::frame(&mut out, raw::CONTINUATION, 0, 1, &block);
        }
        out
    };
    let end = env.flood_while_serving(
        "CONTINUATION flood",
        config,
        name,
        CONTINUATION_FRAMES,
        continuation,
    )?;
    ensure!(
        end.closed_after.is_some_and(|t| t < FLOOD_CLOSE_BOUND) && end.goaway.is_some(),
        "CONTINUATION flood: expected a GOAWAY and the connection closed, got {end:?}"
    );

    // Whatever the floods made node 1 hold (streams, dialled pod connections) is released.
    let deadline = Instant::now() + LOG_TIMEOUT;
    let mut fds = env.agent_fds()?;
    while fds > fds_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        fds = env.agent_fds()?;
    }
    ensure!(
        fds <= fds_before,
        "agent holds {fds} file descriptors after the floods, {fds_before} before"
    );
    env.assert_mesh_serves("HTTP/2 floods")?;
    Ok(())
}

/// How a flood ended (read through `Debug` in failure messages).
#[derive(Debug)]
#[allow(
    dead_code,
    reason = "fields are read through Debug in failure messages"
)]
struct FloodEnd {
    /// Writes that went through before the connection broke or the flood ran out.
    writes: usize,
    /// Error code of the GOAWAY received, if any.
    goaway: Option<u32>,
    /// When node 1 closed the connection, counted from the first write.
    closed_after: Option<Duration>,
    /// Why writing stopped early, if it did.
    write_error: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// HOSTILE 5, client side: the outbound proxy checks who answers.
// ---------------------------------------------------------------------------------------------

/// With node 1's agent replaced by an impostor on its HBONE address, node 0's agent refuses to
/// tunnel pod-0-0's connection to pod-1-0: neither a mesh certificate for another identity
/// (pod-1-1) nor pod-1-0's identity signed by another root is accepted, the connection fails
/// before any HTTP/2 byte is sent, and the failure is counted and logged on node 0.
#[test]
fn outbound_refuses_a_peer_that_proves_the_wrong_identity() -> Result<()> {
    if !e2e_gate("outbound_refuses_a_peer_that_proves_the_wrong_identity") {
        return Ok(());
    }
    let tb = Testbed::builder().build()?;
    let mut mesh = Mesh::start(&tb, &MeshOptions::default())?;
    let _servers = http_servers(&tb)?;
    let ca = LocalCa::load(&mesh.ca_dir.join("ca.pem"), &mesh.ca_dir.join("ca-key.pem"))?;
    // A forged root may copy the mesh root's name (then the signature is what fails) or not.
    let forged_root = LocalCa::generate(TRUST_DOMAIN)?;
    let other_root = LocalCa::generate("other.example")?;
    ensure!(
        mesh.stop_agent(1, Duration::from_secs(15))?,
        "node 1's agent did not stop cleanly"
    );

    let impostors = [
        (
            "mesh certificate of pod-1-1",
            ca.issue(&identity(tb.pod(1, 1)), CERT_TTL)?,
            &["NotValidForName", "identity"][..],
        ),
        (
            "pod-1-0's identity signed by a forged root with the mesh root's name",
            forged_root.issue(&identity(tb.pod(1, 0)), CERT_TTL)?,
            &["BadSignature", "bad signature"][..],
        ),
        (
            "pod-1-0's identity signed by another root",
            other_root.issue(&identity(tb.pod(1, 0)), CERT_TTL)?,
            &["UnknownIssuer", "unknown issuer"][..],
        ),
    ];
    let mut violations = Vec::new();
    for (what, cert, names) in impostors {
        let result = (|| -> Result<()> {
            let log_len = mesh.access_log(0).len();
            let failures_before = outbound_failures(&mesh, "hbone_tls")?;
            let hbone = SocketAddr::new(tb.node(1).lan_ip4.into(), HBONE_PORT);
            let listener = tb
                .node(1)
                .netns
                .run(|| std::net::TcpListener::bind(hbone))??;
            let server = impostor_config(cert)?;
            let (seen, out) = std::thread::scope(|s| {
                let impostor = s.spawn(|| serve_impostor(listener, server));
                let out = tb.run(
                    tb.pod(0, 0),
                    &["pod-app", "http-get", "--to", POD_1_0_HTTP],
                    RUN_TIMEOUT,
                );
                (impostor.join(), out)
            });
            let seen = seen.map_err(|_| anyhow!("impostor thread panicked"))??;
            let out = out?;
            ensure!(
                !out.success(),
                "pod-0-0 got an answer through the impostor: {}",
                out.stdout
            );
            ensure!(
                seen.handshake_error.is_some(),
                "the client completed the handshake with the impostor ({seen:?})"
            );
            ensure!(
                seen.application_bytes == 0,
                "the impostor received {} bytes of HTTP/2",
                seen.application_bytes
            );
            let deadline = Instant::now() + LOG_TIMEOUT;
            let event = loop {
                let found = mesh.access_log(0).into_iter().skip(log_len).find(|e| {
                    e["direction"] == "outbound"
                        && e["error"].as_str().is_some_and(|s| !s.is_empty())
                });
                if let Some(event) = found {
                    break event;
                }
                ensure!(
                    Instant::now() < deadline,
                    "node 0 logged no failed outbound connection"
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            let error = event["error"].as_str().unwrap_or_default();
            ensure!(
                mentions_any(error, names),
                "node 0 logged {error:?}, which does not name the reason ({names:?})"
            );
            ensure!(
                outbound_failures(&mesh, "hbone_tls")? == failures_before + 1.0,
                "not counted as hbone_tls on node 0"
            );
            Ok(())
        })();
        if let Err(e) = result {
            violations.push(format!("{what}: {e:#}"));
        }
    }

    // The real agent comes back and the mesh works again.
    mesh.start_agent(1)?;
    let env = Env::new(&tb, &mesh)?;
    env.assert_mesh_serves("impostors")?;
    ensure!(
        violations.is_empty(),
        "{} impostor(s) not refused:\n{}",
        violations.len(),
        violations.join("\n")
    );
    Ok(())
}

fn outbound_failures(mesh: &Mesh<'_>, reason: &str) -> Result<f64> {
    Ok(metric_sum(
        &mesh.metrics(0)?,
        "trellis_connection_failures_total",
        &[("direction", "outbound"), ("reason", reason)],
    ))
}

/// What the impostor saw of its one client.
#[derive(Debug)]
struct ImpostorSaw {
    /// How the client ended the handshake, if it did not complete it.
    handshake_error: Option<String>,
    /// Bytes received after a completed handshake.
    application_bytes: usize,
}

/// A TLS 1.3 h2 server presenting `cert` whatever the client asks for.
fn impostor_config(cert: mesh_node::identity::ca::IssuedCert) -> Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(cert.chain, cert.key)?;
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Accepts one connection on `listener`, handshakes and counts what the client sends after.
fn serve_impostor(
    listener: std::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> Result<ImpostorSaw> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let (tcp, _) = timeout(RUN_TIMEOUT, listener.accept())
            .await
            .context("node 0's agent never dialled the impostor")??;
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let mut tls = match timeout(IO_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                return Ok(ImpostorSaw {
                    handshake_error: Some(e.to_string()),
                    application_bytes: 0,
                });
            }
            Err(_) => bail!("handshake with the impostor stalled"),
        };
        // The client accepted us: count what it sends (an HTTP/2 preface, a CONNECT...).
        let mut bytes = 0;
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n @ 1..)) = timeout(Duration::from_secs(3), tls.read(&mut buf)).await {
            bytes += n;
        }
        Ok(ImpostorSaw {
            handshake_error: None,
            application_bytes: bytes,
        })
    })
}

// ---------------------------------------------------------------------------------------------
// The fixture.
// ---------------------------------------------------------------------------------------------

/// `pod-app serve` HTTP servers on port 8080 in every pod, named after the pod, so a request
/// that reaches the wrong pod could not go unnoticed.
fn http_servers(tb: &Testbed) -> Result<Vec<Server>> {
    tb.pods()
        .map(|p| tb.spawn_server(p, &["--name", &p.name, "--listen", "0.0.0.0:8080=http"]))
        .collect()
}

fn identity(pod: &Pod) -> Identity {
    Identity::new(TRUST_DOMAIN, "default", &pod.name).expect("pod names are service accounts")
}

/// The TLS server name that asks for `pod`'s identity.
fn sni(pod: &Pod) -> ServerName<'static> {
    ServerName::try_from(identity(pod).to_sni()).expect("identity server names are DNS names")
}

/// A CONNECT request for `authority`, with extra headers.
fn connect_req(authority: &str, headers: &[(&str, &str)]) -> Result<Request<()>> {
    let mut req = Request::builder().method(Method::CONNECT).uri(authority);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    Ok(req.body(())?)
}

fn mentions_any(text: &str, names: &[&str]) -> bool {
    let text = text.to_lowercase();
    names.iter().any(|n| text.contains(&n.to_lowercase()))
}

/// A calendar date (year, month, day), for certificate validity.
type Ymd = (i32, u8, u8);

/// Node 1's counters and log position before an attack.
struct Before {
    reason: &'static str,
    log_len: usize,
    /// Inbound failure counters by reason.
    failures: BTreeMap<String, f64>,
    opened: f64,
}

struct Env<'a> {
    tb: &'a Testbed,
    mesh: &'a Mesh<'a>,
    /// The mesh CA, loaded from the files the agents use.
    ca: LocalCa,
    roots: Arc<RootCertStore>,
    /// Node 1's HBONE listener: the target.
    hbone: SocketAddr,
}

impl<'a> Env<'a> {
    fn new(tb: &'a Testbed, mesh: &'a Mesh<'a>) -> Result<Self> {
        let ca = LocalCa::load(&mesh.ca_dir.join("ca.pem"), &mesh.ca_dir.join("ca-key.pem"))?;
        let roots = Arc::new(tls::root_store(ca.cert_der())?);
        Ok(Self {
            tb,
            mesh,
            ca,
            roots,
            hbone: SocketAddr::new(tb.node(1).lan_ip4.into(), HBONE_PORT),
        })
    }

    /// Runs `attack` on a current-thread runtime on a thread inside node 0's namespace.
    fn attack<T, F, Fut>(&self, attack: F) -> Result<T>
    where
        T: Send,
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = Result<T>>,
    {
        self.tb.node(0).netns.run(move || -> Result<T> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                timeout(ATTACK_TIMEOUT, attack())
                    .await
                    .map_err(|_| anyhow!("attack did not finish within {ATTACK_TIMEOUT:?}"))?
            })
        })?
    }

    /// Runs one case; its violation, if any, as a line for the final report.
    #[allow(
        clippy::unused_self,
        reason = "a method, so every case reads as `env.check(...)`"
    )]
    fn check(&self, what: &str, case: impl FnOnce() -> Result<()>) -> Option<String> {
        case().err().map(|e| format!("- {what}: {e:#}"))
    }

    /// An HBONE client config presenting `chain` (whatever it is) and verifying the server as
    /// the mesh does.
    fn client(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Arc<ClientConfig>> {
        Ok(Arc::new(tls::client_config(
            tls::provider(),
            self.roots.clone(),
            TRUST_DOMAIN,
            chain,
            key,
        )?))
    }

    /// A correct HBONE client config for `pod`'s identity, as its node's agent would have.
    fn client_as(&self, pod: &Pod) -> Result<Arc<ClientConfig>> {
        let issued = self.ca.issue(&identity(pod), CERT_TTL)?;
        self.client(issued.chain, issued.key)
    }

    /// A workload-style certificate signed by the mesh CA with any SANs and validity (dates).
    fn sign_with_mesh_ca(
        &self,
        sans: Vec<rcgen::SanType>,
        (not_before, not_after): (Ymd, Ymd),
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        use rcgen::{
            CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, Issuer, KeyPair,
            KeyUsagePurpose,
        };
        let issuer =
            Issuer::from_ca_cert_pem(self.ca.cert_pem(), KeyPair::from_pem(&self.ca.key_pem())?)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let cert = params.signed_by(&key, &issuer)?;
        Ok((
            vec![cert.der().clone(), self.ca.cert_der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }

    fn before(&self, reason: &'static str) -> Result<Before> {
        let metrics = self.mesh.metrics(1)?;
        Ok(Before {
            reason,
            log_len: self.mesh.access_log(1).len(),
            failures: inbound_failures(&metrics),
            opened: opened(&metrics),
        })
    }

    fn opened(&self) -> Result<f64> {
        Ok(opened(&self.mesh.metrics(1)?))
    }

    fn agent_fds(&self) -> Result<usize> {
        let pid = self
            .mesh
            .agent_pid(1)
            .context("node 1's agent is not running")?;
        Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
    }

    /// Waits (bounded) for a node 1 access log event newer than `before` matching `pred`.
    fn wait_event(&self, before: &Before, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + LOG_TIMEOUT;
        loop {
            let events = self.mesh.access_log(1);
            let new = events.get(before.log_len..).unwrap_or_default();
            if let Some(event) = new.iter().find(|e| pred(e)) {
                return Ok(event.clone());
            }
            if Instant::now() > deadline {
                let tail: Vec<String> = new.iter().rev().take(10).map(Value::to_string).collect();
                bail!(
                    "no matching access log event on node 1 within {LOG_TIMEOUT:?}; newest events: {tail:#?}"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Node 1 logged the connection from `local` with an error naming the reason.
    fn assert_logged(&self, before: &Before, local: SocketAddr, names: &[&str]) -> Result<()> {
        let local = local.to_string();
        let event = self.wait_event(before, |e| {
            e["src_addr"] == local.as_str() && e["error"].as_str().is_some_and(|s| !s.is_empty())
        })?;
        let error = event["error"].as_str().unwrap_or_default();
        ensure!(
            mentions_any(error, names),
            "node 1 logged {error:?}, which does not name the reason (expected one of {names:?})"
        );
        ensure!(event["direction"] == "inbound", "{event}");
        Ok(())
    }

    /// The reason counter went up by exactly `n` since `before`, and no other failure counter
    /// moved.
    fn wait_count(&self, before: &Before, n: f64) -> Result<()> {
        self.wait_counts(before, &[(before.reason, n)])
    }

    /// The inbound failure counters went up by exactly `expected` (reason, increase) since
    /// `before`, and no other moved.
    fn wait_counts(&self, before: &Before, expected: &[(&str, f64)]) -> Result<()> {
        let deadline = Instant::now() + LOG_TIMEOUT;
        let delta = |now: &BTreeMap<String, f64>, reason: &str| {
            now.get(reason).copied().unwrap_or(0.0)
                - before.failures.get(reason).copied().unwrap_or(0.0)
        };
        loop {
            let now = inbound_failures(&self.mesh.metrics(1)?);
            let reached = expected.iter().all(|(r, n)| delta(&now, r) >= *n);
            if reached || Instant::now() > deadline {
                let moved: BTreeMap<&str, f64> = now
                    .keys()
                    .map(|r| (r.as_str(), delta(&now, r)))
                    .filter(|(_, d)| *d != 0.0)
                    .collect();
                let wanted: BTreeMap<&str, f64> = expected
                    .iter()
                    .filter(|(_, n)| *n != 0.0)
                    .map(|(r, n)| (*r, *n))
                    .collect();
                ensure!(
                    moved == wanted,
                    "inbound failure counters moved by {moved:?}, expected {wanted:?}"
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Logged and counted once under `before.reason`.
    fn assert_refused(&self, before: &Before, local: SocketAddr, names: &[&str]) -> Result<()> {
        self.assert_logged(before, local, names)?;
        self.wait_count(before, 1.0)
    }

    fn assert_nothing_dialled(&self, before: &Before) -> Result<()> {
        let now = self.opened()?;
        ensure!(
            now == before.opened,
            "node 1 opened {} connection(s) to pods for a refused request",
            now - before.opened
        );
        Ok(())
    }

    /// A handshake as `config` asking for `name` fails, is logged naming the reason and counted
    /// as `tls_handshake`; with `in_handshake` the client must see it during the handshake.
    fn expect_tls_refusal(
        &self,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        in_handshake: bool,
        names: &[&str],
    ) -> Result<()> {
        let before = self.before("tls_handshake")?;
        let hbone = self.hbone;
        let req = connect_req(POD_1_0_HTTP, &[])?;
        let (local, outcome) =
            self.attack(move || async move { one_request(hbone, config, name, req).await })?;
        match &outcome {
            Outcome::Tls(_) => {}
            Outcome::Http2(_) if !in_handshake => {}
            other => bail!("expected the handshake to fail, got {other:?}"),
        }
        self.assert_refused(&before, local, names)?;
        self.assert_nothing_dialled(&before)?;
        self.assert_mesh_serves("the refused handshake")
    }

    /// Sends `case` on a fresh authenticated connection and checks node 1's answer.
    fn expect_request_refusal(&self, case: &RequestCase) -> Result<()> {
        let before = self.before(case.reason)?;
        let hbone = self.hbone;
        let config = self.client_as(self.tb.pod(0, 0))?;
        let name = sni(self.tb.pod(1, 0));
        let mut req = Request::builder().method(case.method.clone()).uri(case.uri);
        for (k, v) in case.headers {
            req = req.header(*k, *v);
        }
        let req = req.body(())?;
        let (local, outcome) =
            self.attack(move || async move { one_request(hbone, config, name, req).await })?;
        match outcome {
            Outcome::Status(status) if status == case.status => {
                self.assert_refused(&before, local, &[case.reason])?;
            }
            Outcome::Reset(_) if case.h2_may_reset => {
                // h2 refused it as malformed: the agent never saw it, so nothing to count.
                self.wait_count(&before, 0.0)?;
            }
            other => bail!("expected {} ({}), got {other:?}", case.status, case.reason),
        }
        self.assert_nothing_dialled(&before)?;
        self.assert_mesh_serves("the refused request")
    }

    /// Opens an authenticated connection (pod-0-0 -> pod-1-0), sends `req`, and if it opens a
    /// tunnel sends an HTTP request to pod-1-0's server through it; closes cleanly.
    fn tunnel(&self, req: Request<()>) -> Result<(SocketAddr, Outcome, Option<String>)> {
        let hbone = self.hbone;
        let config = self.client_as(self.tb.pod(0, 0))?;
        let name = sni(self.tb.pod(1, 0));
        self.attack(move || async move {
            let (local, conn) = h2_conn(hbone, config, name).await?;
            let conn = conn.map_err(|o| anyhow!("valid connection failed: {o:?}"))?;
            let (outcome, reply) = conn.get_through(req).await?;
            conn.close().await;
            Ok((local, outcome, reply))
        })
    }

    /// Legitimate traffic: pod-0-0 -> pod-1-0 through the mesh, carried by node 1's HBONE
    /// listener.
    fn assert_mesh_serves(&self, after: &str) -> Result<()> {
        let opened = self.opened()?;
        let out = self.tb.run(
            self.tb.pod(0, 0),
            &["pod-app", "http-get", "--to", POD_1_0_HTTP],
            RUN_TIMEOUT,
        )?;
        let v = out
            .ok_json()
            .with_context(|| format!("legitimate request after {after}"))?;
        ensure!(
            v["status"] == 200 && v["body"]["server"] == "pod-1-0",
            "legitimate request after {after}: {v}"
        );
        ensure!(
            self.opened()? > opened,
            "legitimate request after {after} did not go through node 1's HBONE listener"
        );
        Ok(())
    }

    /// Floods one authenticated raw HTTP/2 connection with `writes` chunks from `chunk` while
    /// legitimate requests go through the mesh; returns how the flood ended.
    fn flood_while_serving(
        &self,
        what: &str,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        writes: usize,
        chunk: impl FnMut(usize) -> Vec<u8> + Send,
    ) -> Result<FloodEnd> {
        let hbone = self.hbone;
        let (end, served) = std::thread::scope(|s| {
            let flood = s.spawn(|| {
                self.attack(move || async move {
                    let tls = raw::session(hbone, config, name).await?;
                    Ok(raw::flood(tls, writes, chunk).await)
                })
            });
            // Others keep being served while the flood runs (bounded: at most 5 requests).
            let mut served = Ok(());
            for _ in 0..5 {
                if flood.is_finished() {
                    break;
                }
                served = self.assert_mesh_serves(&format!("the start of a {what}"));
                if served.is_err() {
                    break;
                }
            }
            (flood.join(), served)
        });
        let end = end.map_err(|_| anyhow!("{what} thread panicked"))??;
        served.with_context(|| format!("during the {what}"))?;
        self.assert_mesh_serves(what)?;
        Ok(end)
    }
}

/// `trellis_connection_failures_total{direction="inbound"}` by reason.
fn inbound_failures(metrics: &str) -> BTreeMap<String, f64> {
    const NAME: &str = "trellis_connection_failures_total{";
    metrics
        .lines()
        .filter(|l| l.starts_with(NAME) && l.contains("direction=\"inbound\""))
        .filter_map(|l| {
            let reason = l.split("reason=\"").nth(1)?.split('"').next()?;
            let value = l.rsplit(' ').next()?.parse::<f64>().ok()?;
            Some((reason.to_owned(), value))
        })
        .collect()
}

fn opened(metrics: &str) -> f64 {
    metric_sum(
        metrics,
        "istio_tcp_connections_opened_total",
        &[("reporter", "destination")],
    )
}

// ---------------------------------------------------------------------------------------------
// Hostile clients.
// ---------------------------------------------------------------------------------------------

/// What a hostile client got back (the texts are read through `Debug` in failure messages).
#[derive(Debug)]
#[allow(
    dead_code,
    reason = "fields are read through Debug in failure messages"
)]
enum Outcome {
    /// The TLS handshake failed, as the client saw it.
    Tls(String),
    /// TLS completed (as far as the client knew) but HTTP/2 failed: a TLS alert on the first
    /// read, a GOAWAY, the connection closed.
    Http2(String),
    /// The stream was reset without a response.
    Reset(String),
    /// A response with this status.
    Status(u16),
}

/// An established HBONE (HTTP/2) client connection.
struct Conn {
    client: SendRequest<Bytes>,
    driver: JoinHandle<Result<(), h2::Error>>,
}

/// A stream whose response head has arrived.
struct Opened {
    status: u16,
    send: SendStream<Bytes>,
    recv: RecvStream,
}

async fn tcp(hbone: SocketAddr) -> Result<TcpStream> {
    timeout(IO_TIMEOUT, TcpStream::connect(hbone))
        .await
        .with_context(|| format!("TCP connect to {hbone} timed out"))?
        .with_context(|| format!("TCP connect to {hbone}"))
}

/// TCP then TLS; the TLS failure, if any, as text.
async fn tls(
    hbone: SocketAddr,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Result<(SocketAddr, Result<TlsStream<TcpStream>, String>)> {
    let tcp = tcp(hbone).await?;
    let local = tcp.local_addr()?;
    let tls = match timeout(IO_TIMEOUT, TlsConnector::from(config).connect(name, tcp)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("TLS handshake timed out".to_owned()),
    };
    Ok((local, tls))
}

/// TCP, TLS and the HTTP/2 handshake.
async fn h2_conn(
    hbone: SocketAddr,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Result<(SocketAddr, Result<Conn, Outcome>)> {
    let (local, tls) = tls(hbone, config, name).await?;
    let tls = match tls {
        Ok(tls) => tls,
        Err(e) => return Ok((local, Err(Outcome::Tls(e)))),
    };
    let conn = match timeout(IO_TIMEOUT, h2::client::handshake(tls)).await {
        Ok(Ok((client, connection))) => Ok(Conn {
            client,
            driver: tokio::spawn(connection),
        }),
        Ok(Err(e)) => Err(Outcome::Http2(e.to_string())),
        Err(_) => Err(Outcome::Http2("HTTP/2 handshake timed out".to_owned())),
    };
    Ok((local, conn))
}

/// Sends `req` (keeping the stream open, as a CONNECT does) and waits for the response head.
async fn send(client: &SendRequest<Bytes>, req: Request<()>) -> Result<Opened, Outcome> {
    let attempt = async {
        let mut client = client.clone().ready().await?;
        let (response, send) = client.send_request(req, false)?;
        let response = response.await?;
        Ok::<_, h2::Error>(Opened {
            status: response.status().as_u16(),
            send,
            recv: response.into_body(),
        })
    };
    match timeout(IO_TIMEOUT, attempt).await {
        Ok(Ok(opened)) => Ok(opened),
        Ok(Err(e)) if e.is_reset() => Err(Outcome::Reset(e.to_string())),
        Ok(Err(e)) => Err(Outcome::Http2(e.to_string())),
        Err(_) => Err(Outcome::Http2("no response in time".to_owned())),
    }
}

/// One request on a fresh connection: what came back, and the connection's local address
/// (which is how node 1's access log names it).
async fn one_request(
    hbone: SocketAddr,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    req: Request<()>,
) -> Result<(SocketAddr, Outcome)> {
    let (local, conn) = h2_conn(hbone, config, name).await?;
    let outcome = match conn {
        Err(outcome) => outcome,
        Ok(conn) => match send(&conn.client, req).await {
            Ok(opened) => Outcome::Status(opened.status),
            Err(outcome) => outcome,
        },
    };
    Ok((local, outcome))
}

impl Conn {
    /// Sends `req`; if it opens a tunnel, sends an HTTP/1.1 GET through it, reads the reply to
    /// the end and half-closes, so the tunnel ends cleanly.
    async fn get_through(&self, req: Request<()>) -> Result<(Outcome, Option<String>)> {
        let mut opened = match send(&self.client, req).await {
            Ok(opened) => opened,
            Err(outcome) => return Ok((outcome, None)),
        };
        if opened.status != 200 {
            return Ok((Outcome::Status(opened.status), None));
        }
        opened
            .send
            .send_data(Bytes::from_static(TUNNEL_REQUEST), false)?;
        let mut reply = Vec::new();
        while let Some(chunk) = timeout(IO_TIMEOUT, opened.recv.data())
            .await
            .context("no reply through the tunnel")?
        {
            let chunk = chunk?;
            opened.recv.flow_control().release_capacity(chunk.len())?;
            reply.extend_from_slice(&chunk);
            ensure!(reply.len() <= 1 << 20, "endless reply through the tunnel");
        }
        opened.send.send_data(Bytes::new(), true)?;
        Ok((
            Outcome::Status(200),
            Some(String::from_utf8_lossy(&reply).into_owned()),
        ))
    }

    /// Drops the request handle and lets h2 flush and close the connection (bounded).
    async fn close(self) {
        drop(self.client);
        let _ = timeout(IO_TIMEOUT, self.driver).await;
    }
}

/// A client that accepts any server certificate and presents none (HOSTILE 3: the attacker
/// does not care who the server is).
fn no_client_auth() -> Result<Arc<ClientConfig>> {
    let provider = tls::provider();
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Hand-written HTTP/2 frames (RFC 9113) and HPACK literals (RFC 7541), for attacks a client
/// library would not let through as written.
mod raw {
    use super::*;

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_HEADERS: u8 = 0x4;
    pub const ACK: u8 = 0x1;
    pub const CANCEL: u32 = 0x8;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    pub fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = u32::try_from(payload.len()).expect("frame payload under 16 MiB");
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        out.extend_from_slice(payload);
    }

    /// "Literal header field without indexing, new name", no Huffman coding.
    pub fn literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
        out.push(0x00);
        string(out, name.as_bytes());
        string(out, value);
    }

    fn string(out: &mut Vec<u8>, s: &[u8]) {
        integer(out, 7, s.len());
        out.extend_from_slice(s);
    }

    fn integer(out: &mut Vec<u8>, prefix_bits: u32, mut value: usize) {
        let max = (1usize << prefix_bits) - 1;
        if value < max {
            out.push(value as u8);
            return;
        }
        out.push(max as u8);
        value -= max;
        while value >= 128 {
            out.push((value % 128 + 128) as u8);
            value /= 128;
        }
        out.push(value as u8);
    }

    /// A HEADERS frame opening a CONNECT stream to `authority`.
    pub fn connect_headers(out: &mut Vec<u8>, stream: u32, authority: &str, flags: u8) {
        let mut block = Vec::new();
        literal(&mut block, ":method", b"CONNECT");
        literal(&mut block, ":authority", authority.as_bytes());
        frame(out, HEADERS, flags, stream, &block);
    }

    pub struct Frame {
        pub kind: u8,
        pub flags: u8,
        pub payload: Vec<u8>,
    }

    pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Frame> {
        let mut head = [0u8; 9];
        r.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        Ok(Frame {
            kind: head[3],
            flags: head[4],
            payload,
        })
    }

    /// Mutual TLS as a valid client, then the HTTP/2 preface and the SETTINGS exchange.
    pub async fn session(
        hbone: SocketAddr,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<TlsStream<TcpStream>> {
        let (_, tls) = super::tls(hbone, config, name).await?;
        let mut tls = tls.map_err(|e| anyhow!("valid handshake failed: {e}"))?;
        ensure!(
            tls.get_ref().1.alpn_protocol() == Some(tls::ALPN_H2),
            "h2 not negotiated"
        );
        let mut hello = PREFACE.to_vec();
        frame(&mut hello, SETTINGS, 0, 0, &[]);
        tls.write_all(&hello).await?;
        timeout(IO_TIMEOUT, async {
            loop {
                let f = read_frame(&mut tls).await?;
                if f.kind == SETTINGS && f.flags & ACK == 0 {
                    return Ok::<_, anyhow::Error>(());
                }
            }
        })
        .await
        .context("no SETTINGS from the server")??;
        let mut ack = Vec::new();
        frame(&mut ack, SETTINGS, ACK, 0, &[]);
        tls.write_all(&ack).await?;
        Ok(tls)
    }

    /// Writes up to `writes` chunks while reading whatever the server sends; stops when the
    /// server hangs up (or stops reading), then waits (bounded) for it to close.
    pub async fn flood(
        tls: TlsStream<TcpStream>,
        writes: usize,
        mut chunk: impl FnMut(usize) -> Vec<u8>,
    ) -> FloodEnd {
        let started = Instant::now();
        let (mut rd, mut wr) = tokio::io::split(tls);
        let goaway = Arc::new(Mutex::new(None));
        let mut reader = tokio::spawn({
            let goaway = goaway.clone();
            async move {
                while let Ok(f) = read_frame(&mut rd).await {
                    if f.kind == GOAWAY && f.payload.len() >= 8 {
                        let code = u32::from_be_bytes([
                            f.payload[4],
                            f.payload[5],
                            f.payload[6],
                            f.payload[7],
                        ]);
                        *goaway.lock() = Some(code);
                    }
                }
            }
        });
        let mut written = 0;
        let mut write_error = None;
        while written < writes && !reader.is_finished() {
            match timeout(IO_TIMEOUT, wr.write_all(&chunk(written))).await {
                Ok(Ok(())) => written += 1,
                Ok(Err(e)) => {
                    write_error = Some(e.to_string());
                    break;
                }
                Err(_) => {
                    write_error = Some("the server stopped reading".to_owned());
                    break;
                }
            }
            tokio::task::yield_now().await;
        }
        let closed_after = if timeout(CLOSE_BOUND, &mut reader).await.is_ok() {
            Some(started.elapsed())
        } else {
            reader.abort();
            None
        };
        let goaway = *goaway.lock();
        FloodEnd {
            writes: written,
            goaway,
            closed_after,
            write_error,
        }
    }
}
