//! Policy is decided for every flow that reaches a meshed pod, whatever its path, and
//! `meshctl policy explain` gives the verdict the data path enforces.
//!
//! A table in the manner of an adversarial-calls suite: every combination of
//! {same node, cross node} x {IPv4, IPv6, IPv4-mapped} x {meshed pod, unenrolled pod, host
//! outside the mesh, raw SYN from a meshed pod} x {no policy, DENY, ALLOW-only, ipBlocks} x
//! {PERMISSIVE, STRICT} (raw SYNs over IPv4 only), each
//! asserting what the caller's socket sees and the verdict `explain` gives for it:
//!
//! - a meshed caller's connection is decided by the node proxy on its verified identity, on
//!   the destination's node for a remote pod and on its own node for a local one; a denial is
//!   a prompt reset;
//! - a plaintext caller (an unenrolled pod, a host outside the mesh, or a meshed pod using a
//!   raw socket, which looks the same to the destination) is decided in the kernel: it has no
//!   identity, and its address is not weighed, so a port where such a caller is denied (STRICT,
//!   an ALLOW policy it cannot match, an `ipBlocks` rule) drops its SYN.
//!
//! (That a policy change closes the open connections it now denies, on both paths, is in
//! `policy.rs`.)

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use mesh_tests::{
    mesh::{Mesh, MeshOptions, NAMESPACE, spiffe_id},
    testbed::{Place, Pod, Testbed, e2e_gate},
};
use serde_json::{Value, json};

const AUTHZ: &str = "AuthorizationPolicy";
const PEER_AUTHN: &str = "PeerAuthentication";
const PORT: u16 = 8080;
const SETTLE: Duration = Duration::from_secs(40);
/// A meshed caller's bound on one GET: far above a reset's round trip.
const MESHED_TIMEOUT: Duration = Duration::from_secs(4);
/// A plaintext caller's bound: a dropped SYN shows as a timeout, so keep it short.
const PLAINTEXT_TIMEOUT: Duration = Duration::from_millis(1500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    Meshed,
    Unenrolled,
    Outside,
    /// A SYN written to a raw socket by the meshed pod: no connect(), so no redirect.
    RawSyn,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
    V4Mapped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    SameNode,
    CrossNode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    None,
    Deny,
    AllowOnly,
    IpBlocks,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Permissive,
    Strict,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    caller: Caller,
    route: Route,
    family: Family,
}

/// The verdict Istio's semantics give (see the module docs for plaintext and `ipBlocks`).
fn expected(caller: Caller, policy: Policy, mode: Mode) -> bool {
    match (caller, policy, mode) {
        (Caller::Meshed, Policy::Deny, _) => false,
        (Caller::Meshed, _, _) => true,
        (_, _, Mode::Strict) => false,
        (_, Policy::None | Policy::Deny, Mode::Permissive) => true,
        (_, Policy::AllowOnly | Policy::IpBlocks, Mode::Permissive) => false,
    }
}

/// The testbed's parts the table refers to.
struct Parties<'a> {
    meshed: &'a Pod,
    unenrolled: &'a Pod,
    same_node_server: &'a Pod,
    cross_node_server: &'a Pod,
}

impl Parties<'_> {
    fn server(&self, route: Route) -> &Pod {
        match route {
            Route::SameNode => self.same_node_server,
            Route::CrossNode => self.cross_node_server,
        }
    }
}

fn addr(server: &Pod, family: Family) -> SocketAddr {
    let ip: IpAddr = match family {
        Family::V4 => server.ip4.into(),
        Family::V6 => server.ip6.into(),
        Family::V4Mapped => server.ip4.to_ipv6_mapped().into(),
    };
    SocketAddr::new(ip, PORT)
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for caller in [
        Caller::Meshed,
        Caller::Unenrolled,
        Caller::Outside,
        Caller::RawSyn,
    ] {
        for route in [Route::SameNode, Route::CrossNode] {
            for family in [Family::V4, Family::V6, Family::V4Mapped] {
                // The host outside the mesh is on neither node: "same node" is the node-0
                // server for it, reached across the LAN like the other. It has no mapped form
                // to try.
                if caller == Caller::Outside && family == Family::V4Mapped
                    || caller == Caller::RawSyn && family != Family::V4
                {
                    continue;
                }
                cases.push(Case {
                    caller,
                    route,
                    family,
                });
            }
        }
    }
    cases
}

/// What one case's GET did: the server answered, was refused promptly, or timed out.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Answered,
    Refused(String),
    TimedOut(String),
}

fn try_case(tb: &Testbed, parties: &Parties<'_>, case: Case) -> Seen {
    let server = parties.server(case.route);
    let to = addr(server, case.family);
    if case.caller == Caller::RawSyn {
        return raw_syn(tb, parties.meshed, to);
    }
    let (place, timeout): (Place<'_>, Duration) = match case.caller {
        Caller::Meshed => (parties.meshed.into(), MESHED_TIMEOUT),
        Caller::Unenrolled => (parties.unenrolled.into(), PLAINTEXT_TIMEOUT),
        Caller::Outside | Caller::RawSyn => (
            tb.external().expect("external host").into(),
            PLAINTEXT_TIMEOUT,
        ),
    };
    match tb.get_server_name(place, to, Some(timeout)) {
        Ok(name) if name == server.name => Seen::Answered,
        Ok(other) => Seen::Refused(format!("wrong server {other}")),
        Err(e) if e.contains("timed out") => Seen::TimedOut(e),
        Err(e) => Seen::Refused(e),
    }
}

/// One raw SYN from `pod` to `to`: a SYN-ACK is an answer, silence a drop.
fn raw_syn(tb: &Testbed, pod: &Pod, to: SocketAddr) -> Seen {
    let timeout_ms = PLAINTEXT_TIMEOUT.as_millis().to_string();
    let to = to.to_string();
    let cmd = [
        "pod-app",
        "--timeout-ms",
        &timeout_ms,
        "raw-syn",
        "--to",
        &to,
    ];
    let answer = tb
        .run(pod, &cmd, SETTLE)
        .and_then(|out| out.ok_json())
        .map(|v| v["answer"].as_str().unwrap_or_default().to_owned());
    match answer.as_deref() {
        Ok("syn-ack") => Seen::Answered,
        Ok("none") => Seen::TimedOut("no answer to the SYN".into()),
        Ok(other) => Seen::Refused(format!("answer {other}")),
        Err(e) => Seen::Refused(format!("{e:#}")),
    }
}

/// Runs every case at once; returns what each saw.
fn sweep(tb: &Testbed, parties: &Parties<'_>, cases: &[Case]) -> Vec<Seen> {
    std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|&case| s.spawn(move || try_case(tb, parties, case)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Seen::Refused("case panicked".into())))
            .collect()
    })
}

/// `meshctl policy explain` on the destination's node, for the case's caller.
fn explain(tb: &Testbed, mesh: &Mesh<'_>, parties: &Parties<'_>, case: Case) -> Value {
    let server = parties.server(case.route);
    let from = match case.caller {
        Caller::Meshed => format!("{NAMESPACE}/{}", parties.meshed.name),
        Caller::Unenrolled => format!("{NAMESPACE}/{}", parties.unenrolled.name),
        Caller::Outside => tb.external().expect("external host").ip4.to_string(),
        // Plaintext from the meshed pod's own address.
        Caller::RawSyn => parties.meshed.ip4.to_string(),
    };
    let to = format!("{NAMESPACE}/{}:{PORT}", server.name);
    mesh.explain(server.node, &from, &to)
        .expect("meshctl policy explain succeeds")
}

fn policy_spec(policy: Policy, parties: &Parties<'_>, external: IpAddr) -> Option<Value> {
    let selector = json!({"matchLabels": {"app": "server"}});
    let meshed = spiffe_id(parties.meshed)
        .trim_start_matches("spiffe://")
        .to_owned();
    let host = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    };
    match policy {
        Policy::None => None,
        Policy::Deny => Some(json!({"selector": selector, "action": "DENY",
            "rules": [{"from": [{"source": {"principals": [meshed]}}]}]})),
        Policy::AllowOnly => Some(json!({"selector": selector,
            "rules": [{"from": [{"source": {"principals": [meshed]}}]}]})),
        Policy::IpBlocks => {
            let blocks: Vec<String> = [
                IpAddr::from(parties.meshed.ip4),
                IpAddr::from(parties.meshed.ip6),
                IpAddr::from(parties.unenrolled.ip4),
                IpAddr::from(parties.unenrolled.ip6),
                external,
            ]
            .into_iter()
            .map(host)
            .collect();
            Some(json!({"selector": selector,
                "rules": [{"from": [{"source": {"ipBlocks": blocks}}]}]}))
        }
    }
}

#[test]
fn every_path_to_a_meshed_pod_is_decided_and_explain_agrees() {
    if !e2e_gate("every_path_to_a_meshed_pod_is_decided_and_explain_agrees") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(3)
        .external(true)
        .build()
        .expect("testbed");
    let mut mesh = Mesh::start(
        &tb,
        &MeshOptions {
            control_plane: true,
            unenrolled: vec![(0, 1)],
            ..Default::default()
        },
    )
    .expect("mesh");
    let parties = Parties {
        meshed: tb.pod(0, 0),
        unenrolled: tb.pod(0, 1),
        same_node_server: tb.pod(0, 2),
        cross_node_server: tb.pod(1, 0),
    };
    let external = IpAddr::from(tb.external().expect("external host").ip4);
    let mut servers = Vec::new();
    for server in [parties.same_node_server, parties.cross_node_server] {
        servers.push(
            tb.spawn_server(
                server,
                &[
                    "--listen",
                    &format!("[{}]:{PORT}=http", Ipv6Addr::UNSPECIFIED),
                    "--name",
                    &server.name,
                ],
            )
            .expect("server"),
        );
        mesh.write_pod(server, NAMESPACE, &[("app", "server")])
            .expect("label server");
    }
    let cases = cases();
    let mut failures = Vec::new();
    for mode in [Mode::Permissive, Mode::Strict] {
        match mode {
            Mode::Strict => mesh.write_policy(
                PEER_AUTHN,
                NAMESPACE,
                "strict",
                json!({"mtls": {"mode": "STRICT"}}),
            ),
            Mode::Permissive => mesh.delete_policy(PEER_AUTHN, NAMESPACE, "strict"),
        }
        .expect("peer authentication");
        for policy in [
            Policy::None,
            Policy::Deny,
            Policy::AllowOnly,
            Policy::IpBlocks,
        ] {
            match policy_spec(policy, &parties, external) {
                Some(spec) => mesh.write_policy(AUTHZ, NAMESPACE, "server", spec),
                None => mesh.delete_policy(AUTHZ, NAMESPACE, "server"),
            }
            .expect("authorization policy");
            let want: Vec<bool> = cases
                .iter()
                .map(|c| expected(c.caller, policy, mode))
                .collect();
            // Policies reach both nodes asynchronously: sweep (bounded) until the table holds.
            let deadline = Instant::now() + SETTLE;
            let seen = loop {
                let seen = sweep(&tb, &parties, &cases);
                let holds = seen
                    .iter()
                    .zip(&want)
                    .all(|(s, w)| (*s == Seen::Answered) == *w);
                if holds || Instant::now() > deadline {
                    break seen;
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            for ((case, seen), want) in cases.iter().zip(&seen).zip(&want) {
                let row = format!("{mode:?} {policy:?} {case:?}");
                if (*seen == Seen::Answered) != *want {
                    failures.push(format!("{row}: expected allowed={want}, saw {seen:?}"));
                    continue;
                }
                // A meshed caller denied by the proxy is reset, never left to time out.
                if case.caller == Caller::Meshed
                    && let Seen::TimedOut(e) = seen
                {
                    failures.push(format!("{row}: denied by a timeout, not a reset: {e}"));
                }
                let explained = explain(&tb, &mesh, &parties, *case);
                let verdict = if *want { "allow" } else { "deny" };
                if explained["verdict"] != verdict {
                    failures.push(format!(
                        "{row}: explain says {} ({}), the data path {verdict}",
                        explained["verdict"], explained["reason"]
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len() * 8,
        failures.join("\n")
    );
}
